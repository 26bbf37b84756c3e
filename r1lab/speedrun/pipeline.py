"""`r1lab speedrun`: the DeepSeek-R1 recipe end to end on a small MoE + MLA model, with a report card.

Stages (each writes a folder of its own in the run folder; training stages are ordinary `r1lab pretrain / sft /
grpo` runs whose recipe.toml is there, so each can also be rerun or continued as a command of its own):

  0 pretrain     data/ (task, tokenizer), then the base model and the smaller student's base, on a corpus of
                 R1-Zero-formatted dialogues that mostly answer at once and sometimes reason (data.py)
  1 r1-zero      GRPO straight from the base, R1-Zero prompts, accuracy + format rewards
  2 cold-start   SFT of the base on a small set of long, well-formatted worked solutions (chat template)
  3 reasoning-rl GRPO from the cold-start model, chat prompts with the think block opened
  4 rejection    sample many answers per training prompt from the RL model, keep the correct, well-formed ones
  5 distill      SFT of the student base on those samples, and (the control) on the cold-start data only
  6 eval         every stage's model on held-out problems: pass@1 over k samples (temperature 0.6, top-p 0.95,
                 as the paper evaluates) and the majority vote (cons@k); then report.md and its plots

State: `speedrun.json` in the run folder holds the preset and each finished stage's wall time and results.
`--resume` skips finished stages and continues an interrupted training stage from its last checkpoint;
Ctrl-C stops after a checkpoint. `--stages 3-6` reruns part of the recipe on an existing run folder (or runs only
part of a new one); when such a run is interrupted, `--resume` continues those stages only, and the one after runs
the rest.

Lanes: the stages are made of jobs (JOBS: the base and the student pretrain apart, each model is evaluated as soon
as it exists, ...). On a CPU of two or more threads the speedrun runs two jobs at once whenever two are ready, each
in a worker process with half the threads (`lanes=2`): the models are small, so one thread per job does more work
than two threads on one job. A job that everything left waits for takes every thread. On a GPU the jobs run one
after another in this process. Every job seeds itself, so the lanes change the schedule, not the recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..eval import DTYPES, weights_dtype
from ..model.config import get_preset
from . import data as sdata
from .report import git_commit, hardware, write_report

STAGES = ("pretrain", "r1-zero", "cold-start", "reasoning-rl", "rejection", "distill", "eval")
# What each stage writes (relative to the run folder): removed before a stage is rerun with --stages.
OUTPUTS = {"pretrain": ("data", "0-pretrain"), "r1-zero": ("1-r1-zero",), "cold-start": ("2-cold-start",),
           "reasoning-rl": ("3-reasoning-rl",), "rejection": ("data/distill.jsonl",), "distill": ("5-distill",),
           "eval": ("eval",)}


@dataclass(frozen=True)
class Preset:
    """Everything a speedrun varies. `cpu` is the default (a 2-core CPU, two lanes: 12.7-14.1 minutes measured on
    an idle AMD EPYC with the addition drills, seeds 0-2; 13.1 there before them, and 11.4 on an Intel Xeon before
    the twenty-third session's speedups; README); `gpu` one GPU (7.6 and
    8.7 minutes in two runs on an H100)."""
    model: str = "speedrun"  # r1lab.model.config preset of the main model (vocab_size set from the tokenizer)
    # changes to the main model's config, e.g. (("num_attention_heads", 8), ("qk_nope_head_dim", 16)); from the
    # command line a JSON object: --set 'model_config={"num_attention_heads": 8}'
    model_config: tuple = ()
    student: str = "speedrun-student"  # the distillation student (fewer layers and experts)
    task: str = "running-sum"  # sums of eight tagged one-digit numbers: "Add a7 b3 c5 d8 e2 f9 g1 h4."
    # checks undo each step of the first pass ("15-c5=10"), reading only what it wrote (RunningSum.check_route)
    task_knobs: tuple = (("n_operands", 8), ("check_route", "inverse"))
    corpus_docs: int = 24_000
    # share of the pretraining dialogues with a worked solution: 0.25, not 0.35, so that the base answers at once
    # more often and R1-Zero's length is measured against a base that seldom reasons (twenty-first session: at 0.35
    # R1-Zero's length was 1.90-1.96x on two of three seeds, at 0.25 3.3-3.5x on all three)
    reasoning_share: float = 0.25
    textbook_share: float = 0.25  # share of pretraining documents that are worked examples (data.Layout.textbook)
    layout: str = "chat"  # how dialogues, examples and R1-Zero prompts are written (data.LAYOUTS)
    check_share: float = 0.5  # share of the worked documents that check their result (tasks that can)
    fix_share: float = 0.15  # share of the worked documents that make a slip, catch it and fix it
    slip_share: float = 0.2  # share of the unchecked worked documents whose slip nobody catches (a wrong answer)
    # share of the dialogues that are lookup drills instead ("Add a7 b3 c5. Recall: c5 a7 b3.", the task's
    # `lookup_drill`), practice in the copies by tag that worked solutions make. 0.05: the bases of seeds 0-3 all
    # met the base targets on an AMD EPYC, against three of four without drills (seed 1's checks drifted) and two
    # of four at 0.2 (benchmarks/LOG.md, twenty-fifth session)
    lookup_share: float = 0.05
    # share of the dialogues left that are addition drills instead ("Sums: 17 +c5=22 40 +f9=49.", the task's
    # `sum_drill`): the chain's additions drawn evenly over the totals a chain reaches, where worked solutions
    # reach the large totals at their last steps only. 0.1: the bases of seeds 5, 7 and 10, which missed the gap
    # between worked and direct answers, met it by 43-67 points; full runs of seeds 0, 1, 2 and 7 met every target,
    # and seeds 5 and 6 all but the checks, which their R1-Zero dropped (benchmarks/LOG.md, twenty-ninth session)
    sum_share: float = 0.1
    easy_share: float = 0.0  # share of the corpus drawn from smaller instances of the task (`easy_knobs`)
    easy_knobs: tuple = ()  # task knobs of those smaller instances, e.g. (("n_operands", 4),)
    seq_len: int = 256
    pretrain_steps: int = 900
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    student_pretrain_steps: int = 1200
    rl_prompts: int = 4096  # training prompts available to the RL stages and rejection sampling
    rl_steps: int = 50  # R1-Zero's steps (and reasoning RL's, unless reasoning_rl_steps is set)
    # reasoning RL's steps (0: rl_steps): 60, not 40, since the update pads less (nineteenth session: seed 0's
    # margin over the cold start 0.2 -> 2.0 SE, its distillation 2.3 -> 4.1 SE, the run 778 -> 827 s)
    reasoning_rl_steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    rl_lr: float = 6e-5  # reasoning RL's learning rate (and R1-Zero's, unless zero_rl_lr is set)
    # R1-Zero's learning rate (0: rl_lr). Twice reasoning RL's: the base must move from answering at once to
    # working out within 50 steps; at 6e-5 one seed stalled at a 75% reasoning share (LOG, fifteenth session)
    zero_rl_lr: float = 1.2e-4
    rl_batch: int = 64  # sequences per forward/backward in the GRPO update (when rl_micro_tokens is 0)
    # the GRPO update's micro-batches by padded positions instead (grpo.micro_tokens; 0: rl_batch rows): rows of
    # about one length go together, so less padding is computed. On a CPU, 4,096 positions take reasoning RL's
    # update from 1.93 to 1.63 s (benchmarks/speedrun_step.py --update, twenty-third session); on a GPU one large
    # micro-batch stays fastest
    rl_micro_tokens: int = 4096
    rl_temperature: float = 0.7  # sampling temperature of the RL stages' rollouts (the policy the loss scores)
    # DAPO's dynamic sampling in both RL stages: groups whose rewards are all equal (no signal) are dropped and
    # more prompts sampled, up to grpo.max_resample extra rounds a step
    dynamic_sampling: bool = False
    max_tokens: int = 200
    cold_start: int = 200
    # the cold start's demonstrations check and fix slips as often as the corpus's worked documents do: sampled
    # policies then differ, so reasoning RL's groups carry a signal (benchmarks/LOG.md, thirteenth session)
    cold_check_share: float = 0.3  # share of the cold-start demonstrations that check their result
    cold_fix_share: float = 0.1  # share of them that make a slip, catch it with the check and fix it
    # share of the plain (unchecked) ones whose slip goes unnoticed, a wrong answer, as slip_share in the corpus: the
    # demonstrations are written as the corpus's worked documents are, not verified. Reasoning RL then has slips to
    # remove even where the base's worked skill is at the ceiling (twenty-first session, Intel Xeon: RL over the
    # cold start +5.6 -> +11.7 points on seed 0's weak base; seed 2's strong one +2.2 (3.6 SE), against +0.7 (1.8 SE)
    # with an oracle's demonstrations in the nineteenth session's run of older code)
    cold_slip_share: float = 0.2
    sft_steps: int = 30
    sft_batch: int = 16
    sft_lr: float = 1e-3
    rejection_prompts: int = 1024
    rejection_samples: int = 4
    rejection_temperature: float = 0.7
    rejection_top_p: float = 0.95
    distill_steps: int = 150
    # held-out problems and samples of each. A paired margin's error counts problems: at the same 1,200 samples,
    # 600 problems x 2 narrow the margins' standard errors by 11-27% against 300 x 4, since much of a margin's
    # variance is between problems (benchmarks/eval_power.py; benchmarks/LOG.md, nineteenth and twenty-eighth
    # sessions)
    eval_problems: int = 600
    eval_k: int = 2
    # the dtype of every stage's compute on a GPU (training, rollouts, sampling, evaluation): "auto" is bf16 there
    # (fp32 on a CPU); "float32" keeps the cpu preset's small models in fp32 on a GPU, where on sums of twelve
    # their bf16 bases learned the worked chains far worse than on a CPU (benchmarks/LOG.md, twenty-eighth session)
    dtype: str = "auto"
    seed: int = 0


PRESETS: dict[str, Preset] = {
    # Running sums of eight tagged one-digit numbers ("Add a7 b3 c5 d8 e2 f9 g1 h4."), worked out in short local
    # steps ("a7+b3=10 +c5=15 ..."). A quarter of the dialogues work the sum out (some check it by undoing
    # each step, a few catch a slip that way, some slip unnoticed), the rest answer at once, and a quarter of the
    # corpus are worked examples (a dialogue's layout with "Example:"/"Solution:" for its role words). Dialogues
    # put every token where the chat template does (layout "chat"). Half the worked documents check their sum and
    # 15% catch and fix a slip; the cold start's 200 demonstrations check (30%) and fix (10%) too, and a fifth of
    # their plain ones slip unnoticed, as the corpus's do. R1-Zero runs 50 steps at 1.2e-4, reasoning RL 60 at 6e-5,
    # both sampling at temperature 0.7. A twentieth of the dialogues are lookup drills ("Add a7 b3 c5. Recall: c5 a7
    # b3.") and a tenth of the rest addition drills ("Sums: 49 +h6=55 4 +b8=12."). What each choice does:
    # benchmarks/LOG.md, sixth to twenty-ninth sessions.
    "cpu": Preset(),
    # One GPU: the cpu preset's recipe on running sums of twenty ("Add a6 b7 ... t3."), which the 54M model answers
    # at once only ~27% right but works out ~100% right, with 1,024-token rows so that a checked document fits
    # whole (at 512 the checks were cut and R1-Zero dropped them); 25% of the dialogues and half the corpus's
    # examples work the sum out. 454 s on one H100 (benchmarks/LOG.md, nineteenth session).
    "gpu": Preset(model="speedrun-gpu", student="speedrun-gpu-student", task="running-sum",
                  task_knobs=(("n_operands", 20), ("check_route", "inverse")), corpus_docs=100_000,
                  reasoning_share=0.25, textbook_share=0.5, seq_len=1024, pretrain_steps=1500, pretrain_batch=32,
                  pretrain_lr=1e-3, student_pretrain_steps=2000, rl_steps=50, reasoning_rl_steps=40,
                  prompts_per_step=32, group_size=8, rl_lr=6e-5, zero_rl_lr=1.2e-4, rl_batch=128, rl_micro_tokens=0,
                  max_tokens=600, cold_start=500, sft_steps=40, sft_batch=32, sft_lr=3e-4, rejection_prompts=1024,
                  rejection_samples=4, rejection_temperature=1.0, rejection_top_p=1.0, distill_steps=400,
                  eval_problems=1200, eval_k=2, cold_slip_share=0.0, lookup_share=0.0, sum_share=0.0),
    # CI: every stage at toy sizes, in well under a minute on a CPU. The base learns enough running sums of two
    # (checks and fixed slips included) for rejection sampling to keep something; the numbers mean nothing else.
    "mini": Preset(model="speedrun-student", task="running-sum", task_knobs=(("n_operands", 2),), corpus_docs=2000,
                   reasoning_share=0.5, check_share=0.3, fix_share=0.1, slip_share=0.2, seq_len=64, pretrain_steps=200,
                   pretrain_batch=16, student_pretrain_steps=3,
                   rl_prompts=64, rl_steps=2, reasoning_rl_steps=2, prompts_per_step=2, group_size=2, rl_batch=4, max_tokens=64,
                   cold_start=64, sft_steps=60, sft_batch=8, rejection_prompts=64, rejection_samples=4,
                   rejection_temperature=1.0, rejection_top_p=1.0, distill_steps=3, eval_problems=8, eval_k=2,
                   cold_check_share=0.0, cold_fix_share=0.0, cold_slip_share=0.0, sum_share=0.0),
}

# Settings added after run folders existed, with the values those folders ran with (a resumed old run keeps them).
SINCE = {"textbook_share": 0.0, "rl_temperature": 1.0, "reasoning_rl_steps": 0, "layout": "newline",
         "cold_check_share": 0.0, "cold_fix_share": 0.0, "zero_rl_lr": 0.0, "cold_slip_share": 0.0,
         "rl_micro_tokens": 0, "lookup_share": 0.0, "model_config": (), "dtype": "auto",
         "sum_share": 0.0}
# Settings that are [name, value] pairs (a JSON object on the command line).
PAIRS = tuple(f.name for f in dataclasses.fields(Preset) if f.type in ("tuple", tuple))

# What each stage reads from earlier ones (checked before it starts, so a partial rerun fails clearly).
NEEDS = {"r1-zero": ("0-pretrain/base/final",), "cold-start": ("0-pretrain/base/final",),
         "reasoning-rl": ("2-cold-start/final",), "rejection": ("3-reasoning-rl/final",),
         "distill": ("0-pretrain/student/final", "data/distill.jsonl")}

# Evaluation of each stage: (stage key, model folder relative to the run, prompt template; "zero": the run's
# layout's R1-Zero prompt)
MODELS = (
    ("base", "0-pretrain/base/final", "zero"),
    ("r1-zero", "1-r1-zero/final", "zero"),
    ("cold-start", "2-cold-start/final", sdata.CHAT_TEMPLATE),
    ("reasoning-rl", "3-reasoning-rl/final", sdata.CHAT_TEMPLATE),
    ("student-distill", "5-distill/distilled/final", sdata.CHAT_TEMPLATE),
    ("student-control", "5-distill/control/final", sdata.CHAT_TEMPLATE),
)

# The jobs of each stage, in the order a free lane takes them (the longest chain first: cold start, reasoning RL,
# rejection sampling and the distilled student), each with the jobs it waits for ("stage" or "stage/part"). A
# stage is finished when all its parts are; a job of a stage that is not being run counts as done.
JOBS = (
    ("pretrain", "data", ()),
    ("pretrain", "base", ("pretrain/data",)),
    ("pretrain", "student", ("pretrain/data",)),
    ("cold-start", "", ("pretrain/base",)),
    ("reasoning-rl", "", ("cold-start",)),
    ("rejection", "", ("reasoning-rl",)),
    ("distill", "distilled", ("pretrain/student", "rejection")),
    ("distill", "control", ("pretrain/student",)),
    ("r1-zero", "", ("pretrain/base",)),
    *(("eval", key, (_job,)) for key, _job in (("reasoning-rl", "reasoning-rl"), ("base", "pretrain/base"),
                                                ("r1-zero", "r1-zero"), ("cold-start", "cold-start"),
                                                ("student-control", "distill/control"),
                                                ("student-distill", "distill/distilled"))),
    ("eval", "expert-load", ("eval/reasoning-rl",)),
)


def job_name(stage: str, part: str) -> str:
    return f"{stage}/{part}" if part else stage


def parse_stages(spec: str) -> list[int]:
    """"0-6", "3", "1,2,5" -> stage numbers; raises ValueError naming the bad part."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--stages: {part!r} is not a stage number or range like 2-5") from None
        if not 0 <= a <= b < len(STAGES):
            raise ValueError(f"--stages: {part!r} is outside 0-{len(STAGES) - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def read_state(path: Path) -> dict:
    """A run folder's speedrun.json, checked: a damaged file or a setting of the wrong type is one error naming
    the file and the field (the settings become a Preset that every stage trusts)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e}); restore the file, or start a new run with another "
                         f"--out") from None
    if not (isinstance(state, dict) and isinstance(state.get("preset"), str)
            and isinstance(state.get("settings"), dict) and isinstance(state.get("stages"), dict)):
        raise ValueError(f"{path}: expected an object with 'preset' (a string), 'settings' and 'stages' (objects)")
    defaults = Preset()
    for key, value in state["settings"].items():
        if key not in Preset.__dataclass_fields__:
            raise ValueError(f"{path}: unknown setting {key!r}")
        want = type(getattr(defaults, key))
        if want is tuple:  # task_knobs: [name, value] pairs
            ok = isinstance(value, list) and all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str)
                                                 for kv in value)
            what = "a list of [name, value] pairs"
        elif want is float:
            ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif want is int:
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok, what = isinstance(value, want), f"a {'string' if want is str else want.__name__}"
        if not ok:
            raise ValueError(f"{path}: settings.{key} must be {what}, got {value!r}")
    parts = state.get("parts", {})  # finished jobs of unfinished stages
    if not (isinstance(parts, dict) and all(st in STAGES and isinstance(v, dict) for st, v in parts.items())):
        raise ValueError(f"{path}: 'parts' must map stage names to objects of finished jobs")
    if not isinstance(state.get("wall_seconds", 0.0), (int, float)):
        raise ValueError(f"{path}: 'wall_seconds' must be a number")
    ran_on = state.get("ran_on", [])
    if not (isinstance(ran_on, list) and all(isinstance(r, dict) and isinstance(r.get("hardware"), str)
                                             and isinstance(r.get("commit"), str) for r in ran_on)):
        raise ValueError(f"{path}: 'ran_on' must be a list of objects with 'hardware' and 'commit' (strings)")
    return state


class Speedrun:
    """One run folder and its state; `run(stages)` executes stages in order."""

    def __init__(self, out: str | Path, preset: str = "cpu", device: str = "auto", resume: bool = False,
                 quiet: bool = False, overrides: dict[str, Any] | None = None):
        self.out = Path(out)
        self.state_path = self.out / "speedrun.json"
        self.quiet, self.device_name = quiet, device
        state = read_state(self.state_path) if self.state_path.is_file() else None
        if state is not None and not resume:
            raise ValueError(f"{self.out} already holds a speedrun: pass --resume to continue it (or --stages to "
                             f"rerun some stages), or choose another --out")
        if state is None:
            if preset not in PRESETS:
                raise ValueError(f"unknown speedrun preset {preset!r}: choose one of {', '.join(PRESETS)}")
            p = dataclasses.replace(PRESETS[preset], **(overrides or {}))
            state = {"preset": preset, "settings": dataclasses.asdict(p), "stages": {}}
        self.state = state
        settings = {**SINCE, **state["settings"]}  # a run folder older than a setting keeps what it ran with
        self.p = Preset(**{k: tuple(map(tuple, v)) if k in PAIRS else v for k, v in settings.items()})
        if self.p.dtype not in DTYPES:
            raise ValueError(f"speedrun setting dtype={self.p.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.p.layout not in sdata.LAYOUTS:
            raise ValueError(f"speedrun setting layout={self.p.layout!r}: choose one of {', '.join(sdata.LAYOUTS)}")
        # The shorter context of the two models bounds every stage's rows (the SFT stages pack up to twice
        # seq_len): checked here, not minutes later when a stage builds its recipe.
        try:
            model = get_preset(self.p.model).replace(**dict(self.p.model_config))
        except (TypeError, ValueError) as e:  # a field ModelConfig lacks, or a value it refuses
            raise ValueError(f"speedrun setting model_config={dict(self.p.model_config)}: {e}") from None
        self.context = min(model.max_position_embeddings, get_preset(self.p.student).max_position_embeddings)
        if self.p.seq_len > self.context:
            raise ValueError(f"speedrun setting seq_len={self.p.seq_len} is longer than the models' context: "
                             f"{self.context} positions ({self.p.model}, {self.p.student})")
        if self.p.max_tokens >= self.context:
            raise ValueError(f"speedrun setting max_tokens={self.p.max_tokens} leaves no room for a prompt in the "
                             f"models' context of {self.context} positions")
        self.task = sdata.make_task(self.p.task, **dict(self.p.task_knobs))
        self.easy_task = (sdata.make_task(self.p.task, **{**dict(self.p.task_knobs), **dict(self.p.easy_knobs)})
                          if self.p.easy_share > 0 else None)
        self.data = self.out / "data"

    # ------------------------------------------------------------------ driver
    def run(self, stages: list[int] | None = None, lanes: int = 1, threads: int | None = None) -> dict:
        """All stages (finished ones skipped, an interrupted one continued), or exactly `stages`, redone from
        scratch. `lanes` > 1 (CPU only) runs up to that many ready jobs at once in worker processes, sharing out
        `threads` (default: torch's) between them (module docstring)."""
        rerun = stages is not None
        pending = self.state.get("pending")  # the stages of an interrupted --stages run: what --resume continues
        if stages is None and pending:
            stages = [STAGES.index(name) for name in pending]
            self._note(f"continuing the interrupted run of stages {', '.join(map(str, stages))} (--stages); the "
                       f"next --resume runs the others")
        stages = list(range(len(STAGES))) if stages is None else stages
        self.out.mkdir(parents=True, exist_ok=True)
        names = [STAGES[i] for i in stages]
        if rerun:
            self.state["pending"] = names
        for i, name in zip(stages, names):
            if name in self.state["stages"] and not rerun:
                self._note(f"stage {i} {name}: done ({self.state['stages'][name]['seconds']:.0f} s), skipped")
            elif rerun:
                self.state["stages"].pop(name, None)
                self.state.get("parts", {}).pop(name, None)
                for rel in OUTPUTS[name]:
                    path = self.out / rel
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
        todo = [name for name in names if name not in self.state["stages"]]
        for name in todo:  # what the first stage to run reads from the stages not run now must exist
            missing = [rel for rel in NEEDS.get(name, ()) if not (self.out / rel).exists()
                       and not any(rel.startswith(prefix) for t in todo for prefix in OUTPUTS[t])]
            if missing:
                raise ValueError(f"stage {STAGES.index(name)} {name} needs "
                                 f"{', '.join(str(self.out / m) for m in missing)}: run the earlier stages first "
                                 f"(r1lab speedrun --out {self.out} --resume)")
        self._save()
        done = {job_name(st, part) for st, part, _ in JOBS if st not in todo}
        done |= {job_name(st, part) for st, parts in self.state.get("parts", {}).items() for part in parts}
        jobs = [(st, part, needs) for st, part, needs in JOBS if st in todo and job_name(st, part) not in done]
        if jobs:  # the machine and code that ran them, for the report (a folder resumed elsewhere lists each)
            where = {"hardware": hardware(self.device_name), "commit": git_commit()}
            if where not in self.state.setdefault("ran_on", []):
                self.state["ran_on"].append(where)
        t0 = time.perf_counter()
        try:
            if lanes > 1 and jobs:
                self._run_lanes(jobs, done, lanes, threads or torch.get_num_threads())
            else:
                for st, part, _ in jobs:
                    self._note(f"stage {STAGES.index(st)} {job_name(st, part)}")
                    self._finish_job(st, part, *_timed(self.job, st, part))
        finally:
            self.state["wall_seconds"] = self.state.get("wall_seconds", 0.0) + time.perf_counter() - t0
            self._save()
        if self.state.pop("pending", None) is not None:
            self._save()
        path = write_report(self.out, self.state)
        self._note(f"report: {path}")
        return self.state

    def job(self, stage: str, part: str = "") -> dict:
        """One job of the recipe (JOBS) in this process; its results, merged into its stage's."""
        if stage == "pretrain":
            return self._pretrain_data() if part == "data" else self._pretrain(part)
        if stage == "distill":
            return self._distill(part)
        if stage == "eval":
            return self._eval_expert_load() if part == "expert-load" else self._eval(part)
        return getattr(self, "stage_" + stage.replace("-", "_"))()

    def _stage(self, stage: str) -> dict:
        """Every job of one stage, one after another, here (what a stage_* method does)."""
        result: dict = {}
        for st, part, _ in sorted((j for j in JOBS if j[0] == stage), key=lambda j: _part_order(*j[:2])):
            result.update(self.job(st, part))
        return result

    def _finish_job(self, stage: str, part: str, result: dict, seconds: float) -> None:
        """Record a finished job; when it was its stage's last, the stage is finished (its seconds: the sum of
        its jobs', work rather than wall time when they ran side by side)."""
        parts = self.state.setdefault("parts", {}).setdefault(stage, {})
        parts[part] = {"seconds": seconds, "result": result}
        if all(p in parts for st, p, _ in JOBS if st == stage):
            merged: dict = {}
            for p in sorted(parts, key=lambda p: _part_order(stage, p)):
                merged.update(parts[p]["result"])
            self.state["stages"][stage] = {"seconds": sum(v["seconds"] for v in parts.values()), **merged}
            del self.state["parts"][stage]
            self.state["stages"] = {k: self.state["stages"][k] for k in STAGES if k in self.state["stages"]}
            self._note(f"stage {STAGES.index(stage)} {stage}: done")
        self._save()

    def _run_lanes(self, jobs: list, done: set, lanes: int, threads: int) -> None:
        """Run `jobs` (in JOBS order, with what each waits for) on `lanes` worker processes: a free lane takes
        the first job whose needs are done, with an even share of the threads, or all free threads when every
        job left waits for it; a job left running alone with everything else waiting for it gets the threads that
        came free. Ctrl-C reaches the workers once (SIGTERM), so a training job saves a checkpoint first; an error
        in one job stops the others the same way and is raised here. A SIGTERM to this process (`kill`) is taken
        as Ctrl-C: the workers run in process groups of their own, and would otherwise go on without it."""
        import signal
        import threading

        def interrupt(signum, frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        # A worker inherits SIGUSR1 ignored until its initializer handles it (else a signal sent while it starts
        # would end it); off the main thread signals cannot be handled, and a lone job keeps its threads.
        can_grow = threading.current_thread() is threading.main_thread()
        before = None
        if can_grow:
            before = [signal.signal(signal.SIGUSR1, signal.SIG_IGN), signal.signal(signal.SIGTERM, interrupt)]
        try:
            self._lanes_loop(jobs, done, lanes, threads, can_grow)
        finally:
            if can_grow:
                signal.signal(signal.SIGUSR1, before[0])
                signal.signal(signal.SIGTERM, before[1])

    def _lanes_loop(self, jobs: list, done: set, lanes: int, threads: int, can_grow: bool) -> None:
        import concurrent.futures as cf
        import multiprocessing
        import signal

        running: dict = {}  # future -> (stage, part, threads, start)
        pending = list(jobs)
        error = None
        with _worker_malloc(), cf.ProcessPoolExecutor(lanes, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_worker_init, initargs=(threads,)) as pool:
            try:
                while pending or running:
                    starts = [] if error is not None else _schedule(pending, done, [r[2] for r in running.values()],
                                                                    threads, lanes)
                    for job, n in starts:
                        st, part, _ = job
                        pending.remove(job)
                        fut = pool.submit(_worker_job, str(self.out), self.device_name, st, part, n)
                        running[fut] = (st, part, n, time.perf_counter())
                        self._note(f"{job_name(st, part)}: started ({n} thread{'s' if n > 1 else ''})")
                    if not running:
                        break
                    # One job alone, and everything left waits for it: it takes the threads that came free.
                    if can_grow and len(running) == 1 and not starts:
                        (fut, (st, part, n, start)), = running.items()
                        if n < threads and _all_wait_for(job_name(st, part), pending):
                            _signal_workers(pool, signal.SIGUSR1)  # the idle worker ignores it
                            running[fut] = (st, part, threads, start)
                            self._note(f"{job_name(st, part)}: now {threads} threads")
                    finished, _ = cf.wait(running, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        st, part, n, start = running.pop(fut)
                        try:
                            result, seconds = fut.result()
                        except BaseException as e:  # noqa: BLE001 -- stop the others, then raise the first
                            if error is None:
                                error = e
                                _signal_workers(pool, signal.SIGTERM)
                            continue
                        self._note(f"{job_name(st, part)}: done in {seconds:.0f} s")
                        self._finish_job(st, part, result, seconds)
                        done.add(job_name(st, part))
                    if running and not finished:
                        self._status(running)
            except KeyboardInterrupt:
                _signal_workers(pool, signal.SIGTERM)  # each training job saves a checkpoint, then stops
                cf.wait(running)
                raise
        if error is not None:
            raise error

    def _status(self, running: dict) -> None:
        """One line on a terminal: each running job with its progress (training steps from its metrics)."""
        if self.quiet or not sys.stderr.isatty():
            return
        items = []
        for st, part, _, start in running.values():
            info = f"{time.perf_counter() - start:.0f} s"
            folder, steps = self._job_folder(st, part)
            if folder is not None and steps:
                last = _last_metrics(folder).get("step")
                info = f"step {last or 0}/{steps}"
            items.append(f"{job_name(st, part)} {info}")
        print(f"\r[speedrun] {' | '.join(items)}\x1b[K", end="", file=sys.stderr, flush=True)
        self._line_open = True

    def _job_folder(self, stage: str, part: str) -> tuple[Path | None, int]:
        p = self.p
        return {("pretrain", "base"): (self.out / "0-pretrain/base", p.pretrain_steps),
                ("pretrain", "student"): (self.out / "0-pretrain/student", p.student_pretrain_steps),
                ("r1-zero", ""): (self.out / "1-r1-zero", p.rl_steps),
                ("cold-start", ""): (self.out / "2-cold-start", p.sft_steps),
                ("reasoning-rl", ""): (self.out / "3-reasoning-rl", p.reasoning_rl_steps or p.rl_steps),
                ("distill", "distilled"): (self.out / "5-distill/distilled", p.distill_steps),
                ("distill", "control"): (self.out / "5-distill/control", p.distill_steps)}.get((stage, part),
                                                                                               (None, 0))

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(self.state_path)

    def _note(self, text: str) -> None:
        if not self.quiet:
            if getattr(self, "_line_open", False):  # over the status line of running jobs
                print("\r\x1b[K", end="", file=sys.stderr)
                self._line_open = False
            print(f"[speedrun] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ recipes
    def _common(self, recipe, out: Path, steps: int, batch: int, lr: float) -> None:
        stage_recipe(recipe, out, self.data / "tokenizer", steps, batch, lr, self.p.seed, self.device_name,
                     ckpt_every=max(steps // 4, 1), dtype=self.p.dtype)

    def _train(self, module, recipe) -> dict:
        """Run a trainer, continuing from its checkpoints when the stage was interrupted."""
        from ..train import state as ckpt

        out = Path(recipe.run.out)
        if (out / "final" / "config.json").is_file():  # trained before an interruption outside the trainer
            self._note(f"{out} is finished, kept")
            return _last_metrics(out)
        resume = out if ckpt.list_checkpoints(out) else None
        if resume is None and out.exists():
            shutil.rmtree(out)  # nothing to continue from
        return module.run(recipe, resume=resume, quiet=self.quiet)

    def _model_recipe(self, kind: str, out: Path, preset: str | None = None, init: Path | None = None,
                      config: tuple = ()):
        """A recipe of `kind` for a model from `init`'s weights, or a fresh `preset` whose config `config` changes
        (the main model's `model_config`)."""
        from ..train.recipe import load_recipe

        r = load_recipe(None, kind)
        if init is not None:
            r.model.init = str(init)
        else:
            r.model.preset = preset
            r.model.config = {"vocab_size": self._vocab_size(), **dict(config)}
        r.moe.mtp_weight = 0.0
        return r

    def _vocab_size(self) -> int:
        from ..tokenizer import load_tokenizer

        return load_tokenizer(self.data / "tokenizer").vocab_size

    # ------------------------------------------------------------------ stage 0
    def stage_pretrain(self) -> dict:
        return self._stage("pretrain")

    def _pretrain_data(self) -> dict:
        from .vocab import build_task_tokenizer

        p = self.p
        counts = sdata.write_data(self.data, self.task, corpus_docs=p.corpus_docs, reasoning_share=p.reasoning_share,
                                  rl_prompts=p.rl_prompts, cold_start=p.cold_start, test=p.eval_problems, seed=p.seed,
                                  check_share=p.check_share, fix_share=p.fix_share, slip_share=p.slip_share,
                                  easy_task=self.easy_task, easy_share=p.easy_share, textbook_share=p.textbook_share,
                                  layout=p.layout, cold_check_share=p.cold_check_share,
                                  cold_fix_share=p.cold_fix_share, cold_slip_share=p.cold_slip_share,
                                  lookup_share=p.lookup_share, sum_share=p.sum_share)
        tok = build_task_tokenizer(self.data / "tokenizer", sdata.tokenizer_texts(self.data))
        self._note(f"data: {', '.join(f'{k} {v:,}' for k, v in counts.items())}; vocabulary {tok.vocab_size} tokens")
        return {"data": counts, "vocab_size": tok.vocab_size}

    def _pretrain(self, who: str) -> dict:
        """The base model or the student's base, from scratch on the corpus."""
        from ..train import pretrain

        p = self.p
        preset, steps = (p.model, p.pretrain_steps) if who == "base" else (p.student, p.student_pretrain_steps)
        r = self._model_recipe("pretrain", self.out / "0-pretrain" / who, preset=preset,
                               config=p.model_config if who == "base" else ())
        self._common(r, self.out / "0-pretrain" / who, steps, p.pretrain_batch, p.pretrain_lr)
        r.data.train, r.data.seq_len = [str(self.data / "corpus.jsonl")], p.seq_len
        r.optim.warmup_steps = max(steps // 20, 1)
        last = self._train(pretrain, r)
        return {who: {"loss": last.get("loss"), "params": _params(self.out / "0-pretrain" / who / "final")}}

    # ------------------------------------------------------------------ stages 1 and 3
    def _grpo(self, out: Path, init: Path, prompts: str, style: str, steps: int, lr: float) -> dict:
        from ..train import grpo

        p = self.p
        r = grpo.load_grpo_recipe(None, {"data.train": str(self.data / prompts)})
        r.model.init = str(init)
        self._common(r, out, steps, p.rl_batch, lr)
        g = r.grpo
        g.prompt_style, g.open_think = style, style == "chat"
        g.prompts_per_step, g.group_size, g.max_tokens = p.prompts_per_step, p.group_size, p.max_tokens
        g.temperature, g.dynamic_sampling, g.micro_tokens = p.rl_temperature, p.dynamic_sampling, p.rl_micro_tokens
        g.rewards = ["accuracy=1.0", "format=0.5"]
        g.beta, g.eps_low, g.eps_high, g.loss_agg = 0.0, 0.2, 0.28, "token"
        g.log_samples = p.prompts_per_step * p.group_size  # every sample: the report classifies them per step
        last = self._train(grpo, r)
        return {"reward": last.get("reward"), "accuracy": last.get("accuracy")}

    def stage_r1_zero(self) -> dict:
        return self._grpo(self.out / "1-r1-zero", self.out / "0-pretrain/base/final", "zero_prompts.jsonl", "raw",
                          self.p.rl_steps, self.p.zero_rl_lr or self.p.rl_lr)

    def stage_reasoning_rl(self) -> dict:
        return self._grpo(self.out / "3-reasoning-rl", self.out / "2-cold-start/final", "prompts.jsonl", "chat",
                          self.p.reasoning_rl_steps or self.p.rl_steps, self.p.rl_lr)

    # ------------------------------------------------------------------ stages 2 and 5
    def _sft(self, out: Path, init: Path, files: list[Path], steps: int) -> dict:
        from ..train import sft

        p = self.p
        r = self._model_recipe("sft", out, init=init)
        self._common(r, out, steps, p.sft_batch, p.sft_lr)
        r.data.train, r.data.seq_len = [str(f) for f in files], self.sft_seq_len
        r.optim.warmup_steps = max(steps // 10, 1)
        last = self._train(sft, r)
        return {"loss": last.get("loss")}

    @property
    def sft_seq_len(self) -> int:
        """Rows of the SFT stages: twice the pretraining rows (a dialogue and its worked answer are longer than
        most corpus documents), at most the models' context."""
        return min(2 * self.p.seq_len, self.context)

    def stage_cold_start(self) -> dict:
        return self._sft(self.out / "2-cold-start", self.out / "0-pretrain/base/final",
                         [self.data / "cold_start.jsonl"], self.p.sft_steps)

    def stage_distill(self) -> dict:
        return self._stage("distill")

    def _distill(self, which: str) -> dict:
        """The student base fine-tuned on the RL model's rejection samples ("distilled") or, the control, on the
        cold-start demonstrations only."""
        data = self.data / ("distill.jsonl" if which == "distilled" else "cold_start.jsonl")
        return {which: self._sft(self.out / "5-distill" / which, self.out / "0-pretrain/student/final", [data],
                                 self.p.distill_steps)}

    # ------------------------------------------------------------------ stage 4
    @torch.no_grad()
    def stage_rejection(self) -> dict:
        """Sample `rejection_samples` answers per training prompt from the RL model; keep the correct and
        well-formed ones (distinct per prompt) as chat-format SFT rows."""
        from ..checkpoint import load_pretrained
        from ..engine import Engine, SamplingParams
        from ..rewards import accuracy_reward, format_reward
        from ..tokenizer import load_tokenizer

        p = self.p
        folder = self.out / "3-reasoning-rl/final"
        device = _device(self.device_name)
        model = load_pretrained(folder, device=device, dtype=weights_dtype(p.dtype, device.type))
        tok = load_tokenizer(folder)
        rows = [json.loads(ln) for ln in (self.data / "prompts.jsonl").read_text().splitlines()][:p.rejection_prompts]
        prompts = [sdata.CHAT_TEMPLATE.format(question=r["prompt"]) for r in rows]
        ids = [tok.encode(x) for x in prompts]
        engine = Engine(model, tok, max_batch=min(256, len(ids) * p.rejection_samples),
                        max_seq_len=max(map(len, ids)) + p.max_tokens)
        outs = _generate(engine, ids, [SamplingParams(temperature=p.rejection_temperature, top_p=p.rejection_top_p,
                                                      max_tokens=p.max_tokens,
                                                      n=p.rejection_samples, seed=1000 + i) for i in range(len(ids))],
                         "rejection sampling", self.quiet)
        texts = [o.text for o in outs]
        P = [prompts[o.prompt_index] for o in outs]
        acc = accuracy_reward(P, texts, answer=[rows[o.prompt_index]["answer"] for o in outs])
        fmt = format_reward(P, texts)
        kept, seen = [], set()
        for o, t, a, f in zip(outs, texts, acc, fmt):
            if a == 1.0 and f == 1.0 and (o.prompt_index, t) not in seen:
                seen.add((o.prompt_index, t))
                kept.append({"prompt": rows[o.prompt_index]["prompt"], "response": "<think>\n" + t})
        if not kept:
            raise RuntimeError("rejection sampling kept no sample: the RL model answered nothing correctly")
        sdata.write_jsonl(self.data / "distill.jsonl", kept)
        return {"sampled": len(outs), "correct": int(sum(acc)), "well_formed": int(sum(fmt)), "kept": len(kept)}

    # ------------------------------------------------------------------ stage 6
    def stage_eval(self) -> dict:
        return self._stage("eval")

    def _eval(self, key: str) -> dict:
        """One stage's model on the held-out problems (MODELS); nothing when that model does not exist."""
        from ..eval import evaluate

        p = self.p
        rel, template = {k: (rel, t) for k, rel, t in MODELS}[key]
        template = sdata.LAYOUTS[p.layout].zero if template == "zero" else template
        folder = self.out / rel
        if not (folder / "config.json").is_file():
            self._note(f"eval: {key} has no model at {folder}, skipped")
            return {}
        res = evaluate(folder, str(self.data / "test.jsonl"), k=p.eval_k, temperature=0.6, top_p=0.95,
                       max_tokens=p.max_tokens, out=self.out / "eval" / f"{key}.jsonl", seed=p.seed,
                       device=None if self.device_name == "auto" else self.device_name,
                       batch=256, template=template, progress=not self.quiet and sys.stderr.isatty(), report=False,
                       dtype=p.dtype,
                       compile=False,  # a small model: the CUDA graph alone is fast; compiling costs more
                       redo_hint=f"redo the evaluation: r1lab speedrun --out {self.out} --stages "
                                 f"{STAGES.index('eval')}")
        self._note(f"eval {key}: pass@1 {res['pass@1']:.3f}, cons@{p.eval_k} {res['cons@k']:.3f}, "
                   f"{res['mean_tokens']:.0f} tokens")
        return {key: {k: res[k] for k in ("pass@1", "cons@k", "mean_tokens", "truncated")}}

    def _eval_expert_load(self) -> dict:
        return {"expert_load": _expert_load(self.out / "3-reasoning-rl/final", self.out / "eval/reasoning-rl.jsonl",
                                            sdata.CHAT_TEMPLATE, self.data / "test.jsonl", self.device_name)}


# ---------------------------------------------------------------------- helpers
def stage_recipe(recipe, out: Path, tokenizer: Path, steps: int, batch: int, lr: float, seed: int, device: str,
                 ckpt_every: int, dtype: str = "auto") -> None:
    """What every stage's recipe shares (here and in the calculator demonstration): its folder, seed and device,
    the task tokenizer, steps, batch and learning rate, one kept checkpoint every `ckpt_every` steps (0: none),
    ten log lines without TensorBoard, and the compute dtype (run.dtype)."""
    recipe.run.out, recipe.run.seed, recipe.run.device, recipe.run.dtype = str(out), seed, device, dtype
    recipe.data.tokenizer = str(tokenizer)
    recipe.train.steps, recipe.train.batch_size, recipe.optim.lr = steps, batch, lr
    recipe.ckpt.every, recipe.ckpt.keep = ckpt_every, 1
    recipe.log.every, recipe.log.tensorboard = max(steps // 10, 1), False


def _part_order(stage: str, part: str) -> int:
    """Where a job's results go in its stage's: pretraining's data, base, student; distillation's distilled,
    control; evaluation in MODELS order, the expert load last."""
    order = {"pretrain": ("data", "base", "student"), "distill": ("distilled", "control"),
             "eval": (*(k for k, _, _ in MODELS), "expert-load")}.get(stage, ("",))
    return order.index(part)


def _schedule(pending: list, done: set, busy: list[int], threads: int, lanes: int) -> list[tuple[tuple, int]]:
    """Which pending jobs (JOBS entries, in JOBS order) start now, and with how many threads, given the jobs
    done and the threads of each running one: the first ready jobs while a lane and a thread are free, each with
    an even share of the threads, or every free thread when all the jobs left wait for it."""
    free, out = threads - sum(busy), []
    for job in pending:
        if len(busy) + len(out) >= lanes or free <= 0:
            break
        st, part, needs = job
        if not all(n in done for n in needs):
            continue
        n = free if _all_wait_for(job_name(st, part), pending) else min(max(threads // lanes, 1), free)
        out.append((job, n))
        free -= n
    return out


def _all_wait_for(name: str, pending: list) -> bool:
    """Whether every pending job other than `name` waits for it, directly or not: then no other job can start
    before it ends, and it may take every thread (at its start, or later when it is left running alone)."""
    return {job_name(s, p) for s, p, _ in pending} - {name} <= _dependents()[name]


@functools.cache
def _dependents() -> dict[str, set[str]]:
    """Each job's name -> the names of every job in JOBS that waits for it, directly or not."""
    out: dict[str, set[str]] = {job_name(st, part): set() for st, part, _ in JOBS}
    for _ in JOBS:  # a fixed point: JOBS is small
        for st, part, needs in JOBS:
            for n in needs:
                out[n] |= {job_name(st, part)} | out[job_name(st, part)]
    return out


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


_IN_JOB = False  # in a lane's worker: whether it is running a job now


def _worker_init(threads: int) -> None:
    """A lane's worker process: Ctrl-C at the terminal goes to the driver alone (which passes it on once, as
    SIGTERM); SIGTERM stops the job (a trainer saves a checkpoint first); SIGUSR1 gives the job all `threads`
    (the driver sends it when this job runs alone and everything left waits for it). An idle worker ignores
    both. Python runs the handlers between two ops, never inside one."""
    import signal

    os.setpgrp()

    def stop(signum, frame):
        if _IN_JOB:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def grow(signum, frame):
        if _IN_JOB:
            torch.set_num_threads(threads)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, grow)


# glibc's malloc settings for the workers (read when a process starts): keep freed memory in the heap. By default
# each freed block of 128 KB or more goes back to the kernel and the next tensor of its size faults its pages in
# afresh, zero-filled: a speedrun took 15 million page faults (AMD EPYC). With these a lone pretraining step is 2-3%
# faster, and two side by side gain more (their faults contend in the kernel): with rl_micro_tokens, the timed AMD
# run went from 878 to 777 s (twenty-third session). Settings the user's environment gives are kept. A run of one
# lane works in the driver's own process, which started without them.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
                 "MALLOC_TOP_PAD_": str(2**28)}


@contextlib.contextmanager
def _worker_malloc():
    """WORKER_MALLOC in this process's environment while the workers start (Linux; elsewhere nothing)."""
    added = {k: v for k, v in WORKER_MALLOC.items() if k not in os.environ} if sys.platform == "linux" else {}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _worker_job(out: str, device: str, stage: str, part: str, threads: int) -> tuple[dict, float]:
    global _IN_JOB
    torch.set_num_threads(threads)
    _IN_JOB = True
    try:
        return _timed(Speedrun(out, device=device, resume=True, quiet=True).job, stage, part)
    finally:
        _IN_JOB = False


def _signal_workers(pool, signum: int) -> None:
    for proc in (getattr(pool, "_processes", None) or {}).values():
        if proc.is_alive():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass


def _last_metrics(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _params(folder: Path) -> dict[str, int]:
    from ..checkpoint import read_config

    cfg = read_config(folder)
    return {"total": cfg.num_params(), "active": cfg.num_params(active=True)}


def _generate(engine, prompts, params, desc: str, quiet: bool):
    """Engine generation with a progress bar over finished samples."""
    from tqdm import tqdm

    seqs = [s for i, (ids, sp) in enumerate(zip(prompts, params)) for s in engine.add_request(ids, sp, prompt_index=i)]
    with tqdm(total=len(seqs), desc=desc, unit="sample", disable=quiet or not sys.stderr.isatty(),
              dynamic_ncols=True) as bar:
        done = 0
        while engine.has_work():
            engine.step()
            now = sum(s.finish_reason is not None for s in seqs)
            bar.update(now - done)
            done = now
    return [engine.completion(s) for s in seqs]


@torch.no_grad()
def _expert_load(folder: Path, samples: Path, template: str, test: Path, device_name: str) -> list[list[float]] | None:
    """Share of routed tokens per expert of each MoE layer when the model reads its own evaluation answers."""
    from ..checkpoint import load_pretrained
    from ..tokenizer import load_tokenizer

    if not (folder / "config.json").is_file() or not samples.is_file():
        return None
    model = load_pretrained(folder, device=_device(device_name))
    if not model.moe_layers():
        return None
    tok = load_tokenizer(folder)
    questions = {json.loads(ln)["id"]: json.loads(ln)["question"] for ln in test.read_text().splitlines()}
    recs = [json.loads(ln) for ln in samples.read_text().splitlines()][:256]
    for m in model.moe_layers():
        m.expert_load.zero_()
    model.eval()
    for i in range(0, len(recs), 32):
        seqs = [tok.encode(template.format(question=questions[r["problem_id"]]) + r["text"]) for r in recs[i:i + 32]]
        L = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_id] * (L - len(s)) for s in seqs], device=model.device)
        model(x)
    load = model.expert_load().float()
    return (load / load.sum(1, keepdim=True).clamp_min(1)).tolist()
