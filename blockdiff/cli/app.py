"""``blockdiff`` command line: typed verbs dispatched from one table; ``--help`` comes from docstrings.

Each verb is one module of this package with ``run(args)`` (its docstring is the verb's help) and
``add_arguments(parser)``; adding a verb is one module and one line in ``COMMANDS``. Verb modules import their
heavy dependencies (torch, transformers, Lightning) inside functions, and only the chosen verb's arguments are
built, so ``blockdiff --help`` and ``blockdiff --version`` import none of them (``tests/test_cli_help.py``).

Config-taking verbs accept ``-c FILE`` (repeatable, merged in order) and trailing ``key=value`` overrides,
e.g. ``blockdiff train -c configs/shakespeare_small.yaml model.block_length=8``. Errors in the user's
input (config, files, corpus) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterable

from blockdiff.cli import (
    config,
    demo,
    distill,
    evaluate,
    export,
    finetune,
    plot,
    sample,
    serve,
    sweep,
    train,
    train_drafter,
    view,
)
from blockdiff.config import SEED_MAX
from blockdiff.errors import UsageError, UserError


@dataclass
class Verb:
    run: Callable
    add_arguments: Callable

    @classmethod
    def of(cls, module: ModuleType) -> "Verb":
        return cls(module.run, module.add_arguments)


COMMANDS: dict[str, Verb] = {
    name: Verb.of(module)
    for name, module in {
        "train": train,
        "finetune": finetune,
        "export": export,
        "eval": evaluate,
        "sample": sample,
        "config": config,
        "demo": demo,
        "sweep": sweep,
        "distill": distill,
        "train-drafter": train_drafter,
        "serve": serve,
        "view": view,
        "plot": plot,
    }.items()
}


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose errors (a bad flag value, a missing argument) are ``UsageError``s: one ``error:`` line
    on stderr and status 2 like every other user error, instead of a usage block and an exit from inside parsing."""

    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help` lists the arguments)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockdiff")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        from blockdiff import __version__

        return __version__


def build_parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every verb (each with its one-line summary); only the verbs in ``verbs`` (default: all) get
    their arguments, since building them may import what the verb needs (the sampler registry, hence torch)."""
    parser = _Parser(prog="blockdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"blockdiff {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True)
    chosen = set(COMMANDS if verbs is None else verbs)
    for name, verb in COMMANDS.items():
        doc = verb.run.__doc__.strip()
        verb_parser = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        if name in chosen:
            verb.add_arguments(verb_parser)
    return parser


def _verb_named(argv: list[str]) -> str | None:
    """The verb on the command line: its first word that is not a flag (``blockdiff`` itself takes no values)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(verbs=[v] if (v := _verb_named(words)) in COMMANDS else [])
    args, extra = parser.parse_known_args(argv)
    # argparse cannot give a trailing `key=value` list to a verb whose positionals were already matched
    # (`config validate -c FILE key=value`); such leftovers are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_shared_flags(args)
    args.command_line = ["blockdiff", *words]  # what the user typed (to repeat it)
    return args


def _check_shared_flags(args: argparse.Namespace) -> None:
    """Flags several verbs take, checked once before any work: ``--seed`` must be a seed every RNG accepts."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed {seed} is out of range: a seed is an integer from 0 to {SEED_MAX}")


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: no per-map progress bars or banner tips from the libraries."""
    import logging

    import transformers

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when (and if) a verb imports datasets
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _only_our_warnings():
    """While a verb runs, show blockdiff's own warnings and hide the libraries' (deprecation notices from
    transformers / torch / lightning, with their site-packages paths, are for those libraries' users, not
    ours). Scoped to the command, not set on import: code that imports blockdiff keeps its own filters.
    ``python -W ...`` / ``PYTHONWARNINGS`` (``sys.warnoptions``) still decide when given."""
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"blockdiff(\.|$)")
        yield


def main(argv: list[str] | None = None) -> int:
    with _only_our_warnings():
        try:
            args = _parse(argv)
            _quiet_libraries()
            COMMANDS[args.verb].run(args)
        except UserError as err:  # the one place user errors are caught: plain text, stderr, no markup
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
