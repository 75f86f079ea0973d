"""Lossless speculative block decoding: the AR decoder verifies what the block diffuser drafts (docs/design.md
§14, docs/generation.md "Speculative decoding"). Batch 1.

```
committed = prompt;  verifier cache = empty
while not done:
    drafts, q = drafter.draft(committed)                         # k tokens after the committed ones, one forward
    p = verifier([last committed token not cached ; drafts])     # one forward with its cache -> k + 1 predictions
    greedy:   accept the longest prefix with draft == argmax p, then the verifier's own next token
    sampling: keep draft i with prob min(1, p/q); first rejection: draw from norm(max(0, p - q)); all kept: draw p
    committed += accepted drafts + that token (cut after EOS / at max_new_tokens)
    verifier cache cropped to committed[:-1]                      # rejected drafts leave it, exactly
```

Each step commits ``accepted + 1 >= 1`` tokens for one verifier forward. Greedy output is token for token
``verifier.generate(do_sample=False)``'s (exact arithmetic; tested in fp64, where no argmax tie flips); sampled
output has the distribution of ``verifier.generate(do_sample=True, temperature=, top_k=, top_p=)`` (the same
transformers warpers, in the same order, on both models: ``speculative_verify.Sampling``). The drafter only
decides how fast: any drafter gives the verifier's output.

Counting: ``SpeculativeOutput.verifier_forwards`` (one per step; the prompt is folded into the first),
``drafter_forwards``, ``acceptance_histogram[a]`` = steps that kept ``a`` drafts, and
``tokens_per_verifier_forward`` = new tokens / verifier forwards (accepted + 1 on average, less when EOS or
``max_new_tokens`` cut the last step). ``nfe`` counts the forwards of both models.

Shape legend: ``k`` drafts, ``v`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.outputs import GenerationOutput
from blockdiff.sampling.speculative_drafters import BlockDrafter, Draft, Drafter
from blockdiff.sampling.speculative_verify import CausalLMVerifier, Sampling, accept_greedy, accept_sampled

__all__ = [
    "speculative_generate", "SpeculativeOutput", "SpeculativeStep", "check_verifier", "Drafter", "Draft",
    "BlockDrafter", "CausalLMVerifier", "Sampling",
]

BATCH_ONE = "speculative decoding needs batch 1 (one prompt, one sequence): call it once per prompt"


@dataclass
class SpeculativeOutput(GenerationOutput):
    """``GenerationOutput`` (one row) plus the counts of speculative decoding."""

    verifier_forwards: int = 0
    drafter_forwards: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)  # [a]: verification steps that kept a drafts
    drafted_tokens: int = 0  # drafts the verifier checked
    accepted_tokens: int = 0  # of them, kept

    @property
    def tokens_per_verifier_forward(self) -> float:
        """New tokens per verifier forward (accepted + 1 per step; 1.0 for plain AR decoding)."""
        return float(self.lengths.sum()) / max(1, self.verifier_forwards)

    @property
    def acceptance_rate(self) -> float:
        """Kept drafts / checked drafts."""
        return self.accepted_tokens / max(1, self.drafted_tokens)


@dataclass
class SpeculativeStep:
    """One verification step, for observers."""

    step: int
    drafts: list[int]  # the drafts the verifier checked
    accepted: int  # how many of them were kept
    new_tokens: list[int]  # what the step committed (kept drafts + the verifier's token, cut at EOS / the limit)
    committed: list[int]  # every committed token so far (prompt included)


@torch.no_grad()
def speculative_generate(
    verifier,
    drafter,
    input_ids,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    do_sample: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    observer: Callable[[SpeculativeStep], None] | None = None,
    check_base: bool = True,
) -> SpeculativeOutput:
    """Continue one prompt by up to ``max_new_tokens`` tokens, drafting with ``drafter`` and verifying with
    ``verifier``; the output is the verifier's own (module docstring).

    ``verifier``: a plain Hugging Face causal LM (the base decoder the drafter was fine-tuned from) or a
    ``CausalLMVerifier``. ``drafter``: a ``BlockDiffusionLM`` (drafting with ``BlockDrafter``) or any ``Drafter``.
    ``input_ids``: one prompt, a list of ids or a ``(1, p)`` / ``(p,)`` tensor. ``temperature == 0`` or
    ``do_sample=False`` is greedy. ``eos_token_id`` defaults to the verifier's. ``generator`` seeds the drafts,
    the acceptance tests and the resampling. ``streamer``: a transformers streamer (the prompt, then each step's
    tokens). ``check_base``: refuse a drafter that does not look fine-tuned from this verifier
    (``check_verifier``); pass ``False`` to pair unrelated models (still exact, only slower).
    """
    prompt = _prompt(input_ids)
    drafter = drafter if isinstance(drafter, Drafter) else BlockDrafter(drafter)
    check_verifier(verifier.model if isinstance(verifier, CausalLMVerifier) else verifier, drafter, related=check_base)
    ver = verifier if isinstance(verifier, CausalLMVerifier) else CausalLMVerifier(verifier)
    if do_sample is False:
        temperature = 0.0
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    if any(not 0 <= t < ver.vocab_size for t in prompt):
        raise UsageError(f"prompt token ids must be in [0, {ver.vocab_size}) (the verifier's vocabulary)")
    sampling = Sampling(ver.vocab_size, float(temperature), top_k, top_p)
    if eos_token_id is None:  # what the verifier's own generate() would stop at
        defaults = getattr(ver.model, "generation_config", None) or ver.model.config
        eos_token_id = defaults.eos_token_id
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
    positions = getattr(ver.model.config, "max_position_embeddings", None)
    if positions is not None and len(prompt) >= positions:
        raise UsageError(
            f"a prompt of {len(prompt)} tokens leaves no room in the verifier's {positions} positions; shorten it"
        )
    ver.reset()
    drafter.reset()
    committed, hist, drafted, reason = list(prompt), [], 0, None
    if streamer is not None:
        streamer.put(torch.tensor([prompt]))
    while reason is None:
        new = len(committed) - len(prompt)
        room = max_new_tokens - new if positions is None else min(max_new_tokens - new, positions - len(committed))
        draft = drafter.draft(committed, room - 1, sampling, generator) if room > 1 else Draft(torch.zeros(0))
        tokens = draft.tokens[: room - 1].long()  # (k,) ragged last step: never check more than can be kept
        logits = ver.score(committed, tokens)  # (k + 1, v)
        if sampling.greedy:
            accepted, extra = accept_greedy(sampling.fit(logits), tokens)
        else:
            q = draft.probs[: len(tokens)] if draft.probs is not None else None
            accepted, extra = accept_sampled(sampling.probs(logits), q, tokens, generator)
        step = tokens[:accepted].tolist() + [extra]
        step, reason = _cut(step, eos, room, max_new_tokens - new)
        committed += step
        ver.commit(committed)
        drafter.commit(committed, accepted)
        hist += [0] * (accepted + 1 - len(hist))
        hist[accepted] += 1
        drafted += len(tokens)
        if streamer is not None:
            streamer.put(torch.tensor([step]))
        if observer is not None:
            observer(SpeculativeStep(sum(hist) - 1, tokens.tolist(), accepted, step, list(committed)))
    if streamer is not None:
        streamer.end()
    return _output(prompt, committed, reason, ver, drafter, hist, drafted)


def _prompt(input_ids) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise UsageError(f"{BATCH_ONE} (got a batch of {input_ids.shape[0]})")
        if input_ids.dim() not in (1, 2):
            raise UsageError("input_ids must be one prompt: a (1, p) or (p,) tensor, or a list of token ids")
        prompt = input_ids.reshape(-1).tolist()
    elif isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        if len(input_ids) != 1:
            raise UsageError(f"{BATCH_ONE} (got {len(input_ids)} prompts)")
        prompt = list(input_ids[0])
    else:
        prompt = list(input_ids)
    if not prompt or not all(isinstance(t, int) for t in prompt):
        raise UsageError("give one prompt of at least one token id (e.g. BOS)")
    return prompt


def _check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise UsageError(f"temperature must be 0 (greedy) or a positive number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise UsageError(f"top_k must be a non-negative integer (0 or None: off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")


def _cut(step: list[int], eos: set[int], room: int, left: int) -> tuple[list[int], str | None]:
    """The step's tokens up to and including the first EOS, at most ``room``; and why generation stops, if it does."""
    end = next((i + 1 for i, t in enumerate(step) if t in eos), None)
    if end is not None and end <= room:
        return step[:end], "eos"
    step = step[:room]
    if len(step) == left:
        return step, "max_new_tokens"
    return step, ("max_length" if len(step) == room else None)


