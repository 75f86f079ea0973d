"""The BD3-LM block-length ordering check, an experiment's hypothesis (``experiments/block_length/ordering.py``),
not a library function: checked on hand-made report rows, and passed to ``report`` as one of its ``checks``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ordering():
    spec = importlib.util.spec_from_file_location(
        "block_length_ordering", ROOT / "experiments" / "block_length" / "ordering.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(block_length, seed, ppl, variant="loglinear U[0,1]"):
    return {"variant": variant, "block_length": block_length, "seed": seed, "ppl": ppl, "max_seq_len": 64}


def test_ordering_holds_and_counts_seeds(ordering):
    rows = [_row(l, s, ppl + s) for l, ppl in [(1, 10.0), (4, 12.0), (16, 14.0), (64, 15.0)] for s in (0, 1)]
    rows.append(_row(4, 0, 1.0, variant="clipped U[0.3,0.8]"))  # other variants are not part of the chain
    line = ordering.ordering_check(rows)
    assert line.startswith("BD3-LM ordering (mean PPL ± sd, log-linear) HOLDS: L'=1: 10.50 ± 0.71 ≤ L'=4: 12.50")
    assert "L'=16 < L'=64 in 2/2 seeds" in line


def test_ordering_fails_and_no_runs(ordering):
    line = ordering.ordering_check([_row(1, 0, 20.0), _row(4, 0, 12.0)])
    assert "does NOT hold" in line and "L'=1 < L'=4 in 0/1 seeds" in line
    assert (
        ordering.ordering_check([_row(4, 0, 1.0, variant="mixture 1:0.5/4:0.5")])
        == "ordering check: no log-linear runs"
    )
