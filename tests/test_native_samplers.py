"""Tests for the native parallel-decoding samplers of issue 23 (``blockdiff/sampling/samplers/{adaptive_stop,
entropy_bound,editing,renoise}.py``) and the block-loop support they need (``generation.py``, ``rewrite.py``).

* Closed-form forward counts on deterministic toy models (``toy``: the output head replaced by a function of the call
  count, so the prediction of every forward is known): a confident model stops after ``stop_stable_steps + 1``
  forwards per block; one whose argmax moves at every forward, or that is never confident, runs to the sampler's own
  end; the temperature schedule makes the entropy bound accept ``k`` tokens per step with ``k`` known; editing costs
  exactly one post step per block when nothing is edited, and edits exactly the planted positions.
* Exactness of the block loop with each: cached == uncached, a batch == its prompts one by one (greedy, and sampled
  with per-sample generators), EOS per sample.
* Step rules on hand-made states; bad inputs refused with one line naming the key; every knob round-trips through
  the generation config (save/load), the ``blockdiff sample`` flags and the server's request parsing.

Shape legend: ``b`` batch, ``l`` block length, ``r`` predicted rows, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import MASK_ID, VOCAB, random_tokens, tiny_model

from blockdiff.errors import UsageError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.sampling.samplers.adaptive_stop import AdaptiveStop
from blockdiff.sampling.samplers.base import BlockState, RewriteState, entropy
from blockdiff.sampling.samplers.editing import EditingSampler
from blockdiff.sampling.samplers.entropy_bound import EntropyBoundSampler, linear_temperature
from blockdiff.sampling.samplers.renoise import RenoiseSampler

M = MASK_ID
PROMPT = [[1, 2, 3, 4]]  # block-aligned at l = 4 (and l = 2): every new block is all masks


def sharp_model(block_length: int = 4, uniform: bool = False, **kwargs) -> BlockDiffusionLM:
    """A tiny random model with weights scaled up 20x: peaked, varied predictions."""
    model = tiny_model(block_length, max_seq_len=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return BlockDiffusionLM(model.backbone, replace(model.spec, noise_kind="uniform")) if uniform else model


def toy(model: BlockDiffusionLM, rule) -> list[int]:
    """Replace ``model``'s output head by ``rule(call, rows) -> logits (r, v)`` (``call`` counts the head's calls
    from 0); returns the list the number of rows of each call is appended to."""
    calls: list[int] = []

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = rule(len(calls), hidden.shape[0]).clone()
        calls.append(hidden.shape[0])
        out[:, M] = float("-inf")
        return out

    model.logits = logits
    return calls


def peaked(rows: int, token, margin: float = 40.0) -> torch.Tensor:
    """Logits (r, v) that put (nearly) all mass on ``token`` (an int, or one per row)."""
    out = torch.zeros(rows, VOCAB)
    ids = torch.full((rows,), token) if isinstance(token, int) else torch.tensor(token)
    return out.scatter_(-1, ids[:, None], margin)


def two_point(rows: int, p: float = 0.8) -> torch.Tensor:
    """Logits (r, v) with mass ``p`` on token 5 and ``1 - p`` on token 6 (the rest ~0)."""
    out = torch.full((rows, VOCAB), -200.0)
    out[:, 5], out[:, 6] = math.log(p), math.log(1 - p)
    return out


def gen(model, prompts=PROMPT, seed: int = 0, **settings):
    settings.setdefault("eos_token_id", None)
    settings.setdefault("pad_token_id", 0)
    return model.generate(prompts, generator=torch.Generator().manual_seed(seed), **settings)


# -- adaptive stop: closed-form forward counts -------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2, 5])
@pytest.mark.parametrize("block_length", [2, 4])
def test_a_confident_model_stops_after_k_plus_one_forwards_per_block(k, block_length):
    """first_hitting reveals one token per forward; a model that is sure of token 5 everywhere is stable from its
    first forward, so the block ends once k + 1 forwards have agreed (or when it is full: block_length forwards)."""
    model = tiny_model(block_length, max_seq_len=64)
    toy(model, lambda call, r: peaked(r, 5))
    out = gen(model, max_new_tokens=4 * block_length, sampler="first_hitting", stop_stable_steps=k, temperature=0)
    assert out.nfe == 4 * min(k + 1, block_length)
    assert out.new_tokens(0) == [5] * (4 * block_length)
    off = gen(model, max_new_tokens=4 * block_length, sampler="first_hitting", temperature=0)
    assert off.nfe == 4 * block_length  # without the rule: one forward per token


def test_a_model_that_never_stabilises_or_is_never_confident_runs_to_the_samplers_end():
    model = tiny_model(4, max_seq_len=64)
    toy(model, lambda call, r: peaked(r, 5 + call % 2))  # the argmax moves at every forward
    out = gen(model, max_new_tokens=16, sampler="first_hitting", stop_stable_steps=1, temperature=0)
    assert out.nfe == 16
    toy(model, lambda call, r: torch.zeros(r, VOCAB))  # stable but flat: entropy ln(63) > stop_entropy
    out = gen(model, max_new_tokens=16, sampler="first_hitting", stop_stable_steps=0, stop_entropy=4.0, temperature=0)
    assert out.nfe == 16
    out = gen(model, max_new_tokens=16, sampler="first_hitting", stop_stable_steps=0, stop_entropy=4.2, temperature=0)
    assert out.nfe == 4  # ln(63) = 4.143 < 4.2: confident enough, one forward per block


def test_the_stop_fills_the_masks_with_the_argmax_even_when_sampling():
    model = tiny_model(4, max_seq_len=64)
    toy(model, lambda call, r: two_point(r, 0.6))  # sampled tokens would be 5 or 6; the argmax is 5
    out = gen(model, max_new_tokens=8, sampler="first_hitting", stop_stable_steps=0, stop_entropy=0.7,
              temperature=1.0)
    assert out.nfe == 2  # H(0.6, 0.4) = 0.673 < 0.7: each block stops at its first forward
    for block in (out.new_tokens(0)[:4], out.new_tokens(0)[4:]):  # one sampled token, three argmax ones
        assert set(block) <= {5, 6} and block.count(5) >= 3


def test_the_stop_under_uniform_noise_takes_the_argmax_canvas():
    model = sharp_model(4, uniform=True)
    toy(model, lambda call, r: peaked(r, 9, margin=10.0))  # p(9) = 0.997 < tau: one written per step alone
    out = gen(model, max_new_tokens=12, sampler="threshold", tau=1.0, stop_stable_steps=1, stop_entropy=0.1,
              temperature=0)
    assert out.nfe == 3 * 2 and out.new_tokens(0) == [9] * 12  # two agreeing forwards per block


def test_stop_history_only_moves_for_rows_whose_block_changed():
    stop = AdaptiveStop(1, 1.0)
    history = stop.start(2, 3, "cpu")
    canvas = torch.tensor([[1, 2, 3], [1, 2, 3]])
    probs = torch.zeros(2, 3, VOCAB).scatter_(-1, canvas[..., None], 1.0)
    predicted = torch.ones(2, 3, dtype=torch.bool)
    first = stop.update(history, canvas, probs, predicted, torch.tensor([True, True]))
    assert first.tolist() == [False, False]  # no earlier forward to agree with
    again = stop.update(history, canvas, probs, predicted, torch.tensor([True, False]))
    assert again.tolist() == [True, False]  # row 1 was not tested (its block did not change)
    assert history.canvases[1].tolist() == [[1, 2, 3]]


# -- adaptive stop: exactness ----------------------------------------------------------------------------------

STOP = dict(stop_stable_steps=1, stop_entropy=3.5)  # loose enough that a random sharp model does stop


@pytest.mark.parametrize("sampler", ["threshold", "fixed", "entropy_bound", "edit"])  # deterministic when greedy
def test_adaptive_stop_cached_equals_uncached_and_batch_equals_one_by_one(sampler):
    model = sharp_model(4)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 12, 3)]
    kw = dict(max_new_tokens=13, temperature=0, sampler=sampler, tau=0.3, entropy_bound=0.3, **STOP)
    batch = gen(model, prompts, **kw)
    assert torch.equal(batch.sequences, gen(model, prompts, use_cache=False, **kw).sequences)
    assert torch.equal(batch.sequences, gen(model, prompts, reuse_predictions=False, **kw).sequences)
    for i, p in enumerate(prompts):
        one = gen(model, [p], **kw)
        assert batch.new_tokens(i) == one.new_tokens(0), (sampler, i)
        assert int(batch.sample_nfe[i]) >= int(one.sample_nfe[0])
    plain = gen(model, prompts, **{k: v for k, v in kw.items() if k not in STOP})
    if sampler != "edit":  # (edit reads committed positions too, whose argmax an untrained model keeps moving)
        assert int(batch.sample_nfe.sum()) < int(plain.sample_nfe.sum())  # the rule did end some blocks early


@pytest.mark.parametrize("sampler", ["threshold", "entropy_bound", "edit"])
def test_adaptive_stop_sampled_batch_with_per_sample_generators_equals_one_by_one(sampler):
    model = sharp_model(4).double()  # fp64: the entropy order must not flip with padding (see test_generation.py)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]
    kw = dict(max_new_tokens=13, sampler=sampler, temperature=1.0, eos_token_id=None, pad_token_id=0, tau=0.3,
              entropy_bound=1.0, **STOP)
    seeds = [11, 22, 33, 44]
    batch = model.generate(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = model.generate([prompt], generator=[torch.Generator().manual_seed(seed)], **kw)
        assert batch.new_tokens(i) == alone.new_tokens(0), (sampler, i)


def _eos_pair(model, kw):
    """Two prompts and an EOS token that greedy decoding of the first writes early and of the second never."""
    candidates = [random_tokens(1, n, seed=10 + n)[0].tolist() for n in (2, 3, 5, 6, 7, 9)]
    full = [gen(model, [p], max_new_tokens=16, **kw).new_tokens(0) for p in candidates]
    for a in range(len(candidates)):
        for b in range(len(candidates)):
            for j, t in enumerate(full[a][:10]):
                if a != b and j > 0 and t not in full[b] and t not in full[a][:j]:
                    return candidates[a], candidates[b], full[a], full[b], t, j
    raise AssertionError("no prompt pair with an early EOS for one and none for the other")


@pytest.mark.parametrize("settings", [dict(sampler="edit", tau=0.3), dict(sampler="threshold", tau=0.3, **STOP),
                                      dict(sampler="entropy_bound", t_max=1.0, t_min=0.3)],
                         ids=["edit", "stop", "schedule"])
def test_eos_stops_each_sample_on_its_own(settings):
    model = sharp_model(4)
    kw = dict(temperature=0, **settings)
    pa, pb, full_a, full_b, eos, j = _eos_pair(model, kw)
    for order in ([pa, pb], [pb, pa]):
        batch = gen(model, order, max_new_tokens=16, eos_token_id=eos, **kw)
        ia, ib = order.index(pa), order.index(pb)
        assert batch.new_tokens(ia) == full_a[: j + 1] and bool(batch.stopped_at_eos[ia])
        assert batch.new_tokens(ib) == full_b and not bool(batch.stopped_at_eos[ib])


# -- entropy bound with a temperature schedule --------------------------------------------------------------------

def test_the_linear_schedule_falls_from_t_max_to_t_min():
    assert [linear_temperature(2.0, 0.5, s, 4) for s in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.5, 0.5]
    assert linear_temperature(2.0, 0.5, 0, 1) == 2.0
    sampler = EntropyBoundSampler(0.5, t_max=2.0, t_min=0.5)
    assert sampler.temperature_at(0.7, 1, 4) == 1.5 and sampler.temperature_at(0.0, 1, 4) == 0.0  # greedy stays
    assert EntropyBoundSampler(0.5).temperature_at(0.7, 1, 4) == 0.7  # no schedule: the call's temperature


def test_tempered_entropy_is_the_entropy_of_the_sharpened_distribution():
    p = torch.tensor([[0.8, 0.2, 0.0]])
    q = torch.tensor([[0.8**4, 0.2**4, 0.0]])
    q = q / q.sum()
    assert torch.allclose(entropy(p, 0.25), -(q[:, :2] * q[:, :2].log()).sum(-1))
    assert torch.equal(entropy(p), entropy(p, 1.0)) and entropy(torch.zeros(1, 3), 0.5).item() == 0.0


@pytest.mark.parametrize("t, per_step", [(None, 1), (1.0, 1), (0.25, 4), (0.1, 8)])
def test_the_schedule_sets_how_many_tokens_the_bound_accepts(t, per_step):
    """Every position is (0.8, 0.2): entropy 0.500 nats at t = 1, 0.0256 at t = 0.25, ~1e-5 at t = 0.1. With a bound
    of 0.1 the rule accepts k positions while (k - 1) H <= 0.1: 1, 4 and all 8 per step."""
    model = tiny_model(8, max_seq_len=64)
    toy(model, lambda call, r: two_point(r))
    schedule = {} if t is None else dict(t_max=t, t_min=t)
    out = gen(model, [list(range(1, 9))], max_new_tokens=16, sampler="entropy_bound", entropy_bound=0.1,
              temperature=0, **schedule)
    assert out.nfe == 2 * math.ceil(8 / per_step)


def test_a_falling_schedule_accepts_more_at_later_steps():
    model = tiny_model(8, max_seq_len=64)
    toy(model, lambda call, r: two_point(r))
    events = []
    model.generate([list(range(1, 9))], max_new_tokens=8, sampler="entropy_bound", entropy_bound=0.1, temperature=0,
                   t_max=1.0, t_min=0.1, steps_per_block=3, eos_token_id=None, observer=events.append)
    counts = [len(e.revealed[0]) for e in events if not e.finished]
    assert counts == [1, 1, 6]  # t = 1.0, 0.55 (H = 0.23: one), then 0.1: everything left


def test_the_schedule_is_bit_identical_to_no_schedule_at_temperature_one():
    model = sharp_model(4)
    prompts = [[1, 2, 3], [4, 5]]
    base = gen(model, prompts, max_new_tokens=12, sampler="entropy_bound", entropy_bound=1.0, temperature=1.0)
    flat = gen(model, prompts, max_new_tokens=12, sampler="entropy_bound", entropy_bound=1.0, temperature=1.0,
               t_max=1.0, t_min=1.0)
    assert torch.equal(base.sequences, flat.sequences) and base.nfe == flat.nfe


@pytest.mark.parametrize("use_cache", [True, False])
def test_entropy_bound_schedule_batch_equals_one_by_one(use_cache):
    model = sharp_model(4)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 12, 3)]
    kw = dict(max_new_tokens=13, temperature=0, sampler="entropy_bound", entropy_bound=0.5, t_max=1.0, t_min=0.2,
              use_cache=use_cache)
    batch = gen(model, prompts, **kw)
    assert torch.equal(batch.sequences, gen(model, prompts, **{**kw, "use_cache": not use_cache}).sequences)
    for i, p in enumerate(prompts):
        assert batch.new_tokens(i) == gen(model, [p], **kw).new_tokens(0)


def test_entropy_bound_rewrite_accepts_the_lowest_entropies_and_renoises_the_rest():
    probs = torch.zeros(1, 4, VOCAB)
    for j, k in enumerate([2, 4, 3, 1]):  # entropies ln2, ln4, ln3, 0
        probs[0, j, :k] = 1.0 / k
    state = RewriteState(torch.tensor([[40, 41, 42, 43]]), torch.tensor([[False, False, False, True]]),
                         torch.ones(1, 4, dtype=torch.bool), 0, 4, M, VOCAB, probs=probs)
    proposal = torch.tensor([[10, 11, 12, 13]])
    out = EntropyBoundSampler(0.7).rewrite(proposal, torch.ones(1, 4), probs, state, torch.Generator().manual_seed(0))
    assert out.written.tolist() == [[True, False, True, True]]  # ln2 + ln3 - ln3 <= 0.7; position 3 was written
    assert out.tokens[0, [0, 2, 3]].tolist() == [10, 12, 43]
    assert out.tokens[0, 1].item() not in (41, M) and not out.done.any()  # renoised: a fresh random token


@pytest.mark.parametrize("sampler", ["entropy_bound", "renoise", "edit"])
def test_uniform_noise_samplers_cached_equals_uncached_and_batch_equals_one_by_one(sampler):
    model = sharp_model(4, uniform=True)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
    kw = dict(max_new_tokens=14, sampler=sampler, temperature=1.0, tau=0.3, entropy_bound=1.0, eos_token_id=None)

    def run(ps, seeds, **extra):
        return model.generate(ps, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw, **extra)

    batch = run(prompts, [0, 1, 2])
    assert torch.equal(batch.sequences, run(prompts, [0, 1, 2], use_cache=False).sequences)
    assert not (batch.sequences == M).any() and (batch.lengths == 14).all()
    for i, p in enumerate(prompts):
        assert run([p], [i]).new_tokens(0) == batch.new_tokens(i), (sampler, i)


@pytest.mark.parametrize("tau, per_block", [(0.99, 1), (1.0, 4)])
def test_renoise_forward_counts_follow_the_threshold_rule(tau, per_block):
    """A toy sure of token 9 at p = 0.997: every position passes tau = 0.99 at once (one forward per block); none passes
    tau = 1, so one is written per forward (four); the positions left are renoised each time, the result is 9s."""
    model = sharp_model(4, uniform=True)
    toy(model, lambda call, r: peaked(r, 9, margin=10.0))
    out = gen(model, max_new_tokens=12, sampler="renoise", tau=tau, temperature=0)
    assert out.nfe == 3 * per_block and out.new_tokens(0) == [9] * 12


@pytest.mark.parametrize("t, per_block", [(None, 4), (0.1, 1)])
def test_entropy_bound_under_uniform_noise_forward_counts(t, per_block):
    """(0.8, 0.2) everywhere: one position per step within a bound of 0.1 nats untempered, all four at t = 0.1."""
    model = sharp_model(4, uniform=True)
    toy(model, lambda call, r: two_point(r))
    schedule = {} if t is None else dict(t_max=t, t_min=t)
    out = gen(model, max_new_tokens=12, sampler="entropy_bound", entropy_bound=0.1, temperature=0, **schedule)
    assert out.nfe == 3 * per_block and out.new_tokens(0) == [5] * 12


@pytest.mark.parametrize("sampler", ["renoise", "entropy_bound", "edit"])
def test_uniform_noise_samplers_stop_each_sample_at_its_own_eos(sampler):
    """Two prompts and an EOS token that the first writes early and the second never: in one batch each stops on its
    own, with the tokens it writes alone."""
    model = sharp_model(4, uniform=True)
    kw = dict(sampler=sampler, temperature=0, tau=0.3, entropy_bound=1.0, max_new_tokens=16)

    def run(prompts, seeds, **extra):  # one generator per sample: its noise does not depend on the batch
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return model.generate(prompts, generator=generators, pad_token_id=0, **kw, **extra)

    candidates = [random_tokens(1, n, seed=10 + n)[0].tolist() for n in (2, 3, 5, 6, 7, 9)]
    full = [run([p], [i], eos_token_id=None).new_tokens(0) for i, p in enumerate(candidates)]
    pick = next((a, b, t, j) for a in range(6) for b in range(6) for j, t in enumerate(full[a][:10])
                if a != b and j > 0 and t not in full[b] and t not in full[a][:j])
    a, b, eos, j = pick
    batch = run([candidates[a], candidates[b]], [a, b], eos_token_id=eos)
    assert batch.new_tokens(0) == full[a][: j + 1] and bool(batch.stopped_at_eos[0])
    assert batch.new_tokens(1) == full[b] and not bool(batch.stopped_at_eos[1])


# -- editing ---------------------------------------------------------------------------------------------------------

def _edit_state(post_steps=None) -> BlockState:
    # prompt token 7 (not editable), committed 20 21 22 23, two masks
    tokens = torch.tensor([[7, 20, 21, 22, 23, M, M]])
    editable = torch.tensor([[False, True, True, True, True, True, True]])
    return BlockState(tokens, tokens == M, editable, torch.ones(1, 7), 1, 8, post_steps)


def test_editing_changes_exactly_the_planted_tokens():
    state = _edit_state(torch.zeros(1, dtype=torch.long))
    proposal = torch.tensor([[9, 30, 21, 32, 33, 34, 35]])
    conf = torch.tensor([[0.99, 0.9, 0.99, 0.4, 0.51, 0.95, 0.2]])
    # planted: 20 -> 30 (0.9) and 23 -> 33 (0.51); 21 is proposed again, 22 -> 32 is not confident enough,
    # the prompt token 7 is never touched; the masks fill by the threshold rule (34 at 0.95 >= tau)
    out = EditingSampler(tau=0.9, editing_threshold=0.5).step(proposal, conf, state, None)
    assert out.edited.tolist() == [[False, True, False, False, True, False, False]]
    assert out.revealed.tolist() == [[False, False, False, False, False, True, False]]
    assert out.tokens.tolist() == [[7, 30, 21, 22, 33, 34, M]]
    assert out.open.tolist() == [False]  # a mask is left: the block is open anyway


def test_editing_threshold_one_never_edits():
    state = _edit_state(torch.zeros(1, dtype=torch.long))
    proposal = torch.tensor([[9, 30, 31, 32, 33, 34, 35]])
    out = EditingSampler(editing_threshold=1.0).step(proposal, torch.ones(1, 7), state, None)  # confidence exactly 1
    assert not out.edited.any() and out.tokens[0, 1:5].tolist() == [20, 21, 22, 23]
    with pytest.raises(UsageError, match="^editing_threshold must be in \\(0, 1\\]"):
        EditingSampler(editing_threshold=1.5)


@pytest.mark.parametrize("max_post_steps, forwards", [(0, 1), (1, 2), (16, 2)])
def test_editing_costs_one_post_step_per_block_when_nothing_changes(max_post_steps, forwards):
    model = tiny_model(4, max_seq_len=64)
    calls = toy(model, lambda call, r: peaked(r, 5))
    out = gen(model, max_new_tokens=12, sampler="edit", max_post_steps=max_post_steps, temperature=0)
    assert out.nfe == 3 * forwards and out.new_tokens(0) == [5] * 12
    assert calls == [4] * (3 * forwards)  # the head reads every generated position of the block


def test_post_steps_edit_exactly_the_planted_positions_and_stop_when_nothing_changes():
    model = tiny_model(4, max_seq_len=64)
    # forward 0 fills the block with 5; forward 1 proposes 7 at position 2 (planted); forward 2 agrees: no edit
    plan = {0: [5, 5, 5, 5], 1: [5, 5, 7, 5], 2: [5, 5, 7, 5]}
    toy(model, lambda call, r: peaked(r, plan[call % 3]))
    out = gen(model, max_new_tokens=8, sampler="edit", temperature=0)
    assert out.new_tokens(0) == [5, 5, 7, 5] * 2 and out.nfe == 6
    capped = gen(model, max_new_tokens=4, sampler="edit", temperature=0, max_post_steps=1)
    assert capped.new_tokens(0) == [5, 5, 7, 5] and capped.nfe == 2  # the one post step edits, then the cap


@pytest.mark.parametrize("uniform", [False, True])
def test_a_block_that_keeps_editing_gets_exactly_max_post_steps(uniform):
    """The toy proposes 6 and 7 in turn after filling the block with 5: every post step edits, so each block takes
    its fill forward plus max_post_steps = 10 post steps, more than the loop's cap without editing (2 + 2 * 2)."""
    model = sharp_model(2, uniform=uniform)
    toy(model, lambda call, r: peaked(r, 5 if call % 11 == 0 else 6 + call % 11 % 2))
    out = gen(model, [[1, 2]], max_new_tokens=4, sampler="edit", max_post_steps=10, temperature=0)
    assert out.nfe == 2 * 11 and out.new_tokens(0) == [6, 6, 6, 6]  # the 10th post step proposes 6


