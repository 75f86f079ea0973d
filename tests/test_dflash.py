"""The DFlash drafter (``modeling/dflash.py``, ``sampling/speculative/dflash.py`` and ``hybrid.py``,
``training/drafter_data.py``):

* the network is DFlash's: the ``dflash`` package loads our checkpoint and computes the same hidden states;
* saving round-trips, folding the feature scales into ``fc`` changes nothing, and a training forward (many anchors,
  one 4-D mask) gives each block what the inference forward gives it;
* speculative decoding with it (``dflash``, ``hybrid``) is the verifier's own greedy output (fp64, three families;
  fp32 on packed kernels), keeps the verifier's distribution when sampling (exact enumeration, draft vocabulary
  missing tokens), and its context cache equals a fresh prefill after any accept / reject sequence;
* a drafter for another target, a missing folder and bad knobs are refused with what to do.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from test_speculative import FAMILIES, ar_model, assert_sampled_joint, exact_joint, hf_greedy

from blockdiff.errors import MissingFileError, UsageError
from blockdiff.modeling.dflash import (
    DFlashDrafter,
    drafter_config,
    load_drafter,
    target_features,
    target_fingerprint,
)
from blockdiff.modeling.lean import pack_linears
from blockdiff.sampling.speculative import speculative_generate
from blockdiff.training.drafter_data import Rows, anchor_batch, draft_vocabulary

VOCAB, MASK = 64, 63


def make_drafter(target, layers=1, block_length=4, draft_vocab=None, seed=3, std=0.3, mask=MASK) -> DFlashDrafter:
    """A random drafter for ``target`` (fp32) reading all of its layers."""
    torch.manual_seed(seed)
    ids = list(range(target.config.num_hidden_layers))
    cfg = drafter_config(target.config, num_layers=layers, layer_ids=ids, block_length=block_length,
                         mask_token_id=mask, draft_vocab=len(draft_vocab) if draft_vocab is not None else 0,
                         target=target_fingerprint(target))
    drafter = DFlashDrafter(cfg)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, std) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        if draft_vocab is not None:
            drafter.draft_ids.copy_(torch.tensor(draft_vocab))
    return drafter.eval()


def saved(drafter, tmp_path, name="drafter") -> str:
    drafter.save(tmp_path / name, dtype=torch.float32)
    return str(tmp_path / name)


# -- the network ------------------------------------------------------------------------------------------------
def test_the_dflash_package_loads_our_checkpoint_and_computes_the_same_states(tmp_path):
    dflash = pytest.importorskip("dflash.model")
    target = ar_model("llama", VOCAB).float()
    drafter = make_drafter(target, layers=2)
    ref = dflash.DFlashDraftModel.from_pretrained(saved(drafter, tmp_path), dtype=torch.float32).eval()
    assert ref.target_layer_ids == drafter.target_layer_ids and ref.block_size == 4 and ref.mask_token_id == MASK
    features, embeds = torch.randn(1, 7, 64), torch.randn(1, 4, 32)
    positions = torch.arange(11)[None]
    with torch.no_grad():
        theirs = ref(target_hidden=features, noise_embedding=embeds, position_ids=positions)
        ours = drafter(embeds, positions[:, 7:], drafter.context_cache(features, positions[:, :7]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_save_load_round_trips_with_the_draft_vocabulary(tmp_path):
    target = ar_model("llama", VOCAB).float()
    drafter = make_drafter(target, draft_vocab=list(range(0, 64, 2)))
    back = DFlashDrafter.load(saved(drafter, tmp_path))
    assert back.draft_ids.tolist() == list(range(0, 64, 2))
    for (name, a), (_, b) in zip(drafter.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_folding_the_feature_scales_into_fc_changes_nothing():
    target = ar_model("llama", VOCAB).float()
    drafter = make_drafter(target)
    scales = torch.tensor([3.0, 0.25])
    features, embeds, positions = torch.randn(1, 5, 64), torch.randn(1, 4, 32), torch.arange(9)[None]
    with torch.no_grad():
        before = drafter(embeds, positions[:, 5:], drafter.context_cache(features / scales.repeat_interleave(32),
                                                                          positions[:, :5]))
        drafter.fold_scales(scales)
        after = drafter(embeds, positions[:, 5:], drafter.context_cache(features, positions[:, :5]))
    torch.testing.assert_close(after, before)


def test_a_training_forward_gives_each_block_what_inference_gives_it():
    target = ar_model("llama", VOCAB).float()
    drafter = make_drafter(target, layers=2)
    rows = [[5, 9, 1, 33, 2, 7, 7, 40, 12, 3, 8], [4, 4, 4, 19, 6, 2]]
    with torch.no_grad():
        feats = [target_features(target(torch.tensor([r]), output_hidden_states=True).hidden_states,
                                 drafter.target_layer_ids)[0] for r in rows]
        batch = anchor_batch(feats, rows, [3, 2], anchors=3, block_length=4, mask_token_id=MASK,
                             generator=torch.Generator().manual_seed(0))
        embed = target.get_input_embeddings().weight
        n = batch.features.shape[1]
        cache = drafter.context_cache(batch.features, torch.arange(n)[None].expand(2, -1))
        together = drafter(torch.nn.functional.embedding(batch.block_ids, embed), batch.positions, cache, batch.mask)
        for i, row in enumerate(rows):
            for j in range(3):
                a = int(batch.positions[i, 4 * j])
                assert batch.block_ids[i, 4 * j] == row[a] and a >= [3, 2][i] - 1
                alone_cache = drafter.context_cache(feats[i][None, :a], torch.arange(a)[None])
                ids = torch.tensor([[row[a]] + [MASK] * 3])
                alone = drafter(torch.nn.functional.embedding(ids, embed), torch.arange(a, a + 4)[None], alone_cache)
                torch.testing.assert_close(together[i, 4 * j : 4 * j + 4], alone[0], rtol=1e-5, atol=1e-5)
                want = [row[a + k] if a + k < len(row) else -100 for k in (1, 2, 3)]
                assert batch.targets[i, 4 * j + 1 : 4 * j + 4].tolist() == want


def test_the_draft_vocabulary_is_the_most_frequent_continuation_tokens():
    rows = Rows([[1, 1, 1, 5, 5, 5, 7], [1, 9, 9, 5]], [3, 1])  # continuations: 5 5 5 7 | 9 9 5
    assert draft_vocabulary(rows, 2, 64).tolist() == [5, 9]
    assert draft_vocabulary(rows, 3, 64, always=(63,)).tolist() == [5, 9, 63]
    assert draft_vocabulary(rows, 0, 64).tolist() == list(range(64))


# -- speculative decoding with it ----------------------------------------------------------------------------------
PROMPTS = [[5], [3, 9, 27, 1, 44, 12], [7, 7, 2, 30, 7, 7, 2, 30, 7, 7]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_name", ["dflash", "hybrid"])
def test_greedy_equals_the_verifiers_generate(tmp_path, family, drafter_name):
    target = ar_model(family, VOCAB)
    path = saved(make_drafter(target, draft_vocab=list(range(0, 64, 3))), tmp_path)  # most true tokens excluded
    for prompt in PROMPTS:
        want = hf_greedy(target, prompt, 20)
        out = speculative_generate(target, load_drafter(path, target), prompt, drafter=drafter_name,
                                   max_new_tokens=20, hybrid_threshold=0.0)
        assert out.sequences[0].tolist() == want


def test_greedy_stops_at_eos_and_max_new_tokens_inside_an_accepted_run(tmp_path):
    """A four-token target, so random drafts are often accepted: EOS and ``max_new_tokens`` fall inside accepted
    runs, and the output is still the verifier's generate()."""
    target = ar_model("llama", 4, std=1.0)
    net = load_drafter(saved(make_drafter(target, std=1.0, mask=3), tmp_path), target)
    prompt = [1, 0, 2, 1]
    steps = []
    full = speculative_generate(target, net, prompt, drafter="dflash", max_new_tokens=30,
                                observer=lambda s: steps.append(s.new_tokens)).new_tokens(0)
    assert full == hf_greedy(target, prompt, 30)[len(prompt):]
    ends = [sum(len(t) for t in steps[: i + 1]) for i in range(len(steps))]
    inside = sorted({e - 1 - j for e, t in zip(ends, steps) for j in range(1, len(t))})  # not a step's last token
    assert inside, "no accepted run to test inside"
    for new in inside[:4]:  # max_new_tokens ending inside an accepted run
        out = speculative_generate(target, net, prompt, drafter="dflash", max_new_tokens=new + 1)
        assert out.new_tokens(0) == full[: new + 1]
    eos = next(t for t in set(full) if full.index(t) in inside and full.index(t) > 0)  # first seen mid-run
    out = speculative_generate(target, net, prompt, drafter="dflash", max_new_tokens=30, eos_token_id=eos)
    assert out.sequences[0].tolist() == hf_greedy(target, prompt, 30, eos=eos) and bool(out.stopped_at_eos[0])


