"""``blockdiff distill``: the teacher's own continuations of training-split corpus prompts, as a distilled set."""

from __future__ import annotations

from rich.markup import escape

from blockdiff.cli import options, render
from blockdiff.cli.render import console

DEFAULT_TEACHER = "smollm2"


def run(args) -> None:
    """Continue training-split corpus prompts with a teacher (greedy and/or sampled) and store them for training.

    The corpus and its split come from the fine-tuning config (-c FILE, data.* overrides), so the prompts are never
    from the held-out tail `blockdiff finetune` holds out with the same keys. The set is written shard by shard to
    --out: run the same command again to resume a stopped one. Train on it with
    `blockdiff finetune --base TEACHER data.source=distilled:DIR`.
    """
    from blockdiff.training.distill import distill
    from blockdiff.training.finetune import finetune_config

    cfg = finetune_config(None, args.config, args.overrides)
    teacher = args.teacher or cfg.model.pretrained or DEFAULT_TEACHER
    try:
        with render.stage_progress() as progress:
            result = distill(
                teacher, cfg.data, args.out, temperatures=tuple(args.temperature or (0.0,)),
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, num_prompts=args.num_prompts,
                batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed, device=args.device,
                overwrite=args.overwrite, progress=progress,
            )
    except KeyboardInterrupt:
        console.print(f"[yellow]{escape(_how_to_resume(args))}[/]", highlight=False)
        raise
    s = result.settings
    done = "already complete, nothing to do" if result.shards_written == 0 else (
        f"{result.shards_written} shard(s) written"
        + (f", {result.shards_skipped} already there (resumed)" if result.shards_skipped else "")
        + f" in {result.seconds:.1f} s ({result.generated_tokens / max(result.seconds, 1e-9):.1f} tokens/s, "
        f"{1000 * result.seconds / max(result.rows_written, 1) / 60:.1f} min per 1,000 continuations)"
    )
    console.print(
        f"{result.rows} continuations ({s.num_prompts} prompts × temperatures {list(s.temperatures)}) of "
        f"{escape(s.teacher)} in [bold]{escape(str(result.out_dir))}[/]: {done}", highlight=False,
    )
    source = f"distilled:{result.out_dir}"
    console.print(f"train on it: `blockdiff finetune --base {escape(s.teacher)} data.source={escape(source)}`",
                  highlight=False)


def _how_to_resume(args) -> str:
    """What Ctrl-C leaves and the command that resumes: the same one (its settings must match the set's), without
    ``--overwrite``, which is only for replacing a set made with other settings."""
    import shlex

    command = [part for part in getattr(args, "command_line", ["blockdiff", "distill"]) if part != "--overwrite"]
    return (
        f"interrupted: the shards finished so far are kept in {args.out}; resume with the same command: "
        f"`{shlex.join(command)}`"
    )


def add_arguments(p):
    p.add_argument("--teacher", help="hub id, local model directory, .gguf file or 'smollm2' (default: the config's "
                   f"model.pretrained, i.e. {DEFAULT_TEACHER}, offline)")
    options.config_args(p)
    p.add_argument("--out", default="runs/distilled", help="the distilled set's directory (default: runs/distilled)")
    p.add_argument("--num-prompts", type=int, default=256, help="training windows to take prompts from (default 256)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each prompt (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="most tokens the teacher adds to each (default 64)")
    p.add_argument("--temperature", type=float, action="append", metavar="T",
                   help="one continuation per prompt at each (repeatable; 0 = greedy, the default)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call (default 16)")
    p.add_argument("--shard-size", type=int, default=64, help="prompts per shard, the unit of resuming (default 64)")
    p.add_argument("--seed", type=int, default=0, help="the prompt order and the sampling streams")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the distilled set in --out made with other settings (a folder holding anything else is never "
        "deleted); the same settings resume it without this flag",
    )
