"""A trained drafter on disk: DFlash's layout (``modeling/dflash.py``), its recipe (``recipe.json``: the config and
what the run measured) and a model card (``README.md``) saying what it is for, how it was trained, what it cost and
how often its drafts are accepted on held-out text. Written into a fresh directory, then renamed into place, so a
stopped run never leaves half a drafter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from blockdiff.errors import WouldOverwriteError
from blockdiff.files import write_text_atomic
from blockdiff.modeling.dflash import DFlashDrafter

__all__ = ["write_drafter", "drafter_source", "export_drafter", "RECIPE", "CARD"]

RECIPE, CARD = "recipe.json", "README.md"


def _card(drafter: DFlashDrafter, summary: dict) -> str:
    cfg = summary["config"]
    net, train = cfg["net"], cfg["train"]
    d = drafter.dflash
    accept = summary.get("best_accept")
    params = sum(p.numel() for p in drafter.parameters())
    return f"""---
library_name: blockdiff
tags: [speculative-decoding, dflash, block-diffusion, drafter]
base_model: {cfg['target']}
---
# DFlash-style drafter for `{cfg['target']}`

A block-diffusion drafter for lossless speculative decoding: {len(drafter.layers)} decoder layer(s)
({params / 1e6:.1f}M parameters, bf16) that denoise a block of {drafter.block_length} tokens (the last committed
token and {drafter.block_length - 1} masks, mask id {drafter.mask_token_id}) in one forward, reading the target's
hidden states of layers {d['target_layer_ids']}. It shares the target's embedding and head (not stored) and drafts
over {len(drafter.draft_ids)} token ids (`draft_ids`). The target verifies every draft, so the output is exactly the
target's own; the drafter only decides how fast.

Use: `blockdiff sample {cfg['target']} --speculative --drafter hybrid --dflash-path THIS_DIR` (or `dflash`), or in
Python `speculative_generate(target, load_drafter(THIS_DIR, target), ids, drafter="hybrid")`
(`blockdiff.modeling.dflash.load_drafter`). The layout is DFlash's: `dflash.DFlashDraftModel.from_pretrained(THIS_DIR)`
loads it, and vLLM / SGLang read the same layout (they draft over the whole head: `draft_ids` is blockdiff's).

## Training

- Data: {_data_line(summary)}; {summary['held_rows']} rows held out by prompt.
- Recipe: `blockdiff train-drafter` with `{RECIPE}`'s config: lr {train['lr']}, {train['batch_size']} rows x
  {train['anchors']} anchors per step, loss decay {train['loss_decay']}, {net['num_layers']} layer(s) initialised from
  the target's top layers.
- Cost: {summary['steps']} steps in {summary['train_seconds'] / 60:.1f} minutes of training plus
  {summary['capture_seconds'] / 60:.1f} minutes capturing features, on the machine `{RECIPE}` names (2 CPU cores).

## Held-out acceptance

Mean leading drafts equal to the target's greedy tokens per block of {drafter.block_length - 1} drafts, on held-out
rows: **{accept if accept is None else round(accept, 3)}**. End-to-end speed: docs/benchmarks.md of blockdiff.
"""


def _data_line(summary: dict) -> str:
    """What the drafter trained on: the distilled rows, and the corpus rows when there were any."""
    corpus = summary.get("corpus_rows", 0)
    rows, tokens = summary["train_rows"] - corpus, summary["train_tokens"] - summary.get("corpus_tokens", 0)
    line = f"the target's own greedy continuations (`blockdiff distill`), {rows} rows, {tokens:,} tokens"
    if corpus:
        source = summary["config"]["data"]["corpus"]
        line += (f", and {corpus} training windows of `{source}` ({summary['corpus_tokens']:,} tokens) labelled by "
                 "the target's own greedy next tokens")
    return line


def _staging(directory: Path) -> Path:
    """A fresh folder beside ``directory`` to write into before renaming (never one that already exists)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the drafter folder follows the umask
    return staging


def write_drafter(drafter: DFlashDrafter, directory: Path, summary: dict) -> None:
    """The drafter, its recipe and its card in ``directory`` (replacing only a drafter this command wrote before:
    a directory holding anything else is refused)."""
    directory = Path(directory)
    if directory.exists() and not (directory / RECIPE).is_file():
        raise WouldOverwriteError(f"{directory} exists and is not a drafter train-drafter wrote: choose another "
                                  "out_dir")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(directory)
    drafter.to(torch.float32).save(staging, dtype=torch.bfloat16)
    write_text_atomic(staging / RECIPE, json.dumps(summary, indent=2, default=str) + "\n")
    write_text_atomic(staging / CARD, _card(drafter, summary))
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def drafter_source(path: str | Path) -> Path | None:
    """The drafter folder ``path`` names (a drafter folder, or a ``train-drafter`` run holding ``drafter/``), or
    ``None`` when it is neither."""
    path = Path(path)
    for folder in (path, path / "drafter"):
        config = folder / "config.json"
        if config.is_file() and "dflash_config" in config.read_text(encoding="utf-8", errors="replace"):
            return folder
    return None


def export_drafter(source: Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Copy the drafter in ``source`` to ``out_dir`` in DFlash's layout (what the ``dflash`` package, vLLM's and
    SGLang's ``dflash`` method load), with its card and recipe. A non-empty ``out_dir`` is replaced only when it holds
    a drafter and ``overwrite`` is set."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if drafter_source(out_dir) != out_dir or not overwrite:
            raise WouldOverwriteError(
                f"{out_dir} is not empty" + ("" if drafter_source(out_dir) != out_dir else " (a drafter: add "
                                              "--overwrite to replace it)") + "; choose another OUT_DIR")
    DFlashDrafter.load(source)  # a readable, consistent drafter, before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_dir)
    for name in ("config.json", "model.safetensors", RECIPE, CARD):
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir
