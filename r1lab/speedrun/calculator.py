"""RL with a tool, shown small: a tiny model learns to multiply three-digit numbers with the calculator.

"What is 347 * 829?" is beyond a 1M-parameter model, but copying "347 * 829" into a calculator call and the
output "287663" into "The answer is 287663." is not. The demonstration:

  1 data       train and held-out problems (disjoint pairs), the cold-start demonstrations, the task tokenizer
               (characters, frequent words, the chat and tool markers as single ids: vocab.TOOL_MARKERS), and a
               pretraining corpus of plain text in which numbers recur
  1b pretrain  `r1lab pretrain` of a fresh speedrun-student on that corpus (--corpus 0 skips it)
  2 cold start `r1lab sft` of that model on the demonstrations: half of them call the calculator, the rest answer
               at once (right, as a demonstrator who knows the product would), so the model starts split between
               the habits: when it calls, it copies the digits well; when it answers at once, it guesses
  3 evaluate   held-out problems, with the calculator and (the control) without it
  4 RL         `r1lab grpo` with grpo.tools = ["calculator"] and one reward: the final answer is the product
  5 evaluate   the RL model again; report.md with the numbers and curve.png (tool calls and accuracy per step)

    python -m r1lab.speedrun.calculator --out runs/calculator

What it shows (benchmarks/LOG.md, tenth session; the defaults, seeds 0-3, one thread of a shared 2-core CPU,
about 11 minutes a run): the cold start is right on 13-40% of held-out samples with the calculator and 0% without
it, calling it on 32-50% of samples; 20 GRPO steps raise accuracy to 35-80% (+22 to +43 points, 7 to 13 standard
errors) and tool calls to 0.85-0.98 per sample (+0.47 to +0.64, 14 to 26 standard errors), on every seed. RL
selects the habit that earns reward: direct answers never do, so the share of calls rises, and accuracy with it.
What it needs is a cold start that copies: the copying of digits appears in a jump during SFT (near step 700 for
one seed, 1100 for another; with 1200 steps one seed of three never got there), and before it forms every reward
is 0 and RL has nothing to learn from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..checkpoint import load_pretrained
from ..tokenizer import TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, tools_prompt
from ..tools import calculator as _calculator
from ..tools import function_schema
from ..train import grpo, pretrain, sft
from ..train.recipe import load_recipe
from .pipeline import stage_recipe
from .report import paired_margin
from .vocab import MARKERS, TOOL_MARKERS, build_task_tokenizer



def calculator(expression: str) -> str:
    """Evaluate arithmetic."""
    return _calculator(expression)


# The built-in calculator under its own name with a one-line description: the template's tools section (indented
# JSON of the schema) is then about 110 tokens instead of 330, so every row is cheaper and the question sits closer
# to the call that copies it. The template is the official one; only the function's description is shorter.
TOOL = "r1lab.speedrun.calculator:calculator"
SCHEMA = function_schema(calculator)
# A new line with its JSON indentation, and JSON's and markdown's frequent punctuation, as one id each, so the
# schema's indented JSON costs a few ids a line.
INDENTS = tuple("\n" + " " * k for k in (4, 8, 12, 16)) + ('": "', '": ', '",', "```", "###", "##")
REWARD = "r1lab.speedrun.calculator:final_answer=1"
_ANSWER = re.compile(r"The answer is (-?\d+)\.\s*$")
_SAID = re.compile(r"The answer is (-?\d+)\.")
_EXPRESSION = re.compile(r'"expression": "([^"]*)"')
_OUTPUT = re.compile(re.escape(TOOL_OUTPUT_BEGIN) + "(.*?)" + re.escape(TOOL_OUTPUT_END), re.S)


@dataclass
class Settings:
    """Sizes of one demonstration run; the defaults take about 11 minutes on one thread of a shared 2-core CPU."""
    train: int = 2000  # training problems (RL prompts; the demonstrations are the first `demos` of them)
    test: int = 200  # held-out problems, no pair of which is in the training set
    corpus: int = 3000  # pretraining documents (plain text in which numbers recur), 0: no pretraining
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    demos: int = 400  # cold-start demonstrations
    tool_share: float = 0.5  # share of the demonstrations that call the calculator (the rest answer at once)
    sft_steps: int = 2000  # copying forms in a jump, between steps 600 and 1200 by the seed (benchmarks/LOG.md)
    sft_batch: int = 8
    sft_lr: float = 3e-3
    rl_steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    rl_lr: float = 3e-4  # 1e-3 collapsed the policy (no tool calls, 6-token answers) within 7 steps
    temperature: float = 1.0  # RL rollouts
    eval_samples: int = 2  # samples per held-out problem (temperature eval_temperature)
    eval_temperature: float = 0.5
    max_tokens: int = 96  # per sample, tool output included
    model: str = "speedrun-student"
    seed: int = 0


# ---------------------------------------------------------------------- data
def problems(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distinct (a, b) pairs of three-digit numbers, split into train and held-out rows
    {"prompt", "answer", "expression"}."""
    rng = random.Random(seed)
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < n_train + n_test:
        pairs[(rng.randint(100, 999), rng.randint(100, 999))] = None
    rows = [{"prompt": f"What is {a} * {b}?", "answer": str(a * b), "expression": f"{a} * {b}"} for a, b in pairs]
    return rows[:n_train], rows[n_train:]


