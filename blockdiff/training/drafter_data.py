"""What a DFlash drafter trains on (docs/design.md §14): the target's own continuations (distilled sets, token ids)
and the target's hidden states of them, captured once with no gradient and kept in memory (bf16), so training never
runs the target again.

* ``read_rows``: every row of the distilled sets as ``(prompt length, ids)``, split by prompt into training and
  held-out rows (the held-out rows' continuations are never trained on);
* ``corpus_rows``: training windows of a text corpus (``data.corpus``), labelled by the target itself: a feature
  forward costs a few times less than writing a continuation, so the same CPU time buys more rows;
* ``capture_features``: one target forward per batch of rows (right-padded: causal attention keeps each row's
  states exact), each target layer divided by a per-layer constant (``feature_scales``; folded into ``fc`` at save);
  with ``labels``, also the target's greedy next token after every position (the labels of corpus rows);
* ``draft_vocabulary``: the most frequent tokens of the training rows (EAGLE-3 / FR-Spec);
* ``AnchorBatches``: random anchors in the continuations, turned into one forward's worth of blocks with their
  attention mask (``anchor_batch``).

Targets. A distilled row's continuation is the target's own output, so draft ``k`` of a block learns the row's token
``x_{a+k}``. A corpus row's text is not: its drafts learn the target's greedy chain from the anchor, which the labels
give exactly as long as the text follows it. With ``g_t`` the target's greedy token after ``x_{<=t}``, draft ``k``
learns ``g_{a+k-1}`` when ``x_{a+j} = g_{a+j-1}`` for every ``j < k``, and nothing after the first ``j`` where the text
leaves the chain (there the target's chain is no longer the text's, and its next tokens are unknown). For a greedy
distilled row the two rules agree.

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
from dataclasses import dataclass, field

import numpy as np
import torch

from blockdiff.config.sections import DataConfig
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.data.distilled import load_distilled
from blockdiff.errors import UsageError
from blockdiff.modeling.dflash import target_features

__all__ = ["Rows", "read_rows", "corpus_rows", "save_ids", "capture_features", "feature_scales", "draft_vocabulary",
           "anchor_batch", "AnchorBatch"]


@dataclass
class Rows:
    """Token rows: ``ids[i]`` (prompt + continuation) with its prompt length ``prompt[i]``; ``labels[i]``: the target's
    greedy next token after each position of corpus row ``i`` (absent: the row is the target's own text)."""

    ids: list[list[int]]
    prompt: list[int]
    labels: dict[int, list[int]] = field(default_factory=dict)  # row index -> labels (corpus rows only)

    def extend(self, other: "Rows") -> None:
        self.labels.update({len(self.ids) + i: x for i, x in other.labels.items()})
        self.ids += other.ids
        self.prompt += other.prompt

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


def corpus_rows(source: str, tokenizer, count: int, window: int, seed: int = 0) -> Rows:
    """``count`` training windows of ``window`` tokens of the text corpus ``source``, chosen at random (``seed``),
    each a row with a one-token prompt and no labels yet (``capture_features(labels=True)`` adds them). The corpus is
    split as every blockdiff command splits it (``data.val_fraction``'s default); the last training window is left out
    too, a margin for held-out splits cut at other window lengths, whose boundary rounds differently (``shakespeare``
    at 128 tokens: the rows end before the held-out tail of every window length up to 128 and reach 128 tokens into
    that of 256-token windows)."""
    corpus = pack_documents(load_documents(DataConfig(source=source, max_seq_len=window)), tokenizer, window,
                            DataConfig.val_fraction)
    usable = len(corpus.train) - 1
    if count > usable:
        raise UsageError(f"data.corpus_windows={count} is more than the {usable} training windows of {window} tokens "
                         f"in {source}: lower data.corpus_windows or data.corpus_window_tokens")
    picks = sorted(torch.randperm(usable, generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return Rows([corpus.train[i]["input_ids"].tolist() for i in picks], [1] * count)


@torch.no_grad()
def feature_scales(target, ids: list[int], layer_ids: list[int]) -> torch.Tensor:
    """Per-layer divisors ``(len(layer_ids),)``: each layer's median per-token RMS over ``ids`` (the first token, an
    attention sink, excluded)."""
    out = target(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack([out.hidden_states[i + 1][0, 1:].pow(2).mean(-1).sqrt().median() for i in layer_ids]).float()


@torch.no_grad()
def capture_features(target, rows: Rows, layer_ids: list[int], scales: torch.Tensor, batch: int,
                     progress=None, labels: bool = False) -> list[torch.Tensor]:
    """``features[i]`` (n_i, F) bf16: the target's states of row ``i`` at ``layer_ids``, layer ``j`` divided by
    ``scales[j]``; with ``labels``, ``rows.labels[i]`` becomes the target's greedy next token after each position
    (its logits over every position, from the same forward)."""
    width = target.config.hidden_size
    divisor = scales.repeat_interleave(width)  # (F,)
    out: list[torch.Tensor] = []
    device = next(target.parameters()).device
    for start in range(0, len(rows), batch):
        chunk = rows.ids[start : start + batch]
        n = max(len(x) for x in chunk)
        ids = torch.tensor([x + [0] * (n - len(x)) for x in chunk], device=device)  # (r, n) right-padded
        result = target(ids, output_hidden_states=True, logits_to_keep=0 if labels else 1)
        fused = (target_features(result.hidden_states, layer_ids).float() / divisor.to(device))
        fused = fused.to(torch.bfloat16).cpu()  # (r, n, F)
        if labels:
            greedy = result.logits.argmax(-1).cpu()  # (r, n)
            for i, x in enumerate(chunk):
                rows.labels[start + i] = greedy[i, : len(x)].tolist()
        out += [fused[i, : len(x)].clone() for i, x in enumerate(chunk)]
        if progress is not None:
            progress(len(out), len(rows))
    return out


def draft_vocabulary(rows: Rows, size: int, vocab_size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of the rows' continuations (of a corpus row: its labels, the target's
    tokens; ties by id; ``always`` included), sorted;
    the whole vocabulary when ``size`` is 0 or covers it."""
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for i, (ids, p) in enumerate(zip(rows.ids, rows.prompt))
                     for t in (ids[p:] if i not in rows.labels else rows.labels[i][p - 1 :]))
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
                 block_length: int, mask_token_id: int, generator: torch.Generator,
                 labels: list[list[int] | None] | None = None) -> AnchorBatch:
    """Blocks at random anchors of each row (module docstring): up to ``anchors`` distinct anchors per row in its
    continuation (a row with fewer positions repeats none: the extra blocks are all ignored targets); a row with
    ``labels`` learns the target's greedy chain (module docstring, "Targets")."""
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
            if labels is not None and labels[i] is not None:
                targets[i, s.start + 1 : s.stop] = _chain_targets(ids, labels[i], a, l)
            else:
                inside = (a + offsets[1:] < len(ids))
                targets[i, s.start + 1 : s.stop][inside] = row[a + offsets[1:][inside]]
            mask[i, 0, s, :a] = True  # the committed tokens before the anchor
            mask[i, 0, s, n + s.start : n + s.stop] = True  # its own block
        for j in range(len(choices), anchors):  # unused blocks: see themselves only (no NaN rows)
            mask[i, 0, j * l : (j + 1) * l, n + j * l : n + (j + 1) * l] = True
    return AnchorBatch(feats, block_ids, positions, targets, mask)


def _chain_targets(ids: list[int], labels: list[int], a: int, l: int) -> torch.Tensor:
    """``(l - 1,)`` targets of the block at anchor ``a`` of a labelled row: ``labels[a + k - 1]`` while the text has
    followed the target's greedy chain, -100 from the first draft after it left it or past the row."""
    out = torch.full((l - 1,), -100, dtype=torch.long)
    for k in range(1, l):
        if a + k >= len(ids):
            break
        out[k - 1] = labels[a + k - 1]
        if ids[a + k] != labels[a + k - 1]:  # the text leaves the chain here: later tokens are not the target's
            break
    return out
