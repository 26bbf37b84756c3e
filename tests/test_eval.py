"""`r1lab eval`: the JSONL it writes, resuming, task files, and the metric plumbing on chosen completions.

A random tiny model answers garbage, so the real-model tests check bookkeeping (lines, fields, resume,
reproducibility) and metrics recomputed from the lines; the numbers themselves are checked against hand
computations with the generation replaced by chosen completions.

The data folder is ``$R1LAB_DATA_DIR`` if set, else ``<repo>/../shared/data``; tests that need it skip
when it is absent.
"""

import argparse
import json
import os
from math import comb
from pathlib import Path

import pytest

import r1lab
from r1lab import eval as ev
from r1lab.engine import Completion
from r1lab.grading import extract_answer, math_equal
from r1lab.metrics import majority_vote, mean_pass_at_1, pass_at_k
from r1lab.tasks import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    folder = Path(os.environ.get("R1LAB_DATA_DIR") or REPO / ".." / "shared" / "data")
    return folder.resolve() if (folder / "gsm8k_test.jsonl").is_file() else None


DATA = _real_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found: set R1LAB_DATA_DIR or provide "
                                                     "<repo>/../shared/data (see shared/data/README.md)")
FAST = dict(batch=6, progress=False, report=False)  # few slots: CPU sampling cost grows with slots x vocab


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny checkpoint with the real tokenizer (1024 positions)."""
    model = r1lab.Transformer(r1lab.get_preset("tiny")).init_weights(seed=0)
    return r1lab.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_task(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def by_problem(lines):
    out = {}
    for r in lines:
        out.setdefault(r["problem_id"], {})[r["sample_index"]] = r
    return {pid: [s[i] for i in sorted(s)] for pid, s in out.items()}


@pytest.fixture
def count_generate(monkeypatch):
    """Wraps the generation function; returns the list of prompt counts it was called with."""
    calls = []
    real = ev._generate

    def counting(engine, prompts, params):
        calls.append(len(prompts))
        yield from real(engine, prompts, params)

    monkeypatch.setattr(ev, "_generate", counting)
    return calls


# ----- the real model on GSM8K -----------------------------------------------------------------


@needs_data
def test_gsm8k_lines_fields_and_metrics_from_the_lines(ckpt, tmp_path):
    out = tmp_path / "e.jsonl"
    res = ev.evaluate(ckpt, "gsm8k", k=2, max_tokens=6, limit=3, data_dir=DATA, out=out, **FAST)
    lines = read_lines(out)
    problems = load_benchmark("gsm8k", data_dir=DATA, limit=3)
    assert len(lines) == 6
    assert sorted((r["problem_id"], r["sample_index"]) for r in lines) == sorted(
        (p.id, i) for p in problems for i in range(2))
    model = os.path.relpath(Path(ckpt).resolve(), Path(out).resolve().parent)  # relative: a copied folder resumes
    settings = {"model": model, "task": "gsm8k", "k": 2, "temperature": 0.6, "top_p": 0.95,
                "max_tokens": 6, "seed": 0, "prompt_style": "chat"}
    answers = {p.id: p.answer for p in problems}
    for r in lines:
        assert set(r) == set(ev.RECORD_FIELDS)
        assert r["settings"] == settings
        assert r["reference"] == answers[r["problem_id"]]
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 6
        assert r["finish_reason"] == "stop" or r["num_tokens"] == 6
        assert "<｜User｜>" not in r["text"] and "Please reason step by step" not in r["text"]  # prompt-free
        assert r["extracted"] == extract_answer(r["text"])
        assert r["correct"] == math_equal(r["extracted"], r["reference"])

    samples = by_problem(lines)
    assert res["problems"] == 3 and res["samples"] == 6 and res["generated"] == 3 and res["k"] == 2
    assert res["pass@1"] == pytest.approx(mean_pass_at_1([[r["correct"] for r in samples[p.id]] for p in problems]))
    assert res["cons@k"] == pytest.approx(sum(majority_vote([r["extracted"] for r in samples[p.id]], p.answer)
                                              for p in problems) / 3)
    assert set(res["pass@k"]) == {1, 2}
    assert res["pass@k"][2] == pytest.approx(sum(pass_at_k(2, sum(r["correct"] for r in samples[p.id]), 2)
                                                 for p in problems) / 3)
    assert res["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in lines) / 6)
    assert res["truncated"] == pytest.approx(sum(r["finish_reason"] == "length" for r in lines) / 6)
    assert res["breakdown"] == {}  # GSM8K has no subject / level


@needs_data
def test_default_output_path_is_named_after_task_and_model(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = ev.evaluate(ckpt, "gsm8k", k=1, max_tokens=2, limit=1, data_dir=DATA, **FAST)
    assert res["out"] == str(tmp_path / "eval-gsm8k-tiny.jsonl") and len(read_lines(res["out"])) == 1


@needs_data
def test_resume_generates_only_the_new_problems_and_matches_a_fresh_run(ckpt, tmp_path, count_generate, monkeypatch):
    out = tmp_path / "e.jsonl"
    kw = dict(k=2, max_tokens=4, data_dir=DATA, out=out, **FAST)
    ev.evaluate(ckpt, "gsm8k", limit=3, **kw)
    first = out.read_text(encoding="utf-8").splitlines()
    res = ev.evaluate(ckpt, "gsm8k", limit=5, **kw)
    assert count_generate == [3, 2] and res["generated"] == 2 and res["problems"] == 5
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10 and lines[:6] == first

    # Everything done: no model is even loaded, and metrics cover only the requested problems.
    monkeypatch.setattr(ev, "_load_engine", lambda *a: pytest.fail("loaded a model with nothing to generate"))
    res3 = ev.evaluate(ckpt, "gsm8k", limit=3, **kw)
    assert count_generate == [3, 2] and res3["generated"] == 0 and res3["samples"] == 6
    monkeypatch.undo()

    # Seeds are per problem, not per batch position: one fresh run of 5 gives the same samples.
    fresh = tmp_path / "fresh.jsonl"
    ev.evaluate(ckpt, "gsm8k", limit=5, **{**kw, "out": fresh})
    assert by_problem(read_lines(fresh)) == by_problem(read_lines(out))
    # ... and the seed matters.
    other = ev.evaluate(ckpt, "gsm8k", limit=1, **{**kw, "out": tmp_path / "seed1.jsonl", "seed": 1})
    ((pid, reseeded),) = by_problem(read_lines(other["out"])).items()
    assert [r["text"] for r in reseeded] != [r["text"] for r in by_problem(read_lines(out))[pid]]


# ----- resuming, on a task file (no data needed) -----------------------------------------------


@pytest.fixture
def task_file(tmp_path):
    return write_task(tmp_path / "arith.jsonl", [{"question": f"What is {i} + {i}?", "answer": 2 * i}
                                                 for i in range(1, 5)])


def test_settings_mismatch_on_resume_is_a_clear_error(ckpt, tmp_path, task_file):
    out = tmp_path / "e.jsonl"
    kw = dict(k=2, max_tokens=4, limit=2, out=out, **FAST)
    ev.evaluate(ckpt, str(task_file), **kw)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"e\.jsonl:1: .*other settings \(temperature 0\.6 in the file vs 1\.0 now\)"
                                         r".*--no-resume"):
        ev.evaluate(ckpt, str(task_file), **{**kw, "temperature": 1.0})
    with pytest.raises(ValueError, match=r"k 2 in the file vs 3 now"):
        ev.evaluate(ckpt, str(task_file), **{**kw, "k": 3})
    with pytest.raises(ValueError, match=r"dtype None in the file vs 'bfloat16' now"):  # samples of other weights
        ev.evaluate(ckpt, str(task_file), **{**kw, "dtype": "bfloat16"})
    assert out.read_bytes() == before  # refused, untouched
    res = ev.evaluate(ckpt, str(task_file), **{**kw, "temperature": 1.0, "resume": False})
    lines = read_lines(out)
    assert res["generated"] == 2 and len(lines) == 4 and {r["settings"]["temperature"] for r in lines} == {1.0}


def test_corrupt_last_line_is_dropped_with_a_warning_and_its_problem_regenerated(ckpt, tmp_path, task_file,
                                                                                 count_generate):
    out = tmp_path / "e.jsonl"
    kw = dict(k=2, max_tokens=4, limit=2, out=out, **FAST)
    ev.evaluate(ckpt, str(task_file), **kw)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4
    # A kill in the middle of writing the second problem: its first sample whole, the second cut.
    out.write_text("".join(lines[:3]) + lines[3][:25], encoding="utf-8")
    with pytest.warns(UserWarning, match=r"e\.jsonl:4: ignoring a corrupt last line"):
        res = ev.evaluate(ckpt, str(task_file), **kw)
    assert count_generate == [2, 1] and res["generated"] == 1
    after = out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert after[:3] == lines[:3] and len(after) == 5  # the lone sample stays; both are written again
    assert sorted(after[3:]) == sorted(lines[2:])  # same seed, same samples
    assert res["samples"] == 4 and all(json.loads(x) for x in after)


def test_corrupt_line_that_is_not_last_is_an_error_naming_it(ckpt, tmp_path, task_file):
    out = tmp_path / "e.jsonl"
    kw = dict(k=2, max_tokens=4, limit=2, out=out, **FAST)
    ev.evaluate(ckpt, str(task_file), **kw)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text(lines[0] + "{oops\n" + "".join(lines[1:]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"e\.jsonl:2: not valid JSON"):
        ev.evaluate(ckpt, str(task_file), **kw)


# ----- task files ------------------------------------------------------------------------------


def test_task_file_rows_and_bad_rows(tmp_path):
    path = write_task(tmp_path / "mine.jsonl", [
        {"question": "What is 2+2?", "answer": 4, "level": 1},
        {"prompt": "Half of one?", "answer": "\\frac{1}{2}", "id": "half", "level": 2},
        "",
        {"problem": "27 as a float", "answer": 27.0, "solution": "it is 27"}])
    label, problems = ev.load_task(str(path))
    assert label == str(path.resolve())
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("mine/0", "What is 2+2?", "4"), ("half", "Half of one?", "\\frac{1}{2}"), ("mine/2", "27 as a float", "27")]
    assert problems[0].meta == {"level": 1} and problems[2].solution == "it is 27"

    bad = {
        '{"question": "q", "answer": 1}\n{"question": "q2"}\n': r"bad\.jsonl:2: missing answer",
        '{"answer": 1}\n': r"bad\.jsonl:1: missing question \(or prompt / problem\)",
        '{"question": "q", "answer": 1}\n\n{"question": "q", "answ\n': r"bad\.jsonl:3: not valid JSON",
        '[1, 2]\n': r"bad\.jsonl:1: expected a JSON object",
        '{"question": "", "answer": 1}\n': r"bad\.jsonl:1: 'question' must be a non-empty string",
        '{"question": "q", "answer": null}\n': r"bad\.jsonl:1: 'answer' must be a non-empty string or number",
        '{"question": "q", "answer": 1, "id": "a"}\n{"question": "r", "answer": 2, "id": "a"}\n':
            r"bad\.jsonl:2: duplicate id 'a'",
    }
    for text, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            ev.load_task(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        ev.load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*gsm8k, math500"):
        ev.load_task("gsm9k")


def test_task_file_evaluates_with_the_real_model(ckpt, tmp_path, task_file):
    res = ev.evaluate(ckpt, str(task_file), k=2, max_tokens=3, out=tmp_path / "e.jsonl", **FAST)
    lines = read_lines(tmp_path / "e.jsonl")
    assert res["problems"] == 4 and len(lines) == 8 and res["task_name"] == "arith"
    assert {r["problem_id"] for r in lines} == {f"arith/{i}" for i in range(4)}
    assert {r["reference"] for r in lines} == {"2", "4", "6", "8"}


# ----- the metric plumbing on chosen completions -----------------------------------------------

# Per problem: (answer, level, completions as (text, generated tokens, finish reason)). Hand-computed below.
CHOSEN = [
    ("5", 1, [("so \\boxed{5}", 7, "stop"), ("\\boxed{5}", 5, "stop"), ("\\boxed{6}", 4, "stop"),
              ("I ran out of", 16, "length")]),  # 2 right; answers 5, 5, 6, None -> majority 5: right
    ("\\frac{1}{2}", 1, [("\\boxed{3}", 3, "stop"), ("\\boxed{3}", 3, "stop"), ("\\boxed{3}", 3, "stop"),
                         ("\\boxed{\\dfrac{1}{2}}", 9, "stop")]),  # 1 right (\dfrac); majority 3: wrong
    ("12", 2, [("\\boxed{13}", 4, "stop")] * 4),  # none right
]


def fake_generate(seen, out=None, on_disk=None):
    """Stands in for ``eval._generate``: problem i of the task gets CHOSEN[i]'s completions. With ``out``,
    appends to ``on_disk`` the lines in that file each time the caller asks for the next problem."""
    def generate(engine, prompts, params):
        seen.append((prompts, params))
        for i in reversed(range(len(prompts))):  # finished problems come back out of order, as from the engine
            yield i, [Completion(i, j, [0] * n, text, reason, None, len(prompts[i]))
                      for j, (text, n, reason) in enumerate(CHOSEN[i][2])]
            if out is not None:
                on_disk.append(len(Path(out).read_text(encoding="utf-8").splitlines()))
    return generate


def test_metrics_on_chosen_completions_equal_hand_values(ckpt, tmp_path, monkeypatch):
    task = write_task(tmp_path / "chosen.jsonl", [{"question": f"Problem {i}?", "answer": a, "level": lvl}
                                                  for i, (a, lvl, _) in enumerate(CHOSEN)])
    tok = r1lab.load_tokenizer(ckpt)
    seen, on_disk = [], []
    monkeypatch.setattr(ev, "_generate", fake_generate(seen, tmp_path / "e.jsonl", on_disk))
    monkeypatch.setattr(ev, "_load_engine", lambda *a: None)
    res = ev.evaluate(ckpt, str(task), k=4, seed=7, out=tmp_path / "e.jsonl", **FAST)
    assert on_disk == [4, 8, 12]  # each problem is on disk (flushed) before the next one is awaited

    # pass@1 = mean(2/4, 1/4, 0/4); cons@4: only problem 0's majority (5) is right.
    assert res["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert res["cons@k"] == pytest.approx(1 / 3)
    # pass@2 = mean(1 - C(2,2)/C(4,2), 1 - C(3,2)/C(4,2), 0) = mean(5/6, 1/2, 0) = 4/9; pass@4 = mean(1, 1, 0).
    assert res["pass@k"] == pytest.approx({1: 0.25, 2: 4 / 9, 4: 2 / 3})
    assert 1 - comb(2, 2) / comb(4, 2) == pytest.approx(5 / 6)  # the hand value above
    assert res["mean_tokens"] == pytest.approx((7 + 5 + 4 + 16 + 3 + 3 + 3 + 9 + 4 * 4) / 12)
    assert res["truncated"] == pytest.approx(1 / 12)
    assert res["breakdown"] == {"level": {
        "1": pytest.approx({"problems": 2, "pass@1": (0.5 + 0.25) / 2, "cons@k": 0.5}),
        "2": {"problems": 1, "pass@1": 0.0, "cons@k": 0.0}}}

    # The lines: each sample under its own problem, with the verdicts worked out above.
    samples = by_problem(read_lines(tmp_path / "e.jsonl"))
    assert [[r["extracted"] for r in samples[f"chosen/{i}"]] for i in range(3)] == [
        ["5", "5", "6", None], ["3", "3", "3", "\\dfrac{1}{2}"], ["13"] * 4]
    assert [[r["correct"] for r in samples[f"chosen/{i}"]] for i in range(3)] == [
        [True, True, False, False], [False, False, False, True], [False] * 4]
    assert samples["chosen/0"][3]["finish_reason"] == "length" and samples["chosen/0"][3]["num_tokens"] == 16

    # What generation was asked for: the R1 prompt, k samples, one reproducible seed per problem.
    ((prompts, params),) = seen
    assert prompts == [ev.render_prompt(tok, f"Problem {i}?") for i in range(3)]
    assert tok.decode(prompts[0]) == ("<｜begin▁of▁sentence｜><｜User｜>Problem 0?\nPlease reason step by step, "
                                      "and put your final answer within \\boxed{}.<｜Assistant｜>")
    assert [p.seed for p in params] == [ev.problem_seed(7, f"chosen/{i}") for i in range(3)]
    assert len({p.seed for p in params}) == 3 and ev.problem_seed(7, "chosen/0") != ev.problem_seed(8, "chosen/0")
    assert {(p.n, p.temperature, p.top_p) for p in params} == {(4, 0.6, 0.95)}
    # Default max_tokens: the paper's 32768, capped to the tiny model's 1024 positions minus the longest prompt.
    assert {p.max_tokens for p in params} == {1024 - max(map(len, prompts))} == {res["settings"]["max_tokens"]}

    report = " ".join(ev.format_report(res).split())  # the table, spacing ignored
    for text in ("pass@1 (mean over 4 samples) 25.0%", "cons@4 (majority vote) 33.3%",
                 "pass@2 (unbiased estimator) 44.4%", "pass@4 (unbiased estimator) 66.7%",
                 "mean response length 5.5 tokens", "stopped by max tokens 8.3% of samples",
                 "by level problems pass@1 cons@4 1 2 37.5% 50.0% 2 1 0.0% 0.0%"):
        assert text in report, text


def chosen_task(tmp_path):
    return write_task(tmp_path / "chosen.jsonl", [{"question": f"Problem {i}?", "answer": a}
                                                  for i, (a, _, _) in enumerate(CHOSEN)])


def test_resume_regrades_the_stored_answers(ckpt, tmp_path, monkeypatch):
    # issue 24: a resumed run trusted the file's verdicts ("correct": "no" counted as correct)
    task, out = chosen_task(tmp_path), tmp_path / "e.jsonl"
    monkeypatch.setattr(ev, "_generate", fake_generate([]))
    monkeypatch.setattr(ev, "_load_engine", lambda *a: None)
    first = ev.evaluate(ckpt, str(task), k=4, seed=7, out=out, **FAST)
    tampered = [{**r, "correct": "no", "extracted": r["reference"]} for r in read_lines(out)]
    out.write_text("".join(json.dumps(r) + "\n" for r in tampered), encoding="utf-8")
    monkeypatch.setattr(ev, "_generate", lambda *a: pytest.fail("every problem is in the file: nothing to generate"))
    again = ev.evaluate(ckpt, str(task), k=4, seed=7, out=out, **FAST)
    assert again["generated"] == 0
    for key in ("pass@1", "cons@k", "pass@k"):
        assert again[key] == first[key], key
    out.write_text(json.dumps({**tampered[0], "text": 5}) + "\n" + "".join(json.dumps(r) + "\n" for r in tampered))
    with pytest.raises(ValueError, match=r"e\.jsonl:1: 'text' is not a string"):
        ev.evaluate(ckpt, str(task), k=4, seed=7, out=out, **FAST)


def test_a_copied_folder_resumes_its_samples(ckpt, tmp_path, count_generate):
    # issue 24: samples stored the model's and the task's absolute paths, so a copied run folder could not resume
    import shutil
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "model")
    write_task(run / "task.jsonl", [{"question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(1, 3)])
    kw = dict(k=2, max_tokens=4, **FAST)
    first = ev.evaluate(run / "model", str(run / "task.jsonl"), out=run / "eval" / "e.jsonl", **kw)
    settings = read_lines(run / "eval" / "e.jsonl")[0]["settings"]
    assert settings["model"] == "../model" and settings["task"] == "../task.jsonl"  # relative to the file
    shutil.copytree(run, tmp_path / "copy")
    run = tmp_path / "copy"
    again = ev.evaluate(run / "model", str(run / "task.jsonl"), out=run / "eval" / "e.jsonl", **kw)
    assert count_generate == [2] and again["generated"] == 0 and again["pass@1"] == first["pass@1"]
    # a file written before (absolute paths) still resumes where it was written
    lines = read_lines(run / "eval" / "e.jsonl")
    absolute = {"model": str((run / "model").resolve()), "task": str((run / "task.jsonl").resolve())}
    (run / "eval" / "e.jsonl").write_text("".join(json.dumps({**r, "settings": {**r["settings"], **absolute}}) + "\n"
                                                  for r in lines), encoding="utf-8")
    assert ev.evaluate(run / "model", str(run / "task.jsonl"), out=run / "eval" / "e.jsonl", **kw)["generated"] == 0


def test_conflict_advice_can_be_the_callers(ckpt, tmp_path, task_file):
    out = tmp_path / "e.jsonl"
    kw = dict(k=2, max_tokens=4, limit=2, out=out, **FAST)
    ev.evaluate(ckpt, str(task_file), **kw)
    with pytest.raises(ValueError, match=r"other settings .*; rerun stage 6") as e:
        ev.evaluate(ckpt, str(task_file), **{**kw, "temperature": 1.0, "redo_hint": "rerun stage 6"})
    assert "--no-resume" not in str(e.value) and "--out" not in str(e.value)


def test_cli_parser_flags_and_command(ckpt, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="r1lab")
    sub = parser.add_subparsers(dest="command")
    ev.add_parser(sub)
    task = write_task(tmp_path / "chosen.jsonl", [{"question": f"Problem {i}?", "answer": a}
                                                  for i, (a, _, _) in enumerate(CHOSEN)])
    args = parser.parse_args(["eval", "--model", str(ckpt), "--task", str(task)])
    assert (args.k, args.temperature, args.top_p, args.max_tokens, args.limit, args.seed, args.batch,
            args.prompt_style, args.no_resume, args.fn) == (8, 0.6, 0.95, None, None, 0, 64, "chat", False, ev.cmd_eval)
    args = parser.parse_args(["eval", "--model", str(ckpt), "--task", str(task), "--k", "4", "--top-p", "0.9",
                              "--max-tokens", "32", "--limit", "2", "--out", str(tmp_path / "o.jsonl"),
                              "--seed", "3", "--device", "cpu", "--batch", "8", "--data-dir", str(tmp_path)])
    assert (args.k, args.top_p, args.max_tokens, args.limit, args.seed, args.device, args.batch) == (
        4, 0.9, 32, 2, 3, "cpu", 8)
    monkeypatch.setattr(ev, "_generate", fake_generate([]))
    monkeypatch.setattr(ev, "_load_engine", lambda *a: None)
    args.fn(args)
    printed = capsys.readouterr().out
    assert "2 problems x 4 samples" in printed and "cons@4 (majority vote)" in printed
    assert len(read_lines(tmp_path / "o.jsonl")) == 8


def test_bad_arguments_are_clear_errors(ckpt, tmp_path, task_file):
    with pytest.raises(FileNotFoundError, match="model folder .*missing does not exist"):
        ev.evaluate(tmp_path / "missing", str(task_file))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ev.evaluate(ckpt, str(task_file), k=0)
    with pytest.raises(ValueError, match=r"arith/0: \d+ prompt tokens \+ max_tokens 5000 exceed the model's 1024 "
                                         r"positions"):
        ev.evaluate(ckpt, str(task_file), max_tokens=5000, out=tmp_path / "e.jsonl", **FAST)
    assert not (tmp_path / "e.jsonl").exists()


def test_prompt_template_replaces_the_style_and_is_recorded(ckpt, tmp_path, task_file, monkeypatch):
    """--template: the prompt is the template with the question put in, encoded as it is (markers become their
    ids), without the instruction; the setting names it, so a file of another template does not resume."""
    from r1lab.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    template = "<｜User｜>Q: {question}<｜Assistant｜><think>\n"
    ids = ev.render_prompt(tok, "2 + 2?", template=template)
    assert ids == tok.encode("<｜User｜>Q: 2 + 2?<｜Assistant｜><think>\n") and tok.think_start_id in ids
    seen, real = [], ev._generate

    def capture(engine, prompts, params):
        seen.extend(prompts)
        yield from real(engine, prompts, params)

    monkeypatch.setattr(ev, "_generate", capture)
    res = ev.evaluate(ckpt, str(task_file), k=1, max_tokens=2, out=tmp_path / "t.jsonl", template=template, **FAST)
    questions = [json.loads(ln)["question"] for ln in task_file.read_text().splitlines()]
    assert seen == [tok.encode(template.replace("{question}", q)) for q in questions]
    assert res["settings"]["prompt_style"] == f"template {template!r}"
    with pytest.raises(ValueError, match="prompt_style"):
        ev.evaluate(ckpt, str(task_file), k=1, max_tokens=2, out=tmp_path / "t.jsonl", **FAST)
    with pytest.raises(ValueError, match="must contain"):
        ev.evaluate(ckpt, str(task_file), template="no placeholder")
