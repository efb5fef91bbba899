"""The compiled module: build info, and the clear message on a torch/CUDA mismatch."""
import pytest
import torch

import distkern
from distkern import _build_info, _loader


def test_build_info():
    info = distkern.build_info()
    assert info["version"] == distkern.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and info["cuda"] == _build_info.WITH_CUDA
    assert info["omp_max_threads"] >= 1
    assert hasattr(torch.ops.distkern, "mahalanobis")


def test_torch_mismatch_says_rebuild(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .*\n.*Rebuild distkern"):
        _loader.load_extension()


def test_cuda_mismatch_says_rebuild(monkeypatch):
    monkeypatch.setattr(_build_info, "WITH_CUDA", True)
    monkeypatch.setattr(_build_info, "TORCH_CUDA_VERSION", "9.9")
    with pytest.raises(ImportError, match=r"built for CUDA 9\.9.*\n.*Rebuild distkern"):
        _loader.load_extension()
