"""``blockdiff`` command line: typed verbs dispatched from one table; ``--help`` comes from docstrings.

Config-taking verbs accept ``-c FILE`` (repeatable, merged in order) and trailing ``key=value`` overrides,
e.g. ``blockdiff train -c configs/shakespeare_small.yaml model.block_length=8``. Errors in the user's
input (config, files, corpus) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from blockdiff import tables
from blockdiff.config import SEED_MAX, ConfigError, describe_keys, load_config, path_problem, to_yaml
from blockdiff.errors import MissingFileError, UsageError, UserError
from blockdiff.sampling.config import SAMPLERS

console = Console(soft_wrap=True)  # lines are never re-wrapped at 80 columns when piped (tables fit themselves)


def cmd_train(args) -> None:
    """Train a block diffusion LM from a config; writes config, checkpoints, logs and model/ to trainer.out_dir.

    `--resume RUN_DIR` (or a .ckpt file) continues a stopped run exactly, with the run's own config.yaml
    (trailing trainer.* overrides such as trainer.max_steps=2000 may extend it).
    """
    from blockdiff.training.callbacks import NonFiniteLoss, TrainingInterrupted
    from blockdiff.training.checkpoint import run_dir_of
    from blockdiff.training.train import train

    if args.resume:
        if not os.path.isdir(args.resume) and path_problem(args.resume) is not None:
            raise MissingFileError(
                f"--resume {args.resume} {path_problem(args.resume)}; pass a run directory or a .ckpt file"
            )
        run_dir = run_dir_of(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: {saved} does not exist, so the run's config is unknown")
        out_dir = [] if any(o.startswith("trainer.out_dir=") for o in args.overrides) else [f"trainer.out_dir={run_dir}"]
        cfg = load_config([saved, *args.config], [*args.overrides, *out_dir])
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    except NonFiniteLoss as err:
        console.print(f"[bold red]training stopped:[/] {escape(str(err))}", highlight=False)
        raise SystemExit(1) from None
    except TrainingInterrupted as err:
        console.print(f"[yellow]{escape(str(err))}[/]", highlight=False)
        raise
    _print_metrics("final validation", result.metrics, extra={"steps": result.steps, "minutes": result.seconds / 60})
    console.print(f"model written to [bold]{escape(str(result.model_dir))}[/]")


def cmd_finetune(args) -> None:
    """Fine-tune a pretrained decoder into a block diffuser (default: the offline SmolLM2-135M, block length 4)."""
    from blockdiff.training.finetune import finetune_config
    from blockdiff.training.train import train

    cfg = finetune_config(args.base, args.config, args.overrides)
    result = train(cfg, overwrite=args.overwrite)
    _print_metrics("final validation", result.metrics, extra={"steps": result.steps, "minutes": result.seconds / 60})
    console.print(
        f"model written to [bold]{escape(str(result.model_dir))}[/]  — compare with the base: "
        f"`blockdiff eval {escape(str(result.run_dir))} --base-ppl`"
    )


def cmd_export(args) -> None:
    """Export a Lightning checkpoint (or a run directory's last one) as a Hugging Face model directory."""
    from blockdiff.training.finetune import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, args.run_config, overwrite=args.overwrite)
    console.print(f"model written to [bold]{escape(str(out))}[/] (load with BlockDiffusionLM.from_pretrained)")


def cmd_eval(args) -> None:
    """Evaluate a trained model (run dir or model dir): NELBO, perplexity bound and bits/byte on held-out text."""
    from blockdiff.evaluation.nelbo import evaluate

    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError(f"--max-batches must be >= 1 (leave it out to use every held-out batch), got {args.max_batches}")
    if args.block_length is not None and any(o.split("=", 1)[0].strip() == "model.block_length" for o in args.overrides):
        raise UsageError("give the block length once: --block-length N or model.block_length=N, not both")
    if args.base_ppl or args.gen:
        _compare_with_base(args)
        return
    with _stage_progress() as progress:
        result = evaluate(args.path, args.overrides, args.max_batches, args.seed, args.block_length, args.device, progress)
    _print_nelbo(args.path, result)
    if args.json:
        _write_json(args.json, _nelbo_record(result))


