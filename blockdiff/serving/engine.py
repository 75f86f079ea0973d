"""The request queue of ``blockdiff serve``: checked requests become jobs, jobs with equal settings are batched.

One worker thread owns the network. It takes the oldest waiting job, waits ``batch_window`` seconds for more jobs
with *the same settings* (sampler, its knobs, temperature, ``max_new_tokens``, stop strings, block length, ...: a
batch never mixes them), up to ``max_batch_size``, and runs them through ``BlockDiffusionLM.generate`` as one ragged
batch, each with its own seeded generator. Jobs of other settings wait for a later batch, oldest first.

A job's text does not depend on its batch, up to floating-point rounding (docs/serving.md, "Batching"): its random
stream is its own generator's, and a job whose generation could reach the sliding window only shares a batch with
prompts of its number of whole blocks (``_key``), so the batch's columns, and where the window slides, are the ones
it has alone (left padding would make it slide earlier).

Limits (each a 4xx before anything runs): ``max_tokens_limit`` new tokens per choice, ``max_prompts`` choices per
request, ``max_queue`` jobs waiting (429 once full).

Each job reports to its request's ``asyncio`` queue, from the worker thread: ``("block", tokens)`` when one of its
blocks is final (the generation observer's block-is-final event), then ``("done", Finished)`` or ``("error",
APIError)``. A job whose client went away is ``cancel``-ed: it leaves its batch after the current block
(``generate(..., cancelled=...)``), and a waiting one never runs.

Everything a request can get wrong is checked in ``prepare``, on the caller's thread, before it is queued. A drafter
setting (``drafter`` or a drafter's knob) is refused here by name: this engine does not decode speculatively
(``speculative.py``'s ``SpeculativeEngine`` does, ``blockdiff serve --speculative``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from blockdiff.config import SEED_MAX
from blockdiff.core.noise import make_schedule
from blockdiff.errors import UsageError
from blockdiff.sampling.inputs import with_overrides
from blockdiff.sampling.resolve import Settings, resolve
from blockdiff.sampling.speculative.registry import SPECULATIVE, drafter_knobs
from blockdiff.sampling.text import encode_prompts
from blockdiff.serving.protocol import APIError, GenerationRequest

__all__ = ["Engine", "Job", "Finished"]

PARAMS = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}  # generation setting -> its request field

log = logging.getLogger(__name__)


@dataclass
class Finished:
    tokens: list[int]  # the choice's new tokens (EOS / the stop string's tokens included)
    reason: str  # generation's stop reason: eos, stop_string, max_new_tokens, max_length or cancelled
    nfe: int  # forwards that denoised it
    speculative: dict | None = None  # speculative decoding's counts (``SpeculativeEngine``; usage.speculative)


@dataclass(eq=False)  # identity: two jobs are never "equal"
class Job:
    index: int  # the choice it fills
    ids: list[int]  # prompt token ids
    model: object  # the network at the request's block length
    settings: Settings  # the resolved generation settings (``sampling/resolve.py``), shared by its batch
    key: str  # equal keys = equal settings = may share a batch
    seed: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    drafter: object = None  # speculative decoding: the drafter built for this job's settings (``SpeculativeEngine``)
    stops: tuple[str, ...] = ()  # speculative decoding: stop strings the engine ends generation at
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload) -> None:
        """Hand an event to the request's queue (thread-safe; dropped once the event loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass


