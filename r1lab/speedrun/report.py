"""The speedrun's report card: report.md and its PNG plots, computed from the run folder alone.

Figures (plots/): reward and accuracy against RL steps for both RL stages, response length against RL steps,
accuracy per stage, and the routed experts' load per MoE layer of the RL model. Every number comes from the
run's own files (speedrun.json, the trainers' metrics.jsonl, the evaluation samples).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

STAGE_LABELS = {"base": "0 base (pretrained)", "r1-zero": "1 R1-Zero (RL on base)", "cold-start": "2 cold start (SFT)",
                "reasoning-rl": "3 reasoning RL", "student-distill": "5 student, distilled",
                "student-control": "5 student, control (cold-start data)"}
RL_RUNS = (("R1-Zero", "1-r1-zero"), ("reasoning RL", "3-reasoning-rl"))


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
    runs = [(name, _metrics(out / rel / "metrics.jsonl")) for name, rel in RL_RUNS]
    runs = [(n, m) for n, m in runs if m]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
        for ax, (name, recs) in zip(axes[0], runs):
            steps = [r["step"] for r in recs]
            ax.plot(steps, [r["reward"] for r in recs], label="reward (accuracy + 0.5 format)")
            ax.plot(steps, [r.get("accuracy") or 0.0 for r in recs], label="accuracy (training samples)")
            ax.set(title=name, xlabel="RL step", ylim=(0, 1.55))
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "rl_reward.png", dpi=110)
        plt.close(fig)
        figs.append(("Reward and accuracy against RL steps", "plots/rl_reward.png"))

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, recs in runs:
            ax.plot([r["step"] for r in recs], [r["response_len_mean"] for r in recs], label=name)
        ax.set(title="Response length", xlabel="RL step", ylabel="mean tokens per response")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "rl_length.png", dpi=110)
        plt.close(fig)
        figs.append(("Response length against RL steps", "plots/rl_length.png"))

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


def claims(state: dict) -> list[str]:
    """The three comparisons the R1 paper makes, checked on this run's numbers."""
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
             f"Hardware: {hardware()}. Commit: {git_commit()}. Task: {s['task']} ({knobs}), {s['eval_problems']} "
             f"held-out problems, {s['eval_k']} samples each at temperature 0.6, top-p 0.95.", ""]
    if pre:
        b, stu = pre.get("base", {}).get("params", {}), pre.get("student", {}).get("params", {})
        lines += [f"Models: `{s['model']}` MoE + MLA, {b.get('total', 0) / 1e6:.2f}M parameters "
                  f"({b.get('active', 0) / 1e6:.2f}M active per token); student `{s['student']}` "
                  f"{stu.get('total', 0) / 1e6:.2f}M ({stu.get('active', 0) / 1e6:.2f}M active). Vocabulary: the "
                  f"speedrun's task vocabulary of {pre.get('vocab_size')} tokens (characters, the R1 markers and the "
                  f"corpus's frequent words; r1lab.speedrun.vocab), not DeepSeek's 129,280, whose output layer would "
                  f"dominate a model this small.", ""]
    lines += ["## Held-out accuracy", "", headline(state), "", *claims(state), ""]
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
    lines += [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |", ""]
    if figs:
        lines += ["## Plots", ""]
        for title, rel in figs:
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Settings", "", "```json", json.dumps(s, indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
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