@contextlib.contextmanager
def _stage_progress():
    """A ``progress(stage, done, total)`` callback for long library calls: a transient bar on stderr when it is a
    terminal (so a minute-long evaluation is never silent), ``None`` when output is piped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    if not err.is_terminal:  # piped or captured: stderr stays for the error, if any
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, object] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                for task in tasks.values():
                    bar.update(task, visible=False)
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield report


def _nelbo_record(result) -> dict:
    return {"nelbo_nll": result.nll, "nelbo_ppl": result.ppl, "bpb": result.bpb, "tokens": result.num_tokens,
            "block_length": result.block_length}


def _write_json(path: str, record: dict) -> None:
    import json

    from blockdiff.files import write_text_atomic

    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    console.print(f"written to {path}", markup=False)


def _print_nelbo(path, result) -> None:
    table = Table(title=escape(f"held-out NELBO bound — {path}"))
    for col in ("block_length", "NELBO (nats/tok)", "PPL ≤", "BPB ≤", "tokens"):
        table.add_column(col, justify="right")
    table.add_row(str(result.block_length), f"{result.nll:.4f}", f"{result.ppl:.2f}", f"{result.bpb:.4f}", f"{result.num_tokens:,}")
    console.print(table)


def _compare_with_base(args) -> None:
    """`eval --base-ppl/--gen`: the bound next to the base decoder's exact AR perplexity, and judged samples."""
    from blockdiff.evaluation.judge import compare_with_base

    cmp = compare_with_base(
        args.path, args.overrides, base=args.base, judge=args.judge, samplers=args.samplers.split(","),
        num_samples=args.num_samples if args.gen else 0, gen_length=args.gen_length, max_batches=args.max_batches,
        seed=args.seed, block_length=args.block_length, device=args.device,
    )
    _print_nelbo(args.path, cmp.nelbo)
    table = Table(title=escape(f"vs the base decoder {cmp.base_name} (same held-out tokens)"))
    for col in ("base AR PPL", "block diffuser PPL ≤", "bound / AR", "tokens"):
        table.add_column(col, justify="right")
    table.add_row(f"{cmp.base_ppl:.2f}", f"{cmp.nelbo.ppl:.2f}", f"{cmp.bound_ratio:.2f}×", f"{cmp.base_tokens:,}")
    console.print(table)
    if cmp.generative:
        table = Table(title=escape(f"samples judged by {args.judge or cmp.base_name}"))
        for col in ("generator", "gen PPL", "entropy (nats)", "NFE/token", "tokens/s"):
            table.add_column(col, justify="right")
        for r in cmp.generative:
            table.add_row(r.label, f"{r.gen_ppl:.2f}", f"{r.entropy:.2f}", f"{r.nfe_per_token:.2f}", f"{r.tokens_per_second:.1f}")
        console.print(table)
    if args.json:
        _write_json(args.json, {
            "base": cmp.base_name, "base_ppl": cmp.base_ppl, **_nelbo_record(cmp.nelbo), "bound_ratio": cmp.bound_ratio,
            "tokens": cmp.base_tokens, "prompts": cmp.prompts, "generative": [vars(r) for r in cmp.generative],
        })


