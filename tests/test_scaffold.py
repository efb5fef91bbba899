"""distkern new-plugin writes packages that install, register and pass their own tests."""
import subprocess
import sys

import pytest

from distkern.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detector", "loss"])
def test_generated_plugin_installs_and_passes(tmp_path, kind):
    name = f"gen-{kind}-x"
    assert main(["new-plugin", name, "--kind", kind, "-o", str(tmp_path)]) == 0
    root = tmp_path / name
    assert (root / "pyproject.toml").exists()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(root)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    try:
        # a fresh interpreter sees the new entry point; the generated tests must pass as written
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", f"distkern-{name}"], capture_output=True)


def test_new_plugin_errors(tmp_path):
    assert main(["new-plugin", "Bad_Name", "--kind", "detector", "-o", str(tmp_path)]) == 1
    assert main(["new-plugin", "ok-name", "--kind", "sampler", "-o", str(tmp_path)]) == 2
    assert main(["new-plugin", "ok-name", "--kind", "detector", "-o", str(tmp_path)]) == 0
    assert main(["new-plugin", "ok-name", "--kind", "detector", "-o", str(tmp_path)]) == 1  # exists
