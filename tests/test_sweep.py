"""The sweep runner and its report.

* ``expand_grid``: the cartesian product in order, comma-joined keys varied together, a list of grids
  as the union; run names are stable and readable;
* end to end on a tiny two-run sweep (block length 1 vs 4, 12 steps each): every run directory holds the
  resolved config, the metrics CSV and ``summary.json``; launching again re-runs nothing (a sampling
  setting added later is sampled on the finished models without training); ``--report``
  writes results.csv / results.md / the PNG plots from it; the CLI verb does the same;
* bad input fails before any run starts, naming the problem: a grid key not in the config schema, an
  empty grid, a mixture whose weights do not sum to 1 or whose lengths do not divide max_seq_len, a
  sampling key that does not exist, and a report directory with no runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest
import yaml

import blockdiff.sweeps.runner as sweep_mod
from blockdiff.cli import main
from blockdiff.config import ConfigError
from blockdiff.sweeps.report import load_summaries, report
from blockdiff.sweeps.runner import run_sweep
from blockdiff.sweeps.spec import expand_grid, load_sweep, run_name

TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "data.tokenizer": "bytes",
    "data.max_seq_len": 16, "data.batch_size": 4, "data.max_documents": 2, "trainer.max_steps": 12,
    "trainer.val_every_n_steps": 12, "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 2,
    "trainer.max_minutes": None, "trainer.accelerator": "cpu", "optim.warmup_steps": 2,
}


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def write_sweep(tmp: Path, grid, **extra) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("The quick brown fox jumps over the lazy dog. " * 30)
    spec = {
        "name": "t",
        "out_dir": str(tmp / "out"),
        "overrides": {**TINY, "data.source": str(corpus)},
        "grid": grid,
        **extra,
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expand_grid_product_zip_and_union():
    combos = expand_grid({"model.block_length": [1, 4], "noise.beta,noise.omega": [[0.0, 1.0], [0.3, 0.8]]})
    assert combos == [
        {"model.block_length": 1, "noise.beta": 0.0, "noise.omega": 1.0},
        {"model.block_length": 1, "noise.beta": 0.3, "noise.omega": 0.8},
        {"model.block_length": 4, "noise.beta": 0.0, "noise.omega": 1.0},
        {"model.block_length": 4, "noise.beta": 0.3, "noise.omega": 0.8},
    ]
    union = expand_grid([{"model.block_length": [1, 2]}, {"model.block_length_mixture": [{1: 0.5, 4: 0.5}]}])
    assert union == [
        {"model.block_length": 1},
        {"model.block_length": 2},
        {"model.block_length_mixture": {1: 0.5, 4: 0.5}},
    ]
    assert run_name(combos[1]) == "block_length-1_beta-0.3_omega-0.8"
    assert run_name(union[2]) == "block_length_mixture-1x0.5+4x0.5"


def test_sweep_runs_resumes_and_reports(tmp_path):
    path = write_sweep(
        tmp_path,
        {"model.block_length": [1, 4]},
        evaluate={"block_lengths": [1, 4, 16], "max_batches": 1, "clip_variance": True, "clip_batches": 1},
        sample={
            "prompts": ["The "],
            "max_new_tokens": 8,
            "reference": "block_length-1",
            "grid": {"sampler,tau": [["first_hitting", 0.9], ["threshold", 0.5]]},
        },
    )
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["block_length-1", "block_length-4"]
    assert run_sweep(sweep) == []
    for run in sweep.runs:
        d = tmp_path / "out" / run.name
        assert (d / "config.yaml").is_file() and (d / "logs" / "metrics.csv").is_file()
        summary = json.loads((d / "summary.json").read_text())
        assert summary["settings"]["block_length"] == run.values["model.block_length"]
        assert [e["block_length"] for e in summary["eval"]] == [1, 4, 16]
        assert len(summary["clip"]["windows"]) == 16
        assert [s["sampler"] for s in summary["samples"]] == ["first_hitting", "threshold"]
        assert all(s["gen_nll"] is not None and s["nfe_per_token"] > 0 for s in summary["samples"])
    assert (
        yaml.safe_load((tmp_path / "out" / "block_length-4" / "config.yaml").read_text())["model"]["block_length"] == 4
    )

    # re-launch: nothing trains again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "run_one", no_training)
        messages = []
        assert run_sweep(load_sweep(path), log=messages.append) == []
        assert messages == [
            "skip block_length-1 (finished: {})".format(tmp_path / "out" / "block_length-1" / "summary.json"),
            "skip block_length-4 (finished: {})".format(tmp_path / "out" / "block_length-4" / "summary.json"),
        ]

    # a sampling setting added to the file later: sampled on the finished models, nothing trained
    spec = yaml.safe_load(path.read_text())
    spec["sample"]["grid"]["sampler,tau"].append(["fixed", 0.9])
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "run_one", no_training)
        assert run_sweep(load_sweep(path), log=lambda m: None) == []
    for run in sweep.runs:
        samples = json.loads((tmp_path / "out" / run.name / "summary.json").read_text())["samples"]
        assert [s["sampler"] for s in samples] == ["first_hitting", "threshold", "fixed"]

    written = report(tmp_path / "out")
    names = {p.name for p in written}
    assert {
        "results.csv",
        "results.md",
        "ppl_vs_block_length.png",
        "loss_curves.png",
        "quality_vs_nfe.png",
        "clip_variance.png",
    } <= names
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["block_length"]) for r in rows) == [1, 4]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| loglinear U[0,1] | 4 | 1 |" in md and "quality" in md
    assert all((tmp_path / "out" / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    assert main(["sweep", "--report", str(tmp_path / "out")]) == 0


def test_failed_run_is_run_again(tmp_path):
    # a run that failed left error.txt next to its partial files; relaunching the sweep must train it again (the
    # trainer refuses a directory holding a file that is not part of a run, so the note is removed first)
    from blockdiff.modeling.rundir import check_new_run_dir

    path = write_sweep(tmp_path, {"model.block_length": [4]})
    sweep = load_sweep(path)
    run_dir = tmp_path / "out" / "block_length-4"
    run_dir.mkdir(parents=True)
    (run_dir / "error.txt").write_text("Traceback: the machine went away")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "run_one", lambda s, r: (check_new_run_dir(r.run_dir, True), calls.append(r.name)))
        assert run_sweep(sweep, log=lambda m: None) == []
    assert calls == ["block_length-4"] and not (run_dir / "error.txt").exists()


def test_unfinished_run_is_run_again(tmp_path):
    path = write_sweep(tmp_path, {"model.block_length": [4]})
    sweep = load_sweep(path)
    (tmp_path / "out" / "block_length-4").mkdir(parents=True)
    (tmp_path / "out" / "block_length-4" / "config.yaml").write_text("partial")  # a run killed midway
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "run_one", lambda s, r: calls.append(r.name))
        run_sweep(sweep)
    assert calls == ["block_length-4"]


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"model.hiden_size": [32]}, "'model.hiden_size' is not a config key"),
        ({}, "grid is empty"),
        (None, "grid is empty"),
        ({"model.block_length": []}, "non-empty list"),
        ({"model.block_length_mixture": [{1: 0.5, 4: 0.2}]}, "sum to 1"),
        ({"model.block_length_mixture": [{1: 0.5, 3: 0.5}]}, "must divide data.max_seq_len"),
        ({"noise.beta,noise.omega": [[0.1]]}, "list of 2"),
    ],
)
def test_bad_sweeps_fail_before_any_run(tmp_path, grid, match):
    path = write_sweep(tmp_path, grid)
    with pytest.raises((ConfigError, ValueError), match=match):
        load_sweep(path)
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(path)]) == 2
    assert not (tmp_path / "out").exists()


def test_bad_sample_key_and_empty_report(tmp_path):
    path = write_sweep(tmp_path, {"model.block_length": [4]}, sample={"grid": {"taus": [0.9]}})
    with pytest.raises(ConfigError, match="taus"):
        load_sweep(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished runs"):
        load_summaries(tmp_path / "empty")
    assert main(["sweep", "--report", str(tmp_path / "empty")]) == 2


def test_command_line_layers_sit_between_the_file_and_the_grid(tmp_path):
    """`blockdiff sweep FILE -c more.yaml key=value`: the same grid at another size; the grid still wins,
    and ``${data.max_seq_len}`` in the grid follows the layered context length (the MDLM end)."""
    path = write_sweep(tmp_path, {"model.block_length": [4, "${data.max_seq_len}"]})
    more = tmp_path / "more.yaml"
    more.write_text("model:\n  hidden_size: 48\n  block_length: 2\n")
    sweep = load_sweep(path, tmp_path / "elsewhere", [more], ["data.max_seq_len=32"])
    assert [r.name for r in sweep.runs] == ["block_length-4", "block_length-max_seq_len"]
    assert [r.config.model.block_length for r in sweep.runs] == [4, 32]
    assert all(r.config.model.hidden_size == 48 and r.config.model.num_layers == 2 for r in sweep.runs)
    assert sweep.runs[0].run_dir == tmp_path / "elsewhere" / "block_length-4"
    with pytest.raises(ConfigError, match="model.hidden"):
        load_sweep(path, None, [], ["model.hidden=3"])


SHIPPED = sorted(
    [
        *Path(__file__).resolve().parents[1].glob("configs/sweeps/*.yaml"),
        *Path(__file__).resolve().parents[1].glob("experiments/block_length/*.yaml"),
        *Path(__file__).resolve().parents[1].glob("experiments/clean_attention/*.yaml"),
    ]
)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "gpu.yaml"], ids=lambda p: p.name)
def test_shipped_sweeps_load(path, tmp_path):
    """Every shipped sweep expands and validates (also with the GPU-scale layer); nothing is written."""
    sweep = load_sweep(path, tmp_path / "out")
    assert sweep.runs and all(r.config.data.max_seq_len % r.config.model.block_length == 0 for r in sweep.runs)
    if path.parent.name == "block_length":
        gpu = load_sweep(path, tmp_path / "gpu", [path.parent / "gpu.yaml"])
        assert all(r.config.data.max_seq_len == 1024 and r.config.model.hidden_size == 768 for r in gpu.runs)
    assert not (tmp_path / "out").exists()
