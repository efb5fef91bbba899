"""The distkern-ood plugins (mahalanobis-ood, class-center, energy), found through the registry."""
import math

import pytest
import torch
import torch.nn.functional as F

import distkern

NAMES = ("mahalanobis-ood", "class-center", "energy")


def _method(name):
    try:
        return distkern.methods.get(name)
    except distkern.methods.UnknownMethodError:
        pytest.skip(f"{name!r} is not registered: the distkern-ood plugin is not installed "
                    "(pip install --no-build-isolation --no-deps -e plugins/ood)")


@pytest.fixture(scope="module")
def MahalanobisOOD():
    return _method("mahalanobis-ood")


@pytest.fixture(scope="module")
def ClassCenter():
    return _method("class-center")


@pytest.fixture(scope="module")
def Energy():
    return _method("energy")


def _mixture(gen, K=4, n=150, d=16, sep=6.0, dtype=torch.float32):
    """K Gaussian classes with one shared, correlated covariance; means along random orthogonal directions.

    Returns (x (K·n, d), y (K·n,), means (K, d), A) with x = μ_y + A ε."""
    q, _ = torch.linalg.qr(torch.randn(d, K, generator=gen, dtype=torch.float64))
    means = sep * q.T  # orthonormal directions: every pair of classes is sep·√2 apart
    A = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = torch.arange(K).repeat_interleave(n)
    x = means[y] + torch.randn(K * n, d, generator=gen, dtype=torch.float64) @ A.T
    return x.to(dtype), y, means, A


