"""The speedrun's data: one synthetic task, rendered in the two prompt formats of the R1 recipe.

Every file is JSON Lines that the stand-alone commands read too (`r1lab pretrain / sft / grpo / eval`):

  corpus.jsonl      {"text"}: pretraining documents, R1-Zero-formatted dialogues. Most answer at once (the
                    think block only states the answer); a share `reasoning_share` carries a worked solution in
                    the think block, as web text holds some reasoning, and of those some check their result and
                    a few catch and fix a slip (`worked_body`). The base model can thus sometimes reason, and
                    RL has something to reinforce. A share `textbook_share` of the documents are worked examples
                    ("Example: Add a7 b3 c5. Solution<think>\na7+b3=10 +c5=15. The answer is 15.\n</think> ..."),
                    as textbooks hold worked arithmetic while most dialogues answer at once: the skill is learned
                    from more text than the dialogues that use it. Their layout is the dialogue's, word for word
                    but the two role words, because a model this small finds an operand by its distance: in
                    another layout its lookups did not carry over to dialogues (benchmarks/LOG.md, eighth session).
                    For the same reason a dialogue puts every token where the chat template does (`Layout`).
  zero_prompts.jsonl  {"prompt", "answer"}: R1-Zero prompts (the layout's `zero`), for `r1lab grpo` in raw style
  prompts.jsonl     {"prompt", "answer"}: bare questions, for `r1lab grpo` in chat style
  cold_start.jsonl  {"prompt", "response"}: a small set of long, well-formatted worked solutions (cold start)
  test.jsonl        {"id", "question", "answer"}: held-out problems, for `r1lab eval`

Train and test never share an instance: the task's split is a hash of the instance (r1lab.tasks.synthetic).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from ..tasks.benchmarks import Problem
from ..tasks.synthetic import TASKS, Arithmetic

# The R1 chat template's rendering of one user turn with the think block opened (as r1lab grpo's chat style with
# open_think writes it), for evaluation of the chat-tuned stages.
CHAT_TEMPLATE = "<bos><｜User｜>{question}<｜Assistant｜><think>\n"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the corpus writes a dialogue (`zero`: the R1-Zero prompt, which RL and evaluation of the base use too),
    a worked example (`textbook`: the dialogue's layout with other role words, one token each) and the
    completion after either (`completion`, formatted with body and answer).

    The R1-Zero template of the DeepSeek-R1 paper (Table 1) without its instruction sentence, which a model of a
    million parameters cannot read: the format is learned in pretraining from documents in this form instead.
    A model this small finds an operand by its distance, so where the reasoning starts relative to the question
    decides whether what the base learned carries over to the chat template of the cold start. `chat` puts
    every token where CHAT_TEMPLATE and `chat_response` put it (a role word, "<think>", a newline, the body;
    the answer tag after the same newlines), with plain words for the two role markers; `newline` is the
    layout of run folders made before it (the body three tokens further from the question)."""
    zero: str
    textbook: str
    completion: str


LAYOUTS = {
    "chat": Layout("User: {question} Assistant<think>\n", "Example: {question} Solution<think>\n",
                   "{body}\n</think>\n\n<answer>{answer}</answer>"),
    "newline": Layout("User: {question}\nAssistant: <think>", "Example: {question}\nSolution: <think>",
                      " {body} </think> <answer>{answer}</answer>"),
}
# The default layout's templates, for readers of this module.
ZERO_TEMPLATE = LAYOUTS["chat"].zero
TEXTBOOK_TEMPLATE = LAYOUTS["chat"].textbook


def make_task(name: str, **knobs):
    if name not in TASKS:
        raise ValueError(f"speedrun task {name!r}: choose one of {', '.join(TASKS)}")
    known = dataclasses.fields(TASKS[name])
    unknown = set(knobs) - {f.name for f in known}
    if unknown:
        raise ValueError(f"speedrun task {name!r} has no knob {', '.join(sorted(unknown))}; its knobs: "
                         f"{', '.join(f.name for f in known)}")
    return TASKS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})


def solution_body(task, p: Problem) -> str:
    """The worked solution (a chain of thought ending in "The answer is X."): for a chain of additions and
    subtractions (the speedrun's default task) `chain_solution`, else the task's own."""
    if isinstance(task, Arithmetic) and set(task.ops) <= {"+", "-"}:
        return chain_solution(p.question)
    return p.solution if p.solution else task.solution(p)


