"""The layers stay layers: every import is allowed by its layer's row of docs/design.md §11, and the light layers
never pull in Lightning or ``datasets``.

The rows are read from the table in docs/design.md §11 ("may import": a comma-separated list of layers, ``leaves``
for the leaves ``errors``/``files``/``tables``/``config``, ``everything`` for all): a module may import its own layer
and the layers its row names, nothing else. The package root (``from blockdiff import X``, the public API) is no
row's layer, so only ``everything`` (the CLI) may import it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_tiny_cli_run

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockdiff"
DESIGN = ROOT / "docs" / "design.md"
HEAVY = ("lightning", "pytorch_lightning", "datasets")  # training / corpus stack: never needed to load or sample


def read_layer_table(design: str) -> dict[str, set[str]]:
    """``{layer: layers it may import}`` from the table of docs/design.md §11: its first cell names the layer's
    folders and files in backticks (core/, errors.py), its third cell ("may import") lists layers,
    ``leaves`` (the first row's layers) or ``everything``. An unknown word in a cell fails: the table must stay
    readable by this test."""
    section = design.split("\n## 11.", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    layers = [[re.sub(r"(\.py|/)$", "", name) for name in re.findall(r"`([^`]+)`", row[0])] for row in rows]
    leaves, everything = set(layers[0]), {name for names in layers for name in names} | {"__init__"}
    table = {}
    for names, row in zip(layers, rows):
        allowed = set()
        for word in (w.strip() for w in row[2].split(",")):
            if word == "leaves":
                allowed |= leaves
            elif word == "everything":
                allowed |= everything
            elif word in everything:
                allowed.add(word)
            else:
                raise AssertionError(f"docs/design.md §11, row {names}: {word!r} in 'may import' is not a layer")
        table.update({name: allowed for name in names})
    return table


LAYER_ROWS = read_layer_table(DESIGN.read_text(encoding="utf-8"))

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


def _part(module: str, package: Path = PACKAGE) -> str:
    """The layer a ``blockdiff.X...`` module (or a name imported from the package root) belongs to."""
    name = module.split(".")[1] if "." in module else "__init__"
    is_module = (package / name).is_dir() or (package / f"{name}.py").is_file()
    return name if is_module else "__init__"


def _blockdiff_imports(path: Path, root: Path = PACKAGE):
    """``(line, module)`` for every import of ``blockdiff...`` in ``path``, module-level and inside functions."""
    package = ".".join(("blockdiff", *path.relative_to(root).parent.parts))
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


def layer_violations(package: Path, rows: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """``(where, module, why)`` for every ``blockdiff`` import in ``package`` that its layer's row does not allow."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":  # the package root re-exports the public API; the sample test keeps it light
            continue
        if part not in rows:
            out.append((f"blockdiff/{rel}", "", f"{part!r} is in no row of docs/design.md §11: add its row"))
            continue
        for line, module in _blockdiff_imports(path, package):
            other = _part(module, package)
            if other != part and other not in rows[part]:
                out.append((f"blockdiff/{rel}:{line}", module, f"{part} may not import {other}"))
    return out


def test_the_layer_table_is_read_from_design_md():
    assert LAYER_ROWS["core"] == {"errors", "files", "tables", "config"}
    assert LAYER_ROWS["data"] == LAYER_ROWS["core"]  # data may not import modeling (distill lives in training/)
    assert {"data", "modeling", "sampling", "core"} <= LAYER_ROWS["training"] and "evaluation" not in LAYER_ROWS[
        "training"]
    assert "__init__" in LAYER_ROWS["cli"] and "__init__" not in LAYER_ROWS["sweeps"]


def test_a_breach_of_a_layers_row_is_reported(tmp_path):
    package = tmp_path / "blockdiff"
    for folder, source in {"core": "", "data": "from blockdiff.errors import UsageError\n",
                           "modeling": "import blockdiff.core.a\nfrom ..data import a\n"}.items():
        (package / folder).mkdir(parents=True)
        (package / folder / "a.py").write_text(source)
    (package / "errors.py").write_text("class UsageError(Exception): ...\n")
    assert layer_violations(package, LAYER_ROWS) == [  # modeling may not import data (relative imports resolved)
        ("blockdiff/modeling/a.py:2", "blockdiff.data", "modeling may not import data")
    ]
    (package / "modeling" / "a.py").write_text("import blockdiff.core.a\n")
    assert layer_violations(package, LAYER_ROWS) == []
    (package / "data" / "b.py").write_text("def f():\n    from blockdiff.modeling.a import g\n")  # up a row
    assert layer_violations(package, LAYER_ROWS) == [
        ("blockdiff/data/b.py:2", "blockdiff.modeling.a", "data may not import modeling")
    ]


def test_every_import_inside_blockdiff_is_allowed_by_its_layers_row():
    found, violations = set(), []
    for where, module, why in layer_violations(PACKAGE, LAYER_ROWS):
        key = (where.split(":")[0].removeprefix("blockdiff/"), module)
        if key in KNOWN_VIOLATIONS:
            found.add(key)
        else:
            violations.append(f"{where} imports {module}: {why}")
    assert not violations, "imports their layer's row of docs/design.md §11 does not allow:\n" + "\n".join(violations)
    assert found == KNOWN_VIOLATIONS, f"fixed, so remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - found)}"


def test_the_network_does_not_know_the_run_config():
    imports = {module for _, module in _blockdiff_imports(PACKAGE / "modeling" / "model.py")}
    assert "blockdiff.config" not in imports
