"""Corpus loading, packing and tokenizers, on small text files the tests write themselves.

What is checked here:

* packing: every window has exactly ``max_seq_len`` tokens; the window stream is the concatenation of
  ``BOS + doc + EOS`` in document order; the held-out split is the tail (the last document's text);
  train + held-out windows = all full windows; ``tokens_per_byte`` for the byte tokenizer;
* corpus errors: missing path, empty directory, empty glob, empty / whitespace-only text, non-UTF-8
  bytes, a corpus too small for one train and one held-out window — all ``DataError`` with a message
  saying what is wrong;
* tokenizers: the byte tokenizer is lossless on any Unicode, one token per byte, with four distinct
  special ids; BPE has the requested size and a mask token; ``ensure_special_tokens`` adds what a
  foreign tokenizer lacks and says so.

No network, no model, no training.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from blockdiff.config import DataConfig
from blockdiff.data.corpus import DataError, load_documents, pack_documents
from blockdiff.modeling.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    byte_tokenizer,
    ensure_special_tokens,
    train_bpe,
)

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. ",
    "A cat sat on the mat and watched the rain fall. ",
    "She sells sea shells by the sea shore every morning. ",
    "Every good boy deserves fudge, or so the old rhyme says. ",
)
WORDS = ("alpha", "bravo", "charlie", "delta")  # one marker word per document


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    """Keep ``datasets``' cache of the small corpora out of the user's home cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def doc_text(i: int, repeats: int = 20) -> str:
    """ASCII text of document ``i``: the sentences with the document's marker word woven in."""
    return "".join(f"{WORDS[i]} {s}" for s in SENTENCES * repeats).strip() + "\n"


