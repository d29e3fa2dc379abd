"""The architecture's rules, kept by tests: the numerical core is NumPy/SciPy only, imports are light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline

PACKAGE = Path(pipeline.__file__).parent
#: What the numerical core may import besides the standard library and itself.
CORE_ALLOWED = {"numpy", "scipy", "threadpoolctl"}
#: Modules that neither the core nor ``import pipeline`` may load.
HEAVY = ("dask", "distributed", "zarr", "xarray", "yaml", "pydantic", "fsspec", "matplotlib", "dask_jobqueue")


def core_modules() -> list[Path]:
    return sorted((PACKAGE / "core").glob("*.py"))


def imported_top_levels(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (relative ones are the package's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def relative_targets(path: Path) -> set[str]:
    """Package modules a module imports with relative imports, as dotted names under ``pipeline``."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - node.level + 1]
            if node.module:
                targets.add(".".join([*base, node.module]))
            else:
                targets.update(".".join([*base, alias.name]) for alias in node.names)
    return targets


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_the_core_imports_only_numpy_scipy_and_itself(path):
    foreign = imported_top_levels(path) - set(sys.stdlib_module_names) - CORE_ALLOWED - {"pipeline"}
    assert not foreign, f"{path.name} imports {sorted(foreign)}: the core is NumPy/SciPy only"
    outside = {t for t in relative_targets(path)
               if not t.startswith("pipeline.core") and t not in ("pipeline.errors", "pipeline.flags")}
    assert not outside, f"{path.name} imports {sorted(outside)}: the core may use only pipeline.errors and flags"


@pytest.mark.parametrize("path", [PACKAGE / "errors.py", PACKAGE / "flags.py"], ids=lambda p: p.name)
def test_errors_and_flags_are_as_light_as_the_core(path):
    foreign = imported_top_levels(path) - set(sys.stdlib_module_names) - CORE_ALLOWED - {"pipeline"}
    assert not foreign
    assert relative_targets(path) <= {"pipeline.errors"}


def loaded_after(statement: str) -> list[str]:
    """Heavy modules present in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_pipeline_and_the_whole_core_loads_nothing_heavy():
    modules = ", ".join(f"pipeline.core.{p.stem}" for p in core_modules() if p.stem != "__init__")
    assert loaded_after(f"import pipeline, pipeline.flags, pipeline.errors, {modules}") == []


def test_the_estimators_run_without_loading_anything_heavy():
    statement = (
        "import numpy as np, pipeline\n"
        "rng = np.random.default_rng(0)\n"
        "src = rng.normal(size=(2, 80, 80))\n"
        "for method in pipeline.METHODS:\n"
        "    pipeline.estimate_kernels(src, src, kernel_size=5, method=method)"
    )
    assert loaded_after(statement) == []


def test_every_package_and_module_says_what_it_holds():
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path.relative_to(PACKAGE.parent)} has no module docstring"
