"""Corpus rows of a drafter's training (``data.corpus``; ``training/drafter_data.py``): windows of a text corpus
labelled by the target itself. Their labels are the target's greedy next tokens from the same forward that captures
the features; a block learns the target's greedy chain only as far as the text follows it; for a row that is the
target's own greedy text the labels change nothing; the windows come from the training split only."""

from __future__ import annotations

import pytest
import torch
from test_distill import corpus_dir, teacher_tokenizer  # noqa: F401  (fixtures)
from test_speculative import ar_model

from blockdiff.config.checks import ConfigError
from blockdiff.config.drafter import load_drafter_config
from blockdiff.config.sections import DataConfig
from blockdiff.data.corpus import load_documents, pack_documents
from blockdiff.errors import UsageError
from blockdiff.modeling.dflash import target_features
from blockdiff.training.drafter_data import Rows, anchor_batch, capture_features, corpus_rows, draft_vocabulary

MASK = 63


def blocks(rows, labels, anchors=4, l=4, prompts=None):
    feats = [torch.zeros(len(r), 8) for r in rows]
    batch = anchor_batch(feats, rows, prompts or [1] * len(rows), anchors, l, MASK, torch.Generator().manual_seed(0),
                         labels)
    return {int(batch.positions[i, j * l]): batch.targets[i, j * l + 1 : (j + 1) * l].tolist()
            for i in range(len(rows)) for j in range(anchors) if batch.targets[i, j * l + 1] != -100}


def test_a_block_learns_the_targets_chain_until_the_text_leaves_it():
    row = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [2, 3, 9, 5, 6, 7, 8, 0]  # the target's next token after each position: it leaves the text after 3
    assert blocks([row], [labels], anchors=6) == {
        1: [3, 9, -100],  # x2 = 3 is the chain; g2 = 9 is draft 2's target, and x3 = 4 leaves the chain
        2: [9, -100, -100],  # the first draft's target is always the target's own next token
        3: [5, 6, 7],  # the text follows the chain through the whole block
        4: [6, 7, 8],
        5: [7, 8, -100],  # past the row's end: nothing
        6: [8, -100, -100],
    }


def test_labels_that_are_the_text_give_the_targets_of_a_distilled_row():
    rows = [[5, 9, 1, 33, 2, 7, 7, 40, 12, 3, 8], [4, 4, 4, 19, 6, 2]]
    following = [r[1:] + [0] for r in rows]  # the target's greedy text: each label is the next token
    assert blocks(rows, following, prompts=[3, 2]) == blocks(rows, None, prompts=[3, 2])


def test_captured_labels_are_the_targets_argmax_of_each_row_alone():
    target = ar_model("llama", 64).float()
    rows = Rows([[5, 9, 1, 33, 2, 7], [4, 4, 19], [8, 3, 3, 3, 60, 2, 2, 11]], [1, 1, 1])
    layers = [0, 1]
    features = capture_features(target, rows, layers, torch.ones(2), batch=2, labels=True)
    for i, (ids, f) in enumerate(zip(rows.ids, features)):
        labels = rows.labels[i]
        with torch.no_grad():
            out = target(torch.tensor([ids]), output_hidden_states=True)
        assert labels == out.logits[0].argmax(-1).tolist()
        torch.testing.assert_close(f, target_features(out.hidden_states, layers)[0].to(torch.bfloat16))
    unlabelled = Rows(rows.ids[:1], [1])
    capture_features(target, unlabelled, layers, torch.ones(2), batch=2)
    assert unlabelled.labels == {}


def test_the_draft_vocabulary_counts_a_corpus_rows_labels_not_its_text():
    rows = Rows([[1, 1, 1, 5, 5, 5, 7], [2, 2, 2, 2]], [3, 1], {1: [9, 9, 9, 9]})
    assert draft_vocabulary(rows, 2, 64).tolist() == [5, 9]


def test_corpus_rows_are_training_windows_never_held_out_ones(corpus_dir):  # noqa: F811
    tokenizer = teacher_tokenizer()
    rows = corpus_rows(str(corpus_dir), tokenizer, 3, 16)
    split = pack_documents(load_documents(DataConfig(source=str(corpus_dir), max_seq_len=16)), tokenizer, 16, 0.05)
    train = [w.tolist() for w in split.train["input_ids"]]
    assert len(rows) == 3 and rows.prompt == [1, 1, 1] and rows.labels == {}
    assert all(r in train[:-1] for r in rows.ids)  # the last training window is never used
    with pytest.raises(UsageError, match="data.corpus_windows"):
        corpus_rows(str(corpus_dir), tokenizer, len(train), 16)


def test_corpus_windows_without_a_corpus_is_one_line():
    with pytest.raises(ConfigError, match="needs data.corpus"):
        load_drafter_config(overrides=["data.corpus_windows=5"])
    with pytest.raises(ConfigError, match="corpus_window_tokens"):
        load_drafter_config(overrides=["data.corpus=shakespeare", "data.corpus_window_tokens=2"])
