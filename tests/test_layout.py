"""The library stands without Dagster, and the layout keeps dataset construction apart from the model."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import fc_pipeline

LIBRARY = Path(fc_pipeline.__file__).parent

BLOCK_DAGSTER = """
import importlib.abc, importlib.util, pkgutil, sys

class NoDagster(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dagster" or name.startswith("dagster."):
            raise ImportError(f"dagster is blocked: {name}")
        return None

sys.meta_path.insert(0, NoDagster())
import fc_pipeline
names = [m.name for m in pkgutil.walk_packages(fc_pipeline.__path__, "fc_pipeline.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def library_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(LIBRARY)], "fc_pipeline.") if not m.name.endswith("__main__")]


def test_every_library_module_imports_without_dagster():
    done = subprocess.run([sys.executable, "-c", BLOCK_DAGSTER], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len(library_modules()) > 30


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_dataset_construction_never_imports_the_model_or_training():
    offenders = {
        path.name: sorted(m for m in _imports(path) if m.startswith(("fc_pipeline.model", "fc_pipeline.training")))
        for path in (LIBRARY / "data").glob("*.py")
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_library_never_imports_the_code_location():
    offenders = [
        str(path.relative_to(LIBRARY))
        for path in LIBRARY.rglob("*.py")
        if path.parent.name != "cli" and any(m == "assets" or m.startswith("assets.") for m in _imports(path))
    ]
    assert offenders == []
