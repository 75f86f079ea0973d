"""Self-distillation data (``blockdiff distill``, ``data.source=distilled:DIR``): the stored continuations are the
teacher's own, the prompts come only from the training split, a stopped run resumes to the same set, a set made
with other settings is refused, and a fine-tune trains on it.

The teacher is a tiny random Llama saved like a hub checkpoint (byte tokens + BOS/EOS/PAD, no mask token, padded
embedding rows); the corpus is a folder of small text files whose last one (the held-out tail) is recognisable.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_finetune import base_tokenizer as teacher_tokenizer  # the byte tokenizer of a released decoder
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from blockdiff.cli import main
from blockdiff.config import DataConfig
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.data.distilled import MANIFEST, SHARDS, DistilledSetError, load_distilled, read_settings
from blockdiff.errors import MissingFileError, UsageError, UserError, WouldOverwriteError
from blockdiff.modeling.pretrained import load_decoder
from blockdiff.modeling.tokenizer import ensure_special_tokens, train_bpe
from blockdiff.training import distill as distill_module
from blockdiff.training.distill import distill, generate_continuations

PROMPT, NEW = 8, 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("teacher")
    teacher_tokenizer().save_pretrained(directory)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=272, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, head_dim=16, max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
        pad_token_id=258,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, private_datasets_cache) -> Path:
    """Five small documents, then a tail document of numbers: the held-out windows are all inside the tail."""
    root = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over the lazy dog and a cat sat on the mat while it rained ".split()
    for i in range(5):
        (root / f"a{i}.txt").write_text(" ".join(words[i:] + words[:i]) * 2)
    (root / "z_tail.txt").write_text("".join(f"{i:03d}," for i in range(60)))
    return root


def data_config(corpus_dir: Path, **kw) -> DataConfig:
    return DataConfig(source=str(corpus_dir), max_seq_len=32, val_fraction=0.15, batch_size=4, **kw)


def finetune_tokenizer() -> PreTrainedTokenizerFast:
    """The teacher's tokenizer as a fine-tune on it has it: a mask token added (id 259)."""
    tokenizer = teacher_tokenizer()
    ensure_special_tokens(tokenizer)
    return tokenizer


def packed(corpus_dir: Path):
    """The corpus packed as a fine-tune on the teacher packs it."""
    return pack_documents(load_documents(data_config(corpus_dir)), finetune_tokenizer(), 32, 0.15)


def run_distill(teacher, corpus_dir, out, **kw):
    settings = dict(prompt_tokens=PROMPT, new_tokens=NEW, num_prompts=10, batch_size=2, shard_size=4)
    return distill(str(teacher), data_config(corpus_dir), out, **{**settings, **kw})


def rows_of(out) -> list[dict]:
    return load_distilled(out)[0].to_list()


# -- the stored continuations are the teacher's own -------------------------------------------------------------------


def test_stored_greedy_continuations_equal_the_teachers_own_generate(teacher, corpus_dir, tmp_path):
    result = run_distill(teacher, corpus_dir, tmp_path / "set", batch_size=3)
    model, _, _ = load_decoder(str(teacher))
    rows = rows_of(tmp_path / "set")
    assert result.rows == len(rows) == 10 and [r["prompt_index"] for r in rows] == list(range(10))
    for row in rows:
        prompt = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            own = model.generate(prompt, do_sample=False, max_new_tokens=NEW)[0, prompt.shape[1]:].tolist()
        assert row["continuation_ids"] == own and row["temperature"] == 0.0
        assert len(row["prompt_ids"]) == PROMPT


def test_ragged_prompts_are_left_padded_and_cut_after_eos(teacher):
    model, _, _ = load_decoder(str(teacher))
    prompts = [[65, 66, 67, 68, 69, 70], [71, 72], [73, 74, 75, 76]]
    with torch.no_grad():
        free = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW)[0, len(p):].tolist()
                for p in prompts]
    stop = free[0][2]  # a token the teacher really emits: treated as EOS it ends the first continuation early
    outs = generate_continuations(model, prompts, NEW, 0.0, [stop], pad_id=258)
    for p, (continuation, finished) in zip(prompts, outs):
        with torch.no_grad():
            own = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW, eos_token_id=stop)
        assert continuation == own[0, len(p):].tolist()
        assert finished == (stop in continuation) and (not finished or continuation[-1] == stop)
    assert outs[0][0] == free[0][:3] and outs[0][1]


