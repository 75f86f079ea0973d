"""Config loading and validation: every shipped YAML loads, the demo file is the defaults, bad input is named.

What is checked here:

* every ``configs/*.yaml`` and ``configs/model/*.yaml`` loads and validates on its own, and every model
  file also merges on top of ``configs/demo.yaml`` (the combination the README recommends);
* ``configs/demo.yaml`` is exactly ``Config()`` written out, every key included;
* the files say what their comments claim (AR = block length 1, MDLM = one block per context);
* invalid configs raise ``ConfigError`` whose message names the CLI key(s) the user has to change;
* files merge in order and ``key=value`` overrides apply in order after them.

No training and no data here: ``load_config`` only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blockdiff.config import Config, ConfigError, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
TOP_LEVEL = sorted(CONFIGS.glob("*.yaml"))
MODEL_FILES = sorted((CONFIGS / "model").glob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_the_config_globs_find_files():
    # Guards the parametrisations below against silently running on nothing.
    assert DEMO in TOP_LEVEL
    assert len(TOP_LEVEL) >= 2 and len(MODEL_FILES) >= 1


@pytest.mark.parametrize("path", TOP_LEVEL + MODEL_FILES, ids=_id)
def test_every_shipped_config_loads_and_validates(path: Path):
    cfg = load_config([path])
    assert isinstance(cfg, Config)
    # Every key the file sets is reflected in the validated config.
    raw = OmegaConf.to_container(OmegaConf.load(path))
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    for section, values in raw.items():
        for key, value in values.items():
            got = resolved[section][key]
            got = list(got) if isinstance(got, tuple) else got  # optim.betas is a tuple, YAML has a list
            assert got == value, f"{_id(path)}: {section}.{key}={got!r}, file says {value!r}"


@pytest.mark.parametrize("path", MODEL_FILES, ids=_id)
def test_model_files_merge_on_top_of_demo(path: Path):
    cfg = load_config([DEMO, path])
    model = OmegaConf.to_container(OmegaConf.load(path))["model"]
    for key, value in model.items():
        got = getattr(cfg.model, key)
        assert getattr(got, "value", got) == value, f"model.{key}"
    # Everything the model file does not set keeps the demo value.
    demo = load_config([DEMO])
    assert cfg.data == demo.data and cfg.trainer == demo.trainer and cfg.noise == demo.noise


def test_demo_yaml_is_exactly_the_dataclass_defaults():
    assert to_yaml(load_config([DEMO])) == to_yaml(Config())
    # ... and it writes every key out (a file that only relied on defaults would also load equal).
    written = OmegaConf.to_container(OmegaConf.load(DEMO))
    defaults = OmegaConf.to_container(OmegaConf.structured(Config()), enum_to_str=True)
    assert {s: sorted(v) for s, v in written.items()} == {s: sorted(v) for s, v in defaults.items()}


def test_ar_and_mdlm_configs_are_the_two_ends_of_the_interpolation():
    ar = load_config([CONFIGS / "ar_shakespeare.yaml"])
    mdlm = load_config([CONFIGS / "mdlm_shakespeare.yaml"])
    assert ar.model.block_length == 1
    assert mdlm.model.block_length == mdlm.data.max_seq_len


@pytest.mark.parametrize(
    "overrides, must_name",
    [
        (["model.block_length=5"], ["model.block_length", "data.max_seq_len"]),
        (["model.foo=1"], ["model.foo"]),
        (["data.max_seq_len=abc"], ["data.max_seq_len"]),
        (["noise.beta=0.8", "noise.omega=0.2"], ["noise.beta", "noise.omega"]),
        (["model.num_heads=5"], ["model.num_heads", "model.hidden_size"]),
        (["model.block_length"], ["model.block_length", "key=value"]),
        (["model.family=bert"], ["model.family"]),
        (["data.val_fraction=1.5"], ["data.val_fraction"]),
        (["optim.betas=[0.9]"], ["optim.betas"]),
    ],
    ids=["block-length-divides", "unknown-key", "wrong-type", "beta>omega", "heads-divide-hidden", "no-equals",
         "bad-enum", "range", "tuple-length"],
)
def test_invalid_overrides_raise_config_error_naming_the_key(overrides, must_name):
    assert_refused(overrides, must_name)


def assert_refused(overrides: list[str], must_say: list[str]) -> None:
    """``load_config`` refuses ``overrides`` with a ``ConfigError`` whose message holds every text of ``must_say``."""
    with pytest.raises(ConfigError) as info:
        load_config([], overrides)
    for text in must_say:
        assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"


def test_missing_yaml_file_is_a_config_error_naming_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config([missing])


@pytest.mark.parametrize(
    "text",
    ["model:\n  hidden_size: [1\n", "- just\n- a list\n"],
    ids=["malformed-yaml", "not-a-mapping"],
)
def test_unreadable_yaml_file_is_a_config_error_naming_the_file(tmp_path, text):
    # The CLI turns ConfigError into "error: ..." and exit status 2; anything else is a traceback.
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config([path])


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  blocklength: 8\n")
    with pytest.raises(ConfigError, match=r"model\.blocklength"):
        load_config([path])


def test_files_merge_in_order_then_overrides_apply_in_order(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("model:\n  block_length: 8\n  hidden_size: 64\ndata:\n  max_seq_len: 64\n")
    second.write_text("model:\n  block_length: 16\n")
    assert load_config([first, second]).model.block_length == 16
    assert load_config([second, first]).model.block_length == 8
    cfg = load_config([first, second], ["model.block_length=2", "model.block_length=32"])
    assert cfg.model.block_length == 32  # the last override wins, over both files
    assert cfg.model.hidden_size == 64 and cfg.data.max_seq_len == 64  # untouched keys keep the file values


def test_validation_sees_the_fully_merged_config(tmp_path):
    # block_length=256 does not divide the default max_seq_len=128; the later override makes it valid.
    path = tmp_path / "long_blocks.yaml"
    path.write_text("model:\n  block_length: 256\n")
    with pytest.raises(ConfigError):
        load_config([path])
    assert load_config([path], ["data.max_seq_len=256"]).model.block_length == 256


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config([], ["model.block_length=8", "data.source=some/dir", "trainer.max_minutes=null"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config([path]) == cfg


@pytest.mark.parametrize(
    "overrides, must_say",
    [
        (["trainer.accelerator=tpu"], ["trainer.accelerator", "torch_xla"]),
        (["optim.lr=1e308"], ["optim.lr", "at most"]),
        (["model.hidden_size=1152921504606846976", "model.num_heads=2"], ["model.hidden_size", "too large"]),
        (["model.intermediate_size=0"], ["model.intermediate_size", ">= 1"]),
        (["model.intermediate_size=-3"], ["model.intermediate_size", ">= 1"]),
        (["data.max_seq_len=4294967296"], ["data.max_seq_len", "too large"]),
        (["model.hidden_size=65536", "model.num_layers=1024"], ["parameters", "make it smaller"]),
        (["optim.lr=0.5", "optim.weight_decay=2"], ["optim.lr * optim.weight_decay"]),
    ],
    ids=["tpu-without-torch-xla", "lr-1e308", "hidden-2**60", "intermediate-0", "intermediate-negative",
         "seq-len-2**32", "too-many-parameters", "decay-flips-weights"],
)
def test_validation_refuses_what_train_would_crash_on(overrides, must_say):
    # issue 20 item 10/11: each of these passed `config validate` and then crashed `train` with a traceback.
    if overrides == ["trainer.accelerator=tpu"]:
        pytest.importorskip("lightning")
        import importlib.util

        if importlib.util.find_spec("torch_xla") is not None:
            pytest.skip("torch_xla is installed here")
    assert_refused(overrides, must_say)


def test_a_yaml_error_names_the_problem_and_its_line(tmp_path):
    # issue 20 item 12: only the parser's first line ("while constructing a mapping") was kept.
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  hidden_size: 32\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    message = str(info.value)
    assert "duplicate key hidden_size" in message and "line 3, column 3" in message and "\n" not in message
