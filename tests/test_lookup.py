"""The lookup drafter (``sampling/speculative/lookup.py``): n-gram drafts from the text so far, verified losslessly.

* its index gives the drafts a naive search over the whole text gives (incremental == naive);
* greedy output is token for token the verifier's ``generate()`` (fp64, Llama / Qwen2 / GPT-2; fp32 on packed
  kernels), EOS and ``max_new_tokens`` falling inside an accepted run included;
* sampling with its one-hot drafts keeps the verifier's distribution;
* bad settings say what to do.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from test_speculative import FAMILIES, ar_model, assert_sampled_joint, exact_joint, hf_greedy, l1_bound

from blockdiff.errors import UsageError
from blockdiff.modeling.lean import pack_linears
from blockdiff.sampling.config import BlockDiffusionGenerationConfig
from blockdiff.sampling.speculative import NgramProposer, Sampling, make_drafter, speculative_generate
from blockdiff.sampling.speculative.verify import accept_sampled

GREEDY = Sampling(64, 0.0, None, None)
PROMPTS = {"repeats": [5, 6, 7] * 4, "echo": [3, 9, 27, 1, 44, 12, 3, 9, 27], "one_token": [7]}


def naive_draft(text: list[int], max_ngram: int, num_tokens: int, limit: int) -> list[int]:
    """The definition, searched from scratch: the longest suffix (<= max_ngram) that occurred earlier, its latest
    earlier occurrence, the tokens after it."""
    n = len(text)
    for m in range(min(max_ngram, n - 1), 0, -1):
        suffix = text[n - m :]
        for start in range(n - m - 1, -1, -1):  # latest occurrence that ends before the last token
            if text[start : start + m] == suffix:
                return text[start + m : start + m + min(limit, num_tokens)]
    return []


@pytest.mark.parametrize("max_ngram,num_tokens", [(1, 3), (3, 7), (5, 2)])
def test_incremental_index_drafts_what_a_naive_search_drafts(max_ngram, num_tokens):
    rng = random.Random(max_ngram * 10 + num_tokens)
    for trial in range(20):
        text = [rng.randrange(6) for _ in range(60)]  # a small vocabulary: many repeats, many lengths of match
        proposer = NgramProposer(64, max_ngram, num_tokens)
        n = 1
        while n < len(text):  # commit a random number of tokens per step, as a verifier would
            limit = rng.randrange(1, 9)
            got = proposer.draft(text[:n], limit, GREEDY).tokens.tolist()
            assert got == naive_draft(text[:n], max_ngram, num_tokens, limit), (trial, n)
            n += rng.randrange(1, 4)


def test_the_longest_match_wins_and_no_match_drafts_nothing():
    proposer = NgramProposer(64, max_ngram=3, num_tokens=4)
    # "1 2" occurs twice: followed by 3 (first) and 9 (latest); "8 1 2" occurs once, followed by 3
    assert proposer.draft([8, 1, 2, 3, 4, 1, 2, 9, 8, 1, 2], 10, GREEDY).tokens.tolist() == [3, 4, 1, 2]
    proposer.reset()
    assert proposer.draft([5, 1, 2, 3, 4, 1, 2, 9, 8, 1, 2], 10, GREEDY).tokens.tolist() == [9, 8, 1, 2]
    proposer.reset()
    assert proposer.draft([1, 2, 3, 4], 10, GREEDY).tokens.numel() == 0
    assert proposer.forwards == 0  # never a network forward


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_the_verifiers_generate(family):
    verifier = ar_model(family)
    kept = 0
    for name, prompt in PROMPTS.items():
        out = speculative_generate(verifier, None, prompt, drafter="lookup", max_new_tokens=40)
        assert out.sequences[0].tolist() == hf_greedy(verifier, prompt, 40), name
        kept += sum(out.acceptance_histogram[1:])
        assert out.drafter_forwards == 0 and out.verifier_forwards == sum(out.acceptance_histogram)
    assert kept > 0  # some steps kept drafts: the accepting path ran


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_on_packed_fp32_kernels_equals_the_plain_generate(family):
    plain = ar_model(family).float()
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    for name, prompt in PROMPTS.items():
        out = speculative_generate(packed, None, prompt, drafter="lookup", max_new_tokens=24)
        assert out.sequences[0].tolist() == hf_greedy(plain, prompt, 24), name


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_and_max_new_tokens_inside_an_accepted_run(family):
    verifier = ar_model(family)
    prompt = PROMPTS["repeats"]
    full = hf_greedy(verifier, prompt, 40)[len(prompt):]
    for new in (1, 2, 7, 11):
        out = speculative_generate(verifier, None, prompt, drafter="lookup", max_new_tokens=new)
        assert out.new_tokens(0) == full[:new]
    for j in (3, 10, 20):
        eos = full[j]
        first = full.index(eos)
        out = speculative_generate(verifier, None, prompt, drafter="lookup", max_new_tokens=40, eos_token_id=eos)
        assert out.new_tokens(0) == full[: first + 1] and bool(out.stopped_at_eos[0])


@pytest.mark.slow
def test_sampling_with_lookup_drafts_keeps_the_verifiers_distribution():
    """A prompt whose suffix recurs, so lookup drafts from the first step; the empirical joint of the first tokens
    over seeded runs is within the L1 bound of the verifier's exact one (a false failure has probability < 1e-6)."""
    vocab, prompt, n, settings = 8, [1, 2, 3, 1, 2, 3, 1, 2], 1200, dict(temperature=1.0)
    verifier = ar_model(vocab=vocab, seed=3, std=0.6, layers=1)
    joint = exact_joint(verifier, prompt, 3, vocab, **settings)
    assert_sampled_joint((verifier, None), prompt, joint, n, drafter="lookup", **settings)