class Engine:
    """Owns the model, the queue and the worker thread (module docstring)."""

    def __init__(self, loaded, name: str, batch_window: float = 0.01, max_batch_size: int = 8,
                 max_tokens_limit: int = 2048, max_prompts: int = 64, max_queue: int = 1024):
        if batch_window < 0 or min(max_batch_size, max_tokens_limit, max_prompts, max_queue) < 1:
            raise UsageError("the batching window must be >= 0 s; the batch size, the max_tokens limit, the prompts "
                             "per request and the queue bound >= 1")
        if max_prompts > max_queue:
            raise UsageError(f"--max-prompts {max_prompts} is over --max-queue {max_queue}: a request that long could "
                             "never be queued; raise --max-queue or lower --max-prompts")
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, name
        self.batch_window, self.max_batch_size, self.max_tokens_limit = batch_window, max_batch_size, max_tokens_limit
        self.max_prompts, self.max_queue = max_prompts, max_queue
        self.schedule = make_schedule(self.model.spec.schedule) if self.model is not None else None
        self._models = {self.model.block_length: self.model} if self.model is not None else {}
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="blockdiff-serve", daemon=True)
        self.running = 0  # jobs in the batch being generated
        self.completed = 0  # jobs that ran to their end (EOS, stop string, max_tokens) or failed
        self.cancelled = 0  # jobs that ended because their client went away (not counted in completed)
        self.refused = 0  # jobs turned away because the queue was full (429)
        self.batches = 0
        self.largest_batch = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.post("error", APIError(503, "the server is shutting down", code="shutting_down",
                                           kind="server_error"))
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._pending), "running": self.running, "completed": self.completed,
                    "cancelled": self.cancelled, "refused": self.refused, "batches": self.batches,
                    "largest_batch": self.largest_batch}

    # -- requests -> jobs ------------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, queue: asyncio.Queue, loop) -> list[Job]:
        """The request's jobs, one per choice, or ``APIError`` for anything that would make generation fail."""
        max_tokens = self._limits(request, self.model.generation_config.max_new_tokens)
        for name in request.settings:
            if name in SPECULATIVE or name in drafter_knobs():
                raise APIError(400, f"{name} is a setting of speculative decoding, which this server does not do: "
                               "start it with blockdiff serve PATH --speculative, or leave it out", name,
                               "unsupported_parameter")
        model = self._model_at(request.block_length)
        steps = request.settings.get("steps_per_block")
        if steps is not None and steps > self.max_tokens_limit:  # a step budget is work, as tokens are (ddpm runs it)
            raise APIError(400, f"steps_per_block={steps} is over this server's limit of {self.max_tokens_limit} "
                           "(--max-tokens-limit)", "steps_per_block", "invalid_value")
        settings = {**request.settings, "max_new_tokens": max_tokens, "eos_token_id": self.tokenizer.eos_token_id,
                    "pad_token_id": self.tokenizer.pad_token_id}
        if request.stop:
            settings["stop_strings"] = request.stop
        resolved = self._resolve(model, settings)
        prompts = self._encode(request)
        window = resolved.window
        for i, ids in enumerate(prompts):
            if window is not None and len(ids) + model.block_length > window:
                raise APIError(
                    400, f"the prompt{f' {i}' if len(prompts) > 1 else ''} has {len(ids)} tokens, but this model's "
                    f"window of {window} tokens must hold it and one block of {model.block_length}: shorten it to at "
                    f"most {window - model.block_length} tokens", "messages" if request.chat else "prompt",
                    "context_length_exceeded",
                )
        key = repr((model.block_length, sorted(settings.items(), key=lambda kv: kv[0])))
        seeds = self._seeds(request, len(prompts))
        return [Job(i, ids, model, resolved, self._key(key, ids, model.block_length, max_tokens, window),
                    seeds[i], queue, loop, request.stream) for i, ids in enumerate(prompts)]

    def _limits(self, request: GenerationRequest, default_max_tokens: int) -> int:
        """The request's ``max_tokens`` (``default_max_tokens`` when it sets none), both checked against this
        server's limits on prompts per request and new tokens per choice."""
        count = len(request.prompts) if request.prompts is not None else 1
        if count > self.max_prompts:
            raise APIError(400, f"the prompt list has {count} prompts; this server takes at most "
                           f"{self.max_prompts} per request: send them in several requests", "prompt",
                           "too_many_prompts")
        max_tokens = request.max_tokens or default_max_tokens
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {self.max_tokens_limit}",
                           "max_tokens", "max_tokens_over_limit")
        return max_tokens

    @staticmethod
    def _seeds(request: GenerationRequest, count: int) -> list[int]:
        """Prompt ``i``'s seed: ``(seed + i) mod (SEED_MAX + 1)``, from a random ``seed`` when the request sets none."""
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
        return [(seed + i) % (SEED_MAX + 1) for i in range(count)]

    @staticmethod
    def _key(key: str, ids: list[int], l: int, max_tokens: int, window: int | None) -> str:
        """The batching key of a prompt: its settings' key, with its number of whole blocks when a batch could
        reach the sliding window. A batch of prompts with ``b`` whole blocks at most ends by column ``b l`` plus the
        blocks ``max_tokens`` may take (``ceil((l - 1 + max_tokens) / l)``, the most any prompt tail needs); when that
        fits the window, no batch of such prompts slides and left padding changes nothing but masked columns.
        Otherwise the prompt batches only with prompts of its block count: the layout it has alone."""
        blocks = len(ids) // l
        if window is None or (blocks + -(-(l - 1 + max_tokens) // l)) * l <= window:
            return key
        return f"{key} blocks={blocks}"

    def _model_at(self, block_length: int | None):
        block_length = block_length or self.model.block_length
        if block_length not in self._models:
            try:
                self._models[block_length] = self.model.with_block_length(block_length).eval()
            except UsageError as err:
                raise APIError(400, f"block_length: {err}", "block_length", "invalid_value") from None
        return self._models[block_length]

    def _resolve(self, model, settings: dict) -> Settings:
        """The request's settings over the model's (a copy), checked and resolved once (window, EOS, sampler...); a
        refusal is a 400 naming its field."""
        try:
            return resolve(model, with_overrides(model.generation_config, settings))
        except (TypeError, ValueError) as err:  # UsageError is a ValueError
            message = str(err) if isinstance(err, UsageError) else f"bad generation setting: {err}"
            raise APIError(400, message, self._culprit(model, settings, message), "invalid_value") from None

    def _culprit(self, model, settings: dict, message: str) -> str | None:
        """The request field a refused config is about: the first setting refused on its own, else the one the
        message opens with."""
        for name, value in settings.items():
            try:
                with_overrides(model.generation_config, {name: value}).check(model.block_length, self.schedule)
            except (TypeError, ValueError):
                return PARAMS.get(name, name)
        words = message.replace("=", " ").split()
        return next((PARAMS.get(w, w) for w in words[:1] if w in settings), "sampler")

    def _encode(self, request: GenerationRequest) -> list[list[int]]:
        tok = self.tokenizer
        if not request.chat:
            try:
                return encode_prompts(tok, request.prompts)
            except Exception as err:  # noqa: BLE001 - a tokenizer that refuses the text
                raise APIError(400, f"the prompt could not be tokenized: {err}", "prompt", "invalid_value") from None
        try:
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                return [ids if ids else encode_prompts(tok, [""])[0]]
            text = "".join(f"{m['role']}: {m['content']}\n" for m in request.messages) + "assistant:"
            return encode_prompts(tok, [text])
        except UsageError as err:
            raise APIError(400, str(err), "messages", "invalid_value") from None
        except Exception as err:  # noqa: BLE001 - a chat template that refuses the conversation (roles, order)
            raise APIError(400, f"the chat template refused these messages: {err}", "messages") from None

    def submit(self, jobs: list[Job]) -> None:
        """Queue the request's jobs, or refuse them all (429 ``queue_full``) when they would pass ``max_queue``."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self._pending) + len(jobs) > self.max_queue:
                self.refused += len(jobs)
                raise APIError(429, f"the server's queue is full ({len(self._pending)} waiting, at most "
                               f"{self.max_queue}): retry later", None, "queue_full", "rate_limit_error")
            self._pending.extend(jobs)
            self._cond.notify_all()

    @staticmethod
    def cancel(jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled.set()

    # -- the worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            cancelled = 0
            try:
                cancelled = self._run(batch)
            finally:
                with self._cond:
                    self.running -= len(batch)
                    self.completed += len(batch) - cancelled
                    self.cancelled += cancelled
                    self.batches += 1
                    self.largest_batch = max(self.largest_batch, len(batch))

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and every waiting job with its settings (up to the batch size), after the window."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            deadline = first.arrived + self.batch_window
            while (now := time.monotonic()) < deadline and self._count(first.key) < self.max_batch_size:
                self._cond.wait(timeout=deadline - now)
            batch = [j for j in self._pending if j.key == first.key][: self.max_batch_size]
            for job in batch:
                self._pending.remove(job)
            self.running += len(batch)
            return batch

    def _count(self, key: str) -> int:
        return sum(j.key == key for j in self._pending)

    def _run(self, batch: list[Job]) -> int:
        """Generate one batch and answer its jobs; returns how many ended cancelled."""
        live = [j for j in batch if not j.cancelled.is_set()]
        for job in batch:
            if job.cancelled.is_set():
                job.post("done", Finished([], "cancelled", 0))
        if not live:
            return len(batch)
        first = live[0]
        device = first.model.device
        generators = [torch.Generator(device=device).manual_seed(j.seed) for j in live]

        def observer(event) -> None:
            if not event.finished:
                return
            for i, start, row in zip(event.samples, event.block_start, event.tokens):
                job = live[i]
                if job.stream:
                    job.post("block", [t for j, t in enumerate(row) if start + j >= len(job.ids)])

        try:
            out = first.model.generate(
                [j.ids for j in live], generation_config=first.settings.config, generator=generators,
                observer=observer, tokenizer=self.tokenizer, cancelled=lambda i: live[i].cancelled.is_set(),
            )
        except UsageError as err:
            for job in live:
                job.post("error", APIError(400, str(err), None, "invalid_value"))
            return len(batch) - len(live)
        except Exception as err:  # noqa: BLE001 - a bug must answer the request (500), not hang it
            log.exception("generation failed")
            for job in live:
                job.post("error", APIError(500, f"generation failed: {type(err).__name__}: {err}", None,
                                           "internal_error", "server_error"))
            return len(batch) - len(live)
        for i, job in enumerate(live):
            job.post("done", Finished(out.new_tokens(i), out.stop_reasons[i], int(out.sample_nfe[i])))
        return len(batch) - len(live) + sum(r == "cancelled" for r in out.stop_reasons)
