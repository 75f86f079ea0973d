"""Argument builders several verbs share: ``-c FILE`` + ``key=value`` overrides, and ``--overwrite``."""

from __future__ import annotations

import argparse


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], help="YAML config file (repeatable, merged in order)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.block_length=8")


def train_args(p):
    config_args(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the blockdiff run in trainer.out_dir (a folder holding anything else is never deleted)",
    )
