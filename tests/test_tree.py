"""The ``hybrid`` drafter's greedy 2-branch draft tree (``sampling/speculative/tree.py``, ``hybrid_tree=True``):

* with the tree, speculative output is the verifier's own greedy ``generate()`` token for token (fp64, Llama, Qwen2
  and GPT-2; prompts that repeat so lookup fires; EOS and ``max_new_tokens`` inside accepted runs; fp32 on packed
  kernels);
* one tree forward gives each branch the rows (and cache entries, and features) two separate chain forwards give;
* planted drafts where the DFlash branch wins, where lookup wins and where both fail (a tie: lookup): the committed
  tokens are the verifier's, and after every step the verifier's cache equals a fresh prefill of ``committed[:-1]``
  and the DFlash context cache a fresh prefill of the committed tokens it absorbed;
* the chain is used when sampling, when the branches share their first token and when the verifier's attention
  ignores custom 4-D masks;
* ``hybrid_tree`` is a generation setting, a ``blockdiff sample`` flag, a server request field and a config key.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_dflash import VOCAB, make_drafter, saved
from test_speculative import ar_model, hf_greedy
from transformers import Qwen2Config, Qwen2ForCausalLM

from blockdiff.cli import main
from blockdiff.cli.options import add_drafter_flags, drafter_settings
from blockdiff.errors import UsageError
from blockdiff.modeling.dflash import load_drafter, target_features
from blockdiff.modeling.lean import pack_linears
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.samplers.registry import settings
from blockdiff.sampling.speculative import CausalLMVerifier, Draft, speculative_generate
from blockdiff.sampling.speculative import make_drafter as make_pair
from blockdiff.sampling.speculative.tree import (
    choose_branch,
    keep_branch,
    plain_cache,
    score_tree,
    takes_tree_masks,
)
from blockdiff.serving.protocol import parse_request

TREE = {"drafter": "hybrid", "hybrid_tree": True, "hybrid_threshold": 0.0}
PROMPTS = [[5], [3, 9, 27, 1, 44, 12, 3, 9, 27], [7, 7, 2, 30, 7, 7, 2, 30, 7, 7], [1, 2, 3, 1, 2, 3, 1, 2]]


def network(target, tmp_path, **kw):
    return load_drafter(saved(make_drafter(target, **kw), tmp_path), target)


# -- greedy identity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_with_the_tree_equals_the_verifiers_generate(tmp_path, family):
    target = ar_model(family, VOCAB)
    net = network(target, tmp_path, draft_vocab=list(range(0, 64, 3)))  # most true tokens excluded
    trees = 0
    for prompt in PROMPTS:
        out = speculative_generate(target, net, prompt, max_new_tokens=24, **TREE)
        assert out.sequences[0].tolist() == hf_greedy(target, prompt, 24)
        trees += out.drafter_counts["tree_steps"]
    assert trees > 0, "no tree step was checked"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eos_and_max_new_tokens_inside_accepted_runs_with_the_tree(tmp_path, family):
    """A four-token target, so random drafts of both drafters are often accepted and often differ: every
    ``max_new_tokens`` up to 30 and every token as EOS give the verifier's generate()."""
    target = ar_model(family, 4, std=1.0)
    net = network(target, tmp_path, std=1.0, mask=3)
    prompt = [1, 0, 2, 1, 1, 0, 2]
    runs = []
    full = speculative_generate(target, net, prompt, max_new_tokens=30, observer=lambda s: runs.append(s.accepted),
                                **TREE)
    assert full.sequences[0].tolist() == hf_greedy(target, prompt, 30)
    counts = full.drafter_counts
    assert counts["tree_steps"] > 0 and counts["tree_steps"] == counts["tree_lookup_wins"] + counts["tree_dflash_wins"]
    assert max(runs) > 1  # accepted runs to stop inside
    for new in range(1, 30):
        out = speculative_generate(target, net, prompt, max_new_tokens=new, **TREE)
        assert out.new_tokens(0) == full.new_tokens(0)[:new]
    for eos in set(full.new_tokens(0)):
        out = speculative_generate(target, net, prompt, max_new_tokens=30, eos_token_id=eos, **TREE)
        assert out.sequences[0].tolist() == hf_greedy(target, prompt, 30, eos=eos) and bool(out.stopped_at_eos[0])


def test_greedy_with_the_tree_on_packed_kernels_equals_generate_in_fp32(tmp_path):
    target = ar_model("llama", VOCAB).float()
    packed = copy.deepcopy(target)
    pack_linears(packed)
    net = load_drafter(saved(make_drafter(target), tmp_path), packed)
    trees = 0
    for prompt in PROMPTS:
        out = speculative_generate(packed, net, prompt, max_new_tokens=16, **TREE)
        assert out.sequences[0].tolist() == hf_greedy(target, prompt, 16)
        trees += out.drafter_counts["tree_steps"]
    assert trees > 0


