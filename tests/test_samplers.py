"""Tests for the samplers (``blockdiff/sampling/{threshold,first_hitting,fixed,ddpm,remasking,logits}.py``).

Each sampler is checked against what its docstring promises, twice: directly, with a hand-made
``BlockState`` and confidence tensor, and inside ``model.generate`` through the ``observer`` hook, which
receives a ``StepEvent`` per denoising step (``revealed`` / ``remasked`` positions, the block's tokens,
whether the network ran) and one more when a block is final.

* first_hitting: exactly one token per step per sample while masks are left;
* threshold: every masked position with confidence >= tau, and at least one, per step;
* fixed: ``min(k, remaining)`` per step with ``tokens_per_step=k``, the most confident first; without
  ``k`` the block finishes within ``steps_per_block`` steps;
* ddpm: a block finishes within ``steps_per_block`` steps; a step may reveal nothing, and then the next
  step reuses the prediction (no forward, NFE unchanged);
* remask: re-opens only generated (never prompt) tokens of the current block, does re-open some when
  confidences are low, and never leaves a mask in a finished block;
* ``filter_logits`` (top-k, top-p) and ``choose_tokens`` (greedy, confidence = untempered probability).

Shape legend: ``b`` batch, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MASK_ID, tiny_model

from blockdiff.sampling.logits import choose_tokens, filter_logits
from blockdiff.sampling.samplers.base import BlockState
from blockdiff.sampling.samplers.ddpm import DDPMSampler
from blockdiff.sampling.samplers.entropy_bound import EntropyBoundSampler
from blockdiff.sampling.samplers.first_hitting import FirstHittingSampler
from blockdiff.sampling.samplers.fixed import FixedStepSampler
from blockdiff.sampling.samplers.remasking import RemaskingSampler
from blockdiff.sampling.samplers.threshold import ThresholdSampler

M = MASK_ID
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def sharp_model(block_length: int = 4, **kwargs):
    """A tiny random model with weights scaled up 20x: peaked predictions (confidences ~0.1-0.5)."""
    model = tiny_model(block_length, max_seq_len=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return model


def run(model, prompts, seed: int = 0, **settings):
    """``(GenerationOutput, [StepEvent])`` for ``model.generate`` with no EOS."""
    events = []
    settings.setdefault("eos_token_id", None)
    out = model.generate(prompts, generator=torch.Generator().manual_seed(seed), observer=events.append, **settings)
    return out, events


def steps_by_block(events, prompts, max_new_tokens: int):
    """``{(block, sample): (generated positions of the block, [(event, row) per denoising step], final tokens)}``."""
    out = {}
    for e in events:
        for row, (i, start) in enumerate(zip(e.samples, e.block_start)):
            key = (e.block, i)
            if key not in out:
                p = len(prompts[i])
                gen = [q for q in range(start, start + len(e.tokens[row])) if p <= q < p + max_new_tokens]
                out[key] = (gen, [], None)
            gen, steps, final = out[key]
            if e.finished:
                out[key] = (gen, steps, e.tokens[row])
            else:
                steps.append((e, row))
    assert all(final is not None for _, _, final in out.values()), "a block without its final event"
    return out


def state(tokens: list[list[int]], editable=None, confidence=None, step: int = 0, num_steps: int = 4) -> BlockState:
    t = torch.tensor(tokens)
    masked = t == M
    editable = masked.clone() if editable is None else torch.tensor(editable)
    confidence = torch.ones(t.shape) if confidence is None else torch.tensor(confidence)
    return BlockState(t, masked, editable, confidence, step, num_steps)


# -- first hitting -------------------------------------------------------------------------------------------

def test_first_hitting_step_reveals_one_uniformly_chosen_masked_position():
    s = state([[5, M, M, M, M], [M, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    proposal = torch.arange(15).view(3, 5) + 20
    counts = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        r = FirstHittingSampler().step(proposal, torch.full((3, 5), 0.5), s, g)
        assert r.revealed.sum(-1).tolist() == [1, 1, 0]
        assert not (r.revealed & ~s.masked).any() and not r.remasked.any()
        assert torch.equal(r.tokens, torch.where(r.revealed, proposal, s.tokens))
        counts += r.revealed[0].float()
    assert counts[0] == 0 and (counts[1:] > 60).all()  # uniform over the 4 masks, not the most confident


@pytest.mark.parametrize("block_length", [1, 4, 8])
def test_first_hitting_reveals_exactly_one_token_per_step_per_sample(block_length):
    model = tiny_model(block_length, max_seq_len=64)
    out, events = run(model, PROMPTS, max_new_tokens=10, sampler="first_hitting", temperature=1.0)
    for (block, i), (gen, steps, final) in steps_by_block(events, PROMPTS, 10).items():
        counts = [len(e.revealed[row]) for e, row in steps]
        # One per step while the sample has masks left, then nothing (others in the batch still denoise).
        assert counts == [1] * len(gen) + [0] * (len(counts) - len(gen)), (block, i, counts)
        assert sorted(q for e, row in steps for q in e.revealed[row]) == gen
    one, _ = run(model, PROMPTS[:1], max_new_tokens=10, sampler="first_hitting", temperature=1.0)
    assert one.nfe == 10  # a forward per new token


# -- threshold ----------------------------------------------------------------------------------------------

def test_threshold_step_reveals_every_confident_mask_and_at_least_one():
    s = state([[5, M, M, M, M, 6], [M, M, M, 7, M, M], [1, 2, 3, 4, 5, 6], [M, M, 9, 9, M, M]])
    conf = torch.tensor([
        [0.99, 0.25, 0.75, 0.5, 0.4999, 0.99],  # masked: .25 .75 .5 .4999 -> reveal 2 and 3 (0.5 >= tau)
        [0.1, 0.3, 0.2, 0.99, 0.25, 0.05],  # no masked one reaches tau -> the most confident masked one (1)
        [0.9] * 6,  # nothing masked -> nothing
        [0.6, 0.7, 0.99, 0.99, 0.8, 0.55],  # every mask is confident -> all four
    ])
    proposal = torch.arange(24).view(4, 6) + 30
    r = ThresholdSampler(0.5).step(proposal, conf, s, None)
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(r.revealed, expected)
    assert torch.equal(r.tokens, torch.where(expected, proposal, s.tokens))
    assert torch.equal(r.confidence, torch.where(expected, conf, s.confidence))
    assert not r.remasked.any()


def test_threshold_rejects_tau_outside_zero_one():
    for tau in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="tau"):
            ThresholdSampler(tau)


def test_threshold_in_generate_reveals_confident_tokens_and_always_progresses():
    model = sharp_model(8)
    tau = 0.25
    out, events = run(model, PROMPTS, max_new_tokens=20, sampler="threshold", tau=tau, temperature=0)
    parallel = 0
    for (block, i), (gen, steps, final) in steps_by_block(events, PROMPTS, 20).items():
        left = len(gen)
        for e, row in steps:
            revealed, conf = e.revealed[row], e.confidence[row]
            if left:
                assert len(revealed) >= 1, (block, i, e.step)
            if len(revealed) > 1:  # beyond the one forced reveal, only tokens at or above tau
                assert all(c >= tau - 1e-4 for c in conf), (block, i, conf)
                parallel += 1
            left -= len(revealed)
        assert left == 0
    assert parallel > 0  # the threshold did reveal several tokens in one step somewhere


@pytest.mark.parametrize("block_length", [4, 8])
def test_threshold_extremes(block_length):
    model = tiny_model(block_length, max_seq_len=64)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]  # block-aligned: the new blocks hold no prompt tail
    eager, _ = run(model, prompt, max_new_tokens=4 * block_length, sampler="threshold", tau=1e-6)
    assert eager.nfe == 4  # everything is confident enough: one forward per block
    strict, events = run(model, prompt, max_new_tokens=4 * block_length, sampler="threshold", tau=1.0)
    assert strict.nfe == 4 * block_length  # nothing reaches 1.0: one (forced) token per forward
    assert all(len(e.revealed[0]) == 1 for e in events if not e.finished)


# -- fixed ---------------------------------------------------------------------------------------------------

def test_fixed_step_reveals_the_k_most_confident_masks():
    s = state([[M, M, M, M, 3], [M, 1, M, 2, 4]])
    conf = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.9], [0.2, 0.9, 0.1, 0.9, 0.9]])
    proposal = torch.full((2, 5), 42)
    r = FixedStepSampler(2).step(proposal, conf, s, None)
    assert r.revealed.tolist() == [[False, True, True, False, False], [True, False, True, False, False]]
    block = state([[M, M, M, M, 3], [M, 1, M, 2, 4]], step=2, num_steps=4)
    r = FixedStepSampler(None).step(proposal, conf, block, None)
    assert r.revealed.sum(-1).tolist() == [2, 1]  # ceil(4 / 2), ceil(2 / 2)
    with pytest.raises(ValueError, match="tokens_per_step"):
        FixedStepSampler(0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fixed_reveals_min_k_remaining_per_step(k):
    model = sharp_model(8)
    out, events = run(model, PROMPTS, max_new_tokens=21, sampler="fixed", tokens_per_step=k, temperature=1.0)
    for (block, i), (gen, steps, final) in steps_by_block(events, PROMPTS, 21).items():
        left = len(gen)
        for e, row in steps:
            assert len(e.revealed[row]) == min(k, left), (block, i, e.step, left)
            left -= len(e.revealed[row])
        assert left == 0


@pytest.mark.parametrize("steps_per_block", [1, 2, 3, 8])
def test_fixed_without_k_spreads_the_block_over_its_step_budget(steps_per_block):
    model = sharp_model(8)
    out, events = run(model, PROMPTS, max_new_tokens=21, sampler="fixed", steps_per_block=steps_per_block)
    for (block, i), (gen, steps, final) in steps_by_block(events, PROMPTS, 21).items():
        done = [s for s, (e, row) in enumerate(steps) if e.revealed[row]]
        assert not done or max(done) < steps_per_block, (block, i)  # nothing left after the budget
        if gen:
            first = len(steps[0][0].revealed[steps[0][1]])
            assert first == math.ceil(len(gen) / steps_per_block)


# -- ddpm -----------------------------------------------------------------------------------------------------


def test_ddpm_step_reveal_probability_and_last_step():
    s = state([[M] * 1000] * 4, num_steps=4)
    g = torch.Generator().manual_seed(0)
    for step, p in [(0, 1 / 4), (1, 1 / 3), (2, 1 / 2)]:
        s.step = step
        r = DDPMSampler().step(torch.zeros(4, 1000, dtype=torch.long), torch.rand(4, 1000), s, g)
        assert abs(r.revealed.float().mean().item() - p) < 0.03, step
    s.step = 3  # the last step reveals everything
    r = DDPMSampler().step(torch.zeros(4, 1000, dtype=torch.long), torch.rand(4, 1000), s, g)
    assert r.revealed.all()


@pytest.mark.parametrize("block_length", [4, 8])
def test_ddpm_finishes_blocks_in_budget_and_reuses_the_prediction_after_an_empty_step(block_length):
    model = tiny_model(block_length, max_seq_len=64)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    kw = dict(max_new_tokens=6 * block_length, sampler="ddpm", steps_per_block=block_length, temperature=1.0)
    out, events = run(model, prompt, **kw)
    empty = 0
    for (block, i), (gen, steps, final) in steps_by_block(events, prompt, kw["max_new_tokens"]).items():
        assert len(steps) <= block_length, (block, len(steps))
        assert M not in final
        assert steps[0][0].forward
        for (prev, _), (nxt, _) in zip(steps, steps[1:]):
            assert nxt.forward == bool(prev.revealed[0]), (block, prev.step)
            empty += not prev.revealed[0]
    assert empty > 0  # the seed does produce steps that reveal nothing
    assert out.nfe == sum(e.forward for e in events)  # reused predictions cost no forward
    # Without reuse every step runs the network; the same random draws give the same tokens.
    again, events_again = run(model, prompt, reuse_predictions=False, **kw)
    assert all(e.forward for e in events_again if not e.finished)
    assert again.nfe == out.nfe + empty and torch.equal(again.sequences, out.sequences)


# -- remasking -------------------------------------------------------------------------------------------------


def test_remask_step_reopens_the_least_confident_generated_token():
    # Row 0: prompt tokens 7, 8 (not editable) with the lowest confidences; generated 20 (0.2) and 21 (0.1).
    s = state(
        [[7, 8, 20, 21, M, M]],
        editable=[[False, False, True, True, True, True]],
        confidence=[[0.01, 0.02, 0.2, 0.1, 1.0, 1.0]],
        step=1,
        num_steps=8,
    )
    proposal = torch.tensor([[0, 0, 0, 0, 30, 31]])
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.05, 0.6]])
    r = RemaskingSampler(remask_threshold=0.3, max_remask=1).step(proposal, conf, s, None)
    assert r.revealed.tolist() == [[False, False, False, False, False, True]]  # ceil(2 / 7) = 1, most confident
    assert r.remasked.tolist() == [[False, False, False, True, False, False]]  # 21: lowest generated, < 0.3
    r2 = RemaskingSampler(remask_threshold=0.3, max_remask=2).step(proposal, conf, s, None)
    assert r2.remasked.tolist() == [[False, False, True, True, False, False]]
    r3 = RemaskingSampler(remask_threshold=0.15, max_remask=2).step(proposal, conf, s, None)
    assert r3.remasked.tolist() == [[False, False, False, True, False, False]]  # 0.2 is not below 0.15
    s.step = 6  # past remask_until * num_steps = 6: behaves like fixed
    assert not RemaskingSampler(remask_threshold=0.3).step(proposal, conf, s, None).remasked.any()


@pytest.mark.parametrize("block_length, steps_per_block", [(4, None), (8, None), (8, 4), (4, 3)])
def test_remask_reopens_only_generated_tokens_and_finishes_every_block(block_length, steps_per_block):
    model = tiny_model(block_length, max_seq_len=64)  # near-uniform predictions: every confidence is low
    kw = dict(
        max_new_tokens=19, sampler="remask", remask_threshold=0.99, temperature=1.0, steps_per_block=steps_per_block
    )
    out, events = run(model, PROMPTS, **kw)
    reopened = 0
    for (block, i), (gen, steps, final) in steps_by_block(events, PROMPTS, 19).items():
        start = steps[0][0].block_start[steps[0][1]] if steps else None
        committed: set[int] = set()
        for e, row in steps:
            for q in e.remasked[row]:
                assert q in gen, f"re-opened position {q} is not generated ({gen})"
                assert q in committed, f"re-opened position {q} was not committed before this step"
                assert e.tokens[row][q - start] == M
                committed.discard(q)
            committed |= set(e.revealed[row])
            reopened += len(e.remasked[row])
            prompt_part = [t for j, t in enumerate(e.tokens[row]) if start + j < len(PROMPTS[i])]
            assert prompt_part == PROMPTS[i][start : start + len(prompt_part)]  # the prompt is never touched
        assert committed == set(gen)
        assert [final[q - start] for q in gen].count(M) == 0  # a finished block holds no mask
    assert reopened > 0
    assert not (out.sequences == M).any()


@pytest.mark.parametrize("steps_per_block", [2, 3, 4, 8])
def test_remask_finishes_every_block_within_its_step_budget(steps_per_block):
    # steps_per_block is the block's denoising-step budget (fixed and ddpm keep to it). Remasking must stop
    # early enough that the even schedule still fills the re-opened positions within the budget.
    model = tiny_model(8, max_seq_len=64)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]  # block-aligned: every new block has 8 masks
    out, events = run(
        model,
        prompt,
        max_new_tokens=32,
        sampler="remask",
        remask_threshold=0.99,
        temperature=1.0,
        steps_per_block=steps_per_block,
    )
    steps = {e.block: e.step for e in events if e.finished}
    # With a budget of 2 there is no step that is neither the first (nothing committed yet) nor the last
    # (no re-opening, so the block can finish): remasking needs a budget of at least 3.
    assert len(steps) == 4 and any(e.remasked[0] for e in events) == (steps_per_block >= 3)
    assert max(steps.values()) <= steps_per_block, f"steps per block {steps} exceed the budget {steps_per_block}"
    assert out.nfe <= 4 * steps_per_block


# -- entropy bound ---------------------------------------------------------------------------------------------


def _probs_with_entropies(spreads: list[int], vocab: int = 8) -> torch.Tensor:
    """(1, l, v): position j uniform over spreads[j] tokens, so its entropy is ln(spreads[j])."""
    probs = torch.zeros(1, len(spreads), vocab)
    for j, k in enumerate(spreads):
        probs[0, j, :k] = 1.0 / k
    return probs


@pytest.mark.parametrize(
    "bound, expected",
    [
        (0.01, [True, False, False, False]),  # the lowest-entropy position always goes (sum - max = 0)
        (0.7, [True, False, True, False]),  # ln2 + ln3 - ln3 = 0.69 <= 0.7
        (2.0, [True, True, True, False]),  # ln2 + ln3 + ln4 - ln4 = 1.79 <= 2.0
    ],
)
def test_entropy_bound_reveals_lowest_entropy_positions_within_the_bound(bound, expected):
    s = state([[M, M, M, 5]])  # entropies ln2, ln4, ln3 at the masked positions; position 3 is committed
    probs = _probs_with_entropies([2, 4, 3, 1])
    result = EntropyBoundSampler(bound).step(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), s, None, probs)
    assert result.revealed[0].tolist() == expected


def test_entropy_bound_needs_probs_and_a_positive_bound():
    with pytest.raises(ValueError, match="entropy_bound"):
        EntropyBoundSampler(0.0)
    with pytest.raises(ValueError, match="probs"):
        EntropyBoundSampler(1.0).step(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), state([[M, M]]), None)


# -- logits processing ---------------------------------------------------------------------------------------


def _random_logits(shape=(3, 5, 64), seed=0):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    logits[..., M] = float("-inf")  # SUBS: the mask token is never predicted
    return logits


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _random_logits()
    out = filter_logits(logits, top_k=k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True))
    assert torch.equal(out[kept], logits[kept])  # kept logits are unchanged
    assert torch.equal(filter_logits(logits, top_k=0), logits) and torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    logits = _random_logits()
    out = filter_logits(logits, top_p=top_p)
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    size = (probs.cumsum(-1) < top_p).sum(-1) + 1  # smallest prefix whose mass reaches top_p
    expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, torch.arange(64) < size[..., None])
    assert torch.equal(torch.isfinite(out), expected)
    assert (torch.isfinite(out).gather(-1, logits.argmax(-1, keepdim=True))).all()  # the argmax survives


def test_top_p_at_an_exact_boundary_keeps_the_smallest_nucleus():
    # Four equally likely tokens (probabilities exactly 0.25): two of them already hold top_p = 0.5, so the
    # smallest nucleus has two tokens (as in transformers' TopPLogitsWarper), not three.
    logits = torch.full((1, 1, 8), float("-inf"))
    logits[..., :4] = 0.0
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum().item() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).sum().item() == 3


def test_the_argmax_always_survives_filtering():
    logits = _random_logits((4, 16, 64), seed=1)
    top = logits.argmax(-1, keepdim=True)
    for top_k, top_p in [(1, None), (None, 1e-9), (3, 1e-9), (1, 0.99), (64, 0.01)]:
        out = filter_logits(logits, top_k=top_k, top_p=top_p)
        assert torch.isfinite(out.gather(-1, top)).all(), (top_k, top_p)
        assert (torch.isfinite(out).sum(-1) >= 1).all()
    assert (torch.isfinite(filter_logits(logits, top_k=1, top_p=1e-9)).sum(-1) == 1).all()


def test_choose_tokens_greedy_and_untempered_confidence():
    logits = _random_logits((2, 7, 64), seed=2)
    probs = logits.softmax(-1)
    tokens, conf, p = choose_tokens(logits, temperature=0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(conf, probs.max(-1).values) and torch.allclose(p, probs)
    # A tiny temperature samples the argmax too, but the confidence stays the model's own probability.
    cold, cold_conf, _ = choose_tokens(logits, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, tokens) and torch.allclose(cold_conf, conf)
    assert (conf < 0.99).any()  # so a tempered confidence (~1) would be caught
    hot, hot_conf, _ = choose_tokens(logits, temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hot_conf, probs.gather(-1, hot[..., None]).squeeze(-1))
    assert not (hot == M).any()


def test_choose_tokens_samples_the_filtered_tempered_distribution():
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    logits = base.expand(1, 20000, 4)
    g = torch.Generator().manual_seed(0)
    tokens, conf, _ = choose_tokens(logits, temperature=1.0, generator=g)
    freq = torch.bincount(tokens.flatten(), minlength=4).float() / tokens.numel()
    assert torch.allclose(freq, base.exp(), atol=0.015)
    assert torch.allclose(conf, base.exp()[tokens])  # the probability (0.5, 0.3, ...) of the token drawn
    tokens, _, _ = choose_tokens(logits, temperature=1.0, top_k=2, generator=g)
    freq = torch.bincount(tokens.flatten(), minlength=4).float() / tokens.numel()
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    tokens, conf, _ = choose_tokens(logits, temperature=2.0, generator=g)
    freq = torch.bincount(tokens.flatten(), minlength=4).float() / tokens.numel()
    assert torch.allclose(freq, (base / 2).softmax(-1), atol=0.015)
    assert torch.allclose(conf, base.exp()[tokens])  # untempered, whatever the temperature


def test_ddpm_sampling_follows_the_schedule_the_model_was_trained_with(monkeypatch):
    """A cosine-trained model is sampled with the cosine alpha(t), not the log-linear one (issue 10's bug)."""
    from dataclasses import replace

    from conftest import tiny_model

    from blockdiff.core.noise import CosineSchedule
    from blockdiff.sampling.samplers.ddpm import DDPMSampler

    seen = []
    original = DDPMSampler.__init__

    def record(self, schedule=None):
        original(self, schedule)
        seen.append(type(self.schedule))

    monkeypatch.setattr(DDPMSampler, "__init__", record)
    model = tiny_model(block_length=4)
    model.spec = replace(model.spec, schedule="cosine")
    model.generate([[1, 2, 3]], max_new_tokens=8, sampler="ddpm", steps_per_block=4, seed=0, eos_token_id=None)
    assert seen.count(CosineSchedule) >= 2  # one sampler per block, each on the trained cosine alpha(t)


# -- the fast token choice (choose_rows: inverse CDF, nucleus among topk candidates) -------------------------


def _reference_filter(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """top-k then nucleus by their definitions, with a full sort (what filter_logits computes faster)."""
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        size = ((probs.cumsum(-1) - probs < top_p).sum(-1)).clamp(min=1)  # the smallest prefix reaching top_p
        first = torch.arange(logits.shape[-1]) < size[:, None]  # (r, v) in sorted order
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, first)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, None, None), (1.3, 40, None),
                                                        (0.8, None, 0.8), (1.0, 300, 0.95), (2.0, 650, None)])