def cmd_sample(args) -> None:
    """Generate text block by block; prompts from --prompt, --prompt-file or stdin are batched together."""
    import contextlib

    import torch

    from blockdiff.evaluation.nelbo import load_model_dir
    from blockdiff.sampling import encode_prompts, sample_texts
    from blockdiff.sampling.watch import FinishedBlocks, LiveView, TraceWriter, fan_out

    path = args.checkpoint or args.path
    if path is None:
        raise UsageError("say which model to sample from: blockdiff sample RUN_DIR (or --checkpoint RUN_DIR)")
    prompts = _read_prompts(args)
    loaded = load_model_dir(path, device=args.device)
    if args.block_length is not None:  # e.g. a block-length-mixture model at another of its lengths
        loaded.model = loaded.model.with_block_length(args.block_length)
    settings = {
        "max_new_tokens": args.max_new_tokens, "sampler": args.sampler, "steps_per_block": args.steps_per_block,
        "tau": args.tau, "tokens_per_step": args.tokens_per_step, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "window": args.window,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.no_cache:
        settings["use_cache"] = False
    config = loaded.model.generation_config
    for key, value in settings.items():  # check everything before any work (and before --trace makes a file)
        setattr(config, key, value)
    config.check(loaded.model.block_length)
    ids = encode_prompts(loaded.tokenizer, prompts)
    finished = FinishedBlocks([len(p) for p in ids])
    trace = TraceWriter(args.trace) if args.trace else None
    live = LiveView(loaded.tokenizer, loaded.model.mask_token_id, console, prompts=ids) if args.show_denoising else None
    device = loaded.model.device  # sample i: seed + i, whatever else is in the batch
    generators = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(prompts))]
    try:
        with live or contextlib.nullcontext():
            texts, out = sample_texts(
                loaded.model, loaded.tokenizer, prompts, generators, observer=fan_out(finished, trace, live)
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted — finished blocks so far:[/]")
        for i, prompt in enumerate(prompts):
            console.print(prompt + finished.text(i, loaded.tokenizer), markup=False, highlight=False)
        if trace is not None:
            trace.close(keep=True)  # complete lines up to the interruption
        raise
    except BaseException:
        if trace is not None:
            trace.close(keep=False)
        raise
    if trace is not None:
        trace.close()
    reasons = {"eos": "EOS", "stop_string": "a stop string", "max_new_tokens": "max_new_tokens"}
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        console.rule(f"sample {i}: {int(out.lengths[i])} tokens, stopped at {reasons[out.stop_reasons[i]]}")
        console.print(prompt + text, markup=False, highlight=False)
    per_sample = out.sample_nfe.float().mean().item()
    batched = f" ({out.nfe} batched forwards for {len(prompts)} samples)" if len(prompts) > 1 else ""
    console.print(
        f"NFE {per_sample:.1f} per sample{batched}, {out.sample_tokens_per_forward:.2f} new tokens per forward per "
        f"sample, {out.tokens_processed_per_forward:.1f} tokens processed per batched forward, "
        f"largest KV cache {out.max_cache_length} tokens", highlight=False
    )


def _read_prompts(args) -> list[str]:
    prompts = []
    for prompt in args.prompt or []:
        prompts.extend(sys.stdin.read().splitlines() if prompt == "-" else [prompt])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts.extend(line.rstrip("\n") for line in f if line.strip())
        except FileNotFoundError:
            raise MissingFileError(f"--prompt-file {args.prompt_file} does not exist") from None
        except IsADirectoryError:
            raise MissingFileError(f"--prompt-file {args.prompt_file} is a directory; give a text file") from None
        except UnicodeDecodeError as err:
            raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not args.prompt and not args.prompt_file and not sys.stdin.isatty():
        prompts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
    if not prompts and (args.prompt or args.prompt_file):
        raise UsageError("the prompt list is empty (empty --prompt-file or stdin)")
    return prompts or [""]


def cmd_config(args) -> None:
    """Show the resolved config (`show`), only check it (`validate`), or list every key with its meaning (`keys`)."""
    if args.action == "keys" and args.markdown:  # the table in docs/configuration.md
        print("| key | default | meaning |\n|---|---|---|")
        print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in describe_keys()))
        return
    if args.action == "keys":  # every row whole, also when piped (`blockdiff config keys | grep lr`)
        tables.print_table(console, ["key", "default", "meaning"], describe_keys(), title="config keys")
        return
    cfg = load_config(args.config, args.overrides)
    if args.action == "show":
        sys.stdout.write(to_yaml(cfg))  # plain text: must stay loadable YAML when redirected
    else:
        console.print(Text("config OK", style="green"))


def cmd_demo(args) -> None:
    """Train a small model on the offline Shakespeare corpus for a few minutes, evaluate it, print samples.

    Writes runs/demo (trainer.out_dir); an earlier demo run there is replaced only with --overwrite.
    """
    from blockdiff.evaluation.nelbo import load_model_dir
    from blockdiff.sampling import sample_texts
    from blockdiff.training.train import train

    cfg = load_config(args.config, args.overrides)
    console.rule("[bold]blockdiff demo[/]: training")
    result = train(cfg, overwrite=args.overwrite)
    _print_metrics(
        f"held-out NELBO bound, block_length={cfg.model.block_length}",
        result.metrics,
        extra={"steps": result.steps, "minutes": result.seconds / 60},
    )
    import torch

    loaded = load_model_dir(result.model_dir)
    prompts = [cfg.sample.prompt] * cfg.sample.num_samples
    texts, out = sample_texts(
        loaded.model, loaded.tokenizer, prompts, torch.Generator().manual_seed(cfg.trainer.seed),
        max_new_tokens=cfg.sample.max_new_tokens, steps_per_block=cfg.sample.steps_per_block,
        temperature=cfg.sample.temperature, sampler=cfg.sample.sampler, tau=cfg.sample.tau,
    )
    for prompt, text in zip(prompts, texts):
        console.rule("sample")
        console.print(prompt + text, markup=False, highlight=False)
    console.print(
        f"NFE {out.sample_nfe.float().mean().item():.1f} per sample, {out.sample_tokens_per_forward:.2f} new tokens per "
        "forward per sample", highlight=False,
    )
    console.print(f"\nmodel: [bold]{escape(str(result.model_dir))}[/]  — try `blockdiff eval {escape(str(result.run_dir))}`")


