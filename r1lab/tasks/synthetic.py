"""A seeded synthetic task with an exact verifier: multi-digit addition.

    task = Addition(digits=2)
    train = task.problems(1000, split="train", seed=0)   # list[Problem], the same for the same arguments
    test = task.problems(100, split="test", seed=0)      # never shares an (a, b) pair with any train problem

Difficulty is the number of digits of each operand. The split is a property of the pair, not of the draw:
a pair is in the test split when a hash of (digits, a, b) falls in the test fraction, so every train and test
draw, whatever its seed, is disjoint from the other split. The verifier is `r1lab.math_equal` through
`Problem.answer` (an integer string), or `Addition.verify` directly.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .benchmarks import Problem

__all__ = ["Addition"]


@dataclass(frozen=True)
class Addition:
    digits: int = 2  # digits of each operand (difficulty)
    test_fraction: float = 0.2  # share of (a, b) pairs reserved for the test split
    template: str = "What is {a} + {b}?"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise ValueError(f"Addition.digits must be in [1, 18], got {self.digits}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"Addition.test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def name(self) -> str:
        return f"addition-{self.digits}"

    def split_of(self, a: int, b: int) -> str:
        h = int.from_bytes(hashlib.sha256(f"{self.digits}:{a}:{b}".encode()).digest()[:8], "big")
        return "test" if h / 2**64 < self.test_fraction else "train"

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """`n` problems of `split` drawn with `seed` (with replacement from the split's pairs)."""
        if split not in ("train", "test"):
            raise ValueError(f"Addition split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out: list[Problem] = []
        while len(out) < n:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if self.split_of(a, b) != split:
                continue
            out.append(Problem(id=f"{self.name}/{split}/{seed}/{len(out)}", question=self.template.format(a=a, b=b),
                               answer=str(a + b), meta={"a": a, "b": b}))
        return out

    @staticmethod
    def verify(problem: Problem, answer: str | None) -> bool:
        """Exact check of an extracted answer (an integer, surrounding spaces ignored)."""
        return answer is not None and answer.strip() == problem.answer
