"""How every script under experiments/ times things: one clock, timed calls, round-robin rounds, same-round ratios and
the environment header (docs/benchmarks.md, "Method").

The method, written once:

* **Warm-up, then timed calls.** ``timed(fn, repeats)`` runs ``fn`` ``repeats`` times back to back and returns the
  mean seconds per call and the last call's result (a benchmark usually needs the output it timed: tokens, NFE).
  Warm-up is an untimed call the script makes first (``warm_up``).
* **Interleaved rounds.** The machines these run on are shared and noisy, so the variants being compared run one
  after the other inside each round, the starting variant rotating every round (``rotations``), never all the
  rounds of one variant and then all of the next.
* **Same-round ratios.** A comparison ("x HF", "BD/AR", "after/before") is the median over rounds of the ratio taken
  *within* a round (``same_round_ratio``): a slow round slows both sides and cancels, where the ratio of two medians
  would not.
* **The environment header** (``environment``, ``header``): CPU model, torch version, threads, load average (1, 5,
  15 min), ``OMP_WAIT_POLICY`` and who set it, the command line. Results and their header go under
  ``experiments/results/<script>/`` (``_report.py``).

Importing this module before torch sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment gives it (libgomp's
idle threads then sleep instead of spinning; spinning makes timings on a shared machine erratic). It must be the
first import of a script for that to take effect; ``environment()`` records whether it did.

``torch.utils.benchmark.Timer`` is not used: it discards the timed call's result (which the benchmarks need) and
disables the garbage collector while it times; its one idea that matters here, synchronising CUDA before reading
the clock, is ``timed``'s ``sync`` argument.

Imported by the scripts as ``import _timing`` / ``from _timing import ...`` (they run as ``python experiments/NAME.py``,
which puts this folder on ``sys.path``; a script in a subfolder adds ``experiments/`` itself).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Iterator, Sequence, TypeVar

_OMP_GIVEN = os.environ.get("OMP_WAIT_POLICY")  # None: this module sets it (when torch has not loaded yet)
_TORCH_LOADED_FIRST = "torch" in sys.modules  # then setting the variable now would change nothing
if not _TORCH_LOADED_FIRST:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = [
    "Stopwatch", "Timed", "clock", "cpu_model", "environment", "header", "rotations", "same_round_ratio",
    "same_round_ratios", "timed", "warm_up",
]

T = TypeVar("T")
clock: Callable[[], float] = perf_counter  # the one clock of experiments/ (seconds, monotonic)


@dataclass
class Timed:
    """What ``timed`` returns: mean ``seconds`` per call and the ``result`` of the last call."""

    seconds: float
    result: Any


def timed(fn: Callable[[], T], repeats: int = 1, *, sync: Callable[[], None] | None = None,
          timer: Callable[[], float] | None = None) -> Timed:
    """Run ``fn`` ``repeats`` times back to back: ``Timed(mean seconds per call, last result)``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock is read at both ends, so queued device work is
    inside the interval; ``timer`` replaces the module's ``clock`` (tests pass a fake one)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    read = timer or clock
    if sync is not None:
        sync()
    start = read()
    for _ in range(repeats):
        result = fn()
    if sync is not None:
        sync()
    return Timed((read() - start) / repeats, result)


def warm_up(fns: Sequence[Callable[[], Any]] | Callable[[], Any], calls: int = 1) -> None:
    """Call each of ``fns`` ``calls`` times, untimed (first calls pay for allocation, caches and lazy imports)."""
    for fn in [fns] if callable(fns) else fns:
        for _ in range(calls):
            fn()


def rotations(items: Sequence[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """``(round, order)`` for each of ``rounds`` rounds: every item once per round, the first one rotating
    (round ``r`` starts at item ``r mod n``) so no item always runs first, right after a warm machine's idle pause."""
    items = list(items)
    for r in range(rounds):
        k = r % len(items) if items else 0
        yield r, items[k:] + items[:k]


def same_round_ratios(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """``values[r] / reference[r]`` for every round ``r`` (both measured in the same round)."""
    if len(values) != len(reference):
        raise ValueError(f"same-round ratios need one value per round on both sides, got {len(values)} and "
                         f"{len(reference)}")
    return [v / ref for v, ref in zip(values, reference)]


def same_round_ratio(values: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of ``values[r] / reference[r]``: the comparison every benchmark reports (a slow round
    slows both sides and cancels; the ratio of the two medians would not)."""
    ratios = same_round_ratios(values, reference)
    if not ratios:
        raise ValueError("same-round ratio of zero rounds")
    return statistics.median(ratios)


class Stopwatch:
    """Wall time of a ``with`` block (``seconds`` once it ends; ``elapsed()`` while it runs), e.g. a whole run, a
    request's time to first byte, a model load. For comparisons between variants use ``timed`` and rounds."""

    def __init__(self, timer: Callable[[], float] | None = None):
        self._clock = timer or clock
        self.start = self._clock()
        self.seconds: float | None = None

    def elapsed(self) -> float:
        """Seconds since the stopwatch started (it keeps running)."""
        return self._clock() - self.start

    def __enter__(self) -> "Stopwatch":
        self.start = self._clock()
        return self

    def __exit__(self, *_) -> None:
        self.seconds = self.elapsed()


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine() or "unknown"


def environment() -> dict:
    """The machine and settings a result was measured under (call it at the end of a run: the load average then
    covers the run): CPU, torch version and threads, load average, ``OMP_WAIT_POLICY`` and its source, command."""
    import torch

    omp = os.environ.get("OMP_WAIT_POLICY")
    if _OMP_GIVEN is not None:
        source = "from the environment"
    elif _TORCH_LOADED_FIRST:
        source = "not set: torch loaded before _timing" if omp is None else "set after torch loaded (no effect)"
    else:
        source = "set by _timing before torch loaded"
    return dict(
        cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        omp_wait_policy=omp, omp_wait_policy_source=source, python=platform.python_version(),
        command=shlex.join([sys.executable, *sys.argv]),
    )


def header(env: dict) -> str:
    """The environment as two lines, the first lines of every printed table and ``table.md``."""
    load = "n/a" if env.get("load_average") is None else " / ".join(f"{x:.2f}" for x in env["load_average"])
    gpu = f", GPU {env['cuda']}" if env.get("cuda") else ""
    return (f"CPU {env['cpu']}{gpu}; torch {env['torch']}, {env['threads']} threads; load average {load} (1/5/15 min); "
            f"OMP_WAIT_POLICY={env['omp_wait_policy']} ({env['omp_wait_policy_source']})\n"
            f"command: {env['command']}")