# -- one tree forward is two chain forwards ---------------------------------------------------------------------------
def assert_same_cache(cache, fresh, tol=1e-10):
    assert cache.get_seq_length() == fresh.get_seq_length()
    for mine, theirs in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(mine.values, theirs.values, rtol=tol, atol=tol)


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "sdpa"),
                                              ("llama", "eager")])
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("winner", [0, 1])
def test_the_tree_rows_cache_and_features_are_each_branchs_chain_forward(family, attention, cached, winner):
    target = ar_model(family, VOCAB)
    target.set_attn_implementation(attention)
    prompt, a, b = [3, 9, 27, 1, 44], torch.tensor([8, 2, 61]), torch.tensor([5, 17, 4, 40, 9])

    def verifier():
        v = CausalLMVerifier(target, feature_layers=[0, 1])
        if cached:  # the cache holds prompt[:-1]: the tree feeds one committed token
            v.score(prompt[:-1], torch.zeros(0, dtype=torch.long))
        return v

    tol = 1e-10 if attention == "sdpa" else 1e-5  # eager attention takes its softmax in float32 even in fp64
    tree, chains = verifier(), [verifier(), verifier()]
    step = score_tree(tree, prompt, a, b)
    assert step.fed_committed == (1 if cached else len(prompt))
    for rows, drafts, chain in zip(step.logits, (a, b), chains):
        torch.testing.assert_close(rows, chain.score(prompt, drafts), rtol=tol, atol=tol)
    step.winner = winner
    keep_branch(tree, step)
    assert_same_cache(tree.cache, chains[winner].cache, tol)
    assert tree.fed_start == chains[winner].fed_start
    torch.testing.assert_close(tree.features, chains[winner].features, rtol=tol, atol=tol)


def test_the_longer_accepted_branch_wins_and_a_tie_goes_to_lookup():
    target = ar_model("llama", VOCAB)
    prompt = [3, 9, 27, 1]
    right = hf_greedy(target, prompt, 4)[len(prompt):]
    wrong = [(t + 1) % VOCAB for t in right]
    fit = lambda logits: logits  # noqa: E731 - the rows as they are
    cases = [(right[:1] + wrong[1:2], wrong[:3], 0, 1), (wrong[:2], right[:3] + wrong[3:], 1, 3),
             (wrong[:2], [(t + 2) % VOCAB for t in right[:2]], 0, 0)]
    for a, b, winner, accepted in cases:
        step = choose_branch(score_tree(CausalLMVerifier(target), prompt, torch.tensor(a), torch.tensor(b)), fit)
        assert (step.winner, step.accepted) == (winner, accepted)


# -- planted drafts: the caches after every step ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["dflash_wins", "lookup_wins", "both_wrong", "same_first_token"])
def test_planted_branches_commit_the_verifiers_tokens_and_leave_exact_caches(tmp_path, case):
    target = ar_model("llama", VOCAB)
    prompt = [3, 9, 27, 1, 44, 12]
    reference = hf_greedy(target, prompt, 40)
    config = BlockDiffusionGenerationConfig(temperature=0.0, **TREE)
    pair = make_pair(network(target, tmp_path), config, target)
    proposer = pair.drafter
    learned_draft = proposer.learned.draft

    def oracle(committed, limit, wrong_at, shift):
        tokens = reference[len(committed) : len(committed) + min(limit, 4)]
        return Draft(torch.tensor([(t + shift) % VOCAB if i == wrong_at else t for i, t in enumerate(tokens)]))

    wrong = {"dflash_wins": (0, 3), "lookup_wins": (3, 0), "both_wrong": (0, 0), "same_first_token": (2, 1)}[case]
    proposer.lookup.match = lambda committed, limit: (oracle(committed, limit, wrong[0], 1), 3)

    def planted(committed, limit, sampling, generator=None):
        learned_draft(committed, limit, sampling, generator)  # the real forward (absorbs the committed states)
        return oracle(committed, limit, wrong[1], 2) if proposer.learned.cache is not None else Draft(
            torch.zeros(0, dtype=torch.long))

    proposer.learned.draft = planted
    checked, contexts = [], []

    def check(step):
        committed = step.committed
        checked.append((step.accepted, len(step.drafts)))
        assert committed == reference[: len(committed)]
        with torch.no_grad():
            fresh = target(torch.tensor([committed[:-1]]), use_cache=True).past_key_values
        assert_same_cache(pair.verifier.cache, fresh)
        learned = proposer.learned  # absorbed this step: the states of committed[:known], the last step's kept drafts'
        if learned.cache is not None and len(step.drafts):
            assert learned.known == len(committed) - len(step.new_tokens) - 1
            with torch.no_grad():
                states = target(torch.tensor([committed[: learned.known]]), output_hidden_states=True).hidden_states
                fresh = learned.net.context_cache(target_features(states, learned.net.target_layer_ids).to(
                    learned.net.fc.weight.dtype), torch.arange(learned.known)[None])
            for mine, theirs in zip(learned.cache.keys + learned.cache.values, fresh.keys + fresh.values):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)  # the drafter runs in fp32
            contexts.append(learned.known)

    out = speculative_generate(pair, None, prompt, max_new_tokens=30, observer=check)
    assert out.sequences[0].tolist() == reference[: len(prompt) + 30] and len(checked) > 3
    assert len(contexts) == sum(1 for i, (_, k) in enumerate(checked) if i > 0 and k > 0)  # every step with drafts
    counts = out.drafter_counts
    both = [accepted for i, (accepted, k) in enumerate(checked) if i > 0 and k > 0]  # step 0: no DFlash states yet
    if case == "same_first_token":  # the chain: lookup, as without the tree
        assert counts["tree_steps"] == 0 and counts["lookup_steps"] == len(both) + 1
        return
    wins = {"dflash_wins": "tree_dflash_wins"}.get(case, "tree_lookup_wins")
    assert counts["tree_steps"] == counts[wins] == len(both)
    assert counts["tree_drafts"] == 2 * sum(k for i, (_, k) in enumerate(checked) if i > 0)  # both 4 (or the room)
    full = [accepted for i, (accepted, k) in enumerate(checked) if i > 0 and k == 4]  # no draft cut by the room
    assert full and set(full) == {{"dflash_wins": 3, "lookup_wins": 3, "both_wrong": 0}[case]}


