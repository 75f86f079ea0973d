"""Tests for the drafting adapter gated to noisy rows (``blockdiff/modeling/adapter.py``, docs/design.md §14).

1. The clean stream is the frozen base, bit for bit: with a non-zero adapter present, the clean rows' hidden states,
   logits and KV cache equal those of an untouched copy of the decoder (``torch.equal``), in a sampling forward
   ``[clean prefix ; noisy block]`` and in the training forward, before and after optimizer steps (which change
   only the adapter); the decoder alone (no gate) is the base.
2. The gate matters: a fresh adapter (``B = 0``) leaves the noisy rows as they are; a non-zero one changes them.
3. The training forward with the adapter (clean stream first without gradients, then the noisy rows against its
   cache) equals the one-forward ``x_t ⊕ x_0`` computation, values and adapter gradients alike.
4. Sampling with the adapter: cached == uncached == training forward (``test_generation._drive``).
5. Save -> load gives identical logits; ``adapter.safetensors`` and the spec keys are checked on load; old
   ``blockdiff.json`` files (no new keys) load with the defaults; a deep copy (EMA) has its own adapter.
6. A tiny ``blockdiff finetune`` with ``model.adapter=gated_lora model.clean_attention=causal`` end to end: only
   the adapter trains, the exported decoder weights are the base's, the run's model and its checkpoint export agree.
7. Config errors: LoRA or gradient checkpointing together with the adapter, a rank < 1.

Tiny fp32 models (hidden 32, 2 layers, vocab 64). Shape legend: ``b`` batch, ``n`` tokens, ``l`` block length.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import MASK_ID, random_tokens, tiny_model
from test_finetune import TEXT, _finetune, save_base
from test_generation import _close, _drive, _training_logits

from blockdiff.cli import main
from blockdiff.config import ConfigError, ModelConfig
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.adapter import ADAPTER_FILE, GatedLoRA, target_modules
from blockdiff.modeling.io import load_model_dir
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.pretrained import load_pretrained
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.modeling.training_forward import _cached_training_mask

FAMILIES = ["llama", "qwen2", "gpt2"]
KEEP = torch.arange(64) != MASK_ID


def adapted(family="llama", block_length=4, logit_shift=True, clean="causal", rank=4, seed=0, n=32):
    """``(model with a gated adapter over a frozen decoder, an untouched deep copy of that decoder)``."""
    base = tiny_model(block_length, logit_shift=logit_shift, family=family, max_seq_len=n, seed=seed)
    pristine = copy.deepcopy(base.backbone)
    base.backbone.requires_grad_(False)
    spec = replace(base.spec, clean_attention=clean, adapter="gated_lora", adapter_rank=rank, adapter_alpha=8.0)
    return BlockDiffusionLM(base.backbone, spec), pristine


def randomise(adapter: GatedLoRA, scale: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def noisy(x0: torch.Tensor, seed: int = 1) -> torch.Tensor:
    hide = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    return x0.masked_fill(hide, MASK_ID)


def prefix_forward(model, backbone, ids, gate=None, use_cache=True):
    """One sampling forward ``[clean prefix ; noisy block]`` (the last ``l`` tokens noisy) through ``backbone``'s body
    with ``model``'s sampling mask; returns ``(hidden (b, q, d), cache)``."""
    b, q = ids.shape
    cols = torch.arange(q)
    mask = model.sampling_mask(cols, cols, torch.zeros(b, dtype=torch.long), noisy_from=q - model.block_length)
    if backbone is model.backbone:
        return model.hidden_states(ids, cols[None].expand(b, -1), mask, past_key_values=model.new_cache(),
                                   use_cache=use_cache, gate=gate)
    out = backbone.base_model(input_ids=ids, position_ids=cols[None].expand(b, -1), attention_mask=mask,
                              past_key_values=model.new_cache(), use_cache=use_cache)
    return out.last_hidden_state, out.past_key_values


