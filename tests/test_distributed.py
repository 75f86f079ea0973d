"""Scaling past one process (docs/distributed.md): activation checkpointing with the block-diffusion mask, FSDP2 in
two real processes (``torchrun``, gloo) against one process, its exact resume and export, and what it refuses.

Tiny models (hidden 32, 2 layers, byte vocabulary, context 32) on CPU; the checkpointing comparison in fp64. The
multi-process runs use the all-masked noise (``noise.beta = noise.omega = 1``), so the loss is a deterministic
function of weights and data and a 2-process run can be compared with a 1-process one step by step.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockdiff.cli import main
from blockdiff.config import ConfigError, load_config
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.training.builders import build_model
from tests.conftest import random_tokens

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32",
              "data.tokenizer=bytes"]


def _loss_and_gradients(family: str, logit_shift: bool, checkpointing: bool):
    """One training step's loss, parameter gradients and the bytes autograd saved for the backward pass."""
    cfg = load_config([], [*TINY_MODEL, f"model.family={family}", f"model.logit_shift={logit_shift}",
                           f"model.gradient_checkpointing={checkpointing}"])
    torch.manual_seed(0)
    _, model = build_model(cfg, docs={"text": []})
    model = model.double().train()  # train mode: gpt2's dropout is on, so the recomputation must replay its RNG
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_diffusion_loss(model, random_tokens(2, 32) % 250, make_schedule("loglinear"), (1e-3, 1.0))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_activation_checkpointing_gives_identical_loss_and_gradients(family, logit_shift):
    loss, grads, saved = _loss_and_gradients(family, logit_shift, checkpointing=False)
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_gradients(family, logit_shift, checkpointing=True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-12, msg=name)
    assert saved_ckpt < 0.7 * saved  # the layers' activations were not kept: they were recomputed


# -- FSDP2 (trainer.strategy=fsdp) ---------------------------------------------------------------------------------
RUN = [*TINY_MODEL, "data.batch_size=4", "data.val_fraction=0.2", "trainer.max_minutes=null",
       "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2",
       "trainer.log_every_n_steps=1", "optim.warmup_steps=2", "optim.ema_decay=0", "noise.beta=1", "noise.omega=1",
       "optim.grad_clip=0.05"]  # clipping by the global norm acts (the first step's norm is about 0.7)
FSDP2 = ["trainer.devices=2", "trainer.strategy=fsdp"]


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(private_datasets_cache):
    yield


def _one_process(corpus: Path, run: Path, steps: int, *extra: str) -> None:
    args = ["train", *RUN, f"data.source={corpus}", f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
            f"trainer.out_dir={run}", *extra]
    assert main(args) == 0


def _two_processes(corpus: Path, run: Path, steps: int, *extra: str) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m blockdiff.cli train ...`` (gloo), as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "blockdiff.cli",
           "train", *RUN, *FSDP2, f"data.source={corpus}", f"trainer.max_steps={steps}",
           f"trainer.val_every_n_steps={steps}", f"trainer.out_dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def _assert_same_model(a: Path, b: Path, atol: float, name: str = "model.safetensors") -> None:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def fsdp_runs(corpus, tmp_path_factory):
    """The same 10 steps in one process and in two FSDP2 processes (global batch 4)."""
    root = tmp_path_factory.mktemp("fsdp")
    _one_process(corpus, root / "one", 10)
    _two_processes(corpus, root / "two", 10)
    return root / "one", root / "two"


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(fsdp_runs, tmp_path):
    one, two = fsdp_runs
    assert sorted(_losses(two)) == list(range(10))
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5), step
    _assert_same_model(one / "model", two / "model", atol=1e-5)  # the export gathered the shards
    # one consolidated checkpoint file (rank 0, atomic writer), read by `blockdiff export` like any other
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["last.ckpt", "prev.ckpt"]
    assert main(["export", str(two), str(tmp_path / "exported")]) == 0
    _assert_same_model(two / "model", tmp_path / "exported", atol=0)


