"""Loaders for the math benchmarks: GSM8K, MATH-500, AIME 2024 and AMC 2023.

Each benchmark is a JSON Lines file in a data folder (fields: ``../shared/data/README.md``):

| name      | split(s)              | file(s)                                   | rows        |
| --------- | --------------------- | ----------------------------------------- | ----------- |
| ``gsm8k`` | ``train``, ``test``   | ``gsm8k_train.jsonl``, ``gsm8k_test.jsonl`` | 7473, 1319 |
| ``math500`` | ``test``            | ``math500.jsonl``                         | 500         |
| ``aime24`` | ``test``             | ``aime24.jsonl``                          | 30          |
| ``amc23`` | ``test``              | ``amc23.jsonl``                           | 40          |

The folder is, in this order: the ``data_dir`` argument; the ``R1LAB_DATA_DIR`` environment variable;
``../shared/data`` relative to the working directory, then relative to the repository root. When no
local file is found and the ``datasets`` library is installed, the public Hugging Face copies are read
instead (only when no folder was named explicitly; this path needs the network and is not tested here).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data import read_jsonl  # the one JSONL reader: file:line errors

__all__ = ["BENCHMARKS", "DATA_DIR_ENV", "Problem", "find_data_dir", "load_benchmark"]

DATA_DIR_ENV = "R1LAB_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]  # r1lab/tasks/benchmarks.py -> the repository


@dataclass
class Problem:
    """One benchmark problem.

    Attributes:
        id: unique within the benchmark, e.g. ``"gsm8k/test/0"``, ``"aime24/60"``.
        question: the problem text given to the model.
        answer: the reference final answer as a string (``"18"``, ``"\\frac{14}{3}"``); grade with
            ``r1lab.grading.math_equal``.
        solution: the worked reference solution, or None when the benchmark has none (AMC 2023).
        meta: everything else the source carries (subject and level for MATH-500, url for AIME/AMC).
    """

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict = field(default_factory=dict)


# ----- row -> Problem, per benchmark -----------------------------------------------------------


def _integer_string(value) -> str:
    """``27.0`` -> ``"27"``, ``"025"`` -> ``"25"``; anything else as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _gsm8k(row: dict, index: int, split: str) -> Problem:
    worked = row["answer"]
    if "####" not in worked:
        raise ValueError("the 'answer' field has no '#### N' final answer")
    final = worked.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError("empty final answer after '####'")
    # The solution keeps GSM8K's <<calculator>> annotations and the '#### N' line, as published.
    return Problem(f"gsm8k/{split}/{index}", row["question"], final, worked, {"split": split, "index": index})


def _math500(row: dict, index: int, split: str) -> Problem:
    meta = {"subject": row["subject"], "level": row["level"], "unique_id": row["unique_id"]}
    return Problem(f"math500/{row['unique_id']}", row["problem"], str(row["answer"]).strip(), row["solution"], meta)


def _aime24(row: dict, index: int, split: str) -> Problem:
    # AIME answers are written 000-999 ("025"); stored as the plain integer ("25").
    return Problem(f"aime24/{row['id']}", row["problem"], _integer_string(row["answer"]), row["solution"],
                   {"url": row["url"], "source_id": row["id"]})


def _amc23(row: dict, index: int, split: str) -> Problem:
    # The source stores answers as floats (27.0); integral ones become "27".
    return Problem(f"amc23/{row['id']}", row["problem"], _integer_string(row["answer"]), None,
                   {"url": row["url"], "source_id": row["id"]})


@dataclass(frozen=True)
class _Benchmark:
    files: dict[str, str]  # split -> file name
    required: tuple[str, ...]  # fields every row must have
    convert: Callable[[dict, int, str], Problem]
    hub: tuple[str, str | None, dict[str, str], str | None]  # (dataset, config, split -> hub split, url filter)