def test_greedy_on_packed_kernels_equals_generate_in_fp32(tmp_path):
    target = ar_model("llama", VOCAB).float()
    path = saved(make_drafter(target), tmp_path)
    packed = copy.deepcopy(target)
    pack_linears(packed)
    for prompt in PROMPTS:
        out = speculative_generate(packed, load_drafter(path, packed), prompt, drafter="hybrid", max_new_tokens=16)
        assert out.sequences[0].tolist() == hf_greedy(target, prompt, 16)


@pytest.mark.slow
def test_sampling_keeps_the_verifiers_distribution(tmp_path):
    """Seeded runs' empirical joint of the first two tokens is within the L1 bound of the verifier's exact one (a
    false failure has probability < 1e-6), with drafts drawn from a distribution that is zero on two of the six
    tokens (the draft vocabulary)."""
    vocab = 6
    target = ar_model("llama", vocab, seed=3, std=0.6, layers=1)
    path = saved(make_drafter(target, draft_vocab=[0, 2, 3, 5], std=1.0, mask=1), tmp_path)
    prompt = [1, 4, 2]
    joint = exact_joint(target, prompt, 2, vocab, temperature=0.9)
    assert_sampled_joint((target, load_drafter(path, target)), prompt, joint, 1200, drafter="dflash", temperature=0.9)


