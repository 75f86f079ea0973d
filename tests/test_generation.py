"""Tests for the block loop (``blockdiff/sampling/generation.py``) and everything that drives it.

What is checked here (CPU, tiny random models from ``conftest.py``; samplers' own rules are in
``test_samplers.py``):

1. Exactness of the network call: ``block_logits`` with the block KV cache equals the same call without
   it, and both equal the *training* forward ``model(x_t, x_0)`` on the same tokens (SUBS column dropped),
   for prompts that are block-aligned or end mid-block, over several blocks -- including the first forward
   of a block, which folds the finished previous block into the cache -- with and without the logit
   shift, for llama and GPT-2 backbones; a ragged batch (left padding by whole blocks) gives every row
   the single-prompt logits. One greedy step that fills a block picks the training forward's argmax.
2. A batch gives the same sequences as its prompts one by one (greedy), also when samples stop at
   different EOS positions.
3. Output rules: EOS stops a sample and the output is cut right after it; ``max_new_tokens`` is never
   exceeded; no mask token is ever output; the sliding window runs past the training context with a
   bounded cache (and stays exact: cached == uncached); prompts that do not fit are refused; bad
   settings raise ``ValueError``.
4. Seeding: the same generator gives the same output for every sampler, another seed another one.
5. The ``sample`` CLI on a tiny trained checkpoint: printed samples, a JSON-lines trace, the live view,
   prompts from a file or stdin, ``--no-cache``, and bad inputs that exit 2 and leave no trace file.
6. ``Trainer.predict`` via ``predict_step``, streamers, the generation config's save/load round trip,
   and unknown generation settings.

Shape legend: ``b`` batch, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch
from conftest import MASK_ID, random_tokens, tiny_model, train_tiny_cli_run

from blockdiff.sampling.config import SAMPLERS as ALL_SAMPLERS
from blockdiff.sampling.generation import GenerationOutput
from blockdiff.sampling.grid import block_logits, layout
from blockdiff.sampling.samplers.registry import sampler_class

PAD = 0
# every sampler the config accepts that reveals masks (these tiny models use absorbing noise), new ones included
SAMPLERS = [name for name in ALL_SAMPLERS if sampler_class(name).reveals]


def sharp_model(block_length: int = 4, **kwargs):
    """A tiny random model whose weights are scaled up 20x: peaked, varied predictions (confidences ~0.1-0.5)
    instead of the near-uniform ones of the default init, so greedy outputs use many different tokens."""
    model = tiny_model(block_length, max_seq_len=kwargs.pop("max_seq_len", 64), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20.0)
    return model


def gen(model, prompts, seed: int = 0, **settings) -> GenerationOutput:
    """``model.generate`` with no EOS unless asked (llama's default eos id 2 is an ordinary token here)."""
    settings.setdefault("eos_token_id", None)
    settings.setdefault("pad_token_id", PAD)
    return model.generate(prompts, generator=torch.Generator().manual_seed(seed), **settings)


# -- 1. exactness of the cached network call --------------------------------------------------------------

def _drive(model, prompts: list[list[int]], rows: torch.Tensor, num_blocks: int, use_cache: bool):
    """Run the block loop's network calls by hand: per block two denoising forwards (all generated
    positions masked; then the odd positions still masked), then the block is made final with the true
    tokens and ``st.cols`` grows by ``l`` columns, exactly as ``generate`` does. ``rows[i]`` holds sample
    ``i``'s tokens by position (prompt first). Returns, per forward, ``(positions (b, l), block (b, l),
    logits (b, l, v), tokens fed)``."""
    l, b = model.block_length, len(prompts)
    st = layout(prompts, l, PAD, "cpu")
    calls = []
    for _ in range(num_blocks):
        start = st.cols.shape[1] - l
        cols = torch.arange(start, start + l)[None]  # (1, l)
        pos = cols - st.first_valid[:, None]  # (b, l)
        truth = torch.stack([rows[i, pos[i]] for i in range(b)])  # (b, l)
        generated = cols >= st.gen_start[:, None]  # (b, l)
        for hide in (generated, generated & (pos % 2 == 1)):
            block = truth.masked_fill(hide, MASK_ID)
            st.cols[:, start:] = block
            fed = st.processed
            with torch.no_grad():
                logits = block_logits(model, st, start, start + l, use_cache)
            if use_cache:  # read-only while denoising: the cache holds the finished columns only
                assert st.cache.get_seq_length() == start
            calls.append((pos, block, logits, st.processed - fed))
        st.cols[:, start:] = truth
        st.cols = torch.cat([st.cols, torch.full((b, l), PAD)], dim=1)
    return calls


def _training_logits(model, row: torch.Tensor, pos: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The training forward's logits (l, v) for ``block`` at positions ``pos``, clean context ``row`` before it."""
    s0, l = int(pos[0]), model.block_length
    x0 = row[: s0 + l][None].clone()  # (1, n)
    xt = x0.clone()
    xt[0, s0:] = block
    with torch.no_grad():
        return model(xt, x0)[0, s0:]


def _close(a: torch.Tensor, b: torch.Tensor, predictable: torch.Tensor) -> bool:
    """Logits agree (mask column dropped: it is -inf in both) at the predictable positions."""
    keep = torch.arange(a.shape[-1]) != MASK_ID
    return torch.allclose(a[predictable][:, keep], b[predictable][:, keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family, logit_shift, block_length",
    [("llama", False, 4), ("llama", True, 4), ("gpt2", False, 4), ("gpt2", True, 4), ("llama", True, 1),
     ("llama", False, 8)],
    ids=["llama", "llama-shift", "gpt2", "gpt2-shift", "ar-shift", "llama-l8"],
)
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 6, 8, 13], ids=lambda p: f"prompt{p}")
def test_cached_logits_equal_uncached_and_training_forward(family, logit_shift, block_length, prompt_len):
    # Over three blocks: every forward (first forward of a block folding in the finished previous block,
    # later ones reading the cache only) gives the uncached logits and the training forward's logits.
    model = tiny_model(block_length, logit_shift=logit_shift, family=family, max_seq_len=64)
    rows = random_tokens(1, 64, seed=prompt_len)
    prompts = [rows[0, :prompt_len].tolist()]
    cached = _drive(model, prompts, rows, num_blocks=3, use_cache=True)
    uncached = _drive(model, prompts, rows, num_blocks=3, use_cache=False)
    l = block_length
    for k, ((pos, block, got, fed), (_, _, ref, _)) in enumerate(zip(cached, uncached)):
        predictable = pos[0] >= model.num_unpredictable  # (l,): position 0 has no predecessor under the shift
        assert _close(got[0], ref[0], predictable), f"forward {k}: cached != uncached"
        train = _training_logits(model, rows[0], pos[0], block[0])
        assert _close(got[0], train, predictable), f"forward {k}: sampler != training forward"
        if k >= 2:  # the cache is in use: first forward of a block = finished block + new block, then the block
            assert fed == (2 * l if k % 2 == 0 else l), f"forward {k} fed {fed} tokens"


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2's learned absolute positions see position-id errors
@pytest.mark.parametrize("logit_shift", [False, True], ids=["no-shift", "logit-shift"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_ragged_batch_logits_equal_single_prompt_logits(family, logit_shift, use_cache):
    # Prompts of 3, 13, 8, 1 and 6 tokens share one grid of columns (left padding by whole blocks); each
    # row's logits must be those of its prompt alone.
    model = tiny_model(4, logit_shift=logit_shift, family=family, max_seq_len=64)
    lengths = [3, 13, 8, 1, 6]
    rows = random_tokens(len(lengths), 64, seed=7)
    prompts = [rows[i, :n].tolist() for i, n in enumerate(lengths)]
    batch = _drive(model, prompts, rows, num_blocks=3, use_cache=use_cache)
    assert len(set(layout(prompts, 4, PAD, "cpu").first_valid.tolist())) > 1  # really ragged
    for i in range(len(lengths)):
        single = _drive(model, prompts[i : i + 1], rows[i : i + 1], num_blocks=3, use_cache=use_cache)
        for k, ((pos, block, got, _), (pos1, block1, ref, _)) in enumerate(zip(batch, single)):
            assert torch.equal(pos[i], pos1[0]) and torch.equal(block[i], block1[0])
            predictable = pos[i] >= model.num_unpredictable
            assert _close(got[i], ref[0], predictable), f"row {i} (prompt {lengths[i]}), forward {k}"


@pytest.mark.parametrize("logit_shift", [False, True], ids=["no-shift", "logit-shift"])
@pytest.mark.parametrize("block_length, prompt_len", [(4, 8), (4, 10), (1, 7), (8, 3)],
                         ids=["aligned", "mid-block", "ar", "l8-short-prompt"])
def test_one_greedy_step_fills_the_block_with_the_training_argmax(logit_shift, block_length, prompt_len):
    # A threshold so low that the first forward reveals the whole block: greedy decoding must then write
    # the argmax of the training forward's logits, with the prompt as clean context and the rest masked.
    l = block_length
    model = sharp_model(l, logit_shift=logit_shift)
    x0 = random_tokens(1, 32, seed=3)
    end = (prompt_len // l + 1) * l
    xt = x0.clone()
    xt[:, prompt_len:] = MASK_ID
    with torch.no_grad():
        expected = model(xt[:, :end], x0[:, :end])[0, prompt_len:end].argmax(-1)
    out = gen(model, [x0[0, :prompt_len].tolist()], max_new_tokens=end - prompt_len, temperature=0, tau=1e-9)
    assert out.nfe == 1
    assert out.new_tokens(0) == expected.tolist()


# -- 2. a batch equals its prompts one by one ------------------------------------------------------------

# Only greedy decoding (temperature 0) is compared: sampled decoding draws random numbers from one shared
# generator whose consumption depends on the batch (shape and number of active rows), so a sampled batch is
# not expected to reproduce the one-by-one samples.
@pytest.mark.parametrize(
    "block_length, logit_shift, settings",
    [
        (4, False, dict(sampler="threshold", tau=0.3)),
        (4, True, dict(sampler="threshold", tau=0.3)),
        (4, False, dict(sampler="fixed", tokens_per_step=2)),
        (8, False, dict(sampler="fixed", steps_per_block=3)),
        (1, True, dict(sampler="threshold")),
        (4, True, dict(sampler="edit", tau=0.3, editing_threshold=0.2)),
        (8, False, dict(sampler="entropy_bound", t_max=1.0, t_min=0.2)),
        (4, False, dict(sampler="threshold", tau=0.3, stop_stable_steps=1, stop_entropy=3.5)),
    ],
    ids=["threshold", "threshold-shift", "fixed-k2", "fixed-l8-3steps", "ar-shift", "edit-shift", "eb-schedule",
         "adaptive-stop"],
)
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_batch_equals_one_by_one_greedy(block_length, logit_shift, settings, use_cache):
    model = sharp_model(block_length, logit_shift=logit_shift)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 1, 12, 3, 8)]
    batch = gen(model, prompts, max_new_tokens=13, temperature=0, use_cache=use_cache, **settings)
    for i, p in enumerate(prompts):
        one = gen(model, [p], max_new_tokens=13, temperature=0, use_cache=use_cache, **settings)
        assert batch.new_tokens(i) == one.new_tokens(0), f"prompt {i} ({len(p)} tokens)"
        assert int(batch.lengths[i]) == 13 and bool(batch.stopped_at_eos[i]) is False
    cached = gen(model, prompts, max_new_tokens=13, temperature=0, use_cache=not use_cache, **settings)
    assert torch.equal(cached.sequences, batch.sequences)


def _eos_case(model, settings):
    """Two prompts and an EOS token that greedy decoding of the first writes early and of the second never."""
    candidates = [random_tokens(1, n, seed=10 + n)[0].tolist() for n in (2, 3, 5, 6, 7, 9)]
    full = [gen(model, [p], max_new_tokens=16, temperature=0, **settings).new_tokens(0) for p in candidates]
    for a, b in ((a, b) for a in range(len(candidates)) for b in range(len(candidates)) if a != b):
        for j, t in enumerate(full[a][:10]):
            if t not in full[b] and t not in full[a][:j] and j > 0:
                return candidates[a], candidates[b], full[a], full[b], t, j
    raise AssertionError("no prompt pair with an early EOS for one and none for the other")


@pytest.mark.parametrize("settings", [dict(sampler="threshold", tau=0.3), dict(sampler="fixed", tokens_per_step=1)],
                         ids=["threshold", "fixed"])
def test_samples_stop_at_their_own_eos_and_batch_equals_one_by_one(settings):
    model = sharp_model(4)
    pa, pb, full_a, full_b, eos, j = _eos_case(model, settings)
    kw = dict(max_new_tokens=16, temperature=0, eos_token_id=eos, **settings)
    one_a, one_b = gen(model, [pa], **kw), gen(model, [pb], **kw)
    assert one_a.new_tokens(0) == full_a[: j + 1]  # cut right after the first EOS
    assert one_a.new_tokens(0)[-1] == eos and bool(one_a.stopped_at_eos[0])
    assert one_b.new_tokens(0) == full_b and not bool(one_b.stopped_at_eos[0])
    for order in ([pa, pb], [pb, pa]):
        batch = gen(model, order, **kw)
        ia, ib = order.index(pa), order.index(pb)
        assert batch.lengths.tolist()[ia] == j + 1 < 16 == batch.lengths.tolist()[ib]  # different stops
        assert batch.stopped_at_eos.tolist()[ia] is True and batch.stopped_at_eos.tolist()[ib] is False
        assert batch.new_tokens(ia) == one_a.new_tokens(0) and batch.new_tokens(ib) == one_b.new_tokens(0)
        assert batch.sequences.shape[1] == max(len(pa) + j + 1, len(pb) + 16)
        # Right padding after the cut, prompts untouched.
        end_a = len(pa) + j + 1
        assert batch.sequences[ia, :end_a].tolist() == pa + full_a[: j + 1]
        assert (batch.sequences[ia, end_a:] == PAD).all()


# -- 3. output rules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_length", [1, 4, 8])
@pytest.mark.parametrize("max_new_tokens", [1, 3, 8, 13])
def test_max_new_tokens_is_never_exceeded_and_eos_cuts(block_length, max_new_tokens):
    model = sharp_model(block_length)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in range(1, 13)]
    free = gen(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0)
    assert free.lengths.tolist() == [max_new_tokens] * len(prompts)
    assert not free.stopped_at_eos.any()
    assert free.sequences.shape == (len(prompts), 12 + max_new_tokens)
    for i, p in enumerate(prompts):
        assert free.sequences[i, : len(p)].tolist() == p
    # An EOS that the samples write now and then: each sample stops at its first one, or runs to the limit.
    eos = max(set(sum(map(free.new_tokens, range(len(prompts))), [])), key=lambda t: sum(
        free.new_tokens(i).count(t) for i in range(len(prompts))))
    out = gen(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, eos_token_id=eos)
    assert out.stopped_at_eos.any() or max_new_tokens == 1
    for i, p in enumerate(prompts):
        new = out.new_tokens(i)
        assert 1 <= len(new) <= max_new_tokens
        assert eos not in new[:-1]
        assert bool(out.stopped_at_eos[i]) == (new[-1] == eos)
        if new[-1] != eos:
            assert len(new) == max_new_tokens
        assert (out.sequences[i, len(p) + len(new) :] == PAD).all()
    assert not (out.sequences == MASK_ID).any() and not (free.sequences == MASK_ID).any()


def test_a_cancelled_sample_leaves_the_batch_after_its_current_block_and_the_others_go_on():
    model = sharp_model(4)
    prompts = [random_tokens(1, 4, seed=s)[0].tolist() for s in range(3)]
    asked = []

    def cancelled(i: int) -> bool:
        asked.append(i)
        return i == 1

    def run(**extra) -> GenerationOutput:  # one generator per sample: its tokens do not depend on the batch
        generators = [torch.Generator().manual_seed(s) for s in range(3)]
        return model.generate(prompts, generator=generators, max_new_tokens=16, temperature=1.0, eos_token_id=None,
                              pad_token_id=PAD, **extra)

    full, out = run(), run(cancelled=cancelled)
    assert out.stop_reasons == ["max_new_tokens", "cancelled", "max_new_tokens"]
    assert out.lengths.tolist() == [16, 4, 16]  # sample 1 kept its first block only
    assert out.new_tokens(1) == full.new_tokens(1)[:4] and out.new_tokens(0) == full.new_tokens(0)
    assert asked.count(1) == 1  # never asked again once it left


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("block_length", [1, 4, 8])
def test_no_mask_token_in_any_output(sampler, block_length):
    if block_length == 1 and sampler_class(sampler).edits:
        pytest.skip("an editing sampler is refused at block_length 1 (tests/test_native_samplers.py)")
    model = tiny_model(block_length, max_seq_len=64)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (1, 4, 6, 11)]
    out = gen(model, prompts, max_new_tokens=11, sampler=sampler, temperature=1.0)
    assert out.lengths.tolist() == [11] * 4
    assert not (out.sequences == MASK_ID).any()


