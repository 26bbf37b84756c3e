"""Evaluation metrics over sampled answers: pass@k, mean pass@1 and majority vote (cons@k).

DeepSeek-R1 (section 3.1) reports pass@1 averaged over k samples per problem and cons@64, the
majority vote over 64 samples; pass@k is the unbiased estimator of Chen et al. 2021 (Codex paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import comb

from .grading import math_equal

__all__ = ["pass_at_k", "mean_pass_at_1", "majority_answer", "majority_vote"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    The probability that at least one of ``k`` samples drawn without replacement from the ``n`` is
    correct. Computed with exact integers (``math.comb``) and one rounding at the end, so it is exact
    to float precision for any ``n``; Chen et al.'s product form ``1 - prod(1 - k / i)`` is the
    float-only equivalent.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def mean_pass_at_1(verdicts: Sequence[Sequence[bool] | bool]) -> float:
    """pass@1 averaged over problems: the mean over problems of (correct samples / samples).

    Args:
        verdicts: one entry per problem, either a sequence of per-sample verdicts (the R1 protocol:
            k samples per problem) or a single bool (one greedy sample).

    Raises:
        ValueError: no problems, or a problem with no samples.
    """
    if len(verdicts) == 0:
        raise ValueError("no problems to average over")
    total = 0.0
    for i, problem in enumerate(verdicts):
        samples = [problem] if isinstance(problem, bool) else list(problem)
        if not samples:
            raise ValueError(f"problem {i} has no samples")
        total += sum(bool(v) for v in samples) / len(samples)
    return total / len(verdicts)


def majority_answer(answers: Sequence[str | None], timeout: float = 2.0) -> str | None:
    """The most frequent answer up to mathematical equivalence, or None if every answer is None.

    Answers are clustered greedily: each joins the first cluster whose first member it
    ``math_equal``s (equivalence is checked against that representative only, since numeric
    tolerance is not transitive). The largest cluster wins; ties go to the cluster that appeared
    first. Returns the winning cluster's first answer. None answers (nothing extracted) never count.
    """
    clusters: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for cluster in clusters:
            if math_equal(answer, cluster[0], timeout=timeout):
                cluster.append(answer)
                break
        else:
            clusters.append([answer])
    if not clusters:
        return None
    # max() keeps the first of equal maxima, i.e. the earliest cluster.
    return max(clusters, key=len)[0]


def majority_vote(answers: Sequence[str | None], reference: str, timeout: float = 2.0) -> bool:
    """cons@k: whether the majority answer (see ``majority_answer``) equals ``reference``."""
    winner = majority_answer(answers, timeout=timeout)
    return winner is not None and math_equal(winner, reference, timeout=timeout)
