"""Tests for the certainty-forcing term (``blockdiff/core/certainty.py``) and its wiring (``certainty.*`` config keys,
``block_diffusion_loss(..., certainty=...)``, ``BlockDiffusionModule.training_step``).

* On toy logits the term is zero where the argmax is wrong and the (tempered) entropy where it is right; without the
  mask every row counts; its gradient never reaches a wrong row.
* The NELBO is untouched: ``block_diffusion_loss`` returns the same ``loss`` with and without the term, the training
  step's loss is the NELBO plus ``weight`` times the term (exactly the NELBO at weight 0), and validation's
  ``val/nll`` is the same whatever the certainty settings.
* Bad settings are refused naming the key.

Shape legend: ``m`` rows, ``v`` vocab.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens, tiny_model

from blockdiff.config import CertaintyConfig, ConfigError, NoiseConfig, OptimConfig, load_config
from blockdiff.core.certainty import certainty_entropies, certainty_term
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_the_term_is_zero_where_the_argmax_is_wrong_and_the_entropy_where_it_is_right():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.1, 0.6, 0.3, 0.0]])
    logits = probs.clamp_min(1e-30).log()
    logits[:, 3] = float("-inf")  # the mask column (SUBS) carries no mass
    targets = torch.tensor([0, 1, 2])  # row 0 right, row 1 a tie (argmax 0: wrong), row 2 wrong
    h, counted = certainty_entropies(logits, targets)
    assert counted.tolist() == [True, False, False]
    assert h[0].item() == pytest.approx(_entropy([0.7, 0.2, 0.1]), abs=1e-6) and h[1:].tolist() == [0.0, 0.0]
    assert certainty_term(logits, targets).item() == pytest.approx(_entropy([0.7, 0.2, 0.1]), abs=1e-6)
    h_all, counted_all = certainty_entropies(logits, targets, only_correct=False)
    assert counted_all.all() and h_all[1].item() == pytest.approx(math.log(2), abs=1e-6)
    assert certainty_term(logits, targets, only_correct=False).item() == pytest.approx(h_all.mean().item())
    sharp = [x**2 for x in (0.7, 0.2, 0.1)]  # temperature 0.5 squares the probabilities
    sharp = [x / sum(sharp) for x in sharp]
    assert certainty_entropies(logits, targets, 0.5)[0][0].item() == pytest.approx(_entropy(sharp), abs=1e-6)
    assert certainty_term(logits, torch.tensor([3, 3, 3])).item() == 0.0  # nothing right: 0, not nan


def test_the_terms_gradient_sharpens_right_rows_only():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.3, 1.0, 0.2]], requires_grad=True)
    term = certainty_term(logits, torch.tensor([0, 2]))  # row 0 right, row 1 wrong
    term.backward()
    assert logits.grad[1].abs().max().item() == 0.0
    assert logits.grad[0, 0].item() < 0  # descending the term raises the right token's logit


def _loss(model, batch, certainty=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return block_diffusion_loss(model, batch, make_schedule("loglinear"), (1e-3, 1.0), generator=g,
                                certainty=certainty)


@pytest.mark.parametrize("uniform", [False, True])
def test_the_nelbo_is_unchanged_and_the_term_uses_the_same_logits(uniform):
    from dataclasses import replace

    from blockdiff.modeling.model import BlockDiffusionLM

    model = tiny_model(4)
    if uniform:
        model = BlockDiffusionLM(model.backbone, replace(model.spec, noise_kind="uniform"))
    batch = random_tokens(4, 32)
    plain, forced = _loss(model, batch), _loss(model, batch, (0.7, True))
    assert plain.certainty is None and torch.equal(plain.loss, forced.loss)
    assert forced.certainty is not None and 0 <= forced.certainty.item() <= math.log(64)


def _module(weight=0.0, temperature=1.0, only_correct=True):
    from blockdiff.training.lightning_module import BlockDiffusionModule

    model = tiny_model(4)
    module = BlockDiffusionModule(model, NoiseConfig(), OptimConfig(), 10, 1.0,
                                  certainty=CertaintyConfig(weight, temperature, only_correct))
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value)
    module.log_dict = lambda values, **k: logged.update(values)
    return module, logged


def test_the_training_loss_adds_weight_times_the_term_and_weight_zero_is_the_nelbo():
    batch = random_tokens(4, 32)
    off, logged_off = _module(0.0)
    torch.manual_seed(3)
    plain = off.training_step(batch, 0)
    torch.manual_seed(3)
    reference = block_diffusion_loss(off.model, batch, off.schedule, off.train_range, off.noise.antithetic)
    assert torch.equal(plain, reference.loss) and "train/certainty" not in logged_off  # bit-identical when off
    on, logged = _module(0.5, 2.0)
    torch.manual_seed(3)
    loss = on.training_step(batch, 0)
    assert torch.equal(logged["train/nelbo"], plain.detach())
    assert torch.allclose(loss, plain + 0.5 * logged["train/certainty"])
    assert logged["train/certainty"].item() > 0 and loss.requires_grad


def test_validation_reports_the_nelbo_alone():
    batches = [random_tokens(4, 32, seed=s) for s in range(2)]
    results = []
    for weight in (0.0, 3.0):
        module, logged = _module(weight)
        module.on_validation_epoch_start()
        for i, b in enumerate(batches):
            module.validation_step(b, i)
        module.on_validation_epoch_end()
        results.append(logged["val/nll"])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("override, message", [
    ("certainty.weight=-1", "certainty.weight must be >= 0"),
    ("certainty.temperature=0", "certainty.temperature must be > 0"),
])
def test_bad_certainty_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])
    with pytest.raises(ConfigError, match="certainty.weight > 0 is not supported with model.block_length_mixture"):
        load_config([], ["certainty.weight=0.1", "model.block_length_mixture={4: 1.0}"])
    cfg = load_config([], ["certainty.weight=0.2", "certainty.temperature=0.5", "certainty.only_correct=false"])
    assert cfg.certainty == CertaintyConfig(0.2, 0.5, False)
