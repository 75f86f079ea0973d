"""Uniform-state (random-token) noise, ``noise.kind=uniform`` (``core/uniform.py``, ``sampling/rewrite.py``): the
identities the absorbing path is tested with (``test_loss.py``, ``test_generation.py``), for uniform noise.

a. Closed form: a predictor that ignores the noisy token has NELBO exactly ``-log p(x)`` (the continuous-time
   integral over ``t`` of the exact expectation over ``z_t``), for both schedules; at ``L' = 1`` with the logit
   shift the network *is* such a predictor, so the Monte-Carlo loss estimates the AR cross-entropy.
b. The stable per-token term equals the UDLM formula written out naively (float64), is >= 0, and is 0 for a
   perfect prediction.
c. The vectorised forward on uniformly noised ``x_t`` equals the naive per-block loop; generation with the block
   cache equals generation without it (threshold and ancestral rewrite samplers, ragged prompts, a sliding window).
d. The rewrite samplers: threshold writes every confident position (a written one included, so it corrects a
   token) plus the most confident unwritten one; the ancestral sampler's posterior and its last step.
e. Plumbing: the config key reaches the saved spec; absorbing-only samplers and the drafting adapter are refused.

Shape legend: ``b`` batch, ``n`` tokens, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_ID, VOCAB, random_tokens, tiny_model
from test_loss import KEEP, check_position_split, naive_block_logits

from blockdiff.config import ConfigError, load_config
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import CosineSchedule, LogLinearSchedule, sample_t
from blockdiff.core.uniform import add_uniform_noise, uniform_posterior, uniform_token_nelbo
from blockdiff.errors import UsageError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.sampling.samplers.base import RewriteState
from blockdiff.sampling.samplers.ddpm import DDPMSampler
from blockdiff.sampling.samplers.threshold import ThresholdSampler

K = VOCAB - 1  # classes of the uniform process (every id but the mask)


def uniform_model(block_length=4, logit_shift=False, family="llama", max_seq_len=32) -> BlockDiffusionLM:
    model = tiny_model(block_length, logit_shift=logit_shift, family=family, max_seq_len=max_seq_len)
    return BlockDiffusionLM(model.backbone, replace(model.spec, noise_kind="uniform"))


def exact_nelbo(logits: torch.Tensor, x: int, schedule) -> float:
    """``int_0^1 E_{z_t ~ q_t(.|x)} [weight * bracket] dt`` for a predictor with fixed ``logits`` (v,): the expectation
    over ``z_t`` summed exactly, the integral by Gauss-Legendre on log-spaced pieces of (0, 1] (float64)."""
    nodes, w = np.polynomial.legendre.leggauss(200)
    edges = np.concatenate([[0.0], np.logspace(-9, 0, 40)])
    total = 0.0
    for a0, a1 in zip(edges[:-1], edges[1:]):
        t = torch.tensor((nodes + 1) / 2 * (a1 - a0) + a0, dtype=torch.float64)
        wt = torch.tensor(w * (a1 - a0) / 2, dtype=torch.float64)
        alpha = schedule.alpha(t)
        weight = schedule.alpha_rate(t) / (K * alpha)
        for i in range(VOCAB):
            if i == MASK_ID:
                continue
            q = alpha * (i == x) + (1 - alpha) / K  # q_t(z_t = i | x)
            m = len(t)
            bracket = uniform_token_nelbo(
                logits.expand(m, -1), torch.full((m,), x), torch.full((m,), i), alpha, MASK_ID
            ).double()
            total += float((wt * q * weight * bracket).sum())
    return total


# -- a. closed form ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
def test_constant_predictor_nelbo_is_its_cross_entropy(schedule):
    # The model's reverse process from a z_t-independent p is the time reversal of the forward process started from
    # p, so the path KL is KL(delta_x || p) = -log p(x): the bound is tight. A wrong weight or bracket breaks it.
    g = torch.Generator().manual_seed(0)
    for x, scale in [(3, 2.0), (40, 0.5)]:
        logits = torch.randn(VOCAB, generator=g, dtype=torch.float64) * scale
        logits[MASK_ID] = float("-inf")
        want = -logits.log_softmax(-1)[x].item()
        assert exact_nelbo(logits, x, schedule) == pytest.approx(want, abs=1e-5)


def test_uniform_predictor_nelbo_is_log_k():
    logits = torch.zeros(VOCAB, dtype=torch.float64)
    logits[MASK_ID] = float("-inf")
    assert exact_nelbo(logits, 7, LogLinearSchedule()) == pytest.approx(math.log(K), abs=1e-5)


def test_block_length_1_shift_monte_carlo_loss_estimates_ar_cross_entropy():
    # At L' = 1 with the logit shift token i is predicted from the clean stream at i - 1, which never sees x_t: the
    # network is a z_t-independent predictor, so E_t,z_t[loss] is the AR cross-entropy (identity a of test_loss).
    model = uniform_model(block_length=1, logit_shift=True, max_seq_len=16)
    x0 = random_tokens(64, 16, seed=3)
    with torch.no_grad():
        ar = model.with_block_length(1)(torch.full_like(x0, MASK_ID), x0, 1)[:, 1:]  # (b, n-1, v): AR logits
        ce = F.cross_entropy(ar.flatten(0, 1), x0[:, 1:].flatten()).item()
        g = torch.Generator().manual_seed(0)
        estimates = [block_diffusion_loss(model, x0, LogLinearSchedule(), (1e-3, 1.0), generator=g).loss.item()
                     for _ in range(64)]
    # The estimator is unbiased but heavy-tailed (a token resampled at small t is rare and weighs ~1/t), so the
    # check is statistical: the mean of 64 estimates within 4 standard errors, the standard error under 2%.
    mean = sum(estimates) / len(estimates)
    se = float(np.std(estimates, ddof=1)) / math.sqrt(len(estimates))
    assert se < 0.02 * ce, (se, ce)
    assert abs(mean - ce) < 4 * se, (mean, ce, se)


# -- b. the per-token term --------------------------------------------------------------------------------------
def naive_bracket(p: torch.Tensor, x: int, i: int, alpha: float) -> float:
    """UDLM's bracket as written: K/xbar_i - K/xbar_theta_i - sum_{y != i} (xbar_y/xbar_i) log(...), negated into
    the >= 0 form ``sum_{y != i} r_theta - r - r log(r_theta / r)`` (the two are equal; both checked)."""
    p = p.double() / p.double().sum()  # exactly normalised: the two forms agree only when sum(p) = 1
    cls = [y for y in range(VOCAB) if y != MASK_ID]
    xbar = {y: (1 - alpha) + K * alpha * (y == x) for y in cls}
    xbt = {y: (1 - alpha) + K * alpha * float(p[y]) for y in cls}
    bregman = sum(xbt[y] / xbt[i] - xbar[y] / xbar[i] - xbar[y] / xbar[i] * math.log(xbt[y] * xbar[i] / (xbt[i]
                  * xbar[y])) for y in cls if y != i)
    udlm = (K / xbt[i] - K / xbar[i] - sum(xbar[y] / xbar[i] * math.log(xbt[y] * xbar[i] / (xbt[i] * xbar[y]))
                                           for y in cls if y != i))
    assert bregman == pytest.approx(udlm, rel=1e-9, abs=1e-12)
    return bregman


@pytest.mark.parametrize("alpha", [1e-4, 0.05, 0.5, 0.97, 0.9995])
def test_stable_term_equals_the_naive_formula(alpha):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    x0 = torch.tensor([3, 3, 10, 10, 0, 62])
    zt = torch.tensor([3, 5, 10, 2, 0, 9])  # z_t = x and z_t != x
    got = uniform_token_nelbo(logits, x0, zt, torch.full((6,), alpha), MASK_ID)
    p = logits.clone()
    p[:, MASK_ID] = float("-inf")
    p = p.softmax(-1)
    for r in range(6):
        want = naive_bracket(p[r], int(x0[r]), int(zt[r]), alpha)
        assert float(got[r]) == pytest.approx(want, rel=2e-4, abs=1e-7)


def test_term_is_nonnegative_and_zero_for_a_perfect_prediction():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, MASK_ID, (200,), generator=g)
    zt = torch.randint(0, MASK_ID, (200,), generator=g)
    alpha = torch.rand(200, generator=g)
    assert (uniform_token_nelbo(torch.randn(200, VOCAB, generator=g), x0, zt, alpha, MASK_ID) >= -1e-6).all()
    perfect = torch.full((200, VOCAB), -1e4).scatter_(-1, x0[:, None], 0.0)
    assert uniform_token_nelbo(perfect, x0, zt, alpha, MASK_ID).abs().max() < 1e-4


def test_uniform_noise_draws_real_tokens_at_rate_one_minus_alpha():
    x0 = random_tokens(64, 32, seed=0)
    t = torch.full((64, 8), 0.5)
    out = add_uniform_noise(x0, t, LogLinearSchedule(), 4, VOCAB, MASK_ID, torch.Generator().manual_seed(0), 1)
    assert not (out.xt == MASK_ID).any()
    assert torch.equal(out.xt[:, 0], x0[:, 0]) and not out.masked[:, 0].any() and out.masked[:, 1:].all()
    changed = (out.xt != x0)[:, 1:].float().mean().item()  # resampled w.p. 1/2, to another token w.p. (K-1)/K
    assert changed == pytest.approx(0.5 * (K - 1) / K, abs=0.02)
    assert torch.allclose(out.weight, torch.full_like(out.weight, 1 / (K * 0.5)))


def test_loss_scores_every_position_and_is_differentiable():
    model = uniform_model(4)
    x0 = random_tokens(4, 32)
    out = block_diffusion_loss(model, x0, LogLinearSchedule(), (1e-3, 1.0), generator=torch.Generator().manual_seed(0),
                               reduction="block")
    assert int(out.num_masked) == x0.numel() and out.loss.item() > 0
    assert out.per_block.mean().item() == pytest.approx(out.loss.item(), rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- c. exactness of the forwards -------------------------------------------------------------------------------
@pytest.mark.parametrize("block_length, logit_shift, family", [(4, False, "llama"), (4, True, "llama"),
                                                               (8, True, "gpt2"), (1, True, "qwen2")])
def test_vectorised_forward_on_uniform_noise_equals_naive_block_loop(block_length, logit_shift, family):
    model = uniform_model(block_length, logit_shift, family)
    x0 = random_tokens(2, 32, seed=5)
    t = sample_t((2, 32 // block_length), 0.3, 0.9, generator=torch.Generator().manual_seed(0))
    xt = add_uniform_noise(x0, t, LogLinearSchedule(), block_length, VOCAB, MASK_ID,
                           torch.Generator().manual_seed(1)).xt
    assert (xt != x0).any() and not (xt == MASK_ID).any()
    with torch.no_grad():
        got, want = model(xt, x0), naive_block_logits(model, xt, x0)
    first = 1 if logit_shift else 0
    assert (got[:, first:, KEEP] - want[:, first:, KEEP]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sampler", ["threshold", "ddpm"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_cached_generation_equals_uncached(sampler, logit_shift):
    model = uniform_model(4, logit_shift, max_seq_len=32)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]

    def run(use_cache, window=None):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return model.generate(prompts, max_new_tokens=30, sampler=sampler, temperature=1.0, tau=0.02, generator=gens,
                              use_cache=use_cache, window=window, eos_token_id=None)

    cached, uncached = run(True), run(False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.rewrites == uncached.rewrites
    assert not (cached.sequences == MASK_ID).any() and (cached.lengths == 30).all()
    # past the training context (32) the window slides and re-encodes; still exact
    assert torch.equal(run(True, window=16).sequences, run(False, window=16).sequences)


def test_ancestral_rewrites_tokens_and_batch_equals_one_by_one():
    model = uniform_model(4)
    prompts = [[1, 2], [3, 4, 5, 6, 7]]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    batch = model.generate(prompts, max_new_tokens=12, sampler="ddpm", steps_per_block=6, generator=gens,
                           eos_token_id=None)
    for i, p in enumerate(prompts):
        one = model.generate([p], max_new_tokens=12, sampler="ddpm", steps_per_block=6,
                             generator=[torch.Generator().manual_seed(i)], eos_token_id=None)
        assert one.new_tokens(0) == batch.new_tokens(i)
    assert batch.rewrites > 0  # an untrained model's posterior moves written tokens around
    assert batch.sample_nfe.tolist() == [3 * 6, 3 * 6]  # T steps per block, every block


# -- d. the rewrite samplers -------------------------------------------------------------------------------------
def _state(tokens, written, editable=None):
    tokens = torch.tensor(tokens)
    editable = torch.ones_like(tokens, dtype=torch.bool) if editable is None else torch.tensor(editable)
    return RewriteState(tokens, torch.tensor(written), editable, 0, 4, MASK_ID)


def test_threshold_rewrite_corrects_a_confident_written_token():
    state = _state([[10, 11, 12, 13]], [[True, True, False, False]])
    proposal = torch.tensor([[20, 11, 22, 23]])
    conf = torch.tensor([[0.95, 0.5, 0.3, 0.4]])
    out = ThresholdSampler(tau=0.9).rewrite(proposal, conf, None, state, None)
    # position 0: written, confident in another token -> corrected; no unwritten one passes tau, so the most
    # confident unwritten one (position 3) is written too; position 1 stays (not confident), 2 stays noise.
    assert out.tokens.tolist() == [[20, 11, 12, 23]]
    assert out.written.tolist() == [[True, True, False, True]] and not out.done.any()
    conf = torch.tensor([[0.1, 0.1, 0.95, 0.1]])
    out = ThresholdSampler(tau=0.9).rewrite(proposal, conf, None, replace(state, written=out.written), None)
    assert out.tokens.tolist() == [[10, 11, 22, 13]] and out.done.all()  # every position written: final


def test_threshold_rewrite_leaves_the_prompt_alone():
    state = _state([[1, 2, 12, 13]], [[False, False, False, False]], [[False, False, True, True]])
    out = ThresholdSampler(tau=0.5).rewrite(torch.tensor([[9, 9, 9, 9]]), torch.ones(1, 4), None, state, None)
    assert out.tokens.tolist() == [[1, 2, 9, 9]] and out.done.all()


def test_uniform_posterior():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, VOCAB, generator=g)
    probs[:, MASK_ID] = 0
    probs /= probs.sum(-1, keepdim=True)
    zt = torch.tensor([0, 1, 2, 3, 4])
    post = uniform_posterior(probs, zt, 0.3, 0.6, MASK_ID)
    assert torch.allclose(post.sum(-1), torch.ones(5)) and (post[:, MASK_ID] == 0).all()
    # by hand for row 0: [a delta + (1-a)/K] [alpha_s p + (1-alpha_s)/K], a = alpha_t / alpha_s
    a = 0.5
    hand = ((1 - a) / K + a * (torch.arange(VOCAB) == 0)) * (0.6 * probs[0] + 0.4 / K)
    hand[MASK_ID] = 0
    assert torch.allclose(post[0], hand / hand.sum())
    prior = (0.6 * probs[0] + 0.4 / K).masked_fill(torch.arange(VOCAB) == MASK_ID, 0)  # sums to 1 over the K classes
    assert torch.allclose(uniform_posterior(probs, zt, 0.0, 0.6, MASK_ID)[0], prior)  # first step: the prior
    onehot = torch.zeros(5, VOCAB).scatter_(-1, torch.tensor([[7]] * 5), 1.0)
    assert (uniform_posterior(onehot, zt, 0.4, 1.0, MASK_ID).argmax(-1) == 7).all()  # last step: the clean token
    assert torch.allclose(uniform_posterior(onehot, zt, 0.4, 1.0, MASK_ID).max(-1).values, torch.ones(5))


def test_ancestral_last_step_writes_the_predicted_token():
    onehot = torch.zeros(1, 4, VOCAB).scatter_(-1, torch.tensor([[[5], [6], [7], [8]]]), 1.0)
    state = replace(_state([[10, 11, 12, 13]], [[True] * 4]), step=3)
    out = DDPMSampler().rewrite(None, None, onehot, state, torch.Generator().manual_seed(0))
    assert out.tokens.tolist() == [[5, 6, 7, 8]] and out.done.all()


# -- e. plumbing ----------------------------------------------------------------------------------------------
def test_absorbing_only_samplers_are_refused():
    model = uniform_model(4)
    with pytest.raises(UsageError, match="uniform noise.*threshold"):
        model.generate([[1]], max_new_tokens=4, sampler="fixed")


def test_config_key_reaches_the_spec_and_the_adapter_is_refused(tmp_path):
    from blockdiff.training.builders import build_model

    cfg = load_config([], ["noise.kind=uniform", "data.tokenizer=bytes", "model.hidden_size=32", "model.num_layers=1",
                           "model.num_heads=2"])
    _, model = build_model(cfg, docs={"text": []})
    assert model.spec.noise_kind == "uniform"
    model.spec.save(tmp_path / "blockdiff.json")
    assert BlockDiffusionSpec.from_file(tmp_path / "blockdiff.json").noise_kind == "uniform"
    BlockDiffusionSpec(MASK_ID, 4).save(tmp_path / "absorbing.json")
    assert "noise_kind" not in (tmp_path / "absorbing.json").read_text()  # older blockdiff reads it
    with pytest.raises(ConfigError, match="noise.kind=uniform"):
        load_config([], ["noise.kind=uniform", "model.adapter=gated_lora", "model.clean_attention=causal"])
    with pytest.raises(UsageError, match="noise_kind"):
        BlockDiffusionSpec(MASK_ID, 4, noise_kind="gaussian")


def test_uniform_loss_by_position_splits_the_same_estimate():
    """``reduction="position"`` under uniform noise: the same noise as the plain loss, split by in-block position
    (the parts add up to the loss; every position is scored)."""
    n, l, b = 16, 4, 3
    model = uniform_model(block_length=l, max_seq_len=n)
    split = check_position_split(model, random_tokens(b, n))
    assert split.position_tokens.tolist() == [b * n // l] * l
