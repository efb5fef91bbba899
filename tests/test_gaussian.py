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


# G = 1, one matrix at a time: 1, 2, 7: the op's own Cholesky and inverse (rows / columns in fours and the rest);
# from 9: LAPACK's Cholesky and the recursive inverse (9: one leaf; 100, 150: two levels; 257: three, leaves of 64
# and 65 → 32 + 33). G = 5: the vector lanes where the CPU has AVX2 (groups of 4 or 8, the last one padded).
@pytest.mark.parametrize("D", [1, 2, 7, 9, 100, 150, 257])
@pytest.mark.parametrize("symmetrize", [True, False])
@pytest.mark.parametrize("G", [1, 5])
def test_whitening_factors_op(D, symmetrize, G, rng):
    """distkern.whitening_factors against float64 linear algebra: L lower-triangular, L Lᵀ = (½(Σ+Σᵀ) + ridge·I)⁻¹,
    in the asked dtype; info names the first non-definite minor of each matrix (and its L is NaN on the CPU
    path, never stale memory); batches of 0, opcheck."""
    A = torch.randn(G, D, D + 2, generator=rng, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / (D + 2) + 0.05 * torch.eye(D, dtype=torch.float64)
    if not symmetrize:
        cov = 0.5 * (cov + cov.transpose(1, 2))
    ridge = 0.01
    L, info = torch.ops.distkern.whitening_factors(cov, ridge, symmetrize, None)
    assert L.dtype == torch.float64 and info.dtype == torch.int32 and not info.any()
    assert torch.equal(L, L.tril())
    # L Lᵀ S = I with S the loaded symmetric part (checked by products: torch's CPU build can fail an LU
    # inverse at this size once the thread count has been changed in the process — an MKL DLASWP error)
    S = 0.5 * (cov + cov.transpose(1, 2)) + ridge * torch.eye(D, dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64).expand(G, D, D)
    assert torch.allclose(L @ (L.transpose(1, 2) @ S), eye, rtol=0, atol=1e-9)
    # a transposed view (strides swapped) of the symmetric matrices: the same bits
    assert torch.equal(torch.ops.distkern.whitening_factors(cov.transpose(1, 2), ridge, symmetrize, None)[0], L)
    L32, _ = torch.ops.distkern.whitening_factors(cov, ridge, symmetrize, torch.float32)
    assert L32.dtype == torch.float32 and torch.allclose(L32.double(), L, rtol=1e-6, atol=1e-6 * float(L.abs().max()))
    if D > 1 and G == 5:  # matrix 3 loses definiteness at its leading minor of order 2 (in the reversed order)
        bad = cov.clone()
        bad[3, D - 2, D - 2] = bad[3, D - 1, D - 1] = 1.0
        bad[3, D - 2, D - 1] = bad[3, D - 1, D - 2] = 2.0
        bad[3, D - 1, :D - 2] = bad[3, :D - 2, D - 1] = 0.0
        bad[3, D - 2, :D - 2] = bad[3, :D - 2, D - 2] = 0.0
        Lb, ib = torch.ops.distkern.whitening_factors(bad, 0.0, symmetrize, None)
        assert ib.tolist() == [0, 0, 0, 2, 0]
        good = torch.ops.distkern.whitening_factors(bad[[0, 1, 2, 4]], 0.0, symmetrize, None)[0]
        # one matrix at a time on either path: the others' bits do not depend on the failure
        assert torch.equal(Lb[[0, 1, 2, 4]], good) and Lb[3].isnan().all()
    e, ie = torch.ops.distkern.whitening_factors(cov[:0], ridge, symmetrize, None)
    assert e.shape == (0, D, D) and ie.shape == (0,)
    torch.library.opcheck(torch.ops.distkern.whitening_factors.default, (cov[:2], ridge, symmetrize, torch.float32))
    with pytest.raises(ValueError, match="square"):
        torch.ops.distkern.whitening_factors(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="ridge"):
        torch.ops.distkern.whitening_factors(cov, -1.0)


LANES_CODE = """
import sys, torch, distkern
g = torch.Generator().manual_seed(11)
res = {"isa": distkern._C.cpu_math_isa()}
for D in (1, 6, 33, 100):
    A = torch.randn(19, D, D + 3, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / (D + 3) + 0.05 * torch.eye(D, dtype=torch.float64)
    cov[2, D // 2, D // 2] = -7.0           # not positive definite
    cov[9, 0, D - 1] = float("nan")          # NaN off the diagonal (read by the symmetrisation)
    cov[17, D - 1, D - 1] = -1.0            # the first pivot of the reversed matrix
    for G in (4, 5, 8, 19):
        for dt in (torch.float64, torch.float32, torch.bfloat16):
            res[D, G, dt] = torch.ops.distkern.whitening_factors(cov[:G], 0.01, True, dt, 0.5)
    res[D, "t"] = torch.ops.distkern.whitening_factors(cov.transpose(1, 2)[:11], 0.0, False, None, 1.0)
    res[D, "cov"] = cov
torch.save(res, sys.argv[1])
"""


def test_whitening_factors_lanes(with_and_without_avx512):
    """The CPU factors of W matrices at a time on vector lanes (AVX-512: 8, AVX2: 4, the last group padded with
    identities) and one at a time (DISTKERN_CPU_GEMM=0, LAPACK): one info everywhere (the first non-definite
    minor, a NaN one included, the other matrices of the group unaffected), NaN factors where it is not 0,
    float64 accuracy and every output dtype; a matrix gets the same bits in any batch at D ≤ 48 (batches of 4 to
    19: whole groups and the narrower ones of the rest), in any batch where it falls in a whole group above, and
    in both instruction sets."""
    runs = with_and_without_avx512(LANES_CODE)
    assert runs[2]["isa"] == "none"
    for D in (1, 6, 33, 100):
        cov = runs[0][D, "cov"]
        S = 0.5 * (0.5 * (cov + cov.transpose(1, 2))) + 0.01 * torch.eye(D, dtype=torch.float64)
        ref_info = [0] * 19
        ref_info[2] = D - D // 2 if D > 1 else 1
        ref_info[17] = 1
        for res in runs:
            for G in (4, 5, 8, 19):
                L, info = res[D, G, torch.float64]
                want = ref_info[:G]
                if G > 9:  # NaN off the diagonal (on it at D = 1): fails where the NaN first reaches a pivot
                    want[9] = info.tolist()[9] if D > 1 else 1
                    assert want[9] > 0
                assert info.tolist() == want, (res["isa"], D, G)
                ok = info == 0
                assert L[~ok].isnan().all()
                eye = torch.eye(D, dtype=torch.float64).expand(int(ok.sum()), D, D)
                assert torch.allclose(L[ok] @ (L[ok].transpose(1, 2) @ S[:G][ok]), eye, rtol=0, atol=1e-9)
                for dt in (torch.float32, torch.bfloat16):
                    Ld, id_ = res[D, G, dt]
                    assert torch.equal(id_, info) and torch.equal(Ld[ok], L[ok].to(dt))
            Lt, it = res[D, "t"]
            assert torch.equal(it, torch.tensor(ref_info[:11], dtype=torch.int32)) or D == 1
        lanes = [r for r in runs if r["isa"] != "none"]
        for res in lanes:  # the same bits in every group
            big = res[D, 19, torch.float64][0]
            for G in ((4, 5, 8) if D <= 48 else (8,)):
                assert torch.equal(res[D, G, torch.float64][0].nan_to_num(7.0), big[:G].nan_to_num(7.0)), (res["isa"], D, G)
        if len(lanes) == 2:  # AVX-512 and AVX2: the same bits
            assert torch.equal(lanes[0][D, 19, torch.float64][0].nan_to_num(7.0), lanes[1][D, 19, torch.float64][0].nan_to_num(7.0))


def test_whitening_factors_release(rng):
    """whitening_factors_release_: the same bits as whitening_factors; cov is consumed — on Linux the pages
    inside each matrix that factorised read as zeros afterwards (handed back to the OS), while a matrix that
    failed keeps its contents for the caller's report; non-contiguous or float32 input (a copy is made)
    leaves the caller's tensor as it was. whitening_factor(release=True) and opcheck of the mutating op."""
    import sys

    from distkern.gaussian import whitening_factor

    G, D = 9, 100  # 80 KB a matrix: whole pages inside each; 8 on AVX-512 lanes (4 + 4 on AVX2), 1 by LAPACK
    A = torch.randn(G, D, D + 4, generator=rng, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / (D + 4)
    cov[4, 10, 10] = -5.0
    ok = [g for g in range(G) if g != 4]
    want, winfo = torch.ops.distkern.whitening_factors(cov, 0.0, True, torch.float32)
    c = cov.clone()
    L, info = torch.ops.distkern.whitening_factors_release_(c, 0.0, True, torch.float32)
    assert torch.equal(info, winfo) and info.tolist()[4] > 0 and not info[ok].any()
    assert torch.equal(L[ok], want[ok]) and L[4].isnan().all()
    assert torch.equal(c[4], cov[4])  # the failure is kept
    if sys.platform.startswith("linux"):
        assert not c[ok, 40:60].any()  # rows 40..59 lie on pages wholly inside each matrix
    t = cov.transpose(1, 2)  # not contiguous: nothing released, same factors
    assert torch.equal(torch.ops.distkern.whitening_factors_release_(t, 0.0, True, torch.float32)[0][:4], want[:4])
    assert torch.equal(t, cov.transpose(1, 2))
    c32 = cov[:4].float()
    L32 = torch.ops.distkern.whitening_factors_release_(c32.clone(), 0.0, True, None)[0]
    assert torch.equal(L32, torch.ops.distkern.whitening_factors(c32, 0.0, True, None)[0])
    good = cov[ok].clone()
    assert torch.equal(whitening_factor(good.clone(), ridge=0.01, release=True),
                       whitening_factor(good, ridge=0.01))
    bad = cov.clone()
    with pytest.raises(NotPositiveDefiniteError, match="batch index") as e:
        whitening_factor(bad, release=True)
    assert e.value.index == (4,) and e.value.min_eigenvalue < 0  # read from the kept matrix
    torch.library.opcheck(torch.ops.distkern.whitening_factors_release_.default,
                          (cov[:2].clone(), 0.01, True, torch.float32))


@pytest.mark.cuda
def test_whitening_factors_op_cuda(rng):
    """On CUDA the op runs torch's batched Cholesky and triangular solve on the whole batch: same factors as
    the CPU's, and the same info for a matrix that is not positive definite."""
    D = 40
    A = torch.randn(6, D, D + 2, generator=rng, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) / (D + 2) + 0.05 * torch.eye(D, dtype=torch.float64)
    cov[2] = -cov[2]
    L, info = torch.ops.distkern.whitening_factors(cov.cuda(), 0.0, True, torch.float32)
    Lc, ic = torch.ops.distkern.whitening_factors(cov, 0.0, True, torch.float32)
    assert info.cpu().tolist() == ic.tolist() == [0, 0, 1, 0, 0, 0]
    keep = [0, 1, 3, 4, 5]
    assert torch.allclose(L.cpu()[keep], Lc[keep], rtol=1e-5, atol=1e-5)
    # chunks of ~256 MiB of matrices (27 at D = 1100): 30 go in two, scaled and symmetrised as they load
    D = 1100
    A = torch.randn(30, D, D + 8, generator=rng, dtype=torch.float64)
    S = A @ A.transpose(1, 2)
    S[29, 3, 3] = -1.0  # the second chunk's last matrix is not definite
    L, info = torch.ops.distkern.whitening_factors(S.cuda(), 0.01, True, None, 1 / (D + 8))
    Lc, ic = torch.ops.distkern.whitening_factors(S, 0.01, True, None, 1 / (D + 8))
    assert info.cpu().tolist() == ic.tolist() and ic[29] > 0 and not ic[:29].any()
    assert torch.allclose(L.cpu()[:29], Lc[:29], rtol=1e-9, atol=1e-9 * float(Lc[:29].abs().max()))
    # the consuming variant on CUDA: the same factors (nothing is handed back there)
    Lr, ir = torch.ops.distkern.whitening_factors_release_(S[:4].cuda(), 0.01, True, None, 1 / (D + 8))
    assert torch.equal(ir, info[:4]) and torch.allclose(Lr, L[:4], rtol=1e-12, atol=1e-12 * float(Lc[:4].abs().max()))
