"""Fused speculative decoding is lossless and one forward per step (blockdiff/sampling/speculative/fused.py).

The model: a tiny random Llama / Qwen2 / GPT-2 decoder in fp64 (weights of std 0.5, so predictions depend on the
context), frozen, with a random gated adapter (``B != 0``, so the mask rows draft something else than the base would)
and a token-causal clean stream. Its untouched deep copy is "the base", and everything is checked against it:

* greedy: token for token the base's ``generate(do_sample=False)``, for prompts of one token, ending mid-block and
  on a block boundary, with EOS inside an accepted draft and with ``max_new_tokens`` reached right after one;
* one network call per step (counted with a hook on the decoder), none of them by the base copy;
* after every step the cache is a fresh base prefill of the committed tokens but the last;
* sampling: the joint distribution of the first tokens is the base's own (exact, by enumeration; slow);
* the CLI picks the fused path by itself; bad input says what to do.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_speculative import (
    PROMPTS,
    ar_model,
    assert_same_cache,
    assert_sampled_joint,
    exact_joint,
    hf_greedy,
    hf_sampling_probs,
    l1_bound,
)

from blockdiff.errors import UsageError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.sampling.speculative import Sampling, speculative_generate
from blockdiff.sampling.speculative.fused import FusedBlockDiffusion, supports_fused

FAMILIES = ["llama", "qwen2", "gpt2"]


def fused_model(family="llama", vocab=64, seed=0, block_length=4, scale=0.05, layers=2, clean="causal"):
    """``(BlockDiffusionLM with a random gated adapter over a frozen decoder, an untouched copy of that decoder)``."""
    base = ar_model(family, vocab=vocab, seed=seed, layers=layers)
    pristine = copy.deepcopy(base)
    base.requires_grad_(False)
    spec = BlockDiffusionSpec(vocab - 1, block_length, True, 32, clean_attention=clean, adapter="gated_lora",
                              adapter_rank=4, adapter_alpha=8.0)
    model = BlockDiffusionLM(base, spec).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model, pristine


class CountCalls:
    """Counts forwards of a decoder body."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


# -- greedy: token for token the base's generate() -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_greedy_equals_the_frozen_base_one_forward_per_step(family, prompt_name):
    model, base = fused_model(family)
    prompt, new = PROMPTS[prompt_name], 40  # past the adapter's training context of 32: no window, still exact
    reference = hf_greedy(base, prompt, new)
    assert len(set(reference[len(prompt) :])) > 3, "degenerate base: the test would prove little"
    calls, base_calls = CountCalls(model.backbone.base_model), CountCalls(base)
    out = speculative_generate(model, None, prompt, max_new_tokens=new)
    assert out.sequences[0].tolist() == reference
    assert out.stop_reasons == ["max_new_tokens"] and int(out.lengths[0]) == new
    steps = sum(out.acceptance_histogram)
    assert calls.calls == steps == out.verifier_forwards == out.nfe  # one forward per step, and only that
    assert out.drafter_forwards == 0 and base_calls.calls == 0
    assert out.drafted_tokens > 0
    assert out.tokens_per_verifier_forward == pytest.approx(new / steps)


def test_the_adapter_drafts_and_never_changes_the_output():
    """The mask rows draft with the adapter (zeroing it changes the drafts) and the output stays the base's."""
    model, base = fused_model(vocab=16)
    prompt = [t % 15 for t in PROMPTS["mid_block"]]
    fused = FusedBlockDiffusion(model)
    steps = []
    out = speculative_generate(fused, None, prompt, max_new_tokens=24, observer=steps.append)
    with torch.no_grad():
        for low in model.adapter.layers.values():
            low.B.zero_()
    plain = []
    out0 = speculative_generate(FusedBlockDiffusion(model), None, prompt, max_new_tokens=24, observer=plain.append)
    assert out.sequences[0].tolist() == out0.sequences[0].tolist() == hf_greedy(base, prompt, 24)
    assert [s.drafts for s in steps] != [s.drafts for s in plain]


def accepted_tokens(steps, prompt_length):
    """``(position in the continuation, token)`` of every kept draft."""
    found = []
    for s in steps:
        start = len(s.committed) - len(s.new_tokens) - prompt_length
        found += [(start + i, t) for i, t in enumerate(s.drafts[: s.accepted])]
    return found


def first_kept(steps, prompt_length):
    """``(position, token)`` of a kept draft whose token does not occur earlier in the continuation, or ``None``."""
    free = steps[-1].committed[prompt_length:]
    return next(((i, t) for i, t in accepted_tokens(steps, prompt_length) if t not in free[:i]), None)