def write_corpus(root, n_docs: int = 3, repeats: int = 20):
    """``root/doc{i}.txt`` for ``i < n_docs``; returns (directory, [texts in file order])."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [doc_text(i, repeats) for i in range(n_docs)]
    for i, text in enumerate(texts):
        (root / f"doc{i}.txt").write_text(text)
    return root, texts


def windows(split) -> torch.Tensor:
    """All windows of a packed split as one ``(w, n)`` tensor."""
    return torch.stack([row["input_ids"] for row in split])


def packed(source, max_seq_len: int = 32, val_fraction: float = 0.05, max_documents=None):
    cfg = DataConfig(source=str(source), tokenizer="bytes", max_seq_len=max_seq_len, val_fraction=val_fraction,
                     max_documents=max_documents)
    tok = byte_tokenizer()
    return pack_documents(load_documents(cfg), tok, max_seq_len, val_fraction), tok


# -- packing ----------------------------------------------------------------------------------------

def test_windows_are_the_bos_doc_eos_stream_cut_into_full_windows(tmp_path):
    root, texts = write_corpus(tmp_path / "corpus")
    corpus, tok = packed(root, max_seq_len=32)
    train, val = windows(corpus.train), windows(corpus.val)
    assert train.shape[1] == 32 and val.shape[1] == 32  # every window exactly max_seq_len

    stream = []
    for text in texts:  # documents in file order, each wrapped in BOS ... EOS
        stream += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    n_windows = len(stream) // 32
    assert len(train) + len(val) == n_windows  # nothing but the final partial window is dropped
    assert torch.cat([train, val]).flatten().tolist() == stream[: n_windows * 32]
    assert train[0, 0].item() == tok.bos_token_id


def test_held_out_split_is_the_tail_from_the_last_document(tmp_path):
    root, texts = write_corpus(tmp_path / "corpus")
    corpus, tok = packed(root, max_seq_len=32, val_fraction=0.05)
    val = windows(corpus.val)
    assert len(val) == max(1, round(0.05 * (len(corpus.train) + len(val))))
    held_out = tok.decode(val.flatten().tolist(), skip_special_tokens=True)
    assert held_out and held_out in texts[-1]
    assert WORDS[len(texts) - 1] in held_out and not any(w in held_out for w in WORDS[: len(texts) - 1])
    trained = tok.decode(windows(corpus.train).flatten().tolist(), skip_special_tokens=True)
    assert WORDS[0] in trained


def test_max_documents_takes_the_first_files(tmp_path):
    root, texts = write_corpus(tmp_path / "corpus", n_docs=3)
    docs = load_documents(DataConfig(source=str(root), tokenizer="bytes", max_documents=2))
    assert docs["text"] == texts[:2]


def test_tokens_per_byte_for_the_byte_tokenizer(tmp_path):
    root, texts = write_corpus(tmp_path / "corpus", n_docs=3)
    corpus, _ = packed(root)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert corpus.tokens_per_byte == pytest.approx((num_bytes + 2 * len(texts)) / num_bytes, rel=1e-12)


def test_literal_special_token_text_in_the_corpus_stays_text(tmp_path):
    # A corpus that *mentions* "<|mask|>" or "<|eos|>" must not inject the real special ids: a mask id
    # inside clean x0 is a target the model can never predict (its logit is -inf), and a stray EOS
    # breaks document boundaries.
    text = "".join(f"line {i}: the token {SPECIAL_TOKENS['mask_token']} and {SPECIAL_TOKENS['eos_token']} are text.\n"
                   for i in range(40))
    (tmp_path / "meta.txt").write_text(text)
    corpus, tok = packed(tmp_path / "meta.txt", max_seq_len=32)
    ids = torch.cat([windows(corpus.train), windows(corpus.val)])
    assert (ids == tok.mask_token_id).sum().item() == 0
    assert (ids == tok.eos_token_id).sum().item() <= 1  # only the document's own closing EOS
    assert ids.numel() == (len(text.encode("utf-8")) + 2) // 32 * 32


# -- corpus errors ------------------------------------------------------------------------------------

def _make_bad_source(kind: str, tmp_path) -> str:
    if kind == "missing-file":
        return str(tmp_path / "no_such_file.txt")
    if kind == "missing-dir":
        return str(tmp_path / "no_such_dir")
    if kind == "dir-without-txt":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "notes.md").write_text("not a txt file " * 50)
        return str(tmp_path / "d")
    if kind == "glob-matches-nothing":
        return str(tmp_path / "*.nothing")
    if kind == "empty-file":
        (tmp_path / "empty.txt").write_text("")
        return str(tmp_path / "empty.txt")
    if kind == "whitespace-only":
        (tmp_path / "a.txt").write_text("   \n\n\t  \n")
        (tmp_path / "b.txt").write_text("\n")
        return str(tmp_path / "*.txt")
    if kind == "not-utf8":
        (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait, " * 50)
        return str(tmp_path / "latin.txt")
    if kind == "too-small":
        (tmp_path / "tiny.txt").write_text("x" * 40)  # 42 tokens: one window of 32, none to hold out
        return str(tmp_path / "tiny.txt")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing-file", r"no_such_file\.txt.*no such file"),
        ("missing-dir", r"no_such_dir.*no such file or directory"),
        ("dir-without-txt", r"directory with no \*\.txt"),
        ("glob-matches-nothing", r"\*\.nothing.*matches no files"),
        ("empty-file", r"empty\.txt.*no text"),
        ("whitespace-only", r"no text"),
        ("not-utf8", r"latin\.txt is not UTF-8"),
        ("too-small", r"data\.max_seq_len=32.*at least 2"),
    ],
)
def test_bad_corpus_raises_data_error_with_a_clear_message(tmp_path, kind, message):
    source = _make_bad_source(kind, tmp_path)
    with pytest.raises(DataError, match=message):
        packed(source, max_seq_len=32)


def test_corpus_of_exactly_two_windows_is_enough(tmp_path):
    (tmp_path / "two.txt").write_text("y" * 62)  # 64 tokens with BOS/EOS: one train + one held-out window
    corpus, _ = packed(tmp_path / "two.txt", max_seq_len=32)
    assert (len(corpus.train), len(corpus.val)) == (1, 1)


# -- tokenizers -------------------------------------------------------------------------------------

_BYTES = byte_tokenizer()

UNICODE_SAMPLES = [
    "",
    "plain ASCII, with punctuation: don 't , . ; ! ?",
    "  leading and trailing spaces  ",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",
    "CJK 世界你好 日本語 한국어",
    "controls \x00\x01\x07\x1b\x7f and whitespace \t\r\n\x0b\x0c",
    "combining e\u0301 and zero-width x\u200by\ufeff",
    "RTL שלום مرحبا and math ∀x∈ℝ: x² ≥ 0",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_byte_tokenizer_round_trips_one_token_per_byte(text):
    ids = _BYTES(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert _BYTES.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_arbitrary_unicode(text):
    # as the package tokenises data and prompts: special-token *text* such as "<|mask|>" stays text
    ids = _BYTES(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert _BYTES.decode(ids) == text


def test_byte_tokenizer_has_260_tokens_and_distinct_special_ids():
    tok = byte_tokenizer()
    assert len(tok) == 260
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id]
    assert len(set(specials)) == 4 and all(256 <= i < 260 for i in specials)
    assert tok.mask_token == SPECIAL_TOKENS["mask_token"]
    ascii_ids = tok(bytes(range(128)).decode("ascii"), add_special_tokens=False)["input_ids"]
    assert len(set(ascii_ids)) == 128  # distinct bytes get distinct ids


def test_bpe_has_the_requested_size_and_a_mask_token():
    texts = [doc_text(i, repeats=5) for i in range(4)]
    tok = train_bpe(texts, vocab_size=300)
    assert len(tok) == 300
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id]
    assert None not in specials and len(set(specials)) == 4
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert len(ids) < len(texts[0].encode("utf-8"))  # merges were learned
    assert tok.decode(ids) == texts[0]
    assert build_tokenizer("bpe", texts, 300).get_vocab() == tok.get_vocab()


def _word_level_tokenizer(with_eos: bool) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    if with_eos:
        vocab["</s>"] = 3
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "</s>"} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **kwargs)


def test_ensure_special_tokens_adds_a_mask_token_and_reports_it():
    tok = _word_level_tokenizer(with_eos=True)
    assert tok.mask_token is None and len(tok) == 4
    added = ensure_special_tokens(tok)
    assert added == ["bos_token", "mask_token"]  # pad reuses the existing EOS, so it is not "added"
    assert tok.mask_token_id is not None and tok.bos_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id == 3
    assert len(tok) == 6 and {tok.mask_token_id, tok.bos_token_id} == {4, 5}
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [1, 2]  # old ids unchanged
    assert ensure_special_tokens(tok) == []  # nothing left to add


def test_ensure_special_tokens_adds_all_four_when_none_exist():
    tok = _word_level_tokenizer(with_eos=False)
    assert ensure_special_tokens(tok) == ["bos_token", "eos_token", "mask_token", "pad_token"]
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id}
    assert len(ids) == 4 and len(tok) == 7


def test_build_tokenizer_from_a_local_directory_gets_a_mask_token(tmp_path):
    _word_level_tokenizer(with_eos=True).save_pretrained(tmp_path / "tok")
    tok = build_tokenizer(str(tmp_path / "tok"))
    assert tok.mask_token_id is not None and tok.mask_token_id >= 4  # a new id after the original vocabulary
    assert len(tok) == 6
