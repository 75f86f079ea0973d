"""Text deltas for streaming: the new text of each finished block, never a character the final text will not hold.

A finished block can end inside a multi-byte character (the decoder writes ``U+FFFD`` for it) or inside a stop string
the next block completes, and the block that holds EOS or the stop string also holds tokens after it. ``TextDeltas``
keeps back what is not final yet, so the streamed pieces always add up to the complete response's text.
"""

from __future__ import annotations

__all__ = ["TextDeltas"]

REPLACEMENT = "\ufffd"


class TextDeltas:
    """The text of one choice as it grows block by block (``block``) up to its final tokens (``finish``)."""

    def __init__(self, tokenizer, max_tokens: int, stops: list[str], eos_ids: set[int], mask_id: int):
        self.tokenizer, self.max_tokens, self.stops = tokenizer, max_tokens, stops
        self.eos_ids, self.mask_id = eos_ids, mask_id
        self.tokens: list[int] = []
        self.emitted = ""

    def block(self, new_tokens: list[int]) -> str:
        """The text a finished block adds that is sure to stay."""
        self.tokens.extend(new_tokens)
        return self._delta(self.tokens, final=False)

    def finish(self, tokens: list[int]) -> str:
        """What is left to send once generation returned the choice's ``tokens``."""
        return self._delta(tokens, final=True)

    def text(self, tokens: list[int]) -> str:
        """The response text of ``tokens``: up to EOS, at most ``max_tokens``, cut before the first stop string."""
        kept = []
        for t in tokens[: self.max_tokens]:
            if t in self.eos_ids or t == self.mask_id:
                break
            kept.append(t)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cuts = [text.index(s) for s in self.stops if s in text]
        return text[: min(cuts)] if cuts else text

    def _delta(self, tokens: list[int], final: bool) -> str:
        text = self.text(tokens)
        if not final:
            text = self._settled(text)
        if not text.startswith(self.emitted):  # a decoder that rewrites earlier text: send only what follows
            return ""
        delta, self.emitted = text[len(self.emitted) :], max(text, self.emitted, key=len)
        return delta

    def _settled(self, text: str) -> str:
        """``text`` without a trailing partial character or a suffix that could still begin a stop string."""
        text = text.rstrip(REPLACEMENT)
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]
