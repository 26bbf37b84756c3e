"""Tests for r1lab.metrics against hand-computed values."""

from math import comb, prod

import pytest

from r1lab.metrics import majority_answer, majority_vote, mean_pass_at_1, pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 2, 0.7),          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (3, 1, 2, 2 / 3),        # 1 - C(2,2)/C(3,2) = 1 - 1/3
    (10, 3, 1, 0.3),         # pass@1 = c/n
    (5, 4, 2, 1.0),          # k > n - c: every pair holds a correct sample
    (5, 5, 5, 1.0),
    (5, 0, 3, 0.0),          # nothing correct
    (1000, 1, 1, 0.001),
    (4, 2, 3, 1.0),          # n - c = 2 < k = 3
    (6, 1, 3, 0.5),          # 1 - C(5,3)/C(6,3) = 1 - 10/20
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_matches_chen_product_form():
    # Chen et al.'s float formula 1 - prod_{i=n-c+1}^{n} (1 - k/i); fp64 products of ~100 terms agree to ~1e-13.
    for n, c, k in [(200, 100, 50), (1024, 3, 64), (64, 10, 8), (100, 1, 99)]:
        chen = 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(chen, rel=1e-10)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)


def test_pass_at_k_is_monotone_in_k_and_c():
    values = [pass_at_k(20, 3, k) for k in range(1, 21)]
    assert values == sorted(values) and values[-1] == 1.0
    assert pass_at_k(20, 2, 5) < pass_at_k(20, 3, 5)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_1():
    assert mean_pass_at_1([[True, False], [True, True, True, False]]) == pytest.approx((0.5 + 0.75) / 2)
    assert mean_pass_at_1([True, False, True]) == pytest.approx(2 / 3)  # one sample per problem
    assert mean_pass_at_1([[False] * 4, [True] * 4]) == 0.5
    with pytest.raises(ValueError):
        mean_pass_at_1([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        mean_pass_at_1([[True], []])


def test_majority_vote_clusters_by_equivalence():
    # 1/2, 0.5 and \frac{1}{2} are one cluster of 3; "2" has 2 votes.
    answers = ["\\frac{1}{2}", "2", "0.5", "2", "1/2"]
    assert majority_answer(answers) == "\\frac{1}{2}"
    assert majority_vote(answers, "0.5")
    assert not majority_vote(answers, "2")


def test_majority_vote_ties_go_to_first_occurrence():
    answers = ["3", "1/2", "0.5", "3.0"]  # {3, 3.0} and {1/2, 0.5}: 2 each, "3" came first
    assert majority_answer(answers) == "3"
    assert majority_vote(answers, "3") and not majority_vote(answers, "\\frac12")
    assert majority_answer(["0.5", "3", "3.0", "1/2"]) == "0.5"


def test_majority_vote_ignores_none():
    assert majority_answer([None, None, None, "4"]) == "4"
    assert majority_vote([None, None, "4", None], "4")
    assert majority_answer([None, None]) is None
    assert not majority_vote([None, None], "4")
    assert not majority_vote([], "4")