def cmd_sweep(args) -> None:
    """Run a grid of configs (one run directory each, resumable), or --report DIR: table, CSV, markdown and plots."""
    from blockdiff.sweeps.runner import changed_runs, load_sweep, run_sweep

    if args.report:
        from blockdiff.sweeps.report import report

        written = report(args.report, console)
        console.print("wrote " + ", ".join(str(p) for p in written), markup=False)
        return
    if not args.file:
        raise UsageError("say which sweep to run (blockdiff sweep configs/sweeps/NAME.yaml) or pass --report DIR")
    if args.parallel < 1:
        raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
    sweep = load_sweep(args.file, args.out_dir, args.config, args.overrides)  # every run validated before any starts
    changed_runs(sweep, args.only, args.rerun_changed)  # refuse stale finished runs before printing anything
    console.print(Text.assemble("sweep ", (sweep.name, "bold"), f": {len(sweep.runs)} runs in {sweep.out_dir}"))
    failed = run_sweep(sweep, args.parallel, args.only, log=lambda m: console.print(m, highlight=False, markup=False),
                       rerun_changed=args.rerun_changed)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (see error.txt or logs/ in {sweep.out_dir})",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    console.print(f"done — `blockdiff sweep --report {sweep.out_dir}`", markup=False)


def _print_metrics(title: str, metrics: dict[str, float], extra: dict[str, float]) -> None:
    header = ["val/nll", "val/ppl", "val/bpb", *extra]
    values = [metrics.get(k, float("nan")) for k in ("val/nll", "val/ppl", "val/bpb")] + list(extra.values())
    row = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
    tables.print_table(console, header, [row], title=title, right=header)


# -- the one table of verbs -----------------------------------------------------------------------

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], help="YAML config file (repeatable, merged in order)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.block_length=8")


def _train_args(p):
    _config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the blockdiff run in trainer.out_dir (a folder holding anything else is never deleted)")


def _train_verb_args(p):
    _train_args(p)
    p.add_argument("--resume", metavar="RUN_DIR|CKPT",
                   help="continue a stopped run exactly from its last checkpoint (or from this .ckpt file)")


def _finetune_args(p):
    p.add_argument("--base", help="hub id, local model directory, .gguf file or 'smollm2' (default: smollm2, offline)")
    _train_args(p)


def _export_args(p):
    p.add_argument("checkpoint", help="a .ckpt file or a run directory (uses checkpoints/last.ckpt)")
    p.add_argument("out_dir", help="directory to write (safetensors + blockdiff.json + tokenizer)")
    p.add_argument("--run-config", help="the run's config.yaml (default: next to checkpoints/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous blockdiff model export (anything else is never deleted)")


def _eval_args(p):
    p.add_argument("path", help="run directory or its model/ folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config, e.g. data.source=x.txt "
                   "(model.block_length=N is --block-length N; other model.* keys are fixed by the trained network)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate on at most N held-out batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise levels and masks")
    p.add_argument("--block-length", type=int, help="evaluate at this block length instead of the model's (mixture models)")
    p.add_argument("--base-ppl", action="store_true", help="also the base decoder's exact AR perplexity on the same tokens")
    p.add_argument("--gen", action="store_true", help="also judge samples: generative perplexity, entropy, tokens/s")
    p.add_argument("--base", help="reference decoder (default: the model.pretrained it was fine-tuned from)")
    p.add_argument("--judge", help="judge decoder for --gen (default: the base decoder)")
    p.add_argument("--samplers", default="threshold,first_hitting", help="comma-separated samplers for --gen")
    p.add_argument("--num-samples", type=int, default=8, help="--gen: prompts taken from held-out windows")
    p.add_argument("--gen-length", type=int, default=64, help="--gen: new tokens per sample")
    p.add_argument("--json", help="write the numbers (and the --gen samples) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")


