"""The in-tree padim plugin, found through the registry like a third party's plugin."""
import math

import pytest
import torch
import torch.nn.functional as F

import distkern

IMG = 64  # image size; level 0 is 16x16 (stride 4), level 1 8x8 (stride 8)
LEVELS = (16, 24)  # channels per level (C = 40)
D = 20  # num_features


@pytest.fixture(scope="module")
def PaDiM():
    try:
        return distkern.methods.get("padim")
    except distkern.methods.UnknownMethodError:
        pytest.skip("padim plugin not installed (pip install --no-build-isolation --no-deps -e plugins/padim)")


class Textures:
    """Synthetic two-level feature maps: per position a Gaussian with a smooth random mean field and
    correlated channels (random mixing of spatially smoothed noise). Defects shift the features of a
    rectangle of positions on both levels; ``mask`` marks it at image resolution."""

    def __init__(self, gen):
        self.gen = gen
        self.mu, self.mix = [], []
        for lvl, c in enumerate(LEVELS):
            s = 16 >> lvl
            low = torch.randn(1, c, 4, 4, generator=gen)
            self.mu.append(2.0 * F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)[0])
            self.mix.append(torch.eye(c) + torch.randn(c, c, generator=gen) / math.sqrt(c))

    def normal(self, n):
        out = []
        for lvl, c in enumerate(LEVELS):
            s = 16 >> lvl
            z = F.avg_pool2d(torch.randn(n, c, s + 2, s + 2, generator=self.gen), 3, stride=1) * 3.0  # smooth, var ~1
            out.append(torch.einsum("ij,bjhw->bihw", self.mix[lvl], z) + self.mu[lvl])
        return out

    def anomalous(self, n, strength=2.5):
        feats = self.normal(n)
        mask = torch.zeros(n, IMG, IMG, dtype=torch.bool)
        for b in range(n):
            h, w = (2 * int(v) for v in torch.randint(2, 4, (2,), generator=self.gen))  # 4..6 positions, even
            r, c = (2 * int(v) for v in torch.randint(0, (16 - 6) // 2 + 1, (2,), generator=self.gen))
            for lvl, f in enumerate(feats):
                k = 1 << lvl
                shift = strength * torch.sign(torch.randn(f.shape[1], generator=self.gen))
                f[b, :, r // k:(r + h) // k, c // k:(c + w) // k] += shift[:, None, None]
            mask[b, 4 * r:4 * (r + h), 4 * c:4 * (c + w)] = True
        return feats, mask


def _auroc(labels, scores):
    metrics = pytest.importorskip("sklearn.metrics")
    return metrics.roc_auc_score(labels.reshape(-1).numpy(), scores.reshape(-1).double().numpy())


def _anomalib_reference(train, test, idx, image_size, sigma=4.0, reg=0.01):
    """anomalib's PaDiM in float64: generate_embedding, per-position torch cov + reg·I, linalg.inv,
    ((delta @ inv) * delta).sum, clamp, sqrt, bilinear upsample, kornia GaussianBlur2d (reflect)."""

    def embed(levels):
        e = levels[0].double()
        for lvl in levels[1:]:
            e = torch.cat((e, F.interpolate(lvl.double(), size=e.shape[-2:], mode="nearest")), 1)
        return torch.index_select(e, 1, idx)

    emb = embed(train)
    B, C, H, W = emb.shape
    vec = emb.reshape(B, C, H * W)
    mean = vec.mean(0)  # (C, P)
    cov = torch.stack([torch.cov(vec[:, :, i].T) + reg * torch.eye(C, dtype=torch.float64) for i in range(H * W)])
    inv = torch.linalg.inv(cov)
    t = embed(test)
    delta = (t.reshape(t.shape[0], C, H * W) - mean).permute(2, 0, 1)
    dist = (torch.matmul(delta, inv) * delta).sum(2).permute(1, 0).reshape(t.shape[0], 1, H, W).clamp(0).sqrt()
    dist = F.interpolate(dist, size=image_size, mode="bilinear", align_corners=False)
    k = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    dist = F.conv2d(F.pad(dist, [k // 2] * 4, mode="reflect"), kernel)[:, 0]
    return dist, dist.amax(dim=(-2, -1))


@pytest.fixture
def data(rng):
    tex = Textures(rng)
    train = tex.normal(80)
    normal = tex.normal(16)
    anomal, mask = tex.anomalous(16)
    return tex, train, normal, anomal, mask


def _cat(a, b):
    return [torch.cat((x, y)) for x, y in zip(a, b)]


def test_listed_in_registry():
    infos = {m.name: m for m in distkern.methods.available()}
    if "padim" not in infos:
        pytest.skip("padim plugin not installed")
    info = infos["padim"]
    assert info.kind == "detector" and info.status == "ok" and info.package == "distkern-padim"


def test_detects_and_localises_defects(PaDiM, data):
    _, train, normal, anomal, mask = data
    det = PaDiM(num_features=D, seed=3).fit(train)
    test = _cat(normal, anomal)
    maps = det.anomaly_map(test, image_size=(IMG, IMG))
    scores = det.score(test, image_size=(IMG, IMG))
    assert maps.shape == (32, IMG, IMG) and maps.dtype == torch.float32
    assert scores.shape == (32,) and scores.dtype == torch.float32
    assert torch.equal(scores, maps.amax(dim=(-2, -1)))
    pixel_mask = torch.cat((torch.zeros(16, IMG, IMG, dtype=torch.bool), mask))
    assert _auroc(pixel_mask, maps) > 0.95
    assert _auroc(torch.arange(32) >= 16, scores) > 0.95
    s2, m2 = det.predict(test, image_size=(IMG, IMG))
    assert torch.equal(s2, scores) and torch.equal(m2, maps)
    # at feature resolution, without image_size
    assert det.anomaly_map(test).shape == (32, 16, 16)


def test_matches_anomalib_float64(PaDiM, data):
    _, train, normal, anomal, _ = data
    test = _cat(normal, anomal)
    det = PaDiM(num_features=D, seed=11).fit(train)
    ref_maps, ref_scores = _anomalib_reference(train, test, det.channel_index, (IMG, IMG))
    maps = det.anomaly_map(test, image_size=(IMG, IMG))
    assert torch.allclose(maps.double(), ref_maps, rtol=1e-4, atol=0)
    assert torch.allclose(det.score(test, image_size=(IMG, IMG)).double(), ref_scores, rtol=1e-4, atol=0)
    # image_size from the constructor, and raw distances (no upsampling, no blur)
    det2 = PaDiM(num_features=D, seed=11, image_size=(IMG, IMG)).fit(train)
    assert torch.allclose(det2.score(test).double(), ref_scores, rtol=1e-4, atol=0)
    raw = PaDiM(num_features=D, seed=11, blur_sigma=0).fit(train).anomaly_map(test)
    emb = torch.cat((test[0], F.interpolate(test[1], size=(16, 16), mode="nearest")), 1)[:, det.channel_index]
    d2 = distkern.mahalanobis_pos(emb.flatten(2).transpose(1, 2), det.mean, det.factor)
    assert torch.equal(raw, d2.sqrt().view(32, 16, 16))


def test_channel_selection_and_multilevel(PaDiM, data):
    _, train, normal, _, _ = data
    a = PaDiM(num_features=D, seed=5).fit(train)
    b = PaDiM(num_features=D, seed=5).fit(train)
    c = PaDiM(num_features=D, seed=6).fit(train)
    idx = a.channel_index
    assert idx.dtype == torch.int64 and idx.shape == (D,)
    assert torch.equal(idx, idx.unique()) and 0 <= int(idx.min()) and int(idx.max()) < sum(LEVELS)
    assert torch.equal(idx, b.channel_index) and not torch.equal(idx, c.channel_index)
    assert torch.equal(a.score(normal), b.score(normal))
    assert a.mean.shape == (256, D) and a.factor.shape == (256, D, D)
    assert torch.equal(a.factor, a.factor.tril())
    # the selection is made once: a refit keeps it (even with seed=None)
    r = PaDiM(num_features=D, seed=None).fit(train)
    first = r.channel_index.clone()
    r.fit([t[:40] for t in train])
    assert torch.equal(r.channel_index, first)
    # all channels; a dict of levels (torchvision's create_feature_extractor) is the same input
    full = PaDiM().fit(train)
    assert torch.equal(full.channel_index, torch.arange(sum(LEVELS))) and full.mean.shape == (256, sum(LEVELS))
    as_dict = PaDiM().fit({"layer1": train[0], "layer2": train[1]})
    assert torch.equal(as_dict.score({"x": normal[0], "y": normal[1]}), full.score(normal))
    # single level, any layout (channels_last is read in place)
    one = PaDiM(num_features=8, seed=0).fit(train[0])
    assert one.mean.shape == (256, 8)
    cl = normal[0].contiguous(memory_format=torch.channels_last)
    assert torch.allclose(one.score(cl), one.score(normal[0]), rtol=1e-6)


def test_streaming_fit_equals_one_shot(PaDiM, data):
    _, train, normal, _, _ = data
    one = PaDiM(num_features=D, seed=2).fit(train)
    # a list of multi-level batches
    batches = [[t[i:i + 16] for t in train] for i in range(0, 80, 16)]
    streamed = PaDiM(num_features=D, seed=2).fit(batches)
    # a loader-like iterator of (features, labels) tuples
    loader = (([t[i:i + 25] for t in train], torch.zeros(len(train[0][i:i + 25]))) for i in range(0, 80, 25))
    from_loader = PaDiM(num_features=D, seed=2).fit(loader)
    for det in (streamed, from_loader):
        assert det.n_samples_ == 80
        assert torch.allclose(det.mean, one.mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(det.factor, one.factor, rtol=1e-5, atol=1e-5)
        assert torch.allclose(det.score(normal), one.score(normal), rtol=1e-5)
    # single-level batches: a list of tensors is one multi-level batch, so pass an iterator
    single = PaDiM(num_features=8, seed=2)
    a = single.fit(iter([train[0][i:i + 20] for i in range(0, 80, 20)])).score(normal[0])
    b = PaDiM(num_features=8, seed=2).fit(train[0]).score(normal[0])
    assert torch.allclose(a, b, rtol=1e-5)


def test_bf16_factors(PaDiM, data):
    _, train, normal, anomal, _ = data
    test = _cat(normal, anomal)
    f32 = PaDiM(num_features=D, seed=1).fit(train)
    bf16 = PaDiM(num_features=D, seed=1, factor_dtype=torch.bfloat16).fit(train)
    assert bf16.factor.dtype == torch.bfloat16 and bf16.factor.is_contiguous()
    assert bf16.factor.untyped_storage().nbytes() * 2 == f32.factor.untyped_storage().nbytes()
    assert torch.allclose(bf16.score(test), f32.score(test), rtol=1e-2, atol=0)
    assert torch.allclose(bf16.anomaly_map(test), f32.anomaly_map(test), rtol=1e-2, atol=0)


def test_save_load_round_trip(PaDiM, data, tmp_path):
    _, train, normal, anomal, _ = data
    test = _cat(normal, anomal)
    for dtype in (torch.float32, torch.bfloat16):
        det = PaDiM(num_features=D, seed=4, blur_sigma=2.0, image_size=(32, 32), factor_dtype=dtype).fit(train)
        path = tmp_path / f"padim-{dtype}.safetensors"
        det.save(path)
        det2 = PaDiM.load(path)
        assert torch.equal(det.score(test), det2.score(test))
        assert torch.equal(det.anomaly_map(test), det2.anomaly_map(test))
        assert torch.equal(det2.channel_index, det.channel_index) and det2.factor.dtype == dtype
        assert (det2.num_features, det2.seed, det2.blur_sigma, det2.image_size) == (D, 4, 2.0, (32, 32))
        assert det2.n_samples_ == 80 and det2.feature_size_ == (16, 16) and det2.level_channels_ == LEVELS
    # a file of another method is refused
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(3)}, str(other), metadata={"distkern_method": "gaussian-ad", "format_version": "1"})
    with pytest.raises(ValueError, match="holds a gaussian-ad model, not a padim model"):
        PaDiM.load(other)
    bare = tmp_path / "bare.safetensors"
    save_file({"mean": torch.zeros(3)}, str(bare))
    with pytest.raises(ValueError, match="holds a non-distkern model"):
        PaDiM.load(bare)
    # a newer format is refused
    newer = tmp_path / "newer.safetensors"
    save_file({"mean": torch.zeros(3)}, str(newer), metadata={"distkern_method": "padim", "format_version": "99"})
    with pytest.raises(ValueError, match="format version 99, newer than this plugin reads"):
        PaDiM.load(newer)
    with pytest.raises(RuntimeError, match="nothing to save"):
        PaDiM().save(tmp_path / "x.safetensors")


def test_blur(PaDiM, data, rng):
    _, train, normal, _, _ = data
    det = PaDiM(num_features=D, seed=0).fit(train)
    # maps smaller than the kernel's half-width (16) are blurred too (reflection continued)
    small = PaDiM(num_features=4, seed=0).fit(torch.randn(30, 6, 3, 5, generator=rng))
    m = small.anomaly_map(torch.randn(2, 6, 3, 5, generator=rng))
    assert m.shape == (2, 3, 5) and bool(torch.isfinite(m).all())
    from distkern_padim.padim import blur_kernel_size, gaussian_blur

    assert blur_kernel_size(4) == 33
    const = torch.full((1, 1, 3, 5), 2.5)
    assert torch.allclose(gaussian_blur(const, 4.0), const)
    assert det.anomaly_map(normal, image_size=(IMG, IMG)).shape == (16, IMG, IMG)


def test_errors(PaDiM, data, rng):
    from distkern.gaussian import NotPositiveDefiniteError

    _, train, normal, _, _ = data
    det = PaDiM(num_features=D)
    with pytest.raises(RuntimeError, match="before fit"):
        det.score(normal)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\); features has shape \(4, 8, 8\)"):
        det.fit(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="num_features=20 but the feature maps have only 16 channels"):
        det.fit(train[0])
    with pytest.raises(ValueError, match="non-zero at rows \\[3\\]"):
        det.fit(train, labels=torch.tensor([0, 0, 0, 1] + [0] * 76))
    with pytest.raises(ValueError, match="at least 2 training images"):
        det.fit([t[:1] for t in train])
    det.fit(train)
    with pytest.raises(ValueError, match=r"channel counts \[16, 25\] differ from \[16, 24\] from the fit"):
        det.score([normal[0], torch.randn(16, 25, 8, 8)])
    with pytest.raises(ValueError, match="1 feature level\\(s\\); expected 2"):
        det.score(normal[0])
    with pytest.raises(ValueError, match="the feature map is 16x18 \\(H x W\\) but 16x16 from the fit"):
        det.score([torch.randn(2, 16, 16, 18), torch.randn(2, 24, 8, 9)])
    with pytest.raises(ValueError, match="batch size"):
        det.score([normal[0], normal[1][:3]])
    with pytest.raises(ValueError, match="batch 1 differs from batch 0"):
        PaDiM().fit([[t[:10] for t in train], [train[0][:10]]])
    # non-finite training features: GaussianStats names the batch and the (image, position)
    bad = torch.randn(30, 6, 8, 8, generator=rng)
    bad[1, :, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0 contains inf or NaN in \(sample, position\) pairs \[\(1, 19\)\]"):
        PaDiM().fit(bad)
    # a covariance that cannot be factorised names the position
    flat = torch.randn(30, 4, 8, 8, generator=rng)
    flat[:, :, 2, 3] = 1.0
    with pytest.raises(NotPositiveDefiniteError, match=r"position 19 \(row 2, column 3 of the 8x8"):
        PaDiM(regularization=0.0).fit(flat)
    PaDiM().fit(flat)  # the default 0.01 ridge makes it positive definite
    with pytest.raises(ValueError, match="factor_dtype"):
        PaDiM(factor_dtype=torch.float64)
    with pytest.raises(ValueError, match="num_features"):
        PaDiM(num_features=0)
    with pytest.raises(ValueError, match="regularization"):
        PaDiM(regularization=-1.0)
    with pytest.raises(TypeError, match="takes a \\(B, C, H, W\\) tensor"):
        det.score(normal[0].numpy())


def test_blur_matrix_and_nearest_resize_match_the_direct_forms(PaDiM, rng, monkeypatch):
    """The blur as products with (n, n) blur matrices (reflect padding folded in) equals the two 1-D
    convolutions over reflect-padded maps, also for maps shorter than the kernel's half-width and an axis
    of length 1; the broadcast nearest resize gives interpolate's bits, at power-of-two factors and (by
    falling back) at others."""
    import distkern_padim.padim as pm

    for shape in [(5, 1, 40, 33), (2, 1, 3, 5), (1, 1, 1, 7), (3, 1, 17, 1)]:
        m = torch.randn(*shape, generator=rng, dtype=torch.float64)
        fast = pm.gaussian_blur(m, 4.0)
        monkeypatch.setattr(pm, "_BLUR_MATRIX_MAX", 0)
        direct = pm.gaussian_blur(m, 4.0)
        monkeypatch.undo()
        assert fast.shape == m.shape and torch.allclose(fast, direct, rtol=1e-12, atol=1e-14)
    for h, w, H, W in [(28, 28, 56, 56), (14, 7, 56, 56), (3, 5, 6, 20), (10, 10, 30, 30), (7, 7, 16, 16)]:
        t = torch.randn(2, 3, h, w, generator=rng)
        assert torch.equal(pm._resize_nearest(t, H, W), F.interpolate(t, size=(H, W), mode="nearest"))