@pytest.mark.parametrize(
    "family, logit_shift, window",
    [("llama", False, 16), ("llama", False, None), ("llama", True, 16), ("gpt2", True, None), ("gpt2", False, 12)],
    ids=["window16", "default-window", "shift-window16", "gpt2-shift-default", "gpt2-window12"],
)
def test_sliding_window_runs_past_the_training_context(family, logit_shift, window):
    # Training context 32 tokens; 100 new tokens. The cache never holds more than the window, the output is
    # complete, and the re-encoding at fresh positions is exact (uncached decoding slides the same way).
    model = sharp_model(4, family=family, logit_shift=logit_shift, max_seq_len=32)
    prompt = random_tokens(1, 5, seed=1)[0].tolist()
    limit = window or 32
    cached = gen(model, [prompt], max_new_tokens=100, temperature=0, window=window)
    uncached = gen(model, [prompt], max_new_tokens=100, temperature=0, window=window, use_cache=False)
    assert cached.lengths.tolist() == [100] and cached.sequences.shape[1] == 105 > limit
    assert 0 < cached.max_cache_length <= limit
    assert uncached.tokens_processed_per_forward <= limit  # the prefix seen is bounded too
    assert not (cached.sequences == MASK_ID).any()
    assert torch.equal(cached.sequences, uncached.sequences)


