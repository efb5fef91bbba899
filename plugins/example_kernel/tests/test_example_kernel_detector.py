"""The diag-gaussian detector: found through the registry, conforms, scores like the plain formula."""
import torch

import distkern
from distkern.testing import check_method

from distkern_example_kernel import DiagGaussian, reference


def test_found_through_the_registry():
    assert distkern.methods.get("diag-gaussian") is DiagGaussian
    row = next(m for m in distkern.methods.available() if m.name == "diag-gaussian")
    assert row.status == "ok" and row.package == "distkern-example-kernel"


def test_contract():
    passed = check_method(DiagGaussian)
    assert {"higher-is-anomalous", "save-load", "clear-input-errors"} <= set(passed), passed


def test_scores_are_the_standardized_distance():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 3
    det = DiagGaussian(eps=1e-9).fit(train)
    test = torch.randn(20, 6, generator=g) * 4
    x64 = train.double()
    expected = reference(test, x64.mean(0), x64.var(0, unbiased=False).rsqrt())
    torch.testing.assert_close(det.score(test).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(det.score(test.double()), expected, rtol=1e-6, atol=1e-6)  # float32 μ, σ⁻¹
