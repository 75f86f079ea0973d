"""The benchmarks' timing method (experiments/_timing.py), on a fake clock: timed calls, rotating rounds and the
median of same-round ratios, which cancels slow rounds of a shared machine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_timing", Path(__file__).resolve().parents[1] / "experiments" / "_timing.py"
)
timing = sys.modules.setdefault("_timing", importlib.util.module_from_spec(_spec))
if not hasattr(timing, "timed"):
    _spec.loader.exec_module(timing)


class FakeClock:
    """A clock that only moves when a fake workload says so: ``work(seconds)`` advances it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> None:
        self.now += seconds


def test_timed_is_the_mean_seconds_per_call_and_returns_the_last_result():
    clock, calls = FakeClock(), []

    def fn():
        calls.append(None)
        clock.work(0.5 * len(calls))  # 0.5, 1.0, 1.5 s
        return len(calls)

    out = timing.timed(fn, 3, timer=clock)
    assert out.seconds == pytest.approx(1.0) and out.result == 3
    synced = []
    timing.timed(lambda: clock.work(1.0), sync=lambda: synced.append(clock()), timer=clock)
    assert synced == [103.0, 104.0]  # before the clock starts and before it stops
    with pytest.raises(ValueError):
        timing.timed(fn, 0, timer=clock)


def test_rotations_run_every_item_once_per_round_starting_one_further_each_round():
    assert list(timing.rotations("abc", 4)) == [
        (0, ["a", "b", "c"]), (1, ["b", "c", "a"]), (2, ["c", "a", "b"]), (3, ["a", "b", "c"]),
    ]


def test_same_round_ratio_is_the_median_of_per_round_ratios():
    assert timing.same_round_ratios([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == [2.0, 3.0, 1.0]
    assert timing.same_round_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == 2.0
    with pytest.raises(ValueError, match="one value per round"):
        timing.same_round_ratio([1.0, 2.0], [1.0])


def test_interleaved_same_round_ratios_cancel_slow_rounds():
    # variant "new" does 0.8 of the work of "old"; the shared machine is 1x, 3x, 1x, 3x, 3x slower by round
    clock, work, slowdown = FakeClock(), {"old": 1.0, "new": 0.8}, [1.0, 3.0, 1.0, 3.0, 3.0]
    times = {name: [] for name in work}
    for r, order in timing.rotations(list(work), len(slowdown)):
        for name in order:
            times[name].append(timing.timed(lambda: clock.work(work[name] * slowdown[r]), timer=clock).seconds)
    assert times["old"] == pytest.approx([1.0, 3.0, 1.0, 3.0, 3.0])
    assert times["new"] == pytest.approx([0.8, 2.4, 0.8, 2.4, 2.4])
    assert timing.same_round_ratio(times["new"], times["old"]) == pytest.approx(0.8)


def test_stopwatch_measures_a_block_and_elapsed_while_running():
    clock = FakeClock()
    with timing.Stopwatch(timer=clock) as watch:
        clock.work(2.0)
        assert watch.elapsed() == pytest.approx(2.0)
        clock.work(1.5)
    clock.work(10.0)
    assert watch.seconds == pytest.approx(3.5)


def test_environment_header_names_cpu_torch_threads_load_and_omp_policy():
    env = timing.environment()
    assert {"cpu", "torch", "threads", "load_average", "omp_wait_policy", "omp_wait_policy_source"} <= set(env)
    head = timing.header(env)
    assert env["torch"] in head and f"{env['threads']} threads" in head and "OMP_WAIT_POLICY=" in head
