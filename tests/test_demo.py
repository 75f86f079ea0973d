"""``blockdiff demo`` (issue 13) on a tiny corpus and network: the three phases of the from-AR recipe, then the
samples of both models side by side with their forwards and bounds, a trace page of the block diffuser's first
sample, and the next commands. (The real demo's numbers: docs/benchmarks.md, "The demo".)"""

from __future__ import annotations

import datasets
import pytest

from blockdiff.cli import main
from blockdiff.modeling.rundir import is_run_dir
from blockdiff.viewer.trace import read_trace

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.max_seq_len=32",
        "data.batch_size=4", "data.tokenizer=bytes", "trainer.max_steps=6", "trainer.max_minutes=null",
        "trainer.val_every_n_steps=100", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
        "sample.max_new_tokens=12", "sample.prompt=The"]


@pytest.fixture()
def tiny_args(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. A cat sat on the mat.\n" * 60)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    return [*TINY, f"data.source={corpus}", f"trainer.out_dir={tmp_path / 'demo'}", "--no-fast"]


def test_demo_trains_both_models_and_shows_them_side_by_side(tiny_args, tmp_path, capsys):
    assert main(["demo", *tiny_args]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert is_run_dir(tmp_path / "demo") and is_run_dir(tmp_path / "demo-ar")
    for phase in ("1/3: an autoregressive model", "2/3: block diffusion", "3/3: the AR model trained on"):
        assert phase in out
    assert "block diffusion, L'=4" in out and "autoregressive, L'=1" in out
    assert out.count("forwards per sample") == 2 and out.count("held-out bound: PPL") == 2
    page = tmp_path / "demo-trace.html"
    assert page.is_file() and str(page) in out
    trace = read_trace(tmp_path / "demo-trace.jsonl")
    assert len(trace.samples) == 2 and trace.block_length == 4
    assert trace.samples[0].text and trace.samples[0].text.split()[0] in out  # the traced sample is the one shown
    assert "blockdiff sample" in out and "blockdiff plot" in out and "blockdiff finetune" in out
    # the baseline was trained as long as the block diffuser: the AR third + the block-diffusion third (2 + 2 steps)
    assert "trained 2 AR + 2" in out and "trained 4 AR steps" in out


def test_demo_refuses_to_replace_the_ar_run_before_training(tiny_args, tmp_path, capsys):
    (tmp_path / "demo-ar").mkdir()
    (tmp_path / "demo-ar" / "notes.txt").write_text("mine")
    assert main(["demo", *tiny_args]) == 2
    assert not (tmp_path / "demo").exists()  # nothing trained
    assert (tmp_path / "demo-ar" / "notes.txt").read_text() == "mine"


def test_the_fast_decoding_showcase_writes_the_models_own_text(tmp_path, capsys):
    """The demo's last part with a tiny target and a drafter for it: the same text as its generate(), both speeds."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_dflash import make_drafter, saved
    from test_speculative import ar_model

    from blockdiff.cli.demo_fast import showcase
    from blockdiff.modeling.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    target = ar_model("llama", len(tokenizer), std=1.0).float()
    path = saved(make_drafter(target, mask=len(tokenizer) - 1), tmp_path)
    result = showcase(target, tokenizer, new_tokens=12, prompt="To be", drafter_path=path)
    out = " ".join(capsys.readouterr().out.split())
    assert result["identical"] and "token for token the same text" in out
    assert result["plain_tok_s"] > 0 and result["fast_tok_s"] > 0 and result["tokens_per_forward"] >= 1
    assert "x the speed on this machine" in out