KILLER = """
import os, signal, sys
from blockdiff.training.lightning_module import BlockDiffusionModule

original = BlockDiffusionModule.training_step


def training_step(self, batch, batch_idx):  # rank 0 dies (SIGKILL: no handler, no checkpoint) as step 7 starts
    if self.global_step == 7 and self.global_rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batch, batch_idx)


BlockDiffusionModule.training_step = training_step
from blockdiff.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_reproduces_the_uninterrupted_run(fsdp_runs, corpus, tmp_path):
    _, two = fsdp_runs
    killer, killed = tmp_path / "killer.py", tmp_path / "killed"
    killer.write_text(KILLER)
    proc = _torchrun(str(killer), "train", *RUN, *FSDP2, f"data.source={corpus}", "trainer.max_steps=10",
                     "trainer.val_every_n_steps=10", f"trainer.out_dir={killed}")
    assert proc.returncode != 0 and not (killed / "model").exists()
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    proc = _torchrun("-m", "blockdiff.cli", "train", "--resume", str(killed))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "at step 6" in proc.stdout
    assert _losses(killed) == _losses(two)  # bit for bit, steps 7 to 10 included
    _assert_same_model(two / "model", killed / "model", atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gated_adapter", "pretrained_lora_checkpointing"])
def test_fsdp_fine_tuning_variants_match_one_process(variant, corpus, tmp_path):
    if variant == "gated_adapter":
        extra = ["model.adapter=gated_lora", "model.adapter_rank=2"]
        files = ["model.safetensors", "adapter.safetensors"]
    else:
        if importlib.util.find_spec("peft") is None:
            pytest.skip("needs peft")
        from tests.test_finetune import save_base

        base = save_base(tmp_path / "base")
        extra = [f"model.pretrained={base}", "model.lora_rank=2", "model.gradient_checkpointing=true"]
        files = ["model.safetensors"]
    _one_process(corpus, tmp_path / "one", 3, *extra)
    _two_processes(corpus, tmp_path / "two", 3, *extra)
    for step, loss in _losses(tmp_path / "one").items():
        assert _losses(tmp_path / "two")[step] == pytest.approx(loss, rel=1e-5), step
    for name in files:
        _assert_same_model(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-5, name=name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.strategy=fsdp", "optim.ema_decay=0.99"], "set optim.ema_decay=0"),
        (["trainer.strategy=fsdp", "optim.ema_decay=0", "trainer.precision=16-mixed"], "use one of auto, 32-true"),
        (["trainer.strategy=fsdp", "optim.ema_decay=0", "model.block_length_mixture={1: 0.5, 4: 0.5}"],
         "use trainer.strategy=ddp or one model.block_length"),
    ],
)
def test_what_fsdp_cannot_honour_is_refused_by_config_validate(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)
    assert main(["config", "validate", *overrides]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="a machine with 64 GPUs")
def test_more_gpus_than_the_machine_has_are_refused_by_config_validate(capsys):
    args = ["trainer.accelerator=gpu", "trainer.devices=64", "trainer.strategy=fsdp", "optim.ema_decay=0"]
    assert main(["config", "validate", *args]) == 2
    assert f"this machine has {torch.cuda.device_count()} CUDA GPU" in " ".join(capsys.readouterr().err.split())


def test_an_fsdp_run_with_ema_writes_nothing(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *RUN, *FSDP2, "optim.ema_decay=0.99", f"data.source={corpus}", f"trainer.out_dir={run}"]) == 2
    assert "optim.ema_decay=0" in " ".join(capsys.readouterr().err.split()) and not run.exists()


# -- launch recipes ----------------------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


def _slurm_script() -> str:
    text = DOCS.read_text()
    start = text.index("```bash\n#!/bin/bash") + len("```bash\n")
    return text[start : text.index("```", start)]


def test_the_documented_slurm_script_is_valid_bash(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(_slurm_script())
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # its srun line is a blockdiff command whose overrides form a valid config
    srun = " ".join(_slurm_script().replace("\\\n", " ").split()).split("srun ", 1)[1].split()
    assert srun[:2] == ["blockdiff", "train"]
    overrides = [a for a in srun if "=" in a]
    cfg = load_config([], [*overrides, "trainer.accelerator=cpu"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)


def _slurm_env(monkeypatch, proc_id: int, local_id: int, node_id: int, tasks_per_node: int = 8) -> None:
    """What srun sets for task ``proc_id`` of a 2-node job with ``tasks_per_node`` tasks per node."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_NTASKS": str(2 * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
           "SLURM_PROCID": str(proc_id), "SLURM_LOCALID": str(local_id), "SLURM_NODEID": str(node_id),
           "SLURM_JOB_NAME": "job.sbatch", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "node[07-08]"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lightning_derives_the_ranks_of_a_slurm_task(strategy, monkeypatch, tmp_path):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from blockdiff.modeling.rundir import RunDir
    from blockdiff.training.trainer import build_trainer, env_is_global_zero

    _slurm_env(monkeypatch, proc_id=9, local_id=1, node_id=1)
    cfg = load_config([], ["trainer.accelerator=cpu", "trainer.devices=8", "trainer.num_nodes=2",
                           f"trainer.strategy={strategy}", "optim.ema_decay=0", f"trainer.out_dir={tmp_path / 'r'}"])
    trainer = build_trainer(cfg, RunDir(cfg.trainer.out_dir), progress=False).trainer
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.creates_processes_externally
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (9, 1, 1, 16)
    assert environment.main_address == "node07" and not env_is_global_zero()
    assert not (tmp_path / "r").exists()  # building the trainer writes nothing


def test_a_slurm_job_with_other_tasks_per_node_than_trainer_devices_is_refused(monkeypatch, tmp_path):
    from blockdiff.modeling.rundir import RunDir
    from blockdiff.training.trainer import build_trainer

    _slurm_env(monkeypatch, proc_id=0, local_id=0, node_id=0, tasks_per_node=4)
    cfg = load_config([], ["trainer.accelerator=cpu", "trainer.devices=8", "trainer.num_nodes=2",
                           "trainer.strategy=ddp", f"trainer.out_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="ntasks-per-node=4"):
        build_trainer(cfg, RunDir(cfg.trainer.out_dir), progress=False)


def test_torchrun_with_another_process_count_than_the_config_is_refused(monkeypatch, tmp_path):
    from blockdiff.modeling.rundir import RunDir
    from blockdiff.training.trainer import build_trainer

    for key, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                       "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config([], ["trainer.accelerator=cpu", "trainer.devices=4", "trainer.strategy=ddp",
                           f"trainer.out_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"does not match the world size \(2\)"):
        build_trainer(cfg, RunDir(cfg.trainer.out_dir), progress=False)


# -- the GPU check ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the check runs for real on a CUDA machine")
def test_the_gpu_check_says_no_cuda_and_runs_nothing_on_a_cpu(tmp_path):
    script = Path(__file__).resolve().parent.parent / "experiments" / "gpu" / "check.sh"
    proc = subprocess.run([str(script), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("no CUDA: experiments/gpu/check.sh needs an NVIDIA GPU")
    assert not (tmp_path / "out").exists()
