"""The method plugin registry: in-process registration and entry-point plugins."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import distkern
from distkern import methods
from distkern.methods import (
    API_VERSION,
    IncompatibleMethodError,
    InvalidMethodError,
    MethodCollisionError,
    MethodInfo,
    MethodLoadError,
    UnknownMethodError,
)

GOOD = f"""
class Method:
    kind = "detector"
    distkern_api = {API_VERSION}
"""


def make_dist(root: Path, dist: str, version: str, entries: dict[str, str],
              modules: dict[str, str]) -> None:
    """A throwaway installed distribution: ``<dist>-<version>.dist-info`` plus module files."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"  # as installers name it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[distkern.methods]\n{lines}")
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


@pytest.fixture
def reg(monkeypatch, tmp_path):
    """A clean registry view; yields (tmp site dir, unique prefix). Undoes everything after."""
    before_inproc = set(methods._inprocess)
    before_mods = set(sys.modules)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    methods.refresh()
    prefix = "dk" + uuid.uuid4().hex[:8]
    yield site, prefix
    for name in set(methods._inprocess) - before_inproc:
        methods.unregister(name)
    for mod in set(sys.modules) - before_mods:
        if mod.startswith(prefix):
            del sys.modules[mod]
    methods.refresh()


def rows(name: str) -> list[MethodInfo]:
    return [m for m in methods.available() if m.name == name]


# ---------------------------------------------------------------- in-process

def test_constants():
    assert methods.API_VERSION == 1
    assert methods.KINDS == ("detector", "loss", "sampler", "aligner")
    assert methods.ENTRY_POINT_GROUP == "distkern.methods"


def test_register_get_unregister(reg):
    class MyDetector:
        kind = "detector"
        distkern_api = API_VERSION

    assert methods.register(MyDetector) is MyDetector
    assert methods.get("mydetector") is MyDetector
    (info,) = rows("mydetector")
    assert (info.kind, info.status, info.source, info.package, info.error) == (
        "detector", "ok", "in-process", "<in-process>", None)
    assert info.obj is MyDetector and "MyDetector" in info.target
    assert "obj" not in repr(info)
    methods.unregister("mydetector")
    with pytest.raises(UnknownMethodError):
        methods.get("mydetector")
    with pytest.raises(KeyError):
        methods.unregister("mydetector")


def test_decorator_forms_and_name_defaults(reg):
    @methods.register(name="my-loss")
    class L:
        kind = "loss"
        distkern_api = API_VERSION

    @methods.register
    class Sampler:
        name = "named-by-attr"
        kind = "sampler"
        distkern_api = API_VERSION

    @methods.register(kind="aligner")
    class Al:
        distkern_api = API_VERSION

    assert methods.get("my-loss") is L
    assert methods.get("named-by-attr") is Sampler
    assert methods.get("al") is Al
    assert rows("al")[0].kind == "aligner"


def test_duplicate_register_collides_unless_replace(reg):
    class A:
        kind = "loss"
        distkern_api = API_VERSION

    class B(A):
        pass

    methods.register(A, name="dup")
    with pytest.raises(MethodCollisionError, match="dup"):
        methods.register(B, name="dup")
    assert methods.get("dup") is A  # nothing overwritten
    methods.register(B, name="dup", replace=True)
    assert methods.get("dup") is B


def test_redefining_the_same_class_replaces_it(reg):
    """A re-run notebook cell defines the class again (a new object, the same module and qualname)."""
    def define():
        class Cell:
            kind = "loss"
            distkern_api = API_VERSION
        return Cell

    first, second = define(), define()
    methods.register(first, name="cell")
    methods.register(second, name="cell")  # no collision with itself
    assert methods.get("cell") is second

    class Other:
        kind = "loss"
        distkern_api = API_VERSION

    with pytest.raises(MethodCollisionError, match=r"registered in-process already by .*Cell; pass replace=True"):
        methods.register(Other, name="cell")


