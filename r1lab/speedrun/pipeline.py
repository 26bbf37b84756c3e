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
Ctrl-C stops after a checkpoint. `--stages 3-6` reruns part of the recipe on an existing run folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.config import get_preset
from . import data as sdata
from .report import write_report

STAGES = ("pretrain", "r1-zero", "cold-start", "reasoning-rl", "rejection", "distill", "eval")
# What each stage writes (relative to the run folder): removed before a stage is rerun with --stages.
OUTPUTS = {"pretrain": ("data", "0-pretrain"), "r1-zero": ("1-r1-zero",), "cold-start": ("2-cold-start",),
           "reasoning-rl": ("3-reasoning-rl",), "rejection": ("data/distill.jsonl",), "distill": ("5-distill",),
           "eval": ("eval",)}


@dataclass(frozen=True)
class Preset:
    """Everything a speedrun varies. `cpu` is the default (a 2-core CPU: 17.5 minutes measured, README); `gpu` one
    H200."""
    model: str = "speedrun"  # r1lab.model.config preset of the main model (vocab_size set from the tokenizer)
    student: str = "speedrun-student"  # the distillation student (fewer layers and experts)
    task: str = "running-sum"  # sums of eight tagged one-digit numbers: "Add a7 b3 c5 d8 e2 f9 g1 h4."
    # checks undo each step of the first pass ("15-c5=10"), reading only what it wrote (RunningSum.check_route)
    task_knobs: tuple = (("n_operands", 8), ("check_route", "inverse"))
    corpus_docs: int = 24_000
    reasoning_share: float = 0.35  # share of the pretraining dialogues with a worked solution
    textbook_share: float = 0.25  # share of pretraining documents that are worked examples (data.Layout.textbook)
    layout: str = "chat"  # how dialogues, examples and R1-Zero prompts are written (data.LAYOUTS)
    check_share: float = 0.5  # share of the worked documents that check their result (tasks that can)
    fix_share: float = 0.15  # share of the worked documents that make a slip, catch it and fix it
    slip_share: float = 0.2  # share of the unchecked worked documents whose slip nobody catches (a wrong answer)
    easy_share: float = 0.0  # share of the corpus drawn from smaller instances of the task (`easy_knobs`)
    easy_knobs: tuple = ()  # task knobs of those smaller instances, e.g. (("n_operands", 4),)
    seq_len: int = 256
    pretrain_steps: int = 900
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    student_pretrain_steps: int = 1200
    rl_prompts: int = 4096  # training prompts available to the RL stages and rejection sampling
    rl_steps: int = 50  # R1-Zero's steps (and reasoning RL's, unless reasoning_rl_steps is set)
    reasoning_rl_steps: int = 40  # reasoning RL's steps (0: rl_steps)
    prompts_per_step: int = 16
    group_size: int = 8
    rl_lr: float = 6e-5  # reasoning RL's learning rate (and R1-Zero's, unless zero_rl_lr is set)
    # R1-Zero's learning rate (0: rl_lr). Twice reasoning RL's: the base must move from answering at once to
    # working out within 50 steps; at 6e-5 one seed stalled at a 75% reasoning share (LOG, fifteenth session)
    zero_rl_lr: float = 1.2e-4
    rl_batch: int = 64  # sequences per forward/backward in the GRPO update
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
    sft_steps: int = 30
    sft_batch: int = 16
    sft_lr: float = 1e-3
    rejection_prompts: int = 1024
    rejection_samples: int = 4
    rejection_temperature: float = 0.7
    rejection_top_p: float = 0.95
    distill_steps: int = 150
    eval_problems: int = 200
    eval_k: int = 4
    seed: int = 0


