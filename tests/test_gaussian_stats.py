"""Streaming Gaussian statistics (distkern.gaussian.GaussianStats), OAS, PCA / NPCA, χ² thresholds."""
import json
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import distkern
from distkern.gaussian import (
    GaussianStats,
    NotPositiveDefiniteError,
    chi2_threshold,
    distance_threshold,
    empirical_covariance,
    ledoit_wolf,
    oas,
    pca_whitening,
    whitening_factor,
)

SK = {"empirical": "EmpiricalCovariance", "ledoit-wolf": "LedoitWolf", "oas": "OAS"}


def sample(n, d, gen, offset=0.0):
    """Correlated features with spread scales and a large common offset (to test the centering)."""
    A = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    scale = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    shift = offset + torch.randn(d, generator=gen, dtype=torch.float64)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) @ A) * scale + shift


def random_splits(n, gen, max_batch=40):
    """Random batch boundaries (sizes 1..max_batch), so batches of 1 and uneven merges occur."""
    cuts, i = [], 0
    while i < n:
        i = min(n, i + int(torch.randint(1, max_batch + 1, (1,), generator=gen)))
        cuts.append(i)
    return list(zip([0] + cuts[:-1], cuts))


def assert_close(a, b, rtol):
    """max |a − b| ≤ rtol · max |b| (norm-wise: off-diagonals near 0 make elementwise rtol meaningless)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    err, scale = np.abs(a - b).max(), max(np.abs(b).max(), 1e-300)
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


def sk_fit(estimator, x):
    sk = pytest.importorskip("sklearn.covariance")
    return getattr(sk, SK[estimator])().fit(np.asarray(x))


# ------------------------------------------------------------------ one Gaussian


@pytest.mark.parametrize("n,d", [(600, 12), (25, 40), (50, 1)])
def test_streaming_matches_sklearn_with_large_offset(n, d, rng):
    x = sample(n, d, rng, offset=1e4)
    stats = GaussianStats()
    for a, b in random_splits(n, rng):
        stats.update(x[a:b])
    assert stats.count == n
    assert_close(stats.mean, x.mean(0), 1e-14)
    # the naive Σxxᵀ/n − μμᵀ at offset 1e4 is off by ~1e8·ε·√n / σ² ≳ 1e-7 relative
    _, emp = empirical_covariance(x)
    assert_close(stats.covariance(), emp, 1e-9)
    for est in SK:
        ref = sk_fit(est, x.numpy())
        assert_close(stats.covariance(est), ref.covariance_, 1e-6)
        s = float(stats.shrinkage(est))
        assert s == pytest.approx(getattr(ref, "shrinkage_", 0.0), rel=1e-6, abs=1e-12)
    # the one-shot estimators agree too
    for fn, est in ((ledoit_wolf, "ledoit-wolf"), (oas, "oas")):
        m, c, s = fn(x)
        assert_close(stats.covariance(est), c, 1e-6)
        assert float(stats.shrinkage(est)) == pytest.approx(s, rel=1e-6, abs=1e-12)
    assert_close(stats.covariance("oas", ridge=0.5), stats.covariance("oas") + 0.5 * torch.eye(d, dtype=torch.float64), 1e-15)


def test_overflowing_column_sums_are_named_as_such():
    with pytest.raises(ValueError, match="overflow float64"):
        GaussianStats().update(torch.full((4, 2), 1e308, dtype=torch.float64))


@pytest.mark.parametrize("offset", [1e4, 1e8])
def test_float32_products_of_float64_data_keep_the_offset_out(offset, rng):
    """product_dtype=float32 on float64 data: centred in float64 before the cast, so a large offset costs only
    float32's rounding of the centred values (it used to cast first: an offset of 1e8 gave a zero covariance)."""
    x = sample(2000, 5, rng, offset=offset)
    ref = GaussianStats().update(x).covariance()
    ours = GaussianStats(product_dtype=torch.float32).update(x).covariance()
    assert_close(ours, ref, 1e-5)


@pytest.mark.parametrize("n,d", [(30, 10), (200, 50), (10, 40), (5, 1), (3, 7)])
def test_oas_matches_sklearn(n, d, rng):
    x = sample(n, d, rng, offset=3.0)
    mean, cov, s = oas(x)
    ref = sk_fit("oas", x.numpy())
    assert s == pytest.approx(ref.shrinkage_, rel=1e-9, abs=1e-12)
    assert_close(cov, ref.covariance_, 1e-9)
    assert_close(mean, ref.location_, 1e-12)
    # assume_centered, like sklearn's
    c2 = pytest.importorskip("sklearn.covariance").OAS(assume_centered=True).fit(x.numpy())
    assert_close(oas(x, assume_centered=True)[1], c2.covariance_, 1e-9)


def test_factor_whitens_and_fit_progress(rng, monkeypatch):
    x = sample(300, 8, rng, offset=10.0)
    batches = [x[a:b] for a, b in random_splits(300, rng)]
    used = []

    def fake_tqdm(it, **kw):  # a stand-in for tqdm.auto.tqdm: records that it was used
        used.append(kw)
        return it

    mod = types.ModuleType("tqdm.auto")
    mod.tqdm = fake_tqdm
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", mod)
    stats = GaussianStats().fit(batches)
    assert used and used[0]["total"] == len(batches)
    GaussianStats().fit(iter(batches), progress=False)
    assert len(used) == 1
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # not installed: no bar, no error
    stats2 = GaussianStats().fit([(b, torch.zeros(len(b))) for b in batches])  # (x, target): target ignored
    assert_close(stats2.covariance(), stats.covariance(), 1e-13)
    L = stats.factor("ledoit-wolf", dtype=None)
    cov = stats.covariance("ledoit-wolf")
    assert_close(L @ L.T, torch.linalg.inv(cov), 1e-9)
    d2 = distkern.mahalanobis(x, stats.mean, L)
    ref = ((x - stats.mean) @ torch.linalg.inv(cov) * (x - stats.mean)).sum(1)
    assert_close(d2, ref, 1e-9)
    assert stats.factor().dtype == torch.float32


