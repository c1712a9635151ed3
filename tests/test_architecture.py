"""The package's layers (pyproject.toml, [tool.importlinter]): imports only point down, imports inside
functions included, and no import circle anywhere in the package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=120)


def test_imports_only_point_down_the_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_inside_a_function_is_refused(tmp_path):
    copy = tmp_path / "mnv2lib"
    shutil.copytree(ROOT / "mnv2lib", copy, ignore=shutil.ignore_patterns("csrc", "__pycache__"))
    data = copy / "engine" / "data.py"
    data.write_text(data.read_text() + "\n\ndef _upward():\n    from ..workbook import catalogue\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "mnv2lib.engine.data -> mnv2lib.workbook.catalogue" in result.stdout


def import_cycles(package: str = "mnv2lib") -> list[tuple[str, ...]]:
    """Every direct import a -> b for which b also reaches a: each names a circle (the shortest chain back)."""
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append((importer, *back))
    return cycles


def test_no_import_circle_inside_the_package():
    # A package's __init__ importing its own submodules is not a circle of concerns; grimp counts a
    # submodule as importing its parent package only when it says so (``from . import x``).
    cycles = [c for c in import_cycles() if not any(a.startswith(b + ".") or b.startswith(a + ".")
                                                     for a, b in zip(c, c[1:]))]
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted((ROOT / "mnv2lib").glob("*.py")), ids=lambda p: p.name)
def test_the_top_level_holds_only_entry_points(path):
    assert path.name in {"__init__.py", "experiments.py", "reports.py"}, (
        f"{path.name}: a module belongs in a layer's folder (utils, ops, layers, models, engine, runs, analysis, "
        "benchmarks, figures, workbook)")
