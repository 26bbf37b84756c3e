"""Evaluation tasks: the math benchmarks (GSM8K, MATH-500, AIME 2024, AMC 2023) as ``Problem`` lists.

Grading lives in ``r1lab.grading`` and pass@k / majority vote in ``r1lab.metrics``.
"""

from .benchmarks import BENCHMARKS, DATA_DIR_ENV, Problem, find_data_dir, load_benchmark

__all__ = ["BENCHMARKS", "DATA_DIR_ENV", "Problem", "find_data_dir", "load_benchmark"]
