"""Benchmark: block-diffusion training step vs a plain autoregressive step of the same backbone.

What is measured, in ONE process, with the variants interleaved round-robin (the starting variant
rotates every round; these machines are noisy, so every statistic is a median over rounds; the method, the
environment header and ``OMP_WAIT_POLICY=PASSIVE`` come from ``_timing.py``):

* **Step time** of a full training step — ``zero_grad`` + forward + backward + ``AdamW.step`` (fp32):
  - BD, block length ``L'``: ``block_diffusion_loss(model, x0, LogLinearSchedule(), (1e-3, 1.0))``, the
    vectorised ``x_t ⊕ x_0`` forward (``2L`` tokens per sequence through the network, dense SDPA mask);
  - AR: ``model.backbone(input_ids=x0, labels=x0).loss`` on the same backbone and batch (``L`` tokens).
  The BD/AR ratio is computed per round (BD time / AR time of that round), then the median is
  reported; the target is <= 2.0x. Each variant gets ``--warmup`` untimed steps first.
* **Achieved GFLOP/s** = FLOPs of one step / step time, with FLOPs
  - *counted* (preferred): ``FlopCounterMode`` over one step: linear layers, output head and SDPA (the CPU
    flash-attention ops are registered below with torch's SDPA formulas: full masked score matrix, and
    the backward recomputes the scores);
  - *analytic*: ``6*N*T + 6*d*V*R + 12*layers*s^2*d*b`` (s = 2L - L' for BD) where ``N`` = non-embedding parameters,
    ``T = b*s`` tokens through the network (``s = 2L`` for BD, ``L`` for AR), ``d`` hidden size,
    ``V`` vocab, ``R`` rows through the output head (AR: ``b*L``; BD: the masked rows only), and
    the last term is dense attention (QK^T and AV, forward + 2x backward) over the full ``s x s`` matrix.
* **Peak**: a ``--peak-n``-square fp32 ``torch.mm``, median of 3 every round, ``GFLOP/s = 2 n^3 / t``;
  achieved/peak is taken per round, then the median is reported.

Shapes: the demo model (``ModelConfig()`` defaults: llama, hidden 192, 4 layers; vocab 2048, L=128,
batch 16) at L' = 1, 4, 16, 128 (MDLM), and a bigger one (hidden 384, 6 layers, L=256, batch 8) at L' = 8.
All variants of a shape share one backbone and one AdamW optimiser. Writes ``results.json`` (environment,
raw per-round times and ratios) and ``table.md`` (a markdown fragment) into ``--out``::

    python experiments/bench_training.py --quick
    python experiments/bench_training.py --reps 10 --threads 2 --out experiments/results/bench_training
"""

from __future__ import annotations

import argparse
import functools
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import _timing  # sorts before torch: sets OMP_WAIT_POLICY before torch loads
import torch
from _report import print_report, results_dir, write_report
from _timing import rotations, same_round_ratio, same_round_ratios, timed, warm_up
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from blockdiff import BlockDiffusionLM, BlockDiffusionSpec, block_diffusion_loss, build_backbone
from blockdiff.config import ModelConfig
from blockdiff.core.noise import LogLinearSchedule

T_RANGE = (1e-3, 1.0)
TARGET_RATIO = 2.0
aten = torch.ops.aten
# FlopCounterMode does not know the CPU flash-attention ops; count them with torch's SDPA formulas.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(
        g, q, k, v
    ),
}


@dataclass
class Shape:
    name: str
    hidden: int  # model.hidden_size
    layers: int  # model.num_layers
    heads: int  # model.num_heads
    vocab: int  # the mask token is the last id
    seq_len: int  # data.max_seq_len (L)
    batch: int  # data.batch_size
    block_lengths: tuple[int, ...]  # BD variants (L')


SHAPES = [Shape("demo", 192, 4, 4, 2048, 128, 16, (1, 4, 16, 128)), Shape("big", 384, 6, 6, 2048, 256, 8, (8,))]