def test_editing_under_uniform_noise_edits_planted_tokens_after_the_fill():
    model = sharp_model(4, uniform=True)
    plan = {0: [5, 5, 5, 5], 1: [5, 8, 5, 5], 2: [5, 8, 5, 5]}
    toy(model, lambda call, r: peaked(r, plan[call]))
    out = gen(model, max_new_tokens=4, sampler="edit", tau=0.9, temperature=0)
    assert out.new_tokens(0) == [5, 8, 5, 5] and out.nfe == 3 and out.rewrites == 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_editing_batch_equals_one_by_one(use_cache):
    model = sharp_model(4)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 12, 3, 8)]
    kw = dict(max_new_tokens=13, temperature=0, sampler="edit", tau=0.3, editing_threshold=0.2, use_cache=use_cache)
    batch = gen(model, prompts, **kw)
    assert torch.equal(batch.sequences, gen(model, prompts, **{**kw, "use_cache": not use_cache}).sequences)
    for i, p in enumerate(prompts):
        assert batch.new_tokens(i) == gen(model, [p], **kw).new_tokens(0), i
    no_edit = gen(model, prompts, **{**kw, "editing_threshold": 1.0})
    assert not torch.equal(no_edit.sequences, batch.sequences)  # the edits did change something


def test_editing_needs_a_block_longer_than_one_token():
    model = tiny_model(1, max_seq_len=64)
    with pytest.raises(UsageError, match=r"^sampler='edit' \(editing_threshold, max_post_steps\).*block_length=1"):
        gen(model, max_new_tokens=4, sampler="edit")


