"""The speedrun's report card: report.md and its PNG plots, computed from the run folder alone.

Figures (plots/): reward and accuracy against RL steps for both RL stages, response length against RL steps,
accuracy per stage, and the routed experts' load per MoE layer of the RL model. Every number comes from the
run's own files (speedrun.json, the trainers' metrics.jsonl, the evaluation samples).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

STAGE_LABELS = {"base": "0 base (pretrained)", "r1-zero": "1 R1-Zero (RL on base)", "cold-start": "2 cold start (SFT)",
                "reasoning-rl": "3 reasoning RL", "student-distill": "5 student, distilled",
                "student-control": "5 student, control (cold-start data)"}
RL_RUNS = (("R1-Zero", "1-r1-zero"), ("reasoning RL", "3-reasoning-rl"))

# The response classifier. A written step is one operation with its result, "15+d8=23", "3 + 5 = 8" or
# "44-h6=38" (an operand may carry its letter tag); the think block is what comes before </think> (all of the
# text when there is none).
RESPONSE_TYPES = ("direct", "worked", "checked")
CLASSIFIER_RULE = ("a response *answers at once* when its think block has fewer than two written steps (an "
                   "operation with its result, like `15+d8=23`, `+d8=23` or `3 + 5 = 8`), *works it out* with two or more, "
                   "and *works it out and checks* when it also says \"check\" or \"wait\"")
_STEP = re.compile(r"(?:\d+ ?[-+*] ?|\+)[a-z]?\d+ ?= ?-?\d+")  # 15+d8=23, 3 + 5 = 8, or +d8=23 (a running sum)
_CHECK = re.compile(r"\b(check|wait)\b", re.IGNORECASE)


def classify_response(text: str) -> str:
    """"direct", "worked" or "checked", by CLASSIFIER_RULE."""
    think = text.split("</think>", 1)[0]
    if len(_STEP.findall(think)) < 2:
        return "direct"
    return "checked" if _CHECK.search(think) else "worked"


def accuracy_by_type(records) -> dict[str, dict[str, float]]:
    """{type: {"n", "share", "accuracy"}} over records with "text" and "correct" (evaluation samples);
    accuracy is None for a type with no response."""
    counts = {t: [0, 0] for t in RESPONSE_TYPES}
    for r in records:
        c = counts[classify_response(r["text"])]
        c[0] += 1
        c[1] += bool(r["correct"])
    total = sum(n for n, _ in counts.values()) or 1
    return {t: {"n": n, "share": n / total, "accuracy": right / n if n else None} for t, (n, right) in counts.items()}


def worked_accuracy(types: dict) -> tuple[float, int] | None:
    """Accuracy of the responses that work it out, checked or not, and how many there are, from
    `accuracy_by_type`'s result; None when there are none."""
    n = types["worked"]["n"] + types["checked"]["n"]
    if not n:
        return None
    right = sum((types[k]["accuracy"] or 0) * types[k]["n"] for k in ("worked", "checked"))
    return right / n, n


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in (json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()) if "reward" in r]


