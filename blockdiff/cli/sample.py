"""``blockdiff sample``: generate text block by block from a run or model directory."""

from __future__ import annotations

import contextlib
import sys

from blockdiff.cli.options import add_drafter_flags, true_or_false
from blockdiff.cli.render import console
from blockdiff.errors import MissingFileError, UsageError


def run(args) -> None:
    """Generate text block by block; prompts from --prompt, --prompt-file or stdin are batched together."""
    from blockdiff.modeling.io import load_model_dir

    path = args.checkpoint or args.path
    if path is None:
        raise UsageError("say which model to sample from: blockdiff sample RUN_DIR (or --checkpoint RUN_DIR)")
    if args.speculative:
        _check_speculative_flags(args)
    elif args.base is not None:
        raise UsageError("--base names the verifier of --speculative decoding; add --speculative")
    elif args.drafter is not None or any(getattr(args, n) is not None for n in _drafter_knobs()):
        raise UsageError("--drafter and its settings choose the drafter of --speculative decoding; add --speculative")
    if args.trace:  # before any work: an existing file is replaced only with --overwrite
        from blockdiff.files import check_output_file

        check_output_file(args.trace, "--trace", args.overwrite, inputs=[p for p in (args.prompt_file,) if p])
    _check_beam_flags(args)
    prompts = _read_prompts(args)
    if args.speculative:
        _speculate(args, path, prompts)
        return
    loaded = load_model_dir(path, device=args.device, lean=False if args.no_lean else None)
    if args.block_length is not None:  # e.g. a block-length-mixture model at another of its lengths
        loaded.model = loaded.model.with_block_length(args.block_length)
    config = _settings(args, loaded.model)
    texts, out = _generate(args, loaded, prompts, config)
    _print_samples(prompts, texts, out)


def _check_beam_flags(args) -> None:
    """``--block-beams`` / ``--beam-width`` bounded before the model is loaded (a million beams would be OOM-killed)."""
    from blockdiff.sampling.config import check_beams

    beams, width = args.block_beams or 1, args.beam_width or 1
    if beams >= 1 and width >= 1:  # below 1: the generation config's own check says so
        check_beams(beams, width, ("--block-beams", "--beam-width"))


def _drafter_knobs() -> dict:
    """Every drafter's knobs (imported here, not at the top: ``blockdiff --help`` does not import torch)."""
    from blockdiff.sampling.speculative.registry import drafter_knobs

    return drafter_knobs()


def _settings(args, model):
    """The model's generation config with the flags given as overrides (a copy: the model's own is never changed),
    checked before any work (and before ``--trace`` makes a file) by ``resolve``."""
    from blockdiff.sampling.inputs import with_overrides
    from blockdiff.sampling.resolve import resolve
    from blockdiff.sampling.samplers.registry import knobs

    settings = {
        "max_new_tokens": args.max_new_tokens,
        "sampler": args.sampler,
        "steps_per_block": args.steps_per_block,
        **{name: getattr(args, name) for name in knobs()},  # each sampler's knobs (add_sampler_flags)
        "drafter": args.drafter,
        **{name: getattr(args, name) for name in _drafter_knobs()},  # each drafter's knobs (add_drafter_flags)
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "window": args.window,
        "block_beams": args.block_beams,
        "beam_width": args.beam_width,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    if (args.block_beams or 1) * (args.beam_width or 1) > 1 and (args.trace or args.show_denoising):
        raise UsageError("--trace and --show-denoising follow one sample's denoising steps; they do not apply to "
                         "block beam search (--block-beams / --beam-width > 1)")
    if args.no_cache:
        settings["use_cache"] = False
    from blockdiff.sampling.config import BlockDiffusionGenerationConfig

    base = model.generation_config if model is not None else BlockDiffusionGenerationConfig()  # None: a plain decoder
    config = with_overrides(base, settings)
    resolve(model, config, speculative=args.speculative)
    return config


def _generate(args, loaded, prompts: list[str], config):
    """Sample every prompt in one batch, feeding the trace file and the live view (``_watching``)."""
    import torch

    from blockdiff.sampling import encode_prompts, sample_texts
    from blockdiff.viewer.watch import trace_end

    ids = encode_prompts(loaded.tokenizer, prompts)
    device = loaded.model.device  # sample i: seed + i, whatever else is in the batch
    generators = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(prompts))]
    ending: list = []
    with _watching(args, loaded, ids, prompts, _trace_header(loaded, config, ids), ending) as observer:
        texts, out = sample_texts(loaded.model, loaded.tokenizer, prompts, generators, observer=observer,
                                  generation_config=config)
        ending.append(lambda seen: trace_end(out, texts, loaded.tokenizer, seen | {t for p in ids for t in p}))
    return texts, out


def _trace_header(loaded, config, ids: list[list[int]], speculative: str | None = None) -> dict:
    """The trace's first line (what makes it viewable): the model, the prompts' token ids and the settings in force
    (``speculative``: the sampler's own settings do not apply, the verifier chooses every token)."""
    from blockdiff.sampling.samplers.registry import knobs_of
    from blockdiff.viewer.watch import trace_header

    own = () if speculative else ("sampler", "steps_per_block", *knobs_of(config.sampler))
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", *own)
    settings = {k: getattr(config, k, None) for k in keys if getattr(config, k, None) is not None}
    if speculative:
        settings["speculative"] = speculative
    return trace_header(ids, loaded.model.mask_token_id, loaded.model.block_length, str(loaded.directory), settings)


