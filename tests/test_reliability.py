"""Reliability: exact resume, checkpoints that cannot hurt, NaN and Ctrl-C stops, multi-process training.

Every run here is tiny (hidden 32, 2 layers, context 32, byte tokenizer, a ~12-window corpus so one
epoch is 3 steps and resumes land mid-epoch and across epoch boundaries), on CPU in fp32.
Faults are injected by wrapping ``BlockDiffusionModule.training_step`` (kill, NaN, Ctrl-C at step k)
or by damaging files; DDP runs two real processes under ``torchrun`` (gloo).
"""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockdiff.cli import main
from blockdiff.config import ConfigError, load_config
from blockdiff.training.callbacks import NonFiniteLoss, TrainingInterrupted
from blockdiff.training.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from blockdiff.training.lightning_module import BlockDiffusionModule
from blockdiff.training.resume import resolve_resume
from blockdiff.training.train import train

N_STEPS = 8
TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32", "data.batch_size=4",
    "data.tokenizer=bytes", "data.val_fraction=0.2", "trainer.max_minutes=null", "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu", f"trainer.max_steps={N_STEPS}", "trainer.val_every_n_steps=3",
    "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
]


class Killed(Exception):
    """Stands for the process dying at a given step."""


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(private_datasets_cache):
    yield


def config(corpus: Path, run: Path, *extra: str):
    return load_config([], [*TINY, f"data.source={corpus}", f"trainer.out_dir={run}", *extra])


def at_step(monkeypatch, step: int, action) -> None:
    """Run ``action(module, loss)`` in the training step taken at ``global_step == step``; it may replace the loss."""
    original = BlockDiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step == step:
            loss = action(self, loss)
        return loss

    monkeypatch.setattr(BlockDiffusionModule, "training_step", training_step)


def kill(module, loss):
    raise Killed


