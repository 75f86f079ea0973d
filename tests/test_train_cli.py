"""End to end: train a tiny model, evaluate it, sample from it, and drive all of it through the CLI.

What is checked here (CPU, offline, tiny settings: hidden 32, 2 layers, context 32, byte tokenizer):

* ``train`` on a small repetitive local corpus: the logged ``train/loss`` falls; the run directory
  holds config, checkpoint, CSV log and an exported ``model/``; the exported model reproduces the final
  validation NELBO that the in-memory model logged, and ``evaluate`` is finite, seeded and consistent
  (``ppl = exp(nll)``, ``bpb = nll / ln 2 * tokens_per_byte``);
* the CLI (``blockdiff.cli.app``): ``train`` / ``eval`` / ``sample`` on the bundled Shakespeare corpus,
  ``config show`` / ``validate``, and user errors that exit with status 2 and leave nothing behind;
  the ``blockdiff`` entry point and ``python -m blockdiff.cli`` in a subprocess;
* a model directory whose tokenizer does not match its embeddings is refused;
* ``generate``: exact output length, no mask token left, NFE for ``steps_per_block=1``, seeding, and the
  sampler's logits equal the training forward's on the same context.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from blockdiff.cli import main
from blockdiff.config import ModelConfig, load_config, to_yaml
from blockdiff.evaluation.nelbo import evaluate
from blockdiff.modeling.io import export_model, load_model_dir
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.modeling.tokenizer import byte_tokenizer, train_bpe
from blockdiff.training.builders import build_backbone
from blockdiff.training.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "data.max_seq_len=32",
    "data.batch_size=4",
    "data.max_documents=2",
    "data.tokenizer=bytes",
    "trainer.limit_val_batches=2",
    "trainer.max_minutes=null",
    "trainer.accelerator=cpu",
]
SENTENCES = "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the dog.\n"
TRAIN_STEPS = 60


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    """Keep ``datasets``' cache of the small corpora out of the user's home cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def write_corpus(root: Path) -> Path:
    """Two documents of repeated English sentences, ~3.5 KB each."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (root / name).write_text(SENTENCES * 40)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the training / evaluation tests: (config, TrainResult)."""
    tmp = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp / "corpus")
    cfg = load_config(
        [],
        TINY
        + [
            f"data.source={corpus}",
            f"trainer.max_steps={TRAIN_STEPS}",
            f"trainer.val_every_n_steps={TRAIN_STEPS}",
            "trainer.log_every_n_steps=1",
            "optim.lr=3e-3",
            "optim.warmup_steps=5",
            f"trainer.out_dir={tmp / 'run'}",
        ],
    )
    return cfg, train(cfg, progress=False)