# -- renoise -------------------------------------------------------------------------------------------------------

def test_renoise_gives_every_unwritten_position_a_fresh_token():
    state = RewriteState(torch.tensor([[40, 41, 42, 43]]), torch.tensor([[True, False, False, False]]),
                         torch.tensor([[True, True, True, False]]), 0, 4, M, VOCAB)
    proposal = torch.tensor([[10, 11, 12, 13]])
    conf = torch.tensor([[0.95, 0.2, 0.95, 0.99]])
    g = torch.Generator().manual_seed(0)
    out = RenoiseSampler(tau=0.9).rewrite(proposal, conf, None, state, g)
    assert out.written.tolist() == [[True, False, True, False]]
    assert out.tokens[0, [0, 2, 3]].tolist() == [10, 12, 43]  # written by the threshold rule; 43 is the prompt
    draws = {RenoiseSampler(tau=0.9).rewrite(proposal, conf, None, state, g).tokens[0, 1].item() for _ in range(20)}
    assert len(draws) > 5 and M not in draws  # position 1 (0.2 < tau) is noise again, fresh at every step


def test_renoise_is_refused_under_absorbing_noise():
    with pytest.raises(UsageError, match="^sampler='renoise' renoises random tokens.*absorbing"):
        gen(tiny_model(4), max_new_tokens=4, sampler="renoise")