def _plots(out: Path, state: dict) -> list[tuple[str, str]]:
    """Draw the figures; returns (title, relative path) of each written. Needs matplotlib (a dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    figs: list[tuple[str, str]] = []
    runs = [(name, rl_curves(out / rel)) for name, rel in RL_RUNS]
    runs = [(n, c) for n, c in runs if c]
    if runs:
        # One figure per the R1 paper's: what the policy writes, how well, and how long, against RL steps.
        fig, axes = plt.subplots(1, len(runs), figsize=(5.8 * len(runs), 3.8), squeeze=False)
        for ax, (name, curve) in zip(axes[0], runs):
            steps = [c["step"] for c in curve]
            for key, label in (("reasoning", "reasoning share"), ("checked", "self-check share"),
                               ("accuracy", "accuracy (training samples)")):
                ax.plot(steps, [c[key] for c in curve], label=label)
            ax.plot(steps, [c["reward"] / 1.5 for c in curve], label="reward / 1.5", linestyle=":")
            ax.set(title=name, xlabel="RL step", ylabel="share of responses", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            right = ax.twinx()
            right.plot(steps, [c["length"] for c in curve], color="black", linestyle="--", label="mean length")
            right.set(ylabel="mean response tokens", ylim=(0, None))
            lines = ax.get_legend_handles_labels()
            more = right.get_legend_handles_labels()
            ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "rl_curves.png", dpi=110)
        plt.close(fig)
        figs.append(("Reasoning share, self-check share, accuracy, reward and length against RL steps",
                     "plots/rl_curves.png"))

    ev = state.get("stages", {}).get("eval", {})
    rows = [(k, ev[k]) for k in STAGE_LABELS if k in ev]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [100 * v["pass@1"] for _, v in rows], width=0.4, label="pass@1")
        ax.bar([x + 0.2 for x in xs], [100 * v["cons@k"] for _, v in rows], width=0.4, label="majority vote")
        ax.set_xticks(list(xs), [STAGE_LABELS[k].split(" ", 1)[1].replace(" (", "\n(") for k, _ in rows], fontsize=7)
        ax.set(ylabel="held-out accuracy (%)", title="Accuracy per stage", ylim=(0, 100))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "accuracy.png", dpi=110)
        plt.close(fig)
        figs.append(("Accuracy per stage (held-out problems)", "plots/accuracy.png"))

    load = ev.get("expert_load")
    if load:
        fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.5 * len(load)))
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
        ax.set(xlabel="routed expert", ylabel="MoE layer", title="Expert load of the RL model (share of tokens)")
        ax.set_yticks(range(len(load)))
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / "expert_load.png", dpi=110)
        plt.close(fig)
        figs.append(("MoE expert load per layer", "plots/expert_load.png"))
    return figs


# ---------------------------------------------------------------------- reasoning: response types and margins
def _samples(out: Path, key: str) -> list[dict]:
    """The evaluation samples of one stage (eval/<key>.jsonl), or []."""
    path = out / "eval" / f"{key}.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _per_problem(records, value) -> dict[str, float]:
    """Mean of `value(record)` over each problem's samples, by problem id."""
    acc: dict[str, list[float]] = {}
    for r in records:
        acc.setdefault(r["problem_id"], []).append(float(value(r)))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def paired_margin(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Mean of a - b over the problems both hold, and its standard error. Paired by problem: a problem's
    samples average into one number first, so the error counts problems (the independent draws), not the
    correlated samples of one problem."""
    d = [a[k] - b[k] for k in sorted(a.keys() & b.keys())]
    if len(d) < 2:
        return (d[0] if d else 0.0), math.nan
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def _z(diff: float, se: float) -> float:
    if math.isnan(se):
        return math.nan
    return diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)


def check_changes(records) -> dict[str, int]:
    """Among responses that work it out and check: how many checks changed the answer (the result of the last
    step before the check differs from the final answer) and how many of the changed answers are right."""
    checked = changed = right = 0
    for r in records:
        if classify_response(r["text"]) != "checked":
            continue
        checked += 1
        think = r["text"].split("</think>", 1)[0]
        steps = _STEP.findall(think[:_CHECK.search(think).start()])
        before = steps[-1].rsplit("=", 1)[1].strip() if steps else None
        if before is not None and before != (r.get("extracted") or "").strip():
            changed += 1
            right += bool(r["correct"])
    return {"checked": checked, "changed": changed, "changed_right": right}


_TAGGED = re.compile(r"\b([a-z])(\d+)\b")  # an operand of the question, "c8" (or "c47")
_CHAIN_STEP = re.compile(r"(?:([a-z])(\d+))?\+([a-z])(\d+)=(\d+)")  # "a2+b0=2" or "+c8=10"


def first_slips(records, questions: dict[str, str]) -> dict[str, int]:
    """Where the wrong worked answers (works it out, checked or not) of a running sum ("Add a2 b0 c8.") first go
    wrong, in the pass before any check: "lookup" (an operand written with another value than the question
    gives its tag), else "addition" (a running total that is not the previous total plus the operand), else
    "other" (the first pass is right: a check or the final answer changed it, or no step could be read).
    `questions`: problem id -> question."""
    out = {"wrong": 0, "lookup": 0, "addition": 0, "other": 0}
    for r in records:
        if r["correct"] or classify_response(r["text"]) == "direct":
            continue
        out["wrong"] += 1
        ops = dict(_TAGGED.findall(questions.get(r["problem_id"], "")))
        think = r["text"].split("</think>", 1)[0]
        check = _CHECK.search(think)
        kind, total = "other", None
        for head, head_v, tag, v, result in _CHAIN_STEP.findall(think[:check.start()] if check else think):
            if (head and ops.get(head) != head_v) or ops.get(tag) != v:
                kind = "lookup"
                break
            first = int(head_v) if head else total
            if first is not None and int(result) != first + int(v):
                kind = "addition"
                break
            total = int(result)
        out[kind] += 1
    return out


def _types_table(out: Path) -> list[str]:
    lines = ["| stage | answers at once | works it out | works it out and checks | accuracy: at once | works it "
             "out | checks |", "|---|---|---|---|---|---|---|"]
    for key, label in STAGE_LABELS.items():
        recs = _samples(out, key)
        if not recs:
            continue
        t = accuracy_by_type(recs)
        acc = [f"{100 * t[k]['accuracy']:.1f}% ({t[k]['n']})" if t[k]["n"] else "-" for k in RESPONSE_TYPES]
        lines.append(f"| {label} | " + " | ".join(f"{100 * t[k]['share']:.1f}%" for k in RESPONSE_TYPES)
                     + " | " + " | ".join(acc) + " |")
    return lines


def _reasons(r) -> float:
    return classify_response(r["text"]) != "direct"


def _checks(r) -> float:
    return classify_response(r["text"]) == "checked"


def signature_claims(out: Path) -> list[dict]:
    """R1-Zero's signature and the later stages' claims, each a dict: `key`, `text`, `diff` and `se` (the
    margin and its standard error, in `unit`), `z`, `yes` (z >= 3), and where the issue sets a threshold,
    `target` (its wording) and `met`. Paired by problem, except the base's worked-vs-direct gap (unpaired,
    binomial over samples)."""
    base, zero = _samples(out, "base"), _samples(out, "r1-zero")
    claims: list[dict] = []

    def claim(key: str, text: str, diff: float, se: float, unit: str, target: str = "", met: bool | None = None):
        z = _z(diff, se)
        claims.append({"key": key, "text": text, "diff": diff, "se": se, "unit": unit, "z": z, "yes": z >= 3,
                       "target": target, "met": met})

    if base:
        t = accuracy_by_type(base)
        share = t["worked"]["share"] + t["checked"]["share"]
        claims.append({"key": "base_reasoning_share", "text": "base reasoning share (works it out, with or without "
                       f"a check): {100 * share:.1f}%", "value": 100 * share, "target": "<= 40%",
                       "met": share <= 0.40})
        nd, worked = t["direct"]["n"], worked_accuracy(t)
        if nd and worked:
            pd, (pw, nw) = t["direct"]["accuracy"], worked
            se = math.sqrt(pd * (1 - pd) / nd + pw * (1 - pw) / nw)  # binomial over samples, unpaired
            claim("base_gap", f"the base's worked answers are more accurate than its direct ones ({100 * pd:.1f}% "
                  f"of {nd} direct vs {100 * pw:.1f}% of {nw} worked; SE binomial over samples)", 100 * (pw - pd),
                  100 * se, " points", "gap >= 20 points", pw - pd >= 0.20)
    if base and zero:
        tz = accuracy_by_type(zero)
        share = tz["worked"]["share"] + tz["checked"]["share"]
        d, se = paired_margin(_per_problem(zero, _reasons), _per_problem(base, _reasons))
        claim("zero_reasoning_share", f"R1-Zero RL raises the reasoning share to {100 * share:.1f}%", 100 * d,
              100 * se, " points", ">= 80%", share >= 0.80)
        claims[-1]["value"] = 100 * share
        lb = sum(r["num_tokens"] for r in base) / len(base)
        lz = sum(r["num_tokens"] for r in zero) / len(zero)
        d, se = paired_margin(_per_problem(zero, lambda r: r["num_tokens"]),
                              _per_problem(base, lambda r: r["num_tokens"]))
        claim("zero_length", f"R1-Zero RL lengthens responses, {lb:.0f} -> {lz:.0f} tokens ({lz / lb:.2f}x)", d, se,
              " tokens", ">= 2x", lz >= 2 * lb)
        claims[-1]["value"] = lz / lb
        d, se = paired_margin(_per_problem(zero, lambda r: r["correct"]), _per_problem(base, lambda r: r["correct"]))
        claim("zero_pass1", "R1-Zero RL raises pass@1 over the base", 100 * d, 100 * se, " points",
              ">= +15 points", d >= 0.15)
        d, se = paired_margin(_per_problem(zero, _checks), _per_problem(base, _checks))
        claim("zero_self_check", f"R1-Zero RL raises the self-check share, "
              f"{100 * accuracy_by_type(base)['checked']['share']:.1f}% -> {100 * tz['checked']['share']:.1f}%",
              100 * d, 100 * se, " points")
    for key, text, a, b in (("rl_over_cold_start", "reasoning RL raises pass@1 over cold start", "reasoning-rl",
                             "cold-start"),
                            ("distill_over_control", "the distilled student beats the control student",
                             "student-distill", "student-control")):
        ra, rb = _samples(out, a), _samples(out, b)
        if ra and rb:
            d, se = paired_margin(_per_problem(ra, lambda r: r["correct"]), _per_problem(rb, lambda r: r["correct"]))
            claim(key, text, 100 * d, 100 * se, " points")
    return claims


def signature(out: Path) -> list[str]:
    """`signature_claims` as the report's lines: "yes" only at >= 3 SE, and a target's threshold stated."""
    lines = []
    for c in signature_claims(out):
        target = f"; target {c['target']}: {'met' if c['met'] else 'not met'}" if c.get("target") else ""
        if "z" not in c:
            lines.append(f"- {c['text']} (target {c['target']}: {'met' if c['met'] else 'not met'})")
        else:
            lines.append(f"- {'yes' if c['yes'] else 'NO'}: {c['text']} ({c['diff']:+.1f}{c['unit']}, "
                         f"{c['z']:.1f} SE){target}")
    return lines


def _sample_lines(out: Path) -> list[str]:
    """Two responses per stage chosen by a fixed rule: the first held-out problem, samples 0 and 1."""
    lines: list[str] = []
    for key, label in STAGE_LABELS.items():
        recs = [r for r in _samples(out, key) if r["problem_id"] == "test/0" and r.get("sample_index", 0) < 2]
        if recs:
            lines += [f"**{label}**", "", "```"]
            lines += [f"[{classify_response(r['text'])}, {'right' if r['correct'] else 'wrong'}] {r['text'].strip()}"
                      for r in sorted(recs, key=lambda r: r.get("sample_index", 0))]
            lines += ["```", ""]
    return lines


def _rollouts(run_dir: Path) -> list[dict]:
    """An RL run's logged training samples (samples.jsonl), or []."""
    path = run_dir / "samples.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _rollouts_by_step(run_dir: Path) -> dict[int, list[tuple[str, float]]]:
    """An RL run's logged training samples (samples.jsonl), by step: (response type, accuracy) of each."""
    by_step: dict[int, list[tuple[str, float]]] = {}
    for r in _rollouts(run_dir):
        by_step.setdefault(r["step"], []).append((classify_response(r["completion"]), float(r.get("accuracy") or 0.0)))
    return by_step


