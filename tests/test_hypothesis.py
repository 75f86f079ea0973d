"""Hostile inputs: property-based tests (hypothesis) over the public entry points that take user data.

Each entry point must either give a correct result or raise a clear error (``ValueError`` /
``ConfigError``, whose message says what was wrong); any other exception is an internal crash and fails
the test. Every test is bounded: ``max_examples`` examples, each under a generous ``deadline``.

Entry points: ``load_config`` (overrides and YAML files with wrong types), ``encode_prompts`` /
``sample_texts`` (unusual Unicode, control characters, empty and huge prompts), ``BlockDiffusionLM.generate``
(ragged, empty and out-of-vocabulary token ids, odd tensor shapes) and ``block_diffusion_loss`` (odd
lengths, out-of-range ids, wrong dtypes and shapes).
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdiff.config import ConfigError, ModelConfig, describe_keys, load_config
from blockdiff.core.loss import block_diffusion_loss
from blockdiff.core.noise import make_schedule
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.modeling.tokenizer import byte_tokenizer
from blockdiff.sampling import encode_prompts, sample_texts
from blockdiff.training.builders import build_backbone

BOUNDED = settings(
    max_examples=60, deadline=timedelta(seconds=10), derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = [key for key, _, _ in describe_keys()]
CONTEXT = 32

_TOKENIZER = byte_tokenizer()
_MODEL: BlockDiffusionLM | None = None


def text_model() -> BlockDiffusionLM:
    """A tiny random model over the 260-token byte vocabulary (built once)."""
    global _MODEL
    if _MODEL is None:
        torch.manual_seed(0)
        cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, block_length=4)
        backbone = build_backbone(cfg, vocab_size=len(_TOKENIZER), max_seq_len=CONTEXT,
                                  eos_token_id=_TOKENIZER.eos_token_id, pad_token_id=_TOKENIZER.pad_token_id).eval()
        _MODEL = BlockDiffusionLM(backbone, BlockDiffusionSpec(_TOKENIZER.mask_token_id, 4, False, CONTEXT))
    return _MODEL


# -- configs ------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3),
)


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["model.nope", "nosection.x", "model"]), scalars), max_size=3))
def test_load_config_overrides_give_a_config_or_a_config_error(pairs):
    overrides = [f"{key}={_yaml_value(value)}" for key, value in pairs]
    try:
        cfg = load_config([], overrides)
    except ConfigError as err:
        assert str(err)
        return
    assert cfg.data.max_seq_len % cfg.model.block_length == 0  # a returned config is a valid one


@BOUNDED
@given(st.text(max_size=200))
def test_load_config_from_any_yaml_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config([path])
    except ConfigError as err:
        assert str(err)


@BOUNDED
@given(st.text(max_size=30))
def test_load_config_malformed_override_strings(override):
    try:
        load_config([], [override])
    except ConfigError as err:
        assert str(err)


# -- text in, text out ----------------------------------------------------------------------------------

unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),  # anything encodable: controls, RTL, emoji, NUL
    max_size=40,
)


@BOUNDED
@given(st.lists(unicode_text, max_size=3))
def test_encode_prompts_gives_bos_plus_the_utf8_bytes(prompts):
    try:
        ids = encode_prompts(_TOKENIZER, prompts)
    except ValueError as err:
        assert not prompts and "prompt" in str(err)
        return
    assert len(ids) == len(prompts)
    for prompt, row in zip(prompts, ids):
        assert row[0] == _TOKENIZER.bos_token_id
        assert _TOKENIZER.decode(row[1:]) == prompt  # byte-level: lossless, special-token text stays text


@BOUNDED
@given(st.lists(unicode_text, min_size=1, max_size=3), st.integers(1, 8),
       st.sampled_from(["threshold", "first_hitting", "fixed", "ddpm", "remask"]))
def test_sample_texts_on_any_unicode_prompt(prompts, max_new_tokens, sampler):
    model = text_model()
    try:
        texts, out = sample_texts(model, _TOKENIZER, prompts, torch.Generator().manual_seed(0),
                                  max_new_tokens=max_new_tokens, sampler=sampler)
    except ValueError as err:  # only a prompt too long for the context may be refused
        assert "does not fit the window" in str(err)
        assert max(len(p.encode("utf-8")) for p in prompts) + 1 + model.block_length > CONTEXT
        return
    assert len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
    assert all(0 < int(n) <= max_new_tokens for n in out.lengths)


@settings(BOUNDED, max_examples=5)
@given(st.integers(CONTEXT, 20 * CONTEXT))
def test_a_huge_prompt_is_refused_clearly(length):
    with pytest.raises(ValueError, match="does not fit the window"):
        sample_texts(text_model(), _TOKENIZER, ["x" * length], max_new_tokens=4)


# -- token ids in ---------------------------------------------------------------------------------------

@BOUNDED
@given(st.lists(st.lists(st.integers(-3, 300), max_size=12), max_size=3), st.integers(-1, 6))
def test_generate_on_any_token_id_lists(prompts, max_new_tokens):
    model = text_model()
    vocab, mask = model.vocab_size, model.mask_token_id
    valid = (
        bool(prompts) and all(prompts) and max_new_tokens >= 1
        and all(0 <= t < vocab and t != mask for p in prompts for t in p)
    )
    try:
        out = model.generate(prompts, max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(0))
    except ValueError as err:
        assert not valid, f"valid input refused: {err}"
        return
    assert valid
    for i in range(len(prompts)):
        new = out.new_tokens(i)
        assert 0 < len(new) <= max_new_tokens and all(0 <= t < vocab and t != mask for t in new)


@BOUNDED
@given(
    st.lists(st.integers(1, 5), min_size=0, max_size=4),
    st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]),
    st.none() | st.lists(st.integers(1, 5), min_size=1, max_size=3),
)
def test_generate_on_tensors_of_any_shape_and_dtype(shape, dtype, mask_shape):
    ids = torch.ones(shape, dtype=dtype)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.long)
    try:
        out = text_model().generate(ids, attention_mask=mask, max_new_tokens=2)
    except ValueError as err:
        assert str(err)
        return
    assert len(shape) == 2 and not dtype.is_floating_point and dtype != torch.bool
    assert mask_shape is None or mask_shape == shape
    assert out.sequences.shape[0] == shape[0]


# -- the training loss ----------------------------------------------------------------------------------


@BOUNDED
@given(
    st.integers(0, 3),
    st.integers(0, 12),
    st.integers(-2, 300),
    st.sampled_from([torch.long, torch.int32, torch.float32]),
)
def test_block_diffusion_loss_on_odd_batches(batch, length, fill, dtype):
    model = text_model()
    x0 = torch.full((batch, length), fill).to(dtype)
    valid = (
        batch >= 1
        and length >= 1
        and length % model.block_length == 0
        and 0 <= fill < model.vocab_size
        and fill != model.mask_token_id
        and dtype != torch.float32
    )
    try:
        out = block_diffusion_loss(
            model, x0, make_schedule("loglinear"), (1e-3, 1.0), generator=torch.Generator().manual_seed(0)
        )
    except ValueError as err:
        assert not valid, f"valid batch refused: {err}"
        return
    assert valid and torch.isfinite(out.loss)