def test_choose_rows_samples_the_filtered_tempered_distribution(temperature, top_k, top_p):
    """700 tokens span three chunks of the two-level inverse CDF (the last one partial); the empirical distribution
    of 20000 draws is within its expected sampling error of softmax(filter(logits) / T), in total variation, and
    no token outside the filtered support (nor the mask token) is ever drawn."""
    from blockdiff.sampling.logits import choose_rows

    v, n = 700, 20000
    row = torch.randn(v, generator=torch.Generator().manual_seed(3)) * 2
    row[v - 1] = float("-inf")  # the mask token (SUBS), last id
    target = (_reference_filter(row[None], top_k, top_p)[0] / temperature).softmax(-1)  # (v,)
    u = torch.rand(n, generator=torch.Generator().manual_seed(4))
    tokens, conf, probs = choose_rows(row.expand(n, v), u, temperature, top_k, top_p, need_probs=False)
    assert probs is None and (target[tokens] > 0).all()
    assert torch.allclose(conf, row.softmax(-1)[tokens])  # the untempered probability
    freq = torch.bincount(tokens, minlength=v).double() / n
    tv = 0.5 * (freq - target.double()).abs().sum()
    expected = 0.5 * (target.double() * (1 - target.double()) / n).sqrt().sum()  # >= E[TV] (Jensen)
    assert tv < 1.25 * expected + 1e-3, (float(tv), float(expected))


