"""Tests for ``blockdiff/core/noise.py``: schedules, ``sample_t`` and the absorbing forward process.

* ``alpha(t)`` and ``loss_weight(t)`` against hand-computed values, and the weight against
  ``-alpha'(t) / (1 - alpha(t))`` with ``alpha'`` from autograd;
* ``sample_t`` stays in its window; antithetic draws put exactly one draw in each stratum;
* ``add_noise`` masks at rate ``1 - alpha(t)``, with one ``t`` per *block*.

Shape legend: ``b`` batch, ``n`` tokens, ``k`` blocks, ``l`` block length.
"""

from __future__ import annotations

import math

import pytest
import torch

from blockdiff.core.noise import CosineSchedule, LogLinearSchedule, add_noise, make_schedule, sample_t

MASK = 99


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t,alpha,weight",
    [(0.25, 0.75, 4.0), (0.5, 0.5, 2.0), (0.8, 0.2, 1.25), (1.0, 0.0, 1.0), (0.01, 0.99, 100.0)],
)
def test_loglinear_hand_values(t, alpha, weight):
    s = LogLinearSchedule()
    tt = torch.tensor([t], dtype=torch.float64)
    assert s.alpha(tt).item() == pytest.approx(alpha, abs=1e-12)
    assert s.loss_weight(tt).item() == pytest.approx(weight, rel=1e-12)


def _cosine_by_hand(t: float) -> tuple[float, float]:
    a = math.cos(math.pi * t / 2)
    w = (math.pi / 2) * math.sin(math.pi * t / 2) / (1 - a)
    return a, w


