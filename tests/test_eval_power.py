"""benchmarks/eval_power.py: the between- and within-problem variances of a paired margin, on a hand-worked case
and on simulated evaluations whose variances are known."""

import importlib.util
import math
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("eval_power",
                                              Path(__file__).resolve().parents[1] / "benchmarks/eval_power.py")
power = importlib.util.module_from_spec(spec)
spec.loader.exec_module(power)


def recs(rows):
    return [{"problem_id": f"p{i}", "correct": c} for i, row in enumerate(rows) for c in row]


def test_hand_worked_case():
    # per-problem means: a 1, 0; b 0.5, 0 -> differences 0.5, 0 (mean 0.25, sample variance 0.125); within
    # problems only b's first problem varies ([1, 0]: 0.5), so s_w = (0.5 + 0) / 2 = 0.25 and s_b = 0.125 - 0.25/2 = 0
    m, s_b, s_w, n, k = power.variances(recs([[1, 1], [0, 0]]), recs([[1, 0], [0, 0]]))
    assert (m, s_b, s_w, n, k) == (0.25, 0.0, 0.25, 2, 2)
    assert power.z_for(m, s_b, s_w, n, k) == pytest.approx(1.0)  # SE sqrt((0 + 0.25/2) / 2) = 0.25
    with pytest.raises(ValueError):
        power.variances(recs([[1]]), recs([[0]]))


def test_simulated_variances_are_recovered():
    # stage a right with probability q + 0.1 on a problem whose b-probability is q ~ U(0.2, 0.8): the true
    # difference is 0.1 on every problem (s_b 0), and each sample is a coin flip (s_w the mean of the two binomial
    # variances); then a problem-dependent difference (s_b > 0)
    rng = random.Random(0)
    for spread in (0.0, 0.2):
        rows_a, rows_b, sb_true, sw_true = [], [], [], []
        for _ in range(4000):
            q = rng.uniform(0.2, 0.7)
            d = 0.1 + spread * rng.choice((-1, 1))
            pa = q + d
            rows_a.append([int(rng.random() < pa) for _ in range(4)])
            rows_b.append([int(rng.random() < q) for _ in range(4)])
            sb_true.append(d)
            sw_true.append(pa * (1 - pa) + q * (1 - q))
        m, s_b, s_w, n, k = power.variances(recs(rows_a), recs(rows_b))
        mean = sum(sb_true) / len(sb_true)
        var_b = sum((x - mean) ** 2 for x in sb_true) / (len(sb_true) - 1)
        assert m == pytest.approx(0.1, abs=0.02) and k == 4 and n == 4000
        assert s_w == pytest.approx(sum(sw_true) / len(sw_true), rel=0.05)
        assert s_b == pytest.approx(var_b, abs=0.01)
        # fewer samples of more problems: never a lower z at the same n * k
        assert power.z_for(m, s_b, s_w, 2 * n, k // 2) >= power.z_for(m, s_b, s_w, n, k) - 1e-12
        assert math.isfinite(power.z_for(m, s_b, s_w, n, k))