_BENCHMARKS = {
    "gsm8k": _Benchmark({"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"}, ("question", "answer"), _gsm8k,
                        ("openai/gsm8k", "main", {"test": "test", "train": "train"}, None)),
    "math500": _Benchmark({"test": "math500.jsonl"},
                          ("problem", "solution", "answer", "subject", "level", "unique_id"), _math500,
                          ("HuggingFaceH4/MATH-500", None, {"test": "test"}, None)),
    # The AI-MO validation sets hold several years; the url says which contest a row comes from.
    "aime24": _Benchmark({"test": "aime24.jsonl"}, ("id", "problem", "solution", "answer", "url"), _aime24,
                         ("AI-MO/aimo-validation-aime", None, {"test": "train"}, "2024_AIME")),
    "amc23": _Benchmark({"test": "amc23.jsonl"}, ("id", "problem", "answer", "url"), _amc23,
                        ("AI-MO/aimo-validation-amc", None, {"test": "train"}, "2023_AMC")),
}
BENCHMARKS = tuple(_BENCHMARKS)


# ----- locating and reading --------------------------------------------------------------------


def _candidate_dirs(data_dir: str | os.PathLike | None) -> tuple[list[Path], bool]:
    """Folders to look in, and whether the user named one (then nothing else is tried)."""
    if data_dir is not None:
        return [Path(data_dir)], True
    if os.environ.get(DATA_DIR_ENV):
        return [Path(os.environ[DATA_DIR_ENV])], True
    return [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"], False


def _how_to_point() -> str:
    return (f"point at a folder holding the benchmark .jsonl files with --data-dir DIR or the {DATA_DIR_ENV} "
            "environment variable")


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$R1LAB_DATA_DIR``, else the first ``../shared/data`` found.

    Raises:
        FileNotFoundError: naming every place looked in and how to point at the data.
    """
    candidates, _ = _candidate_dirs(data_dir)
    for folder in candidates:
        if folder.is_dir():
            return folder.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(f"no benchmark data folder: looked in {looked}; {_how_to_point()}")


def _read_hub(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets  # optional dependency; only reached when it is installed

    dataset, config, splits, url_filter = _BENCHMARKS[name].hub
    rows = datasets.load_dataset(dataset, config, split=splits[split])
    for i, row in enumerate(rows):
        if url_filter is None or url_filter in str(row.get("url", "")):
            yield f"{dataset} [{splits[split]}] row {i}", dict(row)


def load_benchmark(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[Problem]:
    """Load a benchmark as a list of ``Problem``.

    Args:
        name: ``"gsm8k"``, ``"math500"``, ``"aime24"`` or ``"amc23"``.
        split: ``"train"`` or ``"test"`` for GSM8K; the others only have ``"test"``. Default ``"test"``.
        data_dir: folder holding the JSONL files (see the module docstring for the fallbacks).
        limit: keep only the first ``limit`` problems (file order).

    Raises:
        ValueError: unknown name or split, or a bad row (message: ``file:line: what is wrong``).
        FileNotFoundError: the file is not in any folder looked in (message says where and how to fix).
    """
    if name not in _BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    bench = _BENCHMARKS[name]
    split = split or "test"
    if split not in bench.files:
        raise ValueError(f"{name} has no split {split!r}; it has {', '.join(sorted(bench.files))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")

    file_name = bench.files[split]
    candidates, explicit = _candidate_dirs(data_dir)
    path = next((folder / file_name for folder in candidates if (folder / file_name).is_file()), None)
    if path is not None:
        rows = read_jsonl(path)
    elif not explicit and _has_datasets():
        rows = _read_hub(name, split)
    else:
        looked = ", ".join(str((c / file_name).resolve()) for c in candidates)
        hint = "" if explicit else " (or `pip install datasets` to read the public Hugging Face copy)"
        raise FileNotFoundError(f"{name} ({split}) not found: looked for {looked}; {_how_to_point()}{hint}")

    problems: list[Problem] = []
    for where, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        missing = [f for f in bench.required if f not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))} "
                             f"(a {name} row needs {', '.join(bench.required)})")
        try:
            problems.append(bench.convert(row, len(problems), split))
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: {e}") from None
    return problems


def _has_datasets() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None
