"""Edge cases found by probing the public ops: mixed devices (meta), non-finite inputs, tiny norms,
schedule tensors that require grad, far-off-centre data, and the errors that name what is wrong."""

import math

import pytest
import torch
import torch.nn.functional as F

import distkern
from distkern.gaussian import GaussianStats
from distkern.ops.align import anomaly_map


@pytest.mark.parametrize("call", [
    lambda m: distkern.kernel_matmul(torch.randn(4, 3), torch.zeros(5, 3, device=m), bandwidth=1.0),
    lambda m: distkern.mahalanobis_k(torch.randn(4, 3), torch.zeros(2, 3, device=m), torch.eye(3)),
    lambda m: distkern.mahalanobis_k(torch.randn(4, 3), torch.zeros(2, 3), torch.eye(3, device=m), reduce="min"),
    lambda m: distkern.mahalanobis_pos(torch.randn(2, 5, 3), torch.zeros(5, 3), torch.eye(3).expand(5, 3, 3).to(m)),
    lambda m: distkern.nearest_reference(torch.randn(4, 3), torch.randn(6, 3, device=m)),
    lambda m: anomaly_map(torch.randn(1, 2, 5, 8), torch.randn(3, 2, 8, device=m)),
    lambda m: distkern.euler_step(torch.randn(2, 3, device=m), torch.randn(2, 3), 1.0, 0.5),
])
def test_a_meta_argument_is_refused_not_answered_with_garbage(call):
    with pytest.raises((ValueError, RuntimeError), match="device"):
        call("meta")


@pytest.mark.parametrize("kernel", ["laplacian", "distance", "gaussian", "polynomial"])
@pytest.mark.parametrize("n", [10, 600])  # the dense path and kernel_matmul's
def test_mmd2_of_nan_data_is_nan(kernel, n):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    x[2, 1] = float("nan")
    kw = {} if kernel in ("distance", "polynomial") else {"bandwidth": 1.0}
    assert math.isnan(float(distkern.mmd2(x, y, kernel=kernel, **kw)))


@pytest.mark.parametrize("kernel", ["laplacian", "distance"])
def test_kernel_matmul_gradient_of_a_nan_row_is_nan(kernel):
    x = torch.tensor([[float("nan"), 1.0], [0.5, 0.2]], requires_grad=True)
    y = torch.randn(5, 2)
    kw = {} if kernel == "distance" else {"bandwidth": 1.0}
    distkern.kernel_matmul(x, y, kernel=kernel, **kw).sum().backward()
    assert torch.isnan(x.grad[0]).all() and torch.isfinite(x.grad[1]).all()


def test_mmd_test_of_nan_data_has_a_nan_p_value():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    x[0, 0] = float("nan")
    res = distkern.mmd_test(x, y, permutations=19, kernel="distance")
    assert math.isnan(res.statistic) and math.isnan(res.p_value)


def test_mahalanobis_k_shared_factor_non_finite_mean_poisons_its_column_only():
    means = torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0], [1.0, 1, 1], [float("inf"), 0, 0]])
    d = distkern.mahalanobis_k(torch.ones(2, 3), means, torch.eye(3))
    assert torch.allclose(d[:, 0], torch.full((2,), 3.0)) and torch.allclose(d[:, 2], torch.zeros(2), atol=1e-6)
    assert torch.isnan(d[:, 1]).all() and not torch.isfinite(d[:, 3]).any()


@pytest.mark.parametrize("scale", [1e-13, 1.0])
def test_nearest_reference_gradient_matches_normalize(scale):
    x = (torch.tensor([[3.0, 4.0], [1.0, -2.0]], dtype=torch.float64) * scale).requires_grad_()
    refs = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64).requires_grad_()
    sim = distkern.nearest_reference(x, refs)[0]
    (gx, gr) = torch.autograd.grad(sim.sum(), (x, refs))
    ref = (F.normalize(x, dim=1) @ F.normalize(refs, dim=1).T).max(1).values
    (rx, rr) = torch.autograd.grad(ref.sum(), (x, refs))
    assert torch.allclose(sim, ref) and torch.allclose(gx, rx, rtol=1e-9) and torch.allclose(gr, rr, rtol=1e-9)


def test_a_schedule_tensor_that_requires_grad_is_refused():
    m, x = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    s = torch.tensor([2.0, 1.0, 1.5, 0.7], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="sigma requires grad"):
        distkern.euler_step(m, x, s, 0.5)
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        distkern.ddim_step(m, x, a, 0.7)
    with torch.no_grad():  # outside grad mode nothing is dropped
        distkern.euler_step(m, x, s, 0.5)
    assert distkern.euler_step(m, x, s.detach(), 0.5)[0].shape == x.shape


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float32_products_keep_the_covariance_far_off_centre(offset):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 4, generator=g) * 1e-2 + offset
    st = GaussianStats(product_dtype=torch.float32)
    for b in x.split(100):
        st.update(b)
    ref = torch.cov(x.double().T, correction=0)
    cov = st.covariance() if callable(getattr(st, "covariance", None)) else st.covariance
    assert float((cov.double() - ref).norm() / ref.norm()) < 1e-5


def test_gmm_log_likelihood_takes_any_sign_of_the_factor_diagonal():
    g = torch.Generator().manual_seed(3)
    x, means = torch.randn(7, 3, generator=g), torch.randn(2, 3, generator=g)
    L = torch.linalg.cholesky(torch.eye(3) * 2 + 0.1)
    flipped = L.clone()
    flipped[:, 1] *= -1  # the same Σ⁻¹ = L Lᵀ
    a = distkern.gmm_log_likelihood(x, means, L)
    b = distkern.gmm_log_likelihood(x, means, flipped)
    assert torch.isfinite(b).all() and torch.allclose(a, b, atol=1e-5)


def test_gaussian_teleport_and_denoise_name_their_bad_arguments():
    x = torch.randn(2, 4)
    gauss = (torch.zeros(4), torch.eye(4)[:, :2], torch.ones(2))
    with pytest.raises(ValueError, match="sigma_T must be > 0"):
        distkern.gaussian_teleport(x, 0.0, 1.0, gauss)
    with pytest.raises(ValueError, match=r"\(mean, U, lam\) triple"):
        distkern.gaussian_denoise(x, 0.5, gauss[:2])


def test_seed_out_of_range_is_named():
    m, x = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        distkern.ddpm_step(m, x, 0.5, 0.7, seed=2**63)


def test_more_arguments_named_in_errors():
    from distkern.ops.align import anomaly_map as amap, prompt_align

    with pytest.raises(ValueError, match="x is on cpu but y is on meta"):
        distkern.mmd2(torch.randn(5, 3), torch.randn(5, 3, device="meta"))
    with pytest.raises(TypeError, match="text must be a floating-point tensor"):
        amap(torch.randn(1, 2, 5, 8), torch.ones(3, 2, 8, dtype=torch.int32))
    text, patches = torch.randn(6, 8), torch.randn(2, 5, 8)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"b_q must be a \(8,\) vector"):
        prompt_align(text, patches, w, w, w, 2, b_q=torch.zeros(4))
    with pytest.raises(TypeError, match="U must be float32"):
        distkern.gaussian_denoise(torch.randn(2, 4), 0.5, (torch.zeros(4), torch.eye(4, dtype=torch.int64)[:, :2],
                                                          torch.ones(2)))
