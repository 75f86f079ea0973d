"""``blockdiff train-drafter`` end to end on a tiny teacher (``training/drafter.py``): a distilled set in, a DFlash
drafter out (its layout, recipe and card), which then drafts for its target losslessly; a stopped run resumes, a
finished one is never overwritten without ``--resume``, and a bad key is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distill import corpus_dir, distilled_set, teacher  # noqa: F401  (fixtures)
from test_speculative import hf_greedy

from blockdiff.cli.app import main
from blockdiff.modeling.dflash import DFlashDrafter, load_drafter
from blockdiff.modeling.pretrained import load_decoder
from blockdiff.sampling.speculative import speculative_generate


def argv(distilled, teacher_dir, out, *extra):
    return ["train-drafter", f"target={teacher_dir}", f"data.distilled=[{distilled}]", f"out_dir={out}",
            "net.num_layers=1", "net.target_layers=2", "net.block_length=4", "net.draft_vocab=64",
            "net.mask_token_id=260", "train.max_steps=6", "train.val_every=3", "train.batch_size=2", "train.anchors=4",
            "data.val_fraction=0.2", *extra]


@pytest.mark.slow
def test_train_drafter_writes_a_drafter_that_drafts_losslessly(distilled_set, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(argv(distilled_set, teacher, out)) == 0
    folder = out / "drafter"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "recipe.json", "README.md"}
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["steps"] == 6 and recipe["best_accept"] is not None and recipe["train_tokens"] > 0
    drafter = DFlashDrafter.load(folder)
    assert len(drafter.layers) == 1 and drafter.block_length == 4 and len(drafter.draft_ids) == 64
    assert "Held-out acceptance" in (folder / "README.md").read_text()
    target, _, _ = load_decoder(str(teacher))
    prompt = [5, 17, 40, 3]
    out_ids = speculative_generate(target.eval(), load_drafter(folder, target), prompt, drafter="dflash",
                                   max_new_tokens=12, eos_token_id=None)
    assert out_ids.sequences[0].tolist() == hf_greedy(target, prompt, 12)

    assert main(argv(distilled_set, teacher, out)) == 2  # a finished run is not overwritten without --resume
    assert main(argv(distilled_set, teacher, out, "train.max_steps=9", "--resume")) == 0
    assert json.loads((folder / "recipe.json").read_text())["steps"] == 9  # resumed at 6, ran to 9


def test_corpus_rows_join_the_training_rows_and_the_card_says_so(distilled_set, teacher, corpus_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(argv(distilled_set, teacher, out, f"data.corpus={corpus_dir}", "data.corpus_windows=3",
                     "data.corpus_window_tokens=16")) == 0
    recipe = json.loads((out / "drafter" / "recipe.json").read_text())
    plain = tmp_path / "plain"
    assert main(argv(distilled_set, teacher, plain)) == 0
    before = json.loads((plain / "drafter" / "recipe.json").read_text())
    assert recipe["corpus_rows"] == 3 and recipe["corpus_tokens"] == 48
    assert recipe["train_rows"] == before["train_rows"] + 3 and recipe["held_rows"] == before["held_rows"]
    assert "3 training windows" in (out / "drafter" / "README.md").read_text()


def test_a_bad_key_or_value_is_one_line(tmp_path, capsys):
    assert main(["train-drafter", "net.block_length=1", f"out_dir={tmp_path}"]) == 2
    assert "net.block_length must be in [2, 64]" in capsys.readouterr().err
    assert main(["train-drafter", "net.nope=3", f"out_dir={tmp_path}"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_export_writes_the_dflash_layout_and_never_replaces_other_files(distilled_set, teacher, tmp_path):  # noqa: F811
    dflash = pytest.importorskip("dflash.model")
    run = tmp_path / "run"
    assert main(argv(distilled_set, teacher, run, "train.max_steps=3")) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "recipe.json", "README.md"}
    ref = dflash.DFlashDraftModel.from_pretrained(str(out))
    assert ref.block_size == 4 and ref.mask_token_id == 260
    assert main(["export", str(run / "drafter"), str(out)]) == 2  # exists: --overwrite needed
    assert main(["export", str(run / "drafter"), str(out), "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(run), str(other), "--overwrite"]) == 2  # not a drafter: never replaced
    assert (other / "notes.txt").read_text() == "mine"


def test_saved_ids_read_back_as_the_distilled_set(distilled_set, tmp_path):  # noqa: F811
    from blockdiff.training.drafter_data import read_rows, save_ids

    save_ids(str(distilled_set), str(tmp_path / "ids.npz"))
    for a, b in zip(read_rows([str(distilled_set)], 0.2), read_rows([str(tmp_path / "ids.npz")], 0.2)):
        assert a.ids == b.ids and a.prompt == b.prompt and len(a) > 0


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("configs", "drafter").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_drafter_config_loads_with_the_keys_it_sets(path):
    from omegaconf import OmegaConf

    from blockdiff.config.drafter import load_drafter_config

    cfg = OmegaConf.to_container(OmegaConf.structured(load_drafter_config([path])))
    for key, value in OmegaConf.to_container(OmegaConf.load(path)).items():
        for sub, item in (value.items() if isinstance(value, dict) else [(None, value)]):
            assert (cfg[key] if sub is None else cfg[key][sub]) == item, (key, sub)
