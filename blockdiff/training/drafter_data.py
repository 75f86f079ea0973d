"""What a DFlash drafter trains on (docs/design.md §14): the target's own continuations (distilled sets, token ids)
and the target's hidden states of them, captured once with no gradient and kept in memory (bf16), so training never
runs the target again.

* ``read_rows``: every row of the distilled sets as ``(prompt length, ids)``, split by prompt into training and
  held-out rows (the held-out rows' continuations are never trained on);
* ``capture_features``: one target forward per batch of rows (right-padded: causal attention keeps each row's
  states exact), each target layer divided by a per-layer constant (``feature_scales``; folded into ``fc`` at save);
* ``draft_vocabulary``: the most frequent tokens of the training rows (EAGLE-3 / FR-Spec);
* ``AnchorBatches``: random anchors in the continuations, turned into one forward's worth of blocks with their
  attention mask (``anchor_batch``).

```
row      = prompt (p tokens) + continuation;   features H (n, F) of every token
anchor a in [p - 1, n - 2]:  block = [x_a, m, ..., m] at positions a .. a + l - 1;  targets x_{a+1} .. x_{a+l-1}
block j sees: the context keys < a_j (committed before its anchor) and its own l keys; nothing else
```

Shape legend: ``r`` rows in a batch, ``n`` tokens (the longest row), ``A`` anchors per row, ``l`` block length,
``F`` feature width, ``d`` hidden.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from blockdiff.data.distilled import load_distilled
from blockdiff.errors import UsageError
from blockdiff.modeling.dflash import target_features

__all__ = ["Rows", "read_rows", "save_ids", "capture_features", "feature_scales", "draft_vocabulary", "anchor_batch",
           "AnchorBatch"]


@dataclass
class Rows:
    """Token rows: ``ids[i]`` (prompt + continuation) with its prompt length ``prompt[i]``."""

    ids: list[list[int]]
    prompt: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def save_ids(directory: str, path: str) -> None:
    """The token ids of a distilled set, compact (``.npz``, uint16 where the vocabulary allows): what a drafter's
    training needs to resume anywhere without distilling again (``read_rows`` reads it as a set)."""
    rows, _ = load_distilled(directory)
    prompts, conts = rows["prompt_ids"], rows["continuation_ids"]
    flat = [t for p, c in zip(prompts, conts) for t in list(p) + list(c)]
    dtype = np.uint16 if max(flat) < 2**16 else np.int32
    np.savez_compressed(path, ids=np.array(flat, dtype=dtype), prompt_index=np.array(rows["prompt_index"]),
                        prompt_len=np.array([len(p) for p in prompts]), cont_len=np.array([len(c) for c in conts]))


def _rows_of(source: str):
    """``(prompt_index, prompt ids, continuation ids)`` of a distilled set or of its ``save_ids`` file."""
    if not source.endswith(".npz"):
        rows, _ = load_distilled(source)
        return rows["prompt_index"], rows["prompt_ids"], rows["continuation_ids"]
    data = np.load(source)
    ends = np.cumsum(data["prompt_len"] + data["cont_len"]).tolist()
    starts = [0, *ends[:-1]]
    ids = data["ids"].astype(np.int64).tolist()
    prompts = [ids[a : a + p] for a, p in zip(starts, data["prompt_len"].tolist())]
    conts = [ids[a + p : b] for a, p, b in zip(starts, data["prompt_len"].tolist(), ends)]
    return data["prompt_index"].tolist(), prompts, conts


def read_rows(directories: list[str], val_fraction: float) -> tuple[Rows, Rows]:
    """``(train, held_out)`` rows of the distilled sets (or their ``save_ids`` files); the held-out rows are those of
    the last ``val_fraction`` of prompts (by prompt index), every temperature of a prompt on the same side."""
    train, held = Rows([], []), Rows([], [])
    for directory in directories:
        index_of, prompts, conts = _rows_of(str(directory))
        cut = round(max(index_of) * (1 - val_fraction))
        for index, prompt, cont in zip(index_of, prompts, conts):
            side = held if index > cut else train
            if len(cont) >= 2:
                side.ids.append(list(prompt) + list(cont))
                side.prompt.append(len(prompt))
    if not train.ids or not held.ids:
        raise UsageError(f"the distilled sets {directories} have too few rows for a training and a held-out part: "
                         "distill more prompts (blockdiff distill --num-prompts)")
    return train, held


@torch.no_grad()
def feature_scales(target, ids: list[int], layer_ids: list[int]) -> torch.Tensor:
    """Per-layer divisors ``(len(layer_ids),)``: each layer's median per-token RMS over ``ids`` (the first token, an
    attention sink, excluded)."""
    out = target(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack([out.hidden_states[i + 1][0, 1:].pow(2).mean(-1).sqrt().median() for i in layer_ids]).float()


@torch.no_grad()
def capture_features(target, rows: Rows, layer_ids: list[int], scales: torch.Tensor, batch: int,
                     progress=None) -> list[torch.Tensor]:
    """``features[i]`` (n_i, F) bf16: the target's states of row ``i`` at ``layer_ids``, layer ``j`` divided by
    ``scales[j]``."""
    width = target.config.hidden_size
    divisor = scales.repeat_interleave(width)  # (F,)
    out: list[torch.Tensor] = []
    device = next(target.parameters()).device
    for start in range(0, len(rows), batch):
        chunk = rows.ids[start : start + batch]
        n = max(len(x) for x in chunk)
        ids = torch.tensor([x + [0] * (n - len(x)) for x in chunk], device=device)  # (r, n) right-padded
        states = target(ids, output_hidden_states=True, logits_to_keep=1).hidden_states
        fused = (target_features(states, layer_ids).float() / divisor.to(device)).to(torch.bfloat16).cpu()  # (r,n,F)
        out += [fused[i, : len(x)].clone() for i, x in enumerate(chunk)]
        if progress is not None:
            progress(len(out), len(rows))
    return out


def draft_vocabulary(rows: Rows, size: int, vocab_size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of the rows' continuations (ties by id; ``always`` included), sorted;
    the whole vocabulary when ``size`` is 0 or covers it."""
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for ids, p in zip(rows.ids, rows.prompt) for t in ids[p:])
    counts.update({t: 0 for t in range(vocab_size)})  # every id is a candidate, unseen ones last
    chosen = set(always) | {t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - len(always)]}
    return torch.tensor(sorted(chosen))


