"""Local data for the shipped lm-eval tasks: the JSON-lines files next to this module, read without the hub.

lm-eval calls these through ``custom_dataset: !function tasks.NAME`` in the task YAMLs; the rows were written by
``experiments/make_lm_eval_tasks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc(**kwargs) -> datasets.DatasetDict:
    return _split("mc")


def gen(**kwargs) -> datasets.DatasetDict:
    return _split("gen")


def ppl(**kwargs) -> datasets.DatasetDict:
    return _split("ppl")