def test_a_prompt_longer_than_the_window_is_refused():
    model = tiny_model(4, max_seq_len=32)
    with pytest.raises(ValueError, match="window"):
        gen(model, [random_tokens(1, 40)[0].tolist()], max_new_tokens=4)
    with pytest.raises(ValueError, match="window"):
        gen(model, [random_tokens(1, 20)[0].tolist()], max_new_tokens=4, window=16)
    gen(model, [random_tokens(1, 20)[0].tolist()], max_new_tokens=4)  # fits the default window of 32


@pytest.mark.parametrize(
    "settings, prompts, message",
    [
        (dict(tau=0.0), None, "tau"), (dict(tau=1.5), None, "tau"), (dict(top_p=0.0), None, "top_p"),
        (dict(steps_per_block=0), None, "steps_per_block"), (dict(sampler="nope"), None, "sampler"),
        (dict(window=6), None, "window"), (dict(window=4), None, "window"),
        (dict(max_new_tokens=0), None, "max_new_tokens"), (dict(temperature=-1.0), None, "temperature"),
        (dict(sampler="fixed", tokens_per_step=0), None, "tokens_per_step"),
        (dict(sampler="remask", remask_threshold=0.0), None, "remask_threshold"),
        ({}, [[1, MASK_ID, 2]], "mask token"), ({}, [[1, 2], []], "prompt"), ({}, [[1, 64]], r"\[0, 64\)"),
        ({}, [], "prompt"),
    ],
    ids=["tau0", "tau1.5", "top_p0", "steps0", "sampler", "window-not-multiple", "window-one-block", "max_new0",
         "temperature", "tokens_per_step0", "remask_threshold0", "mask-in-prompt", "empty-prompt", "out-of-vocab",
         "no-prompts"],
)
def test_bad_generation_inputs_raise_value_error(settings, prompts, message):
    model = tiny_model(4, max_seq_len=64)
    with pytest.raises(ValueError, match=message):
        gen(model, prompts if prompts is not None else [[1, 2, 3]], **{"max_new_tokens": 4, **settings})


