"""The plugin's op ``torch.ops.distkern_example_kernel.standardized_sqdist``: against a float64 reference, its
fake / autograd registrations (opcheck), gradients, bad inputs, and the pure-CUDA compile check."""
from pathlib import Path

import pytest
import torch

from distkern_example_kernel.ops import reference, standardized_sqdist

ROOT = Path(__file__).resolve().parents[1]


def _inputs(n=37, d=19, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    inv_std = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    return x.to(device=device, dtype=dtype), mean.to(device), inv_std.to(device)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                        (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_matches_float64_reference(dtype, rtol):
    x, mean, inv_std = _inputs(dtype=dtype)
    out = standardized_sqdist(x, mean, inv_std)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (37,)
    # the reference reads the same (rounded) x: what is left is the accumulation error
    ref = reference(x.double(), mean, inv_std)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-6)


def test_strided_and_empty_inputs():
    x, mean, inv_std = _inputs(n=20, d=8)
    ref = reference(x, mean, inv_std).float()
    for xs in (torch.stack([x, -x], dim=2)[:, :, 0], x.T.contiguous().T):  # strides (2D, 2) and (1, N)
        assert not xs.is_contiguous()
        torch.testing.assert_close(standardized_sqdist(xs, mean, inv_std), ref)
    assert standardized_sqdist(x[:0], mean, inv_std).shape == (0,)


def test_opcheck_and_gradients():
    x, mean, inv_std = _inputs(n=6, d=5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.distkern_example_kernel.standardized_sqdist.default, (x, mean, inv_std))
    args = tuple(t.clone().requires_grad_() for t in (x, mean, inv_std))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.distkern_example_kernel.standardized_sqdist(*a), args)


def test_compiles_under_torch_compile():
    x, mean, inv_std = _inputs(n=8, d=4)
    compiled = torch.compile(lambda a, b, c: standardized_sqdist(a, b, c) + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, mean, inv_std), standardized_sqdist(x, mean, inv_std) + 1)


def test_bad_inputs_name_the_argument():
    x, mean, inv_std = _inputs(n=4, d=3)
    with pytest.raises(ValueError, match="x must be"):
        standardized_sqdist(x[0], mean, inv_std)
    with pytest.raises(ValueError, match="mean"):
        standardized_sqdist(x, mean[:2], inv_std)
    with pytest.raises(TypeError, match="float"):
        standardized_sqdist(x.long(), mean, inv_std)
    with pytest.raises((ValueError, RuntimeError), match="mean and inv_std"):  # the C++ check, below the wrapper
        torch.ops.distkern_example_kernel.standardized_sqdist(x, mean[:2].float(), inv_std.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x, mean, inv_std = _inputs(n=1000, d=77)
    torch.testing.assert_close(standardized_sqdist(x.cuda(), mean.cuda(), inv_std.cuda()).cpu(),
                               standardized_sqdist(x, mean, inv_std), rtol=1e-5, atol=1e-5)


def test_cuda_kernel_compiles_with_nvcc_alone():
    """The pure-CUDA rule: the .cu files compile with nvcc and distkern's headers, without torch."""
    from distkern.cpp_extension import find_nvcc, nvcc_compile_check

    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    nvcc_compile_check(sorted(ROOT.glob("csrc/*_kernel.cu")), include_dirs=[str(ROOT / "csrc")])  # sm_80, sm_90
