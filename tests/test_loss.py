"""Tests for ``blockdiff/core/loss.py`` and the identities of docs/design.md §7 that prove the math is right.

a. ``block_length = 1`` + logit shift + "mask everything" (``t = 1``) is exactly AR next-token CE.
b. ``block_length = 1`` without shift + ``t = 1`` is AR with a mask query: position ``i`` is predicted
   from ``[x_0[:i], MASK]`` run causally.
c. The vectorised ``x_t ⊕ x_0`` forward gives the same logits as a naive loop over blocks that runs the
   network on ``[clean blocks < k ; noisy block k]`` (with and without the logit shift).
d. ``nelbo`` counts only masked positions, applies the weight, and normalises per predicted token.
e. ``bits_per_byte`` by hand.
f. ``block_length == n`` (MDLM) runs; a block length that does not divide ``n`` is refused.
g. ``clean_attention=causal``: the vectorised forward equals the naive loop that runs ``[clean prefix, token-causal ;
   noisy block k]``, and the x_0 half's logits are the plain decoder's causal logits.

Tiny fp32 models from ``conftest.py`` (hidden 32, 2 layers, vocab 64). Shape legend: ``b`` batch,
``n`` tokens, ``k`` block index, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_ID, VOCAB, random_tokens, tiny_model

from blockdiff.core.loss import bits_per_byte, block_diffusion_loss, nelbo
from blockdiff.core.masks import block_causal_mask, causal_prefix_mask
from blockdiff.core.noise import CosineSchedule, LogLinearSchedule, add_noise, sample_t
from blockdiff.modeling.model import BlockDiffusionLM

FAMILIES = ["llama", "qwen2", "gpt2"]
KEEP = torch.arange(VOCAB) != MASK_ID  # vocabulary columns other than the mask (whose logit is -inf)


def _subs(logits: torch.Tensor) -> torch.Tensor:
    """SUBS by hand: the mask token is never predicted."""
    logits = logits.float().clone()
    logits[..., MASK_ID] = float("-inf")
    return logits


def _random_xt(x0: torch.Tensor, p: float = 0.5, seed: int = 1) -> torch.Tensor:
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed)) < p  # (b, n)
    return torch.where(masked, torch.full_like(x0, MASK_ID), x0)


# -- a. block length 1 + shift + t = 1 is the AR loss ------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_block_length_1_shift_equals_ar_cross_entropy(family):
    b, n = 3, 16
    model = tiny_model(block_length=1, logit_shift=True, family=family, max_seq_len=n)
    x0 = random_tokens(b, n)
    with torch.no_grad():
        out = block_diffusion_loss(model, x0, LogLinearSchedule(), t_range=(1.0, 1.0))
        ar_logits = _subs(model.backbone(input_ids=x0).logits)  # (b, n, v)
    ar = F.cross_entropy(ar_logits[:, :-1].reshape(-1, VOCAB), x0[:, 1:].reshape(-1))
    assert out.num_tokens.item() == b * (n - 1)  # position 0 has no predecessor
    assert out.num_masked.item() == b * (n - 1)
    assert abs(out.loss.item() - ar.item()) < 1e-5, (out.loss.item(), ar.item())
    # the identity is not trivially true: a different batch gives a different AR loss
    other = F.cross_entropy(ar_logits[:, :-1].reshape(-1, VOCAB), x0.roll(1, dims=1)[:, 1:].reshape(-1))
    assert abs(out.loss.item() - other.item()) > 1e-3


# -- b. block length 1, no shift, t = 1: AR with a mask query ---------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_block_length_1_no_shift_equals_ar_with_mask_query(family):
    b, n = 2, 12
    model = tiny_model(block_length=1, logit_shift=False, family=family, max_seq_len=n)
    x0 = random_tokens(b, n, seed=3)
    with torch.no_grad():
        out = block_diffusion_loss(model, x0, LogLinearSchedule(), t_range=(1.0, 1.0))
        nlls = []
        for i in range(n):
            ids = torch.cat([x0[:, :i], torch.full((b, 1), MASK_ID)], dim=1)  # (b, i+1)
            logits = _subs(model.backbone(input_ids=ids).logits[:, -1])  # (b, v), plain causal forward
            nlls.append(F.cross_entropy(logits, x0[:, i], reduction="none"))  # (b,)
    naive = torch.stack(nlls).mean()
    assert out.num_tokens.item() == b * n
    assert abs(out.loss.item() - naive.item()) < 1e-5, (out.loss.item(), naive.item())


# -- c. vectorised forward == naive per-block loop --------------------------------------------------
def naive_block_logits(model, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Logits ``(b, n, v)`` from one network call per block on ``[x0 blocks < k ; xt block k]``.

    With the logit shift, token ``i`` reads the output at ``i - 1``: inside the noisy block for all but
    the block's first token, which reads the clean prefix's last row. Row 0 is left as NaN. The clean prefix
    attends block-causally, or token-causally under ``spec.clean_attention=causal`` (the noisy block sees the
    whole prefix and itself either way).
    """
    b, n = x0.shape
    l = model.block_length
    out = torch.full((b, n, model.vocab_size), float("nan"))
    for k in range(n // l):
        start, end = k * l, (k + 1) * l
        ids = torch.cat([x0[:, :start], xt[:, start:end]], dim=1)  # (b, end)
        pos = torch.arange(end)  # (end,)
        if model.spec.clean_attention == "causal":
            allowed = causal_prefix_mask(pos, pos, l, noisy_from=start)  # (end, end)
        else:
            allowed = block_causal_mask(pos, pos, l)  # (end, end)
        mask = model.format_mask(allowed[None, None])  # (1, 1, end, end)
        hidden, _ = model.hidden_states(ids, pos[None].expand(b, -1), mask)  # (b, end, d)
        logits = model.logits(hidden)  # (b, end, v)
        if not model.spec.logit_shift:
            out[:, start:end] = logits[:, start:end]
        else:
            if k > 0:
                out[:, start] = logits[:, start - 1]  # clean stream, last position of block k-1
            out[:, start + 1 : end] = logits[:, start : end - 1]  # noisy block, shifted by one
    return out


def _check_vectorised_equals_naive(block_length, logit_shift, family, attn="sdpa", n=32, b=2, clean="block_causal"):
    model = tiny_model(block_length=block_length, logit_shift=logit_shift, family=family, max_seq_len=n, attn=attn)
    model = BlockDiffusionLM(model.backbone, replace(model.spec, clean_attention=clean))
    x0 = random_tokens(b, n, seed=5)
    xt = _random_xt(x0)
    assert (xt != x0).any() and (xt == x0).any()
    with torch.no_grad():
        got = model(xt, x0)  # (b, n, v)
        want = naive_block_logits(model, xt, x0)  # (b, n, v)
    assert got.shape == (b, n, VOCAB)
    assert torch.isneginf(got[..., MASK_ID]).all()
    first = 1 if logit_shift else 0
    got, want = got[:, first:, KEEP], want[:, first:, KEEP]
    assert torch.isfinite(want).all()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("logit_shift", [False, True])
@pytest.mark.parametrize("block_length", [1, 2, 4, 8, 32])
def test_vectorised_forward_equals_naive_block_loop(block_length, logit_shift, family):
    _check_vectorised_equals_naive(block_length, logit_shift, family)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_vectorised_forward_equals_naive_block_loop_attn(attn, logit_shift):
    _check_vectorised_equals_naive(4, logit_shift, "qwen2", attn=attn)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("logit_shift", [False, True])
@pytest.mark.parametrize("block_length", [1, 4, 8, 32])
def test_causal_clean_stream_vectorised_forward_equals_naive_block_loop(block_length, logit_shift, family):
    _check_vectorised_equals_naive(block_length, logit_shift, family, clean="causal")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_clean_stream_vectorised_equals_naive_attn(attn):
    _check_vectorised_equals_naive(4, True, "qwen2", attn=attn, clean="causal")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_length", [1, 4, 8])
def test_causal_clean_half_is_the_plain_decoder(family, block_length):
    """With clean_attention=causal the x_0 half of the training forward computes the plain causal decoder: its
    logits equal ``backbone(x_0)`` (fp64, so no kernel-order noise can hide a difference)."""
    n, b = 32, 2
    model = tiny_model(block_length=block_length, logit_shift=True, family=family, max_seq_len=n).double()
    model = BlockDiffusionLM(model.backbone, replace(model.spec, clean_attention="causal"))
    x0 = random_tokens(b, n, seed=7)
    xt = _random_xt(x0)
    with torch.no_grad():
        _, clean = model.training_streams(xt, x0)  # (b, n - l, d)
        got = model.logits(clean)
        want = model.logits(model.backbone.base_model(input_ids=x0).last_hidden_state)[:, : n - block_length]
        blocky = BlockDiffusionLM(model.backbone, replace(model.spec, clean_attention="block_causal"))
        other = model.logits(blocky.training_streams(xt, x0)[1])
    assert clean.shape == (b, n - block_length, model.backbone.config.hidden_size)
    torch.testing.assert_close(got[..., KEEP], want[..., KEEP], rtol=0, atol=1e-12)
    if block_length > 1:  # the block-causal clean half is not the decoder: the check has teeth
        assert (other[..., KEEP] - want[..., KEEP]).abs().max().item() > 1e-4


def test_naive_loop_detects_a_wrong_mask():
    """Guard for test c: the comparison is sensitive — leaking the clean current block changes logits."""
    n, l, b = 16, 4, 2
    model = tiny_model(block_length=l, max_seq_len=n)
    x0 = random_tokens(b, n, seed=5)
    xt = _random_xt(x0)
    with torch.no_grad():
        want = naive_block_logits(model, xt, x0)
        # a broken "vectorised" forward: noisy block k also sees the clean block k (offset not strict)
        ids = torch.cat([xt, x0], dim=1)
        q = torch.arange(2 * n)
        blk = (q % n) // l
        clean = q >= n
        allowed = (
            (~clean[:, None] & ~clean[None] & (blk[:, None] == blk[None]))
            | (~clean[:, None] & clean[None] & (blk[None] <= blk[:, None]))
            | (clean[:, None] & clean[None] & (blk[None] <= blk[:, None]))
        )
        pos = torch.arange(n).repeat(2)[None].expand(b, -1)
        hidden, _ = model.hidden_states(ids, pos, model.format_mask(allowed[None, None]))
        wrong = model.logits(hidden[:, :n])
    assert (wrong[..., KEEP] - want[..., KEEP]).abs().max().item() > 1e-3


# -- block_diffusion_loss == nelbo of the vectorised logits -----------------------------------------
@pytest.mark.parametrize("logit_shift", [False, True])
def test_block_diffusion_loss_matches_manual_pipeline(logit_shift):
    b, n, l = 4, 16, 4
    model = tiny_model(block_length=l, logit_shift=logit_shift, max_seq_len=n)
    x0 = random_tokens(b, n, seed=2)
    schedule = CosineSchedule()
    t = sample_t((b, n // l), 0.2, 0.9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block_diffusion_loss(model, x0, schedule, (0.2, 0.9), t=t, generator=torch.Generator().manual_seed(9))
        noised = add_noise(x0, t, schedule, l, MASK_ID, generator=torch.Generator().manual_seed(9))
        logits = model(noised.xt, x0)  # (b, n, v)
    first = 1 if logit_shift else 0
    sel = noised.masked.clone()
    sel[:, :first] = False
    nll = F.cross_entropy(logits[sel], x0[sel], reduction="none")
    expected = (noised.weight[sel] * nll).sum() / (b * (n - first))
    assert out.num_masked.item() == sel.sum().item() > 0
    assert out.num_tokens.item() == b * (n - first)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


# -- d. nelbo with hand-made tensors ----------------------------------------------------------------
def _logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()[None].float()  # (1, n, v)


def test_nelbo_only_masked_positions_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    x0 = torch.randint(0, 5, (2, 6), generator=g)
    masked = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    weight = torch.rand(2, 6, generator=g) + 0.5
    valid = torch.ones(2, 6, dtype=torch.bool)
    base = nelbo(logits, x0, masked, weight, valid)

    changed = logits.clone()
    changed[~masked] = torch.randn(int((~masked).sum()), 5, generator=g) * 10  # unmasked rows only
    torch.testing.assert_close(nelbo(changed, x0, masked, weight, valid).loss, base.loss)
    weight_changed = weight.clone()
    weight_changed[~masked] = 123.0
    torch.testing.assert_close(nelbo(logits, x0, masked, weight_changed, valid).loss, base.loss)

    changed = logits.clone()
    changed[masked] += torch.randn(int(masked.sum()), 5, generator=g) * 10  # masked rows do matter
    assert abs(nelbo(changed, x0, masked, weight, valid).loss.item() - base.loss.item()) > 1e-3

    # pre-gathered (m, v) rows give the same result as the full (b, n, v) logits
    torch.testing.assert_close(nelbo(logits[masked & valid], x0, masked, weight, valid).loss, base.loss)


def test_nelbo_hand_computed_weighted_sum():
    # 4 positions, vocab 4; positions 0 and 2 masked with CE ln 2 and ln 4; weights 2 and 0.5
    logits = _logits_from_probs(
        [
            [0.5, 0.25, 0.125, 0.125],  # target 0 -> CE ln 2
            [0.1, 0.2, 0.3, 0.4],  # unmasked
            [0.25, 0.25, 0.25, 0.25],  # target 3 -> CE ln 4
            [0.7, 0.1, 0.1, 0.1],  # unmasked
        ]
    )
    x0 = torch.tensor([[0, 1, 3, 2]])
    masked = torch.tensor([[True, False, True, False]])
    weight = torch.tensor([[2.0, 7.0, 0.5, 9.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    out = nelbo(logits, x0, masked, weight, valid)
    expected_sum = 2.0 * math.log(2) + 0.5 * math.log(4)  # = 3 ln 2
    assert out.nll_sum.item() == pytest.approx(expected_sum, rel=1e-6)
    assert out.num_masked.item() == 2
    assert out.num_tokens.item() == 4
    assert out.loss.item() == pytest.approx(expected_sum / 4, rel=1e-6)  # per predicted token, not per masked


def test_nelbo_normalises_by_valid_positions_and_ignores_invalid():
    logits = _logits_from_probs(
        [
            [0.25, 0.25, 0.25, 0.25],  # invalid (e.g. position 0 under the logit shift), masked
            [0.5, 0.25, 0.125, 0.125],  # target 0 -> ln 2, masked
            [0.1, 0.2, 0.3, 0.4],  # unmasked
        ]
    )
    x0 = torch.tensor([[1, 0, 2]])
    masked = torch.tensor([[True, True, False]])
    weight = torch.tensor([[5.0, 3.0, 1.0]])
    valid = torch.tensor([[False, True, True]])
    out = nelbo(logits, x0, masked, weight, valid)
    assert out.num_tokens.item() == 2
    assert out.num_masked.item() == 1
    assert out.nll_sum.item() == pytest.approx(3.0 * math.log(2), rel=1e-6)
    assert out.loss.item() == pytest.approx(3.0 * math.log(2) / 2, rel=1e-6)


# -- e. bits per byte -------------------------------------------------------------------------------
def test_bits_per_byte_hand_computed():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 0.25) == pytest.approx(2.0 / math.log(2) * 0.25)
    assert bits_per_byte(2.0, 0.25) == pytest.approx(0.7213475204444817)
    assert bits_per_byte(3 * math.log(2), 0.5) == pytest.approx(1.5)


# -- f. MDLM end and bad block lengths ---------------------------------------------------------------
@pytest.mark.parametrize("logit_shift", [False, True])
def test_mdlm_block_length_equals_n(logit_shift):
    n = 32
    model = tiny_model(block_length=n, logit_shift=logit_shift, max_seq_len=n)
    x0 = random_tokens(4, n)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        out = block_diffusion_loss(model, x0, LogLinearSchedule(), (1e-3, 1.0), generator=g)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.num_masked.item() > 0


def test_loss_is_differentiable():
    model = tiny_model(block_length=4, max_seq_len=16).train()
    x0 = random_tokens(2, 16)
    out = block_diffusion_loss(model, x0, LogLinearSchedule(), (0.1, 1.0), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("block_length", [3, 5, 7])
def test_non_dividing_block_length_raises(block_length):
    n = 32
    with pytest.raises(ValueError, match="must divide max_seq_len"):  # the spec refuses it at once
        tiny_model(block_length=block_length, max_seq_len=n)
    model = tiny_model(block_length=4, max_seq_len=n)
    x0 = random_tokens(2, 4 * block_length + 1)  # a sequence length the model's block length does not divide
    with pytest.raises(ValueError):
        block_diffusion_loss(model, x0, LogLinearSchedule(), (0.1, 1.0))
    with pytest.raises(ValueError):
        model(x0, x0)
    with pytest.raises(ValueError):
        block_diffusion_loss(tiny_model(block_length=4, max_seq_len=n), random_tokens(2, n), LogLinearSchedule(),
                             (0.1, 1.0), block_length=block_length)


# -- g. the conditioning token under the logit shift ---------------------------------------------------
@pytest.mark.parametrize("logit_shift", [False, True])
def test_logit_shift_never_noises_position_0(logit_shift):
    """Under the logit shift position 0 is the conditioning token: it is never scored, so it is never masked in
    the noisy input x_t either (docs/design.md §5). At t = 1 every other position is masked; without the shift
    position 0 is predicted like any other token and is masked too."""
    n, l = 16, 4
    model = tiny_model(block_length=l, logit_shift=logit_shift, max_seq_len=n)
    x0 = random_tokens(3, n)
    seen = []
    forward = model.training_hidden
    model.training_hidden = lambda xt, *args, **kw: seen.append(xt.clone()) or forward(xt, *args, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        out = block_diffusion_loss(model, x0, LogLinearSchedule(), (1.0, 1.0), generator=g)
        plain = model(torch.cat([x0[:, :1], torch.full_like(x0[:, 1:], MASK_ID)], dim=1), x0)  # (b, n, v)
    xt = seen[0]  # the loss's x_t (the plain forward above is the second call)
    assert (xt[:, 1:] == MASK_ID).all()
    if logit_shift:
        assert torch.equal(xt[:, 0], x0[:, 0])
        expected = F.cross_entropy(plain[:, 1:].flatten(0, 1), x0[:, 1:].flatten(), reduction="mean")
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        assert out.num_masked.item() == 3 * (n - 1)
    else:
        assert (xt[:, 0] == MASK_ID).all()


# -- h. the NELBO split by position inside the block (blockdiff plot) -------------------------------------------
def check_position_split(model, x0):
    """The loss with ``reduction="position"`` (same seed as the plain one): same loss, parts adding up to it."""
    def loss(**kw):
        with torch.no_grad():
            return block_diffusion_loss(model, x0, LogLinearSchedule(), (0.2, 1.0),
                                        generator=torch.Generator().manual_seed(3), **kw)

    plain, split = loss(), loss(reduction="position")
    torch.testing.assert_close(split.loss, plain.loss)
    torch.testing.assert_close(split.per_position.sum() / split.position_tokens.sum(), plain.loss)
    return split


@pytest.mark.parametrize("logit_shift", [False, True])
def test_nelbo_by_position_splits_the_same_estimate(logit_shift):
    """``reduction="position"`` draws the same noise as the plain loss and splits its sum by in-block position: the
    parts add up to the loss, each position's count is the predicted tokens there, and a hand loop over the
    per-token terms gives each part."""
    n, l, b = 16, 4, 3
    model = tiny_model(block_length=l, logit_shift=logit_shift, max_seq_len=n)
    x0 = random_tokens(b, n)
    split = check_position_split(model, x0)
    expected_counts = [b * n // l - (b if logit_shift and j == 0 else 0) for j in range(l)]
    assert split.position_tokens.tolist() == expected_counts
    # by hand: per-token weighted NLL from a per-token reduction of the same logits
    logits = torch.randn(b, n, VOCAB)
    masked = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) < 0.5
    weight, valid = torch.rand(b, n) + 0.5, torch.ones(b, n, dtype=torch.bool)
    out = nelbo(logits, x0, masked, weight, valid, l, by_position=True)
    per_token = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(b, n) * weight * masked
    torch.testing.assert_close(out.per_position, per_token.view(b, n // l, l).sum((0, 1)))