def test_tensor_input_with_left_padding_equals_list_input():
    model = sharp_model(4)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 11, 12]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    a = gen(model, prompts, max_new_tokens=9, temperature=0)
    b = gen(model, ids, attention_mask=mask, max_new_tokens=9, temperature=0)
    assert torch.equal(a.sequences, b.sequences) and a.prompt_lengths.tolist() == [6, 2]


# -- 4. seeding ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_output_other_seed_other_output(sampler):
    model = sharp_model(4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(max_new_tokens=12, sampler=sampler, temperature=1.0)
    first, again = gen(model, prompts, seed=0, **kw), gen(model, prompts, seed=0, **kw)
    other = gen(model, prompts, seed=1, **kw)
    assert torch.equal(first.sequences, again.sequences) and first.nfe == again.nfe
    assert not torch.equal(first.sequences, other.sequences)
    # The config's seed stands in for a generator.
    a = model.generate(prompts, seed=5, eos_token_id=None, **kw)
    b = model.generate(prompts, seed=5, eos_token_id=None, **kw)
    assert torch.equal(a.sequences, b.sequences)


# -- 5. the sample CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained for 3 steps through ``blockdiff train`` (context 32, block length 4)."""
    return train_tiny_cli_run(tmp_path_factory.mktemp("sample_cli"))


def _samples(out: str) -> dict[int, tuple[int, str]]:
    """``{i: (new tokens, first line of the printed text)}`` from the ``sample`` verb's output."""
    lines = out.splitlines()
    found = {}
    for k, line in enumerate(lines):
        m = re.search(r"sample (\d+): (\d+) tokens", line)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), lines[k + 1] if k + 1 < len(lines) else "")
    return found


