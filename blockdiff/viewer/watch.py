"""Watching the model think: a JSON-lines trace of every denoising step, and a live terminal view.

Both are *observers*: callables that ``generate`` calls with a ``StepEvent`` after every step (and once
more when a block is final). They never change what is generated.

* ``TraceWriter(path, header=...)`` — one JSON object per line: block, step, per-sample revealed positions, tokens,
  confidences, re-opened positions, whether the network ran. Written to ``path.partial`` and renamed by
  ``close()``, so a crash never leaves a truncated file under the real name (``close(keep=False)``
  discards it); on Ctrl-C the complete lines written so far are kept. A trace written by ``blockdiff sample``
  is self-describing, so ``blockdiff view`` needs nothing else: its first line is a ``{"kind": "header"}``
  record (``trace_header``: the model, the prompts' token ids, the settings) and its last an
  ``{"kind": "end"}`` record (``trace_end``: the texts, lengths, forwards, and the text of every token id seen).
  Step lines have no ``kind`` key. The format is read back by ``trace.py`` beside it (which defines the mask glyph
  both draw).
* ``LiveView(tokenizer, mask_id, prompts=...)`` — a ``rich`` live display: prompt and finished text, then the
  current block with ``░`` for each masked position, turning into tokens step by step.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from blockdiff.errors import MissingFileError
from blockdiff.sampling.outputs import GenerationOutput, StepEvent
from blockdiff.viewer.trace import MASK_GLYPH

__all__ = [
    "TraceWriter", "trace_header", "trace_end", "LiveView", "FinishedBlocks", "fan_out", "SpeculativeEvents",
    "TRACE_VERSION",
]

TRACE_VERSION = 1  # of the header / end records (step lines are ``asdict(StepEvent)``)


class TraceWriter:
    """JSON lines, one per event; the file appears under its real name only when ``close()`` keeps it.

    ``header`` (``trace_header``) is written before the first event; ``close(end=trace_end(...))`` appends the end
    record. ``seen`` collects every token id the events hold (what ``trace_end`` gives the text of)."""

    def __init__(self, path: str | Path, header: dict | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise MissingFileError(f"--trace {self.path} is a directory; give a file name")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.header = header
        self.seen: set[int] = set()
        self.file = None  # opened at the first event: an input error before any step leaves no file

    def __call__(self, event: StepEvent) -> None:
        if self.file is None:
            self.file = self.partial.open("w", encoding="utf-8")
            if self.header is not None:
                self.file.write(json.dumps(self.header) + "\n")
        for row in event.tokens:
            self.seen.update(row)
        self.file.write(json.dumps(asdict(event)) + "\n")

    def close(self, keep: bool = True, end: dict | None = None) -> None:
        """Rename the complete lines into place (``keep``), after the ``end`` record when given, or discard them
        (a failed run)."""
        if self.file is None:
            return
        if keep and end is not None:
            self.file.write(json.dumps(end) + "\n")
        self.file.close()
        if keep:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def trace_header(prompts: list[list[int]], mask_token_id: int, block_length: int, model: str = "",
                 settings: dict | None = None) -> dict:
    """The first line of a trace: what was sampled from what (``prompts``: token ids, BOS included)."""
    return {
        "kind": "header", "version": TRACE_VERSION, "model": model, "block_length": block_length,
        "mask_token_id": mask_token_id, "prompts": [list(p) for p in prompts], "settings": settings or {},
    }


def trace_end(out: GenerationOutput, texts: list[str], tokenizer, token_ids) -> dict:
    """The last line of a trace: each sample's text, kept new tokens, stop reason and forwards; the text of every
    token id in ``token_ids`` (``pieces``; special tokens listed apart: the sampled text leaves them out); and
    ``segments``, each kept token's share of the sample's text (``text_segments``), so a viewer that shows them
    shows exactly the sampled text."""
    ids = sorted(int(i) for i in token_ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    new = [out.new_tokens(i) for i in range(len(texts))]
    prompts = [out.sequences[i, : int(out.prompt_lengths[i])].tolist() for i in range(len(texts))]
    return {
        "kind": "end", "texts": list(texts), "lengths": out.lengths.tolist(), "stop_reasons": out.stop_reasons,
        "sample_nfe": out.sample_nfe.tolist() if out.sample_nfe is not None else None, "nfe": out.nfe,
        "tokens_per_forward": out.sample_tokens_per_forward, "new_tokens": new,
        "segments": [text_segments(tokenizer, t) for t in new],
        "prompt_segments": [text_segments(tokenizer, p) for p in prompts],
        "pieces": {str(i): tokenizer.decode([i], skip_special_tokens=False) for i in ids},
        "special_ids": sorted(i for i in ids if i in special),
    }


def text_segments(tokenizer, ids: list[int]) -> list[str]:
    """Split ``decode(ids)`` (special tokens skipped) into one piece per token: token ``i`` gets the characters the
    text gains when it is decoded, so the pieces join to the text exactly, even where one character spans several
    byte-level tokens (the first of them gets ``""``, the last the character).

    Incremental, as streaming detokenisers do: each step decodes only the tokens since the last complete character
    (linear in ``len(ids)``); should the pieces not join to the text (a tokenizer whose decoding is not local), the
    prefix-by-prefix split (quadratic) is used instead."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    segments, prefix, read = [], 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix : i + 1], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            segments.append(after[len(before) :])
            prefix, read = read, i + 1
        else:
            segments.append("")  # an unfinished character (or a special token): its text comes with a later token
    if segments:
        segments[-1] += text[len("".join(segments)) :] if text.startswith("".join(segments)) else ""
    if "".join(segments) == text:
        return segments
    return _segments_by_prefix(tokenizer, ids, text)