def _shifted_cluster(gen, means, A, n=300, sep=6.0):
    """An OOD cluster (float32) like one class of :func:`_mixture`, along a direction orthogonal to every class mean."""
    v = torch.randn(means.shape[1], generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(means.T)
    v = F.normalize(v - q @ (q.T @ v), dim=0)
    return (sep * v + torch.randn(n, means.shape[1], generator=gen, dtype=torch.float64) @ A.T).float()


def _mixture_like(gen, means, A, n=100):
    """Fresh float32 samples (and labels) of the classes of :func:`_mixture`."""
    K, d = means.shape
    y = torch.arange(K).repeat_interleave(n)
    x = means[y] + torch.randn(K * n, d, generator=gen, dtype=torch.float64) @ A.T
    return x.float(), y, means, A


def _reference_min_d2(train, labels, test, K, ridge=1e-6, estimator="empirical"):
    """Lee et al.'s recipe in float64 numpy / scikit-learn: class means, a covariance estimator on
    the class-centred features, (+ ridge·I) inverted; min over classes of the squared distance."""
    np = pytest.importorskip("numpy")
    skcov = pytest.importorskip("sklearn.covariance")
    X, Y, T = train.double().numpy(), labels.numpy(), test.double().numpy()
    mu = np.stack([X[Y == k].mean(0) for k in range(K)])
    resid = X - mu[Y]
    est = skcov.EmpiricalCovariance() if estimator == "empirical" else skcov.LedoitWolf()
    est.fit(resid)
    prec = np.linalg.inv(est.covariance_ + ridge * np.eye(X.shape[1]))
    diff = T[:, None, :] - mu[None, :, :]
    d2 = np.einsum("nkd,de,nke->nk", diff, prec, diff)
    return torch.from_numpy(d2.min(1)), torch.from_numpy(d2.argmin(1)), est


def _auroc(s_in, s_out):
    skm = pytest.importorskip("sklearn.metrics")
    y = torch.cat([torch.zeros(len(s_in)), torch.ones(len(s_out))]).numpy()
    return skm.roc_auc_score(y, torch.cat([s_in, s_out]).double().numpy())


# ---- registry ----------------------------------------------------------------------------------
def test_listed_in_registry():
    infos = {m.name: m for m in distkern.methods.available()}
    missing = [n for n in NAMES if n not in infos]
    if missing:
        pytest.skip(f"distkern-ood plugin not installed ({missing} not registered)")
    for n in NAMES:
        info = infos[n]
        assert info.kind == "detector" and info.status == "ok", info
        assert info.package == "distkern-ood"
        assert distkern.methods.get(n).name == n


# ---- mahalanobis-ood -----------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["empirical", "ledoit-wolf"])
def test_mahalanobis_matches_sklearn_reference(MahalanobisOOD, rng, estimator):
    train, y, means, A = _mixture(rng, dtype=torch.float64)
    test = torch.cat([_mixture(rng, dtype=torch.float64)[0][:200], 4 * torch.randn(100, 16, generator=rng, dtype=torch.float64)])
    det = MahalanobisOOD(estimator=estimator).fit(train, y)
    ref, ref_idx, est = _reference_min_d2(train, y, test, 4, estimator=estimator)
    got = det.score(test)
    assert got.shape == (300,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    assert torch.equal(det.predict(test), ref_idx)
    if estimator == "ledoit-wolf":
        assert det.shrinkage_ == pytest.approx(est.shrinkage_, rel=1e-9)
    # float32 features: float32 arithmetic, still close
    torch.testing.assert_close(det.score(test.float()).double(), ref, rtol=2e-4, atol=1e-4)
    assert det.n_samples_ == 600 and det.class_counts_.tolist() == [150] * 4


def test_mahalanobis_pytorch_ood_convention(MahalanobisOOD, rng):
    """pytorch-ood: 0.5·min d² with pinv(within-class scatter + eps·I): = score / (2N) when ridge = eps / N."""
    train, y, _, _ = _mixture(rng, dtype=torch.float64)
    test = _mixture(rng, dtype=torch.float64)[0]
    N, eps = train.shape[0], 1e-6
    mu = torch.stack([train[y == k].mean(0) for k in range(4)])
    scatter = sum((train[y == k] - mu[k]).T @ (train[y == k] - mu[k]) for k in range(4))
    precision = torch.linalg.pinv(scatter + eps * torch.eye(16, dtype=torch.float64))
    md_k = torch.stack([-0.5 * (((test - mu[k]) @ precision) * (test - mu[k])).sum(1) for k in range(4)], 1)
    pytorch_ood_score = -md_k.max(1).values
    det = MahalanobisOOD(ridge=eps / N).fit(train, y)
    torch.testing.assert_close(det.score(test).double() / (2 * N), pytorch_ood_score, rtol=1e-5, atol=0)


def test_mahalanobis_streaming_fit_equals_tensor_fit(MahalanobisOOD, rng):
    x, y, _, _ = _mixture(rng)
    order = torch.argsort(y, stable=True)  # classes appear batch after batch: K grows while streaming
    batches = [(x[order][i:i + 64], y[order][i:i + 64]) for i in range(0, len(x), 64)]
    a = MahalanobisOOD().fit(x, y)
    b = MahalanobisOOD().fit(iter(batches))
    torch.testing.assert_close(a.means, b.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.factor, b.factor, rtol=1e-9, atol=1e-9)
    test = torch.randn(50, 16, generator=rng)
    torch.testing.assert_close(a.score(test), b.score(test))
    c = MahalanobisOOD(num_classes=4).fit([(bx, by) for bx, by in batches])
    torch.testing.assert_close(a.means, c.means, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator,pooled", [("empirical", True), ("oas", True), ("ledoit-wolf", False)])
def test_mahalanobis_keeps_one_scatter_unless_ledoit_wolf(MahalanobisOOD, rng, monkeypatch, estimator, pooled):
    """The shared covariance needs one within-class scatter, not K (1000 classes at D = 2048: 34 MB, not 34 GB);
    Ledoit-Wolf's fourth moments need each class's. Streaming with classes appearing late (K grows) gives the
    same detector."""
    import distkern_ood._common as common

    made = []

    class Spy(common.GaussianStats):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(common, "GaussianStats", Spy)
    x, y, _, _ = _mixture(rng, dtype=torch.float64)
    det = MahalanobisOOD(estimator=estimator).fit(x, y)
    assert made and all(st.pooled == pooled for st in made)
    order = torch.argsort(y, stable=True)
    streamed = MahalanobisOOD(estimator=estimator).fit(iter([(x[order][i:i + 50], y[order][i:i + 50])
                                                             for i in range(0, len(x), 50)]))
    torch.testing.assert_close(streamed.factor, det.factor, rtol=1e-9, atol=1e-9)
    if pooled:
        assert made[0].state_dict()["scatter"].shape == (1, 16, 16)


def test_mahalanobis_separates_ood_and_predicts(MahalanobisOOD, rng):
    train, y, means, A = _mixture(rng)
    det = MahalanobisOOD().fit(train, y)
    test, ty, _, _ = _mixture_like(rng, means, A)
    s_in = det.score(test)
    shifted = _shifted_cluster(rng, means, A)
    uniform = (torch.rand(300, 16, generator=rng) * 2 - 1) * 8
    assert _auroc(s_in, det.score(shifted)) > 0.95
    assert _auroc(s_in, det.score(uniform)) > 0.95
    acc = (det.predict(test) == ty).float().mean()
    assert acc > 0.97



def test_input_preprocessing_lowers_distance(MahalanobisOOD, rng):
    d_in, d = 12, 8
    lin = torch.nn.Linear(d_in, d, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d_in, generator=rng) / math.sqrt(d_in))
        lin.bias.copy_(torch.randn(d, generator=rng))
    K = 3
    centers = 3 * torch.randn(K, d_in, generator=rng)
    y = torch.arange(K).repeat_interleave(100)
    inputs = centers[y] + torch.randn(len(y), d_in, generator=rng)
    with torch.no_grad():
        det = MahalanobisOOD().fit(lin(inputs), y)
    x = centers[torch.arange(K).repeat(20)] + torch.randn(60, d_in, generator=rng)
    with torch.no_grad():
        s0 = det.score(lin(x))
    eps = 1e-3
    s1 = det.score_inputs(x, lin, epsilon=eps)
    assert s1.shape == (60,) and s1.dtype == torch.float32
    assert bool((s1 < s0).all()), (s0 - s1).min()
    assert lin.weight.grad is None  # the model's parameters are left alone
    # the step is x − ε·sign(∇ₓ d²_k̂), with ∇ₓ d²_k = 2 Wᵀ Σ⁻¹ (z − μ_k) (analytic, float64)
    W = lin.weight.detach().double()
    z = lin(x).detach().double()
    k = det.predict(z)
    prec = det.factor @ det.factor.T
    grad = 2 * ((z - det.means[k]) @ prec) @ W
    x_manual = x - eps * grad.sign().float()
    clear = grad.abs() > 1e-4 * grad.abs().amax(1, keepdim=True)  # skip components whose sign is float noise
    x_op = det.perturb(x, lin, epsilon=eps)
    torch.testing.assert_close(x_op[clear], x_manual[clear])
    with torch.no_grad():
        torch.testing.assert_close(s1, det.score(lin(x_op)))
    # per-channel std: the signed gradient is divided by it
    std = torch.linspace(0.5, 2.0, d_in)
    x_std = det.perturb(x, lin, epsilon=eps, input_std=std.tolist())
    torch.testing.assert_close(x_std[clear], (x - eps * grad.sign().float() / std)[clear])
    # ε = 0 scores the unperturbed features; a model returning (N, D, H, W) maps is averaged over H×W
    torch.testing.assert_close(det.score_inputs(x, lin, epsilon=0.0), s0)
    maps = lambda t: lin(t)[:, :, None, None].expand(-1, -1, 2, 3)  # noqa: E731
    torch.testing.assert_close(det.score_inputs(x, maps, epsilon=eps), s1, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        xi = x.clone()
    torch.testing.assert_close(det.score_inputs(xi, lin, epsilon=eps), s1)


# ---- class-center ----------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_class_center_metrics_match_torch(ClassCenter, rng, normalize):
    train, y, _, _ = _mixture(rng, K=5, n=60, d=10)
    test = torch.cat([_mixture(rng, K=5, n=20, d=10)[0], 5 * torch.randn(50, 10, generator=rng)])
    feats = F.normalize(train.double(), dim=1) if normalize else train.double()
    T = F.normalize(test.double(), dim=1) if normalize else test.double()
    centers = torch.stack([feats[y == k].mean(0) for k in range(5)])

    det = ClassCenter("euclidean", normalize=normalize).fit(train, y)
    torch.testing.assert_close(det.centers, centers, rtol=1e-12, atol=1e-12)
    dist = torch.cdist(T, centers)
    got = det.score(test)
    assert got.dtype == torch.float32 and got.shape == (150,)
    torch.testing.assert_close(got.double(), dist.min(1).values, rtol=1e-4, atol=1e-5)
    assert torch.equal(det.predict(test), dist.argmin(1))
    sq = ClassCenter("euclidean", normalize=normalize, squared=True).fit(train, y)
    torch.testing.assert_close(sq.score(test.double()).double(), (dist ** 2).min(1).values, rtol=1e-5, atol=1e-6)

    det = ClassCenter("cosine", normalize=normalize).fit(train, y)
    cos = F.cosine_similarity(T[:, None, :], centers[None, :, :], dim=2)
    torch.testing.assert_close(det.score(test).double(), (1 - cos).min(1).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(det.predict(test), cos.argmax(1))

    det = ClassCenter("mahalanobis", normalize=normalize).fit(train, y)
    resid = feats - centers[y]
    prec = torch.linalg.inv(resid.T @ resid / len(resid) + 1e-6 * torch.eye(10, dtype=torch.float64))
    diff = T[:, None, :] - centers[None]
    d2 = torch.einsum("nkd,de,nke->nk", diff, prec, diff)
    torch.testing.assert_close(det.score(test.double()).double(), d2.min(1).values.sqrt(), rtol=1e-5, atol=1e-6)


def test_class_center_separates_ood(ClassCenter, MahalanobisOOD, rng):
    train, y, means, A = _mixture(rng)
    test, ty, _, _ = _mixture_like(rng, means, A)
    shifted = _shifted_cluster(rng, means, A)
    uniform = ((torch.rand(300, 16, generator=rng) * 2 - 1) * 8)
    for metric in ("cosine", "euclidean", "mahalanobis"):
        det = ClassCenter(metric).fit(train, y)
        s_in = det.score(test)
        assert _auroc(s_in, det.score(shifted)) > 0.95, metric
        assert _auroc(s_in, det.score(uniform)) > 0.95, metric
        assert (det.predict(test) == ty).float().mean() > 0.97, metric
    # squared mahalanobis class-center == mahalanobis-ood
    a = ClassCenter("mahalanobis", squared=True).fit(train, y)
    b = MahalanobisOOD().fit(train, y)
    torch.testing.assert_close(a.score(test), b.score(test))


# ---- energy --------------------------------------------------------------------------------------
def test_energy_matches_logsumexp(Energy, rng):
    logits = 3 * torch.randn(64, 10, generator=rng)
    e = Energy()
    assert e.fit() is e and e.fit(None, None) is e  # nothing to fit
    s = e.score(logits)
    assert s.shape == (64,) and s.dtype == torch.float32
    torch.testing.assert_close(s, -torch.logsumexp(logits, 1))
    torch.testing.assert_close(Energy(temperature=2.5).score(logits), -2.5 * torch.logsumexp(logits / 2.5, 1))
    # large logits: no overflow
    big = Energy().score(torch.tensor([[1e4, 0.0], [-1e4, -1e4]]))
    torch.testing.assert_close(big, torch.tensor([-1e4, 1e4 - math.log(2)]))
    # per-sample learned temperature T(x): energy −T(x)·lse(z/T(x)); AbeT −lse(z/T(x))
    t = torch.rand(64, generator=rng) * 0.9 + 0.05
    ref = torch.logsumexp(logits / t[:, None], 1)
    torch.testing.assert_close(e.score(logits, temperature=t), -(t * ref))
    torch.testing.assert_close(e.score(logits, temperature=t[:, None]), -(t * ref))
    abet = Energy(variant="abet")
    torch.testing.assert_close(abet.score(logits, temperature=t), -ref)
    torch.testing.assert_close(abet.score(logits / t[:, None]), -ref)  # logits already divided by T(x)
    torch.testing.assert_close(abet.score(logits.double(), temperature=t.double()), -ref, rtol=1e-6, atol=1e-5)
    # higher = more OOD: confident (peaked) logits score lower than flat ones
    peaked = torch.zeros(100, 10)
    peaked[:, 0] = 10
    flat = torch.zeros(100, 10)
    assert _auroc(e.score(peaked), e.score(flat)) == 1.0
    # fit with logits only records C
    e2 = Energy().fit(logits, torch.zeros(64, dtype=torch.long))
    assert e2.num_classes_ == 10
    torch.testing.assert_close(e2.score(logits), s)
    assert Energy().fit([(logits[:32], None), (logits[32:], None)]).num_classes_ == 10


# ---- persistence -------------------------------------------------------------------------------
def test_save_load_round_trip(MahalanobisOOD, ClassCenter, Energy, rng, tmp_path):
    train, y, _, _ = _mixture(rng)
    test = torch.randn(40, 16, generator=rng)
    dets = [MahalanobisOOD(estimator="ledoit-wolf", ridge=1e-4, num_classes=4).fit(train, y),
            ClassCenter("mahalanobis", normalize=True, squared=True, estimator="oas").fit(train, y),
            ClassCenter("cosine").fit(train, y),
            Energy(temperature=1.5, variant="abet").fit(torch.randn(5, 16))]
    for i, det in enumerate(dets):
        path = tmp_path / f"{det.name}-{i}.safetensors"
        det.save(path)
        back = type(det).load(path)
        assert back.to("cpu") is back
        assert torch.equal(det.score(test), back.score(test)), det
        assert repr(back) == repr(det)
    m = MahalanobisOOD.load(tmp_path / "mahalanobis-ood-0.safetensors")
    assert (m.estimator, m.ridge, m.num_classes, m.n_samples_) == ("ledoit-wolf", 1e-4, 4, 600)
    assert m.shrinkage_ == dets[0].shrinkage_ and m.means.dtype == torch.float64
    assert torch.equal(m.predict(test), dets[0].predict(test))
    e = Energy.load(tmp_path / "energy-3.safetensors")
    assert (e.temperature, e.variant, e.num_classes_) == (1.5, "abet", 16)


def test_load_refuses_other_files(MahalanobisOOD, ClassCenter, Energy, rng, tmp_path):
    train, y, _, _ = _mixture(rng, n=30)
    path = tmp_path / "maha.safetensors"
    MahalanobisOOD().fit(train, y).save(path)
    with pytest.raises(ValueError, match="holds a mahalanobis-ood model, not a class-center model"):
        ClassCenter.load(path)
    with pytest.raises(ValueError, match="holds a mahalanobis-ood model, not a energy model"):
        Energy.load(path)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(3)}, str(other), metadata={"distkern_method": "gaussian-ad"})
    with pytest.raises(ValueError, match="holds a gaussian-ad model, not a mahalanobis-ood model"):
        MahalanobisOOD.load(other)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="holds a non-distkern model"):
        Energy.load(plain)
    newer = tmp_path / "newer.safetensors"
    save_file({}, str(newer), metadata={"distkern_method": "energy", "format_version": "99", "config": "{}"})
    with pytest.raises(ValueError, match="format version 99, newer than this plugin reads"):
        Energy.load(newer)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ClassCenter.load(junk)


# ---- errors --------------------------------------------------------------------------------------
def test_errors(MahalanobisOOD, ClassCenter, Energy, rng):
    x, y, _, _ = _mixture(rng, K=3, n=20, d=5)
    for det in (MahalanobisOOD(), ClassCenter()):
        with pytest.raises(RuntimeError, match="before fit"):
            det.score(x)
        with pytest.raises(RuntimeError, match="before fit"):
            det.predict(x)
        with pytest.raises(RuntimeError, match="nothing to save"):
            det.save("unused.safetensors")
        with pytest.raises(ValueError, match="needs class labels"):
            det.fit(x)
        with pytest.raises(ValueError, match=r"shape \(N, D\)"):
            det.fit(x[0], y)
        with pytest.raises(TypeError, match="floating-point features"):
            det.fit(x.long(), y)
        with pytest.raises(TypeError, match="integer tensor"):
            det.fit(x, y.float())
        with pytest.raises(ValueError, match=r"labels must have shape \(60,\)"):
            det.fit(x, y[:10])
        with pytest.raises(ValueError, match=r"labels must be >= 0; rows \[3\] have \[-1\]"):
            det.fit(x, torch.where(torch.arange(60) == 3, -1, y))
        bad = x.clone()
        bad[7, 2] = float("nan")
        with pytest.raises(ValueError, match=r"inf or NaN \(rows \[7\]"):
            det.fit(bad, y)
        with pytest.raises(ValueError, match=r"batch 1\) contain inf or NaN"):
            det.fit([(x[:30], y[:30]), (bad[:30].flip(0), y[:30])])
        with pytest.raises(ValueError, match="labels must be None"):
            det.fit([(x, y)], y)
        with pytest.raises(ValueError, match=r"classes \[1\] have no samples"):
            det.fit(x, torch.where(y == 1, 2, y))
        with pytest.raises(ValueError, match="got no samples"):
            det.fit([])
        det.fit(x, y)
        with pytest.raises(ValueError, match="D=6 but the detector was fitted with D=5"):
            det.score(torch.randn(3, 6))
        with pytest.raises(ValueError, match=r"shape \(N, D\)"):
            det.score(torch.randn(5))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\); rows"):
        MahalanobisOOD(num_classes=2).fit(x, y)
    with pytest.raises(ValueError, match="estimator must be one of"):
        MahalanobisOOD(estimator="shrunk")
    with pytest.raises(ValueError, match="ridge must be"):
        MahalanobisOOD(ridge=-1.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        ClassCenter("manhattan")
    with pytest.raises(ValueError, match="squared=True applies"):
        ClassCenter("cosine", squared=True)
    from distkern.gaussian import NotPositiveDefiniteError

    wide = torch.randn(6, 10, generator=rng)  # N < D: singular covariance
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite.*estimator='ledoit-wolf'"):
        MahalanobisOOD(ridge=0.0).fit(wide, torch.tensor([0, 0, 0, 1, 1, 1]))
    MahalanobisOOD(estimator="ledoit-wolf", ridge=0.0).fit(wide, torch.tensor([0, 0, 0, 1, 1, 1]))
    det = MahalanobisOOD().fit(x, y)
    with pytest.raises(ValueError, match="epsilon must be"):
        det.score_inputs(x, lambda t: t, epsilon=-1.0)
    with pytest.raises(ValueError, match="no gradient path"):
        det.score_inputs(x, lambda t: t.detach())
    with pytest.raises(ValueError, match="input_std must hold 5 positive values"):
        det.score_inputs(x, lambda t: t, input_std=[1.0, 2.0])
    # energy
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        Energy(temperature=0.0)
    with pytest.raises(ValueError, match="variant must be one of"):
        Energy(variant="odin")
    e = Energy()
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        e.score(torch.randn(10))
    with pytest.raises(ValueError, match=r"temperature must have shape \(4,\) or \(4, 1\)"):
        e.score(torch.randn(4, 3), temperature=torch.ones(5))
    with pytest.raises(ValueError, match=r"finite and > 0; rows \[2\]"):
        e.score(torch.randn(4, 3), temperature=torch.tensor([1.0, 1.0, -0.5, 1.0]))
    e.fit(torch.randn(4, 3))
    with pytest.raises(ValueError, match="D=5 but the detector was fitted with D=3"):
        e.score(torch.randn(4, 5))