@contextlib.contextmanager
def _watching(args, loaded, ids: list[list[int]], prompts: list[str], header: dict | None = None, ending=()):
    """The observer of every step (``StepEvent``): the ``--trace`` file, the ``--show-denoising`` live view and the
    finished blocks. On Ctrl-C print the finished blocks and keep the trace's complete lines; on any other failure
    leave no trace file. ``header`` starts the trace; ``ending`` holds (after the run) a function of the token ids
    seen that gives its end record (``blockdiff view`` needs both)."""
    from blockdiff.viewer.watch import FinishedBlocks, LiveView, TraceWriter, fan_out

    finished = FinishedBlocks([len(p) for p in ids])
    trace = TraceWriter(args.trace, header) if args.trace else None
    live = LiveView(loaded.tokenizer, loaded.model.mask_token_id, console, prompts=ids) if args.show_denoising else None
    try:
        with live or contextlib.nullcontext():
            yield fan_out(finished, trace, live)
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
        trace.close(end=ending[0](trace.seen) if ending else None)
        if header is not None:
            console.print(f"trace: {args.trace} — see it with `blockdiff view {args.trace}`", markup=False,
                          highlight=False)


def _print_samples(prompts: list[str], texts: list[str], out) -> None:
    reasons = {"eos": "EOS", "stop_string": "a stop string", "max_new_tokens": "max_new_tokens"}
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        console.rule(f"sample {i}: {int(out.lengths[i])} tokens, stopped at {reasons[out.stop_reasons[i]]}")
        console.print(prompt + text, markup=False, highlight=False)
    per_sample = out.sample_nfe.float().mean().item()
    batched = f" ({out.nfe} batched forwards for {len(prompts)} samples)" if len(prompts) > 1 else ""
    console.print(
        f"NFE {per_sample:.1f} per sample{batched}, {out.sample_tokens_per_forward:.2f} new tokens per forward per "
        f"sample, {out.tokens_processed_per_forward:.1f} tokens processed per batched forward, "
        f"largest KV cache {out.max_cache_length} tokens",
        highlight=False,
    )


# -- --speculative: the base decoder verifies the model's block drafts (blockdiff/sampling/speculative/loop.py) -----
def _check_speculative_flags(args) -> None:
    """Refuse the flags that mean nothing when the verifier chooses every token (before any loading)."""
    from blockdiff.sampling.samplers.registry import knobs

    given = {"--sampler": args.sampler, "--steps-per-block": args.steps_per_block, "--window": args.window,
             "--block-beams": args.block_beams, "--beam-width": args.beam_width,
             "--no-cache": args.no_cache or None, **{f"--{n.replace('_', '-')}": getattr(args, n) for n in knobs()}}
    wrong = [flag for flag, value in given.items() if value is not None]
    if wrong:
        raise UsageError(
            f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --speculative: the verifier "
            "chooses every token"
        )


def _speculate(args, path: str, prompts: list[str]) -> None:
    """Each prompt on its own (speculative decoding is batch 1), with the verifier and drafter that
    ``modeling/speculative.py``'s ``load_speculative`` picks for ``path`` (the decision ``blockdiff serve
    --speculative`` shares): a plain decoder verifying drafts that need no network (``lookup``, its default), or a
    block diffuser drafting for its base decoder (``--base``, default its ``model.pretrained``) or verifying its own
    drafts (``fused``, the default for a model with a gated adapter and a token-causal clean stream)."""
    import torch

    from blockdiff.modeling.speculative import load_speculative, plain_decoder
    from blockdiff.sampling import encode_prompts
    from blockdiff.sampling.inputs import with_overrides
    from blockdiff.sampling.outputs import GenerationOutput
    from blockdiff.sampling.speculative import speculative_generate
    from blockdiff.viewer.watch import SpeculativeEvents, trace_end

    if plain_decoder(path, args.drafter) and (args.trace or args.show_denoising or args.base is not None
                                              or args.block_length is not None):
        raise UsageError(f"{path} is a plain decoder: --trace, --show-denoising, --base and --block-length need a "
                         "block diffuser (give a blockdiff model instead of the decoder)")
    models = load_speculative(path, args.drafter, args.base, device=args.device,
                              lean=False if args.no_lean else None, block_length=args.block_length)
    config = with_overrides(_settings(args, models.model), {"drafter": models.drafter})
    pair = models.drafter_for(config)
    tokenizer, loaded = models.tokenizer, models.loaded
    device = (models.model if models.model is not None else models.verifier).device
    ids = encode_prompts(tokenizer, prompts)

    def one(i: int, observer=None):
        out = speculative_generate(pair, None, ids[i], generation_config=config, observer=observer,
                                   generator=torch.Generator(device=device).manual_seed(args.seed + i),
                                   eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out.new_tokens(0), skip_special_tokens=True)
        _print_speculative(prompts[i], i, text, out, models.who)
        return out, text

    if loaded is None:  # a plain decoder: nothing to trace or draw
        for i in range(len(ids)):
            one(i)
        return
    header = _trace_header(loaded, config, ids, speculative=pair.name.replace("_", "-"))
    outs, texts, ending = [], [], []
    with _watching(args, loaded, ids, prompts, header, ending) as watch:
        for i, prompt_ids in enumerate(ids):
            events = SpeculativeEvents(watch, prompt_ids, loaded.model.block_length, loaded.model.mask_token_id, i)
            out, text = one(i, events)
            events.close()
            outs.append(out)
            texts.append(text)
        stacked = GenerationOutput.stack(outs, tokenizer.pad_token_id or 0)
        ending.append(lambda seen: trace_end(stacked, texts, tokenizer, seen | {t for p in ids for t in p}))