def assert_clean_stream_is_the_base(model, pristine, seed=0):
    b, l = 2, model.block_length
    ids = random_tokens(b, 16, seed=seed)
    ids[:, -l:] = noisy(ids[:, -l:])
    clean = 16 - l
    gate = (torch.arange(16) >= clean)[None]  # (1, q): the last block is noisy
    with torch.no_grad():
        got, got_cache = prefix_forward(model, model.backbone, ids, gate)
        want, want_cache = prefix_forward(model, pristine, ids)
        assert torch.equal(got[:, :clean], want[:, :clean]), "clean rows differ from the base decoder"
        assert torch.equal(model.logits(got[:, :clean]), model.logits(want[:, :clean]))
        for mine, theirs in zip(got_cache.layers, want_cache.layers):  # the clean columns of the KV cache
            assert torch.equal(mine.keys[..., :clean, :], theirs.keys[..., :clean, :])
            assert torch.equal(mine.values[..., :clean, :], theirs.values[..., :clean, :])
        # the training forward's clean half, and the decoder alone (no gate at all)
        x0 = random_tokens(b, 32, seed=seed + 1)
        _, h_x0 = model.training_streams(noisy(x0), x0)
        mask = _cached_training_mask(32, l, "cpu", "sdpa", model.spec.clean_attention)[..., 32:, 32:]
        ref = pristine.base_model(input_ids=x0[:, : 32 - l], attention_mask=mask,
                                  position_ids=torch.arange(32 - l)[None].expand(b, -1)).last_hidden_state
        assert torch.equal(h_x0, ref)
        assert torch.equal(model.backbone(input_ids=x0).logits, pristine(input_ids=x0).logits)
    return got, want


# -- 1. the clean stream is the base, bit for bit --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("clean", ["causal", "block_causal"])
def test_clean_stream_and_cache_are_the_frozen_base_bit_for_bit(family, clean):
    model, pristine = adapted(family, clean=clean)
    randomise(model.adapter)
    got, want = assert_clean_stream_is_the_base(model, pristine)
    assert (got[:, -4:] - want[:, -4:]).abs().max().item() > 1e-3, "the noisy rows must see the adapter"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_clean_stream_stays_the_base_after_optimizer_steps(family):
    model, pristine = adapted(family)
    model.train()
    assert not model.backbone.training, "a frozen decoder under the adapter stays in eval mode (no dropout)"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x0 = random_tokens(4, 32, seed=3)
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    for _ in range(3):
        opt.zero_grad()
        block_diffusion_loss(model, x0, make_schedule("loglinear"), (1e-3, 1.0)).loss.backward()
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in model.adapter.state_dict().items()), "adapter did not train"
    for (name, mine), theirs in zip(model.backbone.state_dict().items(), pristine.state_dict().values()):
        assert torch.equal(mine, theirs), f"{name} of the frozen decoder changed"
    model.eval()
    assert_clean_stream_is_the_base(model, pristine, seed=5)


# -- 2. the gate matters ----------------------------------------------------------------------------------
def test_a_fresh_adapter_is_the_base_and_a_trained_one_changes_only_gated_rows():
    model, pristine = adapted("qwen2")
    x0 = random_tokens(2, 32, seed=2)
    xt = noisy(x0)
    with torch.no_grad():
        fresh = model(xt, x0)
        plain = BlockDiffusionLM(pristine, replace(model.spec, adapter="none", adapter_rank=None, adapter_alpha=None))
        torch.testing.assert_close(fresh, plain(xt, x0), rtol=1e-5, atol=1e-5)  # B = 0: nothing added
        randomise(model.adapter)
        assert (model(xt, x0)[..., KEEP] - fresh[..., KEEP]).abs().max().item() > 1e-2
        ids = torch.cat([x0[:, :8], xt[:, 8:12]], dim=1)
        on, _ = prefix_forward(model, model.backbone, ids, gate=(torch.arange(12) >= 8)[None])
        off, _ = prefix_forward(model, model.backbone, ids, gate=None)
        assert torch.equal(on[:, :8], off[:, :8]) and not torch.allclose(on[:, 8:], off[:, 8:])


def test_the_gate_holds_for_one_call_only():
    model, _ = adapted()
    randomise(model.adapter)
    ids = random_tokens(1, 8)
    with torch.no_grad():
        base = model.backbone(input_ids=ids).logits
        with model.adapter.gated(torch.ones(1, 8)):
            gated = model.backbone(input_ids=ids).logits
            with model.adapter.gated(None):  # nested: off inside, restored after
                assert torch.equal(model.backbone(input_ids=ids).logits, base)
            assert torch.equal(model.backbone(input_ids=ids).logits, gated)
        with pytest.raises(RuntimeError):
            with model.adapter.gated(torch.ones(1, 8)):
                raise RuntimeError("a failing forward")
        assert model.adapter._gate is None
        assert torch.equal(model.backbone(input_ids=ids).logits, base)
    assert not torch.allclose(gated, base)