def worked_body(task, p: Problem, rng: random.Random, check_share: float, fix_share: float,
                slip_share: float = 0.0) -> str:
    """A worked solution of the corpus. For a task that can check its result (`checked_solution`): a share
    `fix_share` makes a slip that its check catches and fixes, a share `check_share` checks a right result, and
    of the rest, which do not check, a share `slip_share` makes a slip nobody catches (a wrong answer, as worked
    solutions in real text sometimes are: the reason a check pays). Other tasks: `solution_body`."""
    if hasattr(task, "checked_solution"):
        u = rng.random()
        if u < fix_share:
            return task.fixed_solution(p, rng)
        if u < fix_share + check_share:
            return task.checked_solution(p)
        if rng.random() < slip_share:
            return task.slipped_solution(p, rng)
    return solution_body(task, p)


def chain_solution(question: str) -> str:
    """Left-to-right evaluation of "What is a + b - c ...?", one operation per step, each step restating
    what is left, so every step reads only what is right before it:
        Step by step: 3 + 5 = 8, so 8 - 2 + 4. 8 - 2 = 6, so 6 + 4. 6 + 4 = 10. The answer is 10."""
    terms = question.removeprefix("What is ").rstrip("?").split()
    steps = []
    while len(terms) > 1:
        a, op, b = int(terms[0]), terms[1], int(terms[2])
        value = a + b if op == "+" else a - b
        terms = [str(value), *terms[3:]]
        rest = f", so {' '.join(terms)}." if len(terms) > 1 else "."
        steps.append(f"{a} {op} {b} = {value}{rest}")
    return f"Step by step: {' '.join(steps)} The answer is {terms[0]}."


def stated_answer(body: str, p: Problem) -> str:
    """The answer a worked text arrives at ("... The answer is 23."): the one its answer tag states, wrong after a
    slip nobody caught; the problem's own answer where the text states none."""
    return body.rsplit("The answer is ", 1)[1].rstrip(".") if "The answer is " in body else p.answer


def bare_body(p: Problem) -> str:
    """An answer without reasoning: the expression restated with its result ("What is" questions), else just
    the answer."""
    if p.question.startswith("What is ") and p.question.endswith("?"):
        return f"{p.question.removeprefix('What is ').rstrip('?')} = {p.answer}."
    return f"The answer is {p.answer}."


def zero_completion(body: str, answer: str, layout: str = "chat") -> str:
    """The completion after a layout's R1-Zero prompt: reasoning, then the answer in tags."""
    return LAYOUTS[layout].completion.format(body=body, answer=answer)