def find_kept_drafts(family, new=40):
    """A model, its base and a prompt whose fused greedy run keeps a draft token that is new in the continuation
    (small vocabularies: drafts are kept often enough), with the run's steps. Deterministic: the first hit."""
    for vocab in (16, 24):
        for seed in range(8):
            model, base = fused_model(family, vocab=vocab, seed=seed)
            for prompt in PROMPTS.values():
                prompt = [t % (vocab - 1) for t in prompt]
                steps = []
                speculative_generate(model, None, prompt, max_new_tokens=new, observer=steps.append)
                if first_kept(steps, len(prompt)):
                    return model, base, prompt, steps
    raise AssertionError("no draft was ever kept: the test needs a model whose drafts sometimes agree")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_stops_right_after_eos_inside_an_accepted_draft(family):
    model, base, prompt, steps = find_kept_drafts(family)
    free = steps[-1].committed[len(prompt) :]
    at, eos = first_kept(steps, len(prompt))
    reference = hf_greedy(base, prompt, 40, eos=eos)
    assert reference == prompt + free[: at + 1]
    got = []
    out = speculative_generate(model, None, prompt, max_new_tokens=40, eos_token_id=eos, observer=got.append)
    assert out.sequences[0].tolist() == reference
    assert out.stop_reasons == ["eos"] and bool(out.stopped_at_eos[0])
    assert eos in got[-1].drafts[: got[-1].accepted] and got[-1].new_tokens[-1] == eos  # cut inside the kept draft


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_max_new_tokens_inside_a_draft(family):
    model, base, prompt, steps = find_kept_drafts(family)
    ends_in_a_draft = 0
    for new in sorted({1, 2, 3, 7, 11} | {p + d for p, _ in accepted_tokens(steps, len(prompt)) for d in (1, 2)}):
        got = []
        out = speculative_generate(model, None, prompt, max_new_tokens=new, observer=got.append)
        assert out.sequences[0].tolist() == hf_greedy(base, prompt, new)
        assert out.stop_reasons == ["max_new_tokens"] and int(out.lengths[0]) == new
        assert all(len(s.drafts) < new for s in got)
        ends_in_a_draft += got[-1].accepted > 0
    assert ends_in_a_draft, "max_new_tokens never fell right after a kept draft"


# -- the cache: a fresh base prefill after every step ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_a_fresh_base_prefill_after_every_step(family, temperature):
    model, base, prompt, _ = find_kept_drafts(family)  # greedy keeps some drafts there
    fused = FusedBlockDiffusion(model)
    accepted = []

    def check(step):
        accepted.append(step.accepted)
        fresh = base(torch.tensor([step.committed[:-1]]), use_cache=True).past_key_values
        assert_same_cache(fused.cache, fresh)  # the mask rows' and rejected drafts' KV are gone
        if step.accepted < len(step.drafts):
            assert fused.pending is None, "drafts made under a rejected draft must be dropped"

    speculative_generate(fused, None, prompt, max_new_tokens=40, temperature=temperature,
                         generator=torch.Generator().manual_seed(0), observer=check)
    assert len(set(accepted)) > 1, "only one acceptance length: the test saw no accept/reject mixture"


