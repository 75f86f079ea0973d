"""One way from a generation config to the settings a generation runs with (docs/design.md §8, §9, §14).

```
settings = resolve(model, config, prompts)     # every check, before any forward
    config.check(block_length, schedule)       # the settings themselves (each sampler / drafter checks its knobs)
    window      = config.window or the training context in whole blocks (at least two blocks)   # window_of
    temperature = 0 if do_sample is False else temperature (None -> 0)                          # temperature_of
    EOS ids, pad id, the trained schedule, the sampler, the stop strings, the prompts (copied per returned sequence)
```

``generate`` (the block loop), the server engine, the lm-eval backend and speculative decoding all call it, so the
window rule and the temperature rule are written here only. ``resolve`` never changes ``config``: callers pass
overrides (``with_overrides``, a copy), never write into a model's own generation config.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockdiff.core.noise import make_schedule
from blockdiff.errors import UsageError
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.samplers.base import Sampler
from blockdiff.sampling.samplers.registry import make_rule, make_sampler, sampler_class, sampler_names

__all__ = ["Settings", "resolve", "window_of", "temperature_of", "eos_ids_of"]


@dataclass(frozen=True)
class Settings:
    """The checked settings of one generation call (``resolve``)."""

    config: BlockDiffusionGenerationConfig  # the settings as given (checked; never modified here)
    prompts: list[list[int]]  # one per returned sequence: each prompt num_return_sequences times, in order
    copies: int  # num_return_sequences
    window: int | None  # tokens the network sees (None: no limit)
    eos_ids: frozenset[int]  # a sample stops after any of them
    pad_id: int
    schedule: object  # the noise schedule the model was trained with (DDPM follows its alpha(t))
    sampler: Sampler | None  # the block loop's step rule (None: speculative decoding, the verifier chooses)
    temperature: float  # 0 = greedy (do_sample=False or temperature 0)
    max_new_tokens: int
    stops: tuple[str, ...]  # stop strings ((): none)
    stop: object = None  # the adaptive stop (``samplers/adaptive_stop.py``) when stop_stable_steps is set, else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def temperature_of(config) -> float:
    """The temperature a generation samples at: ``do_sample=False`` is greedy whatever the temperature (as in
    transformers), ``temperature`` 0 or unset is greedy too."""
    return 0.0 if config.do_sample is False else float(config.temperature or 0.0)


def window_of(model, window: int | None = None, context: int | None = None) -> int | None:
    """The tokens the network sees: ``window`` if given, else the training context (``model.spec.max_seq_len``, else
    ``context``) in whole blocks; at least two blocks (the block being denoised and the one before it). ``None``:
    no limit (neither is known)."""
    l = model.block_length
    context = model.spec.max_seq_len or context
    window = window or (context // l * l if context else None)
    return None if window is None else max(window, 2 * l)


def eos_ids_of(eos) -> frozenset[int]:
    """``eos_token_id`` (one id, a list of them or ``None``) as a set."""
    return frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def resolve(model, config: BlockDiffusionGenerationConfig, prompts: list[list[int]] | None = None, *,
            streamer=None, context: int | None = None, speculative: bool = False) -> Settings:
    """Every check of a generation call before any work, and the settings it runs with (module docstring).

    ``model``: the ``BlockDiffusionLM`` (``None``: a speculative drafter that is no block diffuser; only the
    settings are checked). ``prompts``: token-id lists (``None``: check the settings only; the server checks its
    prompts against ``window`` with its own error). ``streamer``: a transformers streamer (it follows one sample).
    ``context``: the context to assume when the model records none (the lm-eval backend's ``max_length``).
    ``speculative``: for speculative decoding (no sampler; the settings only the block loop has are refused when
    set)."""
    schedule = make_schedule(model.spec.schedule) if model is not None else None
    config.check(model.block_length if model is not None else 1, schedule)
    if speculative:
        _refuse_block_loop_only(config)
        sampler = None
    else:
        sampler = make_sampler(config, schedule)  # one sampler for every block of the call
        if model.spec.noise_kind == "uniform" and not sampler.rewrites:
            usable = [n for n in sampler_names() if sampler_class(n).rewrites]
            raise UsageError(
                f"sampler={config.sampler!r} reveals mask tokens, but this model was trained with uniform noise "
                f"(noise.kind=uniform: no mask to reveal); use sampler= one of {usable}"
            )
        if model.spec.noise_kind != "uniform" and not sampler.reveals:
            usable = [n for n in sampler_names() if sampler_class(n).reveals]
            raise UsageError(
                f"sampler={config.sampler!r} renoises random tokens, but this model was trained with absorbing noise "
                f"(noise.kind=absorbing: its noise is the mask token); use sampler= one of {usable}"
            )
    copies = config.num_return_sequences or 1
    given = prompts is not None
    prompts = [p for p in prompts for _ in range(copies)] if given else []
    window = window_of(model, config.window, context) if model is not None else None
    if model is not None and (given or streamer is not None):  # no prompt at all is an error too
        _check_prompts(model, prompts, config, window, streamer)
    stops = tuple(config.stop_string_list()) if config.stop_strings is not None else ()
    stop = make_rule("adaptive_stop", config) if not speculative else None
    return Settings(
        config=config, prompts=prompts, copies=copies, window=window, eos_ids=eos_ids_of(config.eos_token_id),
        stop=stop if stop is not None and stop.active else None,
        pad_id=config.pad_token_id if config.pad_token_id is not None else 0, schedule=schedule, sampler=sampler,
        temperature=temperature_of(config), max_new_tokens=config.max_new_tokens, stops=stops,
    )


def _refuse_block_loop_only(config) -> None:
    """Speculative decoding writes one sequence per prompt, token by token as the verifier would: the settings that
    only the block loop honours are refused when they are set."""
    unset = {"stop_strings": (None,), "min_new_tokens": (None, 0), "num_return_sequences": (None, 1),
             "block_beams": (1,), "beam_width": (1,)}
    given = [f"{k}={getattr(config, k)!r}" for k, off in unset.items() if getattr(config, k) not in off]
    if given:
        raise UsageError(f"{', '.join(given)}: not supported by speculative decoding (one sequence per prompt, "
                         "token by token as the verifier writes it); remove them")


def _check_prompts(model, prompts, config, window, streamer) -> None:
    """Every input check on the prompts (the settings are ``config.check``'s)."""
    l, mask_id, vocab = model.block_length, model.mask_token_id, model.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("give at least one prompt, each with at least one token (e.g. BOS)")
    if streamer is not None and len(prompts) != 1:
        raise UsageError("a streamer follows one sample: pass a single prompt (and num_return_sequences=1)")
    if any(not 0 <= t < vocab or t == mask_id for p in prompts for t in p):
        raise UsageError(f"prompt token ids must be in [0, {vocab}) and not the mask token {mask_id}")
    max_positions = model.max_positions
    largest = max_positions // l * l if max_positions else None  # the largest window the network's positions allow
    if config.window is not None and largest is not None and config.window > largest:
        raise UsageError(
            f"window={config.window} exceeds the {max_positions} positions the network was built for; "
            f"use window <= {largest}"
        )
    if window is None:
        return
    longest = max(len(p) for p in prompts)
    if longest + l > window:
        needed = -(-(longest + l) // l) * l  # the smallest window that fits it, in whole blocks
        if largest is None or needed <= largest:
            fix = f"shorten it to at most {window - l} tokens, or pass window={needed} (or more)"
        else:
            fix = (f"shorten it to at most {largest - l} tokens: the network has {max_positions} positions, so "
                   f"the largest window is {largest}" + (f" (pass window={largest})" if largest > window else ""))
        raise UsageError(
            f"a prompt of {longest} tokens does not fit the window of {window} tokens with one block "
            f"({l} tokens) to spare; {fix}"
        )
