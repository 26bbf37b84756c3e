"""How many held-out problems, and samples of each, give the speedrun's paired claims the most power for the same
number of generated samples.

A paired margin's standard error over n problems with k samples each is sqrt((s_b + s_w / k) / n): s_b the
variance across problems of the true per-problem difference, s_w the variance of one sample within a problem
(both stages' summed). Both are estimated from a finished run's evaluation files (k >= 2), and the z each claim
would reach under other designs of the same n * k is printed beside the one it got. Fewer samples of more
problems never lose: the between-problem part shrinks with n alone.

    python benchmarks/eval_power.py runs/speedrun runs/s26/full-s6
    python benchmarks/eval_power.py runs/speedrun --designs 300x4 600x2 1200x1
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from r1lab.speedrun.report import _samples  # noqa: E402

PAIRS = (("R1-Zero - base", "r1-zero", "base"), ("RL - cold", "reasoning-rl", "cold-start"),
         ("distilled - control", "student-distill", "student-control"))


def variances(a: list[dict], b: list[dict]) -> tuple[float, float, float, int, int]:
    """(mean difference, s_b, s_w, problems, samples per problem) of pass@1 between two stages' samples."""
    by: dict[str, tuple[list[float], list[float]]] = {}
    for recs, side in ((a, 0), (b, 1)):
        for r in recs:
            by.setdefault(r["problem_id"], ([], []))[side].append(float(r["correct"]))
    rows = [v for v in by.values() if len(v[0]) >= 2 and len(v[1]) >= 2]
    if len(rows) < 2:
        raise ValueError("needs two problems or more with two samples or more of each stage")
    k = min(min(len(x), len(y)) for x, y in rows)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    var = lambda v: sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1)  # noqa: E731
    d = [mean(x) - mean(y) for x, y in rows]
    m, n = mean(d), len(d)
    s_w = mean([var(x) + var(y) for x, y in rows])
    s_b = max(var(d) - s_w / k, 0.0)
    return m, s_b, s_w, n, k


def z_for(m: float, s_b: float, s_w: float, n: int, k: int) -> float:
    se = math.sqrt((s_b + s_w / k) / n)
    return m / se if se > 0 else math.inf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished speedrun folders")
    ap.add_argument("--designs", nargs="+", default=None,
                    help="PROBLEMSxSAMPLES to compare (default: the run's n*k as n x k, 2n x k/2, 4n x k/4)")
    args = ap.parse_args(argv)
    for run in args.runs:
        print(f"## {run}")
        for label, a, b in PAIRS:
            ra, rb = _samples(run, a), _samples(run, b)
            if not ra or not rb:
                continue
            m, s_b, s_w, n, k = variances(ra, rb)
            designs = ([tuple(map(int, d.split("x"))) for d in args.designs] if args.designs else
                       [(n * k // j, j) for j in (k, k // 2, k // 4) if j >= 1])
            zs = "  ".join(f"{dn}x{dk}: {z_for(m, s_b, s_w, dn, dk):.1f} SE" for dn, dk in designs)
            print(f"{label}: {100 * m:+.1f} points (s_b {s_b:.4f}, s_w {s_w:.4f}; ran {n}x{k})  {zs}")


if __name__ == "__main__":
    main()
