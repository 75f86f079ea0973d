"""The data-driven clip search: the (beta, omega) window whose per-block NELBO varies least.

The choice itself is a pure function of per-window samples, so it is checked on synthetic losses whose
variance per window the test constructs; ``block_nelbo_samples`` is checked against the loss it mirrors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from blockdiff.config import ConfigError, load_config
from blockdiff.core.clip_search import block_nelbo_samples, select_clip_window
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule


def test_search_picks_the_constructed_minimum_variance_window():
    g = torch.Generator().manual_seed(0)
    windows = [(b, o) for b in (0.0, 0.2, 0.4) for o in (0.6, 0.8, 1.0)]
    # per-window std: a bowl with its minimum at (0.2, 0.8); means differ so the mean cannot decide
    std = {w: 0.5 + 4 * (w[0] - 0.2) ** 2 + 3 * (w[1] - 0.8) ** 2 for w in windows}
    samples = {}
    for i, w in enumerate(windows):
        z = torch.randn(4000, generator=g, dtype=torch.float64)
        z = (z - z.mean()) / z.std()  # exactly unit sample variance
        samples[w] = 3.0 - i * 0.1 + std[w] * z
    choice = select_clip_window(samples)
    assert (choice.beta, choice.omega) == (0.2, 0.8)
    assert choice.variance == pytest.approx(0.25)
    for w in windows:
        assert choice.variances[w] == pytest.approx(std[w] ** 2)


def test_search_rejects_empty_or_degenerate_input():
    with pytest.raises(ValueError, match="at least one"):
        select_clip_window({})
    with pytest.raises(ValueError, match="at least 2"):
        select_clip_window({(0.0, 1.0): torch.tensor([1.0])})


def test_block_samples_average_to_the_loss():
    """Per-block estimates (nats per token of their block) average to the batch NELBO of the same noise."""
    model = tiny_model(block_length=4, max_seq_len=32)
    x0 = random_tokens(3, 32)
    schedule = make_schedule("loglinear")
    samples = block_nelbo_samples(model, x0, schedule, (0.3, 0.8), 1e-3, torch.Generator().manual_seed(5))
    assert samples.shape == (3, 8)
    with torch.no_grad():
        loss = block_diffusion_loss(model, x0, schedule, (0.3, 0.8), True, torch.Generator().manual_seed(5))
    torch.testing.assert_close(samples.mean(), loss.loss, rtol=1e-5, atol=1e-5)


def test_clip_grid_config_errors():
    with pytest.raises(ConfigError, match="noise.clip_betas"):
        load_config([], ["noise.clip_search=log", "noise.clip_betas=[0.9]", "noise.clip_omegas=[0.5]"])
    with pytest.raises(ConfigError, match="noise.clip_search"):
        load_config([], ["noise.clip_search=sometimes"])


def _module(**noise):
    from blockdiff.config import NoiseConfig, OptimConfig
    from blockdiff.training.lightning_module import BlockDiffusionModule

    module = BlockDiffusionModule(
        tiny_model(block_length=4, max_seq_len=32), NoiseConfig(**noise), OptimConfig(), 10, 1.0
    )
    logged = {}
    module.log = lambda key, value, **kw: logged.__setitem__(key, value)
    module.log_dict = lambda d, **kw: logged.update(d)
    return module, logged


@pytest.mark.parametrize("mode", ["log", "apply"])
def test_validation_logs_the_min_variance_window_and_applies_it(mode):
    module, logged = _module(clip_search=mode, clip_betas=[0.0, 0.3], clip_omegas=[0.6, 1.0], clip_search_batches=1)
    module.on_validation_epoch_start()
    for i in range(2):
        module.validation_step(random_tokens(4, 32, seed=i), i)
    module.on_validation_epoch_end()
    assert {"val/nll", "val/clip_beta", "val/clip_omega", "val/clip_var"} <= set(logged)
    window = (logged["val/clip_beta"], logged["val/clip_omega"])
    assert window in [(0.0, 0.6), (0.0, 1.0), (0.3, 0.6), (0.3, 1.0)]
    expected = (max(window[0], 1e-3), window[1]) if mode == "apply" else (1e-3, 1.0)
    assert module.train_range == expected
    if mode == "apply":
        assert window != (0.0, 1.0), "this test means nothing if the chosen window is the default one"


def test_validation_without_clip_search_logs_no_window():
    module, logged = _module()
    module.on_validation_epoch_start()
    module.validation_step(random_tokens(4, 32), 0)
    module.on_validation_epoch_end()
    assert "val/nll" in logged and "val/clip_beta" not in logged