@dataclass
class Variant:
    shape: Shape
    block_length: int | None  # None = the AR baseline
    step: Callable[[], int]  # one full training step; returns the number of rows through the output head
    times: list[float] = field(default_factory=list)  # seconds per step, one entry per round
    counted_flops: int = 0
    analytic_flops: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.shape.name} AR" if self.block_length is None else f"{self.shape.name} BD L'={self.block_length}"


def build_variants(shape: Shape, device: torch.device, lr: float, seed: int):
    """``(backbone, variants)``: one backbone + AdamW, an AR step and a BD step per block length, one batch."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads)
    backbone = build_backbone(cfg, shape.vocab, shape.seq_len).to(device).train()
    mask_id = shape.vocab - 1
    x0 = torch.randint(0, mask_id, (shape.batch, shape.seq_len), device=device)  # (b, n), never the mask id
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr)
    schedule, generator = LogLinearSchedule(), torch.Generator(device=device)

    def ar_step() -> int:
        optimizer.zero_grad(set_to_none=True)
        backbone(input_ids=x0, labels=x0).loss.backward()
        optimizer.step()
        return x0.numel()

    def bd_step_for(model: BlockDiffusionLM):
        def bd_step() -> int:
            optimizer.zero_grad(set_to_none=True)
            generator.manual_seed(seed)  # same noise every step: same masked rows, same FLOPs
            out = block_diffusion_loss(model, x0, schedule, T_RANGE, generator=generator)
            out.loss.backward()
            optimizer.step()
            return out.num_masked

        return bd_step

    variants = [Variant(shape, None, ar_step)]
    for block_length in shape.block_lengths:
        model = BlockDiffusionLM(backbone, BlockDiffusionSpec(mask_id, block_length, max_seq_len=shape.seq_len))
        variants.append(Variant(shape, block_length, bd_step_for(model)))
    return backbone, variants


def count_flops(variant: Variant, backbone_params: int, embed_params: int) -> None:
    """Counted FLOPs of one step (FlopCounterMode) and the analytic formula from the module docstring."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        head_rows = int(variant.step())
    variant.counted_flops = counter.get_total_flops()
    s = variant.shape
    seq = s.seq_len if variant.block_length is None else 2 * s.seq_len - variant.block_length  # tokens through the net
    dense = 6 * (backbone_params - embed_params) * s.batch * seq + 6 * s.hidden * s.vocab * head_rows
    variant.analytic_flops = dense + 12 * s.layers * seq * seq * s.hidden * s.batch


def run(args: argparse.Namespace, console: Console) -> dict:
    device = torch.device(args.device)
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    variants: list[Variant] = []
    for shape in SHAPES:
        backbone, shape_variants = build_variants(shape, device, args.lr, args.seed)
        params = sum(p.numel() for p in backbone.parameters())  # tied head: the embedding is counted once
        embed = backbone.get_input_embeddings().weight.numel()
        for variant in shape_variants:
            warm_up(variant.step, args.warmup)
            count_flops(variant, params, embed)
        variants += shape_variants
        console.log(f"built + warmed up {shape.name}: {params / 1e6:.2f}M params ({embed / 1e6:.2f}M embedding)")

    n = args.peak_n
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = functools.partial(torch.mm, a, b)
    warm_up(matmul)
    peak_gflops = []  # one per round: median of three timings
    for rnd, order in rotations(variants, args.reps):
        peak_gflops.append(2 * n**3 / statistics.median(timed(matmul, sync=sync).seconds for _ in range(3)) / 1e9)
        for variant in order:
            variant.times.append(timed(variant.step, args.steps_per_rep, sync=sync).seconds)
        console.log(f"round {rnd + 1}/{args.reps} done")

    rows = []
    for variant in variants:
        ar = next(v for v in variants if v.shape is variant.shape and v.block_length is None)
        ratios = same_round_ratios(variant.times, ar.times)
        achieved = [variant.counted_flops / t / 1e9 for t in variant.times]  # per round
        rows.append(
            dict(
                variant=variant.name,
                shape=asdict(variant.shape),
                block_length=variant.block_length,
                tokens_per_seq=variant.shape.seq_len * (1 if variant.block_length is None else 2)
                - (variant.block_length or 0),
                median_step_ms=1e3 * statistics.median(variant.times),
                ratio_vs_ar=same_round_ratio(variant.times, ar.times),
                flop_ratio_vs_ar=variant.counted_flops / ar.counted_flops,
                counted_gflop=variant.counted_flops / 1e9,
                analytic_gflop=variant.analytic_flops / 1e9,
                achieved_gflops=statistics.median(achieved),
                fraction_of_peak=same_round_ratio(achieved, peak_gflops),
                ratios_per_round=ratios,
                times_s=variant.times,
            )
        )
    return dict(
        environment=_timing.environment(),
        device=str(device),
        **{k: vars(args)[k] for k in ("reps", "steps_per_rep", "warmup", "peak_n")},
        peak_gflops=statistics.median(peak_gflops),
        peak_gflops_per_round=peak_gflops,
        results=rows,
    )