# ------------------------------------------------------------------ K classes, P positions


def test_classes_match_per_class_fits_and_pooled(rng):
    K, d, n = 4, 6, 500
    x = sample(n, d, rng, offset=1e4)
    labels = torch.randint(0, K - 1, (n,), generator=rng)  # class K-1 never seen
    labels[:3] = torch.tensor([0, 1, 2])
    x = x + 5.0 * labels[:, None].double()  # classes have different means
    stats = GaussianStats(num_classes=K)
    for a, b in random_splits(n, rng):
        stats.update(x[a:b], labels[a:b].to(torch.int32))
    counts = torch.bincount(labels, minlength=K)
    assert torch.equal(stats.count, counts)
    with pytest.raises(ValueError, match=r"class 3 has no samples"):
        stats.mean
    with pytest.raises(ValueError, match=r"class 3 has only \[0\] sample"):
        stats.covariance()
    # a class with 0 samples does not stop the pooled (shared) covariance, Lee et al. 2018
    resid = torch.cat([x[labels == k] - x[labels == k].mean(0) for k in range(K - 1)])
    for est in SK:
        ref = sk_fit(est, resid.numpy())
        assert_close(stats.covariance(est, pooled=True), ref.covariance_, 1e-6)
        assert float(stats.shrinkage(est, pooled=True)) == pytest.approx(getattr(ref, "shrinkage_", 0.0), rel=1e-6, abs=1e-12)
    stats.update(x[:5], torch.full((5,), K - 1))
    x_k, lab = torch.cat([x, x[:5]]), torch.cat([labels, torch.full((5,), K - 1)])
    covs, shr = stats.covariance("ledoit-wolf"), stats.shrinkage("ledoit-wolf")
    assert covs.shape == (K, d, d) and shr.shape == (K,)
    for k in range(K):
        ref = sk_fit("ledoit-wolf", x_k[lab == k].numpy())
        assert_close(stats.mean[k], ref.location_, 1e-13)
        assert_close(covs[k], ref.covariance_, 1e-6)
        assert_close(stats.covariance("oas")[k], sk_fit("oas", x_k[lab == k].numpy()).covariance_, 1e-6)
    assert stats.factor("oas").shape == (K, d, d)


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
def test_pooled_classes_keep_one_scatter(product_dtype, rng):
    """GaussianStats(num_classes=K, pooled=True): counts, means and one within-class scatter; the shared
    empirical / OAS covariance equals the full statistics' and scikit-learn's on the class-centred residuals,
    whatever the splits (classes missing from batches, one never seen, a large offset)."""
    K, d, n = 5, 6, 700
    x = sample(n, d, rng, offset=1e4)
    labels = torch.randint(0, K - 1, (n,), generator=rng)  # class K-1 never seen
    labels[:3] = torch.tensor([0, 1, 2])
    x = x + 5.0 * labels[:, None].double()
    pooled, full = GaussianStats(num_classes=K, pooled=True, product_dtype=product_dtype), GaussianStats(num_classes=K)
    for a, b in random_splits(n, rng):
        pooled.update(x[a:b], labels[a:b])
        full.update(x[a:b], labels[a:b])
    assert pooled.state_dict()["scatter"].shape == (1, d, d)
    assert torch.equal(pooled.count, full.count)
    assert_close(pooled._m.mean[: K - 1], full._m.mean[: K - 1], 1e-13)
    resid = torch.cat([x[labels == k] - x[labels == k].mean(0) for k in range(K - 1)])
    rtol = 1e-6 if product_dtype == torch.float32 else 1e-12
    for est in ("empirical", "oas"):
        assert_close(pooled.covariance(est, pooled=True), full.covariance(est, pooled=True), rtol)
        assert_close(pooled.covariance(est, pooled=True), sk_fit(est, resid.numpy()).covariance_, max(rtol, 1e-6))
    assert_close(pooled.factor("oas", pooled=True, ridge=1e-6), full.factor("oas", pooled=True, ridge=1e-6), 1e-5)
    # merge and the state round trip
    a = GaussianStats(num_classes=K, pooled=True).update(x[:300], labels[:300])
    a.merge(GaussianStats(num_classes=K, pooled=True).update(x[300:], labels[300:]))
    assert_close(a.covariance(pooled=True), full.covariance(pooled=True), 1e-12)
    b = GaussianStats.from_state_dict(a.state_dict())
    assert b.pooled and torch.equal(b.covariance(pooled=True), a.covariance(pooled=True))
    # what it cannot give, named
    with pytest.raises(ValueError, match=r"keep the pooled within-class scatter only .*pass pooled=True"):
        pooled.covariance()
    with pytest.raises(ValueError, match=r"keep the pooled within-class scatter only"):
        pooled.factor("oas")
    with pytest.raises(ValueError, match=r"Ledoit-Wolf needs each class's fourth moments"):
        pooled.factor("ledoit-wolf", pooled=True)
    with pytest.raises(ValueError, match=r"layouts differ: classes x 5 \(pooled\) vs classes x 5"):
        pooled.merge(full)
    with pytest.raises(ValueError, match="give num_classes"):
        GaussianStats(pooled=True)
    with pytest.raises(TypeError, match="pooled must be a bool"):
        GaussianStats(num_classes=3, pooled=1)
    st = a.state_dict()
    st["scatter"] = torch.zeros(K, d, d, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scatter must be a tensor of shape \(1, 6, 6\)"):
        GaussianStats.from_state_dict(st)


def test_classes_merge_a_chunk_of_classes_at_a_time(rng, monkeypatch):
    """The present classes' scatters are formed, gathered, merged and written back ~64 MiB at a time (all at
    once they doubled the accumulators' size transiently): chunks of 3 classes give the one-chunk result."""
    import distkern.gaussian.stats as S

    K, d, n = 11, 5, 400
    x = sample(n, d, rng, offset=1e3)
    y = torch.randint(0, K, (n,), generator=rng)
    splits = random_splits(n, rng, max_batch=80)
    one = GaussianStats(num_classes=K)
    for a, b in splits:
        one.update(x[a:b], y[a:b])
    monkeypatch.setattr(S, "_FACTOR_CHUNK_BYTES", 3 * d * d * 8)
    chunked = GaussianStats(num_classes=K)
    for a, b in splits:
        chunked.update(x[a:b], y[a:b])
    a, b = chunked.state_dict(), one.state_dict()
    for k in ("count", "mean", "scatter", "quartic"):
        assert_close(a[k], b[k], 1e-13)
    scale = b["quartic"] ** 0.75 * b["count"] ** 0.25  # Σ‖z‖²z: a signed sum far below its terms
    assert ((a["cubic"] - b["cubic"]).abs().amax(1) <= 1e-12 * scale).all()


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
def test_classes_both_ways_of_forming_the_moments(product_dtype, rng, monkeypatch):
    """A batch's per-class moments by one centred_moments call a class (many rows a class) and by the float64
    rows centred at once (few): the same statistics as the per-class float64 reference, over uneven batches
    with absent classes and a one-row class, with large offsets, in chunks of classes too."""
    import distkern.gaussian.stats as stats_mod

    K, d, n = 6, 7, 300
    x = sample(n, d, rng, offset=1e3)
    labels = torch.randint(0, K - 1, (n,), generator=rng)  # class K-1 never seen
    labels[17] = 2
    x[:, 0] += 5.0 * labels  # class-dependent means
    splits = random_splits(n, rng, max_batch=90)
    fits = {}
    for rows, chunk in ((0, 1 << 30), (1 << 30, 1 << 30), (0, 2 * d * d * 8)):
        monkeypatch.setattr(stats_mod, "_OP_ROWS_PER_CLASS", rows)
        monkeypatch.setattr(stats_mod, "_FACTOR_CHUNK_BYTES", chunk)
        st = GaussianStats(num_classes=K, product_dtype=product_dtype)
        for a, b in splits:
            st.update(x[a:b], labels[a:b])
        fits[rows, chunk] = st
    tol = 1e-10 if product_dtype == torch.float64 else 2e-6
    for st in fits.values():
        assert st.count.tolist() == [int((labels == k).sum()) for k in range(K)]
        sd = st.state_dict()
        for k in range(K - 1):
            z = x[labels == k] - x[labels == k].mean(0)
            sq = (z * z).sum(1)
            assert_close(sd["mean"][k], x[labels == k].mean(0), 1e-13)
            assert_close(sd["scatter"][k], z.T @ z, tol)
            assert_close(sd["quartic"][k], (sq * sq).sum(), 10 * tol)
            # Σ‖z‖²z is a signed sum far below its terms: on the scale of Σ‖z‖³
            assert (sd["cubic"][k] - (sq[:, None] * z).sum(0)).abs().max() <= 10 * tol * (sq ** 1.5).sum()


def test_statistics_larger_than_memory_are_refused_with_what_to_do(monkeypatch):
    """Zero-filling accumulators larger than the memory left would end in the kernel's OOM killer (the
    allocation itself is overcommitted): refused before, with the way out for each layout."""
    import distkern.gaussian.stats as S

    monkeypatch.setattr(S, "_available_memory", lambda: 10 << 20)  # 10 MiB left
    with pytest.raises(MemoryError, match=r"1000 classes × D = 64 need 33\.8 MB and 10\.5 MB are available; for a "
                                          r"shared covariance .*GaussianStats\(num_classes=1000, pooled=True\) keeps "
                                          r"one within-class scatter \(33 kB\)"):
        GaussianStats(num_classes=1000).update(torch.randn(4, 64), torch.arange(4))
    GaussianStats(num_classes=1000, pooled=True).update(torch.randn(4, 64), torch.arange(4))  # 0.5 MB: fits
    with pytest.raises(MemoryError, match="keep fewer features"):
        GaussianStats(64, num_positions=400, device="cpu")
    monkeypatch.setattr(S, "_available_memory", lambda: None)  # not Linux: no check
    GaussianStats(num_classes=1000).update(torch.randn(4, 64), torch.arange(4))


def test_positions_match_per_position_fits(rng):
    B, P, d = 90, 5, 4
    x = torch.stack([sample(B, d, rng, offset=100.0 * p) for p in range(P)], 1)  # (B, P, D)
    stats = GaussianStats(num_positions=P)
    for a, b in random_splits(B, rng, max_batch=13):
        stats.update(x[a:b])
    assert stats.count == B and stats.mean.shape == (P, d)
    lw, s = stats.covariance("ledoit-wolf"), stats.shrinkage("ledoit-wolf")
    for p in range(P):
        ref = sk_fit("ledoit-wolf", x[:, p].numpy())
        assert_close(lw[p], ref.covariance_, 1e-6)
        assert float(s[p]) == pytest.approx(ref.shrinkage_, rel=1e-6)
        assert_close(stats.covariance()[p], empirical_covariance(x[:, p])[1], 1e-10)
    # a (B, D, H, W) feature map with H·W = P is the same data
    fmap = x.transpose(1, 2).reshape(B, d, 1, P).float()
    s2 = GaussianStats(num_positions=P).update(fmap)
    assert_close(s2.covariance(), GaussianStats(num_positions=P).update(x.float()).covariance(), 1e-15)
    L = stats.factor(ridge=0.01)
    assert L.shape == (P, d, d)


@pytest.mark.parametrize("layout", ["embedding", "contiguous", "positions-outer"])
@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xdtype", [torch.float64, torch.float32, torch.bfloat16])
def test_positions_in_place_update_matches_separate_merges(product_dtype, xdtype, layout, rng):
    """update()'s positions path (the batch transposed once, folded into the accumulators in place, its
    scatter never formed) against the generic merge of separately fitted parts and the per-position
    float64 moments, with large offsets, over uneven batches (sizes 1 upward), for each memory layout of
    x: a (B, D, P) embedding's view, a contiguous (B, P, D), and positions outermost."""
    B, P, d = 70, 6, 5
    x = torch.stack([sample(B, d, rng, offset=1e3 * (p + 1)) for p in range(P)], 1).to(xdtype)  # (B, P, D)
    if layout == "embedding":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "positions-outer":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    splits = random_splits(B, rng, max_batch=17)
    inplace = GaussianStats(num_positions=P, product_dtype=product_dtype)
    merged = GaussianStats(num_positions=P, product_dtype=product_dtype)
    before = None
    for a, b in splits:
        inplace.update(x[a:b])
        merged.merge(GaussianStats(num_positions=P, product_dtype=product_dtype).update(x[a:b]))
        if before is None and b >= 2:
            before, seen = inplace.covariance(), b
    assert inplace.count == merged.count == B
    # covariance() returned a tensor of its own: later in-place updates leave it alone
    again = GaussianStats(num_positions=P, product_dtype=product_dtype)
    for a, b in splits:
        if b <= seen:
            again.update(x[a:b])
    assert torch.equal(before, again.covariance())
    tol = 1e-12 if product_dtype == torch.float64 else 2e-6
    for est in ("empirical", "ledoit-wolf", "oas"):
        assert_close(inplace.covariance(est), merged.covariance(est), tol)
    assert_close(inplace.shrinkage("ledoit-wolf"), merged.shrinkage("ledoit-wolf"), tol)
    x64 = x.double()
    for p in range(P):
        xp = x64[:, p]
        assert_close(inplace.mean[p], xp.mean(0), 1e-14)
        assert_close(inplace.covariance()[p], empirical_covariance(xp)[1], 1e-10 if product_dtype == torch.float64 else 2e-6)


def test_merge_is_order_independent(rng):
    K, d, n = 3, 5, 400
    x, labels = sample(n, d, rng, offset=1e4), torch.randint(0, K, (n,), generator=rng)
    parts = [GaussianStats(num_classes=K).update(x[a:b], labels[a:b]) for a, b in random_splits(n, rng, 60)]
    whole = GaussianStats(num_classes=K).update(x, labels)
    left = GaussianStats(num_classes=K)
    for p in parts:
        left.merge(p)
    right = GaussianStats(num_classes=K)
    for p in reversed(parts):
        right.merge(p)
    tree = parts  # pairwise tree
    while len(tree) > 1:
        tree = [GaussianStats(num_classes=K).merge(tree[i]).merge(tree[i + 1]) if i + 1 < len(tree) else tree[i]
                for i in range(0, len(tree), 2)]
    for other in (left, right, tree[0]):
        assert torch.equal(other.count, whole.count)
        assert_close(other.mean, whole.mean, 1e-13)
        for est in SK:
            assert_close(other.covariance(est), whole.covariance(est), 1e-10)
            assert_close(other.shrinkage(est), whole.shrinkage(est), 1e-8)
    assert_close(whole.merge(GaussianStats(num_classes=K)).covariance(), left.covariance(), 1e-10)  # empty: no-op


def test_state_dict_round_trip(rng, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    x, labels = sample(120, 6, rng, offset=50.0), torch.randint(0, 3, (120,), generator=rng)
    stats = GaussianStats(num_classes=3).update(x[:70], labels[:70])
    state = stats.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    json.dumps(meta)  # plain values only
    assert set(tensors) == {"count", "mean", "scatter", "cubic", "quartic"}
    safetensors.save_file(tensors, tmp_path / "s.safetensors", metadata={k: json.dumps(v) for k, v in meta.items()})
    with safetensors.safe_open(tmp_path / "s.safetensors", "pt") as f:
        loaded = {k: json.loads(v) for k, v in f.metadata().items()} | {k: f.get_tensor(k) for k in f.keys()}
    back = GaussianStats.from_state_dict(loaded)
    assert back.mode == "classes" and back.num_features == 6
    for k, v in tensors.items():
        assert torch.equal(back.state_dict()[k], v)
    back.update(x[70:], labels[70:])
    full = GaussianStats(num_classes=3).update(x, labels)
    assert_close(back.covariance("ledoit-wolf"), full.covariance("ledoit-wolf"), 1e-10)
    empty = GaussianStats.from_state_dict(GaussianStats(num_positions=4).state_dict())
    assert empty.mode == "positions" and empty.num_groups == 4 and empty.count == 0
    with pytest.raises(ValueError, match="not a distkern.GaussianStats"):
        GaussianStats.from_state_dict({"mode": "single"})
    with pytest.raises(ValueError, match=r"scatter must be a tensor of shape \(3, 6, 6\)"):
        GaussianStats.from_state_dict(state | {"scatter": torch.zeros(3, 5, 5)})


@pytest.mark.parametrize("mode", ["single", "classes", "positions", "positions-f32"])
def test_without_fourth_moments(mode, rng):
    """fourth_moments=False: the same counts, means and scatters (to the bit) and the same empirical / OAS /
    ridge estimates as with them, over uneven batches; Ledoit-Wolf refused by name; the flag kept by
    state_dict, by merge (with and without give without) and by repr."""
    K, P, d, n = 3, 4, 5, 90
    splits = random_splits(n, rng, max_batch=23)
    if mode == "classes":
        x, y = sample(n, d, rng, offset=1e3), torch.randint(0, K, (n,), generator=rng)
        make = lambda fm: GaussianStats(num_classes=K, fourth_moments=fm)
        batches = [(x[a:b], y[a:b]) for a, b in splits]
    elif mode.startswith("positions"):
        x = torch.stack([sample(n, d, rng, offset=1e2 * (p + 1)) for p in range(P)], 1)  # (n, P, d)
        pd = torch.float32 if mode == "positions-f32" else torch.float64
        make = lambda fm: GaussianStats(num_positions=P, product_dtype=pd, fourth_moments=fm)
        batches = [(x[a:b], None) for a, b in splits]
    else:
        x = sample(n, d, rng, offset=1e3)
        make = lambda fm: GaussianStats(fourth_moments=fm)
        batches = [(x[a:b], None) for a, b in splits]
    full, lean = make(True), make(False)
    for xb, yb in batches:
        full.update(xb, yb)
        lean.update(xb, yb)
    a, b = full.state_dict(), lean.state_dict()
    assert b["fourth_moments"] is False and a["fourth_moments"] is True
    for k in ("count", "mean", "scatter"):
        assert torch.equal(a[k], b[k]), k
    assert not b["cubic"].any() and not b["quartic"].any()
    for est in ("empirical", "oas"):
        assert torch.equal(full.covariance(est, ridge=0.1), lean.covariance(est, ridge=0.1))
    assert torch.equal(full.factor(ridge=0.01), lean.factor(ridge=0.01))
    for call in (lambda s: s.covariance("ledoit-wolf"), lambda s: s.shrinkage(), lambda s: s.factor("ledoit-wolf"),
                 lambda s: s.factor("ledoit-wolf", release=True)):
        with pytest.raises(ValueError, match=r"Ledoit-Wolf needs the fourth moments.*fourth_moments=False"):
            call(lean)
    assert lean.count == full.count if mode != "classes" else torch.equal(lean.count, full.count)
    assert "fourth_moments=False" in repr(lean) and "fourth_moments" not in repr(full)
    back = GaussianStats.from_state_dict(b | {"fourth_moments": "false"})
    assert back.fourth_moments is False and torch.equal(back.covariance(), lean.covariance())
    assert GaussianStats.from_state_dict({k: v for k, v in a.items() if k != "fourth_moments"}).fourth_moments
    with pytest.raises(ValueError, match="fourth_moments must be a bool"):
        GaussianStats.from_state_dict(b | {"fourth_moments": "maybe"})
    with pytest.raises(TypeError, match="fourth_moments must be a bool"):
        GaussianStats(fourth_moments=1)
    # merging: with + without = without (the moments of one part alone would be wrong for the whole)
    half = len(batches) // 2
    first, second = make(True), make(False)
    for xb, yb in batches[:half]:
        first.update(xb, yb)
    for xb, yb in batches[half:]:
        second.update(xb, yb)
    first.merge(second)
    assert first.fourth_moments is False
    assert_close(first.covariance("oas"), full.covariance("oas"), 1e-10)
    with pytest.raises(ValueError, match="Ledoit-Wolf needs the fourth moments"):
        first.covariance("ledoit-wolf")
    assert make(False).merge(full).fourth_moments is False
    if mode == "single":  # a refused merge (another D) leaves the flag and the moments as they were
        with pytest.raises(ValueError, match="features"):
            full.merge(GaussianStats(fourth_moments=False).update(torch.randn(4, d + 1, dtype=torch.float64)))
        assert full.fourth_moments and torch.equal(full.state_dict()["quartic"], a["quartic"])


def test_errors_are_clear():
    s = GaussianStats()
    with pytest.raises(ValueError, match="no data yet"):
        s.covariance()
    with pytest.raises(ValueError, match=r"shape \(N, D\); got \(2, 3, 4\)"):
        s.update(torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        s.update(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="only accepted with num_classes"):
        s.update(torch.ones(3, 2), torch.zeros(3, dtype=torch.int64))
    s.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 3 features"):
        s.update(torch.randn(4, 5))
    x = torch.randn(6, 3)
    x[2, 1], x[5, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"batch 1 contains inf or NaN in rows \[2, 5\]"):
        s.update(x)
    assert s.count == 4  # the bad batch was not added
    with pytest.raises(ValueError, match="estimator must be one of"):
        s.covariance("shrunk")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        s.covariance(ridge=-1.0)
    with pytest.raises(ValueError, match="ridge must be >= 0; got nan"):
        s.covariance(ridge=float("nan"))
    # a string (`distkern fit ... --set ridge=abc`) or a bool is named, not compared
    with pytest.raises(TypeError, match=r"GaussianStats.factor: ridge must be a number >= 0; got 'abc' \(str\)"):
        s.factor(ridge="abc")
    with pytest.raises(TypeError, match=r"whitening_factor: ridge must be a number >= 0; got True"):
        whitening_factor(torch.eye(3), ridge=True)
    assert torch.equal(whitening_factor(torch.eye(3), ridge=torch.tensor(1.0)), whitening_factor(torch.eye(3), ridge=1))
    one = GaussianStats().update(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"needs at least 2 samples; the Gaussian has only \[1\]"):
        one.covariance()
    c = GaussianStats(num_classes=3)
    with pytest.raises(ValueError, match="labels .* are required"):
        c.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); rows \[1, 3\] have \[3, -1\]"):
        c.update(torch.randn(4, 2), torch.tensor([0, 3, 1, -1]))
    with pytest.raises(TypeError, match="integer tensor"):
        c.update(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        c.update(torch.randn(4, 2), torch.zeros(5, dtype=torch.int64))
    c.update(torch.randn(5, 2), torch.tensor([0, 0, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"class 1 has only \[1\] sample"):
        c.covariance()
    with pytest.raises(ValueError, match="layouts differ"):
        c.merge(GaussianStats())
    p = GaussianStats(num_positions=4)
    with pytest.raises(ValueError, match=r"\(B, P=4, D\)"):
        p.update(torch.randn(2, 3, 5))
    xp = torch.randn(3, 4, 2)
    xp[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0 contains inf or NaN in \(sample, position\) pairs \[\(1, 2\)\]"):
        p.update(xp)
    with pytest.raises(ValueError, match="num_classes or num_positions, not both"):
        GaussianStats(num_classes=2, num_positions=2)


def test_factor_names_the_singular_class(rng):
    d = 6
    stats = GaussianStats(num_classes=3)
    stats.update(torch.randn(40, d, generator=rng, dtype=torch.float64), torch.zeros(40, dtype=torch.int64))
    x1 = torch.randn(4, d, generator=rng, dtype=torch.float64)
    x1[:, 2] = 1.0  # a constant feature: exactly singular
    stats.update(x1, torch.full((4,), 1))
    stats.update(torch.randn(30, d, generator=rng, dtype=torch.float64), torch.full((30,), 2))
    with pytest.raises(NotPositiveDefiniteError, match=r"covariance of class 1 is not positive definite \(smallest eigenvalue") as e:
        stats.factor()
    assert e.value.index == (1,) and abs(e.value.min_eigenvalue) < 1e-12
    assert torch.isfinite(stats.factor(ridge=1e-3)).all()
    assert torch.isfinite(stats.factor("ledoit-wolf")).all()  # shrinkage makes it definite


# ------------------------------------------------------------------ torch.distributed (gloo, 2 processes)

WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from distkern.gaussian import GaussianStats
    rank, port, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = load_file(data)
    x, y = t["x"], t["y"]
    n = x.shape[0]
    lo, hi = (0, 2 * n // 3) if rank == 0 else (2 * n // 3, n)   # uneven shards
    classes = GaussianStats(num_classes=5)
    for a in range(lo, hi, 37):
        classes.update(x[a:min(a + 37, hi)], y[a:min(a + 37, hi)])
    single = GaussianStats()          # rank 1 sees no data and does not know D
    if rank == 0:
        single.update(x)
    pooled = GaussianStats(num_classes=5, pooled=True).update(x[lo:hi], y[lo:hi])
    classes.all_reduce()
    single.all_reduce()
    pooled.all_reduce()
    res = {f"classes.{k}": v for k, v in classes.state_dict().items() if isinstance(v, torch.Tensor)}
    res["pooled.cov"] = pooled.covariance("oas", pooled=True)
    res |= {f"single.{k}": v for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
    res["lw"] = classes.covariance("ledoit-wolf")
    # positions without the fourth moments, and ranks that disagree about keeping them
    pos = GaussianStats(num_positions=3, fourth_moments=False).update(x[lo:hi, :6].reshape(-1, 3, 2))
    pos.all_reduce()
    res["positions.cov"] = pos.covariance("oas")
    mixed = GaussianStats(fourth_moments=rank == 0).update(x[lo:hi])
    try:
        mixed.all_reduce()
        raise SystemExit("all_reduce merged ranks with and without fourth moments")
    except ValueError as e:
        assert "without fourth moments" in str(e), e
    save_file(res, f"{out}.{rank}")
    dist.destroy_process_group()
""")


def test_all_reduce_two_gloo_processes(rng, tmp_path, gloo_run):
    safetensors = pytest.importorskip("safetensors.torch")
    n, d, K = 600, 7, 5
    x = sample(n, d, rng, offset=1e3)
    y = torch.randint(0, K, (n,), generator=rng)
    y[: 2 * n // 3] = y[: 2 * n // 3].clamp_max(K - 2)  # class K-1 only on rank 1
    safetensors.save_file({"x": x, "y": y}, tmp_path / "data.safetensors")
    gloo_run(WORKER, str(tmp_path / "data.safetensors"), str(tmp_path / "out"))
    r0, r1 = (safetensors.load_file(tmp_path / f"out.{r}") for r in range(2))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    ref = GaussianStats(num_classes=K).update(x, y).state_dict()
    for k in ("count", "mean", "scatter", "quartic"):
        assert_close(r0[f"classes.{k}"], ref[k], 1e-12)
    # Σ‖z‖²z is a signed sum far below its terms: compare on the scale of Σ‖z‖³ ≤ (Σ‖z‖⁴)^¾ n^¼
    scale = ref["quartic"] ** 0.75 * ref["count"] ** 0.25
    assert ((r0["classes.cubic"] - ref["cubic"]).abs().amax(1) <= 1e-12 * scale).all()
    assert_close(r0["lw"], GaussianStats.from_state_dict(ref).covariance("ledoit-wolf"), 1e-12)
    full = GaussianStats.from_state_dict(ref)
    assert_close(r0["pooled.cov"], full.covariance("oas", pooled=True), 1e-12)
    ref1 = GaussianStats().update(x).state_dict()
    for k in ("count", "mean", "scatter", "cubic", "quartic"):
        assert torch.equal(r0[f"single.{k}"], ref1[k])  # merging an empty rank is exact
    pos = GaussianStats(num_positions=3).update(x[:, :6].reshape(-1, 3, 2))
    assert_close(r0["positions.cov"], pos.covariance("oas"), 1e-12)


# ------------------------------------------------------------------ PCA / NPCA


def test_pca_npca_partition_the_mahalanobis_distance(rng):
    d = 24
    x = sample(400, d, rng, offset=2.0)
    mean, cov = empirical_covariance(x)
    full = distkern.mahalanobis(x, mean, whitening_factor(cov, dtype=None))
    every = pca_whitening(cov, 1.0, "pca", dtype=None)
    assert every.whitening.shape == (d, d)
    assert_close(distkern.mahalanobis(x, mean, every.whitening, lower=False), full, 1e-9)
    assert_close(distkern.mahalanobis(x, mean, pca_whitening(cov, 0.0, "npca", dtype=None).whitening, lower=False), full, 1e-9)
    for t in (0.5, 0.9, 0.99):
        pca, npca = pca_whitening(cov, t, "pca", dtype=None), pca_whitening(cov, t, "npca", dtype=None)
        r = pca.eigenvalues.numel()
        assert r + npca.eigenvalues.numel() == d
        assert float(pca.explained_variance_ratio[:r].sum()) >= t > float(pca.explained_variance_ratio[: r - 1].sum())
        assert float(pca.eigenvalues.min()) >= float(npca.eigenvalues.max())
        d_pca = distkern.mahalanobis(x, mean, pca.whitening, lower=False)
        d_npca = distkern.mahalanobis(x, mean, npca.whitening, lower=False)
        assert_close(d_pca + d_npca, full, 1e-9)
        assert pca_whitening(cov, t, "npca").whitening.dtype == torch.float32


def test_pca_paper_selection_matches_reference_logic(rng):
    skd = pytest.importorskip("sklearn.decomposition")
    d, t = 16, 0.95
    x = sample(300, d, rng)
    _, cov = empirical_covariance(x)
    ref = skd.PCA(n_components=None).fit(x.numpy())
    k = int((ref.explained_variance_ratio_.cumsum() > t).argmax())  # as in gaussian-ad-mvtec compute_pca
    pca = pca_whitening(cov, t, "pca", paper=True)
    npca = pca_whitening(cov, t, "npca", paper=True)
    for ours, comps in ((pca, ref.components_[: k + 1]), (npca, ref.components_[k - 1:])):
        assert ours.components.shape == (d, comps.shape[0])
        dots = np.abs((ours.components.numpy().T * comps).sum(1))  # same directions up to sign
        np.testing.assert_allclose(dots, 1.0, atol=1e-8)


def test_pca_errors():
    cov = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="keeps no component"):
        pca_whitening(cov, 1.0, "npca")
    with pytest.raises(NotPositiveDefiniteError, match="kept eigenvalue 0"):
        pca_whitening(cov, 0.9, "npca")
    out = pca_whitening(cov, 0.9, "npca", ridge=1e-3)
    assert out.eigenvalues.tolist() == [0.0] and torch.isfinite(out.whitening).all()
    with pytest.raises(ValueError, match="mode must be"):
        pca_whitening(cov, 0.9, "ica")
    with pytest.raises(ValueError, match=r"variance_ratio must lie in \[0, 1\]"):
        pca_whitening(cov, 1.5)


# ------------------------------------------------------------------ χ² thresholds


def test_chi2_threshold_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    dofs = torch.tensor([1, 2, 3, 4, 5, 7, 10, 16, 20, 21, 31, 64, 100, 255, 256, 512, 1000, 1024, 2047, 2048], dtype=torch.float64)
    fprs = torch.tensor([1e-6, 3e-6, 1e-5, 1e-4, 1e-3, 0.0027, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5], dtype=torch.float64)
    K, P = torch.meshgrid(dofs, fprs, indexing="ij")
    t = chi2_threshold(K, P)
    np.testing.assert_allclose(t.numpy(), stats.chi2.isf(P.numpy(), K.numpy()), rtol=1e-9)
    assert isinstance(chi2_threshold(3, 0.05), float)
    assert chi2_threshold(3, 0.05) == pytest.approx(stats.chi2.isf(0.05, 3), rel=1e-12)
    assert chi2_threshold(1536, 1 - 0.9973) == pytest.approx(stats.chi2.ppf(0.9973, 1536), rel=1e-12)  # the paper's form
    assert distance_threshold(10, 0.01) == pytest.approx(stats.chi2.isf(0.01, 10) ** 0.5, rel=1e-12)
    assert chi2_threshold(0.5, 0.999) == pytest.approx(stats.chi2.isf(0.999, 0.5), rel=1e-9)  # tiny t, non-integer dof
    for bad in ((0, 0.1), (3, 0.0), (3, 1.0)):
        with pytest.raises(ValueError):
            chi2_threshold(*bad)


def test_factor_from_the_accumulators_and_in_chunks(rng, monkeypatch):
    """factor() without a materialised covariance: positions (one count) read the scatter directly — the same
    bits as factorising covariance() — and ddof=1 matches torch.cov; classes with different counts and the
    shrinkage estimates go a few groups at a time (forced here to chunks of 2), each chunk's factors those of
    its own groups, and a failure names the group in a later chunk by its index in the whole batch."""
    import distkern.gaussian.stats as stats_mod
    from distkern.gaussian import whitening_factor

    B, P, d = 40, 7, 5
    x = torch.randn(B, P, d, generator=rng, dtype=torch.float64) * 3.0 + 10.0
    stats = GaussianStats(num_positions=P).update(x)
    for ddof, ridge in [(0, 0.0), (0, 0.01), (1, 0.01)]:
        L = stats.factor(ridge=ridge, ddof=ddof, dtype=None)
        Lm = whitening_factor(stats.covariance(ddof=ddof), ridge=ridge, dtype=None, assume_symmetric=True)
        if ddof == 0:
            assert torch.equal(L, Lm)
        else:  # one rounding of the scale against two
            assert torch.allclose(L, Lm, rtol=1e-12, atol=0)
    ref = torch.stack([torch.cov(x[:, p].T) for p in range(P)])  # ddof=1
    assert torch.allclose(stats.covariance(ddof=1), ref, rtol=1e-12, atol=1e-12)
    L = stats.factor(ddof=1, ridge=0.01, dtype=None)
    eye = torch.eye(d, dtype=torch.float64).expand(P, d, d)
    assert torch.allclose(L @ (L.transpose(1, 2) @ (ref + 0.01 * eye)), eye, rtol=0, atol=1e-10)

    monkeypatch.setattr(stats_mod, "_FACTOR_CHUNK_BYTES", 2 * d * d * 8)  # two classes a chunk
    K = 5
    labels = torch.arange(60) % K
    labels[:7] = 0  # unequal counts: the chunked path
    xc = torch.randn(60, d, generator=rng, dtype=torch.float64) + labels[:, None]
    cs = GaussianStats(num_classes=K).update(xc, labels)
    for est in ("empirical", "ledoit-wolf", "oas"):
        for ddof in (0, 1):
            L = cs.factor(est, ridge=0.001, ddof=ddof, dtype=None)
            Lm = whitening_factor(cs.covariance(est, ddof=ddof), ridge=0.001, dtype=None, assume_symmetric=True)
            assert torch.equal(L, Lm), (est, ddof)
    xs = xc.clone()
    xs[labels == 3, 1] = 2.0  # class 3 (chunk 2) singular
    with pytest.raises(NotPositiveDefiniteError, match=r"covariance of class 3 is not positive definite") as e:
        GaussianStats(num_classes=K).update(xs, labels).factor()
    assert e.value.index == (3,)
    ps = x.clone()
    ps[:, 5, 2] = 7.0  # position 5 singular (a constant feature), on the direct path
    with pytest.raises(NotPositiveDefiniteError, match=r"covariance of position 5 is not positive definite") as e:
        GaussianStats(num_positions=P).update(ps).factor(ddof=1)
    assert e.value.index == (5,)
    with pytest.raises(ValueError, match="ddof must be an int >= 0"):
        stats.factor(ddof=-1)
    with pytest.raises(ValueError, match="ddof must be an int >= 0"):
        stats.covariance(ddof=True)
    with pytest.raises(ValueError, match=r"at least 3 samples with ddof=2; position"):
        GaussianStats(num_positions=2).update(x[:2, :2]).covariance(ddof=2)


def test_factor_release(rng):
    """factor(release=True): the same factors as without, and the statistics emptied afterwards — on the
    direct path (positions) and the chunked one (shrinkage), after success and after a failure (whose error
    still names the position and its eigenvalue); a later update starts afresh; release must be a bool."""
    B, P, d = 64, 5, 24
    x = torch.randn(B, P, d, generator=rng) * 2.0 + 1.0
    want = GaussianStats(num_positions=P).update(x).factor(ddof=1, ridge=0.01)
    stats = GaussianStats(num_positions=P).update(x)
    assert torch.equal(stats.factor(ddof=1, ridge=0.01, release=True), want)
    for who in (lambda s: s.mean, lambda s: s.covariance(), lambda s: s.factor()):
        with pytest.raises(ValueError, match=r"released by factor\(release=True\)"):
            who(stats)
    assert stats.count == 0
    stats.update(x[:10]).update(x[10:])  # fit again
    assert torch.equal(stats.factor(ddof=1, ridge=0.01), want)
    lw = GaussianStats(num_positions=P).update(x)
    want_lw = lw.factor("ledoit-wolf")
    assert torch.equal(lw.factor("ledoit-wolf", release=True), want_lw)
    with pytest.raises(ValueError, match="released"):
        lw.mean
    bad = x.clone()
    bad[:, 3, 7] = 2.0  # position 3 singular
    s = GaussianStats(num_positions=P).update(bad)
    with pytest.raises(NotPositiveDefiniteError, match=r"position 3 is not positive definite \(smallest eigenvalue") as e:
        s.factor(release=True)
    assert e.value.index == (3,) and abs(e.value.min_eigenvalue) < 1e-6
    with pytest.raises(ValueError, match="released"):
        s.mean
    with pytest.raises(TypeError, match="release must be a bool"):
        GaussianStats(num_positions=P).update(x).factor(release=1)
    kept = GaussianStats(num_positions=P).update(x)  # a bad argument releases nothing
    for bad_args in ({"estimator": "nope"}, {"ridge": -1.0}, {"ddof": -1}, {"dtype": torch.int32}):
        with pytest.raises((TypeError, ValueError)):
            kept.factor(release=True, **bad_args)
    assert torch.equal(kept.factor(ddof=1, ridge=0.01, release=True), want)


def test_positions_batch_buffer_kept_between_updates(rng):
    """The float64 positions path keeps its (P, D, B + 1) batch buffer from one update to the next (a smaller
    batch takes its first elements, a larger one a new buffer), and drops it when the statistics are read:
    the statistics are the same bits as with a fresh buffer every update, for both layouts of x."""
    P, d = 6, 5
    for embed in (False, True):
        xs = [torch.randn(n, d, P, generator=rng).transpose(1, 2) if embed else torch.randn(n, P, d, generator=rng)
              for n in (9, 4, 9, 12)]
        kept, fresh = GaussianStats(num_positions=P), GaussianStats(num_positions=P)
        ptrs = []
        for x in xs:
            kept.update(x)
            ptrs.append(kept._scratch.data_ptr())
            fresh.update(x)
            fresh.mean  # a read drops the buffer
            assert fresh._scratch is None
        assert ptrs[0] == ptrs[1] == ptrs[2] != ptrs[3]
        a, b = kept.state_dict(), fresh.state_dict()
        assert kept._scratch is None
        for k in ("count", "mean", "scatter", "cubic", "quartic"):
            assert torch.equal(a[k], b[k]), k


def test_whitening_factor_scale(rng):
    """whitening_factor(S, scale=c) factorises c·S (+ ridge): a scatter matrix with scale 1/n gives its
    covariance's factor; the op refuses scale <= 0 or non-finite, the wrapper non-numbers too."""
    from distkern.gaussian import whitening_factor

    d, n = 6, 50
    z = torch.randn(n, d, generator=rng, dtype=torch.float64)
    S = z.T @ z
    S = 0.5 * (S + S.T)
    L = whitening_factor(S, scale=1 / n, ridge=0.1, dtype=None)
    C = S / n + 0.1 * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(L @ (L.T @ C), torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(NotPositiveDefiniteError, match=r"smallest eigenvalue -0\.5"):  # scale·m + ridge is reported
        whitening_factor(-torch.eye(d, dtype=torch.float64), scale=0.5, dtype=None)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            whitening_factor(S, scale=bad)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        torch.ops.distkern.whitening_factors(S[None], 0.0, True, None, 0.0)
    torch.library.opcheck(torch.ops.distkern.whitening_factors.default, (S[None].repeat(2, 1, 1), 0.1, True, torch.float32, 0.25))