def test_incompatible_api_refused(reg):
    class Future:
        kind = "detector"
        distkern_api = API_VERSION + 1

    with pytest.raises(IncompatibleMethodError) as ei:
        methods.register(Future)
    msg = str(ei.value)
    assert f"API {API_VERSION + 1}" in msg and f"API {API_VERSION}" in msg
    assert isinstance(ei.value, MethodLoadError) and isinstance(ei.value, ImportError)
    with pytest.raises(UnknownMethodError):
        methods.get("future")


@pytest.mark.parametrize("attrs, match", [
    ({"distkern_api": API_VERSION}, "kind"),
    ({"distkern_api": API_VERSION, "kind": "bogus"}, "bogus"),
    ({"kind": "loss"}, "distkern_api"),
    ({"kind": "loss", "distkern_api": "1"}, "distkern_api"),
])
def test_invalid_declarations_refused(reg, attrs, match):
    cls = type("Bad", (), attrs)
    with pytest.raises(InvalidMethodError, match=match):
        methods.register(cls)


def test_unknown_name_lists_available(reg):
    @methods.register(name="known-one")
    class K:
        kind = "loss"
        distkern_api = API_VERSION

    with pytest.raises(UnknownMethodError) as ei:
        methods.get("no-such-method")
    assert "no-such-method" in str(ei.value) and "known-one" in str(ei.value)


# ---------------------------------------------------------------- entry points

def test_entry_point_ok(reg):
    site, p = reg
    make_dist(site, f"{p}-good", "1.2.3", {f"{p}-good": f"{p}_good:Method"}, {f"{p}_good": GOOD})
    cls = methods.get(f"{p}-good")
    assert cls.kind == "detector"
    (info,) = rows(f"{p}-good")
    assert (info.status, info.kind, info.package, info.version, info.source, info.target) == (
        "ok", "detector", f"{p}-good", "1.2.3", "entry-point", f"{p}_good:Method")
    assert info.obj is cls


def test_broken_and_incompatible_entry_points(reg):
    site, p = reg
    make_dist(site, f"{p}-mixed", "0.1", {
        f"{p}-raises": f"{p}_raises:Method",
        f"{p}-exits": f"{p}_exits:Method",
        f"{p}-missing": f"{p}_nomodule:Method",
        f"{p}-old": f"{p}_old:Method",
        f"{p}-nokind": f"{p}_nokind:Method",
        f"{p}-fine": f"{p}_fine:Method",
    }, {
        f"{p}_raises": "raise RuntimeError('boom at import')\n",
        f"{p}_exits": "import sys\nsys.exit(3)\n",
        f"{p}_old": "class Method:\n    kind = 'loss'\n    distkern_api = 0\n",
        f"{p}_nokind": f"class Method:\n    distkern_api = {API_VERSION}\n",
        f"{p}_fine": GOOD,
    })
    table = {m.name: m for m in methods.available() if m.name.startswith(p)}
    assert table[f"{p}-raises"].status == "broken"
    assert table[f"{p}-raises"].error == "RuntimeError: boom at import"
    assert table[f"{p}-exits"].status == "broken" and "SystemExit" in table[f"{p}-exits"].error
    assert "ModuleNotFoundError" in table[f"{p}-missing"].error
    assert table[f"{p}-old"].status == "incompatible" and "API 0" in table[f"{p}-old"].error
    assert table[f"{p}-nokind"].status == "broken" and "kind" in table[f"{p}-nokind"].error
    assert table[f"{p}-fine"].status == "ok"
    assert all(table[n].obj is None for n in table if table[n].status != "ok")

    with pytest.raises(MethodLoadError) as ei:
        methods.get(f"{p}-raises")
    assert "boom at import" in str(ei.value) and ei.value.error == "RuntimeError: boom at import"
    with pytest.raises(IncompatibleMethodError):
        methods.get(f"{p}-old")
    with pytest.raises(InvalidMethodError):
        methods.get(f"{p}-nokind")
    assert methods.get(f"{p}-fine").kind == "detector"
    methods.available(refresh=True)  # still fine after a reload