def check_verifier(verifier, drafter, related: bool = True, tokenizer=None, verifier_tokenizer=None) -> None:
    """Refuse a verifier that cannot check this drafter's tokens, with what to do instead.

    Always: the verifier is a plain causal LM (not a block diffuser) whose vocabulary fits in the drafter's (every
    token it writes is fed back to the drafter). With ``tokenizer`` (the drafter's) and ``verifier_tokenizer``: the
    verifier's tokenizer maps every token to the id the drafter's does. ``related`` (a ``BlockDiffusionLM`` drafter
    only): the same architecture and hidden size, and the embedding rows the two share are close (fine-tuning moves
    them little; two unrelated networks differ by about their own norm), so the drafts are worth checking.
    """
    if hasattr(verifier, "spec") and hasattr(verifier, "block_length"):
        raise UsageError(
            "the verifier must be a plain causal LM (the decoder the block diffuser was fine-tuned from), not a "
            "BlockDiffusionLM; pass its base model (blockdiff.modeling.pretrained.load_decoder(NAME))"
        )
    fix = "pass the decoder the model was fine-tuned from (its model.pretrained; --base NAME on the command line)"
    v_rows = verifier.get_output_embeddings().weight.shape[0]
    if v_rows > drafter.vocab_size:
        raise UsageError(
            f"the verifier's vocabulary ({v_rows} tokens) is larger than the drafter's ({drafter.vocab_size}): they "
            f"do not share a tokenizer; {fix}"
        )
    if verifier_tokenizer is not None:
        if len(verifier_tokenizer) > v_rows:
            raise UsageError(
                f"the verifier's tokenizer has {len(verifier_tokenizer)} tokens but the verifier only {v_rows} "
                f"embedding rows; {fix}"
            )
        if tokenizer is not None:
            ids = tokenizer.get_vocab()
            differ = [t for t, i in verifier_tokenizer.get_vocab().items() if ids.get(t) != i]
            if differ:
                raise UsageError(
                    f"the verifier's tokenizer and the model's disagree on {len(differ)} tokens (e.g. {differ[0]!r}); "
                    f"{fix}"
                )
    model = getattr(drafter, "model", None)
    if not related or model is None or not hasattr(model, "backbone"):
        return
    d_cfg, v_cfg = model.backbone.config, verifier.config
    if d_cfg.model_type != v_cfg.model_type or d_cfg.hidden_size != v_cfg.hidden_size:
        raise UsageError(
            f"the drafter is a {d_cfg.model_type} network of hidden size {d_cfg.hidden_size} but the verifier a "
            f"{v_cfg.model_type} of hidden size {v_cfg.hidden_size}: not its base; {fix} (or check_base=False to "
            "pair unrelated models: still exact, only slower)"
        )
    rows = verifier.get_input_embeddings().weight.shape[0]
    mine = model.backbone.get_input_embeddings().weight[:rows].float().cpu()
    theirs = verifier.get_input_embeddings().weight.float().cpu()
    distance = float((mine - theirs).norm() / theirs.norm().clamp(min=1e-12))
    if distance > 0.5:
        raise UsageError(
            f"the embedding rows the drafter shares with the verifier differ by {distance:.0%} of their norm (fine-"
            f"tuning moves them a few percent): the verifier is not the drafter's base; {fix} (or check_base=False "
            "to pair unrelated models: still exact, only slower)"
        )


def _output(prompt, committed, reason, ver: CausalLMVerifier, drafter, hist, drafted) -> SpeculativeOutput:
    new = len(committed) - len(prompt)
    nfe = ver.forwards + drafter.forwards
    return SpeculativeOutput(
        sequences=torch.tensor([committed]),
        prompt_lengths=torch.tensor([len(prompt)]),
        lengths=torch.tensor([new]),
        stopped_at_eos=torch.tensor([reason == "eos"]),
        nfe=nfe,
        tokens_processed_per_forward=(ver.processed + drafter.processed) / max(1, nfe),
        tokens_per_forward=new / max(1, nfe),
        max_cache_length=ver.max_cache,
        sample_nfe=torch.tensor([nfe]),
        stop_reasons=[reason],
        verifier_forwards=ver.forwards,
        drafter_forwards=drafter.forwards,
        acceptance_histogram=hist,
        drafted_tokens=drafted,
        accepted_tokens=sum(a * c for a, c in enumerate(hist)),
    )
