"""Hub-ready model folders: the model card every export writes, hub ids in ``from_pretrained``, ``push_to_hub``
offline (``blockdiff/modeling/model_card.py``, ``blockdiff/modeling/hub.py``)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import train_tiny_cli_run, write_tiny_model_dir

from blockdiff.cli import main
from blockdiff.errors import MissingFileError
from blockdiff.modeling.hub import hub_unreachable, push_to_hub
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.rundir import is_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, "the card does not open with YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_cli_run(tmp_path_factory.mktemp("card_run"))


def test_a_trained_runs_model_folder_has_a_hub_model_card_with_its_held_out_numbers(run_dir):
    card = (run_dir / "model" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "blockdiff" and "license" in meta and meta["license"] is None
    assert "blockdiff" in meta["tags"] and "block-length-4" in meta["tags"] and "base_model" not in meta
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        last = [r for r in csv.DictReader(f) if r.get("val/nll")][-1]
    assert f"| {float(last['val/nll']):.4f} | {float(last['val/ppl']):.2f} | {float(last['val/bpb']):.4f} |" in card
    assert "block length `L' = 4`" in card and "sampler `threshold`" in card and "trained from scratch" in card
    assert is_model_dir(run_dir / "model")  # the card is one of a model folder's own files (--overwrite may replace)


def test_blockdiff_export_writes_the_card_with_the_runs_last_validation(run_dir, tmp_path):
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No held-out evaluation" not in card and "| NELBO (nats/token) |" in card
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--overwrite"]) == 0  # still replaceable


def test_the_cards_python_snippet_loads_and_samples_the_model(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "mymodel")
    card = (model_dir / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "blockdiff"
    assert "No held-out evaluation was recorded" in card  # exported without numbers: says so
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "load_model_dir('mymodel')" in snippet
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", snippet.replace("max_new_tokens=64", "max_new_tokens=4")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_card_says_it_is_a_blockdiff_model_and_its_transformers_snippet_loads_it(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "mymodel")
    card = (model_dir / "README.md").read_text()
    assert "This is a blockdiff model" in card and "upgrading does not help" in card
    snippet = re.findall(r"```python\n(.*?)```", card, re.S)[1]
    assert snippet.startswith("import blockdiff") and 'from_pretrained("path/to/this/folder")' in snippet
    snippet = snippet.replace("path/to/this/folder", str(model_dir))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", snippet + "print(type(model).__name__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "BlockDiffusionLM", proc.stderr[-2000:]


def test_a_fine_tuned_models_card_names_its_base(tmp_path):
    from blockdiff.config import load_config
    from blockdiff.modeling.model_card import model_card

    model = BlockDiffusionLM.from_pretrained(write_tiny_model_dir(tmp_path))
    cfg = load_config([], ["model.pretrained=HuggingFaceTB/SmolLM2-135M"])
    card = model_card(model, cfg, {"val/nll": 2.0, "val/ppl": 7.389, "val/bpb": 1.1, "step": 5}, "bd")
    assert _front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "fine-tuned from `HuggingFaceTB/SmolLM2-135M`" in card and "at step 5" in card


def test_a_hub_id_offline_fails_at_once_with_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingFileError, match="cannot be downloaded: HF_HUB_OFFLINE is set"):
        BlockDiffusionLM.from_pretrained("no-such-org/no-such-blockdiff-model")
    assert main(["sample", "no-such-org/no-such-blockdiff-model", "--prompt", "x"]) == 2


def test_an_unreachable_hub_is_reported_not_retried(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert "not reachable" in hub_unreachable(timeout=1)
    with pytest.raises(MissingFileError, match="not reachable"):
        BlockDiffusionLM.from_pretrained("no-such-org/no-such-blockdiff-model")


def test_push_to_hub_offline_fails_fast_and_uploads_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model_dir = write_tiny_model_dir(tmp_path)
    with pytest.raises(MissingFileError, match="Nothing was uploaded"):
        push_to_hub(model_dir, "me/my-model")
    with pytest.raises(MissingFileError, match="not a blockdiff model directory"):
        push_to_hub(tmp_path, "me/my-model")


@pytest.mark.parametrize("repo_id", ["me/bad--name", "me/model.git", "just-a-name"])
def test_export_checks_the_push_to_hub_repo_id_before_writing_anything(tmp_path, capsys, repo_id):
    # issue 20 item 11: an invalid repo id was found out only after the export was written (and then online)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "no-run"), str(out), "--push-to-hub", repo_id]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub" in err and repo_id in err and "no-run" not in err, err
    assert not out.exists()
