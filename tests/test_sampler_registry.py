"""Tests for the sampler registry (``blockdiff/sampling/samplers/registry.py``): adding a sampler is one class and one
registry call.

* A throwaway sampler (``Leftmost`` below: one small dataclass) registered with ``registered(...)`` is reachable
  from ``model.generate(..., sampler=..., width=...)``, from the ``blockdiff sample`` flags (argparse and
  ``--help``), from a sweep's ``sample.grid`` keys and from the run config's ``sample.sampler`` check; after the
  ``with`` block it is gone from all of them.
* The built-in samplers are registered in their historical order with their knobs; the generation config's
  fields are the registry's settings.
* The sampler is built once per ``generate`` call, not once per block.
* ``blockdiff/config/`` imports nothing of sampling, and a bad ``sample.sampler`` is still refused as soon as
  ``blockdiff.config`` is imported (``import blockdiff`` installs a lookup that imports the registry when asked).
* Registration refuses a duplicate name, a knob that shadows a generation setting, and a shared knob with
  another default.

Shape legend: ``b`` batch, ``l`` block length.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model

from blockdiff.cli import main
from blockdiff.cli.app import build_parser
from blockdiff.config import ConfigError, load_config
from blockdiff.errors import UsageError
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.samplers.base import BlockState, Sampler, StepResult, knob, reveal
from blockdiff.sampling.samplers.registry import knobs, register_sampler, registered, sampler_names, settings
from blockdiff.sweeps.spec import SAMPLE_KEYS, load_sweep

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("threshold", "first_hitting", "fixed", "ddpm", "remask", "entropy_bound", "edit", "renoise")
built = []  # one entry per Leftmost constructed (to count sampler constructions)


@dataclass
class Leftmost(Sampler):
    """Reveal the ``width`` leftmost masked positions per step (a throwaway sampler for these tests)."""

    name = "leftmost_for_test"

    width: int = knob(1, "masked positions revealed per step, leftmost first")

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise UsageError(f"width must be an integer >= 1, got {self.width!r}")
        built.append(self.width)

    def step(self, tokens, confidence, state: BlockState, generator, probs=None) -> StepResult:
        rank = state.masked.long().cumsum(-1)  # (b, l): 1 for the leftmost masked position, 2 for the next, ...
        return reveal(state, tokens, confidence, state.masked & (rank <= self.width))


@pytest.fixture
def leftmost():
    built.clear()
    with registered(Leftmost):
        yield Leftmost


def _events(model, **settings):
    events = []
    out = model.generate([[1, 2, 3]], eos_token_id=None, seed=0, observer=events.append, **settings)
    return out, [e for e in events if not e.finished]


def test_a_registered_sampler_is_reachable_from_generate_with_its_knob(leftmost):
    model = tiny_model(block_length=4)
    out, steps = _events(model, max_new_tokens=9, sampler="leftmost_for_test", width=2)
    assert out.lengths.tolist() == [9]
    mask_id = model.mask_token_id
    for event in steps:
        assert 1 <= len(event.revealed[0]) <= 2  # width=2 per step
        row = event.tokens[0]  # the leftmost masks go first, so the masks left are a suffix of the block
        assert all(t == mask_id for t in row[row.index(mask_id):]) if mask_id in row else True
    assert any(len(e.revealed[0]) == 2 for e in steps)
    with pytest.raises(UsageError, match="width must be an integer >= 1"):  # its own check, through generate
        model.generate([[1, 2, 3]], max_new_tokens=4, sampler="leftmost_for_test", width=0)


def test_a_model_made_before_the_registration_still_takes_the_new_knob():
    model = tiny_model(block_length=4)  # its generation config predates the sampler
    with registered(Leftmost):
        assert model.generation_config.width == 1  # the knob's default
        out, _ = _events(model, max_new_tokens=4, sampler="leftmost_for_test", width=3)
        assert out.lengths.tolist() == [4]


def test_the_sampler_is_built_once_per_generate_call_not_per_block(leftmost):
    model = tiny_model(block_length=4)
    counts = []
    for new_tokens in (4, 16):  # 2 blocks, then 5 blocks
        built.clear()
        _events(model, max_new_tokens=new_tokens, sampler="leftmost_for_test")
        counts.append(len(built))
    assert counts[0] == counts[1]


def test_a_registered_sampler_is_in_the_sample_cli_flags_and_its_help(leftmost, capsys):
    args = build_parser().parse_args(["sample", "run", "--sampler", "leftmost_for_test", "--width", "3"])
    assert args.sampler == "leftmost_for_test" and args.width == 3
    with pytest.raises(SystemExit) as info:
        main(["sample", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--width" in help_text and "leftmost_for_test sampler: masked positions revealed per step" in help_text


def test_a_registered_sampler_is_a_sweep_sample_key(leftmost, tmp_path):
    assert "width" in SAMPLE_KEYS and "width" in list(SAMPLE_KEYS)
    path = _sweep_file(tmp_path, {"sampler": ["leftmost_for_test"], "width": [1, 2]})
    assert load_sweep(path).sample_settings == [{"sampler": "leftmost_for_test", "width": w} for w in (1, 2)]


def test_a_registered_sampler_is_a_valid_sample_sampler_in_the_run_config(leftmost):
    assert load_config([], ["sample.sampler=leftmost_for_test"]).sample.sampler == "leftmost_for_test"


def test_after_the_with_block_the_sampler_is_gone_everywhere(tmp_path, capsys):
    with registered(Leftmost):
        pass
    assert "leftmost_for_test" not in sampler_names() and "width" not in knobs() and "width" not in SAMPLE_KEYS
    assert "width" not in settings() and not hasattr(BlockDiffusionGenerationConfig(), "width")
    with pytest.raises(UsageError, match="sampler must be one of"):
        tiny_model(block_length=4).generate([[1, 2]], max_new_tokens=4, sampler="leftmost_for_test")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--width" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="width"):
        load_sweep(_sweep_file(tmp_path, {"width": [1]}))
    with pytest.raises(ConfigError, match="sample.sampler must be one of"):
        load_config([], ["sample.sampler=leftmost_for_test"])


def _sweep_file(tmp_path: Path, sample_grid: dict) -> Path:
    spec = {"name": "t", "out_dir": str(tmp_path / "out"), "grid": {"model.block_length": [4]},
            "overrides": {"data.tokenizer": "bytes"}, "sample": {"grid": sample_grid}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- the built-in samplers -----------------------------------------------------------------------------------

def test_the_built_in_samplers_and_their_knobs():
    assert sampler_names() == BUILT_IN
    assert {name: (k.default, k.sampler) for name, k in knobs().items()} == {
        "tau": (0.9, "threshold"), "tokens_per_step": (None, "fixed"), "remask_threshold": (0.3, "remask"),
        "max_remask": (1, "remask"), "entropy_bound": (0.5, "entropy_bound"), "t_max": (None, "entropy_bound"),
        "t_min": (None, "entropy_bound"), "editing_threshold": (0.5, "edit"), "max_post_steps": (16, "edit"),
        "stop_stable_steps": (None, "adaptive_stop"), "stop_entropy": (0.005, "adaptive_stop"),
    }
    config = BlockDiffusionGenerationConfig()
    assert {key: getattr(config, key) for key in settings()} == settings()
    assert list(settings())[:2] == ["sampler", "steps_per_block"]


def test_a_bad_run_config_sampler_is_refused_with_the_names_and_config_is_a_leaf():
    imported = []
    for path in (ROOT / "blockdiff" / "config").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("blockdiff.sampling")], imported
    code = (
        "from blockdiff.config import ConfigError, load_config\n"
        "try:\n    load_config([], ['sample.sampler=nope'])\n"
        "except ConfigError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == f"sample.sampler must be one of {', '.join(BUILT_IN)}; got 'nope'"


def test_registration_refuses_clashes():
    with pytest.raises(ValueError, match="already registered"):
        register_sampler(type("Again", (Leftmost,), {"name": "threshold"}))

    @dataclass
    class Shadow(Sampler):
        name = "shadow_for_test"
        temperature: float = knob(1.0, "would shadow the softmax temperature")

    @dataclass
    class OtherTau(Sampler):
        name = "other_tau_for_test"
        tau: float = knob(0.5, "the threshold sampler's knob with another default")

    @dataclass
    class SameTau(Sampler):
        name = "same_tau_for_test"
        tau: float = knob(0.9, "shared with the threshold sampler")

    with pytest.raises(ValueError, match="shadow"):
        register_sampler(Shadow)
    with pytest.raises(ValueError, match="same default"):
        register_sampler(OtherTau)
    with registered(SameTau):
        assert knobs()["tau"].sampler == "threshold"
    assert sampler_names() == BUILT_IN


def test_built_in_samplers_are_one_per_generate_call_too(monkeypatch):
    """DDPM follows the trained schedule (tests/test_samplers.py); here: the block loop makes no sampler per block."""
    from blockdiff.sampling import resolve  # where the block loop's settings, its sampler included, are made

    made = []
    original = resolve.make_sampler
    monkeypatch.setattr(resolve, "make_sampler", lambda config, schedule=None: made.append(config.sampler)
                        or original(config, schedule))
    tiny_model(block_length=4).generate([[1, 2, 3]], max_new_tokens=16, sampler="fixed", eos_token_id=None, seed=0)
    assert made == ["fixed"]  # 5 blocks, one sampler


def test_the_block_loop_leaves_the_backbone_to_the_model():
    assert "backbone" not in (ROOT / "blockdiff" / "sampling" / "generation.py").read_text()
    columns = torch.arange(8)
    mask = tiny_model(4).sampling_mask(columns, columns, torch.zeros(1, dtype=torch.long))  # (1, 1, 8, 8), sdpa: bool
    assert torch.equal(mask[0, 0], columns[None, :] // 4 <= columns[:, None] // 4)  # block-causal, no padding