def copy_corpus(n: int, seed: int = 0) -> list[dict]:
    """Pretraining documents {"text"} in which numbers recur: a product written out and restated, a number said
    again, a question's numbers repeated. Nothing in them is computable by a small model except by copying the
    earlier occurrence, which is what a base model brings to the cold start (induction)."""
    rng = random.Random(f"calculator-corpus:{seed}")
    num = lambda: rng.randint(0, 10 ** rng.randint(1, 6) - 1)  # noqa: E731
    forms = [
        lambda a, b, c: f"{a} * {b} = {a * b}. So {a} * {b} is {a * b}.",
        lambda a, b, c: f"What is {a} * {b}? Work out {a} * {b}. It is {a * b}. The answer is {a * b}.",
        lambda a, b, c: f"Write {c} twice: {c} {c}.",
        lambda a, b, c: f"The numbers are {a} and {b}. Again: {a} and {b}.",
        lambda a, b, c: f"Take {a} + {b}. The sum {a} + {b} is {a + b}, and {a + b} is the answer.",
    ]
    docs = []
    for _ in range(n):
        lines = [rng.choice(forms)(rng.randint(100, 999) if rng.random() < 0.5 else num(),
                                    rng.randint(100, 999) if rng.random() < 0.5 else num(), num())
                 for _ in range(4)]
        docs.append({"text": "\n".join(lines)})
    return docs


def demonstration(row: dict, use_tool: bool) -> list[list[dict]]:
    """SFT rows (conversations; the loss is on the last turn) showing how to answer `row`: with the calculator
    two rows, the call turn and the answer after its output; without, one row that answers at once."""
    ask = [{"role": "system", "content": tools_prompt([SCHEMA])}, {"role": "user", "content": row["prompt"]}]
    answer = {"role": "assistant", "content": f"The answer is {row['answer']}."}
    if not use_tool:
        think = "<think>\nI multiply them in my head.\n</think>\n\n"
        return [ask + [{"role": "assistant", "content": think + answer["content"]}]]
    call = {"type": "function", "function": {"name": "calculator",
                                             "arguments": json.dumps({"expression": row["expression"]})}}
    think = "<think>\nThis product is hard to do in my head, so I use the calculator.\n</think>\n\n"
    turn = ask + [{"role": "assistant", "content": think, "tool_calls": [call]}]
    return [turn, turn + [{"role": "tool", "content": calculator(row["expression"])}, answer]]


def final_answer(prompts, completions, answer, **_) -> list[float]:
    """1 when the conversation's last assistant turn ends with "The answer is X." and X is the product."""
    out = []
    for c, want in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        m = _ANSWER.search(text.rpartition("</think>")[2])
        out.append(1.0 if m and m.group(1) == want else 0.0)
    return out


