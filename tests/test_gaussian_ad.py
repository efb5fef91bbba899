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
    assert det.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-9)


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
    det = GaussianAD(shrinkage="none", ridge=1e-4).fit(train)
    path = tmp_path / "model.safetensors"
    det.save(path)
    det2 = GaussianAD.load(path)
    test = torch.randn(50, 24, generator=rng)
    assert torch.equal(det.score(test), det2.score(test))
    assert det2.shrinkage == "none" and det2.ridge == 1e-4 and det2.n_samples_ == 600
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
    with pytest.raises(ValueError, match=r"inf or NaN \(rows \[7\]"):
        det.fit(bad)
    with pytest.raises(ValueError, match="shape \\(N, D\\)"):
        det.fit(torch.randn(10))
    det.fit(torch.randn(50, 4, generator=rng))
    with pytest.raises(ValueError, match="D=5 but the detector was fitted with D=4"):
        det.score(torch.randn(3, 5))
    with pytest.raises(ValueError, match="shrinkage must be"):
        GaussianAD(shrinkage="oas-typo")
    from distkern.gaussian import NotPositiveDefiniteError

    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue"):
        GaussianAD(shrinkage="none").fit(torch.randn(5, 10, generator=rng))  # N < D: singular