def test_cosine_hand_values():
    s = CosineSchedule()
    t = torch.tensor([0.5], dtype=torch.float64)
    assert s.alpha(t).item() == pytest.approx(math.cos(math.pi / 4), abs=1e-12)
    expected_w = (math.pi / 2) * math.sin(math.pi / 4) / (1 - math.cos(math.pi / 4))
    assert s.loss_weight(t).item() == pytest.approx(expected_w, rel=1e-12)
    assert expected_w == pytest.approx(3.7922, abs=1e-4)  # the hand formula itself, numerically
    # alpha(1) = 0 (clean probability vanishes), weight(1) = pi/2
    one = torch.tensor([1.0], dtype=torch.float64)
    assert s.alpha(one).item() == pytest.approx(0.0, abs=1e-12)
    assert s.loss_weight(one).item() == pytest.approx(math.pi / 2, rel=1e-12)
    for tv in (0.1, 0.3, 0.9):
        a, w = _cosine_by_hand(tv)
        tt = torch.tensor([tv], dtype=torch.float64)
        assert s.alpha(tt).item() == pytest.approx(a, abs=1e-12)
        assert s.loss_weight(tt).item() == pytest.approx(w, rel=1e-10)


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = torch.tensor([0.05, 0.2, 0.37, 0.5, 0.73, 0.9, 0.99], dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    expected = -d_alpha / (1 - alpha.detach())
    got = schedule.loss_weight(t.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
def test_alpha_endpoints_and_monotone(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a = schedule.alpha(t)
    assert a[0].item() == pytest.approx(1.0)
    assert a[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (a[1:] <= a[:-1]).all()


def test_make_schedule():
    assert isinstance(make_schedule("loglinear"), LogLinearSchedule)
    assert isinstance(make_schedule("cosine"), CosineSchedule)
    with pytest.raises(ValueError, match="nope") as err:
        make_schedule("nope")
    assert "loglinear" in str(err.value) and "cosine" in str(err.value)


# -- sample_t -------------------------------------------------------------------------------------
WINDOWS = [(0.0, 1.0), (1e-3, 1.0), (0.3, 0.8), (0.5, 0.55), (0.0, 0.1), (0.9, 1.0)]


@pytest.mark.parametrize("low,high", WINDOWS)
@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_t_inside_window(low, high, antithetic):
    t = sample_t((64, 32), low, high, antithetic=antithetic, generator=_gen(1))
    assert t.shape == (64, 32)
    assert t.min().item() >= low and t.max().item() <= high
    # the draws actually spread over the window (not a constant, not stuck at one end)
    width = high - low
    assert t.min().item() < low + 0.05 * width and t.max().item() > high - 0.05 * width
    assert t.mean().item() == pytest.approx((low + high) / 2, abs=0.03 * width)


@pytest.mark.parametrize("m", [2, 7, 64, 1000])
@pytest.mark.parametrize("low,high", [(0.0, 1.0), (0.3, 0.8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_t_antithetic_one_draw_per_stratum(m, low, high, seed):
    t = sample_t((m,), low, high, antithetic=True, generator=_gen(seed)).double()
    u = (t - low) / (high - low)  # back to [0, 1]
    # exactly one draw per stratum [i/m, (i+1)/m) <=> the i-th smallest draw lies in stratum i
    # (up to fp32 rounding at the stratum edges, hence the 1e-6 slack)
    u_sorted = u.sort().values
    i = torch.arange(m, dtype=torch.float64)
    assert (u_sorted >= i / m - 1e-6).all() and (u_sorted <= (i + 1) / m + 1e-6).all()


def test_sample_t_antithetic_stratifies_across_a_2d_shape():
    b, k = 8, 4
    t = sample_t((b, k), 0.0, 1.0, antithetic=True, generator=_gen(3)).double()
    counts = torch.bincount(torch.floor(t.flatten() * b * k).long(), minlength=b * k)
    assert torch.equal(counts, torch.ones(b * k, dtype=torch.long))  # 32 strata: far from fp32 rounding


def test_sample_t_plain_is_not_stratified():
    # without antithetic sampling some stratum is (almost surely) empty: the flag matters
    m = 64
    t = sample_t((m,), 0.0, 1.0, antithetic=False, generator=_gen(0))
    counts = torch.bincount(torch.floor(t * m).long().clamp(max=m - 1), minlength=m)
    assert (counts == 0).any()


@pytest.mark.parametrize("value", [0.0, 0.4, 1.0])
def test_sample_t_low_equals_high_is_constant(value):
    t = sample_t((5, 3), value, value, generator=_gen(0))
    assert torch.equal(t, torch.full((5, 3), value))


@pytest.mark.parametrize("low,high", [(0.8, 0.3), (-0.1, 0.5), (0.2, 1.1), (1.5, 2.0)])
def test_sample_t_invalid_range_raises(low, high):
    with pytest.raises(ValueError):
        sample_t((4,), low, high)


def test_sample_t_generator_reproducible():
    a = sample_t((16, 4), 0.1, 0.9, generator=_gen(7))
    b = sample_t((16, 4), 0.1, 0.9, generator=_gen(7))
    c = sample_t((16, 4), 0.1, 0.9, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- add_noise ------------------------------------------------------------------------------------
def _x0(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (b, n), generator=_gen(seed))


def test_add_noise_t_one_masks_everything():
    x0 = _x0(16, 12)
    t = torch.ones(16, 3)
    out = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=_gen(1))
    assert out.masked.all()
    assert (out.xt == MASK).all()


def test_add_noise_tiny_t_masks_almost_nothing():
    b, n = 256, 16
    x0 = _x0(b, n)
    t = torch.full((b, n // 4), 1e-5)
    out = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=_gen(1))
    assert out.masked.sum().item() <= 2  # expected 0.04 of 4096 tokens
    assert torch.equal(out.xt[~out.masked], x0[~out.masked])


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()], ids=lambda s: s.name)
@pytest.mark.parametrize("tv", [0.2, 0.5, 0.85])
def test_add_noise_rate_matches_one_minus_alpha(schedule, tv):
    b, n, l = 2048, 16, 4
    x0 = _x0(b, n)
    t = torch.full((b, n // l), tv)
    out = add_noise(x0, t, schedule, l, MASK, generator=_gen(2))
    p = 1 - schedule.alpha(torch.tensor(tv)).item()
    rate = out.masked.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / (b * n))
    assert abs(rate - p) < 5 * sigma, (rate, p)


def test_add_noise_each_block_gets_its_own_t():
    b, n, l = 4096, 16, 4
    k = n // l
    per_block_t = torch.tensor([0.1, 0.9, 0.4, 0.65])
    t = per_block_t[None].expand(b, k).clone()
    x0 = _x0(b, n)
    out = add_noise(x0, t, LogLinearSchedule(), l, MASK, generator=_gen(3))
    rates = out.masked.float().view(b, k, l).mean(dim=(0, 2))  # (k,)
    for blk in range(k):
        p = per_block_t[blk].item()
        sigma = math.sqrt(p * (1 - p) / (b * l))
        assert abs(rates[blk].item() - p) < 5 * sigma, (blk, rates[blk].item(), p)
    # and the weight is per block: 1/t of each token's own block
    expected_w = (1 / per_block_t).repeat_interleave(l)[None].expand(b, n)
    torch.testing.assert_close(out.weight, expected_w)
    assert torch.equal(out.t, t)


def test_add_noise_t_varies_across_batch_rows():
    # row 0 fully masked, row 1 untouched: t is indexed by (row, block), not shared across the batch
    x0 = _x0(2, 8)
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=_gen(0))
    assert out.masked[0].all() and not out.masked[1].any()
    # per block within a row: first block all masked, second block clean
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=_gen(0))
    assert out.masked[0, :4].all() and not out.masked[0, 4:].any()
    assert not out.masked[1, :4].any() and out.masked[1, 4:].all()


def test_add_noise_masked_positions_hold_mask_others_hold_x0():
    b, n = 64, 12
    x0 = _x0(b, n)
    t = sample_t((b, n // 3), 0.2, 0.8, generator=_gen(4))
    out = add_noise(x0, t, LogLinearSchedule(), 3, MASK, generator=_gen(5))
    assert out.xt.shape == x0.shape and out.xt.dtype == x0.dtype
    assert out.masked.dtype == torch.bool
    assert 0 < out.masked.sum() < b * n
    assert (out.xt[out.masked] == MASK).all()
    assert torch.equal(out.xt[~out.masked], x0[~out.masked])
    assert torch.equal(out.masked, out.xt == MASK)  # x0 never contains MASK here


@pytest.mark.parametrize("bad_shape", [(8,), (8, 3), (4, 4), (8, 4, 1), (1, 4)])
def test_add_noise_wrong_t_shape_raises(bad_shape):
    x0 = _x0(8, 16)
    with pytest.raises(ValueError):
        add_noise(x0, torch.full(bad_shape, 0.5), LogLinearSchedule(), 4, MASK)


def test_add_noise_non_dividing_block_length_raises():
    with pytest.raises(ValueError):
        add_noise(_x0(2, 10), torch.full((2, 3), 0.5), LogLinearSchedule(), 3, MASK)


def test_add_noise_clean_prefix_keeps_the_first_positions_and_the_other_draws():
    """``clean_prefix`` (the conditioning token under the logit shift) is never masked; every other position is
    noised exactly as without it (the same random draws)."""
    x0, t = _x0(4, 16), torch.ones(4, 4)
    plain = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=torch.Generator().manual_seed(0))
    kept = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=torch.Generator().manual_seed(0), clean_prefix=1)
    assert plain.masked.all() and not kept.masked[:, 0].any() and kept.masked[:, 1:].all()
    assert torch.equal(kept.xt[:, 0], x0[:, 0])
    t = torch.full((4, 4), 0.5)
    plain = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=torch.Generator().manual_seed(1))
    kept = add_noise(x0, t, LogLinearSchedule(), 4, MASK, generator=torch.Generator().manual_seed(1), clean_prefix=1)
    assert torch.equal(kept.masked[:, 1:], plain.masked[:, 1:]) and torch.equal(kept.xt[:, 1:], plain.xt[:, 1:])