PRESETS: dict[str, Preset] = {
    # Running sums of eight tagged one-digit numbers ("Add a7 b3 c5 d8 e2 f9 g1 h4."), worked out in short local
    # steps ("a7+b3=10 +c5=15 ..."). 35% of the dialogues work the sum out (some of those check it by undoing
    # each step, a few catch a slip that way, some slip unnoticed), the rest answer at once, and a quarter of the
    # corpus are worked examples (a dialogue's layout with "Example:"/"Solution:" for its role words). Dialogues
    # put every token where the chat template does (layout "chat"). Half the worked documents check their sum and
    # 15% catch and fix a slip; the cold start's 200 demonstrations check (30%) and fix (10%) too. R1-Zero runs 50
    # steps at 1.2e-4, reasoning RL 40 at 6e-5, both sampling at temperature 0.7. What each choice does:
    # benchmarks/LOG.md, sixth to sixteenth sessions.
    "cpu": Preset(),
    # One H200: sums and differences of six one-digit numbers, a 54M model (not yet the reasoning task: its
    # first try answered sums of twelve at once 91% right; benchmarks/LOG.md, seventh session).
    "gpu": Preset(model="speedrun-gpu", student="speedrun-gpu-student", task="arithmetic",
                  task_knobs=(("digits", 1), ("ops", ("+", "-")), ("n_operands", 6)), corpus_docs=100_000,
                  reasoning_share=0.3, textbook_share=0.0, check_share=0.0, fix_share=0.0, slip_share=0.0,
                  rl_temperature=1.0, reasoning_rl_steps=0, layout="newline",
                  seq_len=256, pretrain_steps=1500, pretrain_batch=64, pretrain_lr=1e-3, student_pretrain_steps=1000,
                  rl_steps=60, prompts_per_step=32, group_size=8, rl_lr=1e-5, zero_rl_lr=0.0, rl_batch=128, max_tokens=200,
                  cold_start=500, sft_steps=150, sft_batch=32, sft_lr=3e-4, rejection_prompts=1024,
                  rejection_samples=4, rejection_temperature=1.0,
                  rejection_top_p=1.0, distill_steps=400, eval_problems=300, eval_k=8, cold_check_share=0.0,
                  cold_fix_share=0.0),
    # CI: every stage at toy sizes, in well under a minute on a CPU. The base learns enough running sums of two
    # (checks and fixed slips included) for rejection sampling to keep something; the numbers mean nothing else.
    "mini": Preset(model="speedrun-student", task="running-sum", task_knobs=(("n_operands", 2),), corpus_docs=2000,
                   reasoning_share=0.5, check_share=0.3, fix_share=0.1, slip_share=0.2, seq_len=64, pretrain_steps=200,
                   pretrain_batch=16, student_pretrain_steps=3,
                   rl_prompts=64, rl_steps=2, reasoning_rl_steps=2, prompts_per_step=2, group_size=2, rl_batch=4, max_tokens=64,
                   cold_start=64, sft_steps=60, sft_batch=8, rejection_prompts=64, rejection_samples=4,
                   rejection_temperature=1.0, rejection_top_p=1.0, distill_steps=3, eval_problems=8, eval_k=2,
                   cold_check_share=0.0, cold_fix_share=0.0),
}