def test_the_context_cache_equals_a_fresh_prefill_after_every_step(tmp_path):
    from blockdiff.sampling.config import BlockDiffusionGenerationConfig
    from blockdiff.sampling.speculative import make_drafter as make_pair

    target = ar_model("llama", 4, std=1.0)  # four tokens: random drafts are often right, often wrong
    net = make_drafter(target, std=1.0, mask=3)
    path = saved(net, tmp_path)
    config = BlockDiffusionGenerationConfig(drafter="dflash", temperature=0.0)
    pair = make_pair(load_drafter(path, target), config, target)
    seen = []

    def check(step):
        proposer = pair.drafter
        if proposer.cache is None:
            return
        known = proposer.known
        with torch.no_grad():
            states = target(torch.tensor([step.committed[:known]]), output_hidden_states=True).hidden_states
            fresh = proposer.net.context_cache(target_features(states, proposer.net.target_layer_ids).float(),
                                               torch.arange(known)[None])
        for a, b in zip(proposer.cache.keys + proposer.cache.values, fresh.keys + fresh.values):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        seen.append(step.accepted)

    speculative_generate(pair, None, [3, 0, 2, 1], max_new_tokens=30, observer=check)
    assert len(seen) > 3 and max(seen) > 0 and min(seen) == 0  # both accepted and rejected steps were checked


# -- bad input ------------------------------------------------------------------------------------------------------
def test_a_drafter_for_another_target_is_refused(tmp_path):
    target = ar_model("llama", VOCAB)
    other = ar_model("llama", VOCAB, seed=7, std=3.0)  # the same shapes, other weights
    with pytest.raises(UsageError, match="another model of the same shape"):
        load_drafter(saved(make_drafter(other), tmp_path), target)
    wider = ar_model("llama", VOCAB, layers=3)
    with pytest.raises(UsageError, match="num_hidden_layers=3"):
        load_drafter(saved(make_drafter(wider), tmp_path, "wider"), target)
    net = DFlashDrafter.load(saved(make_drafter(wider), tmp_path, "wider"))  # unchecked, straight to the loop
    with pytest.raises(UsageError, match="trained for another model"):
        speculative_generate(target, net, [1, 2], drafter="dflash")


