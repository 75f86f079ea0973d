"""One ``resolve(model, config, prompts)`` (blockdiff/sampling/resolve.py, docs/design.md §9): the window rule and
the temperature rule written once, used by the block loop, speculative decoding, the server and the CLI, which
passes its flags as overrides and never writes into the model's own generation config."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from blockdiff.errors import UsageError
from blockdiff.sampling.inputs import with_overrides
from blockdiff.sampling.resolve import Settings, resolve, temperature_of, window_of


def test_the_window_rule():
    model = tiny_model(block_length=4, max_seq_len=32)
    assert window_of(model) == 32  # the training context in whole blocks
    assert window_of(model, 12) == 12
    assert window_of(model, 4) == 8  # at least two blocks
    config = with_overrides(model.generation_config, {"window": 16})
    assert resolve(model, config).window == 16 and resolve(model, model.generation_config).window == 32
    model.spec.max_seq_len = None
    assert window_of(model) is None  # no limit known
    assert window_of(model, context=30) == 28  # lm-eval's max_length fills in, in whole blocks
    assert window_of(model, context=4) == 8


@pytest.mark.parametrize("overrides,expected", [
    ({"temperature": 0.7}, 0.7), ({"temperature": 0.7, "do_sample": False}, 0.0), ({"temperature": 0.0}, 0.0),
    ({"temperature": None}, 0.0),
])
def test_the_temperature_rule(overrides, expected):
    model = tiny_model()
    config = with_overrides(model.generation_config, overrides)
    assert temperature_of(config) == expected
    if config.temperature is not None:
        assert resolve(model, config).temperature == expected


def test_resolve_checks_everything_before_any_work_and_changes_nothing():
    model = tiny_model()
    config = with_overrides(model.generation_config, {"num_return_sequences": 2, "eos_token_id": [5, 6],
                                                      "pad_token_id": 3, "stop_strings": "x"})
    before = config.to_diff_dict()
    settings = resolve(model, config, [[1, 2], [3]])
    assert isinstance(settings, Settings) and config.to_diff_dict() == before
    assert settings.prompts == [[1, 2], [1, 2], [3], [3]] and settings.copies == 2
    assert settings.eos_ids == {5, 6} and settings.pad_id == 3 and settings.stops == ("x",)
    assert settings.sampler.name == config.sampler and settings.max_new_tokens == config.max_new_tokens
    with pytest.raises(UsageError, match="at least one prompt"):
        resolve(model, model.generation_config, [])  # an empty list is checked (None: the settings only)
    with pytest.raises(UsageError, match="does not fit the window"):
        resolve(model, model.generation_config, [[1] * 40])
    with pytest.raises(UsageError, match="temperature"):
        resolve(model, with_overrides(model.generation_config, {"temperature": -1.0}))
    with pytest.raises(UsageError, match="not supported by speculative decoding"):
        resolve(model, config, speculative=True)


def test_blockdiff_sample_passes_overrides_and_never_writes_into_the_models_config():
    from blockdiff.cli.app import build_parser
    from blockdiff.cli.sample import _settings

    model = tiny_model()
    saved = model.generation_config.to_diff_dict()
    args = build_parser().parse_args(["sample", "x", "--tau", "0.5", "--temperature", "0", "--max-new-tokens", "5"])
    config = _settings(args, model)
    assert (config.tau, config.temperature, config.max_new_tokens) == (0.5, 0.0, 5)
    assert model.generation_config.to_diff_dict() == saved  # the model's own settings are untouched


def test_generate_and_speculative_decoding_read_the_same_settings():
    """The same config object drives both loops: greedy speculative decoding with a block diffuser on a copy of the
    verifier returns the verifier's greedy text whatever the block loop's sampler settings say."""
    from test_speculative import ar_model, copy_drafter, hf_greedy

    from blockdiff.sampling.speculative import speculative_generate

    verifier = ar_model()
    drafter = copy_drafter(verifier)
    config = with_overrides(drafter.generation_config, {"temperature": 0.9, "do_sample": False, "max_new_tokens": 7})
    out = speculative_generate(verifier, drafter, [3, 9, 27], generation_config=config)
    assert out.sequences[0].tolist() == hf_greedy(verifier, [3, 9, 27], 7)  # do_sample=False: greedy, as generate
    assert int(drafter.generate([[3, 9, 27]], generation_config=config).lengths[0]) == 7
    torch.testing.assert_close(torch.tensor(config.temperature), torch.tensor(0.9))  # config unchanged
