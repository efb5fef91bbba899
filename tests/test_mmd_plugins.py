"""The kde detector and the mmd-align loss (plugins/mmd), found through the registry."""
import pytest
import torch

import distkern
from distkern.testing import RULES, check_method


def _get(name):
    try:
        return distkern.methods.get(name)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"{name} not installed: {e}")


def test_kde_conforms_and_matches_dense(rng):
    KDE = _get("kde")
    assert set(RULES["detector"]) - {"device"} <= set(check_method(KDE))  # every rule of its kind (no GPU here)
    train = torch.randn(300, 4, generator=rng, dtype=torch.float64)
    test = torch.randn(50, 4, generator=rng, dtype=torch.float64) * 2
    det = KDE(bandwidth=0.8).fit(train)
    dense = -torch.log(torch.exp(-torch.cdist(test, train) ** 2 / (2 * 0.64)).mean(1))
    assert torch.allclose(det.score(test).double(), dense, rtol=1e-5)
    assert KDE(bandwidth="scott").fit(train).sigma_ > 0
    with pytest.raises(ValueError, match="bandwidth must be"):
        KDE(bandwidth=-1)


def test_mmd_align_loss(rng):
    MMDAlign = _get("mmd-align")
    assert MMDAlign.kind == "loss"
    loss = MMDAlign()
    src = torch.randn(64, 8, generator=rng, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(64, 8, generator=rng, dtype=torch.float64) + 1.0
    value = loss(src, tgt)
    assert value.dim() == 0 and float(value.detach()) > 0
    value.backward()
    assert torch.isfinite(src.grad).all()
    # minimising it moves the source batch toward the target
    x = src.detach().clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    first = float(loss(x, tgt).detach())
    for _ in range(60):
        opt.zero_grad()
        loss(x, tgt).backward()
        opt.step()
    assert float(loss(x, tgt).detach()) < 0.5 * first
