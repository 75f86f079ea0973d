"""The mask-floor curriculum (issue 23: toward fewer denoising steps per block): the lowest training noise level rises
from noise.beta to curriculum.mask_floor_end; validation keeps the full range; off, training is unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from blockdiff.config import ConfigError, CurriculumConfig, NoiseConfig, OptimConfig, load_config
from blockdiff.core.curriculum import mask_floor_at
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.training import lightning_module
from blockdiff.training.lightning_module import BlockDiffusionModule


def test_the_floor_rises_linearly_over_its_fraction_then_stays():
    assert mask_floor_at(0, 100, 0.0, 0.6, 0.5) == 0.0
    assert mask_floor_at(25, 100, 0.0, 0.6, 0.5) == pytest.approx(0.3)
    assert mask_floor_at(50, 100, 0.0, 0.6, 0.5) == pytest.approx(0.6)
    assert mask_floor_at(99, 100, 0.0, 0.6, 0.5) == pytest.approx(0.6)
    assert mask_floor_at(80, 100, 0.2, 0.6, 0.0) == 0.2  # off


def _module(curriculum: CurriculumConfig, noise: NoiseConfig | None = None) -> BlockDiffusionModule:
    module = BlockDiffusionModule(tiny_model(4), noise or NoiseConfig(), OptimConfig(), 100, 1.0,
                                  curriculum=curriculum)
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    return module


def test_the_training_step_samples_noise_above_the_floor(monkeypatch):
    seen = []
    real = lightning_module.block_diffusion_loss

    def spy(model, batch, schedule, train_range, *args, **kwargs):
        seen.append(train_range)
        return real(model, batch, schedule, train_range, *args, **kwargs)

    monkeypatch.setattr(lightning_module, "block_diffusion_loss", spy)
    module = _module(CurriculumConfig(mask_floor_fraction=0.5, mask_floor_end=0.6))
    batch = random_tokens(2, 32)
    for step in (0, 25, 90):
        monkeypatch.setattr(BlockDiffusionModule, "global_step", property(lambda self, s=step: s))
        module.training_step(batch, 0)
    lo, hi = module.train_range
    assert seen[0] == (lo, hi)  # step 0: the configured range
    assert seen[1] == (pytest.approx(0.3), hi) and seen[2] == (pytest.approx(0.6), hi)


def test_off_the_training_step_is_bit_identical():
    batch = random_tokens(4, 32)
    module = _module(CurriculumConfig())
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    torch.manual_seed(3)
    reference = block_diffusion_loss(module.model, batch, module.schedule, module.train_range, module.noise.antithetic)
    assert torch.equal(loss, reference.loss)


def test_a_floor_outside_the_noise_range_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="curriculum.mask_floor_end"):
        load_config(overrides=["curriculum.mask_floor_fraction=0.5", "curriculum.mask_floor_end=0.9",
                               "noise.omega=0.8"])
    with pytest.raises(ConfigError, match="curriculum.mask_floor_fraction"):
        load_config(overrides=["curriculum.mask_floor_fraction=1.5"])
    load_config(overrides=["curriculum.mask_floor_fraction=0.5", "curriculum.mask_floor_end=0.5"])  # valid