def test_a_teachers_mask_token_is_never_generated(teacher):
    """A teacher that is a block diffuser's AR parent written out as a plain decoder has a mask token in its
    tokenizer; text holding it cannot be trained on, so distillation suppresses it (greedy and sampled)."""
    model, _, _ = load_decoder(str(teacher))
    mask, other = 259, 65
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[mask], head.bias[other] = 10.0, 5.0  # the mask token is the teacher's favourite
    model.lm_head = head
    prompts = [[65, 66, 67], [70, 71]]
    plain = generate_continuations(model, prompts, NEW, 0.0, [257], pad_id=258)
    assert all(mask in c for c, _ in plain)  # without suppression the teacher writes it
    for temperature in (0.0, 1.0):
        outs = generate_continuations(model, prompts, NEW, temperature, [257], pad_id=258, suppress=[mask])
        assert all(mask not in c and len(c) == NEW for c, _ in outs)
    assert distill_module._special_ids(model, finetune_tokenizer())[2] == [mask]
    assert distill_module._special_ids(model, teacher_tokenizer())[2] == []  # no mask token: nothing suppressed


def test_sampled_rows_are_reproducible_and_differ_from_greedy(teacher, corpus_dir, tmp_path):
    run_distill(teacher, corpus_dir, tmp_path / "a", temperatures=(0.0, 1.5))
    run_distill(teacher, corpus_dir, tmp_path / "b", temperatures=(0.0, 1.5))
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert a == b and len(a) == 20
    assert [r["temperature"] for r in a[:4]] == [0.0, 1.5, 0.0, 1.5]  # prompt by prompt, settings in order
    greedy = [r["continuation_ids"] for r in a if r["temperature"] == 0]
    sampled = [r["continuation_ids"] for r in a if r["temperature"] > 0]
    assert greedy != sampled


# -- prompts only from the training split ---------------------------------------------------------------------------


def test_prompts_come_only_from_training_windows(teacher, corpus_dir, tmp_path):
    corpus = packed(corpus_dir)
    n_train = len(corpus.train)
    result = run_distill(teacher, corpus_dir, tmp_path / "set", num_prompts=n_train, shard_size=8)
    rows = rows_of(tmp_path / "set")
    assert sorted(r["window"] for r in rows) == list(range(n_train))  # every training window once, nothing else
    held_out = [corpus.val[i]["input_ids"][:PROMPT].tolist() for i in range(len(corpus.val))]
    for row in rows:
        window = [t for t in corpus.train[row["window"]]["input_ids"].tolist() if t < 259]  # no added specials
        assert row["prompt_ids"] == window[:PROMPT]
        assert row["prompt_ids"] not in held_out
    assert result.settings.corpus["val_fraction"] == 0.15
    with pytest.raises(UsageError, match=f"--num-prompts {n_train + 1} is more than the {n_train} training windows"):
        run_distill(teacher, corpus_dir, tmp_path / "too_many", num_prompts=n_train + 1)
    assert not (tmp_path / "too_many").exists()


# -- stop and resume ----------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for the process being stopped (like KeyboardInterrupt, not an ``Exception``)."""


def test_an_interrupted_run_resumes_to_the_same_set(teacher, corpus_dir, tmp_path, monkeypatch):
    settings = dict(temperatures=(0.0, 1.0))  # 3 shards (4, 4, 2 prompts); 4 + 4 + 2 generate() calls
    run_distill(teacher, corpus_dir, tmp_path / "whole", **settings)

    real, calls, dies_at = generate_continuations, [], [6]  # the 6th call: shard 1 (the second) is half done

    def dies_in_shard_2(*args, **kwargs):
        calls.append(1)
        if len(calls) in dies_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "generate_continuations", dies_in_shard_2)
    out = tmp_path / "stopped"
    with pytest.raises(Killed):
        run_distill(teacher, corpus_dir, out, **settings)
    assert sorted(p.name for p in (out / SHARDS).iterdir()) == ["shard-00000"]  # the half shard left nothing
    with pytest.raises(DistilledSetError, match="unfinished: 1 of 3 shards"):
        load_documents(DataConfig(source=f"distilled:{out}"))
    (out / SHARDS / ".shard-00001.tmp-123").mkdir()  # as if killed while saving: never read, cleared on resume

    calls.clear()
    dies_at.clear()
    result = run_distill(teacher, corpus_dir, out, **settings)
    assert len(calls) == 6 and result.shards_skipped == 1 and result.shards_written == 2  # shard 0 not redone
    assert rows_of(out) == rows_of(tmp_path / "whole")
    assert sorted(p.name for p in (out / SHARDS).iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]

    calls.clear()
    again = run_distill(teacher, corpus_dir, out, **settings)
    assert again.shards_written == 0 and not calls  # complete: nothing to do


