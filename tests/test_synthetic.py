"""The synthetic addition task: seeded, disjoint splits, exact verifier."""

import pytest

from r1lab.grading import extract_answer, math_equal
from r1lab.tasks.synthetic import Addition


def test_same_seed_same_problems_other_seed_other_problems():
    t = Addition(digits=3)
    a, b = t.problems(50, "train", seed=1), t.problems(50, "train", seed=1)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in t.problems(50, "train", seed=2)]
    assert all(100 <= p.meta["a"] <= 999 and 100 <= p.meta["b"] <= 999 for p in a)
    assert all(p.answer == str(p.meta["a"] + p.meta["b"]) for p in a)
    assert a[0].question == f"What is {a[0].meta['a']} + {a[0].meta['b']}?"


def test_train_and_test_never_share_a_pair_whatever_the_seeds():
    t = Addition(digits=1)  # only 100 pairs: collisions would show
    train = {(p.meta["a"], p.meta["b"]) for s in range(3) for p in t.problems(200, "train", seed=s)}
    test = {(p.meta["a"], p.meta["b"]) for s in range(3) for p in t.problems(100, "test", seed=s)}
    assert train and test and not train & test
    assert len(test) == sum(t.split_of(a, b) == "test" for a in range(10) for b in range(10))


def test_verifier_and_the_shared_grading_path_agree():
    p = Addition(digits=2).problems(1, "test", seed=0)[0]
    good, bad = f"<think>add</think><answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>"
    assert Addition.verify(p, extract_answer(good)) and math_equal(extract_answer(good), p.answer)
    assert not Addition.verify(p, extract_answer(bad)) and not math_equal(extract_answer(bad), p.answer)
    assert not Addition.verify(p, None)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="digits"):
        Addition(digits=0)
    with pytest.raises(ValueError, match="split"):
        Addition().problems(1, "valid")
