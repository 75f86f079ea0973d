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
    if args.action == "keys" and args.markdown:  # the table in docs/configuration.md
        print("| key | default | meaning |\n|---|---|---|")
        print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in describe_keys()))
        return
    if args.action == "keys":  # every row whole, also when piped (`blockdiff config keys | grep lr`)
        tables.print_table(console, ["key", "default", "meaning"], describe_keys(), title="config keys")
        return
    cfg = load_config(args.config, args.overrides)
    if args.action == "show":
        sys.stdout.write(to_yaml(cfg))  # plain text: must stay loadable YAML when redirected
    else:
        console.print(Text("config OK", style="green"))


def add_arguments(p):
    p.add_argument("action", choices=["show", "validate", "keys"])
    p.add_argument("--markdown", action="store_true", help="keys: print a markdown table")
    options.config_args(p)