def test_cli_sample_prints_every_sample_and_writes_a_trace(run_dir, tmp_path, capsys):
    from blockdiff.cli import main

    trace = tmp_path / "trace.jsonl"
    rc = main(
        ["sample", str(run_dir), "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "10", "--trace", str(trace)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    samples = _samples(out)
    assert sorted(samples) == [0, 1]
    assert samples[0][1].startswith("a") and samples[1][1].startswith("bcd")
    assert all(1 <= n <= 10 for n, _ in samples.values())
    assert "NFE" in out
    assert trace.is_file() and not trace.with_name(trace.name + ".partial").exists()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    header, *events, end = records
    assert header["kind"] == "header" and end["kind"] == "end"  # what makes the trace viewable (test_viewer.py)
    assert [len(p) for p in header["prompts"]] == [2, 4]  # BOS + the prompt's bytes
    assert end["lengths"] == [samples[i][0] for i in (0, 1)]
    assert [len(t) for t in end["new_tokens"]] == end["lengths"] and len(end["texts"]) == 2
    assert events
    for e in events:
        assert {"block", "step", "revealed", "tokens", "finished", "samples"} <= set(e)
        assert len(e["revealed"]) == len(e["tokens"]) == len(e["samples"])
    blocks = {e["block"] for e in events}
    assert blocks == {e["block"] for e in events if e["finished"]}  # every block ends with a final event
    assert sum(len(r) for e in events for r in e["revealed"]) >= sum(n for n, _ in samples.values())


def test_cli_sample_show_denoising(run_dir, capsys):
    from blockdiff.cli import main

    rc = main(["sample", str(run_dir), "--prompt", "xy", "--max-new-tokens", "6", "--show-denoising"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert 0 in _samples(out)


def test_cli_sample_prompt_file(run_dir, tmp_path, capsys):
    from blockdiff.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond line\n")
    rc = main(["sample", str(run_dir), "--prompt-file", str(prompts), "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    samples = _samples(out)
    assert sorted(samples) == [0, 1]  # the blank line is skipped
    assert samples[0][1].startswith("first") and samples[1][1].startswith("second line")


@pytest.mark.parametrize("dash", [False, True], ids=["piped", "prompt-dash"])
def test_cli_sample_prompts_from_stdin(run_dir, monkeypatch, capsys, dash):
    from blockdiff.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nworld\n"))  # StringIO.isatty() is False
    rc = main(["sample", str(run_dir), "--max-new-tokens", "5"] + (["--prompt", "-"] if dash else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    samples = _samples(out)
    assert sorted(samples) == [0, 1]
    assert samples[0][1].startswith("hello") and samples[1][1].startswith("world")


def test_cli_no_cache_gives_the_same_greedy_text(run_dir, capsys):
    from blockdiff.cli import main

    args = [
        "sample",
        str(run_dir),
        "--prompt",
        "The ",
        "--prompt",
        "a cat",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr().out
    assert _samples(cached) and cached.split("NFE")[0] == uncached.split("NFE")[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau", "1.5"], "tau"),
        (["--top-p", "0"], "top_p"),
        (["--steps-per-block", "0"], "steps_per_block"),
        (["--prompt-file", "EMPTY"], "empty"),
        (["--prompt", "x" * 40], "window"),  # 41 tokens with BOS: does not fit the 32-token context
    ],
    ids=["tau", "top-p", "steps-per-block", "empty-prompt-file", "prompt-longer-than-window"],
)
def test_cli_sample_bad_input_exits_2_and_leaves_no_trace(run_dir, tmp_path, capsys, args, message):
    from blockdiff.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    if "--prompt" not in args and "--prompt-file" not in args:
        args += ["--prompt", "a"]
    trace = tmp_path / "trace.jsonl"
    rc = main(["sample", str(run_dir), *args, "--max-new-tokens", "4", "--trace", str(trace)])
    out = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert "error" in out and message in out
    assert "Traceback" not in out
    assert not trace.exists(), f"a bad input left a trace file ({trace.stat().st_size} bytes)"
    assert not trace.with_name(trace.name + ".partial").exists()


# -- 6. Lightning predict, streamers, saved generation defaults --------------------------------------------


def test_trainer_predict_batches_prompts_into_generation_outputs():
    import lightning as L
    from torch.utils.data import DataLoader

    from blockdiff.config import NoiseConfig, OptimConfig
    from blockdiff.training.lightning_module import BlockDiffusionModule

    model = sharp_model(4)
    module = BlockDiffusionModule(model, NoiseConfig(), OptimConfig(), max_steps=1, tokens_per_byte=1.0)
    module.generation_overrides = dict(max_new_tokens=7, temperature=0, eos_token_id=None, sampler="threshold")
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (1, 5, 9, 2, 6)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    results = trainer.predict(module, DataLoader(prompts, batch_size=2, collate_fn=list))
    assert len(results) == 3 and all(isinstance(r, GenerationOutput) for r in results)
    assert [len(r.lengths) for r in results] == [2, 2, 1]
    for k, r in enumerate(results):
        direct = gen(model, prompts[2 * k : 2 * k + 2], max_new_tokens=7, temperature=0)
        assert torch.equal(r.sequences, direct.sequences)


class RecordingStreamer:
    """A streamer in the ``transformers`` sense: ``put(token tensor)`` per chunk, then ``end()``."""

    def __init__(self):
        self.calls: list[tuple[str, list]] = []

    def put(self, value: torch.Tensor) -> None:
        assert not self.calls or self.calls[-1][0] != "end", "put after end"
        self.calls.append(("put", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.calls.append(("end", []))


@pytest.mark.parametrize("max_new_tokens", [10, 13], ids=["ends-mid-block", "ends-at-block-end"])
def test_streamer_gets_the_prompt_then_each_finished_block_then_end(max_new_tokens):
    model = sharp_model(4)
    prompt = [1, 2, 3]
    streamer, events = RecordingStreamer(), []
    out = model.generate(
        [prompt],
        streamer=streamer,
        observer=events.append,
        max_new_tokens=max_new_tokens,
        temperature=0,
        eos_token_id=None,
    )
    blocks = sum(e.finished for e in events)
    assert blocks == 4  # new positions 3..12 (or 3..15): blocks [0,4) [4,8) [8,12) [12,16)
    assert [kind for kind, _ in streamer.calls] == ["put"] * (1 + blocks) + ["end"]
    assert streamer.calls[0][1] == prompt
    streamed = sum((v for kind, v in streamer.calls[1:-1]), [])
    assert streamed == out.new_tokens(0)  # exactly the new tokens: no mask, nothing past max_new_tokens


def test_streamer_stops_at_eos():
    # An EOS in the middle of a block: the streamed tokens must be the output, which is cut right after EOS.
    model = sharp_model(4)
    prompt = [1, 2, 3]
    full = gen(model, [prompt], max_new_tokens=16, temperature=0).new_tokens(0)
    # The first new token that occurs for the first time at a position that is not a block's last one.
    j = next(j for j, t in enumerate(full) if t not in full[:j] and (len(prompt) + j) % 4 != 3 and j > 0)
    streamer = RecordingStreamer()
    out = model.generate([prompt], streamer=streamer, max_new_tokens=16, temperature=0, eos_token_id=full[j])
    assert out.new_tokens(0) == full[: j + 1]
    streamed = sum((v for kind, v in streamer.calls[1:-1]), [])
    assert streamed == out.new_tokens(0), f"streamed {streamed} but generated {out.new_tokens(0)}"


def test_a_streamer_needs_a_single_prompt():
    model = tiny_model(4, max_seq_len=64)
    with pytest.raises(ValueError, match="single prompt"):
        model.generate([[1, 2], [3]], streamer=RecordingStreamer(), max_new_tokens=4)


def test_generation_config_round_trips_through_save_pretrained(tmp_path):
    from blockdiff.modeling.model import BlockDiffusionLM

    model = tiny_model(4, max_seq_len=64)
    cfg = model.generation_config
    cfg.sampler, cfg.tau, cfg.tokens_per_step, cfg.max_new_tokens = "fixed", 0.42, 3, 17
    cfg.use_cache, cfg.window, cfg.top_k = False, 16, 5
    model.save_pretrained(tmp_path)
    loaded = BlockDiffusionLM.from_pretrained(tmp_path)
    got = loaded.generation_config
    assert (got.sampler, got.tau, got.tokens_per_step, got.max_new_tokens) == ("fixed", 0.42, 3, 17)
    assert (got.use_cache, got.window, got.top_k) == (False, 16, 5)
    # The loaded defaults are the ones generate uses.
    out = loaded.generate([[1, 2, 3, 4]], eos_token_id=None)
    assert out.lengths.tolist() == [17]
    assert out.nfe == 4 * 2 + 1  # four full blocks at 3 tokens per step (2 forwards each), then 1 token
    assert out.max_cache_length == 0  # use_cache=False came back


def test_unknown_generation_setting_raises():
    model = tiny_model(4, max_seq_len=64)
    with pytest.raises(ValueError, match="unknown_setting"):
        model.generate([[1, 2, 3]], unknown_setting=1)


def test_cli_sample_ctrl_c_prints_the_finished_blocks(run_dir, capsys, monkeypatch):
    """Ctrl-C during `blockdiff sample` prints what was finished so far and exits 130."""
    from blockdiff.cli import main
    from blockdiff.viewer import watch

    original = watch.FinishedBlocks.__call__
    seen = {"finished": 0}

    def interrupt_after_two_blocks(self, event):
        original(self, event)
        seen["finished"] += event.finished
        if seen["finished"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(watch.FinishedBlocks, "__call__", interrupt_after_two_blocks)
    assert main(["sample", str(run_dir), "--prompt", "abc", "--max-new-tokens", "40"]) == 130
    out = capsys.readouterr().out
    assert "finished blocks so far" in out
    assert "abc" in out.split("finished blocks so far", 1)[1]


@pytest.mark.parametrize("sampler", ["first_hitting", "threshold", "ddpm", "fixed", "remask", "entropy_bound", "edit"])
def test_sampled_batch_with_per_sample_generators_equals_one_by_one(sampler):
    """With one generator per prompt, sampled (temperature 1) output does not depend on the batch.

    float64: a random tiny model is nearly uniform, so the entropy order of its positions can flip under the
    ~1e-7 float32 difference between a padded batched forward and a single one (checked: fp32 flips it for
    entropy_bound, fp64 does not). The identity is about the random streams, not that float noise."""
    model = tiny_model(4, max_seq_len=64).double()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]
    settings = dict(
        max_new_tokens=13,
        sampler=sampler,
        temperature=1.0,
        eos_token_id=None,
        pad_token_id=0,
        tau=0.05,
        entropy_bound=3.0,
    )
    seeds = [11, 22, 33, 44]
    batch = model.generate(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **settings)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = model.generate([prompt], generator=[torch.Generator().manual_seed(seed)], **settings)
        assert batch.new_tokens(i) == alone.new_tokens(0), f"sample {i} changed with its batch ({sampler})"
    other = model.generate(prompts, generator=[torch.Generator().manual_seed(s + 1) for s in seeds], **settings)
    assert any(other.new_tokens(i) != batch.new_tokens(i) for i in range(len(prompts)))


def test_a_generator_list_must_match_the_prompts():
    model = tiny_model(4, max_seq_len=64)
    with pytest.raises(ValueError, match="one per prompt"):
        model.generate([[1, 2], [3]], generator=[torch.Generator()], max_new_tokens=4)


# -- 7. the lean block step: no mask when none is needed, GQA without copies, head on masked rows -------------


def gqa_model(family: str = "llama", block_length: int = 4) -> "BlockDiffusionLM":  # noqa: F821
    """A tiny grouped-query decoder (4 query heads, 2 key/value heads), fp64 so paths agree to 1e-10."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from blockdiff.modeling.model import BlockDiffusionLM
    from blockdiff.modeling.spec import BlockDiffusionSpec

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    backbone = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().double()
    return BlockDiffusionLM(backbone, BlockDiffusionSpec(MASK_ID, block_length, True, 64))


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's (mask given, enable_gqa, is_causal), spied on for one test."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        calls.append((attn_mask is not None, enable_gqa, is_causal))
        return original(*args, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_attention_and_fast_gqa_equal_the_masked_forward(family, sdpa_calls):
    """A block over a cached prefix: the all-True 4-D mask (transformers copies K/V per head), no mask at all
    (FULL_ATTENTION), and the mask with SDPA's enable_gqa give the same hidden states and cache; the decoder's
    config and the environment are left as they were."""
    import os

    from blockdiff.modeling.model import FULL_ATTENTION

    model = gqa_model(family)
    ids = random_tokens(2, 12, seed=1)
    pos = torch.arange(12)[None].expand(2, -1)
    cols = torch.arange(12)
    outs = []
    for mask, fast in [("dense", False), (FULL_ATTENTION, False), ("dense", True)]:
        cache = model.new_cache()
        with torch.no_grad():
            model.hidden_states(ids[:, :8], pos[:, :8], model.sampling_mask(cols[:8], cols[:8], torch.zeros(2)),
                                past_key_values=cache, use_cache=True)
            allowed = model.sampling_mask(cols[8:], cols, torch.zeros(2, dtype=torch.long)) if mask == "dense" else mask
            sdpa_calls.clear()
            hidden, cache = model.hidden_states(ids[:, 8:], pos[:, 8:], allowed, past_key_values=cache, use_cache=True,
                                                fast_gqa=fast)
        outs.append((hidden, cache.layers[0].keys))
        assert set(sdpa_calls) == {{"dense": (True, False, False), FULL_ATTENTION: (False, True, False)}[mask]
                                   if not fast else (True, True, False)}
    for hidden, keys in outs[1:]:
        assert torch.allclose(hidden, outs[0][0], atol=1e-10) and torch.equal(keys, outs[0][1])
    assert not hasattr(model.backbone.config, "is_causal") or model.backbone.config.is_causal
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_sampling_mask_is_full_attention_exactly_when_it_allows_everything():
    from blockdiff.modeling.model import FULL_ATTENTION

    model = tiny_model(4)
    for q0, q, k0, first in [(8, 4, 0, [0, 0]), (8, 4, 0, [0, 3]), (4, 8, 0, [0, 0]), (8, 4, 4, [4, 2]),
                             (8, 2, 0, [0]), (9, 3, 2, [1, 2])]:
        q_cols, k_cols = torch.arange(q0, q0 + q), torch.arange(k0, q0 + q)
        first = torch.tensor(first)
        dense = model.sampling_mask(q_cols, k_cols, first)
        full = model.sampling_mask(q_cols, k_cols, first, allow_full=True)
        assert (full is FULL_ATTENTION) == bool(dense.all()), (q0, q, k0, first)
        if full is not FULL_ATTENTION:
            assert torch.equal(full, dense)


def test_the_head_runs_on_masked_rows_and_the_mask_is_built_once_per_block(monkeypatch, sdpa_calls):
    """One token revealed per forward (fixed, k=1): the output head sees 4, 3, 2, 1 rows per block; a ragged
    batch needs a mask, built at most twice per block (the forward that caches the finished block, the others)."""
    model = gqa_model()
    rows, masks = [], []
    head, build = model.logits, model.sampling_mask
    monkeypatch.setattr(model, "logits", lambda hidden: rows.append(hidden.shape[0]) or head(hidden))
    monkeypatch.setattr(model, "sampling_mask", lambda *a, **k: masks.append(1) or build(*a, **k))
    settings = dict(max_new_tokens=8, sampler="fixed", tokens_per_step=1, eos_token_id=None, temperature=0.0)
    out = model.generate([[1, 2, 3, 4]], **settings)
    assert rows == [4, 3, 2, 1] * 2 and out.nfe == 8
    assert (True, False, False) not in sdpa_calls  # no forward copies K/V for a mask
    rows.clear(), masks.clear()
    out = model.generate([[1, 2, 3, 4], [5, 6]], **settings)
    assert rows == [6, 4, 2, 1] + [8, 6, 4, 2] + [2, 1] and len(masks) <= 2 * 3 < out.nfe == 10


def test_cli_sample_trace_never_replaces_an_existing_file_without_overwrite(run_dir, tmp_path, capsys):
    """issue 20: ``--trace`` over an existing file (or the prompt file) is refused before any work."""
    from blockdiff.cli import main

    trace = tmp_path / "notes.jsonl"
    trace.write_text("my notes\n")
    base = ["sample", str(run_dir), "--prompt", "a", "--max-new-tokens", "4", "--trace"]
    assert main([*base, str(trace)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and trace.read_text() == "my notes\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n")
    assert main(["sample", str(run_dir), "--prompt-file", str(prompts), "--trace", str(prompts), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err and prompts.read_text() == "a\n"
    assert main([*base, str(tmp_path / "missing" / "t.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()
    assert main([*base, str(trace), "--overwrite"]) == 0
    assert '"kind": "header"' in trace.read_text()
