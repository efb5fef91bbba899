"""The in-tree gaussian-ad plugin, found through the registry like a third party's plugin."""
import math

import pytest
import torch

import distkern


@pytest.fixture(scope="module")
def GaussianAD():
    try:
        return distkern.methods.get("gaussian-ad")
    except Exception as e:  # pragma: no cover - means `make install` did not install the plugin
        pytest.fail(f"gaussian-ad plugin not found through the registry: {e}")


def _data(gen, n=600, d=24, shift=0.0):
    A = torch.randn(d, d, generator=gen) / math.sqrt(d)
    return (torch.randn(n, d, generator=gen) @ A.T + 3.0 + shift), A


def test_listed_in_registry():
    infos = {m.name: m for m in distkern.methods.available()}
    assert "gaussian-ad" in infos
    info = infos["gaussian-ad"]
    assert info.kind == "detector" and info.status == "ok"
    assert info.package == "distkern-gaussian-ad"


def test_fit_score_matches_sklearn_mahalanobis(GaussianAD, rng):
    sk = pytest.importorskip("sklearn.covariance")
    train, A = _data(rng)
    test = torch.randn(200, 24, generator=rng) @ A.T + 3.0
    det = GaussianAD().fit(train)
    ref = sk.LedoitWolf().fit(train.double().numpy())
    expected = torch.from_numpy(ref.mahalanobis(test.double().numpy())).sqrt()
    got = det.score(test)
    assert got.shape == (200,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert det.shrinkage_[0] == pytest.approx(ref.shrinkage_, rel=1e-9)


def test_higher_is_more_anomalous(GaussianAD, rng):
    train, A = _data(rng)
    det = GaussianAD().fit(train)
    normal = torch.randn(300, 24, generator=rng) @ A.T + 3.0
    anomal = normal + 2.0 * torch.randn(300, 24, generator=rng)
    s_n, s_a = det.score(normal), det.score(anomal)
    # AUROC by pairwise comparison
    auroc = (s_a[:, None] > s_n[None, :]).float().mean()
    assert auroc > 0.95


def test_save_load_round_trip(GaussianAD, rng, tmp_path):
    train, _ = _data(rng)
    det = GaussianAD(estimator="empirical", ridge=1e-4).fit(train)
    path = tmp_path / "model.safetensors"
    det.save(path)
    det2 = GaussianAD.load(path)
    test = torch.randn(50, 24, generator=rng)
    assert torch.equal(det.score(test), det2.score(test))
    assert det2.estimator == "empirical" and det2.ridge == 1e-4 and det2.n_samples_ == 600
    # a file of another method is refused
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(3)}, str(other), metadata={"distkern_method": "padim"})
    with pytest.raises(ValueError, match="holds a padim model, not a gaussian-ad model"):
        GaussianAD.load(other)


def test_errors(GaussianAD, rng):
    det = GaussianAD()
    with pytest.raises(RuntimeError, match="before fit"):
        det.score(torch.randn(3, 4))
    bad = torch.randn(50, 4, generator=rng)
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"inf or NaN.*7"):
        det.fit(bad)
    with pytest.raises(ValueError, match="must be \\(N, D\\) features or an \\(N, C, H, W\\) map"):
        det.fit(torch.randn(10))
    det.fit(torch.randn(50, 4, generator=rng))
    with pytest.raises(ValueError, match="D=5 but the detector was fitted with D=4"):
        det.score(torch.randn(3, 5))
    with pytest.raises(ValueError, match="estimator must be one of"):
        GaussianAD(estimator="oas-typo")
    from distkern.gaussian import NotPositiveDefiniteError

    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue"):
        GaussianAD(estimator="empirical").fit(torch.randn(5, 10, generator=rng))  # N < D: singular


def _maps(gen, n, shift=0.0):
    """Two feature levels as (N, C, H, W) maps, as a backbone would give them."""
    a = torch.randn(n, 8, 4, 4, generator=gen) + torch.linspace(0, 1, 8)[None, :, None, None] + shift
    b = torch.randn(n, 5, 2, 2, generator=gen) * torch.linspace(0.5, 2, 5)[None, :, None, None] + shift
    return [a, b]


def test_multilevel_sum_matches_per_level_sklearn(GaussianAD, rng):
    sk = pytest.importorskip("sklearn.covariance")
    train, test = _maps(rng, 400), _maps(rng, 50, shift=0.3)
    det = GaussianAD().fit(train)
    expected = 0
    for tr, te in zip(train, test):
        lw = sk.LedoitWolf().fit(tr.mean((2, 3)).double().numpy())
        expected = expected + torch.from_numpy(lw.mahalanobis(te.mean((2, 3)).double().numpy())).sqrt()
    assert torch.allclose(det.score(test).double(), expected, rtol=1e-4)
    assert det.level_scores(test).shape == (50, 2)


def test_streaming_fit_equals_one_shot(GaussianAD, rng):
    train = _maps(rng, 300)
    batches = [[lvl[i:i + 64] for lvl in train] for i in range(0, 300, 64)]
    one = GaussianAD().fit(train)
    streamed = GaussianAD().fit(iter(batches))
    test = _maps(rng, 20)
    assert torch.allclose(one.score(test), streamed.score(test), rtol=1e-5)
    # a DataLoader-style (features, labels) stream
    loader = ((b[0], torch.zeros(len(b[0]))) for b in batches)
    single = GaussianAD().fit(loader)
    assert torch.allclose(single.score(test[0]), GaussianAD().fit(train[0]).score(test[0]), rtol=1e-5)
    # a real DataLoader: its default collate yields lists [features, labels]
    from torch.utils.data import DataLoader, TensorDataset

    dl = DataLoader(TensorDataset(train[0], torch.zeros(300, dtype=torch.long)), batch_size=64)
    assert torch.allclose(GaussianAD().fit(dl).score(test[0]), GaussianAD().fit(train[0]).score(test[0]), rtol=1e-5)


def test_pca_npca_partition_the_distance(GaussianAD, rng):
    train, _ = _data(rng, n=800, d=12)
    test = torch.randn(40, 12, generator=rng) * 2
    full = GaussianAD(estimator="empirical").fit(train).score(test)
    pca = GaussianAD(estimator="empirical", reduction="pca", variance_ratio=0.9).fit(train)
    npca = GaussianAD(estimator="empirical", reduction="npca", variance_ratio=0.9).fit(train)
    assert pca.dims()[0] + npca.dims()[0] == 12 and 0 < pca.dims()[0] < 12
    # squared distances of complementary eigen-subspaces add up to the full one
    assert torch.allclose(pca.score(test) ** 2 + npca.score(test) ** 2, full ** 2, rtol=1e-4)


def test_chi2_threshold_controls_false_positives(GaussianAD, rng):
    D = 10
    train = torch.randn(20000, D, generator=rng)
    det = GaussianAD(estimator="empirical").fit(train)
    normal = torch.randn(20000, D, generator=rng)
    fpr = det.predict(normal, fpr=0.05).float().mean().item()
    assert 0.04 < fpr < 0.06  # one level: the threshold is exact under the model
    scipy_stats = pytest.importorskip("scipy.stats")
    assert float(det.threshold(0.01)[0]) == pytest.approx(math.sqrt(scipy_stats.chi2.isf(0.01, D)), rel=1e-6)
