"""Whitening factor and covariance estimators (distkern.gaussian)."""
import numpy as np
import pytest
import torch

from distkern.gaussian import NotPositiveDefiniteError, empirical_covariance, ledoit_wolf, whitening_factor


def test_whitening_factor_inverts_covariance(rng):
    D = 50
    A = torch.randn(D, D, generator=rng, dtype=torch.float64)
    cov = A @ A.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    L = whitening_factor(cov, dtype=None)
    assert L.dtype == torch.float64
    assert torch.equal(L, L.tril())
    assert torch.allclose(L @ L.T, torch.linalg.inv(cov), rtol=1e-8, atol=1e-8)
    Lb = whitening_factor(torch.stack([cov, 2 * cov]))
    assert Lb.shape == (2, D, D) and Lb.dtype == torch.float32
    assert torch.allclose((Lb[1] @ Lb[1].T).double(), torch.linalg.inv(2 * cov), rtol=1e-4, atol=1e-5)


def test_whitening_factor_not_positive_definite_names_eigenvalue():
    cov = torch.diag(torch.tensor([1.0, 0.5, -0.25]))
    with pytest.raises(NotPositiveDefiniteError, match=r"smallest eigenvalue -0\.25") as e:
        whitening_factor(cov)
    assert e.value.min_eigenvalue == pytest.approx(-0.25)
    batch = torch.stack([torch.eye(3), torch.eye(3), torch.diag(torch.tensor([1.0, 0.0, 1.0]))])
    with pytest.raises(NotPositiveDefiniteError, match=r"batch index \(2,\)"):
        whitening_factor(batch)
    L = whitening_factor(batch, ridge=1e-3)  # diagonal loading makes it definite
    assert torch.isfinite(L).all()
    with pytest.raises(ValueError, match="non-finite"):
        whitening_factor(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        whitening_factor(torch.ones(3, 2))


def test_whitening_factor_symmetrises_and_assume_symmetric(rng):
    """A covariance off symmetry by rounding is factorised as ½(Σ + Σᵀ); assume_symmetric skips that pass
    and gives the same bits on a symmetric one (GaussianStats.covariance's, in every estimator); the
    non-finite check still names a NaN whose sum with a finite overflow would hide nothing."""
    from distkern.gaussian import GaussianStats

    D = 30
    A = torch.randn(4, D, D, generator=rng, dtype=torch.float64)
    S = A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    sym = 0.5 * (S + S.transpose(1, 2))  # symmetric to the bit (a batched A·Aᵀ need not be)
    skew = sym.clone()
    skew[:, 3, 7] += 1e-9  # Σ₃₇ ≠ Σ₇₃
    avg = 0.5 * (skew + skew.transpose(1, 2))
    assert torch.equal(whitening_factor(skew, dtype=None), whitening_factor(avg, dtype=None, assume_symmetric=True))
    assert torch.equal(whitening_factor(sym, dtype=None), whitening_factor(sym, dtype=None, assume_symmetric=True))
    stats = GaussianStats(num_positions=3).update(torch.randn(40, 3, 8, generator=rng) * 3 + 100)
    for est in ("empirical", "ledoit-wolf", "oas"):
        cov = stats.covariance(est, ridge=0.01)
        assert torch.equal(cov, cov.transpose(-1, -2))
        assert torch.equal(stats.factor(est, ridge=0.01, dtype=None), whitening_factor(cov, dtype=None))
    big = torch.diag(torch.tensor([1e308, 1e308], dtype=torch.float64))  # finite entries whose sum overflows
    L = whitening_factor(big, dtype=None, assume_symmetric=True)
    assert torch.allclose(L, torch.eye(2, dtype=torch.float64) * 1e-154, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="non-finite"):
        whitening_factor(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]), assume_symmetric=True)


@pytest.mark.parametrize("n,d", [(30, 10), (200, 50), (10, 40), (5, 1)])
def test_ledoit_wolf_matches_sklearn(n, d, rng):
    sk = pytest.importorskip("sklearn.covariance")
    x = torch.randn(n, d, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64) + 2
    mean, cov, s = ledoit_wolf(x)
    ref = sk.LedoitWolf().fit(x.numpy())
    assert s == pytest.approx(ref.shrinkage_, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mean.numpy(), ref.location_, rtol=1e-12)
    m2, emp = empirical_covariance(x)
    np.testing.assert_allclose(emp.numpy(), sk.EmpiricalCovariance().fit(x.numpy()).covariance_, rtol=1e-10, atol=1e-12)


def test_estimators_refuse_bad_data():
    with pytest.raises(ValueError, match="inf or NaN"):
        ledoit_wolf(torch.tensor([[1.0, 2.0], [float("inf"), 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ledoit_wolf(torch.ones(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        ledoit_wolf(torch.ones(3))
