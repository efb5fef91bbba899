"""float64 references and helpers shared by the CUDA tests (test_cuda_tiles, test_cuda_matmul and the
schedule cases of the op tests)."""
import contextlib

import torch

import distkern
from distkern.gaussian import whitening_factor


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextlib.contextmanager
def cuda_schedule(op, schedule):
    """The op's process-wide CUDA schedule (`distkern._C.set_{op}_schedule`: 0 automatic, 1 the tile kernel,
    2 Gram panels) forced for the block, and put back after it whatever the block raised."""
    old = getattr(distkern._C, f"{op}_schedule")()
    getattr(distkern._C, f"set_{op}_schedule")(schedule)
    try:
        yield
    finally:
        getattr(distkern._C, f"set_{op}_schedule")(old)


def factors(C, D, gen):
    """C well-conditioned float64 whitening factors (C, D, D)."""
    A = torch.randn(C, D, D, generator=gen, dtype=torch.float64)
    return whitening_factor(A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64), dtype=None)


def check_k(N, D, K, shared, tol):
    """mahalanobis_k on CUDA (all three reductions) against float64, within tol."""
    g = torch.Generator().manual_seed(N + D + K)
    L = factors(1 if shared else K, D, g).float()
    L = L[0] if shared else L
    mu = (3 * torch.randn(K, D, generator=g)).float()
    x = (mu[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g)).float()
    W = L.double().expand(K, -1, -1) if shared else L.double()
    z = torch.einsum("nkd,kdr->nkr", x.double()[:, None] - mu.double()[None], W)
    ref = (z * z).sum(-1)
    xc, mc, Lc = x.cuda(), mu.cuda(), L.cuda()
    assert rel(distkern.mahalanobis_k(xc, mc, Lc), ref) < tol
    assert rel(distkern.mahalanobis_k(xc, mc, Lc, reduce="min").values, ref.min(1).values) < tol
    b = torch.randn(K, generator=g)
    lse = distkern.mahalanobis_k(xc, mc, Lc, reduce="logsumexp", bias=b.cuda())
    assert rel(lse, torch.logsumexp(b.double() - 0.5 * ref, 1)) < tol
