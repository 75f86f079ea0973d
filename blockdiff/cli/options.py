"""Argument builders several verbs share: ``-c FILE`` + ``key=value`` overrides, ``--overwrite``, and speculative
decoding's ``--drafter`` with one flag per drafter knob (``sample`` and ``serve``)."""

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


def add_drafter_flags(p) -> None:
    """``--drafter`` (the registered names) and one flag per drafter knob, read from the drafter registry when the
    parser is built (``blockdiff/sampling/speculative/registry.py``; imported here, as the samplers' are)."""
    from blockdiff.sampling.speculative.registry import drafter_knobs, drafter_names

    p.add_argument("--drafter", choices=drafter_names(),
                   help="with --speculative: " + ", ".join(drafter_names()) + " (default: fused for a model that "
                   "verifies itself, else two_model; for a plain decoder hybrid where a drafter ships, else lookup)")
    for k in drafter_knobs().values():
        default = "" if k.default is None else f" (default {k.default})"
        kind = true_or_false if k.type is bool else k.type
        p.add_argument(f"--{k.name.replace('_', '-')}", type=kind, help=f"{k.sampler} drafter: {k.doc}{default}")


def drafter_settings(args) -> dict:
    """The drafter knobs given as flags (``add_drafter_flags``), by name; those left out are not in it."""
    from blockdiff.sampling.speculative.registry import drafter_knobs

    return {name: getattr(args, name) for name in drafter_knobs() if getattr(args, name, None) is not None}


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)  # argparse says: invalid true_or_false value
    return text.lower() == "true"
