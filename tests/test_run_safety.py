"""Run directories and exports that never lose data and never go back in time (issue: defects found as a new user).

Each test reproduces one reported defect on a tiny run (hidden 32, 2 layers, context 32, byte tokenizer):
writing a model or a run never deletes anything that is not a blockdiff export / run; ``last.ckpt`` is
always the newest checkpoint and the only one next to ``prev.ckpt``; a resume gets its time budget again,
keeps the good backup, and refuses a config the checkpoint was not trained with *before* touching a file;
a run that fails before its first checkpoint leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from blockdiff.cli import main
from blockdiff.config import ConfigError, ModelConfig, load_config
from blockdiff.errors import StorageError, WouldOverwriteError
from blockdiff.modeling.io import load_model_dir
from blockdiff.training.checkpoint import load_checkpoint
from blockdiff.training.lightning_module import BlockDiffusionModule
from blockdiff.training.train import train

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32", "data.batch_size=4",
    "data.tokenizer=bytes", "data.val_fraction=0.2", "trainer.max_minutes=null", "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu", "trainer.val_every_n_steps=4", "trainer.checkpoint_every_n_steps=4",
    "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
]


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(private_datasets_cache):
    yield


def args(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.source={corpus}", f"trainer.out_dir={run}", *extra]


def config(corpus: Path, run: Path, *extra: str):
    return load_config([], args(corpus, run, *extra))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run (shared; tests that change it copy it first)."""
    out = tmp_path_factory.mktemp("shared") / "run"
    train(config(corpus, out, "trainer.max_steps=4"), progress=False)
    return out


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def step_of(path: Path) -> int:
    return int(load_checkpoint(path, mmap=True)["global_step"])


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    return path


# -- 1. writing a model or a run never deletes what is not ours ---------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_never_deletes_a_folder_of_the_users_files(run, tmp_path, capsys, overwrite):
    folder = users_folder(tmp_path / "u")
    assert main(["export", str(run), str(folder), *overwrite]) == 2
    assert (folder / "thesis.tex").read_text() == "three years of work" and sorted(os.listdir(folder)) == ["thesis.tex"]
    assert "thesis.tex" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["u"]  # no staging folder left next to it


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_into_its_own_run_directory_is_refused_and_the_run_survives(run, tmp_path, overwrite):
    copy = tmp_path / "run"
    copy.mkdir()
    for name, data in tree(run).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    before = tree(copy)
    assert main(["export", str(copy), str(copy), *overwrite]) == 2
    assert tree(copy) == before


