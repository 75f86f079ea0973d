"""Block beam search (``sampling/beams.py``, ``block_beams`` / ``beam_width``).

a. ``block_beams=1, beam_width=1`` runs the beam loop and equals plain sampling with the same seed, token for token
   (absorbing and uniform noise, with a sliding window past the training context).
b. Scoring picks the highest-scoring candidate: with an AR scorer that prefers small token ids, every kept row is
   the top of the cumulative scores, the output is the kept candidate, and its tokens are smaller than the average
   candidate's; without a scorer the block-NELBO score ranks candidates too (beam_width=2 keeps two beams).
c. Counting and refusals: row forwards are candidates x forwards; streamers and num_return_sequences are refused.

Shape legend: ``r`` rows, ``l`` block length, ``v`` vocab.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import MASK_ID, VOCAB, tiny_model

from blockdiff.errors import UsageError
from blockdiff.modeling.model import BlockDiffusionLM
from blockdiff.sampling.generation import beam_generate
from blockdiff.sampling.inputs import with_overrides


def _model(kind="absorbing", logit_shift=False):
    model = tiny_model(4, logit_shift=logit_shift, max_seq_len=32)
    return BlockDiffusionLM(model.backbone, replace(model.spec, noise_kind=kind))


@pytest.mark.parametrize("kind, sampler", [("absorbing", "threshold"), ("absorbing", "first_hitting"),
                                           ("uniform", "ddpm"), ("uniform", "threshold")])
@pytest.mark.parametrize("window", [None, 16])
def test_one_beam_equals_plain_sampling(kind, sampler, window):
    model = _model(kind, logit_shift=True)
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 8]):
        settings = dict(max_new_tokens=40, sampler=sampler, temperature=1.0, tau=0.05, window=window,
                        eos_token_id=None)
        plain = model.generate([prompt], generator=torch.Generator().manual_seed(3), **settings)
        config = with_overrides(model.generation_config, {**settings, "block_beams": 1, "beam_width": 1})
        beams = beam_generate(model, [prompt], config, torch.Generator().manual_seed(3))
        assert beams.new_tokens(0) == plain.new_tokens(0)
        assert beams.nfe == plain.nfe and int(beams.sample_nfe[0]) == plain.nfe


def _small_ids_scorer(ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits that prefer small ids: log p(y) = -0.5 y + const, whatever the prefix."""
    logits = -0.5 * torch.arange(VOCAB, dtype=torch.float).expand(*ids.shape[:-1], ids.shape[-1] - 1, VOCAB)
    return logits.clone()


def test_scoring_keeps_the_highest_scoring_candidate():
    model = _model()
    events = []
    config = with_overrides(model.generation_config, dict(max_new_tokens=12, block_beams=8, beam_width=1,
                                                          temperature=1.0, eos_token_id=None))
    out = beam_generate(model, [[1, 2]], config, torch.Generator().manual_seed(0), scorer=_small_ids_scorer,
                        observer=events.append)
    assert len(events) == 4  # columns 0-15: 2 new tokens in block 0, 4 + 4, then 2 (the rest is past max_new_tokens)
    for ev in events:
        assert ev.candidates.shape == (8, 4) and int(ev.kept[0]) == int(ev.scores.argmax())
    last = events[-1]
    assert out.new_tokens(0)[-2:] == last.candidates[int(last.kept[0])][:2].tolist()
    # block 0 (prompt in columns 0-1): its score is exactly minus 0.5 x the generated ids, up to a shared constant
    first = events[0]
    gen_ids = first.candidates[:, 2:].sum(-1).float()
    assert torch.allclose(first.scores - first.scores[0], -0.5 * (gen_ids - gen_ids[0]), atol=1e-3)
    new = torch.tensor(out.new_tokens(0)).float()
    every = torch.cat([ev.candidates.flatten() for ev in events]).float()
    assert new.mean() < every.mean()  # the search moved the text towards what the scorer likes


