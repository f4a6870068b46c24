"""The package layering (README, "Layout"): no package imports one above it.

Read from the source with ``ast``, not by importing it: every import anywhere in
a file counts, the ones inside functions (the lazy ones) included, and so does
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRESS = ROOT / "stress"

ABOVE_MODEL = ("stress.oracles", "stress.harness", "stress.repro", "stress.jobs",
               "stress.report", "stress.mutate", "stress.cli")
ABOVE_ORACLES = ABOVE_MODEL[1:]

# a package (or a module) -> what it must not import, anywhere in it
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the shared-memory and atomics base layer, and the config
    "stress.arena": ABOVE_MODEL,
    "stress.atomics": ABOVE_MODEL,
    "stress.config": ABOVE_MODEL,
    "stress.files": ABOVE_MODEL,
    "stress.model": ABOVE_MODEL,
    # the kernel engine's tree, build and VM: the model's level
    "stress.kernel": ABOVE_MODEL,
    "stress.oracles": ABOVE_ORACLES,
    "stress.harness": ("stress.repro", "stress.jobs", "stress.report", "stress.cli"),
    "stress.report": ("stress.repro", "stress.jobs", "stress.cli"),
    "stress.repro": ("stress.jobs", "stress.cli"),
    "stress.jobs": ("stress.cli",),
    "stress.mutate": ("stress.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """The modules the source of module ``name`` imports: ``import a.b`` is
    a.b; ``from a import b`` is a and a.b (b may be a module); relative
    imports are resolved against ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id == "__import__")):
            out.add(node.args[0].value)
    return out


def within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def sources(layer: str) -> list[Path]:
    return [p for p in sorted(STRESS.rglob("*.py")) if within(module_name(p), layer)]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer: str) -> None:
    files = sources(layer)
    assert files, f"{layer}: no source files (renamed? update FORBIDDEN)"
    bad = []
    for path in files:
        found = imports(path.read_text(), module_name(path), path.name == "__init__.py")
        for mod in sorted(found):
            if any(within(mod, f) for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_imports_sees_every_kind_of_import() -> None:
    src = '''
import stress.harness.trace
from stress.report import render
from . import turns
from ..workers import Worker

def f():
    from stress.jobs.zoo import run_zoo

class C:
    def m(self):
        import stress.cli
        importlib.import_module("stress.repro.hunt")
'''
    found = imports(src, "stress.harness.sched.random")
    for mod in ("stress.harness.trace", "stress.report.render", "stress.harness.sched.turns",
                "stress.harness.workers.Worker", "stress.jobs.zoo", "stress.cli",
                "stress.repro.hunt"):
        assert mod in found, mod
    assert "stress.harness.sched.x" in imports("from .x import y", "stress.harness.sched", True)


def test_pyproject_lists_every_package() -> None:
    """[tool.setuptools] packages is an explicit list: a package missing from it
    is missing from a non-editable install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    packages = {module_name(p) for p in STRESS.rglob("__init__.py")}
    assert packages - listed == set(), "add them to pyproject.toml"
    assert listed - packages == set(), "no such package"
