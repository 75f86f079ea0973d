"""Model directories, generation settings and diagnostics a new user (or an attacker) runs into (issue 15).

What is checked here (CPU, tiny models: hidden 32, 2 layers, byte tokenizer or vocab 64):

7. An export is a ``blockdiff`` model type: plain transformers (no ``import blockdiff``, in a subprocess) refuses
   it instead of running it autoregressively; after ``import blockdiff`` the Auto classes give the block
   diffuser with the same logits; directories of the older layout (``config.json`` of the decoder's own type)
   still load; ``load_decoder`` of a blockdiff directory still gives the plain decoder.
8. ``generate`` honours transformers' ``do_sample=False``, ``max_length``, ``num_return_sequences``,
   ``stop_strings`` (with ``tokenizer=``) and ``min_new_tokens``, and refuses the others by name.
9. A single string is one prompt; ``blockdiff.json`` whose block length does not divide the context is
   refused; ``eval RUN model.block_length=N`` evaluates at N; ``eval --json`` alone writes the NELBO record.
10. One-line errors (exit 2, nothing written) for damaged weights, configs inconsistent with the weights or of
   an unsupported type, unknown / missing ``blockdiff.json`` keys, non-finite floats, ``--max-new-tokens`` past
   int64, ``eval --block-length 0`` and a truncated GGUF; ``max_new_tokens = 2**63 - 1`` ends at EOS.
12. JSON / UTF-8 errors name the file; the long-prompt error says what actually works.
13. Per-sample NFE; the live view keeps the prompt; weights get the umask's permissions; ``--device``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_tokens, tiny_model, train_tiny_cli_run
from rich.console import Console

from blockdiff.cli import main
from blockdiff.config import ModelConfig
from blockdiff.errors import UsageError, UserError
from blockdiff.evaluation.nelbo import evaluate
from blockdiff.modeling.device import resolve_device
from blockdiff.modeling.io import load_model_dir
from blockdiff.modeling.model import BlockDiffusionConfig, BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.modeling.tokenizer import byte_tokenizer
from blockdiff.sampling import sample_texts
from blockdiff.training.builders import build_backbone
from blockdiff.viewer.watch import LiveView


def sharp(model: BlockDiffusionLM) -> BlockDiffusionLM:
    """Scale the weights up 20x: peaked, varied predictions (greedy output uses many different tokens)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return model


def byte_model(block_length: int = 4, max_seq_len: int = 32, seed: int = 0) -> tuple[BlockDiffusionLM, object]:
    """A sharp tiny llama on the byte tokenizer (vocab 260) and the tokenizer."""
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, block_length=block_length)
    backbone = build_backbone(cfg, len(tok), max_seq_len, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).eval()
    model = BlockDiffusionLM(backbone, BlockDiffusionSpec(tok.mask_token_id, block_length, False, max_seq_len))
    return sharp(model).eval(), tok


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A saved byte-tokenizer model directory (no training config)."""
    model, tok = byte_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained for 3 steps through ``blockdiff train`` (context 32, block length 4)."""
    return train_tiny_cli_run(tmp_path_factory.mktemp("io_run"))


def exits_2(args: list[str], capsys, *needles: str) -> str:
    """Run the CLI; it must exit 2 with one plain ``error:`` line on stderr naming every needle."""
    rc = main(args)
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert rc == 2, f"exit {rc}; stderr: {err}; stdout: {captured.out[-500:]}"
    assert err.startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def damaged_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(model_dir, copy)
    return copy


def sample_args(directory: Path, *extra: str) -> list[str]:
    return ["sample", str(directory), "--prompt", "ab", "--max-new-tokens", "4", *extra]


def with_alarm(seconds: int, fn):
    """Run ``fn`` with a harness timeout (SIGALRM): a hang fails the test instead of blocking the suite."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- 7. an export is a blockdiff model type -------------------------------------------------------------------

PLAIN_TRANSFORMERS = r"""
import sys
from transformers import AutoModelForCausalLM, pipeline
for load in (lambda: AutoModelForCausalLM.from_pretrained(sys.argv[1]),
             lambda: pipeline("text-generation", model=sys.argv[1])):
    try:
        load()
    except ValueError as err:
        print("REFUSED:", " ".join(str(err).split())[:300])
    else:
        print("LOADED")
