"""The engine of ``blockdiff serve --speculative``: each choice decoded by lossless speculative decoding, one at a time.

The models are what ``modeling/speculative.py``'s ``load_speculative`` picks for the served path (the decision
``blockdiff sample --speculative`` makes too): a plain decoder verifying ``lookup`` drafts, or a block diffuser drafting
for its base decoder (``two_model``) or verifying its own drafts (``fused``). Each job (one choice) runs
``speculative_generate`` with a drafter built for its request's settings (``SpeculativeModels.drafter_for``: the
drafter's knobs may differ per request) and its own seeded generator, so its text is the verifier's own: token for
token its greedy ``generate()``, or with ``temperature > 0`` a draw from the verifier's distribution (speculative
sampling is exact).

**One job at a time, oldest first.** Speculative decoding is batch 1: each sequence has its own verifier cache and
accepts a different number of drafts per step, so jobs never share a forward. Interleaving their steps would not
raise throughput either (each step is one forward that already keeps the cores busy; round-robin only spreads the
same work over more wall time per request) and would hold every waiting job's KV cache in memory at once. A queued
job waits for the one before it; a cancelled one stops after its current verification step.

Per verification step the worker posts ``("block", tokens)``: the step's committed tokens (the kept drafts and the
verifier's own token, never a draft it rejected), so a stream shows text as it is verified. Stop strings, which
speculative decoding itself does not take, end generation here, after the step that completes one. The counts
(verifier forwards, drafter forwards, drafts checked and kept) ride in ``Finished.speculative`` (``usage.speculative``)
and add up in ``stats()["speculative"]`` (``/health``).

The request fields only the block loop reads (``sampler``, its knobs, ``steps_per_block``, ``block_length``) are
refused by name, as are a ``drafter`` other than the served one, the knobs of other drafters and a knob that names
files (a ``str`` knob such as a drafter checkpoint's folder: set when the server starts, never by a client); the
served drafter's other knobs are checked by the drafter itself (its ``check_knobs``), each refusal a 400 naming the
field. The server's own drafter flags (``blockdiff serve --speculative --KNOB value``) are every request's defaults.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.sampling.inputs import with_overrides
from blockdiff.sampling.resolve import Settings, resolve
from blockdiff.sampling.samplers.registry import knobs as sampler_knobs
from blockdiff.sampling.samplers.registry import knobs_of_class
from blockdiff.sampling.speculative import speculative_generate
from blockdiff.sampling.speculative.registry import drafter_class, drafter_knobs
from blockdiff.serving.engine import PARAMS, Engine, Finished, Job
from blockdiff.serving.protocol import APIError, GenerationRequest

__all__ = ["SpeculativeEngine"]

log = logging.getLogger(__name__)

BLOCK_LOOP_ONLY = ("sampler", "steps_per_block")  # request settings the verifier, choosing every token, never reads


class _Ended(Exception):
    """Raised by the step observer to end a generation early (a cancelled job, a stop string)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Counts:
    """Speculative decoding's counts of one job, read off its steps and its drafter."""

    drafted_tokens: int = 0
    accepted_tokens: int = 0

    def as_dict(self, drafter) -> dict:
        return {"verifier_forwards": drafter.verifier_forwards, "drafter_forwards": drafter.drafter_forwards,
                "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens}


class SpeculativeEngine(Engine):
    """An ``Engine`` whose jobs are decoded speculatively, one at a time (module docstring); ``models``:
    ``modeling.speculative.SpeculativeModels``."""

    def __init__(self, models, name: str, **options):
        options["max_batch_size"] = 1  # batch 1 per sequence: a job never waits for others to batch with
        super().__init__(models, name, **options)
        self.models = models
        self.totals = {"verifier_forwards": 0, "drafter_forwards": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                       "tokens": 0}

    def stats(self) -> dict:
        with self._cond:
            totals = dict(self.totals)
        per = round(totals["tokens"] / max(1, totals["verifier_forwards"]), 4)
        return {**super().stats(), "speculative": {"drafter": self.models.drafter, "verifier": self.models.who,
                                                   **totals, "tokens_per_verifier_forward": per}}

    # -- requests -> jobs ------------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, queue: asyncio.Queue, loop) -> list[Job]:
        """The request's jobs, one per choice, or ``APIError`` for anything that would make generation fail."""
        max_tokens = self._limits(request, self.models.generation_config.max_new_tokens)
        self._refuse_fields(request)
        settings = {**request.settings, "drafter": self.models.drafter, "max_new_tokens": max_tokens,
                    "eos_token_id": self.tokenizer.eos_token_id, "pad_token_id": self.tokenizer.pad_token_id}
        resolved = self._resolve_speculative(settings)
        prompts = self._encode(request)
        positions = self.models.max_positions
        for i, ids in enumerate(prompts):
            if positions is not None and len(ids) >= positions:
                raise APIError(
                    400, f"the prompt{f' {i}' if len(prompts) > 1 else ''} has {len(ids)} tokens, but the verifier has "
                    f"{positions} positions and must write at least one token after it: shorten it to at most "
                    f"{positions - 1} tokens", "messages" if request.chat else "prompt", "context_length_exceeded",
                )
        seeds = self._seeds(request, len(prompts))
        # no model: the verifier writes every token, the mask token's id included (a token like any other to it)
        return [Job(i, ids, None, resolved, "speculative", seeds[i], queue, loop, request.stream,
                    drafter=self.models.drafter_for(resolved.config), stops=tuple(request.stop))
                for i, ids in enumerate(prompts)]

    def _refuse_fields(self, request: GenerationRequest) -> None:
        """The fields a speculative server does not take: the block loop's, another drafter, another drafter's knob."""
        if request.block_length is not None:
            raise APIError(400, "block_length applies to block-diffusion sampling; this server decodes speculatively "
                           "(the verifier writes every token): leave it out", "block_length", "unsupported_parameter")
        served = {k.name for k in knobs_of_class(drafter_class(self.models.drafter), "drafter")}
        for name in request.settings:
            if name in BLOCK_LOOP_ONLY or name in sampler_knobs():
                raise APIError(400, f"{name} does not apply to speculative decoding, which this server does (the "
                               "verifier chooses every token): leave it out", name, "unsupported_parameter")
            if name == "drafter" and request.settings[name] != self.models.drafter:
                raise APIError(400, f"drafter={request.settings[name]!r}: this server drafts with "
                               f"{self.models.drafter} (blockdiff serve --speculative --drafter NAME picks it)",
                               "drafter", "invalid_value")
            knob = drafter_knobs().get(name)
            if knob is not None and name not in served:
                raise APIError(400, f"{name} is a knob of the {knob.sampler} drafter; this server drafts with "
                               f"{self.models.drafter}: leave it out", name, "unsupported_parameter")
            if knob is not None and knob.type is str:  # a path: a request must not make the server read its files
                raise APIError(400, f"{name} names files on the server: it is set when the server starts "
                               f"(--{name.replace('_', '-')}), not per request; leave it out", name,
                               "unsupported_parameter")

    def _resolve_speculative(self, settings: dict) -> Settings:
        """The request's settings over the served models' (a copy), checked as speculative decoding checks them, and
        the drafter built once for them (its knobs); a refusal is a 400 naming its field."""

        def check(values: dict) -> Settings:
            config = with_overrides(self.models.generation_config, values)
            resolved = resolve(self.model, config, speculative=True)
            self.models.drafter_for(config)
            return resolved

        try:
            return check(settings)
        except (TypeError, ValueError) as err:  # UsageError is a ValueError
            message = str(err) if isinstance(err, UsageError) else f"bad generation setting: {err}"
            culprit = None
            for name, value in settings.items():
                try:
                    check({"drafter": self.models.drafter, name: value})
                except (TypeError, ValueError):
                    culprit = PARAMS.get(name, name)
                    break
            raise APIError(400, message, culprit, "invalid_value") from None

    # -- the worker ------------------------------------------------------------------------------------------
    def _run(self, batch: list[Job]) -> int:
        """Decode one job (batches hold one) and answer it; returns 1 if it ended cancelled, else 0."""
        (job,) = batch
        if job.cancelled.is_set():
            job.post("done", Finished([], "cancelled", 0))
            return 1
        tokens: list[int] = []
        counts = _Counts()

        def observer(step) -> None:
            tokens.extend(step.new_tokens)
            counts.drafted_tokens += len(step.drafts)
            counts.accepted_tokens += step.accepted
            if job.stream:
                job.post("block", list(step.new_tokens))
            if job.cancelled.is_set():
                raise _Ended("cancelled")
            if job.stops and self._stopped(tokens, len(step.new_tokens), job.stops):
                raise _Ended("stop_string")

        device = (self.models.model if self.models.model is not None else self.models.verifier).device
        try:
            out = speculative_generate(job.drafter, None, job.ids, generation_config=job.settings.config,
                                       generator=torch.Generator(device=device).manual_seed(job.seed),
                                       observer=observer)
            reason = out.stop_reasons[0]
        except _Ended as end:
            reason = end.reason
        except UsageError as err:
            job.post("error", APIError(400, str(err), None, "invalid_value"))
            return 0
        except Exception as err:  # noqa: BLE001 - a bug must answer the request (500), not hang it
            log.exception("speculative generation failed")
            job.post("error", APIError(500, f"generation failed: {type(err).__name__}: {err}", None,
                                       "internal_error", "server_error"))
            return 0
        done = counts.as_dict(job.drafter)
        with self._cond:
            for key, value in done.items():
                self.totals[key] += value
            self.totals["tokens"] += len(tokens)
        job.post("done", Finished(tokens, reason, done["verifier_forwards"] + done["drafter_forwards"], done))
        job.drafter = None  # its caches go with it
        return int(reason == "cancelled")

    def _stopped(self, tokens: list[int], new: int, stops: tuple[str, ...]) -> bool:
        """Whether the text of ``tokens`` holds a stop string. Only the tail the last step could have completed one in
        is decoded each step (its ``new`` tokens and as many before them as the longest stop string has characters,
        plus a margin for a leading space or a split character); a hit there is confirmed on the whole text."""
        tail = tokens[-(new + max(len(s) for s in stops) + 4):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        if not any(s in text for s in stops):
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stops)
