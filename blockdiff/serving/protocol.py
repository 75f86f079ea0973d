"""The OpenAI wire format of ``blockdiff serve``: request bodies checked into typed requests, errors and responses.

Every check of a request body happens here, before anything is queued, and a bad body is an ``APIError`` (a 4xx
with OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape), never a 500. Fields of the OpenAI API that
block generation does not implement are refused by name when set to anything but their default (``n``,
``logprobs``, ``echo``, ``best_of``, penalties, ``logit_bias``, ``suffix``, ``tools``); unknown fields are ignored,
as OpenAI clients send many. The block-diffusion settings ride along as extra body fields: ``sampler``, ``tau``,
``block_length``, ``steps_per_block``, ``top_k`` and every registered sampler's knob; so do speculative decoding's,
``drafter`` and every registered drafter's knob (the engine refuses them on a server that is not speculative, and a
speculative one refuses the block loop's).

Every number is bounded here, before generation sees it: integers to ``[-INT_LIMIT, INT_LIMIT]`` (each sampler knob
by the type its registry field declares, so a sampler registered later is bounded too; far below where torch's int64
overflows), reals finite; what a sampler or the generation config then refuses is a 400 naming the field.
"""

from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field

from blockdiff.config import SEED_MAX
from blockdiff.sampling.samplers.registry import all_knobs

__all__ = ["APIError", "GenerationRequest", "parse_request", "completion_body", "chunk_body", "usage_body",
           "speculative_usage"]

UNSUPPORTED = {  # OpenAI field -> the values that mean "off"
    "n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
MAX_STOPS = 4  # as OpenAI
INT_LIMIT = 2**31 - 1  # the largest integer any count or knob of a request may be (token counts, steps, top_k)
ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's chat roles


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One checked request: its prompts (text), what to return and the generation settings they share."""

    chat: bool
    prompts: list[str] | None  # completions: one text per choice
    messages: list[dict] | None  # chat: the conversation
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    settings: dict = field(default_factory=dict)  # generation overrides: sampler, tau, temperature, top_p, ...
    block_length: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _int(body: dict, name: str, low: int | None = -INT_LIMIT, high: int | None = INT_LIMIT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if low is not None and value < low:
        raise _bad(f"{name} must be >= {low}, got {value}", name, "invalid_value")
    if high is not None and value > high:
        raise _bad(f"{name} must be <= {high}, got {value}", name, "invalid_value")
    return int(value)


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {value!r}", name, "invalid_type")
    return float(value)


def _knob(body: dict, name: str, kind: type):
    if kind is bool:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _bad(f"{name} must be true or false, got {value!r}", name, "invalid_type")
        return value
    if kind is int:
        return _int(body, name)
    if kind is float:
        return _number(body, name)
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise _bad(f"{name} must be a {kind.__name__}, got {value!r}", name, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them, got {stop!r}", "stop")
    return list(stops)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _bad(f"messages[{i}] must be an object with a string role and a string content", f"messages[{i}]")
        if m["role"] not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}",
                       f"messages[{i}].role", "invalid_value")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad("prompt must be a string or a non-empty list of strings (token-id prompts are not supported)",
                   "prompt")
    return prompts


def parse_request(body, chat: bool, served_model: str) -> GenerationRequest:
    """Check an OpenAI request body (``chat``: ``/v1/chat/completions``) for the model named ``served_model``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model must be given as a string: the served model's id (GET /v1/models)", "model")
    if model != served_model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_model!r}", "model",
                       "model_not_found")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise _bad(f"{name}={body[name]!r} is not supported by block-diffusion generation; leave it out", name,
                       "unsupported_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options", "invalid_type")
    max_tokens = _int(body, "max_completion_tokens", 1, None) if chat and "max_completion_tokens" in body else None
    max_tokens = max_tokens or _int(body, "max_tokens", 1, None)  # over the server's limit: max_tokens_over_limit
    settings = {
        "temperature": _number(body, "temperature"), "top_p": _number(body, "top_p"), "top_k": _int(body, "top_k"),
        "sampler": _knob(body, "sampler", str), "steps_per_block": _int(body, "steps_per_block"),
        "drafter": _knob(body, "drafter", str),
        **{name: _knob(body, name, k.type) for name, k in all_knobs().items()},  # every sampler and drafter knob
    }
    return GenerationRequest(
        chat=chat,
        prompts=None if chat else _prompts(body),
        messages=_messages(body) if chat else None,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=_int(body, "seed", 0, SEED_MAX),  # prompt i of a request is seeded (seed + i) mod (SEED_MAX + 1)
        settings={k: v for k, v in settings.items() if v is not None},
        block_length=_int(body, "block_length", 1),
    )


def usage_body(prompt_tokens: int, completion_tokens: int, nfe: int, speculative: dict | None = None) -> dict:
    """OpenAI's usage counts, plus ``nfe``: the network forwards that denoised these choices (their cost alone), and
    with ``speculative`` (a speculative server) ``speculative``: its counts (``speculative_usage``)."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens, "nfe": nfe}
    return {**usage, "speculative": speculative} if speculative is not None else usage


SPECULATIVE_COUNTS = ("verifier_forwards", "drafter_forwards", "drafted_tokens", "accepted_tokens")


def speculative_usage(counts: list[dict], completion_tokens: int) -> dict:
    """``usage.speculative`` of choices decoded speculatively: the sums of their ``counts`` (``SPECULATIVE_COUNTS``:
    verification steps, forwards of a separate drafting network, drafts the verifier checked and those it kept) and
    ``tokens_per_verifier_forward`` = ``completion_tokens`` / verifier forwards."""
    sums = {k: sum(c[k] for c in counts) for k in SPECULATIVE_COUNTS}
    return {**sums, "tokens_per_verifier_forward": round(completion_tokens / max(1, sums["verifier_forwards"]), 4)}


def _choice(request: GenerationRequest, index: int, text: str, finish: str | None, delta: bool) -> dict:
    if not request.chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": index, "delta": {"content": text} if text or finish is None else {}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def _head(request: GenerationRequest, model: str, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
    prefix = "chatcmpl-" if request.chat else "cmpl-"
    return {"id": prefix + request.id, "object": kind, "created": request.created, "model": model}


def completion_body(request: GenerationRequest, model: str, texts: list[str], finishes: list[str],
                    usage: dict) -> dict:
    choices = [_choice(request, i, t, f, delta=False) for i, (t, f) in enumerate(zip(texts, finishes))]
    return {**_head(request, model, chunk=False), "choices": choices, "usage": usage}


def chunk_body(request: GenerationRequest, model: str, index: int, text: str, finish: str | None = None,
               usage: dict | None = None, role: bool = False) -> dict:
    """One server-sent event: a finished block's text for choice ``index`` (or, with ``usage``, the usage chunk)."""
    body = _head(request, model, chunk=True)
    if usage is not None:
        return {**body, "choices": [], "usage": usage}
    choice = _choice(request, index, text, finish, delta=True)
    if role:
        choice["delta"] = {"role": "assistant", **choice["delta"]}
    return {**body, "choices": [choice]}