def test_the_nucleus_is_the_sorted_definition_at_every_candidate_width():
    """Rows whose nucleus fits in 256 candidates, in 4096, or needs the whole vocabulary of 6000 (flat)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 6000, generator=g) * torch.tensor([8.0, 8.0, 2.5, 2.5, 0.05, 0.01])[:, None]
    for top_p in (0.3, 0.9, 0.999):
        got = torch.isfinite(filter_logits(logits, top_p=top_p))
        assert torch.equal(got, torch.isfinite(_reference_filter(logits, None, top_p))), top_p
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).sum(-1).tolist()[4] > 4096  # the widest case ran
    tied = torch.zeros(1, 6000)  # exact ties: which tokens is arbitrary (as with a sort), how many is not
    want = torch.isfinite(_reference_filter(tied, None, 0.5)).sum()
    assert torch.isfinite(filter_logits(tied, top_p=0.5)).sum() == want


def test_inverse_cdf_never_returns_a_zero_weight_entry():
    from blockdiff.sampling.logits import _inverse_cdf

    weights = torch.zeros(4, 600)
    weights[0, 5] = 1.0  # a single entry
    weights[1, 300:302] = 1e-30  # tiny entries in the middle chunk
    weights[2, ::7] = torch.rand(86, generator=torch.Generator().manual_seed(0))
    weights[3, 599] = 3.0  # the last entry of the partial chunk
    for u in (0.0, 0.5, 1.0 - 2**-24):
        picked = _inverse_cdf(weights, torch.full((4,), u))
        assert (weights.gather(-1, picked[:, None]) > 0).all(), u


def test_choose_rows_greedy_is_the_argmax_without_probs_unless_asked():
    from blockdiff.sampling.logits import choose_rows

    logits = _random_logits((9, 64), seed=6)
    tokens, conf, probs = choose_rows(logits, None, 0.0, top_k=3, top_p=0.5, need_probs=False)
    assert probs is None and torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(conf, logits.softmax(-1).max(-1).values)
    assert torch.allclose(choose_rows(logits, None, 0.0)[2], logits.softmax(-1))