def write_data(folder: Path, s: Settings):
    """train.jsonl, test.jsonl, cold_start.jsonl and tokenizer/ in `folder`; returns the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = problems(s.train, s.test, s.seed)
    rng = random.Random(s.seed + 1)
    demos = [m for r in train[:s.demos] for m in demonstration(r, rng.random() < s.tool_share)]
    corpus = copy_corpus(s.corpus, s.seed)
    for name, rows in (("train", train), ("test", test), ("cold_start", [{"messages": m} for m in demos]),
                       ("corpus", corpus)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Words seen in the demonstrations (the tools prompt included) become single ids; digits stay one id each.
    texts = ([json.dumps(m, ensure_ascii=False) for m in demos] + [m["content"] for d in demos for m in d]
             + [d["text"] for d in corpus])
    return build_task_tokenizer(folder / "tokenizer", texts, min_count=5, markers=MARKERS + TOOL_MARKERS + INDENTS)


# ---------------------------------------------------------------------- evaluation
def evaluate(model, tok, rows: list[dict], s: Settings, tools: bool, out: Path) -> dict:
    """Held-out accuracy and tool calls per sample: one rollout of every row (s.eval_samples samples each)
    through GRPOTrainer, the same multi-turn tool loop that RL trains with. Also each problem's mean correctness,
    for paired standard errors."""
    r = grpo.GRPORecipe.defaults()
    r.run.out, r.run.device, r.data.shuffle = str(out), "cpu", False
    g = r.grpo
    g.prompt_style, g.tools, g.rewards, g.beta = "chat", [TOOL] if tools else [], [REWARD], 0.0
    g.prompts_per_step, g.group_size, g.max_tokens = len(rows), s.eval_samples, s.max_tokens
    g.temperature, g.log_samples, r.train.batch_size = s.eval_temperature, 0, 64
    t = grpo.GRPOTrainer(r, model, tok, rows, quiet=True)
    ro = t.rollout(0)
    correct = ro.rewards.tolist()
    calls = ro.tool_calls or [0] * len(correct)
    per_problem: dict[str, list[float]] = {}
    per_problem_calls: dict[str, list[float]] = {}
    for row, c, n in zip(ro.rows, correct, calls):
        per_problem.setdefault(row["prompt"], []).append(c)
        per_problem_calls.setdefault(row["prompt"], []).append(float(n))
    without = [c for c, n in zip(correct, calls) if not n]
    copies_call, copies_output = copy_rates(ro.rows, ro.completions, calls)
    return {"accuracy": sum(correct) / len(correct), "tool_calls": sum(calls) / len(calls),
            "samples": len(correct), "accuracy_without_call": sum(without) / len(without) if without else None,
            "call_copies_question": copies_call, "answer_copies_output": copies_output,
            "per_problem": {k: sum(v) / len(v) for k, v in per_problem.items()},
            "per_problem_calls": {k: sum(v) / len(v) for k, v in per_problem_calls.items()}}


def copy_rates(rows: list[dict], texts: list[str], calls: list[int]) -> tuple[float | None, float | None]:
    """Where a sample that called the calculator goes wrong: the shares of those samples whose call's expression
    is the question's, and whose final answer is the tool's output (right or not). None without calls."""
    call = output = called = 0
    for row, text, n in zip(rows, texts, calls):
        if not n:
            continue
        called += 1
        m = _EXPRESSION.search(text)
        call += bool(m) and m.group(1) == row["expression"]
        out = _OUTPUT.search(text)
        said = _SAID.search(text.rpartition(TOOL_OUTPUT_END)[2])
        output += bool(out and said) and said.group(1) == out.group(1).strip()
    return (call / called, output / called) if called else (None, None)


# ---------------------------------------------------------------------- the run
def _common(r, out: Path, data: Path, steps: int, batch: int, lr: float, seed: int) -> None:
    stage_recipe(r, out, data / "tokenizer", steps, batch, lr, seed, "cpu", ckpt_every=0)
    r.moe.mtp_weight = 0.0


def run(out: str | Path, s: Settings, quiet: bool = False) -> dict:
    """The whole demonstration into `out` (replaced if it exists); returns the results written to results.json."""
    out, t0 = Path(out), time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    say = (lambda *a: None) if quiet else (lambda msg: print(f"[calculator {time.perf_counter() - t0:5.0f}s] {msg}",
                                                             flush=True))
    torch.manual_seed(s.seed)
    data = out / "data"
    tok = write_data(data, s)
    train, test = ([json.loads(x) for x in (data / f"{n}.jsonl").read_text().splitlines()] for n in ("train", "test"))
    say(f"{len(train)} training and {len(test)} held-out problems, {s.demos} demonstrations "
        f"({s.tool_share:.0%} with the calculator), vocabulary {tok.vocab_size}")

    init, pre = None, {}
    if s.corpus and s.pretrain_steps:
        r = load_recipe(None, "pretrain")
        r.model.preset, r.model.config = s.model, {"vocab_size": tok.vocab_size}
        _common(r, out / "pretrain", data, s.pretrain_steps, s.pretrain_batch, s.pretrain_lr, s.seed)
        r.data.train, r.data.seq_len = [str(data / "corpus.jsonl")], 128
        r.optim.warmup_steps = max(s.pretrain_steps // 20, 1)
        say(f"pretraining: {s.pretrain_steps} steps of {s.model} on {s.corpus} documents in which numbers recur")
        pre = pretrain.run(r, quiet=quiet)
        init = out / "pretrain" / "final"

    r = load_recipe(None, "sft")
    if init is None:
        r.model.preset, r.model.config = s.model, {"vocab_size": tok.vocab_size}
    else:
        r.model.init = str(init)
    _common(r, out / "cold-start", data, s.sft_steps, s.sft_batch, s.sft_lr, s.seed)
    r.data.train, r.data.seq_len = [str(data / "cold_start.jsonl")], 512
    r.optim.warmup_steps = max(s.sft_steps // 10, 1)
    say(f"cold start: {s.sft_steps} SFT steps of {s.model}")
    sft.run(r, quiet=quiet)

    results: dict = {"settings": asdict(s), "vocab_size": tok.vocab_size, "pretrain_loss": pre.get("loss")}
    model = load_pretrained(out / "cold-start" / "final")
    results["cold_start"] = evaluate(model, tok, test, s, True, out / "eval" / "cold-start")
    say(f"cold start, held out: accuracy {results['cold_start']['accuracy']:.3f}, "
        f"tool calls {results['cold_start']['tool_calls']:.2f} per sample")
    model = load_pretrained(out / "cold-start" / "final")
    results["no_tool"] = evaluate(model, tok, test, s, False, out / "eval" / "no-tool")
    say(f"cold start without the calculator: accuracy {results['no_tool']['accuracy']:.3f}")

    r = grpo.load_grpo_recipe(None, {"data.train": str(data / "train.jsonl")})
    r.model.init = str(out / "cold-start" / "final")
    _common(r, out / "rl", data, s.rl_steps, 64, s.rl_lr, s.seed)
    r.log.every = 1
    g = r.grpo
    g.prompt_style, g.tools, g.max_turns, g.rewards = "chat", [TOOL], 2, [REWARD]
    g.prompts_per_step, g.group_size, g.max_tokens = s.prompts_per_step, s.group_size, s.max_tokens
    g.temperature, g.beta, g.eps_high, g.loss_agg = s.temperature, 0.0, 0.28, "token"
    say(f"RL: {s.rl_steps} GRPO steps, {s.prompts_per_step} prompts x {s.group_size} samples, calculator on")
    grpo.run(r, quiet=quiet)

    model = load_pretrained(out / "rl" / "final")
    results["rl"] = evaluate(model, tok, test, s, True, out / "eval" / "rl")
    say(f"after RL, held out: accuracy {results['rl']['accuracy']:.3f}, "
        f"tool calls {results['rl']['tool_calls']:.2f} per sample")
    results["accuracy_gain"] = paired_margin(results["rl"]["per_problem"], results["cold_start"]["per_problem"])
    results["tool_call_gain"] = paired_margin(results["rl"]["per_problem_calls"],
                                              results["cold_start"]["per_problem_calls"])
    results["curve"] = [{"step": m["step"], "tool_calls": m["tool_calls"], "accuracy": m["reward/final_answer"]}
                        for m in map(json.loads, (out / "rl" / "metrics.jsonl").read_text().splitlines())
                        if "tool_calls" in m]
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(out, results)
    say(f"report: {out / 'report.md'}")
    return results


# ---------------------------------------------------------------------- report
def write_report(out: Path, res: dict) -> None:
    """report.md and curve.png (matplotlib, a dependency) from the results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = res["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["tool_calls"] for c in curve], label="tool calls per sample")
    ax.plot(steps, [c["accuracy"] for c in curve], label="accuracy (training rollouts)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)

    s, cs, nt, rl = res["settings"], res["cold_start"], res["no_tool"], res["rl"]
    gain, se = res["accuracy_gain"]
    calls_gain, calls_se = res["tool_call_gain"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "# RL with a calculator: three-digit products",
        "",
        f"A {s['model']} model (task vocabulary of {res['vocab_size']} ids), cold-started on {s['demos']} "
        f"demonstrations ({s['tool_share']:.0%} call the calculator, the rest answer at once) with "
        f"{s['sft_steps']} SFT steps, then {s['rl_steps']} GRPO steps ({s['prompts_per_step']} prompts x "
        f"{s['group_size']} samples, temperature {s['temperature']}) with the calculator and one reward: the final "
        f"answer is the product. Held out: {s['test']} problems never seen in training, {s['eval_samples']} samples "
        f"each at temperature {s['eval_temperature']}. Wall time {res['wall_s']:.0f} s.",
        "",
        "| model | tools offered | accuracy | tool calls per sample | accuracy when not calling | call copies the "
        "question | answer copies the output |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| cold start | no | {fmt(nt['accuracy'])} | - | {fmt(nt['accuracy'])} | - | - |",
        *(f"| {name} | calculator | {fmt(e['accuracy'])} | {e['tool_calls']:.2f} | "
          f"{fmt(e['accuracy_without_call'])} | {fmt(e.get('call_copies_question'))} | "
          f"{fmt(e.get('answer_copies_output'))} |" for name, e in (("cold start", cs), ("after RL", rl))),
        "",
        f"Accuracy gain from RL on the held-out problems: {gain:+.3f} (standard error {se:.3f}, paired by problem); "
        f"tool calls per sample {calls_gain:+.2f} (standard error {calls_se:.2f}). The copy columns are shares of "
        f"the samples that called the calculator.",
        "",
        "![tool calls and accuracy per GRPO step](curve.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m r1lab.speedrun.calculator",
        description="Cold start (SFT) and GRPO with the built-in calculator on three-digit products; writes data/, "
                    "cold-start/, rl/, results.json, report.md and curve.png into --out.")
    p.add_argument("--out", default="runs/calculator", metavar="DIR",
                   help="run folder, replaced if it exists (default: runs/calculator)")
    for f in fields(Settings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"(default: {f.default})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    res = run(a.out, Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)}), quiet=a.quiet)
    print(f"accuracy {res['cold_start']['accuracy']:.3f} -> {res['rl']['accuracy']:.3f} "
          f"(gain {res['accuracy_gain'][0]:+.3f} +- {res['accuracy_gain'][1]:.3f}), tool calls "
          f"{res['cold_start']['tool_calls']:.2f} -> {res['rl']['tool_calls']:.2f} "
          f"(+- {res['tool_call_gain'][1]:.2f}), without the calculator "
          f"{res['no_tool']['accuracy']:.3f}; {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
