"""The layers stay layers: imports only point down, and the light layers never pull in Lightning or ``datasets``.

Order (docs/design.md, "Layers"), lowest first: the leaves ``errors``/``files``/``tables``/``config``, then ``core``
< ``sampling`` < ``modeling`` < ``data`` < ``evaluation``, ``training`` and ``serving`` (siblings: none imports another)
< ``sweeps`` < the package root (the public API) < ``cli``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_tiny_cli_run

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockdiff"
HEAVY = ("lightning", "pytorch_lightning", "datasets")  # training / corpus stack: never needed to load or sample

LAYER = {
    "errors": 0, "files": 0, "tables": 0, "config": 0,  # leaves: they may import each other
    "core": 1, "sampling": 2, "modeling": 3, "data": 4, "evaluation": 5, "training": 5, "serving": 5,
    "sweeps": 6,
    "__init__": 7,  # ``from blockdiff import X`` for a name that is not a submodule: the public API
    "cli": 8,
}

# Imports that break the order today, each removed by the change that fixes it. Keep this list short and named.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # (file below blockdiff/, imported module); empty since issue 10


def _run_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_modeling_and_sampling_import_neither_lightning_nor_datasets(tmp_path):
    code = f"""
import importlib, json, pkgutil, sys
import blockdiff.core, blockdiff.modeling, blockdiff.sampling
for package in (blockdiff.core, blockdiff.modeling, blockdiff.sampling):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)  # every module of the three layers, not only their __init__
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    assert _run_python(code, tmp_path) == []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_cli_run(tmp_path_factory.mktemp("layering_run"))


def test_blockdiff_sample_on_a_run_imports_neither_lightning_nor_datasets(run_dir, tmp_path):
    code = f"""
import json, sys
from blockdiff.cli import main
rc = main(["sample", {str(run_dir)!r}, "--prompt", "The cat", "--max-new-tokens", "8"])
print(json.dumps({{"rc": rc, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    assert _run_python(code, tmp_path) == {"rc": 0, "heavy": []}


def _part(module: str) -> str:
    """The layer a ``blockdiff.X...`` module (or a name imported from the package root) belongs to."""
    name = module.split(".")[1] if "." in module else "__init__"
    is_module = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()
    return name if is_module else "__init__"


def _blockdiff_imports(path: Path):
    """``(line, module)`` for every import of ``blockdiff...`` in ``path``, module-level and inside functions."""
    package = ".".join(("blockdiff", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "blockdiff")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "blockdiff":  # from blockdiff import tables / __version__
                yield from ((node.lineno, f"blockdiff.{alias.name}") for alias in node.names)
            elif base.split(".")[0] == "blockdiff":
                yield node.lineno, base


def test_every_import_inside_blockdiff_points_down_the_layers():
    found, violations = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":  # the package root re-exports the public API; the sample test keeps it light
            continue
        assert part in LAYER, f"blockdiff/{rel}: {part!r} is in no layer; add it to LAYER (and to docs/design.md)"
        for line, module in _blockdiff_imports(path):
            other = _part(module)
            allowed = other == part or LAYER[other] < LAYER[part] or LAYER[other] == LAYER[part] == 0
            if allowed:
                continue
            if (str(rel), module) in KNOWN_VIOLATIONS:
                found.add((str(rel), module))
                continue
            violations.append(f"blockdiff/{rel}:{line} ({part}) imports {module} ({other})")
    assert not violations, "imports that point up (or sideways) the layers:\n" + "\n".join(violations)
    assert found == KNOWN_VIOLATIONS, f"fixed, so remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - found)}"


def test_the_network_does_not_know_the_run_config():
    imports = {module for _, module in _blockdiff_imports(PACKAGE / "modeling" / "model.py")}
    assert "blockdiff.config" not in imports