def read_log(run: Path) -> list[tuple[int, str, float]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return sorted(
            (int(row["step"]), key, float(row[key]))
            for row in csv.DictReader(f) for key in ("train/loss", "val/nll") if row.get(key)
        )


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    raw_a = load_checkpoint(a / "checkpoints" / "last.ckpt")["current_model_state"]  # non-EMA weights
    raw_b = load_checkpoint(b / "checkpoints" / "last.ckpt")["current_model_state"]
    for name in raw_a:
        assert torch.equal(raw_a[name], raw_b[name]), name


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train(config(corpus, run), progress=False)
    return run


# -- (1) kill and resume ---------------------------------------------------------------------------------

# 3 steps per epoch: the last checkpoint (step 4 / 6) is mid-epoch / at its end
@pytest.mark.parametrize("kill_at", [5, 7])
def test_kill_and_resume_reproduces_the_uninterrupted_run(straight, corpus, tmp_path, monkeypatch, kill_at):
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        at_step(mp, kill_at, kill)
        with pytest.raises(Killed):
            train(config(corpus, run), progress=False)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == kill_at - 1
    assert not (run / "model").exists()

    result = train(config(corpus, run), progress=False, resume=run)
    assert result.steps == N_STEPS
    assert_same_weights(straight, run)
    assert read_log(run) == read_log(straight)  # the same loss curve, logged once per step


def test_killed_while_exporting_resume_finishes_the_run(straight, corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr("blockdiff.training.train.export_model", lambda *args, **kwargs: kill(None, None))
        with pytest.raises(Killed):
            train(config(corpus, run), progress=False)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == N_STEPS
    train(config(corpus, run), progress=False, resume=run)  # nothing left to train: validate and export
    assert_same_weights(straight, run)  # the EMA weights, as the uninterrupted run exported them
    assert read_log(run) == read_log(straight)


def test_ctrl_c_writes_a_resumable_checkpoint_and_resume_is_exact(straight, corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def ctrl_c(module, loss):
        signal.raise_signal(signal.SIGINT)  # what the terminal sends; the step still completes
        return loss

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with monkeypatch.context() as mp:
        at_step(mp, 2, ctrl_c)
        with pytest.raises(TrainingInterrupted, match="--resume"):
            train(config(corpus, run), progress=False)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3  # saved after step 3, not 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back

    assert main(["train", "--resume", str(run), "trainer.max_minutes=null"]) == 0
    assert_same_weights(straight, run)
    assert read_log(run) == read_log(straight)


def test_the_last_step_is_checkpointed_and_a_run_can_be_extended(corpus, tmp_path):
    # 7 steps (not a multiple of checkpoint_every_n_steps=2), then resumed to 9, equals 9 steps straight
    # (constant LR after warm-up, so the schedule does not depend on max_steps).
    constant = ["optim.lr_schedule=constant", "trainer.val_every_n_steps=100"]
    extended, straight9 = tmp_path / "extended", tmp_path / "straight9"
    train(config(corpus, extended, *constant, "trainer.max_steps=7"), progress=False)
    assert load_checkpoint(extended / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert main(["train", "--resume", str(extended), "trainer.max_steps=9"]) == 0
    train(config(corpus, straight9, *constant, "trainer.max_steps=9"), progress=False)
    assert_same_weights(straight9, extended)


def val_steps(run: Path) -> list[int]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("val/nll")]


def test_resume_keeps_each_final_validation_row_once(corpus, tmp_path):
    """issue 20: a resume kept only rows before its checkpoint's step, dropping the previous command's final
    validation (logged at that step); a resume at max_steps logged the same validation a second time."""
    run = tmp_path / "run"
    once = ["trainer.val_every_n_steps=100", "trainer.checkpoint_every_n_steps=4"]
    train(config(corpus, run, *once, "trainer.max_steps=3"), progress=False)
    assert val_steps(run) == [3]
    train(config(corpus, run, *once, "trainer.max_steps=5"), progress=False, resume=run)
    assert val_steps(run) == [3, 5]  # the step-3 row of the first command is kept
    train(config(corpus, run, *once, "trainer.max_steps=5"), progress=False, resume=run)
    assert val_steps(run) == [3, 5]  # at max_steps: validated again, logged once
    in_fit = tmp_path / "in_fit"  # the last validation ran inside fit (val_every_n_steps divides max_steps)
    train(config(corpus, in_fit, "trainer.val_every_n_steps=3", "trainer.max_steps=3"), progress=False)
    train(config(corpus, in_fit, "trainer.val_every_n_steps=3", "trainer.max_steps=3"), progress=False, resume=in_fit)
    assert val_steps(in_fit) == [3]


def test_resume_refuses_a_changed_model(straight, corpus, tmp_path):
    with pytest.raises(ConfigError, match="model"):
        train(config(corpus, straight, "model.block_length=8"), progress=False, resume=straight)


# -- (2) damaged checkpoints ------------------------------------------------------------------------------


def test_truncated_checkpoint_is_named_and_the_previous_one_still_loads(straight, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml",):
        (run / name).write_bytes((straight / name).read_bytes())
    last, prev = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "prev.ckpt"
    data = (straight / "checkpoints" / "last.ckpt").read_bytes()
    prev.write_bytes((straight / "checkpoints" / "prev.ckpt").read_bytes())
    last.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)
    message = str(info.value)
    assert str(last) in message and "truncated or corrupted" in message and str(prev) in message
    assert load_checkpoint(prev)["global_step"] == 6

    with pytest.raises(CheckpointError, match="truncated"):  # a named file is never swapped silently
        resolve_resume(last)
    point = resolve_resume(run)  # a run directory falls back, and says so
    assert point.checkpoint == prev and point.run_dir == run and str(last) in point.warnings[0] and point.fell_back

    assert main(["train", "--resume", str(last)]) == 2
    out = "".join(capsys.readouterr().err.split())  # the console wraps long paths
    assert str(last) in out and "truncated" in out and "Traceback" not in out


def test_garbage_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x00\x01 not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)


# -- (3) a checkpoint that would run code -----------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling calls Path.touch(marker): stands for arbitrary code
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickled_code_object_is_refused(straight, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"]["evil"] = _RunsCode(str(marker))
    evil = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save(checkpoint, evil)
    (tmp_path / "run" / "config.yaml").write_bytes((straight / "config.yaml").read_bytes())

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert main(["train", "--resume", str(evil.parent.parent)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


# -- (6) NaN, disk full ----------------------------------------------------------------------------------


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    at_step(monkeypatch, 5, lambda module, loss: loss * float("nan"))
    with pytest.raises(NonFiniteLoss, match="last good checkpoint") as info:
        train(config(corpus, run), progress=False)
    assert "step 5" in str(info.value)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    for state in (checkpoint["state_dict"], checkpoint["current_model_state"]):
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert not (run / "model").exists()


@pytest.mark.parametrize("where", ["state_dict", "current_model_state", "optimizer_states"])
def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path, where):
    path = tmp_path / "last.ckpt"
    good = {
        "state_dict": {"w": torch.ones(2)},
        "global_step": 1,
        "callbacks": {"kth_value": torch.tensor(float("inf"))},
    }
    SafeCheckpointIO().save_checkpoint(good, path)  # an inf score outside the weights is fine
    bad = {
        **good,
        where: [{"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}]
        if where == "optimizer_states"
        else {"w": torch.tensor([1.0, float("nan")])},
    }
    with pytest.raises(CheckpointError, match="NaN"):
        SafeCheckpointIO().save_checkpoint(bad, path)
    assert load_checkpoint(path)["global_step"] == 1 and not (tmp_path / "prev.ckpt").exists()


def test_disk_full_during_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 4096)  # part of the file gets out, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("blockdiff.training.checkpoint.torch.save", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
    assert str(path) in str(info.value) and "intact" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


# -- (4) two processes (DDP, gloo) -------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process_and_only_rank_zero_writes(corpus, tmp_path):
    # noise.beta = noise.omega = 1 masks every token: the loss is then a deterministic function of the
    # weights and the data, so the two runs differ only in how the global batch of 4 is computed
    # (one process, or two processes of 2 with gradients averaged by DDP).
    common = [
        "noise.beta=1",
        "noise.omega=1",
        "trainer.max_steps=4",
        "trainer.val_every_n_steps=4",
        "optim.ema_decay=0",
        "data.val_fraction=0.2",
    ]
    one = tmp_path / "one"
    single = train(config(corpus, one, *common), progress=False)

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "blockdiff.cli",
        "train",
        *TINY,
        *common,
        f"data.source={corpus}",
        f"trainer.out_dir={two}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w1, w2 = weights(one), weights(two)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    val = [v for _, key, v in read_log(two) if key == "val/nll"]
    assert val[-1] == pytest.approx(single.metrics["val/nll"], rel=1e-4)
    # one process wrote: one log file with one row per logged step, one checkpoint pair, one model
    steps = [s for s, key, _ in read_log(two) if key == "train/loss"]
    assert steps == sorted(set(steps)) == list(range(4))
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last.ckpt", "prev.ckpt"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "logs", "model", "tokenizer"]


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_before_writing(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, f"data.source={corpus}", f"trainer.out_dir={run}", "data.batch_size=5", "trainer.devices=2"]
    assert main(args) == 2
    assert "data.batch_size=5" in " ".join(capsys.readouterr().err.split()) and not run.exists()


def test_a_yaml_config_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'model:\n  block_length: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([evil])
    assert not marker.exists()