@pytest.mark.parametrize("kind", ["absorbing", "uniform"])
def test_block_nelbo_scoring_keeps_k_beams_with_their_caches(kind):
    model = _model(kind)
    events = []
    config = with_overrides(model.generation_config, dict(max_new_tokens=16, block_beams=3, beam_width=2,
                                                          sampler="ddpm" if kind == "uniform" else "threshold",
                                                          temperature=1.0, eos_token_id=None, beam_score_draws=2))
    out = beam_generate(model, [[1, 2, 3, 4]], config, torch.Generator().manual_seed(0), observer=events.append)
    assert [ev.candidates.shape[0] for ev in events] == [3, 6, 6, 6]  # 1 beam x 3, then 2 beams x 3
    for ev in events:
        assert ev.kept.tolist() == ev.scores.topk(2).indices.tolist() and torch.isfinite(ev.scores).all()
    assert len(out.new_tokens(0)) == 16 and MASK_ID not in out.new_tokens(0)
    # the output is the best beam: its last block is the top candidate of the last event
    assert out.new_tokens(0)[-4:] == events[-1].candidates[int(events[-1].kept[0])].tolist()
    # compute: every forward of a block runs all of its rows
    assert int(out.sample_nfe[0]) > out.nfe


def test_model_generate_routes_block_beams_and_refuses_what_it_cannot_do():
    model = _model()
    out = model.generate([[1, 2], [3]], max_new_tokens=8, block_beams=2, generator=torch.Generator().manual_seed(0),
                         eos_token_id=None)
    assert out.lengths.tolist() == [8, 8]
    with pytest.raises(UsageError, match="num_return_sequences"):
        model.generate([[1]], max_new_tokens=8, block_beams=2, num_return_sequences=2)
    with pytest.raises(UsageError, match="block_beams must be an integer >= 1"):
        model.generate([[1]], max_new_tokens=8, block_beams=0)


def test_beams_whose_first_block_holds_the_whole_prompt():
    # the first block's prompt tail leaves an empty cache; selecting and repeating its rows must still line up (a
    # DynamicCache leaves the batch of an empty layer alone), and the window slides past the training context
    model = tiny_model(16, max_seq_len=64)
    out = model.generate([[1, 2, 3, 4, 5, 6, 7]], max_new_tokens=64, block_beams=4, beam_width=2,
                         generator=torch.Generator().manual_seed(0), eos_token_id=None)
    assert out.lengths.tolist() == [64]


def test_beam_counters_are_counted_like_plain_sampling():
    # issue 20 item 12: the footer said "0.0 tokens processed per batched forward, largest KV cache 0" for beams
    model = _model(logit_shift=True)
    settings = dict(max_new_tokens=16, temperature=1.0, eos_token_id=None)
    plain = model.generate([[1, 2, 3]], generator=torch.Generator().manual_seed(3), **settings)
    config = with_overrides(model.generation_config, {**settings, "block_beams": 1, "beam_width": 1})
    one = beam_generate(model, [[1, 2, 3]], config, torch.Generator().manual_seed(3))
    assert one.tokens_processed_per_forward == plain.tokens_processed_per_forward > 0
    assert one.max_cache_length == plain.max_cache_length > 0
    config = with_overrides(model.generation_config, {**settings, "block_beams": 3, "beam_width": 2})
    many = beam_generate(model, [[1, 2, 3]], config, torch.Generator().manual_seed(3))
    assert many.tokens_processed_per_forward > plain.tokens_processed_per_forward  # 3 and 6 rows per forward
    assert many.max_cache_length >= plain.max_cache_length


def test_beam_sizes_are_bounded_before_any_work():
    # issue 20 item 9: block_beams=1000000 was OOM-killed; beam_width > block_beams was accepted silently
    model = _model()
    with pytest.raises(UsageError, match="beam_width=4 must be at most block_beams=2"):
        model.generate([[1]], max_new_tokens=8, block_beams=2, beam_width=4)
    with pytest.raises(UsageError, match=r"block_beams=1000000 x beam_width=1 rows .* \(at most 256"):
        model.generate([[1]], max_new_tokens=8, block_beams=1000000)
