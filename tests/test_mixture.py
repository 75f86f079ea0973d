"""Block-length mixtures: each training sequence draws its own block length L'.

* all mass on one L' gives exactly that fixed L''s loss (also with a zero-weight entry in the mixture);
* a sequence gets the attention mask of the L' it drew: every cell of the mask its forward used equals the
  fixed-L' training mask, and the draw follows the mixture's weights;
* bad mixtures (weights not summing to 1, lengths not dividing data.max_seq_len) are config errors;
* ``evaluate_nelbo(block_length=...)`` evaluates one network at another block length.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from blockdiff.config import ConfigError, load_config
from blockdiff.core.loss import block_diffusion_loss, draw_block_lengths, mixture_loss
from blockdiff.core.masks import training_mask
from blockdiff.core.noise import make_schedule
from blockdiff.evaluation.nelbo import evaluate_nelbo

N = 32


def test_mixture_with_all_mass_on_one_length_equals_fixed_loss():
    model = tiny_model(block_length=4, max_seq_len=N)
    x0 = random_tokens(6, N)
    schedule = make_schedule("loglinear")
    mixture = {8: 1.0, 2: 0.0}
    g = torch.Generator().manual_seed(3)
    mixed = mixture_loss(model, x0, schedule, (0.001, 1.0), mixture, generator=g)
    g = torch.Generator().manual_seed(3)
    draw_block_lengths(mixture, 6, g)  # the same draw, so the noise that follows is identical
    fixed = block_diffusion_loss(model, x0, schedule, (0.001, 1.0), generator=g, block_length=8)
    assert mixed.block_lengths.tolist() == [8] * 6
    torch.testing.assert_close(mixed.loss, fixed.loss, rtol=1e-6, atol=1e-6)
    assert int(mixed.num_tokens) == int(fixed.num_tokens) == 6 * N
    # and it differs from the model's own block length (the override is really used)
    g = torch.Generator().manual_seed(3)
    draw_block_lengths(mixture, 6, g)
    own = block_diffusion_loss(model, x0, schedule, (0.001, 1.0), generator=g)
    assert not torch.allclose(own.loss, fixed.loss)


def test_each_sequence_gets_the_mask_of_the_block_length_it_drew():
    model = tiny_model(block_length=4, max_seq_len=N)
    x0 = random_tokens(12, N)
    seen = []  # (rows' first tokens, mask) for every forward
    inner = model.hidden_states

    def spy(input_ids, position_ids, attention_mask, *args, **kwargs):
        seen.append((input_ids[:, N:], attention_mask))  # clean half starts at N
        return inner(input_ids, position_ids, attention_mask, *args, **kwargs)

    model.hidden_states = spy
    out = mixture_loss(model, x0, make_schedule("loglinear"), (0.001, 1.0), {1: 0.3, 4: 0.3, 16: 0.4},
                       generator=torch.Generator().manual_seed(0))
    drawn = out.block_lengths
    assert set(drawn.tolist()) == {1, 4, 16}, "seed 0 should draw every length for this test to mean something"
    assert len(seen) == 3  # one forward per distinct drawn length
    for clean, mask in seen:
        rows = [next(i for i in range(len(x0)) if torch.equal(x0[i, : clean.shape[1]], c)) for c in clean]
        lengths = {int(drawn[r]) for r in rows}
        assert len(lengths) == 1, "rows of one forward drew different block lengths"
        l = lengths.pop()
        expected = training_mask(N, l)[: 2 * N - l, : 2 * N - l]  # (2n-l, 2n-l)
        assert mask.shape[-2:] == expected.shape, f"L'={l}: the mask has the wrong size"
        assert torch.equal(mask[0, 0].bool(), expected), f"L'={l}: attention cells differ from the fixed mask"
    # cell-level spot checks for L'=4 vs 16: noisy query 5 may see noisy key 7 at L'=4 (same block 1),
    # noisy key 12 only at L'=16 (same block 0); clean key 2 (x_0 half) only at L'=4 (an earlier block).
    m4, m16 = training_mask(N, 4), training_mask(N, 16)
    assert m4[5, 7] and not m4[5, 12] and m4[5, N + 2]
    assert m16[5, 12] and not m16[5, N + 2]


def test_draw_follows_the_mixture_weights():
    drawn = draw_block_lengths({1: 0.1, 4: 0.3, 16: 0.6}, 20000, torch.Generator().manual_seed(0))
    freq = {l: (drawn == l).float().mean().item() for l in (1, 4, 16)}
    assert abs(freq[1] - 0.1) < 0.02 and abs(freq[4] - 0.3) < 0.02 and abs(freq[16] - 0.6) < 0.02


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.block_length_mixture={1: 0.5, 4: 0.4}", "sum to 1"),
        ("model.block_length_mixture={3: 0.5, 4: 0.5}", "must divide data.max_seq_len"),
        ("model.block_length_mixture={0: 1.0}", ">= 1"),
    ],
)
def test_bad_mixture_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match="model.block_length_mixture") as err:
        load_config([], [override])
    assert message in str(err.value)


def test_evaluate_at_another_block_length():
    model = tiny_model(block_length=4, max_seq_len=N)
    batches = [random_tokens(4, N, seed=s) for s in range(2)]
    schedule = make_schedule("loglinear")
    own = evaluate_nelbo(model, batches, schedule, (0.001, 1.0), 1.0, seed=0)
    at16 = evaluate_nelbo(model, batches, schedule, (0.001, 1.0), 1.0, seed=0, block_length=16)
    assert own.block_length == 4 and at16.block_length == 16
    assert at16.nll != own.nll


def test_training_step_uses_the_mixture():
    from blockdiff.config import NoiseConfig, OptimConfig
    from blockdiff.training.lightning_module import BlockDiffusionModule

    model = tiny_model(block_length=4, max_seq_len=N)
    module = BlockDiffusionModule(model, NoiseConfig(), OptimConfig(), 10, 1.0, block_length_mixture={2: 0.5, 16: 0.5})
    module.log = module.log_dict = lambda *a, **k: None
    used = []
    inner = model.training_hidden
    model.training_hidden = lambda xt, x0, l=None, *a, **k: used.append(l) or inner(xt, x0, l, *a, **k)
    torch.manual_seed(1)
    loss = module.training_step(random_tokens(16, N), 0)
    assert loss.requires_grad and torch.isfinite(loss)
    assert sorted(used) == [2, 16]


def test_with_block_length_shares_weights_and_generates_at_that_length():
    model = tiny_model(block_length=4, max_seq_len=N)
    at16 = model.with_block_length(16)
    assert at16.block_length == 16 and model.block_length == 4 and model.with_block_length(4) is model
    assert at16.backbone is model.backbone
    one_step = dict(max_new_tokens=16, eos_token_id=None, sampler="fixed", steps_per_block=1)
    prompt = [list(range(1, 17))]  # 16 tokens: new blocks start at position 16 for both lengths
    assert model.generate(prompt, **one_step).nfe == 4  # four blocks of 4, one forward each
    assert at16.generate(prompt, **one_step).nfe == 1  # one block of 16
    with pytest.raises(ValueError, match="divide"):
        model.with_block_length(5)
