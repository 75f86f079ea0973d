"""Fault injection against real ``blockdiff train`` processes: SIGKILL, Ctrl-C and a file-size limit.

    python experiments/faults.py [--kills 5] [--out experiments/results/faults]

Every run is a tiny model (hidden 32, 2 layers, context 32, byte tokenizer) on CPU, fp32. The script:

1. trains one run straight through (the reference);
2. ``kill``: starts the same run, sends SIGKILL at a random moment (possibly in the middle of a
   checkpoint write), checks ``checkpoints/`` (``last.ckpt`` loads, no stray temp file), resumes it with
   ``blockdiff train --resume`` and compares final weights and the logged loss curve with the reference;
3. ``sigint`` / ``sigterm``: sends SIGINT (Ctrl-C) or SIGTERM once, expects a resumable ``last.ckpt``
   written at the interrupted step and a message saying how to resume, resumes and compares;
4. ``fsize``: runs under ``RLIMIT_FSIZE`` (files over 64 KiB cannot be written, as on a full disk), expects
   exit status 2, a message naming the checkpoint, and no partial checkpoint left behind.

Writes ``results.json`` and ``table.md`` to ``--out`` (see ``_report.py``).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import results_dir, write_report
from _timing import environment, header
from safetensors.torch import load_file

from blockdiff.training.checkpoint import CheckpointError, load_checkpoint

STEPS = 100
ARGS = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32", "data.batch_size=4",
    "data.tokenizer=bytes", "data.val_fraction=0.1", "trainer.max_minutes=null", "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu", f"trainer.max_steps={STEPS}", "trainer.val_every_n_steps=20",
    "trainer.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def blockdiff(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blockdiff.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def train_args(corpus: Path, run: Path) -> list[str]:
    return ["train", *ARGS, f"data.source={corpus}", f"trainer.out_dir={run}"]


def log_curve(run: Path) -> list[tuple[int, str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return sorted(
            (int(r["step"]), k, r[k]) for r in csv.DictReader(f) for k in ("train/loss", "val/nll") if r.get(k)
        )


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def checkpoint_state(run: Path) -> str:
    """What is in checkpoints/ after the fault: which files, the step of last.ckpt, or why it does not load."""
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if "last.ckpt" not in names:
        return f"files {names}"
    try:
        step = load_checkpoint(folder / "last.ckpt")["global_step"]
    except CheckpointError as err:
        return f"last.ckpt unreadable: {err}"
    return f"last.ckpt loads (step {step}); files {names}"


def resume_and_compare(reference: Path, run: Path) -> tuple[str, str]:
    proc = blockdiff("train", "--resume", str(run))
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        return f"resume failed ({proc.returncode}): {out[-400:]}", ""
    diff = max_weight_diff(reference, run)
    same_log = log_curve(reference) == log_curve(run)
    return (
        f"resumed to step {STEPS}",
        f"max weight diff {diff:.1e}; loss curve {'identical' if same_log else 'DIFFERENT'}",
    )


def fault_kill(corpus: Path, reference: Path, tmp: Path, trial: int, rng: random.Random) -> list[str]:
    run = tmp / f"kill{trial}"
    proc = blockdiff(*train_args(corpus, run))
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:  # after the first checkpoint
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 2.5))
    if proc.poll() is not None:
        return [f"SIGKILL (trial {trial})", "run finished before the kill", "", "", "`python experiments/faults.py`"]
    last_logged = _last_logged_step(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = checkpoint_state(run)
    resumed, compared = resume_and_compare(reference, run)
    return [
        f"SIGKILL, trial {trial} (log on disk reached step {last_logged})",
        state,
        resumed,
        compared,
        "`python experiments/faults.py`",
    ]


def _last_logged_step(run: Path) -> str:
    try:
        return str(max(s for s, _, _ in log_curve(run)))
    except (FileNotFoundError, ValueError):
        return "?"


def fault_signal(corpus: Path, reference: Path, tmp: Path, sig: signal.Signals, label: str) -> list[str]:
    run = tmp / sig.name
    proc = blockdiff(*train_args(corpus, run))
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=600)
    said = "says how to resume" if "--resume" in out else "no resume hint"
    state = checkpoint_state(run)
    resumed, compared = resume_and_compare(reference, run)
    return [label, f"exit {proc.returncode}, {said}; {state}", resumed, compared, "`python experiments/faults.py`"]


def fault_fsize(corpus: Path, tmp: Path) -> list[str]:
    run = tmp / "fsize"

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = blockdiff(*train_args(corpus, run), preexec_fn=limit_files)
    out, _ = proc.communicate(timeout=600)
    message = " ".join(out.split())
    named = (
        "names the checkpoint"
        if "last.ckpt" in message and "could not write checkpoint" in message
        else f"message: {message[-300:]}"
    )
    return [
        "no space for the checkpoint (RLIMIT_FSIZE 64 KiB)",
        f"exit {proc.returncode}, {named}; {checkpoint_state(run)}",
        "",
        "",
        "`python experiments/faults.py`",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL trials at random moments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        corpus.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 40)
        reference = tmp / "reference"
        proc = blockdiff(*train_args(corpus, reference))
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        rows = [fault_kill(corpus, reference, tmp, i, rng) for i in range(args.kills)]
        rows.append(fault_signal(corpus, reference, tmp, signal.SIGINT, "Ctrl-C (SIGINT) once"))
        rows.append(fault_signal(corpus, reference, tmp, signal.SIGTERM, "SIGTERM (preemption, scheduler time limit)"))
        rows.append(fault_fsize(corpus, tmp))
    columns = ["fault", "state after the fault", "resume", "vs. uninterrupted run", "reproduce"]
    for row in rows:
        print(" | ".join(row), flush=True)
    write_report(
        args.out,
        {"environment": environment(), "rows": rows, "columns": columns},
        f"{header(environment())}\n{STEPS} steps, checkpoint every 5",
        columns,
        rows,
    )


if __name__ == "__main__":
    main()