def tiny_model(block_length: int, logit_shift: bool = False, vocab: int = 64, seed: int = 0) -> BlockDiffusionLM:
    """A random tiny llama with mask id ``vocab - 1``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, block_length=block_length, logit_shift=logit_shift)
    backbone = build_backbone(cfg, vocab_size=vocab, max_seq_len=32).eval()
    return BlockDiffusionLM(backbone, BlockDiffusionSpec(vocab - 1, block_length, logit_shift, 32)).eval()


# -- (a) training ------------------------------------------------------------------------------------

def test_training_loss_falls(trained):
    cfg, result = trained
    with open(result.run_dir / "logs" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == TRAIN_STEPS  # log_every_n_steps=1
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, f"train/loss did not fall: first 10 mean {first:.3f}, last 10 mean {last:.3f}"


def test_run_directory_layout(trained):
    cfg, result = trained
    run = result.run_dir
    assert result.steps == TRAIN_STEPS and result.model_dir == run / "model"
    for rel in ("config.yaml", "checkpoints/last.ckpt", "logs/metrics.csv", "model/model.safetensors",
                "model/blockdiff.json", "model/config.json", "model/tokenizer.json", "model/tokenizer_config.json",
                "model/train_config.yaml"):
        assert (run / rel).is_file(), rel
    assert not (run / "model.tmp").exists()
    # Both written configs are the resolved config and load back to it.
    for rel in ("config.yaml", "model/train_config.yaml"):
        assert to_yaml(load_config([run / rel])) == to_yaml(cfg), rel
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == TRAIN_STEPS
    assert {"val/nll", "val/ppl", "val/bpb"} <= set(result.metrics)


def test_evaluate_is_finite_seeded_and_consistent(trained):
    cfg, result = trained
    first = evaluate(result.run_dir, seed=0)
    again = evaluate(result.run_dir, seed=0)
    other = evaluate(result.run_dir, seed=1)
    assert all(math.isfinite(x) for x in (first.nll, first.ppl, first.bpb))
    assert first == again  # same seed: the very same noise, masks and (reloaded) logits
    assert other.nll != first.nll  # the seed does drive the noise
    assert first.ppl == pytest.approx(math.exp(first.nll), rel=1e-12)
    texts = [SENTENCES * 40] * 2
    num_bytes = sum(len(t.encode()) for t in texts)
    tokens_per_byte = (num_bytes + 2 * len(texts)) / num_bytes
    assert first.bpb == pytest.approx(first.nll / math.log(2) * tokens_per_byte, rel=1e-9)
    assert first.block_length == cfg.model.block_length and first.num_tokens > 0


def test_exported_model_reproduces_the_final_validation(trained):
    # train() validates the in-memory (EMA) model on limit_val_batches held-out batches with a generator
    # seeded trainer.seed + 1 (lightning_module.on_validation_epoch_start), then exports it. Evaluating the
    # exported model/ on the same batches with the same seed must give the same NELBO.
    cfg, result = trained
    reloaded = evaluate(result.run_dir, seed=cfg.trainer.seed + 1, max_batches=cfg.trainer.limit_val_batches)
    assert reloaded.nll == pytest.approx(result.metrics["val/nll"], rel=1e-5)


def test_export_and_reload_gives_identical_logits(tmp_path):
    model = tiny_model(block_length=4, vocab=260)
    tok = byte_tokenizer()
    model.spec.mask_token_id = tok.mask_token_id
    cfg = load_config([], TINY)
    export_model(model, tok, cfg, tmp_path / "model")
    loaded = load_model_dir(tmp_path / "model")
    x0 = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    xt = x0.masked_fill(torch.rand(2, 32, generator=torch.Generator().manual_seed(2)) < 0.5, tok.mask_token_id)
    with torch.no_grad():
        assert torch.equal(model(xt, x0), loaded.model(xt, x0))
    assert loaded.model.spec == model.spec
    assert to_yaml(loaded.config) == to_yaml(cfg)


# -- (c) tokenizer / model mismatch -------------------------------------------------------------------

@pytest.fixture
def mismatched_model_dir(trained, tmp_path):
    """The trained model/ with its 260-token byte tokenizer replaced by a 300-token BPE."""
    cfg, result = trained
    model_dir = tmp_path / "model"
    shutil.copytree(result.model_dir, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    texts = [SENTENCES * 40, "Quite different words, to learn some merges. " * 20]
    train_bpe(texts, vocab_size=300).save_pretrained(model_dir)
    return model_dir


def test_evaluate_refuses_a_tokenizer_of_another_vocabulary(mismatched_model_dir):
    with pytest.raises(ValueError, match="vocabulary") as info:
        evaluate(mismatched_model_dir)
    assert "300" in str(info.value) and "260" in str(info.value)


def test_cli_eval_of_a_mismatched_model_exits_2(mismatched_model_dir, capsys):
    assert main(["eval", str(mismatched_model_dir)]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "error" in out and "vocabulary" in out


# -- (b) the CLI ----------------------------------------------------------------------------------------


def test_cli_train_eval_sample_on_shakespeare(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "-c",
        str(ROOT / "configs" / "demo.yaml"),
        *TINY,
        "data.source=shakespeare",
        "data.max_documents=1",
        "trainer.max_steps=5",
        "trainer.val_every_n_steps=5",
        f"trainer.out_dir={run}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val/nll" in out and "model written to" in out
    assert (run / "model" / "model.safetensors").is_file()
    assert load_config([run / "config.yaml"]).data.source == "shakespeare"

    assert main(["eval", str(run), "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "NELBO (nats/tok)" in out and "PPL" in out and "BPB" in out

    assert main(["sample", str(run), "--prompt", "Hi", "--max-new-tokens", "8", "--sampler", "first_hitting"]) == 0
    out = capsys.readouterr().out
    # BOS + "Hi" = 3 tokens, 8 new ones, block length 4, one token per forward: the blocks [0,4) [4,8) [8,12)
    # need 1 + 4 + 3 forwards (positions past max_new_tokens stay masked and are never revealed).
    assert "NFE 8" in out
    assert "Hi" in out.split("NFE 8", 1)[0]


def test_cli_config_show_prints_loadable_yaml(tmp_path, capsys):
    long_dir = tmp_path / ("a_rather_long_directory_name_" * 4) / "run"
    assert main(["config", "show", "model.block_length=8", f"trainer.out_dir={long_dir}"]) == 0
    out = capsys.readouterr().out
    # `blockdiff config show > my.yaml` must give a loadable file: no line may be wrapped at the terminal width.
    assert f"  out_dir: {long_dir}\n" in out, f"trainer.out_dir line is wrapped:\n{out[out.find('out_dir') :][:300]}"
    shown = yaml.safe_load(out)
    assert shown["model"]["block_length"] == 8
    assert shown["trainer"]["out_dir"] == str(long_dir)


@pytest.mark.parametrize("action", ["show", "validate"])
def test_cli_config_bad_override_exits_2_naming_the_key(action, capsys):
    assert main(["config", action, "model.foo=1"]) == 2
    out = capsys.readouterr().err
    assert "model.foo" in out and "error" in out


def test_cli_config_validate_ok(capsys):
    assert main(["config", "validate", "-c", str(ROOT / "configs" / "ar_shakespeare.yaml")]) == 0
    assert "config OK" in capsys.readouterr().out


def test_cli_train_refuses_an_existing_run_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious: true\n")
    (run / "notes.txt").write_text("do not delete")
    corpus = write_corpus(tmp_path / "corpus")
    args = ["train", *TINY, f"data.source={corpus}", "trainer.max_steps=2", f"trainer.out_dir={run}"]
    assert main(args) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "not a blockdiff run" in out and "notes.txt" in out and "trainer.out_dir" in out
    assert main([*args, "--overwrite"]) == 2  # a folder holding other files is never deleted, whatever the flags
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert (run / "config.yaml").read_text() == "precious: true\n"
    assert (run / "notes.txt").read_text() == "do not delete"


def test_cli_train_with_a_missing_corpus_creates_no_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, f"data.source={tmp_path / 'missing.txt'}", "trainer.max_steps=2", f"trainer.out_dir={run}"]
    assert main(args) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert "data.source" in out and "no such file" in out
    assert not run.exists()


def test_entry_point_is_the_cli_main():
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "blockdiff"]
    assert ep.load() is main


def test_installed_console_script_runs():
    script = Path(sysconfig.get_path("scripts")) / "blockdiff"
    assert script.is_file(), f"{script} missing: is the package installed (pip install -e .)?"
    proc = subprocess.run([str(script), "config", "validate"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout


def test_python_dash_m_cli_reports_bad_override_with_status_2():
    proc = subprocess.run(
        [sys.executable, "-m", "blockdiff.cli", "config", "validate", "model.block_length=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.block_length" in proc.stderr and "Traceback" not in proc.stderr + proc.stderr


def test_init_from_starts_from_the_saved_weights_and_tokenizer(tmp_path):
    """model.init_from reuses a run's tokenizer and weights (e.g. AR -> larger block length)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    base = [
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "data.max_seq_len=32",
        "data.batch_size=4",
        "data.tokenizer=bytes",
        f"data.source={corpus}",
        "trainer.max_minutes=null",
        "trainer.limit_val_batches=1",
        "optim.ema_decay=0",
    ]
    first = tmp_path / "first"
    train(
        load_config([], base + ["trainer.max_steps=3", "trainer.val_every_n_steps=3", f"trainer.out_dir={first}"]),
        progress=False,
    )
    second = tmp_path / "second"
    cfg = load_config(
        [],
        base
        + [
            f"model.init_from={first}",
            "model.block_length=8",
            "model.hidden_size=64",
            "optim.lr=1e-12",
            "optim.weight_decay=0",
            "optim.warmup_steps=0",
            "trainer.max_steps=1",
            "trainer.val_every_n_steps=1",
            f"trainer.out_dir={second}",
        ],
    )
    train(cfg, progress=False)
    a, b = load_model_dir(first), load_model_dir(second)
    assert b.model.block_length == 8 and a.model.block_length == 4
    assert len(b.tokenizer) == len(a.tokenizer)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert pa.shape == pb.shape, name  # hidden_size=64 was ignored: the saved network is reused
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_init_from_refuses_a_longer_context_than_the_network_has(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    base = [
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "data.batch_size=4",
        "data.tokenizer=bytes",
        f"data.source={corpus}",
        "trainer.max_minutes=null",
        "trainer.limit_val_batches=1",
    ]
    first = tmp_path / "first"
    assert (
        main(
            [
                "train",
                *base,
                "data.max_seq_len=32",
                "trainer.max_steps=1",
                "trainer.val_every_n_steps=1",
                f"trainer.out_dir={first}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["train", *base, "data.max_seq_len=64", f"model.init_from={first}", f"trainer.out_dir={second}"]) == 2
    assert "data.max_seq_len=64" in capsys.readouterr().err and not second.exists()


def test_cli_config_overrides_after_a_config_file(capsys):
    """`config validate -c FILE key=value`: the trailing overrides are applied, not rejected."""
    assert (
        main(["config", "validate", "-c", str(ROOT / "configs" / "ar_shakespeare.yaml"), "model.block_length=3"]) == 2
    )
    assert "model.block_length=3" in capsys.readouterr().err
    assert main(["config", "show", "-c", str(ROOT / "configs" / "ar_shakespeare.yaml"), "data.max_seq_len=64"]) == 0
    assert "max_seq_len: 64" in capsys.readouterr().out
