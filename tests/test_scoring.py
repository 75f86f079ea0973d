"""Text statistics the sweep report puts next to the judge's NLL (issue 23: a method that wins by repeating itself
has not won)."""

import math

import pytest

from blockdiff.evaluation.scoring import distinct_ngrams, unigram_entropy


def test_distinct_ngrams_counts_repeated_ngrams():
    assert distinct_ngrams([1, 2, 3, 4], 2) == 1.0
    assert distinct_ngrams([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_ngrams([7, 7, 7], 1) == pytest.approx(1 / 3)
    assert distinct_ngrams([5], 2) == 1.0  # nothing can repeat


def test_distinct_ngrams_refuses_n_below_one():
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_ngrams([1, 2], 0)


def test_unigram_entropy_of_a_uniform_sample_is_log_of_its_size():
    assert unigram_entropy([1, 2, 3, 4], base=2) == pytest.approx(2.0)
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert unigram_entropy([1, 2]) == pytest.approx(math.log(2))