# -- bad input and round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(sampler="edit", editing_threshold=0.0), "^editing_threshold must be in \\(0, 1\\]"),
    (dict(sampler="edit", editing_threshold=1.01), "^editing_threshold must be in \\(0, 1\\]"),
    (dict(sampler="edit", max_post_steps=-1), "^max_post_steps must be an integer >= 0"),
    (dict(sampler="entropy_bound", t_max=0.5, t_min=0.9), "^t_min=0.9 must be <= t_max=0.5"),
    (dict(sampler="entropy_bound", t_max=0.5), "^the temperature schedule needs both t_max and t_min"),
    (dict(t_min=0.0, t_max=1.0), "^t_min must be a finite number > 0"),
    (dict(stop_stable_steps=-1), "^stop_stable_steps must be an integer >= 0"),
    (dict(stop_stable_steps=1, stop_entropy=0.0), "^stop_entropy must be a finite number > 0"),
    (dict(sampler="renoise", tau=1.5), "^tau must be in \\(0, 1\\]"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(settings, message):
    with pytest.raises(UsageError, match=message) as info:
        gen(tiny_model(4), max_new_tokens=4, **settings)
    assert "\n" not in str(info.value)


NEW_KNOBS = dict(editing_threshold=0.7, max_post_steps=3, t_max=1.5, t_min=0.5, stop_stable_steps=2,
                 stop_entropy=0.05)


def test_the_new_knobs_round_trip_through_config_cli_and_server(tmp_path):
    from blockdiff.cli.app import build_parser
    from blockdiff.sampling.config import BlockDiffusionGenerationConfig
    from blockdiff.serving.protocol import parse_request
    from blockdiff.sweeps.spec import SAMPLE_KEYS

    config = BlockDiffusionGenerationConfig(sampler="edit", **NEW_KNOBS)
    config.save_pretrained(tmp_path, config_file_name="g.json")
    loaded = BlockDiffusionGenerationConfig.from_pretrained(tmp_path, config_file_name="g.json")
    assert {k: getattr(loaded, k) for k in NEW_KNOBS} == NEW_KNOBS
    flags = [x for k, v in NEW_KNOBS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args = build_parser().parse_args(["sample", "run", "--sampler", "edit", *flags])
    assert {k: getattr(args, k) for k in NEW_KNOBS} == NEW_KNOBS
    request = parse_request({"model": "m", "prompt": "x", "sampler": "edit", **NEW_KNOBS}, False, "m")
    assert {k: request.settings[k] for k in NEW_KNOBS} == NEW_KNOBS
    assert all(k in SAMPLE_KEYS for k in NEW_KNOBS)
    model = tiny_model(4)
    out = gen(model, max_new_tokens=8, **{**NEW_KNOBS, "sampler": "edit"})  # and they run
    assert out.lengths.tolist() == [8]


def test_the_sweep_report_tells_the_new_variants_and_settings_apart():
    from blockdiff.sweeps.report import sampler_label, variant

    base = {"block_length_mixture": {}, "clip_search": "off", "beta": 0.0, "omega": 1.0, "schedule": "loglinear"}
    assert variant({"settings": base}) == "loglinear U[0,1]"  # a summary from before issue 23
    assert variant({"settings": {**base, "self_conditioning": True, "certainty_weight": 0.0}}) == (
        "loglinear U[0,1], self-conditioning")
    assert variant({"settings": {**base, "self_conditioning": False, "certainty_weight": 0.5}}) == (
        "loglinear U[0,1], certainty 0.5")
    distilled = {**base, "certainty_weight": 0.5, "data_source": "distilled:runs/d"}
    assert variant({"settings": distilled}) == "loglinear U[0,1], distilled, certainty 0.5"
    assert variant({"settings": {**base, "data_source": "shakespeare"}}) == "loglinear U[0,1]"
    # a summary written before data_source was recorded: the sweep's grid values say it
    assert variant({"settings": base, "values": {"data.source": "distilled:runs/d"}}) == "loglinear U[0,1], distilled"
    floor = {**base, "certainty_weight": 0.5, "mask_floor": [0.5, 0.4]}
    assert variant({"settings": floor}) == "loglinear U[0,1], certainty 0.5, mask floor -> 0.4 over 0.5"
    record = {"sampler": "entropy_bound", "entropy_bound": 0.5, "t_max": 0.8, "t_min": 0.4, "stop_stable_steps": 1,
              "stop_entropy": 0.05}
    assert sampler_label(record) == "entropy_bound 0.5, t 0.8->0.4, stop 1/0.05"
    assert sampler_label({"sampler": "entropy_bound", "entropy_bound": 0.1, "t_max": None}) == "entropy_bound 0.1"
    assert sampler_label({"sampler": "edit", "tau": 0.7, "editing_threshold": 0.5}) == "edit tau=0.7, edit>0.5"
    assert sampler_label({"sampler": "threshold", "tau": 0.9, "stop_stable_steps": None}) == "threshold tau=0.9"
    assert sampler_label({"sampler": "threshold", "tau": 0.9, "stop_stable_steps": 0, "stop_entropy": 0.1}) == (
        "threshold tau=0.9, stop 0/0.1")
