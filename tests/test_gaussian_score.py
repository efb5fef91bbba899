"""The closed-form Gaussian denoiser and probability-flow teleport (distkern.gaussian_denoise /
gaussian_teleport, op distkern::gaussian_lowrank) and fit_lowrank_gaussian."""
import pytest
import torch

import distkern
from distkern import fit_lowrank_gaussian, gaussian_denoise, gaussian_teleport
from distkern.gaussian import GaussianStats

F64 = torch.float64


def _gaussian(g, D=6, r=4):
    A = torch.randn(D, D, generator=g, dtype=F64)
    U, _ = torch.linalg.qr(A)
    return torch.randn(D, generator=g, dtype=F64), U[:, :r].contiguous(), torch.rand(r, generator=g, dtype=F64) * 3 + 0.1


def _denoise_ref(x, s, mu, U, lam):
    c = x.reshape(x.shape[0], -1) - mu
    s = torch.as_tensor(s, dtype=F64).reshape(-1, 1)
    return (mu + ((c @ U) * (lam / (lam + s**2))) @ U.T).reshape(x.shape)


def _teleport_ref(x, sT, st, mu, U, lam):
    c = x.reshape(x.shape[0], -1) - mu
    sT = torch.as_tensor(sT, dtype=F64).reshape(-1, 1)
    st = torch.as_tensor(st, dtype=F64).reshape(-1, 1)
    p = c @ U
    inside = (p * torch.sqrt((st**2 + lam) / (sT**2 + lam))) @ U.T
    return (mu + inside + st / sT * (c - p @ U.T)).reshape(x.shape)


@pytest.mark.parametrize("r", [1, 4, 6])
def test_denoise_and_teleport_match_formula(r):
    g = torch.Generator().manual_seed(r)
    mu, U, lam = _gaussian(g, r=r)
    x = torch.randn(5, 6, generator=g, dtype=F64) * 10
    for s in (0.0, 0.3, 7.0):
        assert (gaussian_denoise(x, s, (mu, U, lam)) - _denoise_ref(x, s, mu, U, lam)).abs().max() < 1e-12
    assert (gaussian_teleport(x, 80.0, 0.5, (mu, U, lam)) - _teleport_ref(x, 80.0, 0.5, mu, U, lam)).abs().max() < 1e-12
    sig = torch.tensor([0.1, 1.0, 2.0, 5.0, 9.0], dtype=F64)
    assert (gaussian_denoise(x, sig, mean=mu, U=U, lam=lam) - _denoise_ref(x, sig, mu, U, lam)).abs().max() < 1e-12
    assert (gaussian_teleport(x, sig * 10, sig, (mu, U, lam)) - _teleport_ref(x, sig * 10, sig, mu, U, lam)).abs().max() \
        < 1e-12


def test_teleport_is_identity_at_equal_sigma_and_denoise_limits():
    g = torch.Generator().manual_seed(1)
    mu, U, lam = _gaussian(g, r=6)  # full rank
    x = torch.randn(4, 6, generator=g, dtype=F64)
    assert (gaussian_teleport(x, 3.0, 3.0, (mu, U, lam)) - x).abs().max() < 1e-12
    assert (gaussian_denoise(x, 0.0, (mu, U, lam)) - x).abs().max() < 1e-12  # no noise: D(x) = x
    assert (gaussian_denoise(x, 1e8, (mu, U, lam)) - mu).abs().max() < 1e-9  # all noise: D(x) = μ


def test_image_shaped_inputs_and_dtypes():
    g = torch.Generator().manual_seed(2)
    mu, U, lam = _gaussian(g, D=12, r=5)
    x = torch.randn(3, 3, 2, 2, generator=g, dtype=F64)
    ref = _denoise_ref(x, 0.7, mu, U, lam)
    out = gaussian_denoise(x, 0.7, (mu.reshape(3, 2, 2), U, lam))
    assert out.shape == x.shape and (out - ref).abs().max() < 1e-12
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        o = gaussian_denoise(x.to(dt), 0.7, (mu.float(), U.float(), lam.float()))
        assert o.dtype == dt
        assert (o.double() - _denoise_ref(x.to(dt).double(), 0.7, mu, U, lam)).abs().max() < tol * (1 + ref.abs().max())