COLUMNS = ["variant", "tok/seq", "step ms", "BD/AR time", "BD/AR FLOP", "GFLOP cnt", "GFLOP ana", "GFLOP/s", "of peak"]


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["results"]:
        verdict = "" if r["block_length"] is None else " ok" if r["ratio_vs_ar"] <= TARGET_RATIO else " >2"
        out.append(
            [r["variant"], str(r["tokens_per_seq"]), f"{r['median_step_ms']:.0f}", f"{r['ratio_vs_ar']:.2f}{verdict}"]
            + [f"{r['flop_ratio_vs_ar']:.2f}"]
            + [f"{r[k]:.1f}" for k in ("counted_gflop", "analytic_gflop", "achieved_gflops")]
            + [f"{r['fraction_of_peak']:.2f}"]
        )
    return out


def header(report: dict) -> str:
    return (
        f"{_timing.header(report['environment'])}\ndevice {report['device']}; "
        f"peak fp32 mm ({report['peak_n']}^2): {report['peak_gflops']:.1f} GFLOP/s; {report['reps']} rounds x "
        f"{report['steps_per_rep']} step(s) after {report['warmup']} warm-up steps; medians"
    )


FOOTER = (
    "BD/AR time: median over rounds of (BD step time / AR step time in the same round); target <= 2.0.\n"
    "BD/AR FLOP: counted FLOPs ratio. GFLOP/s from counted FLOPs (FlopCounterMode, CPU SDPA included); "
    "'of peak' = achieved / same-round matmul peak.\n"
    "analytic FLOPs = 6*N_nonemb*b*s + 6*d*V*head_rows + 12*layers*s^2*d*b (dense attention); s = 2L - L' for BD "
    "(the last clean block is not fed), L for AR."
)


def write_outputs(report: dict, out_dir: Path) -> None:
    write_report(out_dir, report, header(report) + "\n" + FOOTER, COLUMNS, table_rows(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step each")
    parser.add_argument("--reps", type=int, default=10, help="rounds over all variants (timing repetitions)")
    parser.add_argument("--steps-per-rep", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--device", default="cpu", help="torch device (fp32 throughout)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--peak-n", type=int, default=2048, help="size of the square fp32 matmul for the peak")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if args.quick:
        args.reps, args.steps_per_rep = 2, 1

    console = Console(width=max(Console().width, 130))
    report = run(args, console)
    print_report(
        console,
        "Training step: block diffusion (x_t ⊕ x_0, 2L tokens) vs AR (L tokens)",
        COLUMNS,
        table_rows(report),
        header(report),
        FOOTER,
        left="variant",
    )
    write_outputs(report, args.out)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