def test_a_missing_drafter_and_bad_knobs_are_refused(tmp_path):
    target = ar_model("llama", VOCAB)
    with pytest.raises(MissingFileError, match="holds no DFlash drafter"):
        load_drafter(tmp_path / "nowhere", target)
    with pytest.raises(UsageError, match="no shipped DFlash drafter fits"):
        load_drafter(None, target)
    with pytest.raises(UsageError, match="needs a DFlash drafter network"):
        speculative_generate(target, None, [1, 2], drafter="dflash")
    net = load_drafter(saved(make_drafter(target), tmp_path), target)
    with pytest.raises(UsageError, match="dflash_threshold"):
        speculative_generate(target, net, [1, 2], drafter="dflash", dflash_threshold=1.5)
    with pytest.raises(UsageError, match="hybrid_min_match"):
        speculative_generate(target, net, [1, 2], drafter="hybrid", hybrid_min_match=0)
    with pytest.raises(UsageError, match="batch 1"):
        speculative_generate(target, net, torch.tensor([[1, 2], [3, 4]]), drafter="dflash")
    assert speculative_generate(target, net, [1, 2], max_new_tokens=3).sequences.shape == (1, 5)  # default: hybrid


# -- the dflash package runs what we save ---------------------------------------------------------------------------
def test_the_dflash_package_drafts_what_we_draft_and_accepts_what_we_accept(tmp_path, monkeypatch):
    """Its own ``dflash_generate`` with our saved drafter: the target's greedy output, and step for step the same
    tokens committed as ours (a four-token target, so drafts are often right and often wrong)."""
    dflash = pytest.importorskip("dflash.model")
    monkeypatch.setattr(dflash, "_cuda_time", time.perf_counter)  # its stats time with CUDA; CPU here
    target = ar_model("llama", 4, std=1.0).float()
    path = saved(make_drafter(target, std=1.0, mask=3), tmp_path)
    ref = dflash.DFlashDraftModel.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [3, 0, 2, 1]
    theirs = dflash.dflash_generate(ref, target, torch.tensor([prompt]), 24, None, return_stats=True)
    steps = []
    ours = speculative_generate(target, load_drafter(path, target), prompt, drafter="dflash", max_new_tokens=24,
                                observer=lambda s: steps.append(len(s.new_tokens)))
    assert ours.sequences[0].tolist() == theirs.output_ids[0].tolist() == hf_greedy(target, prompt, 24)
    assert steps[0] == 1 and steps[1:] == theirs.acceptance_lengths  # step 0: the prefill (no drafts yet), as theirs
    assert max(steps) > 1  # some drafts were accepted


def test_a_checkpoint_round_trips_through_the_dflash_package(tmp_path):
    dflash = pytest.importorskip("dflash.model")
    target = ar_model("llama", VOCAB).float()
    drafter = make_drafter(target, layers=2)
    ref = dflash.DFlashDraftModel.from_pretrained(saved(drafter, tmp_path), dtype=torch.float32)
    ref.save_pretrained(tmp_path / "theirs")
    back = DFlashDrafter.load(tmp_path / "theirs")
    for name, value in drafter.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


# -- the shipped drafter on the real SmolLM2 -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_shipped_drafter_writes_smollm2s_own_greedy_text():
    """The drafter in blockdiff/drafters/smollm2 is found for SmolLM2, drafts (some drafts accepted), and the
    output is SmolLM2's own greedy generate() token for token (fp32, packed, on a prompt no drafter saw)."""
    from conftest import smollm2_plain_and_packed

    from blockdiff.modeling.dflash import shipped_drafter

    plain, target, tokenizer = smollm2_plain_and_packed()
    assert shipped_drafter(target) is not None
    network = load_drafter(None, target)
    ids = tokenizer("The quick brown fox said to the lazy dog: \"I will not", return_tensors="pt").input_ids[0]
    want = hf_greedy(plain, ids.tolist(), 32, eos=tokenizer.eos_token_id)
    for name in ("dflash", "hybrid"):
        out = speculative_generate(target, network, ids, drafter=name, max_new_tokens=32,
                                   eos_token_id=tokenizer.eos_token_id)
        assert out.sequences[0].tolist() == want
        assert out.accepted_tokens > 0
