"""``blockdiff plot`` (issue 13): curves of runs, NELBO per block position, the reveals histogram of a trace; the
helpers the sweep report shares (``blockdiff/viewer/plots.py``)."""

from __future__ import annotations

import pytest
from conftest import train_tiny_cli_run

from blockdiff.cli import main
from blockdiff.viewer.plots import moving_average, read_metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_cli_run(tmp_path_factory.mktemp("plot_run"))


def not_blank(path) -> bool:
    from PIL import Image, ImageStat

    image = Image.open(path).convert("RGB")
    return image.size[0] > 300 and max(ImageStat.Stat(image).stddev) > 10


def test_plot_a_run_and_a_trace(run_dir, tmp_path, capsys):
    assert read_metrics(run_dir, "val/nll")  # the tiny run validated once (it logged no train/loss yet)
    trace = tmp_path / "t.jsonl"
    assert main(["sample", str(run_dir), "--prompt", "The", "--max-new-tokens", "12", "--trace", str(trace)]) == 0
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), str(trace), "-o", str(out), "--nelbo-batches", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("curves.png", "nelbo_by_position.png", "reveals_t.png"):
        assert (out / name).is_file() and not_blank(out / name), name
        assert str(out / name) in printed
    values = printed.split("per block position: ")[1].splitlines()[0].split(", ")
    assert len(values) == 4  # block length 4: one NELBO per position


def test_plot_two_runs_on_one_figure_without_the_evaluation(run_dir, tmp_path):
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), str(run_dir), "-o", str(out), "--nelbo-batches", "0"]) == 0
    assert (out / "curves.png").is_file() and not (out / "nelbo_by_position.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--nelbo-batches", "-1"], "--nelbo-batches must be >= 0"),
    (["--smooth", "0"], "--smooth must be >= 1"),
])
def test_plot_refuses_bad_flags(run_dir, tmp_path, capsys, args, message):
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "p"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_plot_refuses_what_is_neither_a_run_nor_a_trace(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_metrics_and_smoothing_helpers(tmp_path):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,train/loss,val/nll\n0,9,4.5,\n0,19,4.0,\n0,19,,4.25\n")
    assert read_metrics(tmp_path / "run", "train/loss") == [(9, 4.5), (19, 4.0)]
    assert read_metrics(tmp_path / "run", "val/nll") == [(19, 4.25)]
    assert read_metrics(tmp_path / "nothing", "train/loss") == []
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_writes_into_the_run_and_never_over_an_existing_file(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(run_dir), "--nelbo-batches", "0"]) == 0
    curves = run_dir / "plots" / "curves.png"
    assert curves.is_file() and not (tmp_path / "plots").exists()  # into the run, not the current directory
    from blockdiff.modeling.rundir import is_run_dir

    assert is_run_dir(run_dir)  # plots/ is part of a run's layout
    before = curves.read_bytes()
    assert main(["plot", str(run_dir), "--nelbo-batches", "0"]) == 2  # the same command again
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and curves.read_bytes() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "curves.png").write_text("my own figure")
    assert main(["plot", str(run_dir), "-o", str(mine), "--nelbo-batches", "0"]) == 2
    assert (mine / "curves.png").read_text() == "my own figure"
    assert main(["plot", str(run_dir), "-o", str(mine), "--nelbo-batches", "0", "--overwrite"]) == 0
    assert not_blank(mine / "curves.png") and sorted(p.name for p in mine.iterdir()) == ["curves.png"]  # no temp file