def test_a_run_that_fails_before_its_first_shard_leaves_nothing(teacher, corpus_dir, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(distill_module, "generate_continuations", fails)
    with pytest.raises(RuntimeError):
        run_distill(teacher, corpus_dir, tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_a_set_made_with_other_settings_is_refused_then_replaced_with_overwrite(teacher, corpus_dir, tmp_path):
    out = tmp_path / "set"
    run_distill(teacher, corpus_dir, out)
    with pytest.raises(DistilledSetError, match=r"--new-tokens: the set has 6, this command asks for 5") as err:
        run_distill(teacher, corpus_dir, out, new_tokens=5)
    assert "--overwrite" in str(err.value)
    with pytest.raises(DistilledSetError, match=r"data.val_fraction: the set has 0.15, this command asks for 0.2"):
        distill(str(teacher), DataConfig(source=str(corpus_dir), max_seq_len=32, val_fraction=0.2), out,
                prompt_tokens=PROMPT, new_tokens=NEW, num_prompts=10, batch_size=2, shard_size=4)
    with pytest.raises(DistilledSetError, match=r"--temperature: the set has \[0.0\], this command asks for \[0.0, 0"):
        run_distill(teacher, corpus_dir, out, temperatures=(0.0, 0.7))
    assert read_settings(out).new_tokens == NEW  # untouched
    stored = read_settings(out)
    moved = replace(stored, tokenizer={**stored.tokenizer, "name": "/elsewhere"})
    assert moved.differences(stored) == []  # the same token table read from another place is the same tokenizer
    other = replace(stored, tokenizer={**stored.tokenizer, "sha256": "0" * 64})
    assert [d.split(":")[0] for d in other.differences(stored)] == ["the teacher's tokenizer"]
    run_distill(teacher, corpus_dir, out, new_tokens=5, overwrite=True)
    assert read_settings(out).new_tokens == 5
    assert all(len(r["continuation_ids"]) <= 5 for r in rows_of(out))


def test_a_folder_that_is_not_a_distilled_set_is_never_deleted(teacher, corpus_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(WouldOverwriteError, match="not a distilled set .*notes.txt.*nothing was deleted"):
            run_distill(teacher, corpus_dir, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "my notes"
    (out / "notes.txt").unlink()
    (out / SHARDS).mkdir()  # our layout without a manifest is not ours either
    with pytest.raises(WouldOverwriteError, match=f"no {MANIFEST}"):
        run_distill(teacher, corpus_dir, out, overwrite=True)


# -- training on it -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled_set(teacher, corpus_dir, tmp_path_factory) -> Path:
    """A set made through the CLI: every training window of the corpus, greedy and at temperature 1."""
    out = tmp_path_factory.mktemp("cli") / "set"
    n_train = len(packed(corpus_dir).train)
    argv = ["distill", "--teacher", str(teacher), f"data.source={corpus_dir}", "data.max_seq_len=32",
            "data.val_fraction=0.15", "--out", str(out), "--num-prompts", str(n_train), "--prompt-tokens", str(PROMPT),
            "--new-tokens", "16", "--temperature", "0", "--temperature", "1", "--batch-size", "4"]
    assert main(argv) == 0
    return out


def test_distilled_documents_are_prompt_plus_continuation_framed_like_text(distilled_set):
    rows, settings = load_distilled(distilled_set)
    assert settings.temperatures == (0.0, 1.0) and settings.tokenizer["vocab_size"] == 259
    docs = load_documents(DataConfig(source=f"distilled:{distilled_set}"))
    assert docs["input_ids"][3] == rows[3]["prompt_ids"] + rows[3]["continuation_ids"]
    tokenizer = finetune_tokenizer()
    corpus = pack_documents(docs, tokenizer, 32, 0.15)
    stream = [t for i in range(len(corpus.train)) for t in corpus.train[i]["input_ids"].tolist()]
    first = rows[0]["prompt_ids"] + rows[0]["continuation_ids"]
    assert stream[: len(first) + 1] == [256, *first]  # BOS + prompt + continuation (+ EOS unless it ended with one)
    expected_next = len(first) + 1 + (0 if first[-1] == 257 else 1)
    assert stream[expected_next - 1] == 257 and stream[expected_next] == 256


def test_a_different_tokenizer_is_refused(distilled_set):
    docs = load_documents(DataConfig(source=f"distilled:{distilled_set}"))
    bpe = train_bpe(docs["text"], 300)
    with pytest.raises(DistilledSetError, match="teacher's tokenizer .*259 tokens.*blockdiff finetune --base"):
        pack_documents(docs, bpe, 32, 0.15)


def test_finetune_on_a_distilled_set_runs_end_to_end(teacher, distilled_set, tmp_path, capsys):
    run = tmp_path / "run"
    code = main([
        "finetune", "--base", str(teacher), f"data.source=distilled:{distilled_set}", "data.max_seq_len=32",
        "data.batch_size=4", "data.val_fraction=0.15", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
        "trainer.limit_val_batches=1", "trainer.max_minutes=null", "trainer.accelerator=cpu", "optim.warmup_steps=1",
        f"trainer.out_dir={run}",
    ])
    assert code == 0, capsys.readouterr().err
    assert (run / "model" / "blockdiff.json").is_file()
    assert main(["eval", str(run), "--max-batches", "1"]) == 0  # its held-out split is re-made from the set
    assert "NELBO" in capsys.readouterr().out


def test_train_from_scratch_with_its_own_bpe_on_a_distilled_set_is_refused(distilled_set, tmp_path, capsys):
    code = main([
        "train", f"data.source=distilled:{distilled_set}", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
        "data.max_seq_len=32", "data.batch_size=4", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "trainer.max_steps=1", "trainer.accelerator=cpu", f"trainer.out_dir={tmp_path / 'run'}",
    ])
    err = capsys.readouterr().err
    assert code == 2 and "teacher's tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# -- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"num_prompts": 0}, "--num-prompts must be an integer >= 1"),
        ({"new_tokens": 0}, "--new-tokens must be an integer >= 1"),
        ({"batch_size": -1}, "--batch-size must be an integer >= 1"),
        ({"temperatures": (-1.0,)}, "--temperature must be a finite number >= 0"),
        ({"temperatures": (float("nan"),)}, "--temperature must be a finite number >= 0"),
        ({"temperatures": (0.0, 0.0)}, "--temperature values must differ"),
        ({"temperatures": ()}, "at least one --temperature"),
        ({"prompt_tokens": 33}, r"--prompt-tokens 33 is longer than the corpus windows .*data.max_seq_len=32"),
        ({"prompt_tokens": 30, "new_tokens": 40}, "exceeds the 64 positions of --teacher"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(teacher, corpus_dir, tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        run_distill(teacher, corpus_dir, tmp_path / "set", **kw)
    assert not (tmp_path / "set").exists()


def test_bad_sources_and_teachers_say_what_to_do(teacher, corpus_dir, tmp_path, capsys):
    from conftest import write_tiny_model_dir

    with pytest.raises(MissingFileError, match="does not exist; make it with `blockdiff distill"):
        load_documents(DataConfig(source=f"distilled:{tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="not a distilled set"):
        load_documents(DataConfig(source=f"distilled:{tmp_path / 'empty'}"))
    with pytest.raises(DistilledSetError, match="names no directory"):
        load_documents(DataConfig(source="distilled:"))
    blockdiff_model = write_tiny_model_dir(tmp_path / "bd")
    with pytest.raises(UsageError, match="is a blockdiff model .*not an autoregressive decoder"):
        distill(str(blockdiff_model), data_config(corpus_dir), tmp_path / "set")
    with pytest.raises(UsageError, match="is a distilled set; distil from a text corpus"):
        distill(str(teacher), DataConfig(source=f"distilled:{tmp_path}", max_seq_len=32), tmp_path / "set")
    assert main(["distill", "--teacher", str(tmp_path / "no_model"), f"data.source={corpus_dir}",
                 "--out", str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --teacher ") and "no such file or directory" in err and "Traceback" not in err
    assert not (tmp_path / "set").exists()
    assert issubclass(DistilledSetError, UserError)


def test_ctrl_c_in_distill_says_the_command_that_resumes(teacher, corpus_dir, tmp_path, capsys, monkeypatch):
    # issue 20 item 13: SIGINT printed only "interrupted"
    real, calls = generate_continuations, []

    def interrupted_in_shard_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "generate_continuations", interrupted_in_shard_2)
    out = tmp_path / "set"
    argv = ["distill", "--teacher", str(teacher), f"data.source={corpus_dir}", "data.max_seq_len=32",
            "data.val_fraction=0.15", "--out", str(out), "--num-prompts", "8", "--prompt-tokens", str(PROMPT),
            "--new-tokens", str(NEW), "--batch-size", "2", "--shard-size", "4"]
    assert main([*argv, "--overwrite"]) == 130
    printed = " ".join(capsys.readouterr().out.split())
    command = "blockdiff " + " ".join(argv)
    assert f"resume with the same command: `{command}`" in printed and "--overwrite" not in printed
    monkeypatch.setattr(distill_module, "generate_continuations", real)
    assert main(argv) == 0  # the printed command resumes it
    assert len(rows_of(out)) == 8
