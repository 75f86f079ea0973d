"""Watching the model think: a JSON-lines trace of every denoising step, and a live terminal view.

Both are *observers*: callables that ``generate`` calls with a ``StepEvent`` after every step (and once
more when a block is final). They never change what is generated.

* ``TraceWriter(path)`` — one JSON object per line: block, step, per-sample revealed positions, tokens,
  confidences, re-opened positions, whether the network ran. Written to ``path.partial`` and renamed by
  ``close()``, so a crash never leaves a truncated file under the real name (``close(keep=False)``
  discards it); on Ctrl-C the complete lines written so far are kept.
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
from blockdiff.sampling.outputs import StepEvent

__all__ = ["TraceWriter", "LiveView", "FinishedBlocks", "fan_out"]

MASK_GLYPH = "░"


class TraceWriter:
    """JSON lines, one per event; the file appears under its real name only when ``close()`` keeps it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise MissingFileError(f"--trace {self.path} is a directory; give a file name")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.file = None  # opened at the first event: an input error before any step leaves no file

    def __call__(self, event: StepEvent) -> None:
        if self.file is None:
            self.file = self.partial.open("w", encoding="utf-8")
        self.file.write(json.dumps(asdict(event)) + "\n")

    def close(self, keep: bool = True) -> None:
        """Rename the complete lines into place (``keep``) or discard them (a failed run)."""
        if self.file is None:
            return
        self.file.close()
        if keep:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


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