# Settings added after run folders existed, with the values those folders ran with (a resumed old run keeps them).
SINCE = {"textbook_share": 0.0, "rl_temperature": 1.0, "reasoning_rl_steps": 0, "layout": "newline",
         "cold_check_share": 0.0, "cold_fix_share": 0.0, "zero_rl_lr": 0.0}

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
        self.p = Preset(**{k: tuple(map(tuple, v)) if k == "task_knobs" else v for k, v in settings.items()})
        if self.p.layout not in sdata.LAYOUTS:
            raise ValueError(f"speedrun setting layout={self.p.layout!r}: choose one of {', '.join(sdata.LAYOUTS)}")
        # The shorter context of the two models bounds every stage's rows (the SFT stages pack up to twice
        # seq_len): checked here, not minutes later when a stage builds its recipe.
        self.context = min(get_preset(self.p.model).max_position_embeddings,
                           get_preset(self.p.student).max_position_embeddings)
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
    def run(self, stages: list[int] | None = None) -> dict:
        """All stages (finished ones skipped, an interrupted one continued), or exactly `stages`, redone from
        scratch."""
        rerun = stages is not None
        stages = list(range(len(STAGES))) if stages is None else stages
        self.out.mkdir(parents=True, exist_ok=True)
        self._save()
        for i in stages:
            name = STAGES[i]
            if name in self.state["stages"] and not rerun:
                self._note(f"stage {i} {name}: done ({self.state['stages'][name]['seconds']:.0f} s), skipped")
                continue
            if rerun:
                self.state["stages"].pop(name, None)
                for rel in OUTPUTS[name]:
                    path = self.out / rel
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            missing = [rel for rel in NEEDS.get(name, ()) if not (self.out / rel).exists()]
            if missing:
                raise ValueError(f"stage {i} {name} needs {', '.join(str(self.out / m) for m in missing)}: run the "
                                 f"earlier stages first (r1lab speedrun --out {self.out} --resume)")
            self._note(f"stage {i} {name}")
            t0 = time.perf_counter()
            result = getattr(self, "stage_" + name.replace("-", "_"))()
            self.state["stages"][name] = {"seconds": time.perf_counter() - t0, **(result or {})}
            self._save()

        path = write_report(self.out, self.state)
        self._note(f"report: {path}")
        return self.state

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(self.state_path)

    def _note(self, text: str) -> None:
        if not self.quiet:
            print(f"[speedrun] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ recipes
    def _common(self, recipe, out: Path, steps: int, batch: int, lr: float) -> None:
        stage_recipe(recipe, out, self.data / "tokenizer", steps, batch, lr, self.p.seed, self.device_name,
                     ckpt_every=max(steps // 4, 1))

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

    def _model_recipe(self, kind: str, out: Path, preset: str | None = None, init: Path | None = None):
        from ..train.recipe import load_recipe

        r = load_recipe(None, kind)
        if init is not None:
            r.model.init = str(init)
        else:
            r.model.preset = preset
            r.model.config = {"vocab_size": self._vocab_size()}
        r.moe.mtp_weight = 0.0
        return r

    def _vocab_size(self) -> int:
        from ..tokenizer import load_tokenizer

        return load_tokenizer(self.data / "tokenizer").vocab_size

    # ------------------------------------------------------------------ stage 0
    def stage_pretrain(self) -> dict:
        from ..train import pretrain
        from .vocab import build_task_tokenizer

        p = self.p
        counts = sdata.write_data(self.data, self.task, corpus_docs=p.corpus_docs, reasoning_share=p.reasoning_share,
                                  rl_prompts=p.rl_prompts, cold_start=p.cold_start, test=p.eval_problems, seed=p.seed,
                                  check_share=p.check_share, fix_share=p.fix_share, slip_share=p.slip_share,
                                  easy_task=self.easy_task, easy_share=p.easy_share, textbook_share=p.textbook_share,
                                  layout=p.layout, cold_check_share=p.cold_check_share,
                                  cold_fix_share=p.cold_fix_share)
        tok = build_task_tokenizer(self.data / "tokenizer", sdata.tokenizer_texts(self.data))
        self._note(f"data: {', '.join(f'{k} {v:,}' for k, v in counts.items())}; vocabulary {tok.vocab_size} tokens")
        results = {"data": counts, "vocab_size": tok.vocab_size}
        for who, preset, steps in (("base", p.model, p.pretrain_steps), ("student", p.student, p.student_pretrain_steps)):
            r = self._model_recipe("pretrain", self.out / "0-pretrain" / who, preset=preset)
            self._common(r, self.out / "0-pretrain" / who, steps, p.pretrain_batch, p.pretrain_lr)
            r.data.train, r.data.seq_len = [str(self.data / "corpus.jsonl")], p.seq_len
            r.optim.warmup_steps = max(steps // 20, 1)
            last = self._train(pretrain, r)
            results[who] = {"loss": last.get("loss"), "params": _params(self.out / "0-pretrain" / who / "final")}
        return results

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
        g.temperature, g.dynamic_sampling = p.rl_temperature, p.dynamic_sampling
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
        student = self.out / "0-pretrain/student/final"
        return {
            "distilled": self._sft(self.out / "5-distill/distilled", student, [self.data / "distill.jsonl"],
                                   self.p.distill_steps),
            "control": self._sft(self.out / "5-distill/control", student, [self.data / "cold_start.jsonl"],
                                 self.p.distill_steps),
        }

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
        model = load_pretrained(folder, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
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
        from ..eval import evaluate

        p = self.p
        results = {}
        for key, rel, template in MODELS:
            template = sdata.LAYOUTS[p.layout].zero if template == "zero" else template
            folder = self.out / rel
            if not (folder / "config.json").is_file():
                self._note(f"eval: {key} has no model at {folder}, skipped")
                continue
            res = evaluate(folder, str(self.data / "test.jsonl"), k=p.eval_k, temperature=0.6, top_p=0.95,
                           max_tokens=p.max_tokens, out=self.out / "eval" / f"{key}.jsonl", seed=p.seed,
                           device=None if self.device_name == "auto" else self.device_name,
                           batch=256, template=template, progress=not self.quiet and sys.stderr.isatty(), report=False,
                           compile=False,  # a small model: the CUDA graph alone is fast; compiling costs more
                           redo_hint=f"redo the evaluation: r1lab speedrun --out {self.out} --stages "
                                     f"{STAGES.index('eval')}")
            results[key] = {k: res[k] for k in ("pass@1", "cons@k", "mean_tokens", "truncated")}
            self._note(f"eval {key}: pass@1 {res['pass@1']:.3f}, cons@{p.eval_k} {res['cons@k']:.3f}, "
                       f"{res['mean_tokens']:.0f} tokens")
        results["expert_load"] = _expert_load(self.out / "3-reasoning-rl/final", self.out / "eval/reasoning-rl.jsonl",
                                              sdata.CHAT_TEMPLATE, self.data / "test.jsonl", self.device_name)
        return results


# ---------------------------------------------------------------------- helpers
def stage_recipe(recipe, out: Path, tokenizer: Path, steps: int, batch: int, lr: float, seed: int, device: str,
                 ckpt_every: int) -> None:
    """What every stage's recipe shares (here and in the calculator demonstration): its folder, seed and device,
    the task tokenizer, steps, batch and learning rate, one kept checkpoint every `ckpt_every` steps (0: none),
    and ten log lines without TensorBoard."""
    recipe.run.out, recipe.run.seed, recipe.run.device = str(out), seed, device
    recipe.data.tokenizer = str(tokenizer)
    recipe.train.steps, recipe.train.batch_size, recipe.optim.lr = steps, batch, lr
    recipe.ckpt.every, recipe.ckpt.keep = ckpt_every, 1
    recipe.log.every, recipe.log.tensorboard = max(steps // 10, 1), False


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