def test_gradients():
    g = torch.Generator().manual_seed(3)
    mu, U, lam = (t.requires_grad_() for t in _gaussian(g))
    x = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, mu, U, lam, s: gaussian_denoise(x, s, (mu, U, lam)), (x, mu, U, lam, s))
    assert torch.autograd.gradcheck(lambda x, s: gaussian_teleport(x, s * 10, s, (mu, U, lam)), (x, s))


def test_compile():
    g = torch.Generator().manual_seed(4)
    mu, U, lam = _gaussian(g)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    f = torch.compile(lambda x: gaussian_teleport(x, 80.0, 1.0, (mu, U, lam)), backend="aot_eager", fullgraph=True)
    assert (f(x) - _teleport_ref(x, 80.0, 1.0, mu, U, lam)).abs().max() < 1e-12
    # dynamic shapes: the op's sizes are SymInts (it used to call numel() on symbolic sizes)
    d = torch.compile(lambda x: gaussian_denoise(x, 2.0, (mu, U, lam)), backend="aot_eager", fullgraph=True,
                      dynamic=True)
    for B in (3, 5):
        xb = torch.randn(B, 6, generator=g, dtype=F64)
        assert (d(xb) - _denoise_ref(xb, 2.0, mu, U, lam)).abs().max() < 1e-12
    sig = torch.tensor(0.5, dtype=F64)
    torch.library.opcheck(torch.ops.distkern.gaussian_lowrank.default, (x, mu, U, lam, sig, sig / 2))


def test_empty_batch():
    g = torch.Generator().manual_seed(5)
    mu, U, lam = _gaussian(g)
    assert gaussian_denoise(torch.empty(0, 6, dtype=F64), 1.0, (mu, U, lam)).shape == (0, 6)
    assert gaussian_teleport(torch.empty(0, 2, 3, dtype=F64), 80.0, 1.0, (mu, U, lam)).shape == (0, 2, 3)


def test_errors():
    g = torch.Generator().manual_seed(5)
    mu, U, lam = _gaussian(g)
    x = torch.randn(4, 6, dtype=F64)
    with pytest.raises(ValueError, match="mean"):
        gaussian_denoise(x, 1.0, (mu[:5], U, lam))
    with pytest.raises(ValueError, match="U must be"):
        gaussian_denoise(x, 1.0, (mu, U[:5], lam))
    with pytest.raises(ValueError, match="lam"):
        gaussian_denoise(x, 1.0, (mu, U, lam[:2]))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_denoise(x, torch.ones(3, dtype=F64), (mu, U, lam))
    with pytest.raises(ValueError, match="batch dimension"):
        gaussian_denoise(x[0], 1.0, (mu, U, lam))
    with pytest.raises(ValueError, match="gaussian="):
        gaussian_denoise(x, 1.0)


def test_fit_lowrank_gaussian_sources():
    g = torch.Generator().manual_seed(6)
    data = torch.randn(3000, 2, 3, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.1]) + 1.0
    flat = data.reshape(3000, -1)
    cov = torch.cov(flat.T, correction=0)  # the maximum-likelihood (empirical) covariance
    full = fit_lowrank_gaussian(data, dtype=F64)
    assert (full.mean - flat.mean(0)).abs().max() < 1e-12
    assert (full.U @ torch.diag(full.lam) @ full.U.T - cov).abs().max() < 1e-9
    assert full.lam[0] >= full.lam[-1]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(3000)), batch_size=256)
    from_loader = fit_lowrank_gaussian(loader, dtype=F64)  # (x, y) batches: x is used
    assert (from_loader.mean - full.mean).abs().max() < 1e-12 and (from_loader.lam - full.lam).abs().max() < 1e-9
    stats = GaussianStats().update(flat)
    assert (fit_lowrank_gaussian(stats, rank=2, dtype=F64).lam - full.lam[:2]).abs().max() < 1e-9
    assert fit_lowrank_gaussian(data, energy=0.5).U.shape[1] <= 2
    with pytest.raises(ValueError, match="rank"):
        fit_lowrank_gaussian(data, rank=0)
    with pytest.raises(ValueError, match="energy"):
        fit_lowrank_gaussian(data, energy=1.5)
    assert distkern.fit_lowrank_gaussian is fit_lowrank_gaussian
