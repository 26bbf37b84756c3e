"""`r1lab eval`: sample k completions per problem with the engine, grade them, report pass@k and majority vote.

The protocol of the DeepSeek-R1 paper (section 3.1): each question is rendered with the chat template as a
user turn ending in "Please reason step by step, and put your final answer within \\boxed{}.", k samples are
drawn at temperature 0.6 / top-p 0.95, and the report gives pass@1 averaged over the k samples, cons@k (the
majority vote) and the unbiased pass@k of Chen et al. Grading is ``extract_answer`` then ``math_equal``.

Every sample goes to a JSON Lines file as soon as its problem's k samples are done, one line per sample:

    {"problem_id", "sample_index", "text" (the completion, prompt-free), "num_tokens" (generated, stop token
     included), "finish_reason" ("stop" | "length"), "extracted", "reference", "correct", "settings"}

``settings`` (model, task, k, temperature, top_p, max_tokens, seed, prompt_style) is repeated on every line so
a file explains itself; the model folder and a task file are given relative to the samples file's folder, so a
copied run folder resumes. A run resumes from its file: problems with all k samples already there (written with
the same settings) are skipped, so a killed run loses only the problems in flight. Their stored answers are
graded again (cheap): the verdicts in a file are never trusted. A different ``limit``,
device or batch size is not a different setting: samples are seeded per problem and per sample, not by
position in a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .grading import extract_answer, math_equal
from .metrics import majority_vote, mean_pass_at_1, pass_at_k
from .tasks.benchmarks import BENCHMARKS, Problem, read_jsonl, load_benchmark

__all__ = ["INSTRUCTION", "evaluate", "load_task", "render_prompt", "problem_seed", "summarize", "format_report",
           "add_parser"]

# The R1 paper's instruction for math benchmarks (also DeepSeek's usage recommendation for R1 models).
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("chat", "plain")
DEFAULT_MAX_TOKENS = 32768  # the R1 paper's generation limit for its evaluations
DEFAULT_BATCH = 64
QUESTION_FIELDS = ("question", "prompt", "problem")
BREAKDOWN_KEYS = ("subject", "level")  # MATH-500's meta; any task whose problems all carry one gets it too
RECORD_FIELDS = ("problem_id", "sample_index", "text", "num_tokens", "finish_reason", "extracted", "reference",
                 "correct", "settings")
REDO = "pass another --out FILE, or --no-resume to overwrite it"  # what `r1lab eval` users do on a conflict


# ----- tasks and prompts -----------------------------------------------------------------------


def load_task(task: str, data_dir: str | os.PathLike | None = None) -> tuple[str, list[Problem]]:
    """``(label, problems)`` for a benchmark name (``gsm8k``, ``math500``, ``aime24``, ``amc23``; test split)
    or a path to a JSONL file of ``{"question" | "prompt" | "problem": ..., "answer": ...}`` rows.

    A file's rows may also carry ``id`` (else ``<file stem>/<row index>``), ``solution`` and any other field,
    which goes to ``Problem.meta`` (``subject`` / ``level`` there give a breakdown). The label is the
    benchmark name or the file's resolved path.

    Raises:
        ValueError: unknown name, or a bad row (``file:line: what is wrong``).
        FileNotFoundError: the benchmark's data or the file is missing.
    """
    if task in BENCHMARKS:
        return task, load_benchmark(task, "test", data_dir=data_dir)
    path = Path(task)
    if not path.is_file():
        if path.suffix == ".jsonl" or os.sep in task or "/" in task:
            raise FileNotFoundError(f"task file {task} does not exist")
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(BENCHMARKS)} or give a path to a "
                         f".jsonl file of {{\"question\", \"answer\"}} rows")
    problems: list[Problem] = []
    seen: set[str] = set()
    for where, row in read_jsonl(path):
        field = next((f for f in QUESTION_FIELDS if f in row), None)
        if field is None or "answer" not in row:
            missing = [] if field else ["question (or prompt / problem)"]
            missing += [] if "answer" in row else ["answer"]
            raise ValueError(f"{where}: missing {' and '.join(missing)} (a task row needs a question, prompt or "
                             f"problem field and an answer field)")
        question, answer = row[field], row["answer"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: {field!r} must be a non-empty string, got {question!r}")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)  # 27.0 -> "27"
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string or number, got {answer!r}")
        pid = str(row.get("id", f"{path.stem}/{len(problems)}"))
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} (ids must be unique: results are keyed by them)")
        seen.add(pid)
        meta = {k: v for k, v in row.items() if k not in (*QUESTION_FIELDS, "answer", "solution", "id")}
        problems.append(Problem(pid, question, str(answer).strip(), row.get("solution"), meta))
    if not problems:
        raise ValueError(f"{path}: no rows")
    return str(path.resolve()), problems


def render_prompt(tok, question: str, style: str = "chat", template: str | None = None) -> list[int]:
    """Token ids of one problem's prompt: the question plus ``INSTRUCTION``; ``chat`` wraps it in the R1 chat
    template as a user turn with the generation prompt, ``plain`` gives BOS + the bare text (base models).
    A ``template`` (text with ``{question}``, e.g. a model's own training format) replaces both: its
    rendering is encoded as it is (special-token strings in it become their ids), without the instruction."""
    if template is not None:
        return tok.encode(template.replace("{question}", question))
    content = f"{question}\n{INSTRUCTION}"
    if style == "chat":
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=True)
    if style == "plain":
        return tok.encode(content, add_bos=True)
    raise ValueError(f"unknown prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")


def problem_seed(seed: int, problem_id: str) -> int:
    """The sampling seed of one problem: a hash of the run's seed and the problem id, so a problem gets the
    same samples whatever else is evaluated with it (the engine gives its sample i the seed + i)."""
    digest = hashlib.sha256(f"{seed}/{problem_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----- generation ------------------------------------------------------------------------------


DTYPES = ("auto", "float32", "bfloat16")


def weights_dtype(dtype: str, device: str):
    """The torch dtype of weights that sample on `device`: "auto" is bf16 on CUDA and fp32 elsewhere."""
    import torch

    return {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[dtype]


def _load_engine(model_dir: Path, device: str | None, batch: int, max_seq_len: int, compile: bool | None = None,
                 dtype: str = "auto"):
    import torch

    from .checkpoint import load_pretrained
    from .engine import Engine
    from .tokenizer import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(model_dir, device=device, dtype=weights_dtype(dtype, device))
    return Engine(model, load_tokenizer(model_dir), max_batch=batch, max_seq_len=max_seq_len, compile=compile)


def _generate(engine, prompts: Sequence[list[int]], params: Sequence) -> Iterator[tuple[int, list]]:
    """Yield ``(prompt index, its n Completions)`` as soon as all n samples of a prompt are finished.

    Prompts are fed to the engine a few at a time (as many groups of n as there are slots, plus one queued
    so a freed slot is refilled at once), so finished problems come out early and can be written down.
    """
    capacity = max(1, engine.max_batch // max(p.n for p in params)) + 1
    pending = iter(range(len(prompts)))
    in_flight: dict[int, list] = {}
    while True:
        while len(in_flight) < capacity and (i := next(pending, None)) is not None:
            in_flight[i] = engine.add_request(prompts[i], params[i], prompt_index=i)
        if not in_flight:
            return
        engine.step()
        for i in [i for i, seqs in in_flight.items() if all(s.finish_reason is not None for s in seqs)]:
            # completion() turns a finished sequence into the Completion that Engine.generate returns.
            yield i, [engine.completion(s) for s in in_flight.pop(i)]


# ----- the results file ------------------------------------------------------------------------


def _portable(path: str | os.PathLike, base: Path) -> str:
    """`path` relative to `base` (the samples file's folder), so that a copied run folder still matches."""
    return os.path.relpath(Path(path).resolve(), base)


def _comparable(settings: dict, base: Path) -> dict:
    """Settings with the model and task-file paths made absolute (relative ones are to `base`), so that a file
    written with absolute paths (before they were stored relative) compares equal too."""
    out = dict(settings)
    for key in ("model", "task"):
        if isinstance(out.get(key), str) and not (key == "task" and out[key] in BENCHMARKS):
            out[key] = os.path.normpath(base / out[key])
    return out


def _settings_diff(found: dict, want: dict) -> str:
    keys = sorted(set(found) | set(want))
    return ", ".join(f"{key} {found.get(key)!r} in the file vs {want.get(key)!r} now"
                     for key in keys if found.get(key) != want.get(key))


def _check_record(rec) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [f for f in RECORD_FIELDS if f not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(rec["settings"], dict):
        return "'settings' is not an object"
    for key, kind in (("problem_id", str), ("text", str), ("finish_reason", str)):
        if not isinstance(rec[key], kind):
            return f"{key!r} is not a string"
    tokens = rec["num_tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return f"num_tokens {tokens!r} is not an integer >= 0"
    index = rec["sample_index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"sample_index {index!r} is not an integer >= 0"
    return None


def _read_results(path: Path, settings: dict, redo: str = REDO) -> dict[str, dict[int, dict]]:
    """Samples already in ``path``: problem id -> sample index -> record (a later line wins).

    A last line that is not a valid record (a run killed mid-write) is dropped from the file with a warning,
    so appended lines start on a fresh line; a bad line anywhere else is an error, and so is a line written
    with other settings (`redo` says what to do then).
    """
    base = path.resolve().parent
    want = _comparable(settings, base)
    data = path.read_bytes()
    segments = data.split(b"\n")
    last = max((i for i, s in enumerate(segments) if s.strip()), default=-1)
    results: dict[str, dict[int, dict]] = {}
    offset = 0
    for i, raw in enumerate(segments):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = json.loads(raw)
            problem = _check_record(rec)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"not valid JSON ({e})"
        if problem is not None:
            if i != last:
                raise ValueError(f"{where}: {problem}; fix or delete that line, or {redo}")
            warnings.warn(f"{where}: ignoring a corrupt last line ({problem}; an interrupted write?); "
                          f"it is removed and that problem is generated again", stacklevel=3)
            with open(path, "r+b") as f:
                f.truncate(start)
            return results
        if _comparable(rec["settings"], base) != want:
            raise ValueError(f"{where}: this file holds samples made with other settings "
                             f"({_settings_diff(rec['settings'], settings)}); {redo}")
        if rec["sample_index"] >= settings["k"]:
            raise ValueError(f"{where}: sample_index {rec['sample_index']} is not below k = {settings['k']}")
        results.setdefault(rec["problem_id"], {})[rec["sample_index"]] = rec
    if data and not data.endswith(b"\n"):  # a complete last line cut just before its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return results


def _regrade(rec: dict, answer: str) -> dict:
    """A stored sample graded again from its text: what the file says about it ("extracted", "correct") is not
    trusted, so a hand-edited or damaged verdict cannot count (issue 24)."""
    extracted = extract_answer(rec["text"])
    return {**rec, "extracted": extracted, "correct": math_equal(extracted, answer)}


# ----- metrics and report ----------------------------------------------------------------------


def _pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... below k, and k."""
    return [2**i for i in range(max(k - 1, 0).bit_length()) if 2**i < k] + [k]


def _scores(problems: Sequence[Problem], samples: dict[str, list[dict]]) -> dict:
    verdicts = [[bool(r["correct"]) for r in samples[p.id]] for p in problems]
    cons = [majority_vote([r["extracted"] for r in samples[p.id]], p.answer) for p in problems]
    return {"problems": len(problems), "pass@1": mean_pass_at_1(verdicts), "cons@k": sum(cons) / len(cons)}


def summarize(problems: Sequence[Problem], samples: dict[str, list[dict]], k: int) -> dict:
    """Metrics of ``problems`` from their records (``samples[problem.id]``: the k JSONL records, in order).

    Returns ``pass@1`` (mean over problems of correct / k), ``cons@k`` (share of problems whose majority
    answer is right), ``pass@k`` ({j: mean unbiased pass@j} for j = 1, 2, 4, ... and k), ``mean_tokens``
    (generated tokens per sample), ``truncated`` (share of samples that hit max_tokens), and ``breakdown``
    ({"subject" | "level": {value: {"problems", "pass@1", "cons@k"}}}) for meta keys every problem has.
    """
    records = [r for p in problems for r in samples[p.id]]
    result = _scores(problems, samples)
    result["samples"] = len(records)
    result["pass@k"] = {j: sum(pass_at_k(k, sum(bool(r["correct"]) for r in samples[p.id]), j) for p in problems)
                        / len(problems) for j in _pass_ks(k)}
    result["mean_tokens"] = sum(r["num_tokens"] for r in records) / len(records)
    result["truncated"] = sum(r["finish_reason"] == "length" for r in records) / len(records)
    result["breakdown"] = {}
    for key in BREAKDOWN_KEYS:
        if not all(key in p.meta for p in problems):
            continue
        values = sorted({p.meta[key] for p in problems}, key=lambda v: (str(type(v)), v))
        result["breakdown"][key] = {str(v): _scores([p for p in problems if p.meta[key] == v], samples)
                                    for v in values}
    return result


def format_report(result: dict) -> str:
    """The table `r1lab eval` prints, from ``evaluate``'s dict."""
    s, k = result["settings"], result["k"]
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    lines = [f"{result['task_name']} | {Path(result['model']).name} | {result['problems']} problems x {k} samples "
             f"(temperature {s['temperature']:g}, top-p {s['top_p']:g}, at most {s['max_tokens']:,} tokens, "
             f"seed {s['seed']})",
             f"  {'pass@1 (mean over ' + str(k) + ' samples)':<34}{pct(result['pass@1'])}",
             f"  {'cons@' + str(k) + ' (majority vote)':<34}{pct(result['cons@k'])}"]
    for j, value in result["pass@k"].items():
        if j > 1:
            lines.append(f"  {'pass@' + str(j) + ' (unbiased estimator)':<34}{pct(value)}")
    lines.append(f"  {'mean response length':<34}{result['mean_tokens']:,.1f} tokens")
    lines.append(f"  {'stopped by max tokens':<34}{pct(result['truncated'])} of samples")
    for key, groups in result["breakdown"].items():
        lines.append(f"  by {key:<31}problems  pass@1  cons@{k}")
        for value, g in groups.items():
            lines.append(f"    {value[:30]:<32}{g['problems']:>8}  {pct(g['pass@1'])}  {pct(g['cons@k'])}")
    lines.append(f"  samples: {result['out']}")
    return "\n".join(lines)


# ----- the evaluation --------------------------------------------------------------------------


def evaluate(model_dir: str | os.PathLike, task: str, k: int = 8, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int | None = None, limit: int | None = None, data_dir: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None, seed: int = 0, device: str | None = None,
             batch: int = DEFAULT_BATCH, prompt_style: str = "chat", resume: bool = True, progress: bool = True,
             report: bool = True, template: str | None = None, compile: bool | None = None,
             redo_hint: str = REDO, dtype: str = "auto") -> dict:
    """Evaluate a checkpoint on a task: k samples per problem, graded, written to JSONL, summarised.

    Args:
        model_dir: checkpoint folder (HF layout with the tokenizer files).
        task: benchmark name (``gsm8k``, ``math500``, ``aime24``, ``amc23``) or a JSONL task file (``load_task``).
        k: samples per problem.
        temperature, top_p: sampling (the R1 paper's 0.6 / 0.95 by default).
        max_tokens: generated tokens per sample at most; None: 32768 (the paper's), capped to what the model's
            context leaves after the task's longest prompt.
        limit: evaluate only the first ``limit`` problems.
        data_dir: folder of the benchmark files (default: ``$R1LAB_DATA_DIR``, then ``../shared/data``).
        out: the JSONL file of samples (default: ``eval-<task>-<model folder name>.jsonl`` in the working
            directory); resumed from when it exists and ``resume``, overwritten otherwise.
        seed: run seed; problem p samples with ``problem_seed(seed, p.id)``.
        device: ``cpu`` or ``cuda`` (default: cuda when available); bf16 on CUDA, fp32 on CPU.
        dtype: the weights' dtype while sampling: ``auto`` (as above), ``float32`` or ``bfloat16``.
        batch: sequences decoded together (rounded down to a multiple of k, at least k).
        prompt_style: ``chat`` (R1 chat template) or ``plain`` (bare text, for base models).
        template: prompt text with ``{question}`` instead of a style (``render_prompt``), e.g. the format a
            small model was trained on.
        compile: torch.compile the engine's decode step (default: on CUDA; ~30 s once, worth it for long runs).
        resume: skip problems whose k samples are already in ``out``.
        progress: progress bar and notes on stderr. report: print the table on stdout.
        redo_hint: what the user can do when ``out`` holds samples that do not fit this run (for callers with
            other flags than `r1lab eval`'s --out and --no-resume).

    Returns:
        ``summarize``'s metrics of the requested problems plus ``task``, ``task_name``, ``model``, ``k``,
        ``out``, ``generated`` (problems sampled by this call) and ``settings``.

    Raises:
        ValueError / FileNotFoundError with one message saying what is wrong and where.
    """
    from .checkpoint import read_config
    from .engine import SamplingParams
    from .tokenizer import load_tokenizer

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    if template is not None and "{question}" not in template:
        raise ValueError(f"the prompt template must contain {{question}}, got {template!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")

    label, all_problems = load_task(task, data_dir)
    problems = all_problems[:limit]
    task_name = task if task in BENCHMARKS else Path(task).stem
    cfg, tok = read_config(model_dir), load_tokenizer(model_dir)
    positions = cfg.max_position_embeddings
    prompts = {p.id: render_prompt(tok, p.question, prompt_style, template) for p in problems}
    if max_tokens is None:
        # The cap comes from the whole task, not the requested slice, so that --limit does not change a setting.
        longest = max(len(render_prompt(tok, p.question, prompt_style, template)) for p in all_problems)
        max_tokens = min(DEFAULT_MAX_TOKENS, positions - longest)
        if max_tokens < 1:
            raise ValueError(f"the longest prompt of {task_name} has {longest} tokens: no room to generate in the "
                             f"model's {positions} positions")
    for p in problems:
        if len(prompts[p.id]) + max_tokens > positions:
            raise ValueError(f"problem {p.id}: {len(prompts[p.id])} prompt tokens + max_tokens {max_tokens} exceed "
                             f"the model's {positions} positions; use max tokens of at most "
                             f"{positions - len(prompts[p.id])}")

    out = Path(out) if out is not None else Path.cwd() / f"eval-{task_name}-{model_dir.resolve().name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.resolve().parent
    settings = {"model": _portable(model_dir, base), "task": label if task in BENCHMARKS else _portable(label, base),
                "k": k, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
                "prompt_style": prompt_style if template is None else f"template {template!r}"}
    if dtype != "auto":  # recorded only when set, so files written before the option resume as they did
        settings["dtype"] = dtype
    note = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)

    existing: dict[str, dict[int, dict]] = {}
    if resume and out.exists():
        existing = _read_results(out, settings, redo_hint)
    elif out.exists():
        note(f"overwriting {out} (resume is off)")
        out.write_bytes(b"")
    samples: dict[str, list[dict]] = {}
    for p in problems:
        found = existing.get(p.id, {})
        if len(found) == k:
            stale = next((r["reference"] for r in found.values() if r["reference"] != p.answer), None)
            if stale is not None:
                raise ValueError(f"{out}: problem {p.id} was graded against reference {stale!r} but the task now "
                                 f"says {p.answer!r} (the task data changed); {redo_hint}")
            samples[p.id] = [_regrade(found[i], p.answer) for i in range(k)]
        elif found:
            note(f"{out}: problem {p.id} has {len(found)} of {k} samples (an interrupted write?); generating it again")
    todo = [p for p in problems if p.id not in samples]
    if samples:
        changed = sum(r["correct"] is not existing[pid][r["sample_index"]]["correct"]
                      for pid, records in samples.items() for r in records)
        regraded = f"; {changed} stored verdicts differ from grading their text again, which counts" if changed else ""
        note(f"resuming from {out}: {len(samples)} of {len(problems)} problems already done{regraded}")

    if todo:
        from tqdm import tqdm

        slots = max(k, batch // k * k)  # a problem's k samples are admitted together, so slots come in ks
        max_seq_len = min(positions, max(len(prompts[p.id]) for p in todo) + max_tokens)
        engine = _load_engine(model_dir, device, slots, max_seq_len, compile, dtype)
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=k,
                                 seed=problem_seed(seed, p.id)) for p in todo]
        right = total = 0
        with open(out, "a", encoding="utf-8") as f, tqdm(total=len(problems), initial=len(samples), unit="problem",
                                                         desc=f"eval {task_name}", file=sys.stderr,
                                                         disable=not progress, dynamic_ncols=True) as bar:
            for i, completions in _generate(engine, [prompts[p.id] for p in todo], params):
                p = todo[i]
                records = []
                for c in sorted(completions, key=lambda c: c.sample_index):
                    text = c.text or ""
                    predicted = extract_answer(text)
                    records.append({"problem_id": p.id, "sample_index": c.sample_index, "text": text,
                                    "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                                    "extracted": predicted, "reference": p.answer,
                                    "correct": math_equal(predicted, p.answer), "settings": settings})
                # One write per problem, flushed: a kill loses at most the problems still in flight.
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()
                samples[p.id] = records
                right, total = right + sum(r["correct"] for r in records), total + len(records)
                bar.set_postfix_str(f"pass@1 {100 * right / total:.1f}% (this run)", refresh=False)
                bar.update(1)

    result = {"task": label, "task_name": task_name, "model": str(model_dir.resolve()), "k": k, "out": str(out),
              "generated": len(todo), "settings": settings, **summarize(problems, samples, k)}
    if report:
        print(format_report(result))
    return result


# ----- the command -----------------------------------------------------------------------------


def cmd_eval(args) -> None:
    result = evaluate(args.model, args.task, k=args.k, temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, limit=args.limit, data_dir=args.data_dir, out=args.out,
                      seed=args.seed, device=args.device, batch=args.batch, prompt_style=args.prompt_style,
                      resume=not args.no_resume, report=not args.json, template=args.template)
    if args.json:
        print(json.dumps(result, indent=2))


def add_parser(subparsers):
    """Register ``r1lab eval`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="sample k answers per problem of a math benchmark, grade them, report pass@k and cons@k",
        description="Evaluate a checkpoint the DeepSeek-R1 way: k samples per problem with the engine, answers "
                    "graded by mathematical equivalence, pass@1 averaged over k, majority vote (cons@k), unbiased "
                    "pass@k. Every sample is written to a JSONL file; a run resumes from it.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (HF layout, with tokenizer)")
    p.add_argument("--task", required=True, metavar="NAME|FILE",
                   help=f"benchmark ({', '.join(BENCHMARKS)}; test split) or a .jsonl file of "
                        f"{{\"question\" (or \"prompt\"/\"problem\"), \"answer\"}} rows")
    p.add_argument("--k", type=int, default=8, help="samples per problem (default: 8)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens generated per sample at most (default: {DEFAULT_MAX_TOKENS}, the R1 paper's, capped "
                        f"to what the model's context leaves after the task's longest prompt)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems (default: all)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder of the benchmark .jsonl files (default: $R1LAB_DATA_DIR, then ../shared/data)")
    p.add_argument("--out", metavar="FILE.jsonl", default=None,
                   help="samples file, resumed from if it exists (default: eval-<task>-<model folder>.jsonl in the "
                        "working directory)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each problem's seed derives from it (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"sequences decoded together, rounded down to a multiple of k (default: {DEFAULT_BATCH})")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat",
                   help="chat: R1 chat template, user turn; plain: bare question text, for base models "
                        "(default: chat)")
    p.add_argument("--template", default=None, metavar="TEXT",
                   help="prompt text with {question} in it, used instead of --prompt-style and the instruction "
                        "(e.g. the format a small model was trained on: \"User: {question}\\nAssistant: <think>\")")
    p.add_argument("--no-resume", action="store_true", help="overwrite the samples file instead of resuming from it")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of the table")
    p.set_defaults(fn=cmd_eval)
    return p
