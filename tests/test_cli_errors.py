"""What a new user (or an attacker) sees when the input is wrong: issue 15, items 11-13.

* user text is never read as rich markup: paths, run names and sweep directories holding ``[/x]`` or
  ``[bold red]x[/]`` are printed literally through several verbs, help text such as ``U[beta, omega]``
  survives ``config keys``; every error is one ``error:`` line on stderr and nothing on stdout;
* messages that used to mislead: enum keys list their choices, a list where a mapping belongs names the key
  (and the file), ``-c /dev/null`` / ``-c DIR`` say what the path is, a 1-byte / zero-filled / empty
  checkpoint is "truncated or not a checkpoint" (never "pickled objects", never ``weights_only=False``),
  ``--seed`` out of range names the flag and the range, bad UTF-8 / YAML / JSON names the file;
* the terminal is ours: library warnings are hidden while a verb runs (ours are kept), tables are whole when
  piped, a single seed shows no "± nan", a re-launched sweep refuses finished runs whose config changed
  (``--rerun-changed`` trains them again), ``--version`` prints the version.

Everything runs ``blockdiff.cli.app`` in-process on tiny inputs (no training), except one subprocess run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import types
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_tiny_model_dir

import blockdiff
import blockdiff.cli.app as cli
import blockdiff.sweeps.runner as sweep_mod
from blockdiff.cli import main
from blockdiff.config import SEED_MAX, ConfigError, describe_keys, load_config, to_yaml
from blockdiff.errors import UsageError
from blockdiff.sweeps.runner import run_sweep
from blockdiff.sweeps.spec import load_sweep
from blockdiff.training.checkpoint import CheckpointError, load_checkpoint

MARKUP = ["[/x]", "[bold red]x[/]", "[link=file:///etc]y[/link]"]


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, out: str, err: str, *needles: str) -> None:
    """Exit 2, one `error:` message on stderr naming everything in ``needles``, nothing on stdout."""
    assert rc == 2, (out, err)
    assert out == "", f"an error went to stdout: {out!r}"
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} missing from {err!r}"


# -- item 11: no user string is markup ----------------------------------------------------------------------

@pytest.mark.parametrize("name", MARKUP)
def test_paths_with_markup_are_printed_literally_in_errors(name, tmp_path, capsys):
    missing = tmp_path / name / "missing"
    for argv in (["config", "validate", "-c", f"{missing}.yaml"], ["config", "show", "-c", f"{missing}.yaml"],
                 ["eval", missing], ["sample", missing, "--prompt", "x"], ["sweep", f"{missing}.yaml"],
                 ["sweep", "--report", missing]):
        assert_user_error(*run(argv, capsys), str(missing))


@pytest.mark.parametrize("name", MARKUP)
def test_sweep_report_title_shows_a_markup_directory_literally(name, tmp_path, capsys):
    root = tmp_path / name
    fake_summary(root / "a", block_length=4, seed=0, ppl=20.0)
    rc, out, err = run(["sweep", "--report", root], capsys)
    assert rc == 0, err
    assert f"sweep report — {root}" in out


def test_config_show_and_keys_print_markup_like_text_literally(tmp_path, capsys):
    out_dir = tmp_path / "[bold red]x[/]" / "[/x]"
    rc, out, _ = run(["config", "show", f"trainer.out_dir={out_dir}"], capsys)
    assert rc == 0 and yaml.safe_load(out)["trainer"]["out_dir"] == str(out_dir)
    rc, out, _ = run(["config", "keys"], capsys)
    assert rc == 0 and "t ~ U[beta, omega]" in out  # help text with brackets was eaten as a style tag


def test_sweep_name_with_markup_is_printed_literally_and_failures_go_to_stderr(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path, {"model.block_length": [4]}, name="[bold red]x[/]")

    def fails(sweep, run):
        raise RuntimeError("boom")

    monkeypatch.setattr(sweep_mod, "run_one", fails)
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(path)])
    assert info.value.code == 1
    out, err = capsys.readouterr()
    assert "sweep [bold red]x[/]: 1 runs" in out
    assert "1 run(s) failed: block_length-4" in err and "run(s) failed" not in out


@pytest.mark.parametrize("override, choices", [
    ("model.family=foo", "llama, qwen2, gpt2"), ("noise.schedule=foo", "loglinear, cosine"),
    ("noise.clip_search=[1]", "off, log, apply"), ("optim.lr_schedule=3", "cosine, constant"),
])
def test_enum_errors_list_the_valid_choices(override, choices, capsys):
    key = override.partition("=")[0]
    assert_user_error(*run(["config", "validate", override], capsys), f"{key} must be one of {choices}")


def test_a_list_where_a_mapping_belongs_names_the_key_and_the_file(tmp_path, capsys):
    assert_user_error(*run(["config", "validate", "model.block_length_mixture=[1,2]"], capsys),
                      "model.block_length_mixture must be a mapping")
    path = tmp_path / "c.yaml"
    path.write_text("noise:\n  clip_betas: {a: 1}\n")
    assert_user_error(*run(["config", "validate", "-c", path], capsys), str(path), "noise.clip_betas must be a list")


# -- item 12: diagnostics that said the wrong thing -----------------------------------------------------------

@pytest.mark.parametrize("content", [b"x", b"\0" * 4096, b""], ids=["one-byte", "zero-filled", "empty"])
def test_a_damaged_checkpoint_is_truncated_or_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "not a checkpoint" in message
    assert "weights_only" not in message and "pickled" not in message


def test_a_checkpoint_that_is_a_directory_or_a_device_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a regular file \(a character device\)"):
        load_checkpoint(os.devnull)


def test_a_refused_pickle_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"x": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "SimpleNamespace" in str(info.value)


def test_config_file_that_is_a_device_or_a_directory_says_what_it_is(tmp_path, capsys):
    assert_user_error(*run(["config", "validate", "-c", os.devnull], capsys), "not a regular file (a character device)")
    assert_user_error(*run(["config", "validate", "-c", tmp_path], capsys), f"{tmp_path} is a directory")


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(SEED_MAX + 1)])
@pytest.mark.parametrize("verb", [["sample", "nowhere", "--prompt", "x"], ["eval", "nowhere"]])
def test_seed_out_of_range_names_the_flag_and_the_range(verb, seed, capsys):
    assert_user_error(*run([*verb, "--seed", seed], capsys), "--seed", f"0 to {SEED_MAX}")


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(SEED_MAX + 1)])
def test_trainer_seed_out_of_range_is_a_config_error(seed):
    with pytest.raises(ConfigError, match="trainer.seed"):
        load_config([], [f"trainer.seed={seed}"])


def test_bad_utf8_yaml_and_json_name_the_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"model:\n  family: \xff\n")
    assert_user_error(*run(["config", "validate", "-c", config], capsys), str(config), "not UTF-8")
    sweep = tmp_path / "s.yaml"
    sweep.write_bytes(b"name: \xff\n")
    assert_user_error(*run(["sweep", sweep], capsys), str(sweep), "not UTF-8")
    sweep.write_text("grid: {model.block_length: [1, 2\n")
    assert_user_error(*run(["sweep", sweep], capsys), str(sweep), "not valid YAML")
    fake_summary(tmp_path / "out" / "a", block_length=4, seed=0, ppl=20.0)
    damaged = tmp_path / "out" / "b" / "summary.json"
    damaged.parent.mkdir()
    damaged.write_text('{"name": ')
    assert_user_error(*run(["sweep", "--report", tmp_path / "out"], capsys), str(damaged), "not JSON")


def test_bad_flag_values_are_one_error_line_not_a_usage_block(capsys):
    assert_user_error(*run(["sample", "x", "--temperature", "abc"], capsys), "--temperature", "invalid float value")
    assert_user_error(*run([], capsys), "verb")
    assert_user_error(*run(["config", "frobnicate"], capsys), "invalid choice")


# -- item 13: the terminal is ours -------------------------------------------------------------------------

def _warn_from(module_name: str, message: str) -> None:
    """Emit a UserWarning attributed to ``module_name`` (as if raised inside that package)."""
    module = types.ModuleType(module_name)
    exec("import warnings\ndef warn(m):\n    warnings.warn(m, FutureWarning)\n", module.__dict__)
    module.warn(message)


def test_library_warnings_are_hidden_while_a_verb_runs_ours_are_kept(monkeypatch, capsys):
    def noisy(args):
        """Warn twice."""
        _warn_from("transformers.modeling_utils", "a library deprecation")
        _warn_from("blockdiff.fake", "one of ours")

    monkeypatch.setitem(cli.COMMANDS, "config", cli.Verb(noisy, cli.config.add_arguments))
    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["config", "validate"]) == 0
    assert [str(w.message) for w in seen] == ["one of ours"]
    with warnings.catch_warnings(record=True) as seen:  # the filter lasts as long as the command
        warnings.simplefilter("always")
        _warn_from("transformers.modeling_utils", "after the command")
    assert len(seen) == 1


def test_sample_in_a_subprocess_prints_nothing_on_stderr(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path)
    script = Path(sysconfig.get_path("scripts")) / "blockdiff"
    here = str(Path(blockdiff.__file__).parents[1])  # this checkout, not another install of blockdiff
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([str(script), "sample", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"library noise on stderr:\n{proc.stderr}"
    assert "NFE" in proc.stdout


def test_config_keys_piped_shows_every_row_whole(capsys):
    rc, out, _ = run(["config", "keys"], capsys)
    assert rc == 0 and "…" not in out
    lines = out.splitlines()
    for key, default, help_text in describe_keys():
        assert any(line.startswith(key + " ") and line.rstrip().endswith(help_text) and f" {default} " in line
                   for line in lines), f"row of {key} is cut or wrapped"


def test_sweep_report_piped_is_whole_and_a_single_seed_shows_no_nan_spread(tmp_path, capsys):
    root = tmp_path / "out"
    fake_summary(root / "ar", block_length=1, seed=0, ppl=10.0)  # one seed
    fake_summary(root / "bd4-s0", block_length=4, seed=0, ppl=12.0)  # two seeds
    fake_summary(root / "bd4-s1", block_length=4, seed=1, ppl=14.0)
    mixture = {"1": 0.125, "2": 0.125, "4": 0.25, "8": 0.25, "16": 0.25}
    fake_summary(root / "mix", block_length=4, seed=0, ppl=13.0, mixture=mixture)  # a long variant name
    rc, out, err = run(["sweep", "--report", root], capsys)
    assert rc == 0, err
    md = (root / "results.md").read_text()
    for text in (out, md):
        assert "nan" not in text, text
        assert "…" not in text
    assert "mixture 1:0.125/2:0.125/4:0.25/8:0.25/16:0.25" in out
    # the BD3-LM ordering check is the block-length experiment's (experiments/block_length/ordering.py), not the CLI's
    assert _ordering_module().main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "L'=1: 10.00 ≤ L'=4: 13.00 ± 1.41" in out


def _ordering_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "block_length" / "ordering.py"
    spec = importlib.util.spec_from_file_location("block_length_ordering", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relaunched_sweep_refuses_finished_runs_whose_config_changed(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path, {"model.block_length": [1, 4]})
    for r in load_sweep(path).runs:  # both runs finished with the sweep as it was
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "config.yaml").write_text(to_yaml(r.config))
        (r.run_dir / "summary.json").write_text(json.dumps({"name": r.name}))
    trained = []
    monkeypatch.setattr(sweep_mod, "run_one", lambda s, r: trained.append(r.name))
    assert run_sweep(load_sweep(path), log=lambda m: None) == [] and trained == []  # unchanged: skipped

    spec = yaml.safe_load(path.read_text())
    spec["overrides"]["trainer.max_steps"] = 20
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UsageError) as info:
        run_sweep(load_sweep(path), log=lambda m: None)
    message = str(info.value)
    for needle in ("block_length-1", "block_length-4", "trainer.max_steps: 12 -> 20", "--out-dir", "--rerun-changed"):
        assert needle in message
    assert trained == []
    assert_user_error(*run(["sweep", path], capsys), "trainer.max_steps: 12 -> 20")

    assert main(["sweep", str(path), "--rerun-changed", "--only", "block_length-4"]) == 0
    assert trained == ["block_length-4"]
    assert not (tmp_path / "out" / "block_length-4" / "summary.json").exists()  # the stale result is gone
    assert (tmp_path / "out" / "block_length-1" / "summary.json").exists()


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"blockdiff {blockdiff.__version__}"
    assert version("blockdiff") == blockdiff.__version__  # pyproject.toml and the package agree


# -- helpers --------------------------------------------------------------------------------------------------

def write_sweep(tmp: Path, grid, name: str = "t") -> Path:
    spec = {
        "name": name,
        "out_dir": str(tmp / "out"),
        "grid": grid,
        "overrides": {
            "model.hidden_size": 32,
            "model.num_layers": 2,
            "model.num_heads": 2,
            "data.tokenizer": "bytes",
            "data.max_seq_len": 16,
            "trainer.max_steps": 12,
            "trainer.accelerator": "cpu",
        },
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_summary(run_dir: Path, block_length: int, seed: int, ppl: float, mixture: dict | None = None) -> None:
    """A ``summary.json`` as ``sweep.run_one`` writes it, without training."""
    import math

    nll = math.log(ppl)
    summary = {
        "name": run_dir.name,
        "sweep": "t",
        "values": {},
        "settings": {
            "block_length": block_length,
            "block_length_mixture": mixture or {},
            "schedule": "loglinear",
            "beta": 0.0,
            "omega": 1.0,
            "clip_search": "off",
            "seed": seed,
            "max_seq_len": 16,
        },
        "train": {"steps": 12, "minutes": 0.1, "tokens": 768},
        "final": {"val/nll": nll, "val/ppl": ppl, "val/bpb": nll / math.log(2)},
        "eval": [{"block_length": block_length, "nll": nll, "ppl": ppl, "bpb": nll / math.log(2), "num_tokens": 64}],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("flags, says", [
    (["--block-beams", "1000000"], "--block-beams=1000000 x --beam-width=1"),
    (["--block-beams", "2", "--beam-width", "3"], "--beam-width=3 must be at most"),
])
def test_sample_refuses_beam_sizes_before_loading_the_model(tmp_path, capsys, flags, says):
    # issue 20 item 9: the model directory does not exist; the beam flags are refused first, before any allocation
    assert main(["sample", str(tmp_path / "no-model"), "--prompt", "a", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "no-model" not in err and len(err.strip().splitlines()) == 1
