"""Every thread-tile shape of the CUDA tile-product kernels (4×4 / 64×64, 8×8 / 128×128, and the 2×4 /
32×64 tiles the automatic choice gives mahalanobis_pos batches of ≤ 32 rows) gives the float64 result,
for every op that runs on them, on shapes that straddle the tile edges."""
import pytest
import torch

import distkern
from cuda_refs import check_k, factors as _factors, rel as _rel

pytestmark = pytest.mark.cuda


@pytest.fixture(params=[0, 1, 2], ids=["auto", "tiles64", "tiles128"])
def tile_config(request):
    C = distkern._C
    if not hasattr(C, "set_cuda_tile_config"):
        pytest.skip("distkern built without CUDA")
    old = C.cuda_tile_config()
    C.set_cuda_tile_config(request.param)
    yield request.param
    C.set_cuda_tile_config(old)


@pytest.mark.parametrize("N,D", [(1, 3), (127, 129), (300, 256), (1000, 70)])
def test_single(tile_config, N, D):
    g = torch.Generator().manual_seed(N + D)
    L = _factors(1, D, g)[0]
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) + mu
    for dt in (torch.float32, torch.bfloat16):
        out = distkern.mahalanobis(x.to(dt).cuda(), mu.float().cuda(), L.float().cuda())
        refd = (((x.to(dt).double() - mu.float().double()) @ L.float().double()) ** 2).sum(1)
        assert _rel(out, refd) < 2e-5
    W = torch.randn(D, 5, generator=g, dtype=torch.float64)
    out = distkern.mahalanobis(x.float().cuda(), mu.float().cuda(), W.float().cuda(), lower=False)
    assert _rel(out, (((x.float().double() - mu.float().double()) @ W.float().double()) ** 2).sum(1)) < 2e-5


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("N,D,K", [(130, 33, 3), (257, 129, 70), (600, 64, 150)])
def test_k(tile_config, shared, N, D, K):
    check_k(N, D, K, shared, 1e-4 if shared else 2e-5)


@pytest.mark.parametrize("B,P,D", [(33, 5, 130), (130, 3, 64), (32, 4, 100), (7, 3, 65)])
def test_positions(tile_config, B, P, D):
    g = torch.Generator().manual_seed(B + P + D)
    L = _factors(P, D, g).float()
    mu = torch.randn(P, D, generator=g)
    x = torch.randn(B, P, D, generator=g) + mu
    z = torch.einsum("bpd,pdr->bpr", x.double() - mu.double(), L.double())
    out = distkern.mahalanobis_pos(x.cuda(), mu.cuda(), L.cuda())
    assert _rel(out, (z * z).sum(-1)) < 2e-5


def test_backward_unaffected(tile_config):
    g = torch.Generator().manual_seed(5)
    D = 150
    L = _factors(1, D, g)[0].float()
    mu = torch.randn(D, generator=g)
    x = torch.randn(500, D, generator=g).cuda().requires_grad_()
    distkern.mahalanobis(x, mu.cuda(), L.cuda()).sum().backward()
    xr = x.detach().double().cpu().requires_grad_()
    (((xr - mu.double()) @ L.double()) ** 2).sum().backward()
    assert _rel(x.grad, xr.grad) < 1e-5
