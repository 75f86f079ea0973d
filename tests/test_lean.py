"""The lean CPU path (``modeling/lean.py``): packed kernels equal the plain ones; training never sees them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.errors import UsageError
from blockdiff.modeling.lean import (
    PackedConv1D,
    PackedLinear,
    is_packed,
    lean_available,
    pack_linears,
    unpack_linears,
)
from tests.conftest import random_tokens, tiny_model

pytestmark = pytest.mark.skipif(not lean_available(), reason="this torch build has no oneDNN")

FAMILIES = ["llama", "qwen2", "gpt2"]


def sharp(model):
    """Weights scaled up so greedy choices are varied (as tests/test_generation.py's sharp_model)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_layer_of_each_family_is_packed_and_unpacking_restores_it(family):
    model = tiny_model(family=family)
    plain = {name: type(m) for name, m in model.named_modules()}
    report = pack_linears(model)
    packed = [m for m in model.modules() if isinstance(m, (PackedLinear, PackedConv1D))]
    assert report.layers == len(packed) > 0
    if family == "gpt2":  # GPT-2's attention and MLP are Conv1D layers
        assert any(isinstance(m, PackedConv1D) for m in packed)
    assert pack_linears(model).layers == report.layers  # idempotent
    assert unpack_linears(model) == report.layers and not is_packed(model)
    assert {name: type(m) for name, m in model.named_modules()} == plain


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_packed_logits_equal_plain_logits_within_fp32_rounding(family, rows):
    model = sharp(tiny_model(family=family, max_seq_len=64))
    ids = random_tokens(2, rows)
    with torch.no_grad():
        plain = model.backbone(ids).logits
        pack_linears(model)
        packed = model.backbone(ids).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)


def test_the_packed_kernel_is_really_used_from_min_rows_on():
    """A packed copy replaced by zeros changes the output for inputs of min_rows rows or more, never for fewer."""
    layer = nn.Linear(16, 8)
    pack_linears(layer, min_rows=3)
    layer._packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 16), None)  # a stale, wrong copy
    layer._packed_version = layer.weight._version
    with torch.no_grad():
        for rows in (1, 2):
            x = torch.randn(rows, 16)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        x = torch.randn(3, 16)
        assert torch.equal(layer(x), layer.bias.expand(3, 8))


def test_a_weight_written_in_place_is_repacked():
    layer = nn.Linear(16, 8)
    pack_linears(layer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer.weight.add_(1.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_is_untouched_loss_and_gradients_bit_identical(family):
    """With autograd on, a packed model runs the plain kernels: the loss and every gradient are bitwise equal."""

    def step(model):
        model.train()
        ids = random_tokens(2, 16)
        loss = F.cross_entropy(model.backbone(ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = step(tiny_model(family=family))
    packed = tiny_model(family=family)
    pack_linears(packed)
    loss_packed, grads_packed = step(packed)
    assert torch.equal(loss_packed, loss_plain)
    assert grads_packed.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        assert torch.equal(grads_packed[name], grad), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [dict(sampler="threshold", tau=0.3), dict(sampler="fixed", tokens_per_step=2)])
def test_greedy_block_generation_is_unchanged_by_packing(family, settings):
    model = sharp(tiny_model(family=family, max_seq_len=64))
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 9)]
    kw = dict(max_new_tokens=12, temperature=0, eos_token_id=None, pad_token_id=0, **settings)
    plain = model.generate(prompts, **kw)
    pack_linears(model)
    packed = model.generate(prompts, **kw)
    assert torch.equal(packed.sequences, plain.sequences)


def test_weights_that_are_not_fp32_are_refused_with_what_to_do():
    model = tiny_model().double()
    with pytest.raises(UsageError, match="fp32 weights on CPU.*torch.float64.*--no-lean"):
        pack_linears(model)
    assert not is_packed(model)  # nothing half-packed


def test_min_rows_below_one_is_refused():
    with pytest.raises(UsageError, match="min_rows=0"):
        pack_linears(nn.Linear(4, 4), min_rows=0)


def test_a_loaded_model_runs_packed_on_cpu_by_default_and_not_when_asked(tmp_path):
    from blockdiff.modeling.io import load_model_dir
    from tests.conftest import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path)
    assert is_packed(load_model_dir(model_dir).model)
    assert not is_packed(load_model_dir(model_dir, lean=False).model)
    assert not is_packed(load_model_dir(model_dir, overrides=["model.block_length=2"], lean=False).model)
    assert is_packed(load_model_dir(model_dir, overrides=["model.block_length=2"]).model)


def test_a_model_loaded_to_be_trained_is_not_packed(tmp_path):
    """``model.init_from`` loads a model directory to train it: the packed copies would only cost memory."""
    from blockdiff.config import load_config
    from blockdiff.training.builders import _tokenizer_and_backbone
    from tests.conftest import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path)
    cfg = load_config([], [f"model.init_from={model_dir}", "data.tokenizer=bytes", "data.max_seq_len=32"])
    _, backbone, _ = _tokenizer_and_backbone(cfg, docs=None)
    assert not is_packed(backbone)


def test_a_packed_model_deep_copies_and_pickles_and_the_copy_runs_packed():
    import copy
    import pickle

    model = tiny_model()
    pack_linears(model)
    ids = random_tokens(1, 6)
    with torch.no_grad():
        want = model.backbone(ids).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert is_packed(clone)
            torch.testing.assert_close(clone.backbone(ids).logits, want, rtol=0, atol=0)