def test_entry_point_name_must_match_the_class_name(reg):
    """A model file records the class's ``name`` and distkern score looks it up: an entry point registering the
    class under another name would fit but never score, so it is listed as broken."""
    site, p = reg
    make_dist(site, f"{p}-named", "1.0", {f"{p}-alias": f"{p}_named:Method"},
              {f"{p}_named": GOOD.replace("class Method:", f"class Method:\n    name = '{p}-real'")})
    methods.refresh()
    (row,) = rows(f"{p}-alias")
    assert row.status == "broken" and f"{p}-real" in row.error and "must be equal" in row.error
    make_dist(site, f"{p}-func", "1.0", {f"{p}-func": f"{p}_func:make"}, {f"{p}_func": "def make():\n    pass\n"})
    methods.refresh()
    (row,) = rows(f"{p}-func")
    assert row.status == "broken" and "must be a class" in row.error


def test_collision_between_distributions(reg):
    site, p = reg
    name = f"{p}-shared"
    make_dist(site, f"{p}-alpha", "1.0", {name: f"{p}_alpha:Method"}, {f"{p}_alpha": GOOD})
    make_dist(site, f"{p}-beta", "2.0", {name: f"{p}_beta:Method"}, {f"{p}_beta": GOOD})
    claim = rows(name)
    assert sorted(m.package for m in claim) == [f"{p}-alpha", f"{p}-beta"]
    assert all(m.status == "collision" for m in claim)
    assert all(f"{p}-alpha" in m.error and f"{p}-beta" in m.error for m in claim)
    with pytest.raises(MethodCollisionError) as ei:
        methods.get(name)
    assert f"{p}_alpha:Method" in str(ei.value) and f"{p}_beta:Method" in str(ei.value)


def test_collision_between_entry_point_and_register(reg):
    site, p = reg
    name = f"{p}-ep"
    make_dist(site, f"{p}-ep", "1.0", {name: f"{p}_ep:Method"}, {f"{p}_ep": GOOD})

    class Local:
        kind = "detector"
        distkern_api = API_VERSION

    with pytest.raises(MethodCollisionError, match=f"{p}-ep"):
        methods.register(Local, name=name)
    assert methods.get(name).__module__ == f"{p}_ep"
    methods.register(Local, name=name, replace=True)
    assert methods.get(name) is Local
    methods.unregister(name)
    assert methods.get(name).__module__ == f"{p}_ep"


def test_entry_point_appearing_after_register_collides(reg, monkeypatch, tmp_path):
    site, p = reg
    name = f"{p}-late"

    @methods.register(name=name)
    class Local:
        kind = "loss"
        distkern_api = API_VERSION

    late = tmp_path / "late"
    make_dist(late, f"{p}-late", "1.0", {name: f"{p}_late:Method"}, {f"{p}_late": GOOD})
    monkeypatch.syspath_prepend(str(late))
    methods.refresh()
    assert sorted(m.source for m in rows(name)) == ["entry-point", "in-process"]
    assert {m.status for m in rows(name)} == {"collision"}
    with pytest.raises(MethodCollisionError, match="in-process"):
        methods.get(name)


def test_get_is_lazy(reg):
    site, p = reg
    make_dist(site, f"{p}-lazy", "1.0",
              {f"{p}-one": f"{p}_one:Method", f"{p}-two": f"{p}_two:Method"},
              {f"{p}_one": GOOD, f"{p}_two": GOOD})
    make_dist(site, f"{p}-other", "1.0", {f"{p}-three": f"{p}_three:Method"},
              {f"{p}_three": "raise RuntimeError('must not be imported')\n"})
    assert f"{p}_one" not in sys.modules
    methods.get(f"{p}-one")
    assert f"{p}_one" in sys.modules
    assert f"{p}_two" not in sys.modules and f"{p}_three" not in sys.modules


def test_import_distkern_reads_no_plugin(reg, tmp_path):
    site, p = reg
    make_dist(site, f"{p}-sub", "1.0", {f"{p}-sub": f"{p}_sub:Method"},
              {f"{p}_sub": "raise RuntimeError('imported too early')\n"})
    code = (f"import sys, distkern; assert {p + '_sub'!r} not in sys.modules; "
            f"print([m.status for m in distkern.methods.available() if m.name == {p + '-sub'!r}])")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['broken']"
    assert distkern.methods is methods