def test_the_acceptance_rule_with_one_hot_drafts_gives_p():
    """Lookup's drafts are one-hot (``q = None``): the draft is kept with probability p(d), else a token is drawn
    from p with d removed; the committed token is distributed as p. Power: keeping every draft gives the draft."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25] * 4])
    n, counts = 20000, torch.zeros(4)
    for _ in range(n):
        draft = torch.tensor([1])  # always the same draft: p(1) = 0.3
        accepted, extra = accept_sampled(p, None, draft, g)
        counts[1 if accepted else extra] += 1
    assert float((counts / n - p[0]).abs().sum()) < l1_bound(4, n)


@pytest.mark.parametrize("key,value", [("lookup_ngram", 0), ("lookup_tokens", 0), ("lookup_tokens", 65)])
def test_bad_lookup_settings_name_the_key(key, value):
    with pytest.raises(UsageError, match=f"{key}={value}"):
        speculative_generate(ar_model(), None, [1, 2], drafter="lookup", **{key: value})


def test_lookup_without_a_verifier_says_what_to_pass():
    with pytest.raises(UsageError, match="needs a verifier"):
        make_drafter(None, BlockDiffusionGenerationConfig(drafter="lookup"))


def test_cli_samples_a_plain_decoder_with_lookup_drafts_and_equals_its_greedy(tmp_path, capsys):
    """``blockdiff sample DECODER --speculative --drafter lookup``: no block diffuser; the text is the decoder's own
    greedy text, with the packed kernels and with --no-lean."""
    from conftest import write_tiny_model_dir
    from test_speculative import base_model

    from blockdiff.cli import main
    from blockdiff.modeling.io import load_model_dir
    from blockdiff.sampling import encode_prompts

    loaded = load_model_dir(write_tiny_model_dir(tmp_path), lean=False)
    base = tmp_path / "base"  # a plain transformers decoder folder
    loaded.model.backbone.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    prompt = "the cat the cat"
    ids = encode_prompts(loaded.tokenizer, [prompt])[0]
    reference = loaded.tokenizer.decode(hf_greedy(base_model(base), ids, 12)[len(ids):], skip_special_tokens=True)
    for extra in ([], ["--no-lean"]):
        rc = main(["sample", str(base), "--speculative", "--drafter", "lookup", "--prompt", prompt,
                   "--max-new-tokens", "12", "--temperature", "0", *extra])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert prompt + reference in out.replace("\n", "") and "lookup: " in out
    trace = str(tmp_path / "t.jsonl")
    assert main(["sample", str(base), "--speculative", "--drafter", "lookup", "--prompt", "a", "--trace", trace]) == 2
    assert "need a block diffuser" in capsys.readouterr().err
