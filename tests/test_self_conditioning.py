"""Tests for self-conditioning (``model.self_conditioning``; docs/design.md §3.3): the training option
(``core/loss.py``), the network input (``BlockDiffusionLM.hidden_states(..., soft=...)``) and the sampling path that
feeds each step's prediction into the next (``sampling/grid.py``: ``empty_soft``, ``next_soft``).

* Off is the network of before, bit for bit: a zero self-conditioning input gives exactly the plain forward, a model
  without the option runs one training forward per loss whatever ``self_condition`` says, and its sampler never
  passes a self-conditioning input.
* On: evaluation always runs the two passes (the first without gradient), so the NELBO is a deterministic function
  of ``x_t`` (a bound, §3.3); training runs them on about half the calls; the second pass reads the first.
* Sampling with it keeps the block loop's exactness: cached == uncached, with and without prediction reuse, a batch
  == its prompts one by one (greedy, and sampled with per-sample generators), absorbing and uniform noise.
* The key reaches the spec, ``blockdiff.json`` round-trips it, and an older file without it reads as off.

Shape legend: ``b`` batch, ``n`` tokens, ``l`` block length, ``d`` hidden.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import random_tokens, tiny_model

from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec


def sc_model(block_length: int = 4, on: bool = True, uniform: bool = False, sharp: bool = True) -> BlockDiffusionLM:
    model = tiny_model(block_length, max_seq_len=64)
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(20.0)
    spec = replace(model.spec, self_conditioning=on, noise_kind="uniform" if uniform else "absorbing")
    return BlockDiffusionLM(model.backbone, spec)


def _loss(model, batch, mode="always", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return block_diffusion_loss(model, batch, make_schedule("loglinear"), (1e-3, 1.0), generator=g,
                                self_condition=mode, **kw)


def _count_training_forwards(model):
    calls = []
    inner = model.training_hidden

    def counted(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), args[5] if len(args) > 5 else kwargs.get("soft")))
        return inner(*args, **kwargs)

    model.training_hidden = counted
    return calls


# -- off: the network of before ---------------------------------------------------------------------------------

def test_a_zero_self_conditioning_input_is_exactly_the_plain_forward():
    model = tiny_model(4)
    ids = random_tokens(2, 8)
    pos = torch.arange(8)[None].expand(2, -1)
    plain, _ = model.hidden_states(ids, pos, None)
    zero, _ = model.hidden_states(ids, pos, None, soft=torch.zeros(2, 8, 32))
    assert torch.equal(plain, zero)


def test_without_the_option_one_training_forward_and_the_same_loss_in_every_mode():
    model = tiny_model(4)
    batch = random_tokens(4, 32)
    calls = _count_training_forwards(model)
    losses = [_loss(model, batch, mode).loss for mode in ("always", "random", "never")]
    assert len(calls) == 3 and all(soft is None for _, soft in calls)  # one forward each, no soft input
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


def test_without_the_option_the_sampler_passes_no_self_conditioning_input(monkeypatch):
    from blockdiff.sampling import generation

    model = tiny_model(4, max_seq_len=64)
    seen = []
    inner = generation.block_rows
    monkeypatch.setattr(generation, "block_rows", lambda *a, **k: seen.append(a[5] if len(a) > 5 else None)
                        or inner(*a, **k))
    model.generate([[1, 2, 3]], max_new_tokens=8, eos_token_id=None, seed=0)
    assert seen and all(s is None for s in seen)


# -- on: training and evaluation ---------------------------------------------------------------------------------

def test_evaluation_runs_two_passes_the_first_without_gradient():
    model = sc_model(sharp=False)
    batch = random_tokens(4, 32)
    calls = _count_training_forwards(model)
    two = _loss(model, batch, "always")
    assert [(grad, soft is None) for grad, soft in calls] == [(False, True), (True, False)]
    assert torch.equal(two.loss, _loss(model, batch, "always").loss)  # deterministic given x_t: one denoiser
    one = _loss(model, batch, "never")
    assert not torch.equal(two.loss, one.loss)  # the second pass does read the first
    soft = calls[1][1]
    masked = (soft != 0).any(-1)  # (b, n): the self-conditioning input sits at the noised positions only
    assert masked.any() and not masked.all()


def test_training_self_conditions_about_half_the_calls():
    model = sc_model(sharp=False)
    batch = random_tokens(2, 32)
    calls = _count_training_forwards(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        block_diffusion_loss(model, batch, make_schedule("loglinear"), (1e-3, 1.0), generator=g,
                             self_condition="random")
    assert 10 <= len(calls) - 40 <= 30  # extra first passes


def test_the_training_step_uses_the_random_half_and_validation_both_passes():
    from blockdiff.config import NoiseConfig, OptimConfig
    from blockdiff.training.lightning_module import BlockDiffusionModule

    model = sc_model(sharp=False)
    module = BlockDiffusionModule(model, NoiseConfig(), OptimConfig(), 10, 1.0)
    module.log = module.log_dict = lambda *a, **k: None
    calls = _count_training_forwards(model)
    torch.manual_seed(0)
    for _ in range(20):
        assert module.training_step(random_tokens(2, 32), 0).requires_grad
    assert 20 < len(calls) < 40
    calls.clear()
    module.on_validation_epoch_start()
    module.validation_step(random_tokens(2, 32), 0)
    assert len(calls) == 2


# -- on: sampling ---------------------------------------------------------------------------------------------------

def gen(model, prompts, **kw):
    kw.setdefault("eos_token_id", None)
    kw.setdefault("pad_token_id", 0)
    return model.generate(prompts, **kw)


@pytest.mark.parametrize("sampler", ["threshold", "fixed", "entropy_bound", "edit"])
def test_self_conditioned_sampling_cached_equals_uncached_and_batch_equals_one_by_one(sampler):
    model = sc_model(4)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 12, 3)]
    kw = dict(max_new_tokens=13, temperature=0, sampler=sampler, tau=0.3, entropy_bound=0.5, seed=0)
    batch = gen(model, prompts, **kw)
    assert torch.equal(batch.sequences, gen(model, prompts, use_cache=False, **kw).sequences)
    assert torch.equal(batch.sequences, gen(model, prompts, reuse_predictions=False, **kw).sequences)
    for i, p in enumerate(prompts):
        assert batch.new_tokens(i) == gen(model, [p], **kw).new_tokens(0), (sampler, i)
    plain = gen(sc_model(4, on=False), prompts, **kw)  # same weights, no self-conditioning input
    assert not torch.equal(plain.sequences, batch.sequences)


@pytest.mark.parametrize("sampler", ["ddpm", "first_hitting", "threshold"])
def test_self_conditioned_sampled_batch_with_per_sample_generators_equals_one_by_one(sampler):
    model = sc_model(4).double()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]
    kw = dict(max_new_tokens=13, sampler=sampler, temperature=1.0, tau=0.3)
    seeds = [11, 22, 33, 44]
    batch = gen(model, prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = gen(model, [prompt], generator=[torch.Generator().manual_seed(seed)], **kw)
        assert batch.new_tokens(i) == alone.new_tokens(0), (sampler, i)


@pytest.mark.parametrize("sampler", ["threshold", "ddpm", "entropy_bound"])
def test_self_conditioned_uniform_noise_sampling_is_exact(sampler):
    model = sc_model(4, uniform=True)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
    kw = dict(max_new_tokens=14, sampler=sampler, temperature=1.0, tau=0.3, entropy_bound=1.0)

    def run(ps, seeds, **extra):
        return gen(model, ps, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw, **extra)

    batch = run(prompts, [0, 1, 2])
    assert torch.equal(batch.sequences, run(prompts, [0, 1, 2], use_cache=False).sequences)
    for i, p in enumerate(prompts):
        assert run([p], [i]).new_tokens(0) == batch.new_tokens(i), (sampler, i)


def test_the_next_input_is_the_last_prediction_of_the_rows_the_forward_predicted():
    from blockdiff.sampling.grid import empty_soft, next_soft

    model = sc_model(2, sharp=False)
    soft = empty_soft(model, 2, 2, "cpu")
    assert soft.shape == (2, 2, 32) and not soft.any()
    assert empty_soft(sc_model(2, on=False), 2, 2, "cpu") is None
    logits = torch.randn(3, 64)
    predict = torch.tensor([[True, True], [False, True]])
    out, moved = next_soft(model, soft + 1.0, logits, predict, torch.tensor([True, False]))
    assert torch.allclose(out[0], model.soft_embedding(logits[:2]))
    assert torch.equal(out[1], torch.ones(2, 32))  # row 1 was not predicted (finished): its input stays
    assert moved.tolist() == [True, False]
    again, moved = next_soft(model, out, logits, predict, torch.tensor([True, False]))
    assert torch.equal(again, out) and not moved.any()  # the same prediction again: no new input, no new forward


# -- the key ------------------------------------------------------------------------------------------------------

def test_the_spec_round_trips_the_option_and_an_older_file_reads_as_off(tmp_path):
    spec = BlockDiffusionSpec(63, 4, self_conditioning=True)
    spec.save(tmp_path / "on.json")
    assert BlockDiffusionSpec.from_file(tmp_path / "on.json").self_conditioning is True
    BlockDiffusionSpec(63, 4).save(tmp_path / "off.json")
    assert "self_conditioning" not in json.loads((tmp_path / "off.json").read_text())  # readable by older versions
    assert BlockDiffusionSpec.from_file(tmp_path / "off.json").self_conditioning is False
    with pytest.raises(ValueError, match="self_conditioning must be true or false"):
        BlockDiffusionSpec(63, 4, self_conditioning="yes")


def test_the_config_key_reaches_the_spec():
    from blockdiff.config import load_config
    from blockdiff.training.builders import build_model

    cfg = load_config([], ["model.self_conditioning=true", "data.tokenizer=bytes", "model.hidden_size=32",
                           "model.num_layers=1", "model.num_heads=2", "data.max_seq_len=32"])
    _, model = build_model(cfg, {"text": ["hello"]})
    assert model.spec.self_conditioning is True