def _segments_by_prefix(tokenizer, ids: list[int], text: str) -> list[str]:
    segments, done = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True) if i + 1 < len(ids) else text
        end = max(done, len(os.path.commonprefix([prefix, text])))
        segments.append(text[done:end])
        done = end
    return segments


class FinishedBlocks:
    """Collects the generated tokens of every finished block per sample (what Ctrl-C can still print)."""

    def __init__(self, prompt_lengths: list[int]):
        self.prompt_lengths = prompt_lengths
        self.tokens: dict[int, list[int]] = {i: [] for i in range(len(prompt_lengths))}

    def __call__(self, event: StepEvent) -> None:
        if event.finished:
            for i, start, row in zip(event.samples, event.block_start, event.tokens):
                self.tokens[i].extend(t for j, t in enumerate(row) if start + j >= self.prompt_lengths[i])

    def text(self, i: int, tokenizer) -> str:
        return tokenizer.decode(self.tokens[i], skip_special_tokens=True)


class LiveView:
    """Live terminal view of sample 0..``max_samples``-1: prompt and finished text, then the block being denoised.

    ``prompts`` (the token ids generation starts from, BOS included) are shown from the start: the first
    step event of a sample only carries its first generation block, not the prompt blocks before it.
    """

    def __init__(self, tokenizer, mask_id: int, console: Console | None = None, max_samples: int = 4,
                 prompts: list[list[int]] | None = None):
        self.tokenizer, self.mask_id, self.max_samples = tokenizer, mask_id, max_samples
        self.done: dict[int, list[int]] = {i: list(p) for i, p in enumerate(prompts or [])}  # by position
        self.current: dict[int, tuple[int, list[int]]] = {}  # sample -> (block start position, block tokens)
        self.live = Live(console=console or Console(), refresh_per_second=12, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def __call__(self, event: StepEvent) -> None:
        for i, start, row in zip(event.samples, event.block_start, event.tokens):
            if event.finished:  # the block (prompt tail included) replaces whatever stood at its positions;
                # masks left in a final block are past max_new_tokens: never written, not shown
                self.done[i] = self.done.get(i, [])[:start] + [t for t in row if t != self.mask_id]
                self.current.pop(i, None)
            else:
                self.current[i] = (start, row)
        self.live.update(self._render(event))

    def tokens(self, i: int) -> list[int]:
        """Sample ``i`` as drawn now: prompt, finished blocks, then the current block (mask id where masked)."""
        start, row = self.current.get(i, (len(self.done.get(i, [])), []))
        return self.done.get(i, [])[:start] + list(row)

    def text(self, i: int) -> str:
        """``tokens(i)`` as text, ``░`` for each masked position."""
        return self._line(i).plain

    def _line(self, i: int) -> Text:
        start, row = self.current.get(i, (len(self.done.get(i, [])), []))
        line = Text(self.tokenizer.decode(self.done.get(i, [])[:start], skip_special_tokens=True), style="dim")
        for t in row:
            if t == self.mask_id:
                line.append(MASK_GLYPH, style="bold magenta")
            else:
                line.append(self.tokenizer.decode([t], skip_special_tokens=True), style="bold green")
        return line

    def _render(self, event: StepEvent) -> Group:
        lines = [self._line(i) for i in sorted(set(self.done) | set(self.current))[: self.max_samples]]
        lines.append(Text(f"block {event.block}, step {event.step}", style="italic"))
        return Group(*lines)


def fan_out(*observers):
    """One observer that calls every non-None observer in order."""
    active = [o for o in observers if o is not None]
    if not active:
        return None

    def call(event: StepEvent) -> None:
        for o in active:
            o(event)

    return call


class SpeculativeEvents:
    """Speculative decoding's steps (``SpeculativeStep``) as the block loop's ``StepEvent`` s, so the trace, the live
    view and ``blockdiff view`` show them like any other generation: the continuation is laid out on a grid of
    ``block_length`` positions (from position 0, as the block loop's), every block starts all masked, and each
    verification step reveals the tokens it committed (kept drafts + the verifier's token, confidence = the
    verifier's probability of each) in the one or more blocks they fall in: one forward, so only the first of those
    events has ``forward`` set. A block is ``finished`` once every position of it is committed; ``close()`` finishes
    the last, partial one (its masks are past the end, as in the block loop)."""

    def __init__(self, observer, prompt: list[int], block_length: int, mask_id: int, sample: int = 0):
        self.observer, self.l, self.mask_id, self.sample = observer, block_length, mask_id, sample
        self.committed = list(prompt)
        self.steps: dict[int, int] = {}  # block -> events so far

    def __call__(self, step) -> None:
        first, self.committed = len(self.committed), step.committed  # a fresh list per step
        end, l = len(self.committed), self.l
        for g in range(first // l, (end - 1) // l + 1):
            lo, hi = max(first, g * l), min(end, (g + 1) * l)
            confidence = step.confidence[lo - first : hi - first] if step.confidence else [1.0] * (hi - lo)
            self._emit(g, list(range(lo, hi)), confidence, forward=g == first // l)
            if hi == (g + 1) * l:
                self._emit(g, [], [], forward=False, finished=True)

    def close(self) -> None:
        """Finish the block the last step ended in, if it is partial."""
        g = len(self.committed) // self.l
        if len(self.committed) % self.l and g in self.steps:
            self._emit(g, [], [], forward=False, finished=True)

    def _emit(self, g: int, revealed: list[int], confidence: list[float], forward: bool, finished: bool = False):
        start = g * self.l
        tokens = [self.committed[p] if p < len(self.committed) else self.mask_id for p in range(start, start + self.l)]
        step = self.steps.get(g, 0)
        self.steps[g] = step + (not finished)
        self.observer(StepEvent(
            block=g, step=step, samples=[self.sample], block_start=[start], tokens=[tokens], revealed=[revealed],
            remasked=[[]], confidence=[list(confidence)], forward=forward, finished=finished,
        ))