@pytest.mark.parametrize(
    "family, names",
    [("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
     ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
     ("gpt2", {"c_attn", "c_proj", "c_fc"})],
)
def test_the_adapter_wraps_attention_and_mlp_layers_by_architecture(family, names):
    model = tiny_model(family=family)
    found = target_modules(model.backbone)
    assert {n.rsplit(".", 1)[-1] for n in found} == names
    assert len(found) == 2 * (len(names) + (1 if family == "gpt2" else 0))  # GPT-2 has attn.c_proj and mlp.c_proj
    assert not any("lm_head" in n or "wte" in n or "embed" in n for n in found)


# -- 3. split training forward == one joint forward --------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("block_length", [1, 4, 32])
def test_split_training_forward_equals_the_joint_forward_values_and_gradients(family, block_length):
    model, _ = adapted(family, block_length=block_length)
    model.double()  # fp64: the two computations differ only by summation order
    randomise(model.adapter, scale=0.2)
    b, n = 2, 32
    x0 = random_tokens(b, n, seed=4)
    xt = noisy(x0)
    clean = n - block_length
    weights = torch.randn(b, n, model.backbone.config.hidden_size, generator=torch.Generator().manual_seed(0)).double()

    def grads(h):
        model.adapter.zero_grad()
        (h * weights).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.adapter.parameters()])

    h_split, h_x0 = model.training_streams(xt, x0)  # the adapter path: clean stream first, no grad
    assert not h_x0.requires_grad  # nothing to back-propagate through the frozen clean half
    g_split = grads(h_split)
    mask = _cached_training_mask(n, block_length, "cpu", "sdpa", "causal")
    pos = torch.cat([torch.arange(n), torch.arange(clean)])[None].expand(b, -1)
    gate = (torch.arange(n + clean) < n)[None]
    joint, _ = model.hidden_states(torch.cat([xt, x0[:, :clean]], dim=1), pos, mask, gate=gate)
    torch.testing.assert_close(h_split, joint[:, :n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_x0, joint[:, n:].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_split, grads(joint[:, :n]), rtol=1e-9, atol=1e-9)


# -- 4. sampling with the adapter -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("logit_shift", [False, True])
@pytest.mark.parametrize("clean", ["causal", "block_causal"])
@pytest.mark.parametrize("prompt_len", [3, 8])
def test_cached_sampling_equals_uncached_and_training_forward(family, logit_shift, clean, prompt_len):
    model, _ = adapted(family, logit_shift=logit_shift, clean=clean, n=64)
    randomise(model.adapter, scale=0.3)
    rows = random_tokens(1, 64, seed=prompt_len)
    prompts = [rows[0, :prompt_len].tolist()]
    cached = _drive(model, prompts, rows, num_blocks=3, use_cache=True)
    uncached = _drive(model, prompts, rows, num_blocks=3, use_cache=False)
    for k, ((pos, block, got, _), (_, _, ref, _)) in enumerate(zip(cached, uncached)):
        predictable = pos[0] >= model.num_unpredictable
        assert _close(got[0], ref[0], predictable), f"forward {k}: cached != uncached"
        assert _close(got[0], _training_logits(model, rows[0], pos[0], block[0]), predictable), f"forward {k}"


def test_generation_drafts_with_the_adapter():
    model, pristine = adapted("llama", n=64)
    plain = BlockDiffusionLM(pristine, replace(model.spec, adapter="none", adapter_rank=None, adapter_alpha=None))
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompt = [random_tokens(1, 5, seed=9)[0].tolist()]
    fresh = model.generate(prompt, **settings).sequences
    assert torch.equal(fresh, plain.generate(prompt, **settings).sequences)  # B = 0: the base diffuser
    randomise(model.adapter, scale=2.0)
    assert not torch.equal(model.generate(prompt, **settings).sequences, fresh)


# -- 5. persistence -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits(family, tmp_path):
    model, _ = adapted(family)
    randomise(model.adapter, scale=0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_FILE).is_file()
    spec = json.loads((tmp_path / "blockdiff.json").read_text())
    assert spec["clean_attention"] == "causal" and spec["adapter"] == "gated_lora" and spec["adapter_rank"] == 4
    loaded = BlockDiffusionLM.from_pretrained(tmp_path)
    assert loaded.spec == model.spec and loaded.adapter is not None
    x0 = random_tokens(2, 32, seed=6)
    xt = noisy(x0)
    with torch.no_grad():
        assert torch.equal(loaded(xt, x0), model(xt, x0))
        ids = torch.cat([x0[:, :8], xt[:, 8:12]], dim=1)
        gate = (torch.arange(12) >= 8)[None]
        assert torch.equal(prefix_forward(loaded, loaded.backbone, ids, gate)[0],
                           prefix_forward(model, model.backbone, ids, gate)[0])


def test_adapter_file_is_checked_on_load(tmp_path):
    model, _ = adapted()
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / ADAPTER_FILE).unlink()
    with pytest.raises(MissingFileError, match=ADAPTER_FILE):
        BlockDiffusionLM.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    spec = json.loads((tmp_path / "b" / "blockdiff.json").read_text())
    (tmp_path / "b" / "blockdiff.json").write_text(json.dumps({**spec, "adapter_rank": 8}))
    with pytest.raises(UsageError, match="does not fit"):
        BlockDiffusionLM.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "blockdiff.json").write_text(json.dumps({**spec, "adapter_rank": None}))
    with pytest.raises(UsageError, match="adapter_rank"):
        BlockDiffusionLM.from_pretrained(tmp_path / "b")