# -- fallbacks ------------------------------------------------------------------------------------------------------
def test_sampling_and_the_default_never_use_the_tree(tmp_path):
    target = ar_model("llama", 4, std=1.0)
    net = network(target, tmp_path, std=1.0, mask=3)
    prompt = [1, 0, 2, 1, 1, 0, 2]
    out = speculative_generate(target, net, prompt, max_new_tokens=30, temperature=0.8,
                               generator=torch.Generator().manual_seed(0), **TREE)
    assert out.drafter_counts["tree_steps"] == 0 and out.drafter_counts["lookup_steps"] > 0
    out = speculative_generate(target, net, prompt, max_new_tokens=30, drafter="hybrid", hybrid_threshold=0.0)
    assert out.drafter_counts["tree_steps"] == 0 and out.drafter_counts["lookup_steps"] > 0


def test_a_verifier_that_ignores_4d_masks_falls_back_to_the_chain(tmp_path, monkeypatch):
    target = ar_model("llama", 4, std=1.0)
    net = network(target, tmp_path, std=1.0, mask=3)
    assert takes_tree_masks(target) and takes_tree_masks(ar_model("gpt2", VOCAB))
    assert not takes_tree_masks(SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    small = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    assert plain_cache(CausalLMVerifier(Qwen2ForCausalLM(Qwen2Config(**small))))
    sliding = Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not plain_cache(CausalLMVerifier(Qwen2ForCausalLM(sliding)))  # its cache drops old entries: the chain
    deaf = copy.deepcopy(target)  # a new model: its own probe
    forward = deaf.model.forward
    monkeypatch.setattr(deaf.model, "forward", lambda *args, attention_mask=None, **kw: forward(*args, **kw))
    assert not takes_tree_masks(deaf)
    prompt = [1, 0, 2, 1, 1, 0, 2]
    out = speculative_generate(deaf, net, prompt, max_new_tokens=30, check_base=False, **TREE)
    assert out.sequences[0].tolist() == hf_greedy(target, prompt, 30)
    assert out.drafter_counts["tree_steps"] == 0 and out.drafter_counts["lookup_steps"] > 0


# -- the knob -------------------------------------------------------------------------------------------------------
def test_hybrid_tree_is_a_setting_a_flag_a_request_field_and_a_config_key(capsys):
    assert settings()["hybrid_tree"] is False
    parser = argparse.ArgumentParser()
    add_drafter_flags(parser)
    assert drafter_settings(parser.parse_args(["--hybrid-tree", "true"])) == {"hybrid_tree": True}
    request = parse_request({"model": "m", "prompt": "hi", "hybrid_tree": True}, chat=False, served_model="m")
    assert request.settings["hybrid_tree"] is True
    assert main(["config", "keys", "--markdown"]) in (0, None)
    row = "| `hybrid_tree` | `False` | hybrid drafter: greedy:"
    assert row in capsys.readouterr().out
    assert row in (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    target = ar_model("llama", VOCAB)
    with pytest.raises(UsageError, match="hybrid_tree must be bool"):
        speculative_generate(target, None, [1, 2], drafter="lookup", hybrid_tree="yes")


# -- the shipped drafter on the real SmolLM2 -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_tree_with_the_shipped_drafter_writes_smollm2s_own_greedy_text():
    """SmolLM2 (fp32, packed) with its shipped DFlash drafter and the tree on: its own greedy generate() token for
    token, on a prompt that repeats (lookup fires) and one the drafter never saw."""
    from conftest import smollm2_plain_and_packed

    plain, target, tokenizer = smollm2_plain_and_packed()
    network = load_drafter(None, target)
    trees = 0
    for text in ("The quick brown fox said to the lazy dog: \"I will not", "1, 2, 3, 4, 1, 2, 3, 4, 1, 2,"):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        out = speculative_generate(target, network, ids, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id,
                                   drafter="hybrid", hybrid_tree=True)
        assert out.sequences[0].tolist() == hf_greedy(plain, ids.tolist(), 32, eos=tokenizer.eos_token_id)
        trees += out.drafter_counts["tree_steps"]
    assert trees > 0
