"""The GPU check in one command (``experiments/gpu/check.sh``): what the package does on a CUDA device, measured once.

Sections (each one timed and guarded: a failure is recorded in the results and the next section still runs):

* **train demo** / **train SmolLM2**: bf16 training steps (``torch.autocast(bfloat16)`` over fp32 weights, AdamW,
  ``block_diffusion_loss`` over ``x_t ⊕ x_0`` under the dense training mask, SDPA): the demo network (``Config()``
  defaults with the byte tokenizer, batch 16 x 128 tokens) and SmolLM2-135M fine-tuning (the offline ``smollm2``
  alias, logit shift on, batch 8 x 512). Reported: median step time, tokens/s (sequence tokens, not the doubled
  network input), achieved TFLOP/s with the FLOPs *counted* by ``torch.utils.flop_counter.FlopCounterMode`` over one
  step, and MFU = achieved / the device's dense bf16 peak (``PEAK_BF16``; n/a for a device not listed).
* **flex == sdpa**: the training forward's logits under ``attn_implementation=flex_attention`` (a sparse
  ``BlockMask`` from the same mask function) and ``sdpa`` (dense 4-D mask), same weights, fp32: max |difference|,
  for block length 4 without and 16 with the logit shift.
* **speculative**: SmolLM2-135M in bf16, greedy, one prompt, 128 new tokens: HF ``generate()`` of the base vs
  ``speculative_generate`` of the fused gated-adapter model (verifier = the frozen base, drafter = the adapter rows).
  The adapter is freshly initialised (no trained drafter ships offline), so acceptance is that of the base decoder
  reading mask tokens: a lower bound; the output is the base's own greedy continuation either way (``exact``).
* **2 GPUs** (only with >= 2 devices): the tiny config for 20 steps under ``torchrun`` with ``ddp`` and ``fsdp``
  (fp32, all-masked noise) vs one GPU: max relative difference of the loss curves.

Writes ``results.json`` and ``table.md`` into ``--out`` (default ``experiments/results/gpu_check``) and prints the
table. Without CUDA it prints one line saying so and exits with status 2, having run nothing (flex attention is never
compiled on a CPU). ``--cpu-smoke`` (for developing this script only) runs the training and speculative sections with
tiny sizes on the CPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: _timing, _report

import _timing  # noqa: E402  (before torch: sets OMP_WAIT_POLICY)
import torch  # noqa: E402
from _report import print_report, results_dir, write_report  # noqa: E402

NO_CUDA = "no CUDA: experiments/gpu/check.sh needs an NVIDIA GPU (torch.cuda.is_available() is False); nothing was run"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
"""Dense bf16 tensor-core peaks (FLOP/s) by device-name substring (SXM parts; an H100 PCIe peaks at 756e12)."""


def _peak(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _config(overrides: list[str]):
    from blockdiff.config import load_config

    return load_config([], overrides)


def _build(overrides: list[str], device: str):
    from blockdiff.training.builders import build_model

    torch.manual_seed(0)
    tokenizer, model = build_model(_config(overrides), {"text": []})
    return tokenizer, model.to(device)


# -- sections ---------------------------------------------------------------------------------------------------
def train_throughput(overrides: list[str], batch: int, device: str, steps: int) -> dict:
    """bf16 training steps of the network ``overrides`` describes: step time, tokens/s, counted FLOPs, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from blockdiff.core.loss import block_diffusion_loss
    from blockdiff.core.noise import make_schedule

    tokenizer, model = _build(overrides, device)
    model.train()
    n = _config(overrides).data.max_seq_len
    x0 = torch.randint(0, min(len(tokenizer), 250), (batch, n), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    schedule = make_schedule("loglinear")
    dtype = torch.bfloat16

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype):
            loss = block_diffusion_loss(model, x0, schedule, (1e-3, 1.0)).loss
        loss.backward()
        optimizer.step()
        return loss

    _timing.warm_up(step, 2)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = _timing.timed(step, steps, sync=_sync).seconds
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = _peak(name)
    achieved = flops / seconds
    return dict(step_seconds=seconds, tokens_per_second=batch * n / seconds, flops_per_step=flops,
                tflops=achieved / 1e12, mfu=None if peak is None else achieved / peak, batch=batch, seq_len=n,
                parameters=sum(p.numel() for p in model.parameters()),
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)


