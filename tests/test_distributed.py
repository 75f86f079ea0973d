"""Scaling past one process: activation checkpointing with the block-diffusion mask (docs/distributed.md).

Tiny models (hidden 32, 2 layers, vocab 64, context 32) in fp64 on CPU.
"""

from __future__ import annotations

import pytest
import torch

from blockdiff.config import load_config
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.training.builders import build_model
from tests.conftest import random_tokens

TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32",
              "data.tokenizer=bytes"]


def _loss_and_gradients(family: str, logit_shift: bool, checkpointing: bool):
    """One training step's loss, parameter gradients and the bytes autograd saved for the backward pass."""
    cfg = load_config([], [*TINY_MODEL, f"model.family={family}", f"model.logit_shift={logit_shift}",
                           f"model.gradient_checkpointing={checkpointing}"])
    torch.manual_seed(0)
    _, model = build_model(cfg, docs={"text": []})
    model = model.double().train()  # train mode: gpt2's dropout is on, so the recomputation must replay its RNG
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_diffusion_loss(model, random_tokens(2, 32) % 250, make_schedule("loglinear"), (1e-3, 1.0))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_activation_checkpointing_gives_identical_loss_and_gradients(family, logit_shift):
    loss, grads, saved = _loss_and_gradients(family, logit_shift, checkpointing=False)
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_and_gradients(family, logit_shift, checkpointing=True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-12, msg=name)
    assert saved_ckpt < 0.7 * saved  # the layers' activations were not kept: they were recomputed
