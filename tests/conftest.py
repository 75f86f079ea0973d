"""Shared tiny fixtures: hidden 32, 2 layers, vocab 64 (STYLE.md)."""

from __future__ import annotations

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.model import BlockDiffusionLM, BlockDiffusionSpec, build_backbone

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


def random_tokens(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_ID, (b, n), generator=g)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