def flex_matches_sdpa(device: str) -> dict:
    """Max |logits(flex) - logits(sdpa)| of the training forward, fp32, same weights."""
    out = {}
    for block_length, shift in ((4, False), (16, True)):
        common = ["data.tokenizer=bytes", "data.max_seq_len=256", f"model.block_length={block_length}",
                  f"model.logit_shift={shift}"]
        _, sdpa = _build(common, device)
        _, flex = _build([*common, "model.attn_implementation=flex_attention"], device)
        flex.load_state_dict(sdpa.state_dict())
        g = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randint(0, 250, (4, 256), device=device, generator=g)
        masked = torch.rand(x0.shape, device=device, generator=g) < 0.5
        xt = torch.where(masked, torch.full_like(x0, sdpa.spec.mask_token_id), x0)
        with torch.no_grad():
            a, b = sdpa.eval()(xt, x0), flex.eval()(xt, x0)
        rows = slice(1, None) if shift else slice(None)  # with the shift, row 0 holds no prediction
        diff = (a[:, rows] - b[:, rows]).abs().max().item()
        out[f"L'={block_length}{' shift' if shift else ''}"] = dict(max_abs_diff=diff, ok=diff < 1e-3)
    return out


def speculative_vs_generate(device: str, new_tokens: int) -> dict:
    """Greedy tokens/s of HF ``generate()`` on SmolLM2 and of the fused speculative decoder over the same base."""
    from blockdiff.sampling import speculative_generate

    overrides = ["model.pretrained=smollm2", "model.adapter=gated_lora", "model.clean_attention=causal",
                 "data.max_seq_len=512", "model.block_length=4"]
    tokenizer, model = _build(overrides, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype).eval()
    base = model.backbone
    prompt = tokenizer("The history of the printing press begins", return_tensors="pt").input_ids.to(device)

    def hf():
        with torch.no_grad():
            return base.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def spec():
        with torch.no_grad():
            return speculative_generate(model, None, prompt, max_new_tokens=new_tokens, eos_token_id=[])

    _timing.warm_up([hf, spec])
    t_hf, t_spec = _timing.timed(hf, 3, sync=_sync), _timing.timed(spec, 3, sync=_sync)
    hf_tokens = t_hf.result[0, prompt.shape[1]:].tolist()
    spec_out = t_spec.result
    start, kept = int(spec_out.prompt_lengths[0]), int(spec_out.lengths[0])
    spec_tokens = spec_out.sequences[0, start : start + kept].tolist()
    hf_rate, spec_rate = len(hf_tokens) / t_hf.seconds, len(spec_tokens) / t_spec.seconds
    return dict(hf_tokens_per_second=hf_rate, spec_tokens_per_second=spec_rate, speedup=spec_rate / hf_rate,
                tokens_per_verifier_forward=spec_out.tokens_per_verifier_forward,
                exact=spec_tokens == hf_tokens[: len(spec_tokens)], new_tokens=len(spec_tokens), dtype=str(dtype))


def two_gpus(out: Path) -> dict:
    """The tiny config, 20 steps, on 1 GPU and under torchrun on 2 with ddp and fsdp: loss-curve agreement."""
    import csv

    corpus = out / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 40)
    tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=64",
            "data.batch_size=8", "data.tokenizer=bytes", f"data.source={corpus}", "trainer.max_minutes=null",
            "trainer.accelerator=gpu", "trainer.precision=32-true", "trainer.max_steps=20",
            "trainer.val_every_n_steps=20", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "optim.ema_decay=0", "noise.beta=1", "noise.omega=1"]

    def losses(run: Path) -> list[float]:
        with open(run / "logs" / "metrics.csv", newline="") as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    def launch(run: Path, *extra: str, procs: int = 1) -> None:
        head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1 else [sys.executable])
        subprocess.run([*head, "-m", "blockdiff.cli", "train", *tiny, f"trainer.out_dir={run}", *extra],
                       check=True, capture_output=True, timeout=240)

    launch(out / "one")
    result = {}
    for strategy in ("ddp", "fsdp"):
        launch(out / strategy, "trainer.devices=2", f"trainer.strategy={strategy}", procs=2)
        a, b = losses(out / "one"), losses(out / strategy)
        result[strategy] = dict(steps=len(b), max_rel_diff=max(abs(x - y) / abs(x) for x, y in zip(a, b)))
    return result