def _print_speculative(prompt: str, i: int, text: str, out, who: str) -> None:
    reasons = {"eos": "EOS", "max_new_tokens": "max_new_tokens", "max_length": "the verifier's context"}
    console.rule(f"sample {i}: {int(out.lengths[0])} tokens, stopped at {reasons[out.stop_reasons[0]]}")
    console.print(prompt + text, markup=False, highlight=False)
    forwards = (
        f"{out.verifier_forwards} forwards (1 forward per step: verify + draft)" if out.drafter_forwards == 0
        else f"{out.verifier_forwards} verifier + {out.drafter_forwards} drafter forwards"
    )
    console.print(
        f"speculative ({who}): {forwards}, {out.tokens_per_verifier_forward:.2f} new tokens per verifier "
        f"forward, {out.acceptance_rate:.0%} of drafts kept; drafts kept per step: {out.acceptance_histogram}",
        highlight=False,
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
            raise UsageError(
                f"--prompt-file {args.prompt_file} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
    if not args.prompt and not args.prompt_file and not sys.stdin.isatty():
        prompts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
    if not prompts and (args.prompt or args.prompt_file):
        raise UsageError("the prompt list is empty (empty --prompt-file or stdin)")
    return prompts or [""]


def add_arguments(p):
    p.add_argument("path", nargs="?", help="run directory or its model/ folder (with --speculative also a plain "
                   "decoder: a local directory, a .gguf or smollm2, verifying lookup drafts; a hub id with --drafter "
                   "lookup)")
    p.add_argument("--checkpoint", help="same as the positional path")
    p.add_argument(
        "--prompt", action="append", help="prompt text (repeatable; '-' reads one prompt per line from stdin)"
    )
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, help="hard bound on new tokens per prompt (generation stops at EOS)")
    add_sampler_flags(p)
    p.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--window", type=int, help="sliding-window size in tokens (default: the training context)")
    p.add_argument("--block-beams", type=int, help="block beam search: candidate blocks per beam at every block")
    p.add_argument("--beam-width", type=int, help="block beam search: beams kept after each block (default 1)")
    p.add_argument(
        "--block-length", type=int, help="generate with this block length instead of the model's (mixture models)"
    )
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every forward (for comparison)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i, whatever else is in the batch")
    p.add_argument("--show-denoising", action="store_true", help="draw the block being denoised live")
    p.add_argument("--trace", help="write every denoising step as JSON lines to this file")
    p.add_argument("--overwrite", action="store_true", help="with --trace: replace the file if it already exists")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--no-lean", action="store_true", help="on CPU, keep the plain kernels (default: fp32 weights are "
                   "packed once for oneDNN, which makes forwards of a few tokens cheaper; docs/generation.md)")
    p.add_argument(
        "--speculative", action="store_true",
        help="lossless speculative decoding: the model drafts blocks, its base decoder verifies (one prompt at a time; "
        "in one forward per step for a model with a gated adapter and a causal clean stream)",
    )
    add_drafter_flags(p)
    p.add_argument(
        "--base", help="with --speculative: a separate verifier (default: the model's own frozen base when it has a "
        "gated adapter and a causal clean stream, else the model.pretrained it was tuned from)",
    )


def add_sampler_flags(p) -> None:
    """``--sampler`` (the registered names), ``--steps-per-block`` and one flag per sampler knob, read from the
    sampler registry when the parser is built (``blockdiff/sampling/samplers/registry.py``; imported here, not at the
    top, so ``blockdiff --help`` does not import torch)."""
    from blockdiff.sampling.samplers.registry import GENERAL, knobs, sampler_names

    names = [f"{n} (default)" if n == GENERAL["sampler"] else n for n in sampler_names()]
    p.add_argument("--sampler", choices=sampler_names(), help=", ".join(names))
    p.add_argument("--steps-per-block", type=int, help="denoising-step budget per block (default: block_length)")
    for k in knobs().values():
        default = "" if k.default is None else f" (default {k.default})"
        kind = true_or_false if k.type is bool else k.type
        p.add_argument(f"--{k.name.replace('_', '-')}", type=kind, help=f"{k.sampler} {k.family}: {k.doc}{default}")
