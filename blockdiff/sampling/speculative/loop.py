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
processing, in the same order, on both models: ``settings.Sampling``). The drafter only decides how fast: any drafter
gives the verifier's output.

Counting: ``SpeculativeOutput.verifier_forwards`` (one per step; the prompt is folded into the first),
``drafter_forwards``, ``acceptance_histogram[a]`` = steps that kept ``a`` drafts, and
``tokens_per_verifier_forward`` = new tokens / verifier forwards (accepted + 1 on average, less when EOS or
``max_new_tokens`` cut the last step). ``nfe`` counts the forwards of both models. ``drafter_counts``: the drafter's
own (``Drafter.counts``; e.g. ``hybrid``'s lookup and tree steps).

The loop sees what drafts and verifies through one step protocol (``base.Drafter``: ``propose`` the drafts, ``score``
them, ``commit`` the step), chosen by name from the drafter registry (``registry.py``; ``drafter=`` in the
generation config). ``two_model`` (``drafters.TwoModels``) is a verifier plus a proposer, one forward each per step;
``fused`` (``fused.FusedBlockDiffusion``) is one ``BlockDiffusionLM`` whose clean stream is its frozen base,
verifying and drafting in the same forward (``speculative_generate(model, None, ...)``). All feed the same
acceptance code. The settings are the block loop's: a ``BlockDiffusionGenerationConfig`` with keyword overrides,
checked and resolved by ``resolve.resolve`` (the temperature rule, EOS ids); the default is greedy.

Shape legend: ``k`` drafts, ``v`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.inputs import with_overrides
from blockdiff.sampling.outputs import GenerationOutput
from blockdiff.sampling.resolve import eos_ids_of, resolve
from blockdiff.sampling.speculative.base import Drafter
from blockdiff.sampling.speculative.drafters import Proposer, TwoModels
from blockdiff.sampling.speculative.registry import accepting_drafter, drafter_class, make_drafter
from blockdiff.sampling.speculative.settings import Sampling
from blockdiff.sampling.speculative.verify import CausalLMVerifier, accept_greedy, accept_sampled

__all__ = ["speculative_generate", "SpeculativeOutput", "SpeculativeStep", "check_verifier", "DEFAULTS"]

DEFAULTS = {"temperature": 0.0}  # speculative_generate without a generation config: greedy, 64 new tokens
BATCH_ONE = "speculative decoding needs batch 1 (one prompt, one sequence): call it once per prompt"


@dataclass
class SpeculativeOutput(GenerationOutput):
    """``GenerationOutput`` (one row) plus the counts of speculative decoding."""

    verifier_forwards: int = 0
    drafter_forwards: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)  # [a]: verification steps that kept a drafts
    drafted_tokens: int = 0  # drafts the verifier checked
    accepted_tokens: int = 0  # of them, kept
    drafter_counts: dict[str, int] = field(default_factory=dict)  # the drafter's own counts (Drafter.counts)

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
    confidence: list[float] = field(default_factory=list)  # the verifier's probability of each new token


@torch.no_grad()
def speculative_generate(
    verifier,
    drafter=None,
    input_ids=None,
    /,
    *,
    generation_config: BlockDiffusionGenerationConfig | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    observer: Callable[[SpeculativeStep], None] | None = None,
    check_base: bool = True,
    **overrides,
) -> SpeculativeOutput:
    """Continue one prompt by up to ``max_new_tokens`` tokens, drafting with ``drafter`` and verifying with
    ``verifier``; the output is the verifier's own (module docstring).

    The three model arguments are positional (``drafter=NAME`` is the generation setting that picks the drafter).
    ``verifier``: a plain Hugging Face causal LM (the base decoder the drafter was fine-tuned from) or a
    ``CausalLMVerifier``. ``drafter``: a ``BlockDiffusionLM`` (drafting with the drafter the config names, default
    ``two_model``) or any ``Proposer``. ``drafter=None``: ``verifier`` is a ``BlockDiffusionLM`` (default drafter
    ``fused``: a gated adapter and a causal clean stream, verifying with its own frozen base in the same forward) or
    a ``Drafter`` already built (e.g. ``FusedBlockDiffusion(model, every_length=True)``); the output is then its
    base decoder's. ``input_ids``: one prompt, a list of ids or a ``(1, p)`` / ``(p,)`` tensor.

    Settings, as for ``model.generate``: ``generation_config`` (default: greedy, ``max_new_tokens=64``) updated by
    keyword ``overrides`` (``max_new_tokens``, ``temperature`` (0 or ``do_sample=False``: greedy), ``top_k``,
    ``top_p``, ``eos_token_id`` (default: the verifier's), ``drafter`` and its knobs, ...), checked as the block loop
    checks them. ``generator`` seeds the drafts, the acceptance tests and the resampling. ``streamer``: a
    transformers streamer (the prompt, then each step's tokens). ``check_base``: refuse a drafter that does not look
    fine-tuned from this verifier (``check_verifier``); pass ``False`` to pair unrelated models (still exact, only
    slower).
    """
    config = with_overrides(generation_config or BlockDiffusionGenerationConfig(**DEFAULTS), overrides)
    prompt, pair, settings, sampling, eos, positions = _prepare(verifier, drafter, input_ids, check_base, config)
    max_new_tokens = settings.max_new_tokens
    pair.reset()
    committed, hist, drafted, reason = list(prompt), [], 0, None
    if streamer is not None:
        streamer.put(torch.tensor([prompt]))
    while reason is None:
        new = len(committed) - len(prompt)
        room = max_new_tokens - new if positions is None else min(max_new_tokens - new, positions - len(committed))
        draft = pair.propose(committed, room - 1, sampling, generator)
        tokens = draft.tokens.long()  # (k,) k <= room - 1: never more than can be kept
        logits = pair.score(committed, tokens)  # (k + 1, v)
        p = sampling.fit(logits) if sampling.greedy else sampling.probs(logits)  # (k + 1, v) logits | probabilities
        if sampling.greedy:
            accepted, extra = accept_greedy(p, tokens)
        else:
            accepted, extra = accept_sampled(p, draft.probs, tokens, generator)
        step = tokens[:accepted].tolist() + [extra]
        step, reason = _cut(step, eos, room, max_new_tokens - new)
        committed += step
        pair.commit(committed, accepted)
        hist += [0] * (accepted + 1 - len(hist))
        hist[accepted] += 1
        drafted += len(tokens)
        if streamer is not None:
            streamer.put(torch.tensor([step]))
        if observer is not None:
            probs = p.softmax(-1) if sampling.greedy else p
            confidence = [float(probs[i, t]) for i, t in enumerate(step)]
            observer(SpeculativeStep(sum(hist) - 1, tokens.tolist(), accepted, step, list(committed), confidence))
    if streamer is not None:
        streamer.end()
    return _output(prompt, committed, reason, pair, hist, drafted)


def _prepare(verifier, drafter, input_ids, check_base, config):
    """Every input check before any forward: ``(prompt, drafter, resolved settings, sampling, EOS ids, verifier
    positions)``."""
    if input_ids is None:
        raise UsageError("give the prompt: speculative_generate(verifier, drafter, input_ids) (drafter None: fused)")
    prompt = _prompt(input_ids)
    model_free = config.drafter is not None and not drafter_class(config.drafter).needs_block_model
    if drafter is None and not isinstance(verifier, Drafter) and not _is_block_diffuser(verifier) and not model_free:
        raise UsageError(
            "no drafter: pass one (a BlockDiffusionLM fine-tuned from this verifier), or pass a BlockDiffusionLM "
            "trained with model.adapter=gated_lora model.clean_attention=causal alone (it verifies its own drafts)"
        )
    block = drafter if _is_block_diffuser(drafter) else verifier if _is_block_diffuser(verifier) else None
    settings = resolve(block, config, speculative=True)  # the settings, checked as the block loop checks them
    pair = _drafter(verifier, drafter, check_base, config)
    if any(not 0 <= t < pair.vocab_size for t in prompt):
        raise UsageError(f"prompt token ids must be in [0, {pair.vocab_size}) (the verifier's vocabulary)")
    base = pair.verifier_model
    suppress = getattr(getattr(base, "generation_config", None), "suppress_tokens", None) or ()
    sampling = Sampling.from_settings(settings, pair.vocab_size, suppress)
    eos = settings.eos_ids
    if config.eos_token_id is None:  # what the verifier's own generate() would stop at
        eos = eos_ids_of((getattr(base, "generation_config", None) or base.config).eos_token_id)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and len(prompt) >= positions:
        raise UsageError(
            f"a prompt of {len(prompt)} tokens leaves no room in the verifier's {positions} positions; shorten it"
        )
    return prompt, pair, settings, sampling, eos, positions


def _is_block_diffuser(model) -> bool:
    return hasattr(model, "spec") and hasattr(model, "block_length")


def _drafter(verifier, drafter, check_base: bool, config) -> Drafter:
    """The step protocol for what was passed (``speculative_generate``'s argument rules), checked."""
    if drafter is None:
        if isinstance(verifier, Drafter):
            return verifier
        if not _is_block_diffuser(verifier):  # a plain causal LM verifying a drafter with no network (lookup)
            return make_drafter(None, config, verifier)
        return make_drafter(verifier, config)  # a BlockDiffusionLM verifying itself (default: fused)
    if _is_block_diffuser(drafter):
        check_verifier(verifier.model if isinstance(verifier, CausalLMVerifier) else verifier, drafter,
                       related=check_base)
        return make_drafter(drafter, config, verifier)  # default: two_model
    name = config.drafter if config.drafter is not None else accepting_drafter(drafter, verifier)
    if name is not None and drafter_class(name).accepts(drafter):  # a drafter's own network (DFlash: default hybrid)
        return make_drafter(drafter, with_overrides(config, {"drafter": name}), verifier)
    if not isinstance(drafter, Proposer):
        raise UsageError("drafter must be a BlockDiffusionLM, a DFlash drafter network (blockdiff.modeling.dflash."
                         "load_drafter) or have draft / commit / reset (a Proposer)")
    check_verifier(verifier.model if isinstance(verifier, CausalLMVerifier) else verifier, drafter, related=check_base)
    return TwoModels(verifier, drafter)


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
    model = drafter if _is_block_diffuser(drafter) else getattr(drafter, "model", None)
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


def _output(prompt, committed, reason, pair: Drafter, hist, drafted) -> SpeculativeOutput:
    new = len(committed) - len(prompt)
    nfe = pair.verifier_forwards + pair.drafter_forwards
    return SpeculativeOutput(
        sequences=torch.tensor([committed]),
        prompt_lengths=torch.tensor([len(prompt)]),
        lengths=torch.tensor([new]),
        stopped_at_eos=torch.tensor([reason == "eos"]),
        nfe=nfe,
        tokens_processed_per_forward=pair.processed / max(1, nfe),
        tokens_per_forward=new / max(1, nfe),
        max_cache_length=pair.max_cache,
        sample_nfe=torch.tensor([nfe]),
        stop_reasons=[reason],
        verifier_forwards=pair.verifier_forwards,
        drafter_forwards=pair.drafter_forwards,
        acceptance_histogram=hist,
        drafted_tokens=drafted,
        accepted_tokens=sum(a * c for a, c in enumerate(hist)),
        drafter_counts=pair.counts(),
    )