@dataclass
class AnchorBatch:
    """One training forward: ``features`` (r, n, F), ``block_ids`` (r, A * l) (anchor token then masks),
    ``positions`` (r, A * l), ``targets`` (r, A * l) (-100: not a draft or beyond the row), ``mask`` (r, 1, A * l,
    n + A * l) (True: visible)."""

    features: torch.Tensor
    block_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def anchor_batch(features: list[torch.Tensor], rows: list[list[int]], prompts: list[int], anchors: int,
                 block_length: int, mask_token_id: int, generator: torch.Generator) -> AnchorBatch:
    """Blocks at random anchors of each row (module docstring): up to ``anchors`` distinct anchors per row in its
    continuation (a row with fewer positions repeats none: the extra blocks are all ignored targets)."""
    r, l = len(rows), block_length
    n = max(len(x) for x in rows)
    q = anchors * l
    feats = torch.zeros(r, n, features[0].shape[-1], dtype=features[0].dtype)
    block_ids = torch.full((r, q), mask_token_id, dtype=torch.long)
    positions = torch.zeros(r, q, dtype=torch.long)
    targets = torch.full((r, q), -100, dtype=torch.long)
    mask = torch.zeros(r, 1, q, n + q, dtype=torch.bool)
    offsets = torch.arange(l)
    for i, (ids, p) in enumerate(zip(rows, prompts)):
        feats[i, : len(ids)] = features[i]
        first, last = max(p - 1, 1), len(ids) - 2  # a draft target must be a continuation token
        choices = torch.randperm(last - first + 1, generator=generator)[:anchors] + first
        row = torch.tensor(ids)
        for j, a in enumerate(choices.tolist()):
            s = slice(j * l, (j + 1) * l)
            block_ids[i, s.start] = ids[a]
            positions[i, s] = a + offsets
            inside = (a + offsets[1:] < len(ids))
            targets[i, s.start + 1 : s.stop][inside] = row[a + offsets[1:][inside]]
            mask[i, 0, s, :a] = True  # the committed tokens before the anchor
            mask[i, 0, s, n + s.start : n + s.stop] = True  # its own block
        for j in range(len(choices), anchors):  # unused blocks: see themselves only (no NaN rows)
            mask[i, 0, j * l : (j + 1) * l, n + j * l : n + (j + 1) * l] = True
    return AnchorBatch(feats, block_ids, positions, targets, mask)
