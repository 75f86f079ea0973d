"""Reading a generation trace back, and replaying it step by step (what the page, the GIF and the plots show).

A trace is the JSON-lines file ``blockdiff sample --trace`` writes (``blockdiff/viewer/watch.py``): a header
record (the model, the prompts' token ids, the settings), one line per denoising step of the batch, and an end
record (texts, kept tokens, forwards, and the text of every token id). ``read_trace`` splits the batch into one
``SampleTrace`` per sample: its prompt and its steps, each step the reveals and re-openings of *that* sample.

Replaying is exact and cheap: the state after step ``k`` is the prompt, every earlier block's tokens and the
current block after ``k``'s reveals (``SampleTrace.tokens_at``). The page's JavaScript replays the same records
(``page.py`` inlines them); tests check both against the trace's own per-step tokens and the sampled text.

Positions are per-sample token positions (0 = the sample's first prompt token); block ``j`` of a sample holds
positions ``[j L', (j + 1) L')``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from blockdiff.errors import MissingFileError, UsageError

MASK_GLYPH = "░"  # a masked position, in the trace views and the live terminal view (watch.py)

__all__ = ["Step", "Cell", "SampleTrace", "Trace", "read_trace", "MASK_GLYPH"]


@dataclass
class Step:
    """One denoising step of one sample."""

    block: int  # the sample's block index (position // block_length)
    step: int  # step within the block, from 1
    forward: bool  # the network ran for this step (False: the last prediction was reused)
    revealed: list[tuple[int, int, float]]  # (position, token, confidence) revealed at this step
    remasked: list[int]  # positions re-opened at this step
    tokens: list[int] = field(repr=False, default_factory=list)  # the block after the step, as the trace wrote it


@dataclass
class Cell:
    """One position as a viewer draws it after some step."""

    position: int
    text: str  # what to print (the token's share of the sampled text once final; "░" while masked)
    kind: str  # "prompt", "mask", "gen" or "cut" (generated after the stop: not in the sampled text)
    confidence: float = 1.0  # the model's confidence in the token when it was revealed
    fresh: bool = False  # revealed at this very step
    reopened: bool = False  # re-opened (remasked) at some earlier step
    special: bool = False  # a special token (EOS...): not part of the text


@dataclass
class SampleTrace:
    """Everything the trace says about one sample."""

    index: int
    prompt: list[int]  # token ids, BOS included
    steps: list[Step]
    block_length: int
    mask_token_id: int
    new_tokens: list[int] | None = None  # the kept new tokens (end record), None for a trace cut short
    text: str | None = None  # the sampled text (prompt excluded), as `blockdiff sample` printed it
    segments: list[str] | None = None  # each kept new token's share of ``text``
    prompt_segments: list[str] | None = None  # each prompt token's share of the prompt text
    stop_reason: str | None = None
    nfe: int | None = None  # forwards that denoised this sample

    @property
    def forwards(self) -> int:
        """Network forwards of this sample's steps (the trace's own count; equals ``nfe`` when complete)."""
        return sum(s.forward for s in self.steps)

    @property
    def num_blocks(self) -> int:
        return len({s.block for s in self.steps})

    def tokens_at(self, k: int) -> list[int]:
        """The sample after its first ``k`` steps (``k = 0``: the prompt alone; mask id where masked). A block's
        positions past the prompt start masked at the block's first step; positions no step ever reveals (past
        ``max_new_tokens``) stay masked."""
        if not 0 <= k <= len(self.steps):
            raise UsageError(f"step {k} is out of range: this sample has {len(self.steps)} steps")
        tokens = list(self.prompt)
        current = None
        for s in self.steps[:k]:
            if s.block != current:  # a new block: its generated positions start masked
                current = s.block
                end = (s.block + 1) * self.block_length
                tokens.extend([self.mask_token_id] * (end - len(tokens)))
            for position, token, _ in s.revealed:
                tokens[position] = token
            for position in s.remasked:
                tokens[position] = self.mask_token_id
        return tokens

    def cells(self, k: int, pieces: dict[int, str], special: set[int] = frozenset()) -> list[Cell]:
        """What a viewer draws after step ``k`` (the page's ``tokenSpan`` in ``viewer.js`` draws the same): the
        prompt, the finished blocks and the current block; a finished block without the masked positions it never
        generated (past ``max_new_tokens``). ``pieces``: the text of each token id (``Trace.pieces``)."""
        tokens = self.tokens_at(k)
        conf: dict[int, float] = {}
        reopened: set[int] = set()
        for s in self.steps[:k]:
            conf.update((p, c) for p, _, c in s.revealed)
            reopened.update(s.remasked)
        fresh = {p for p, _, _ in self.steps[k - 1].revealed} if k else set()
        current = self.steps[k - 1].block if 0 < k < len(self.steps) else None
        kept = len(self.new_tokens) if self.new_tokens is not None else 1 << 62
        out = []
        for p, t in enumerate(tokens):
            if p < len(self.prompt):
                text = self.prompt_segments[p] if self.prompt_segments else pieces.get(t, "")
                out.append(Cell(p, text, "prompt"))
                continue
            j = p - len(self.prompt)
            if t == self.mask_token_id:
                if p // self.block_length == current:
                    out.append(Cell(p, MASK_GLYPH, "mask"))
                continue
            final = self.new_tokens is not None and j < kept and self.new_tokens[j] == t
            text = self.segments[j] if final else ("" if t in special else pieces.get(t, f"<{t}>"))
            out.append(Cell(p, text, "gen" if j < kept else "cut", conf.get(p, 1.0), p in fresh, p in reopened,
                            t in special))
        return out

    def final_new_tokens(self) -> list[int]:
        """The kept new tokens as the replay of every step leaves them (== ``new_tokens`` for a complete trace)."""
        end = len(self.prompt) + (len(self.new_tokens) if self.new_tokens is not None else 1 << 62)
        return [t for t in self.tokens_at(len(self.steps))[len(self.prompt) : end] if t != self.mask_token_id]

    def revealed_per_forward(self) -> list[int]:
        """Tokens revealed by each network forward (a reused prediction's reveals count with its forward)."""
        counts: list[int] = []
        for s in self.steps:
            if s.forward or not counts:
                counts.append(0)
            counts[-1] += len(s.revealed)
        return counts

    def block_reveals(self) -> dict[int, list[int]]:
        """``{block: [tokens revealed at each of its steps]}``: the per-block chart of the page."""
        out: dict[int, list[int]] = {}
        for s in self.steps:
            out.setdefault(s.block, []).append(len(s.revealed))
        return out


@dataclass
class Trace:
    path: Path
    samples: list[SampleTrace]
    block_length: int
    mask_token_id: int
    pieces: dict[int, str]  # text of each token id (special tokens as their names)
    special_ids: set[int]
    model: str = ""
    settings: dict = field(default_factory=dict)
    complete: bool = True  # the end record is there (False: an interrupted run)

    def piece(self, token: int) -> str:
        return self.pieces.get(token, f"<{token}>")


def read_trace(path: str | Path) -> Trace:
    """Parse a trace written by ``blockdiff sample --trace``; ``UsageError`` naming the line when it is not one
    (not UTF-8 text, not JSON, a record of the wrong shape, a token id that is not a non-negative integer, a sample
    index the header does not have)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"trace {path} does not exist (write one with `blockdiff sample RUN --trace {path}`)")
    header, end, events = None, None, []
    number = 0
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(
                        f"{path}:{number} is not JSON ({err.msg}); is it a `blockdiff sample --trace` file?"
                    ) from None
                kind = record.get("kind") if isinstance(record, dict) else None
                if kind == "header":
                    header = _checked_header(record, f"{path}:{number}")
                elif kind == "end":
                    end = record
                elif isinstance(record, dict) and {"block", "samples", "tokens", "revealed"} <= set(record):
                    events.append((number, record))
                else:
                    raise UsageError(f"{path}:{number} is not a trace record (no block/samples/tokens/revealed keys)")
    except UnicodeDecodeError:
        raise UsageError(
            f"{path}:{number + 1} is not UTF-8 text (a binary file?); give a trace written by "
            "`blockdiff sample RUN --trace FILE`"
        ) from None
    if header is None and not events and end is None:
        raise UsageError(
            f"{path} is empty: it holds no trace records; write a trace with `blockdiff sample RUN --trace {path}`"
        )
    if header is None:
        raise UsageError(
            f"{path} has no header line (the first record `blockdiff sample --trace` writes: the model, the prompts, "
            "the settings), so it cannot be replayed; sample again with --trace to write a complete trace"
        )
    if not events:
        raise UsageError(f"{path} holds no denoising steps (a header but no step lines); sample again with --trace")
    for number, event in events:
        _check_event(event, len(header["prompts"]), header["block_length"], f"{path}:{number}")
    if end is not None:
        _check_end(end, len(header["prompts"]), f"{path} (its end record)")
    return _assemble(path, header, [e for _, e in events], end)


_MAX_ID = 1 << 31  # token ids and positions are below this (no vocabulary or context comes near it)


def _is_id(value) -> bool:
    """A token id or a position: a JSON integer in ``[0, 2**31)`` (not ``1e30``, ``-5``, ``"x"``, ``null``)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_ID


def _id_list(value) -> bool:
    return isinstance(value, list) and all(_is_id(v) for v in value)


def _check_end(end: dict, num_samples: int, where: str) -> None:
    """The end record: the text of each token id, and one entry per sample of every per-sample list."""
    pieces = end.get("pieces")
    if not isinstance(pieces, dict) or not all(isinstance(v, str) and k.isdigit() for k, v in pieces.items()):
        raise UsageError(f"{where}: pieces must map token ids to their text; the trace is damaged")
    for key in ("new_tokens", "texts", "segments", "prompt_segments", "stop_reasons"):
        if not isinstance(end.get(key), list) or len(end[key]) != num_samples:
            raise UsageError(f"{where}: {key} must hold one entry per sample ({num_samples}); the trace is damaged")
    if not all(_id_list(t) for t in end["new_tokens"]) or not all(isinstance(t, str) for t in end["texts"]):
        raise UsageError(f"{where}: new_tokens must be lists of token ids and texts strings; the trace is damaged")


def _checked_header(record: dict, where: str) -> dict:
    """The header record, its prompts, block length and mask id checked."""
    prompts = record.get("prompts")
    if not isinstance(prompts, list) or not all(_id_list(p) for p in prompts):
        raise UsageError(f"{where}: the header's prompts must be lists of token ids (integers >= 0)")
    if not _is_id(record.get("mask_token_id")) or not _is_id(record.get("block_length")) or not record["block_length"]:
        raise UsageError(f"{where}: the header needs an integer mask_token_id >= 0 and block_length >= 1")
    if not isinstance(record.get("settings", {}), dict):
        raise UsageError(f"{where}: the header's settings must be a JSON object")
    return record


def _check_event(e: dict, num_samples: int, block_length: int, where: str) -> None:
    """One step line: per row of ``samples`` (indices below ``num_samples``) its block start, the block's
    ``block_length`` token ids, the revealed positions (inside the block) with their confidences, and the re-opened
    positions."""
    rows = e["samples"]
    if not isinstance(rows, list) or not all(_is_id(i) and i < num_samples for i in rows):
        raise UsageError(
            f"{where}: samples {rows!r} must be sample indices below {num_samples} (the header has {num_samples} "
            "prompts); the trace is damaged"
        )
    for key in ("block_start", "tokens", "revealed", "confidence", "remasked"):
        if not isinstance(e.get(key), list) or len(e[key]) != len(rows):
            raise UsageError(f"{where}: {key} must be a list with one entry per sample ({len(rows)}); the trace is "
                             "damaged")
    if not isinstance(e.get("step"), int) or isinstance(e.get("step"), bool):
        raise UsageError(f"{where}: step must be an integer; the trace is damaged")
    for row in range(len(rows)):
        start, tokens = e["block_start"][row], e["tokens"][row]
        if isinstance(tokens, list) and len(tokens) != block_length:
            raise UsageError(f"{where}: a block holds {block_length} tokens (the header's block_length), this step "
                             f"{len(tokens)}; the trace is damaged")
        if not _is_id(start) or not _id_list(tokens):
            raise UsageError(
                f"{where}: token ids and positions must be integers >= 0 (got block_start {start!r}, tokens "
                f"{str(tokens)[:80]}); the trace is damaged"
            )
        inside = range(start, start + len(tokens))
        revealed, confidence, remasked = e["revealed"][row], e["confidence"][row], e["remasked"][row]
        if not _id_list(revealed) or not all(p in inside for p in revealed) or not _id_list(remasked) \
                or not all(p in inside for p in remasked):
            raise UsageError(f"{where}: revealed / remasked positions must lie in the block [{start}, "
                             f"{start + len(tokens)}); the trace is damaged")
        if not isinstance(confidence, list) or len(confidence) != len(revealed) or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in confidence):
            raise UsageError(f"{where}: confidence must hold one number in [0, 1] per revealed position; the trace "
                             "is damaged")


def _was_denoising(sample: SampleTrace, start: int, limit: int) -> bool:
    """Whether the sample's block at ``start`` still held a masked position it generates (past its prompt, before
    ``max_new_tokens``) before this step: only then did the step denoise it."""
    first, last = max(start, len(sample.prompt)), min(start + sample.block_length, len(sample.prompt) + limit)
    previous = sample.steps[-1] if sample.steps else None
    if previous is None or previous.block != start // sample.block_length:
        return first < last  # the block's first step: every generated position is masked
    return any(previous.tokens[p - start] == sample.mask_token_id for p in range(first, last))


def _assemble(path: Path, header: dict, events: list[dict], end: dict | None) -> Trace:
    l, mask_id = int(header["block_length"]), int(header["mask_token_id"])
    prompts = header["prompts"]
    samples = [SampleTrace(i, list(p), [], l, mask_id) for i, p in enumerate(prompts)]
    limit = header.get("settings", {}).get("max_new_tokens") or 1 << 62
    for e in events:
        if e.get("finished"):
            continue  # the block-is-final line repeats the last step's tokens
        for row, i in enumerate(e["samples"]):
            sample, start, tokens = samples[i], e["block_start"][row], e["tokens"][row]
            if not _was_denoising(sample, start, limit):
                continue  # its block was done: the batch stepped for the others (it cost this sample nothing)
            revealed = [(p, tokens[p - start], c) for p, c in zip(e["revealed"][row], e["confidence"][row])]
            sample.steps.append(Step(start // l, e["step"], bool(e["forward"]), revealed, e["remasked"][row], tokens))
    pieces: dict[int, str] = {}
    special: set[int] = set()
    if end is not None:
        pieces = {int(k): v for k, v in end["pieces"].items()}
        special = set(end.get("special_ids", []))
        for i, s in enumerate(samples):
            s.new_tokens, s.text = end["new_tokens"][i], end["texts"][i]
            s.segments, s.prompt_segments = end["segments"][i], end["prompt_segments"][i]
            s.stop_reason = end["stop_reasons"][i]
            s.nfe = end["sample_nfe"][i] if end.get("sample_nfe") is not None else None
    return Trace(path, samples, l, mask_id, pieces, special, header.get("model", ""), header.get("settings", {}),
                 complete=end is not None)
