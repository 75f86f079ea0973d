"""``blockdiff demo``: train a block diffuser on the offline Shakespeare corpus in a few minutes, next to an AR model
trained as long, and show both: samples side by side, forwards, the held-out bound, and a page replaying a sample.

The recipe (``--recipe from-ar``, the default; measured against the others in docs/benchmarks.md, "The demo"):

1. an AR model: block length 1 with every token masked (``noise.beta = noise.omega = 1``) and the logit shift, so
   its loss is exactly next-token cross-entropy — a third of ``trainer.max_minutes`` (and of ``trainer.max_steps``);
2. the block diffuser (``model.block_length``, default 4) started from it (``model.init_from``): the next third;
3. the AR model continued for the last third (``--resume``): the *equally trained* AR baseline, since the block
   diffuser also had two thirds of the budget (one as the AR model it started from).

``--recipe scratch`` is the demo before issue 13: the block diffuser alone from random weights, the whole budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blockdiff.cli import options
from blockdiff.cli.render import console
from blockdiff.config import load_config

AR_PHASE = ["model.block_length=1", "model.logit_shift=true", "noise.beta=1", "noise.omega=1"]


@dataclass
class Shown:
    """One model's part of the final table."""

    title: str
    run_dir: Path
    metrics: dict
    texts: list[str]
    nfe: float  # forwards per sample
    tokens_per_forward: float
    training: str = ""  # how it was trained, e.g. "200 AR steps + 200 block-diffusion steps, 2.7 min"


def run(args) -> None:
    """Train a small block diffuser from a short AR run on the offline Shakespeare corpus, next to the AR model.

    A few minutes in all: the AR run, the block diffuser started from it, and the AR model trained as long; then
    samples of both side by side, their forwards and held-out bounds, and a page that replays the block diffuser's
    sample. Last, the offline SmolLM2 and the shipped DFlash drafter write the same text as SmolLM2's own generate(),
    faster (--no-fast skips it).

    Writes runs/demo (trainer.out_dir; the AR model in runs/demo-ar, the trace and page next to them); an earlier
    demo there is replaced only with --overwrite.
    """
    cfg = load_config(args.config, args.overrides)
    if args.recipe == "scratch":
        shown = [_scratch(args, cfg)]
    else:
        shown = _from_ar(args, cfg)
    trace = Path(f"{cfg.trainer.out_dir}-trace.jsonl")
    shown[0] = _sample(shown[0], cfg, trace)
    for i, s in enumerate(shown[1:], 1):
        shown[i] = _sample(s, cfg, None)
    from blockdiff.viewer.page import write_page
    from blockdiff.viewer.trace import read_trace

    page = write_page(read_trace(trace), trace.with_suffix(".html"))
    _report(shown, cfg, page, trace)
    if not args.no_fast:
        from blockdiff.cli.demo_fast import run_showcase

        run_showcase()


def _train(cfg, overwrite: bool, resume=None):
    import datasets

    from blockdiff.training.train import train

    datasets.enable_progress_bars()  # the corpus' tokenize / pack bars: this verb wants every phase visible
    return train(cfg, overwrite=overwrite, resume=resume)


def _scratch(args, cfg) -> Shown:
    console.rule(f"[bold]blockdiff demo[/]: block diffusion (block length {cfg.model.block_length}) from scratch")
    result = _train(cfg, args.overwrite)
    title = f"block diffusion, L'={cfg.model.block_length}, from scratch"
    trained = f"trained {result.steps} steps ({result.seconds / 60:.1f} min)"
    return Shown(title, result.run_dir, result.metrics, [], 0, 0, trained)


def _from_ar(args, cfg) -> list[Shown]:
    from blockdiff.modeling.rundir import check_new_run_dir
    from blockdiff.training.resume import resume_config

    out, minutes, steps = cfg.trainer.out_dir, cfg.trainer.max_minutes, cfg.trainer.max_steps
    ar_dir = f"{out}-ar"
    third = [f"trainer.max_steps={max(1, steps // 3)}"] + ([f"trainer.max_minutes={minutes / 3:g}"] if minutes else [])
    for target in (out, ar_dir):  # both refused before any training, not after the first phase
        check_new_run_dir(Path(target), args.overwrite)
    l = cfg.model.block_length
    console.rule("[bold]blockdiff demo[/] 1/3: an autoregressive model (block length 1), a third of the budget")
    ar_cfg = load_config(args.config, [*args.overrides, *AR_PHASE, f"trainer.out_dir={ar_dir}", *third])
    first = _train(ar_cfg, args.overwrite)
    console.rule(f"[bold]blockdiff demo[/] 2/3: block diffusion (block length {l}) started from the AR model")
    bd_cfg = load_config(args.config, [*args.overrides, f"model.init_from={ar_dir}", "model.logit_shift=true", *third])
    bd = _train(bd_cfg, args.overwrite)
    console.rule("[bold]blockdiff demo[/] 3/3: the AR model trained on for the same time (the baseline)")
    more = [f"trainer.max_steps={2 * max(1, steps // 3)}"] + third[1:]
    ar = _train(resume_config(ar_dir, [], more), False, resume=ar_dir)
    bd_time, ar_time = (first.seconds + bd.seconds) / 60, (first.seconds + ar.seconds) / 60
    return [
        Shown(f"block diffusion, L'={l}, started from the AR model", bd.run_dir, bd.metrics, [], 0, 0,
              f"trained {first.steps} AR + {bd.steps} block-diffusion steps ({bd_time:.1f} min)"),
        Shown("autoregressive, L'=1, trained as long", ar.run_dir, ar.metrics, [], 0, 0,
              f"trained {ar.steps} AR steps ({ar_time:.1f} min)"),
    ]