def test_export_to_a_parent_directory_is_refused(run, tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (tmp_path / "a" / "notes.txt").write_text("keep me")
    monkeypatch.chdir(inner)
    assert main(["export", str(run), "..", "--overwrite"]) == 2
    assert (tmp_path / "a" / "notes.txt").read_text() == "keep me" and inner.is_dir()


def test_export_over_a_previous_export_needs_overwrite_and_replaces_its_own_files(run, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    first = tree(out)
    assert main(["export", str(run), str(out)]) == 2  # no --overwrite: refused
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert tree(out) == first  # replaced: the same files, the same weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_overwrite_deletes_only_the_files_its_manifest_lists(run, tmp_path, capsys):
    """issue 20: ``--overwrite`` deleted any file whose name ended like an export's (``.txt``, ``.json``, ``.yaml``)."""
    import json

    out = tmp_path / "e5"
    assert main(["export", str(run), str(out)]) == 0
    listed = json.loads((out / "export.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != "export.json")
    mine = {"mynotes.txt": "n\n", "eval_results.json": "{}\n", "sweep.yaml": "a: 1\n", "plot.png": "png"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / "model.safetensors").write_bytes(b"stale")  # one of the export's own files, to be replaced
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert {name: (out / name).read_text() for name in mine} == mine  # the user's files stay
    assert (out / "model.safetensors").stat().st_size > 1000 and load_model_dir(out).model is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e5"]  # no staging or .old folder left
    (out / "export.json").write_text(json.dumps({"files": [f for f in listed if f != "README.md"]}))
    (out / "README.md").write_text("my own readme")  # not the export's (by its manifest): never replaced
    assert main(["export", str(run), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "README.md" in err and (out / "README.md").read_text() == "my own readme"


def test_export_overwrite_of_an_export_without_a_manifest(run, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["export", str(run), str(out)]) == 0
    (out / "export.json").unlink()  # as exports were written before manifests
    assert main(["export", str(run), str(out), "--overwrite"]) == 0  # only names an export writes: ours
    (out / "export.json").unlink()
    (out / "mynotes.txt").write_text("keep")
    assert main(["export", str(run), str(out), "--overwrite"]) == 2  # cannot tell ours apart: refused
    err = capsys.readouterr().err
    assert "mynotes.txt" in err and "export.json" in err and (out / "mynotes.txt").read_text() == "keep"
    assert (out / "model.safetensors").is_file()


def test_export_overwrite_through_a_symbolic_link_keeps_the_link(run, tmp_path, capsys):
    """issue 20: ``export RUN link --overwrite`` replaced the link by a directory and left the old model behind it."""
    target, link = tmp_path / "mexp", tmp_path / "link2"
    assert main(["export", str(run), str(target)]) == 0
    (target / "model.safetensors").write_bytes(b"old")
    link.symlink_to(target)
    assert main(["export", str(run), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").stat().st_size > 1000  # the new model, where the link points
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    assert main(["export", str(run), str(broken)]) == 2
    assert "symbolic link" in capsys.readouterr().err and broken.is_symlink() and not (tmp_path / "nowhere").exists()


def test_train_overwrite_never_deletes_a_folder_of_the_users_files(corpus, tmp_path, capsys):
    folder = users_folder(tmp_path / "u")
    assert main(["train", *args(corpus, folder, "trainer.max_steps=1"), "--overwrite"]) == 2
    assert sorted(os.listdir(folder)) == ["thesis.tex"]
    err = " ".join(capsys.readouterr().err.split())
    assert "not a blockdiff run" in err and "thesis.tex" in err


def test_demo_does_not_replace_an_existing_run_without_overwrite(run, tmp_path, capsys):
    before = tree(run)
    assert main(["demo", f"trainer.out_dir={run}"]) == 2
    assert tree(run) == before
    assert "--overwrite" in capsys.readouterr().err


# -- 2. last.ckpt is always the newest, and the only one ------------------------------------------------

def test_last_ckpt_stays_the_newest_across_a_resume(corpus, tmp_path):
    run_dir = tmp_path / "stale"
    train(config(corpus, run_dir, "trainer.max_steps=3"), progress=False)  # ends before its first periodic save
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["last.ckpt"]
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 3
    result = train(config(corpus, run_dir, "trainer.max_steps=10"), progress=False, resume=run_dir)
    assert result.steps == 10
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["last.ckpt", "prev.ckpt"]
    assert step_of(run_dir / "checkpoints" / "last.ckpt") == 10 and step_of(run_dir / "checkpoints" / "prev.ckpt") == 8
    # export RUN takes the newest weights: the same as the run's own model/
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), str(out)]) == 0
    a, b = load_model_dir(out).model.state_dict(), load_model_dir(run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_left_with_last_v1_by_an_older_version_resumes_from_the_newest_and_is_tidied(corpus, tmp_path, capsys):
    run_dir = tmp_path / "old"
    train(config(corpus, run_dir, "trainer.max_steps=4"), progress=False)
    train(config(corpus, run_dir, "trainer.max_steps=8"), progress=False, resume=run_dir)
    ckpts = run_dir / "checkpoints"
    os.replace(ckpts / "last.ckpt", ckpts / "last-v1.ckpt")  # what older versions left: the newest under -v1 ...
    os.replace(ckpts / "prev.ckpt", ckpts / "last.ckpt")  # ... and a stale last.ckpt
    capsys.readouterr()
    result = train(config(corpus, run_dir, "trainer.max_steps=10"), progress=False, resume=run_dir)
    assert "resuming" in capsys.readouterr().out and result.steps == 10
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "prev.ckpt"]
    assert step_of(ckpts / "last.ckpt") == 10 and step_of(ckpts / "prev.ckpt") == 8  # resumed from 8, not 4


def test_a_finished_run_logs_its_final_validation_once(corpus, tmp_path):
    run_dir = tmp_path / "r"
    train(config(corpus, run_dir, "trainer.max_steps=8"), progress=False)  # validates in fit at steps 4 and 8
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert len([r for r in values if r["val/nll"]]) == 2


# -- 3. a resume gets its time budget again, and says what it will do -------------------------------------


def test_resume_of_a_time_boxed_run_trains_on(corpus, tmp_path, capsys):
    run_dir = tmp_path / "tb"
    first = train(config(corpus, run_dir, "trainer.max_steps=100000", "trainer.max_minutes=0.0005"), progress=False)
    assert first.stopped_by == "time budget" and 1 <= first.steps < 100000
    capsys.readouterr()
    second = train(
        config(corpus, run_dir, "trainer.max_steps=100000", "trainer.max_minutes=0.0005"),
        progress=False,
        resume=run_dir,
    )
    assert second.steps > first.steps  # before: the restored timer counted the budget as spent, 0 steps
    out = capsys.readouterr().out
    assert f"resuming {run_dir} at step {first.steps} of 100000, budget 0.0005 min" in out
    assert "time budget" in out and "--resume" in out
    third = train(config(corpus, run_dir, f"trainer.max_steps={second.steps + 3}"), progress=False, resume=run_dir)
    assert third.steps == second.steps + 3 and third.stopped_by == "max_steps"


# -- 4. falling back to prev.ckpt keeps the good backup -------------------------------------------------


def test_fallback_resume_keeps_a_good_prev_ckpt(corpus, tmp_path):
    run_dir = tmp_path / "r"
    train(config(corpus, run_dir, "trainer.max_steps=8"), progress=False)
    last, prev = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "prev.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged
    result = train(config(corpus, run_dir, "trainer.max_steps=12"), progress=False, resume=run_dir)
    assert result.steps == 12
    assert step_of(last) == 12 and step_of(prev) == 8  # before: prev.ckpt was the damaged file


# -- 5. a resume checks what the checkpoint was trained with, before touching a file ---------------------


@pytest.mark.parametrize(
    "edit",
    [
        ("block_length: 4", "block_length: 8"),
        ("batch_size: 4", "batch_size: 2"),
        ("hidden_size: 32", "hidden_size: 64"),
    ],
)
def test_resume_after_editing_config_yaml_is_refused_before_anything_is_written(run, tmp_path, capsys, edit):
    copy = tmp_path / "run"
    for name, data in tree(run).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    config_yaml = copy / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace(*edit))
    before = tree(copy)
    assert main(["train", "--resume", str(copy), "trainer.max_steps=8"]) == 2
    assert tree(copy) == before  # metrics.csv, checkpoints: untouched
    err = " ".join(capsys.readouterr().err.split())
    key = edit[1].split(":")[0]
    assert "cannot resume" in err and key in err and "Traceback" not in err


# -- 6. a failed start leaves no run directory, so the corrected command just works ----------------------


@pytest.mark.parametrize(
    "bad",
    [
        "trainer.precision=17",
        "trainer.accelerator=nope",
        "data.num_workers=-1",
        "optim.lr=nan",
        "optim.betas=[0.9,1.5]",
        "trainer.accelerator=gpu",
    ],
)
def test_a_bad_setting_leaves_no_run_directory(corpus, tmp_path, capsys, bad):
    run_dir = tmp_path / "r"
    assert main(["train", *args(corpus, run_dir, "trainer.max_steps=2", bad)]) == 2
    assert not run_dir.exists()
    assert bad.split("=")[0] in capsys.readouterr().err


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(corpus, tmp_path, monkeypatch):
    run_dir = tmp_path / "r"

    def broken(self, batch, batch_idx):
        raise RuntimeError("a bug in the training step")

    with monkeypatch.context() as mp:
        mp.setattr(BlockDiffusionModule, "training_step", broken)
        with pytest.raises(RuntimeError, match="a bug"):
            train(config(corpus, run_dir, "trainer.max_steps=2"), progress=False)
    assert not run_dir.exists()
    assert train(config(corpus, run_dir, "trainer.max_steps=2"), progress=False).steps == 2  # not "already holds a run"


def test_disk_full_at_the_first_checkpoint_is_a_clear_error_that_leaves_nothing(corpus, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"

    def full_disk(obj, f):  # what torch.save raises when the disk fills up mid-write
        f.write(b"x" * 512)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr("blockdiff.training.checkpoint.torch.save", full_disk)
    assert main(["train", *args(corpus, run_dir, "trainer.max_steps=4")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "could not write checkpoint" in err and "start the run again" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_disk_full_during_export_keeps_the_previous_export_and_leaves_no_staging_folder(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    before = tree(out)

    def full_disk(self, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("blockdiff.modeling.model.BlockDiffusionLM.save_pretrained", full_disk)
    with pytest.raises(StorageError, match="nothing under"):
        from blockdiff.training.export import export_checkpoint

        export_checkpoint(run, out, overwrite=True)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 9 / 10. values that passed validation and then crashed, trained nothing, or were ignored ----------


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_minutes=-1", "trainer.max_minutes"),
        ("trainer.max_minutes=0", "trainer.max_minutes"),
        ("data.max_documents=0", "data.max_documents"),
        ("data.max_documents=-5", "data.max_documents"),
        ("model.block_length_mixture={4: nan}", "model.block_length_mixture"),
        ("data.batch_size=100000000000000000000000", "data.batch_size"),
    ],
)
def test_values_that_used_to_pass_validation_are_refused_by_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_a_block_length_mixture_given_as_a_list_is_refused():
    with pytest.raises(ConfigError, match="model.block_length_mixture must map"):
        ModelConfig(block_length_mixture=[1, 2])


def test_a_batch_larger_than_the_corpus_is_refused_before_the_run_directory(corpus, tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(ConfigError, match="data.batch_size=4096 is larger than"):
        train(config(corpus, run_dir, "data.batch_size=4096"), progress=False)
    assert not run_dir.exists()


def test_a_blockdiff_model_as_finetune_base_is_refused_instead_of_flipping_its_logit_shift(run, capsys):
    assert main(["finetune", "--base", str(run / "model"), "trainer.max_steps=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is a blockdiff model" in err and "model.init_from=" in err


def test_init_from_keeps_the_logit_shift_of_the_model_it_starts_from(corpus, tmp_path):
    ar = tmp_path / "ar"
    train(config(corpus, ar, "trainer.max_steps=1", "model.block_length=1", "model.logit_shift=true"), progress=False)
    result = train(config(corpus, tmp_path / "bd", "trainer.max_steps=1", f"model.init_from={ar}"), progress=False)
    assert load_model_dir(result.model_dir).model.spec.logit_shift is True  # before: silently off


def test_overwrite_refuses_a_file_given_as_the_run_directory(corpus, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(WouldOverwriteError, match="is a file"):
        train(config(corpus, target, "trainer.max_steps=1"), overwrite=True, progress=False)
    assert target.read_text() == "x"


def test_the_fallback_resume_warning_says_one_thing(tmp_path):
    # issue 20 item 12: it said both "resume from it with `blockdiff train --resume prev.ckpt`" and "resuming from
    # the previous checkpoint prev.ckpt instead"
    from blockdiff.training.resume import resolve_resume

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 8, "state_dict": {}}, ckpts / "prev.ckpt")
    (ckpts / "last.ckpt").write_bytes(b"not a checkpoint")
    point = resolve_resume(tmp_path)
    assert point.fell_back and len(point.warnings) == 1
    warning = point.warnings[0]
    assert "resuming from the previous checkpoint" in warning and "--resume" not in warning, warning
    assert warning.count("prev.ckpt") == 1, warning