def chat_response(body: str, answer: str) -> str:
    """The assistant turn of the chat format: the think block (opened by the prompt), then the tagged answer."""
    return f"<think>\n{body}\n</think>\n\n<answer>{answer}</answer>"


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def write_data(folder: Path, task, *, corpus_docs: int, reasoning_share: float, rl_prompts: int,
               cold_start: int, test: int, seed: int, easy_task=None, easy_share: float = 0.0,
               check_share: float = 0.0, fix_share: float = 0.0, slip_share: float = 0.0,
               textbook_share: float = 0.0, layout: str = "chat", cold_check_share: float = 0.0,
               cold_fix_share: float = 0.0, cold_slip_share: float = 0.0,
               lookup_share: float = 0.0, sum_share: float = 0.0) -> dict[str, int]:
    """Write the files of the module docstring into `folder`; returns the row count of each. A share
    `easy_share` of the corpus comes from `easy_task` (smaller instances of the task, as a real corpus holds
    problems of every size): their bare answers are the facts the worked solutions of the main task use.
    `check_share` and `fix_share` of the worked documents check their result or catch and fix a slip, and
    `slip_share` of the unchecked ones slip (`worked_body`). A share `textbook_share` of the corpus are worked
    examples (the layout's `textbook`: a dialogue's layout with other role words; the same mix of checks, fixes
    and slips). `layout` names the entry of LAYOUTS that writes dialogues, examples and R1-Zero prompts. Of the
    cold-start demonstrations, a share `cold_check_share` checks its result and `cold_fix_share` makes a slip that
    its check catches and fixes (R1's cold-start data has reflection and verification); of the rest, plain worked
    solutions, a share `cold_slip_share` slips unnoticed (demonstrations written without verifying their answers,
    as the corpus's are; the answer tag is then the wrong answer the text arrives at). A share `lookup_share` of the
    documents that are not worked examples are lookup drills instead (the task's `lookup_drill`: its question, then
    its tagged operands recalled in a random order), text that practises the copies by tag a worked solution
    makes. A share `sum_share` of the dialogues left are addition drills (the task's `sum_drill`: steps of a
    chain, "Sums: 17 +c5=22 40 +f9=49."), practice in the additions evenly over the totals a chain reaches."""
    if layout not in LAYOUTS:
        raise ValueError(f"speedrun layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    form = LAYOUTS[layout]
    rng = random.Random(f"speedrun-corpus:{seed}")
    n_easy = round(corpus_docs * easy_share) if easy_task is not None else 0
    corpus = task.problems(corpus_docs - n_easy, "train", seed)
    if n_easy:
        corpus += easy_task.problems(n_easy, "train", seed)
        random.Random(f"speedrun-mix:{seed}").shuffle(corpus)

    textbook = set(random.Random(f"speedrun-textbook:{seed}").sample(range(len(corpus)),
                                                                     round(len(corpus) * textbook_share)))

    drills: set[int] = set()
    drill_rng = random.Random(f"speedrun-lookup:{seed}")  # which dialogues are drills, and their orders
    if lookup_share > 0:
        if not hasattr(task, "lookup_drill"):
            raise ValueError(f"lookup_share={lookup_share}: task {task.name!r} has no lookup drills (running-sum has)")
        rest = [i for i in range(len(corpus)) if i not in textbook]
        drills = set(drill_rng.sample(rest, round(len(rest) * lookup_share)))
    sums: set[int] = set()
    sum_rng = random.Random(f"speedrun-sums:{seed}")  # which dialogues are addition drills, and their steps
    if sum_share > 0:
        if not hasattr(task, "sum_drill"):
            raise ValueError(f"sum_share={sum_share}: task {task.name!r} has no addition drills (running-sum has)")
        rest = [i for i in range(len(corpus)) if i not in textbook and i not in drills]
        sums = set(sum_rng.sample(rest, round(len(rest) * sum_share)))

    def doc(i: int, p: Problem) -> dict:
        if i in drills:
            return {"text": task.lookup_drill(p, drill_rng)}
        if i in sums:
            return {"text": task.sum_drill(p, sum_rng)}
        worked = i in textbook or rng.random() < reasoning_share
        body = worked_body(task, p, rng, check_share, fix_share, slip_share) if worked else bare_body(p)
        template = form.textbook if i in textbook else form.zero
        return {"text": template.format(question=p.question) + zero_completion(body, stated_answer(body, p), layout)}

    cold_rng = random.Random(f"speedrun-cold:{seed}")

    def cold_body(p: Problem) -> str:
        if cold_check_share or cold_fix_share or cold_slip_share:
            return worked_body(task, p, cold_rng, cold_check_share, cold_fix_share, cold_slip_share)
        return solution_body(task, p)

    def cold_response(p: Problem) -> str:
        body = cold_body(p)
        return chat_response(body, stated_answer(body, p))

    rl = task.problems(rl_prompts, "train", seed + 1)
    demos = task.problems(cold_start, "train", seed + 2)
    held_out = task.problems(test, "test", seed + 3)
    counts = {
        "corpus": write_jsonl(folder / "corpus.jsonl", (doc(i, p) for i, p in enumerate(corpus))),
        "zero_prompts": write_jsonl(folder / "zero_prompts.jsonl", (
            {"prompt": form.zero.format(question=p.question), "answer": p.answer} for p in rl)),
        "prompts": write_jsonl(folder / "prompts.jsonl", ({"prompt": p.question, "answer": p.answer} for p in rl)),
        "cold_start": write_jsonl(folder / "cold_start.jsonl", (
            {"prompt": p.question, "response": cold_response(p)} for p in demos)),
        "test": write_jsonl(folder / "test.jsonl", (
            {"id": f"test/{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(held_out))),
    }
    return counts


def tokenizer_texts(folder: Path):
    """Every text the tokenizer must cover: the corpus and the chat-format demonstrations."""
    for name, key in (("corpus.jsonl", "text"), ("cold_start.jsonl", "response"), ("cold_start.jsonl", "prompt")):
        with open(folder / name, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)[key]