def rl_curves(run_dir: Path) -> list[dict]:
    """Per RL step, over every logged training sample (samples.jsonl): reasoning share, self-check share,
    accuracy; with reward and mean response length from metrics.jsonl."""
    by_step = _rollouts_by_step(run_dir)
    out = []
    for m in _metrics(run_dir / "metrics.jsonl"):
        kinds = [k for k, _ in by_step.get(m["step"], [])]
        n = len(kinds) or 1
        out.append({"step": m["step"], "reward": m["reward"], "accuracy": m.get("accuracy") or 0.0,
                    "length": m["response_len_mean"], "reasoning": sum(k != "direct" for k in kinds) / n,
                    "checked": sum(k == "checked" for k in kinds) / n, "samples": len(kinds)})
    return out


def training_types(run_dir: Path, parts: int = 3) -> list[dict]:
    """RL's own rollouts (samples.jsonl) by response type, in `parts` equal spans of the run's steps: for each
    span, its steps and each type's count and accuracy. Whether RL keeps a type is whether it is rewarded more
    often than the others in the policy's own samples (at the RL temperature), which these show."""
    by_step = _rollouts_by_step(run_dir)
    steps = sorted(by_step)
    spans = [steps[i * len(steps) // parts:(i + 1) * len(steps) // parts] for i in range(parts)]
    out = []
    for span in (s for s in spans if s):
        by: dict[str, list[float]] = {k: [] for k in RESPONSE_TYPES}
        for step in span:
            for kind, acc in by_step[step]:
                by[kind].append(acc)
        out.append({"steps": (span[0], span[-1]), **{k: {"n": len(v), "accuracy": sum(v) / len(v) if v else None}
                                                      for k, v in by.items()}})
    return out


def _training_types_table(out: Path) -> list[str]:
    rows = []
    for name, rel in RL_RUNS:
        for t in training_types(out / rel):
            cells = [f"{100 * t[k]['accuracy']:.1f}% ({t[k]['n']})" if t[k]["n"] else "-" for k in RESPONSE_TYPES]
            rows.append(f"| {name} | {t['steps'][0]}-{t['steps'][1]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["RL's own rollouts (its training samples, at the RL temperature) by type, in three spans of its steps: "
            "accuracy (samples). A type right less often than the others in a span has a negative advantage on "
            "average and loses probability; types right equally often are left to drift:", "",
            "| stage | steps | answers at once | works it out | works it out and checks |", "|---|---|---|---|---|",
            *rows, ""]


_QUESTION = re.compile(r"Add [^.]*\.")  # a running sum's question in a rollout's prompt


def rollout_slips(run_dir: Path) -> dict[str, dict[str, int]]:
    """A running-sum RL run's own rollouts over the first half of its steps (samples.jsonl), plain chains and
    checked ones apart: how many, how many right, and where the wrong ones first go wrong (`first_slips`). A
    check that caught the model's slips would leave its rollouts fewer wrong answers than wrong first passes;
    "mended" counts the right answers whose first pass was wrong, "other" the right first passes that still ended
    wrong, broken by the check or the copy after it. Where the checks break more than a few percent, they are right
    less often than plain chains and RL drops them."""
    recs = _rollouts(run_dir)
    if not recs:
        return {}
    half = (max(r["step"] for r in recs) + 1) // 2
    by_kind: dict[str, list[dict]] = {"worked": [], "checked": []}
    questions = {}
    for i, r in enumerate(recs):
        q = _QUESTION.search(r["prompt"])
        kind = classify_response(r["completion"]) if r["step"] <= half and q else None
        if kind in by_kind:
            by_kind[kind].append({"problem_id": i, "text": r["completion"], "correct": bool(r.get("accuracy"))})
            questions[i] = q.group(0)
    out = {}
    for kind, rows in by_kind.items():
        slips = first_slips(rows, questions)
        # the right answers whose first pass was wrong: mended by the check (or right by a second slip)
        mended = first_slips([{**r, "correct": False} for r in rows if r["correct"]], questions)
        out[kind] = {"n": len(rows), "right": len(rows) - slips["wrong"],
                     **{k: slips[k] for k in ("addition", "lookup", "other")},
                     "mended": mended["addition"] + mended["lookup"]}
    return out


def _rollout_slips_table(out: Path) -> list[str]:
    rows = []
    for name, rel in RL_RUNS:
        slips = rollout_slips(out / rel)
        for kind, label in (("worked", "works it out"), ("checked", "works it out and checks")):
            f = slips.get(kind)
            if f and f["n"]:
                pct = [f"{100 * f[k] / f['n']:.1f}%" for k in ("right", "addition", "lookup", "other", "mended")]
                rows.append(f"| {name} | {label} | {f['n']} | " + " | ".join(pct) + " |")
    if not rows:
        return []
    return ["RL's own rollouts over the first half of its steps, by where the wrong ones first go wrong (as above). "
            "The last two columns weigh what the checks do: right first passes that the check, or the copy after "
            "it, turned into a wrong answer, and wrong first passes that ended right (mended):", "",
            "| stage | type | rollouts | right | wrong running total | misread operand | first pass right, answer "
            "wrong | first pass wrong, answer right |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def headline(state: dict) -> str:
    """The accuracy table (markdown) of every evaluated stage."""
    ev = state.get("stages", {}).get("eval", {})
    k = state["settings"]["eval_k"]
    lines = [f"| stage | pass@1 (mean of {k}) | majority vote of {k} | mean response tokens |", "|---|---|---|---|"]
    for key, label in STAGE_LABELS.items():
        if key in ev:
            v = ev[key]
            lines.append(f"| {label} | {100 * v['pass@1']:.1f}% | {100 * v['cons@k']:.1f}% | {v['mean_tokens']:.0f} |")
    return "\n".join(lines)


def claims(state: dict, folder: Path | None = None) -> list[str]:
    """The comparisons the R1 paper makes, checked on this run's numbers: with the run `folder` (its evaluation
    samples), R1-Zero's signature too, each with its margin in standard errors (`signature`); without, the
    plain accuracy order."""
    if folder is not None and _samples(Path(folder), "base"):
        return signature(Path(folder))
    ev = state.get("stages", {}).get("eval", {})
    out = []
    for label, a, b in (("R1-Zero RL raises accuracy over the base", "r1-zero", "base"),
                        ("reasoning RL raises accuracy over cold start", "reasoning-rl", "cold-start"),
                        ("the distilled student beats the control student", "student-distill", "student-control")):
        if a in ev and b in ev:
            x, y = ev[a]["pass@1"], ev[b]["pass@1"]
            out.append(f"- {'yes' if x > y else 'NO'}: {label} ({100 * y:.1f}% -> {100 * x:.1f}% pass@1)")
    return out


def write_report(out: Path, state: dict) -> Path:

    s, st = state["settings"], state.get("stages", {})
    figs = _plots(out, state)
    knobs = ", ".join(f"{k}={v}" for k, v in s["task_knobs"])
    pre = st.get("pretrain", {})
    lines = [f"# r1lab speedrun report: preset `{state['preset']}`", "",
             f"{_ran_on(state)}. Task: {s['task']} ({knobs}), {s['eval_problems']} "
             f"held-out problems, {s['eval_k']} samples each at temperature 0.6, top-p 0.95.", ""]
    if pre:
        b, stu = pre.get("base", {}).get("params", {}), pre.get("student", {}).get("params", {})
        lines += [f"Models: `{s['model']}` MoE + MLA, {b.get('total', 0) / 1e6:.2f}M parameters "
                  f"({b.get('active', 0) / 1e6:.2f}M active per token); student `{s['student']}` "
                  f"{stu.get('total', 0) / 1e6:.2f}M ({stu.get('active', 0) / 1e6:.2f}M active)"
                  + (f"; the main model's config changed by {', '.join(f'{k}={v}' for k, v in s['model_config'])}"
                     if s.get("model_config") else "") + ". Vocabulary: the "
                  f"speedrun's task vocabulary of {pre.get('vocab_size')} tokens (characters, the R1 markers and the "
                  f"corpus's frequent words; r1lab.speedrun.vocab), not DeepSeek's 129,280, whose output layer would "
                  f"dominate a model this small.", ""]
    lines += ["## Held-out accuracy", "", headline(state), "", *claims(state, out), ""]
    types = _types_table(out)
    if len(types) > 2:
        lines += ["## What the models write", "", f"Response classifier (rule-based): {CLASSIFIER_RULE}. Share of "
                  f"each type among the held-out samples, and accuracy per type (with the number of samples):", "",
                  *types, ""]
        for key, whose in (("base", "The base's"), ("r1-zero", "R1-Zero's")):  # a base whose checks change
            ch = check_changes(_samples(out, key))  # answers teaches R1-Zero that checking costs accuracy
            if ch["checked"]:
                lines += [f"{whose} checks: {ch['checked']} responses check their result; {ch['changed']} of the "
                          f"checks changed the answer, and {ch['changed_right']} of the changed answers are right.",
                          ""]
        lines += _training_types_table(out)
        test = out / "data" / "test.jsonl"
        if s["task"] == "running-sum" and test.is_file():
            questions = {q["id"]: q["question"] for q in map(json.loads, test.read_text().splitlines())}
            slips = [(label, first_slips(_samples(out, key), questions)) for key, label in STAGE_LABELS.items()]
            rows = [f"| {label} | {f['wrong']} | {f['lookup']} | {f['addition']} | {f['other']} |"
                    for label, f in slips if f["wrong"]]
            if rows:
                lines += ["Where the wrong worked answers first go wrong, in the pass before any check: a misread "
                          "operand (another value than the question gives its tag), else a wrong running total, "
                          "else elsewhere (the first pass was right):", "",
                          "| stage | wrong worked answers | misread operand | wrong running total | elsewhere |",
                          "|---|---|---|---|---|", *rows, ""]
            lines += _rollout_slips_table(out)
        lines += ["Samples by a fixed rule (the first held-out problem, its first two samples):", "",
                  *_sample_lines(out)]
    rej = st.get("rejection")
    if rej:
        lines += [f"Rejection sampling: {rej['sampled']:,} samples from the RL model, {rej['correct']:,} correct, "
                  f"{rej['well_formed']:,} well-formed, {rej['kept']:,} distinct correct and well-formed kept for "
                  f"distillation.", ""]
    lines += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
    total = 0.0
    for name, v in st.items():
        lines.append(f"| {name} | {v['seconds']:.0f} |")
        total += v["seconds"]
    wall = state.get("wall_seconds")
    if wall is not None and abs(wall - total) > 1:  # jobs ran side by side (lanes), or a stage was rerun
        lines += [f"| **wall clock** | **{wall:.0f}** ({wall / 60:.1f} min) |", "",
                  "A stage's seconds are its jobs' (work); with two lanes jobs run side by side, so they add up "
                  f"to more than the wall clock ({total:.0f} s). The wall clock counts every run of this folder, "
                  "reruns included.", ""]
    else:
        lines += [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |", ""]
    if figs:
        lines += ["## Plots", ""]
        for title, rel in figs:
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Settings", "", "```json", json.dumps(s, indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _ran_on(state: dict) -> str:
    """Where the stages ran, as recorded when they ran; a folder from before that record says the report's
    machine and commit instead, and that it does."""
    ran = state.get("ran_on")
    if not ran:
        return f"Hardware: {hardware()}. Commit: {git_commit()} (both where this report was written)"
    if len(ran) == 1:
        return f"Hardware: {ran[0]['hardware']}. Commit: {ran[0]['commit']}"
    return "Ran on, in turn: " + "; ".join(f"{r['hardware']} at commit {r['commit']}" for r in ran)


def hardware(device: str | torch.device | None = None) -> str:
    """What a run on `device` ran on: the GPU's name for a CUDA device, else the CPU's model and cores (None or
    "auto": the GPU where there is one, as "auto" picks)."""
    dev = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto")
           else torch.device(device))
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    if dev.type != "cpu":
        return f"{dev.type} device, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} (CPU)"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with local changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