print("IMPORTED BLOCKDIFF" if any(m.startswith("blockdiff") for m in sys.modules) else "CLEAN")
"""


def test_plain_transformers_refuses_an_export_instead_of_decoding_it_autoregressively(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(model_dir)], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    lines = out.stdout.splitlines()
    assert lines[-1] == "CLEAN", out.stdout + out.stderr
    assert len(lines) == 3 and all(line.startswith("REFUSED:") and "`blockdiff`" in line for line in lines[:2]), (
        out.stdout + out.stderr
    )


def test_after_import_blockdiff_the_auto_class_gives_the_block_diffuser_with_identical_logits(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, BlockDiffusionConfig) and config.text_config.model_type == "llama"
    auto = AutoModelForCausalLM.from_pretrained(model_dir)
    direct = BlockDiffusionLM.from_pretrained(model_dir)
    assert isinstance(auto, BlockDiffusionLM) and auto.spec == direct.spec
    x0 = random_tokens(2, 32, seed=3) % 250
    xt = x0.masked_fill(torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)) < 0.5, direct.mask_token_id)
    with torch.no_grad():
        assert torch.equal(auto.eval()(xt, x0), direct.eval()(xt, x0))
    greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(auto.generate([[1, 2, 3]], **greedy).sequences, direct.generate([[1, 2, 3]], **greedy).sequences)


def test_a_directory_of_the_old_layout_still_loads(model_dir):
    # Written before the blockdiff model type: config.json is the decoder's own (model_type llama).
    new = BlockDiffusionLM.from_pretrained(model_dir)
    new.backbone.config.to_json_file(model_dir / "config.json")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    old = load_model_dir(model_dir).model
    x0 = random_tokens(1, 32, seed=1) % 250
    xt = x0.clone()
    xt[:, 20:] = old.mask_token_id
    with torch.no_grad():
        assert torch.equal(old(xt, x0), new.eval()(xt, x0))


def test_save_pretrained_writes_safetensors_and_a_blockdiff_config(model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "blockdiff" and config["text_config"]["model_type"] == "llama"
    assert json.loads((model_dir / "blockdiff.json").read_text())["block_length"] == 4


def test_load_decoder_of_a_blockdiff_directory_gives_the_plain_decoder(model_dir):
    from transformers import PreTrainedModel

    from blockdiff.modeling.pretrained import load_decoder

    backbone, tokenizer, _ = load_decoder(str(model_dir))
    assert isinstance(backbone, PreTrainedModel) and not isinstance(backbone, BlockDiffusionLM)
    reference = BlockDiffusionLM.from_pretrained(model_dir).backbone.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in backbone.state_dict().items())
    assert len(tokenizer) == backbone.get_input_embeddings().num_embeddings


# -- 8. transformers' generate settings -----------------------------------------------------------------------

def test_do_sample_false_is_greedy_whatever_the_seed():
    model = sharp(tiny_model(4, max_seq_len=64))
    prompts = [[1, 2, 3], [4, 5]]
    common = dict(max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    greedy = model.generate(prompts, temperature=0, **common).sequences
    for seed in range(3):
        out = model.generate(prompts, do_sample=False, generator=torch.Generator().manual_seed(seed), **common)
        assert torch.equal(out.sequences, greedy), f"seed {seed}"
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    sampled = [model.generate(prompts, generator=g, **common).sequences for g in generators]
    assert not torch.equal(sampled[0], sampled[1])  # do_sample=True (the default) still samples


def test_max_length_counts_prompt_plus_new_tokens_as_in_transformers():
    model = tiny_model(4, max_seq_len=64)
    common = dict(eos_token_id=None, pad_token_id=0, do_sample=False)
    assert model.generate([[1, 2, 3]], max_length=10, **common).lengths.tolist() == [7]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 11, 12]])  # left padding: the padded width counts
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    assert model.generate(ids, attention_mask=mask, max_length=10, **common).lengths.tolist() == [4, 4]
    assert model.generate([[1, 2, 3]], max_length=10, max_new_tokens=5, **common).lengths.tolist() == [5]  # wins
    with pytest.raises(UsageError, match="max_length"):
        model.generate([[1, 2, 3]], max_length=3, **common)


def test_num_return_sequences_gives_several_sequences_per_prompt_in_transformers_order():
    model = sharp(tiny_model(4, max_seq_len=64))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    common = dict(max_new_tokens=9, eos_token_id=None, pad_token_id=0)
    seeds = [10, 11, 12, 20, 21, 22]
    out = model.generate(
        prompts, num_return_sequences=3, generator=[torch.Generator().manual_seed(s) for s in seeds], **common
    )
    assert out.sequences.shape[0] == 6 and out.prompt_lengths.tolist() == [3, 3, 3, 5, 5, 5]
    for row, seed in enumerate(seeds):
        alone = model.generate([prompts[row // 3]], generator=[torch.Generator().manual_seed(seed)], **common)
        assert out.new_tokens(row) == alone.new_tokens(0)
    assert len({tuple(out.new_tokens(r)) for r in range(3)}) > 1  # sampled copies differ
    with pytest.raises(UsageError, match="one per prompt"):
        model.generate(prompts, num_return_sequences=3, generator=[torch.Generator(), torch.Generator()], **common)


def test_stop_strings_cut_the_text_after_the_stop_string_and_stop_that_sample():
    model, tok = byte_model(max_seq_len=64)
    common = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    prompt = [[tok.bos_token_id, *tok("ROMEO.")["input_ids"]]]
    full = tok.decode(model.generate(prompt, **common).new_tokens(0))
    stop = full[9:11]  # two characters from the middle of the greedy continuation
    out = model.generate(prompt, stop_strings=[stop], tokenizer=tok, **common)
    text = tok.decode(out.new_tokens(0))
    assert text == full[: full.index(stop) + len(stop)] and out.stop_reasons == ["stop_string"]
    texts, _ = sample_texts(model, tok, "ROMEO.", stop_strings=stop, **common)  # sample_texts passes the tokenizer
    assert texts == [text]
    with pytest.raises(UsageError, match="tokenizer"):
        model.generate(prompt, stop_strings=[stop], **common)


def test_min_new_tokens_suppresses_eos_until_reached():
    model = sharp(tiny_model(4, max_seq_len=64))
    common = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    free = model.generate([[1, 2, 3]], eos_token_id=None, **common).new_tokens(0)
    eos = free[2]  # greedy writes this token as new token 2: make it the EOS
    assert model.generate([[1, 2, 3]], eos_token_id=eos, **common).lengths.tolist() == [free.index(eos) + 1]
    out = model.generate([[1, 2, 3]], eos_token_id=eos, min_new_tokens=10, **common)
    assert eos not in out.new_tokens(0)[:10] and int(out.lengths[0]) >= 10


@pytest.mark.parametrize(
    "setting",
    [
        dict(num_beams=2),
        dict(repetition_penalty=1.3),
        dict(no_repeat_ngram_size=2),
        dict(min_length=5),
        dict(output_scores=True),
        dict(top_k=None, typical_p=0.5),
    ],
    ids=lambda d: next(k for k in d if k != "top_k"),
)
def test_transformers_settings_that_are_not_implemented_are_refused_by_name(setting):
    model = tiny_model(4, max_seq_len=64)
    name = next(k for k in setting if k != "top_k")
    with pytest.raises(UsageError, match=name):
        model.generate([[1, 2, 3]], max_new_tokens=4, **setting)


def test_transformers_defaults_of_unimplemented_settings_are_accepted():
    model = tiny_model(4, max_seq_len=64)
    out = model.generate(
        [[1, 2, 3]], max_new_tokens=4, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=None
    )
    assert out.lengths.tolist() == [4]


# -- 9. prompts, block lengths, eval overrides and --json -----------------------------------------------------


def test_sample_texts_takes_a_single_string_as_one_prompt():
    model, tok = byte_model()
    texts, out = sample_texts(model, tok, "ROMEO.", max_new_tokens=5, do_sample=False)
    assert len(texts) == 1 and out.prompt_lengths.tolist() == [7]  # BOS + 6 bytes, not six one-letter prompts


def test_a_block_length_that_does_not_divide_the_context_is_refused_naming_the_file(model_dir, capsys):
    spec = json.loads((model_dir / "blockdiff.json").read_text())
    (model_dir / "blockdiff.json").write_text(json.dumps({**spec, "block_length": 5}))
    with pytest.raises(UsageError, match=r"blockdiff\.json.*block_length=5 must divide max_seq_len=32"):
        BlockDiffusionLM.from_pretrained(model_dir)
    exits_2(sample_args(model_dir), capsys, "blockdiff.json", "block_length=5")


def test_eval_model_block_length_override_evaluates_at_that_block_length(run_dir):
    by_override = evaluate(run_dir, ["model.block_length=2"], max_batches=1)
    by_flag = evaluate(run_dir, [], max_batches=1, block_length=2)
    assert by_override.block_length == 2 and by_override.nll == by_flag.nll
    assert evaluate(run_dir, [], max_batches=1).nll != by_flag.nll


def test_eval_refuses_model_overrides_a_trained_network_cannot_take(run_dir, capsys):
    exits_2(["eval", str(run_dir), "model.hidden_size=64", "--max-batches", "1"], capsys, "model.hidden_size")
    exits_2(
        ["eval", str(run_dir), "model.block_length=2", "--block-length", "4", "--max-batches", "1"],
        capsys,
        "block length once",
    )


def test_eval_json_without_comparisons_writes_the_nelbo_record(run_dir, tmp_path, capsys):
    out = tmp_path / "nelbo.json"
    assert main(["eval", str(run_dir), "--max-batches", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["block_length"] == 4 and record["tokens"] > 0
    assert abs(record["nelbo_ppl"] - torch.tensor(record["nelbo_nll"]).exp().item()) < 1e-3 * record["nelbo_ppl"]


# -- 10. one-line errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "header-only", "garbage", "missing"])
def test_damaged_weights_are_a_one_line_error_naming_the_file(model_dir, tmp_path, capsys, damage):
    directory = damaged_copy(model_dir, tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    content = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "header-only": data[:8],
        "garbage": b"\x00" * 999,
        "missing": None,
    }[damage]
    weights.unlink()
    if content is not None:
        weights.write_bytes(content)
    exits_2(sample_args(directory), capsys, "model.safetensors")


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(num_hidden_layers=3), "not in the file"),
        (dict(num_hidden_layers=1), "no place"),
        (dict(hidden_size=64, head_dim=32), "another shape"),
        (dict(vocab_size=300), "another shape"),
        (dict(model_type="nope"), "'nope'"),
        (dict(model_type="t5"), "not a causal decoder"),
        (dict(hidden_size="wide"), "hidden_size"),
    ],
    ids=["more-layers", "fewer-layers", "hidden", "vocab", "unknown-type", "not-a-decoder", "bad-value"],
)
@pytest.mark.parametrize("layout", ["blockdiff", "old"])
def test_a_config_inconsistent_with_the_weights_or_of_another_type_is_refused(
    model_dir, tmp_path, capsys, change, needle, layout
):
    directory = damaged_copy(model_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    decoder = config["text_config"] if layout == "blockdiff" else {**config["text_config"]}
    decoder.update(change)
    (directory / "config.json").write_text(json.dumps(config if layout == "blockdiff" else decoder))
    exits_2(sample_args(directory), capsys, "config.json", needle)


def test_a_top_level_model_type_of_another_model_is_a_one_line_error(model_dir, tmp_path, capsys):
    # issue 20 item 10: "model_type": "bert" over the decoder's text_config gave AttributeError ... 'to_dict'
    directory = damaged_copy(model_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    exits_2(sample_args(directory), capsys, "config.json", "'bert' is not a block diffusion model")


def test_blockdiff_json_keys_unknown_or_missing(model_dir, tmp_path, capsys):
    spec = json.loads((model_dir / "blockdiff.json").read_text())
    directory = damaged_copy(model_dir, tmp_path)
    # A key this version does not know (a newer blockdiff, or a typo) is refused: it might change the meaning.
    (directory / "blockdiff.json").write_text(json.dumps({**spec, "token_causal_clean_stream": True}))
    exits_2(sample_args(directory), capsys, "blockdiff.json", "token_causal_clean_stream", "newer blockdiff")
    # A required key missing is refused; an optional one takes its default.
    (directory / "blockdiff.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "mask_token_id"}))
    exits_2(sample_args(directory), capsys, "blockdiff.json", "mask_token_id")
    (directory / "blockdiff.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "schedule"}))
    assert BlockDiffusionLM.from_pretrained(directory).spec.schedule == "loglinear"
    (directory / "blockdiff.json").write_text(json.dumps({**spec, "mask_token_id": 999}))
    exits_2(sample_args(directory), capsys, "blockdiff.json", "mask_token_id=999")


@pytest.mark.parametrize(
    "flag, value, key",
    [
        ("--temperature", "nan", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--tau", "nan", "tau"),
        ("--top-p", "nan", "top_p"),
        ("--top-p", "-inf", "top_p"),
        ("--max-new-tokens", str(2**64), "max_new_tokens"),
        ("--max-new-tokens", str(2**63), "max_new_tokens"),
    ],
)
def test_non_finite_floats_and_huge_max_new_tokens_are_refused(model_dir, tmp_path, capsys, flag, value, key):
    trace = tmp_path / "trace.jsonl"
    exits_2(["sample", str(model_dir), "--prompt", "a", f"{flag}={value}", "--trace", str(trace)], capsys, key)
    assert not trace.exists() and not trace.with_name(trace.name + ".partial").exists()


def test_nan_entropy_bound_is_refused():
    model = tiny_model(4, max_seq_len=64)
    with pytest.raises(UsageError, match="entropy_bound"):
        model.generate([[1, 2]], sampler="entropy_bound", entropy_bound=float("nan"), max_new_tokens=4)


def test_the_largest_max_new_tokens_means_until_eos_and_terminates():
    model = sharp(tiny_model(4, max_seq_len=32))
    common = dict(do_sample=False, pad_token_id=0)
    free = model.generate([[1, 2, 3]], max_new_tokens=20, eos_token_id=None, **common).new_tokens(0)
    eos = free[5]
    out = with_alarm(120, lambda: model.generate([[1, 2, 3]], max_new_tokens=2**63 - 1, eos_token_id=eos, **common))
    assert out.new_tokens(0) == free[: free.index(eos) + 1] and out.stop_reasons == ["eos"]


def test_eval_block_length_zero_is_a_one_line_error(run_dir, capsys):
    exits_2(["eval", str(run_dir), "--block-length", "0", "--max-batches", "1"], capsys, "--block-length")


@pytest.mark.parametrize(
    "content",
    [b"GGUF\x03\x00", b"GGUF\x03\x00\x00\x00" + b"\x05" + b"\x00" * 15, b"PK\x03\x04zip"],
    ids=["truncated-version", "truncated-counts", "not-gguf"],
)
def test_a_truncated_gguf_is_a_clear_error_naming_the_file(tmp_path, content):
    from blockdiff.modeling.pretrained import load_decoder, load_pretrained

    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    for load in (load_decoder, load_pretrained):
        with pytest.raises(UserError, match=r"model\.gguf is not a (readable )?GGUF file"):
            load(str(path))


def test_a_gguf_truncated_after_its_header_is_a_clear_error_naming_the_file(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from blockdiff.modeling.pretrained import load_decoder

    writer = GGUFWriter(str(tmp_path / "whole.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 40])  # the tensor data is cut short
    with pytest.raises(UsageError, match=r"cut\.gguf is not a readable GGUF file.*truncated"):
        load_decoder(str(tmp_path / "cut.gguf"))


# -- 12. diagnostics name the file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("blockdiff.json", b'{"mask_token_id": 259,'),
        ("config.json", b"\xff\xfe{}"),
        ("blockdiff_generation_config.json", b"{not json"),
        ("tokenizer.json", b""),
        ("tokenizer_config.json", b"\xc3\x28"),
        ("blockdiff.json", b"[1, 2]"),
    ],
    ids=[
        "spec-truncated",
        "config-not-utf8",
        "generation-config",
        "tokenizer-empty",
        "tokenizer-config-not-utf8",
        "spec-not-an-object",
    ],
)
def test_json_and_utf8_errors_name_the_file(model_dir, tmp_path, capsys, name, content):
    directory = damaged_copy(model_dir, tmp_path)
    (directory / name).write_bytes(content)
    exits_2(sample_args(directory), capsys, name)


def test_a_bad_value_in_the_saved_generation_config_names_the_file(model_dir, capsys):
    path = model_dir / "blockdiff_generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tau": 7}))
    exits_2(sample_args(model_dir), capsys, "blockdiff_generation_config.json", "tau")


def test_the_long_prompt_error_says_what_works():
    model = tiny_model(4, max_seq_len=32)  # the network has 32 positions: no window above 32
    common = dict(max_new_tokens=4, eos_token_id=None)
    with pytest.raises(UsageError) as err:
        model.generate([random_tokens(1, 40)[0].tolist()], **common)
    assert "at most 28 tokens" in str(err.value) and "window=" not in str(err.value)
    with pytest.raises(UsageError, match="window=24") as err:  # window 16 is too small, but 24 fits and is allowed
        model.generate([random_tokens(1, 20)[0].tolist()], window=16, **common)
    model.generate([random_tokens(1, 20)[0].tolist()], window=24, **common)


# -- 13. counting, the live view, permissions, devices ---------------------------------------------------------


def test_nfe_per_sample_is_what_each_sample_costs_alone():
    model = sharp(tiny_model(4, max_seq_len=64))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    common = dict(max_new_tokens=13, do_sample=False, eos_token_id=None, pad_token_id=0, tau=0.3)
    batch = model.generate(prompts, **common)
    alone = [model.generate([p], **common) for p in prompts]
    assert batch.sample_nfe.tolist() == [a.nfe for a in alone]
    assert batch.sample_tokens_per_forward == pytest.approx(
        sum(a.lengths.sum().item() for a in alone) / sum(a.nfe for a in alone)
    )
    assert batch.tokens_per_forward > batch.sample_tokens_per_forward  # the batch figure sums over samples


def test_cli_sample_reports_nfe_per_sample(model_dir, capsys):
    assert main(["sample", str(model_dir), "--prompt", "a", "--prompt", "bc", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "per sample" in out and "batched forwards" in out


def test_the_live_view_shows_the_prompt_of_earlier_blocks():
    model, tok = byte_model()
    ids = [[tok.bos_token_id, *tok("ROMEO.")["input_ids"]], [tok.bos_token_id, *tok("A")["input_ids"]]]
    frames = []
    view = LiveView(tok, model.mask_token_id, Console(file=io.StringIO()), prompts=ids)

    def watch(event):
        view(event)
        frames.append(view.text(0))

    with view:
        out = model.generate(ids, observer=watch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert all(frame.startswith("ROMEO.") for frame in frames), frames[:3]
    assert view.tokens(0) == ids[0] + out.new_tokens(0)
    assert view.tokens(1)[:2] == ids[1]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_weights_get_the_permissions_of_the_umask_like_every_other_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        tiny_model(4).save_pretrained(tmp_path / "m")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_resolve_device():
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError, match="--device nope"):
        resolve_device("nope")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


def test_cli_device_flag(model_dir, run_dir, capsys):
    assert main(sample_args(model_dir, "--device", "cpu")) == 0
    assert main(sample_args(model_dir, "--device", "auto")) == 0
    capsys.readouterr()
    exits_2(sample_args(model_dir, "--device", "tpu9"), capsys, "--device tpu9")
    if not torch.cuda.is_available():
        exits_2(sample_args(model_dir, "--device", "cuda"), capsys, "no CUDA device")
        exits_2(["eval", str(run_dir), "--max-batches", "1", "--device", "cuda"], capsys, "no CUDA device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_and_eval_on_cuda(model_dir, run_dir, capsys):
    assert main(sample_args(model_dir, "--device", "cuda")) == 0
    assert main(["eval", str(run_dir), "--max-batches", "1", "--device", "cuda"]) == 0
    cpu = evaluate(run_dir, [], max_batches=1)
    cuda = evaluate(run_dir, [], max_batches=1, device="cuda")
    assert cuda.num_tokens == cpu.num_tokens and abs(cuda.nll - cpu.nll) < 0.05 * cpu.nll  # other RNG stream