def _sample_args(p):
    p.add_argument("path", nargs="?", help="run directory or its model/ folder")
    p.add_argument("--checkpoint", help="same as the positional path")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; '-' reads one prompt per line from stdin)")
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, help="hard bound on new tokens per prompt (generation stops at EOS)")
    p.add_argument("--sampler", choices=SAMPLERS, help="threshold (default), first_hitting, fixed, ddpm, remask, entropy_bound")
    p.add_argument("--steps-per-block", type=int, help="denoising-step budget per block (default: block_length)")
    p.add_argument("--tau", type=float, help="threshold sampler: reveal tokens with confidence >= tau (default 0.9)")
    p.add_argument("--tokens-per-step", type=int, help="fixed sampler: tokens revealed per step")
    p.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--window", type=int, help="sliding-window size in tokens (default: the training context)")
    p.add_argument("--block-length", type=int, help="generate with this block length instead of the model's (mixture models)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every forward (for comparison)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i, whatever else is in the batch")
    p.add_argument("--show-denoising", action="store_true", help="draw the block being denoised live")
    p.add_argument("--trace", help="write every denoising step as JSON lines to this file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")


def _sweep_args(p):
    p.add_argument("file", nargs="?", help="sweep file (configs/sweeps/NAME.yaml)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (subprocesses when > 1)")
    p.add_argument("--only", action="append", help="run only this run name (repeatable)")
    p.add_argument("--out-dir", help="override the sweep file's out_dir")
    p.add_argument("--report", metavar="DIR", help="summarise the finished runs below DIR instead of running")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again the finished runs whose config changed since (default: refuse, naming them)")
    p.add_argument("-c", "--config", action="append", default=[], help="config file applied to every run (after the sweep's overrides)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run, e.g. trainer.max_steps=2000")


def _config_verb_args(p):
    p.add_argument("action", choices=["show", "validate", "keys"])
    p.add_argument("--markdown", action="store_true", help="keys: print a markdown table")
    _config_args(p)


@dataclass
class Verb:
    run: Callable
    add_arguments: Callable


COMMANDS: dict[str, Verb] = {
    "train": Verb(cmd_train, _train_verb_args),
    "finetune": Verb(cmd_finetune, _finetune_args),
    "export": Verb(cmd_export, _export_args),
    "eval": Verb(cmd_eval, _eval_args),
    "sample": Verb(cmd_sample, _sample_args),
    "config": Verb(cmd_config, _config_verb_args),
    "demo": Verb(cmd_demo, _train_args),
    "sweep": Verb(cmd_sweep, _sweep_args),
}


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose errors (a bad flag value, a missing argument) are ``UsageError``s: one ``error:`` line
    on stderr and status 2 like every other user error, instead of a usage block and an exit from inside parsing."""

    def error(self, message: str):
        raise UsageError(f"{message} (`{self.prog} --help` lists the arguments)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockdiff")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        from blockdiff import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"blockdiff {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, verb in COMMANDS.items():
        doc = verb.run.__doc__.strip()
        verb.add_arguments(sub.add_parser(name, help=doc.splitlines()[0], description=doc))
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot give a trailing `key=value` list to a verb whose positionals were already matched
    # (`config validate -c FILE key=value`); such leftovers are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_shared_flags(args)
    return args


def _check_shared_flags(args: argparse.Namespace) -> None:
    """Flags several verbs take, checked once before any work: ``--seed`` must be a seed every RNG accepts."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed {seed} is out of range: a seed is an integer from 0 to {SEED_MAX}")


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: no per-map progress bars or banner tips from the libraries."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _only_our_warnings():
    """While a verb runs, show blockdiff's own warnings and hide the libraries' (deprecation notices from
    transformers / torch / lightning, with their site-packages paths, are for those libraries' users, not
    ours). Scoped to the command, not set on import: code that imports blockdiff keeps its own filters.
    ``python -W ...`` / ``PYTHONWARNINGS`` (``sys.warnoptions``) still decide when given."""
    with warnings.catch_warnings():
        if not sys.warnoptions:
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"blockdiff(\.|$)")
        yield


def main(argv: list[str] | None = None) -> int:
    with _only_our_warnings():
        try:
            args = _parse(argv)
            _quiet_libraries()
            COMMANDS[args.verb].run(args)
        except UserError as err:  # the one place user errors are caught: plain text, stderr, no markup
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
