"""``blockdiff config``: show, validate or list the config keys."""

from __future__ import annotations

import sys

from rich.text import Text

from blockdiff import tables
from blockdiff.cli import options
from blockdiff.cli.render import console
from blockdiff.config import describe_keys, load_config, to_yaml


def run(args) -> None:
    """Show the resolved config (`show`), only check it (`validate`), or list every key with its meaning (`keys`)."""
    if args.action == "keys" and args.markdown:  # the tables in docs/configuration.md
        print("| key | default | meaning |\n|---|---|---|")
        print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in describe_keys()))
        print(f"\n{GENERATION_TITLE}:\n\n| setting | default | meaning |\n|---|---|---|")
        print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in generation_keys()))
        return
    if args.action == "keys":  # every row whole, also when piped (`blockdiff config keys | grep lr`)
        tables.print_table(console, ["key", "default", "meaning"], describe_keys(), title="config keys")
        tables.print_table(console, ["setting", "default", "meaning"], generation_keys(), title=GENERATION_TITLE)
        return
    cfg = load_config(args.config, args.overrides)
    if args.action == "show":
        sys.stdout.write(to_yaml(cfg))  # plain text: must stay loadable YAML when redirected
    else:
        console.print(Text("config OK", style="green"))


GENERATION_TITLE = (
    "generation settings of every registered sampler and drafter (model.generate / speculative_generate NAME=..., "
    "blockdiff sample --NAME, serve request fields; a sampler's are sweep sample.grid keys too)"
)


def generation_keys() -> list[tuple[str, str, str]]:
    """``(setting, default, help)`` for every knob of the sampler and drafter registries, read when asked (so a
    sampler or drafter registered by a plugin is listed too)."""
    from blockdiff.sampling.samplers.registry import all_knobs

    return [(k.name, str(k.default), f"{k.sampler} {k.family}: {k.doc}") for k in all_knobs().values()]


def add_arguments(p):
    p.add_argument("action", choices=["show", "validate", "keys"])
    p.add_argument("--markdown", action="store_true", help="keys: print a markdown table")
    options.config_args(p)
