"""The ``blockdiff`` command line: one module per verb, dispatched from one table (``main.py``)."""

from blockdiff.cli.app import main

__all__ = ["main"]