# -- the run ----------------------------------------------------------------------------------------------------
def _section(results: dict, name: str, fn, *args) -> None:
    watch = _timing.Stopwatch()
    with watch:
        try:
            results[name] = {"ok": True, **fn(*args)}
        except Exception as err:  # recorded, and the next section runs
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0],
                             "traceback": traceback.format_exc()}
    results[name]["seconds"] = watch.seconds
    print(f"{name}: {'done' if results[name]['ok'] else results[name]['error']} ({watch.seconds:.0f} s)", flush=True)


def _rows(results: dict) -> list[list[str]]:
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    rows = []
    for name in ("train demo", "train SmolLM2"):
        r = results.get(name, {})
        rows.append([name, "ok" if r.get("ok") else r.get("error", "not run"),
                     f"{fmt(r.get('step_seconds'), '.4f')} s/step, {fmt(r.get('tokens_per_second'), ',.0f')} tok/s, "
                     f"{fmt(r.get('tflops'), '.1f')} TFLOP/s, MFU {fmt(r.get('mfu'), '.1%')}"])
    r = results.get("flex == sdpa")
    if r is not None:
        cases = {k: v for k, v in r.items() if isinstance(v, dict) and "max_abs_diff" in v}
        detail = ", ".join(f"{k}: max|diff| {v['max_abs_diff']:.1e}" for k, v in cases.items())
        status = r.get("error") or ("ok" if all(v["ok"] for v in cases.values()) else "MISMATCH")
        rows.append(["flex == sdpa", status, detail])
    r = results.get("speculative", {})
    rows.append(["speculative", "ok" if r.get("ok") else r.get("error", "not run"),
                 f"HF {fmt(r.get('hf_tokens_per_second'), '.1f')} tok/s, "
                 f"spec {fmt(r.get('spec_tokens_per_second'), '.1f')} tok/s (x{fmt(r.get('speedup'), '.2f')}, "
                 f"{fmt(r.get('tokens_per_verifier_forward'), '.2f')} tok/fwd), exact {r.get('exact')}"])
    r = results.get("2 GPUs")
    if r is not None:
        detail = ", ".join(f"{k}: max rel diff {v['max_rel_diff']:.1e}" for k, v in r.items() if isinstance(v, dict))
        rows.append(["2 GPUs", "ok" if r.get("ok") else r.get("error"), detail])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=results_dir("gpu_check.py"))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per network")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = device == "cpu"
    results: dict = {}
    demo = ["data.tokenizer=bytes"] + (["data.max_seq_len=32", "model.hidden_size=32", "model.num_layers=2"]
                                       if smoke else [])
    _section(results, "train demo", train_throughput, demo, 2 if smoke else 16, device, 1 if smoke else args.steps)
    smol = ["model.pretrained=smollm2", f"data.max_seq_len={32 if smoke else 512}"]
    _section(results, "train SmolLM2", train_throughput, smol, 1 if smoke else 8, device, 1 if smoke else args.steps)
    if not smoke:  # flex attention is compiled: never on a CPU
        _section(results, "flex == sdpa", flex_matches_sdpa, device)
    _section(results, "speculative", speculative_vs_generate, device, 8 if smoke else args.new_tokens)
    if torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            _section(results, "2 GPUs", two_gpus, Path(tmp))
    env = _timing.environment()
    env["gpus"] = torch.cuda.device_count()
    columns = ["check", "status", "result"]
    rows = _rows(results)
    write_report(args.out, {"environment": env, "results": results}, _timing.header(env), columns, rows)
    from rich.console import Console

    print_report(Console(), "GPU check", columns, rows, _timing.header(env), f"wrote {args.out}", "check")
    failed = [name for name, r in results.items() if not r.get("ok") or any(
        isinstance(v, dict) and v.get("ok") is False for v in r.values())]
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks in {args.out / 'results.json'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