def _sample(shown: Shown, cfg, trace: Path | None) -> Shown:
    """Sample ``cfg.sample`` from the model of ``shown`` with a progress bar (and a trace of every step)."""
    import torch

    from blockdiff.modeling.io import load_model_dir
    from blockdiff.sampling import encode_prompts, sample_texts
    from blockdiff.viewer.watch import TraceWriter, fan_out, trace_end, trace_header

    loaded = load_model_dir(shown.run_dir)
    s = cfg.sample
    prompts = [s.prompt] * s.num_samples
    ids = encode_prompts(loaded.tokenizer, prompts)
    settings = dict(max_new_tokens=s.max_new_tokens, steps_per_block=s.steps_per_block, temperature=s.temperature,
                    sampler=s.sampler, tau=s.tau)
    writer = None
    if trace is not None:
        header = trace_header(ids, loaded.model.mask_token_id, loaded.model.block_length, str(loaded.directory),
                              {k: v for k, v in settings.items() if v is not None})
        writer = TraceWriter(trace, header)
    with _sampling_bar(f"sampling {shown.run_dir}", s.num_samples * s.max_new_tokens) as bar:
        generator = torch.Generator().manual_seed(cfg.trainer.seed)
        texts, out = sample_texts(loaded.model, loaded.tokenizer, prompts, generator, observer=fan_out(writer, bar),
                                  **settings)
    if writer is not None:
        writer.close(end=trace_end(out, texts, loaded.tokenizer, writer.seen | {t for p in ids for t in p}))
    shown.texts = [s.prompt + t for t in texts]
    shown.nfe = out.sample_nfe.float().mean().item()
    shown.tokens_per_forward = out.sample_tokens_per_forward
    return shown


class _sampling_bar:
    """A transient bar of generated tokens (an observer of finished blocks), on a terminal only."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.done, self.progress, self.task = title, total, 0, None, None

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(escape(self.title), total=self.total)
        return self

    def __call__(self, event) -> None:
        if self.progress is not None and event.finished:
            self.progress.advance(self.task, sum(len(row) for row in event.tokens))

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _report(shown: list[Shown], cfg, page: Path, trace: Path) -> None:
    table = Table(title=f"prompt {cfg.sample.prompt!r}, {cfg.sample.max_new_tokens} new tokens at most, "
                        f"temperature {cfg.sample.temperature:g}", show_lines=True)
    for s in shown:
        table.add_column(escape(s.title), ratio=1)
    for i in range(cfg.sample.num_samples):
        table.add_row(*(Text(s.texts[i]) for s in shown))
    table.add_row(*(Text(f"{s.nfe:.1f} forwards per sample, {s.tokens_per_forward:.2f} tokens per forward")
                    for s in shown))
    table.add_row(*(Text(_bound(s)) for s in shown))
    table.add_row(*(Text(s.training) for s in shown))
    console.print(table)
    bd = shown[0]
    console.print(
        f"\n[bold]See it write:[/] open {escape(str(page))} in a browser — it replays the first sample above step by "
        "step (masks ░ turning into tokens, coloured by confidence).\n"
        "[bold]Next:[/]\n"
        f"  blockdiff sample {escape(str(bd.run_dir))} --prompt \"JULIET.\" --sampler fixed --tokens-per-step 2 "
        "--show-denoising   # watch it write, two tokens per forward\n"
        f"  blockdiff plot {' '.join(escape(str(s.run_dir)) for s in shown)} {escape(str(trace))}"
        "   # curves, NELBO per block position, tokens per forward\n"
        "  blockdiff finetune   # the same recipe on a pretrained decoder (the offline SmolLM2-135M)",
        highlight=False,
    )


def _bound(s: Shown) -> str:
    m = s.metrics
    if "val/ppl" not in m:
        return ""
    return (f"held-out bound: PPL ≤ {m['val/ppl']:.1f} ({m['val/nll']:.3f} nats/token, "
            f"{m.get('val/bpb', float('nan')):.2f} bits/byte)")


def add_arguments(p):
    options.train_args(p)
    p.add_argument("--no-fast", action="store_true",
                   help="skip the last part: SmolLM2 with the shipped drafter next to its own generate()")
    p.add_argument("--recipe", choices=["from-ar", "scratch"], default="from-ar",
                   help="from-ar (default): AR model, then block diffusion from it, next to the AR model trained as "
                   "long; scratch: block diffusion from random weights for the whole budget")