def test_a_default_model_writes_no_new_keys_and_old_files_take_the_defaults(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "blockdiff.json").read_text())
    assert set(spec) == {"mask_token_id", "block_length", "logit_shift", "max_seq_len", "schedule"}
    assert not (tmp_path / ADAPTER_FILE).exists()
    loaded = BlockDiffusionSpec.from_file(tmp_path / "blockdiff.json")
    assert (loaded.clean_attention, loaded.adapter, loaded.adapter_rank) == ("block_causal", "none", None)
    with pytest.raises(UsageError, match="clean_attention"):
        BlockDiffusionSpec(MASK_ID, 4, clean_attention="bidirectional")


def test_a_deep_copy_has_its_own_adapter():
    model, _ = adapted()
    other = copy.deepcopy(model)  # what EMA weight averaging does
    assert other.adapter is not model.adapter and GatedLoRA.of(other.backbone) is other.adapter
    x0 = random_tokens(1, 32)
    xt = noisy(x0)
    with torch.no_grad():
        before = model(xt, x0)
        randomise(other.adapter)
        assert torch.equal(model(xt, x0), before)
        assert not torch.allclose(other(xt, x0)[..., KEEP], before[..., KEEP])


def test_a_second_view_shares_the_adapter_and_a_plain_spec_is_refused():
    model, _ = adapted()
    assert model.with_block_length(8).adapter is model.adapter
    with pytest.raises(UsageError, match="adapter=none"):
        BlockDiffusionLM(model.backbone, replace(model.spec, adapter="none", adapter_rank=None, adapter_alpha=None))


# -- 6. a tiny run through the real trainer -------------------------------------------------------------------
def test_finetune_with_the_gated_adapter_end_to_end(tmp_path):
    base = save_base(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = tmp_path / "run"
    code = _finetune(
        base, corpus, run, 3, "model.adapter=gated_lora", "model.clean_attention=causal", "model.adapter_rank=4",
        "trainer.limit_val_batches=1", "optim.lr=1e-2", "trainer.checkpoint_every_n_steps=3",
    )
    assert code == 0
    spec = json.loads((run / "model" / "blockdiff.json").read_text())
    assert spec["adapter"] == "gated_lora" and spec["clean_attention"] == "causal" and spec["adapter_rank"] == 4
    loaded = load_model_dir(run).model
    assert any(p.abs().sum() > 0 for n, p in loaded.adapter.named_parameters() if n.endswith(".B")), "never trained"
    decoder, _, _ = load_pretrained(str(base))  # the base with the mask token added, as the run built it
    for (name, mine), theirs in zip(loaded.backbone.state_dict().items(), decoder.state_dict().values()):
        assert torch.equal(mine, theirs), f"{name}: the exported decoder is not the base"
    x0 = random_tokens(2, 32, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(input_ids=x0).logits, decoder(input_ids=x0).logits)
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0  # from the Lightning checkpoint: the adapter comes along
    again = BlockDiffusionLM.from_pretrained(out)
    xt = noisy(x0)
    with torch.no_grad():
        assert torch.equal(again(xt, x0), loaded(xt, x0))
    text = loaded.generate([[256, 40, 41]], max_new_tokens=8, do_sample=False).sequences
    assert text.shape[0] == 1


# -- 7. config errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [({"lora_rank": 4}, "lora_rank=0"), ({"gradient_checkpointing": True}, "gradient_checkpointing"),
     ({"adapter_rank": 0}, "adapter_rank >= 1")],
)
def test_bad_adapter_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(adapter="gated_lora", **overrides)
