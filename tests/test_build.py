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


@pytest.mark.slow
def test_sdist_carries_every_kernel_source(tmp_path):
    """`pip install distkern` from a source distribution compiles csrc/ there: the sdist (built here, without
    CUDA) must hold every tracked file under csrc/ — the op headers and the .cu sources included, which
    setuptools adds only for the sources of the extension it would build on this machine."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs the git checkout (its tracked files are what an sdist is built from)")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked:  # a copy: setup.py writes _build_info.py and the shared headers into its tree
        if (root / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "DISTKERN_CUDA": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("distkern-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    kernel_files = [rel for rel in tracked if rel.startswith("csrc/")]
    assert any(rel.endswith(".cu") for rel in kernel_files)
    missing = [rel for rel in kernel_files if rel not in names]
    assert not missing, f"the sdist lacks {len(missing)} kernel files, e.g. {missing[:5]}"
    assert {"setup.py", "pyproject.toml", "python/distkern/cpp_extension.py", "python/distkern/_version.py"} <= names