# -- every_length: a mask block for each acceptance length (TiDAR) --------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_every_length_greedy_equals_the_base_and_never_checks_nothing(family, prompt_name):
    model, base = fused_model(family)
    prompt, new = PROMPTS[prompt_name], 40
    steps = []
    out = speculative_generate(FusedBlockDiffusion(model, every_length=True), None, prompt, max_new_tokens=new,
                               observer=steps.append)
    assert out.sequences[0].tolist() == hf_greedy(base, prompt, new)
    assert out.verifier_forwards == out.nfe == sum(out.acceptance_histogram)
    assert any(s.accepted < len(s.drafts) for s in steps), "no rejection: the test would prove little"
    # after the first step every step checks drafts, rejection or not (only the last may have no room for any)
    assert all(len(s.drafts) > 0 for s in steps[1:-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_length_block_a_is_the_single_block_after_a_drafts(family):
    """Block ``a`` of an every-length forward equals the one mask block a plain fused forward puts after the first
    ``a`` drafts: same keys seen, same positions, so the same draft logits (and the same verifier logits)."""
    model, _ = fused_model(family)
    prompt = PROMPTS["mid_block"]
    sampling = Sampling(64)
    for k in (1, 3):
        drafts = torch.tensor([5, 9, 2][:k])
        every = FusedBlockDiffusion(model, every_length=True)
        every.propose(prompt, 16, sampling)
        logits = every.score(prompt, drafts)
        for a in range(k + 1):
            plain = FusedBlockDiffusion(model)
            plain.propose(prompt, 16, sampling)
            plain_logits = plain.score(prompt, drafts[:a])
            torch.testing.assert_close(logits[: a + 1], plain_logits, rtol=0, atol=1e-12)
            torch.testing.assert_close(model.logits(every._blocks[a][None])[0], plain.pending, rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_length_cache_equals_a_fresh_base_prefill_and_drafts_follow_the_kept_ones(temperature):
    model, base, prompt, _ = find_kept_drafts("llama")
    fused = FusedBlockDiffusion(model, every_length=True)
    accepted, drafts_ready = [], []

    def check(step):
        accepted.append(step.accepted)
        fresh = base(torch.tensor([step.committed[:-1]]), use_cache=True).past_key_values
        assert_same_cache(fused.cache, fresh)
        drafts_ready.append(fused.pending is not None)

    speculative_generate(fused, None, prompt, max_new_tokens=40, temperature=temperature,
                         generator=torch.Generator().manual_seed(0), observer=check)
    assert len(set(accepted)) > 1 and min(accepted) == 0
    assert all(drafts_ready[:-3]), "every step but the last few (no room for drafts) leaves drafts, rejected or not"


# -- sampling: the base's distribution -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("settings,tokens", [
    (dict(temperature=1.0), 3),
    (dict(temperature=0.7, top_k=5, top_p=0.9), 3),
])
def test_sampling_keeps_the_base_distribution(settings, tokens):
    """As test_speculative's: N seeded runs, the empirical joint of the first ``tokens`` tokens within the L1 bound
    of the base's exact joint (a false failure has probability < 1e-6). Token 1 is the base's own draw (nothing to
    check yet); tokens 2 and 3 pass through the acceptance rule. Power: the drafts' own distribution for token 2 is
    more than twice the bound away from the base's."""
    vocab, prompt, n = 8, [1, 2, 3], 1200
    model, base = fused_model(vocab=vocab, seed=4, layers=1, scale=0.3)
    joint = exact_joint(base, prompt, tokens, vocab, **settings)
    fused = FusedBlockDiffusion(model)
    assert_sampled_joint((fused, None), prompt, joint, n, **settings)
    # power: the first draft (token 2) is drawn from q, far from the base's p after the most likely first token
    first = max(range(vocab), key=lambda t: sum(v for k, v in joint.items() if k[0] == t))
    sampling = Sampling(vocab, settings["temperature"], settings.get("top_k"), settings.get("top_p"))
    fused.reset()
    fused.propose(prompt, 3, sampling)
    fused.score(prompt, torch.zeros(0, dtype=torch.long))
    q2 = sampling.probs(fused.pending[:1])[0].double()
    p2 = hf_sampling_probs(base, [prompt + [first]], **settings)[0]
    assert float((q2 - p2).abs().sum()) > 2 * l1_bound(vocab, n)


# -- which models, and bad input -------------------------------------------------------------------------------
def test_models_without_a_base_clean_stream_are_refused():
    block_causal, _ = fused_model(clean="block_causal")
    assert not supports_fused(block_causal)
    with pytest.raises(UsageError, match="clean_attention=causal model.adapter=gated_lora"):
        speculative_generate(block_causal, None, [1, 2])
    plain = BlockDiffusionLM(ar_model(), BlockDiffusionSpec(63, 4, True, 32, clean_attention="causal"))
    with pytest.raises(UsageError, match="adapter=none"):
        FusedBlockDiffusion(plain)
    with pytest.raises(UsageError, match="no drafter"):
        speculative_generate(ar_model(), None, [1, 2])
    model, _ = fused_model()
    assert supports_fused(model)
    for masks in (1, 5):
        with pytest.raises(UsageError, match="masks per forward"):
            FusedBlockDiffusion(model, masks=masks)
    with pytest.raises(UsageError, match="batch 1"):
        speculative_generate(model, None, torch.ones(2, 3, dtype=torch.long))


def test_cli_speculative_uses_the_fused_path(tmp_path, capsys):
    from conftest import write_tiny_model_dir

    from blockdiff.cli import main
    from blockdiff.modeling.io import export_model, load_model_dir

    loaded = load_model_dir(write_tiny_model_dir(tmp_path / "plain"))
    plain = loaded.model
    plain.backbone.requires_grad_(False)
    spec = BlockDiffusionSpec(plain.mask_token_id, 4, True, 32, clean_attention="causal", adapter="gated_lora",
                              adapter_rank=2, adapter_alpha=4.0)
    model = BlockDiffusionLM(plain.backbone, spec)
    with torch.no_grad():
        for low in model.adapter.layers.values():
            low.B.normal_(0, 0.05)
    export_model(model, loaded.tokenizer, loaded.config, tmp_path / "fused" / "model")
    trace = tmp_path / "trace.jsonl"
    rc = main(["sample", str(tmp_path / "fused" / "model"), "--speculative", "--prompt", "The", "--prompt", "A",
               "--max-new-tokens", "9", "--temperature", "0", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fused" in out and "1 forward per step" in out
    # the trace replays like any other (the viewer's own checks: tokens per step, forwards == NFE, the text)
    from test_viewer import check_replay

    from blockdiff.viewer.trace import read_trace

    replay = read_trace(trace)
    assert replay.complete and replay.settings["speculative"] == "fused" and len(replay.samples) == 2
    check_replay(replay)
