"""Every Python block of the guides in docs/ runs, in order, in one namespace per guide; so does the
README's "Use" block."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("name,min_blocks", [("plugins.md", 4), ("diffusion.md", 4), ("alignment.md", 3), ("cuda.md", 2)])
def test_guide_blocks_run(name, min_blocks, tmp_path, monkeypatch):
    doc = DOCS / name
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= min_blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"guide_{doc.stem}"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"docs/{doc.name} block {i} failed: {type(e).__name__}: {e}\n{code}") from e


def test_readme_use_block_runs(tmp_path, monkeypatch):
    """The README's first code block is what a user copies first: it runs as it stands (toy data)."""
    text = (ROOT / "README.md").read_text()
    use = text[text.index("## Use"):]
    code = re.search(r"```python\n(.*?)```", use, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md[Use]", "exec"), {"__name__": "readme_use"})
    assert (tmp_path / "model.safetensors").exists()


def test_documented_submodules_resolve_after_a_plain_import():
    """The docs write `distkern.testing.check_method(...)` and `distkern.cpp_extension.load_extension` after a
    plain `import distkern`: those submodules resolve on first use, and `import distkern` does not load them."""
    import subprocess
    import sys

    code = (
        "import sys, distkern\n"
        "lazy = ('bench', 'cli', 'cpp_extension', 'metrics', 'scaffold', 'testing')\n"
        "assert not [m for m in lazy if 'distkern.' + m in sys.modules], 'loaded eagerly'\n"
        "assert callable(distkern.testing.check_method) and callable(distkern.cpp_extension.load_extension)\n"
        "assert all(hasattr(distkern, m) for m in lazy) and set(lazy) <= set(dir(distkern))\n"
        "try:\n    distkern.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
