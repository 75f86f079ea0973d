"""``blockdiff plot``: figures of runs and traces (work in progress)."""


def run(args) -> None:
    """Plot runs."""
    raise NotImplementedError


def add_arguments(p):
    pass
