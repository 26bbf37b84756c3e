"""GRPO learns on the CPU: a tiny model, briefly fine-tuned on one-digit addition, then a short seeded GRPO run
raises the mean reward and the accuracy on held-out problems (pairs never seen in training) by asserted margins.

The model is the `tiny` preset with a 16-entry character vocabulary (the real 129k vocabulary would make the
output head ~8000x larger than this task needs). Seeded and single-threaded, so one machine reproduces its
numbers; but another CPU's kernels round differently in the last bit, and over 150 fine-tuning steps that moves
the starting model a lot (one seed's held-out accuracy before GRPO: 0.38 on an Intel Xeon with AVX-512, 0.57
under ATEN_CPU_CAPABILITY=default, 0.65 on an AMD EPYC). A single run's gain is therefore a draw, not a property:
the test runs five seeds and asserts the mean gains. Observed (torch 2.13 CPU, 60 GRPO steps per seed, means over
seeds 0-4): reward of the first 5 steps -> last 5 steps +0.15 (AVX-512) / +0.13 (default); held-out sampled
accuracy +0.17 / +0.10; greedy +0.23 / +0.17; the smallest single-seed gains +0.05, +0.03, +0.09. Asserted, on
the means: +0.06, +0.05, +0.08; a GRPO that does not learn gives ~0 or less. About 60 s.
"""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from r1lab.model.config import get_preset
from r1lab.model.transformer import Transformer
from r1lab.tasks.synthetic import Addition
from r1lab.train.grpo import GRPORecipe, GRPOTrainer, evaluate


class CharTokenizer:
    """Character-level: id 0 unused (BOS), 1 = EOS, then one id per character."""

    def __init__(self, chars="0123456789+="):
        self.chars, self.eos_id, self.vocab_size = chars, 1, len(chars) + 2
        self.ids = {c: i + 2 for i, c in enumerate(chars)}

    def encode(self, text):
        return [self.ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i - 2] for i in ids if 2 <= i < len(self.chars) + 2)


def tiny_model(seed=0, **config):
    cfg = get_preset("tiny").replace(**{"vocab_size": 16, "max_position_embeddings": 64, "rope_scaling": None,
                                        "num_nextn_predict_layers": 0, **config})
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.to_empty(device="cpu").init_weights(seed=seed)


def sft(model, tok, problems, steps, lr=3e-3, batch=32, seed=0):
    """Plain teacher-forced fine-tuning on 'a+b=' -> 'c<eos>' (loss on the answer tokens only)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        seqs = [(tok.encode(p.question), tok.encode(p.answer) + [tok.eos_id]) for p in rng.sample(problems, batch)]
        L = max(len(a) + len(b) for a, b in seqs)
        ids, labels = torch.zeros(batch, L, dtype=torch.long), torch.full((batch, L), -100)
        for i, (a, b) in enumerate(seqs):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) - 1: len(a) + len(b) - 1] = torch.tensor(b)
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, machine-independent results


def grpo_run(tmp_path, seed: int, **keys) -> dict:
    """Fine-tune on 150 steps of supervised addition, then 60 GRPO steps; the gains of one seed. keys: recipe keys
    to set besides ({"grpo.async": True})."""
    torch.manual_seed(seed)
    tok = CharTokenizer()
    task = Addition(digits=1, template="{a}+{b}=")
    train, test = task.problems(400, "train", seed=0), task.problems(60, "test", seed=1)
    model = tiny_model(seed)
    sft(model, tok, train, steps=150, seed=seed)

    r = GRPORecipe.defaults()
    r.run.out, r.run.device, r.run.seed = str(tmp_path / f"run{seed}"), "cpu", seed
    r.grpo.prompt_style, r.grpo.rewards, r.grpo.max_tokens = "raw", ["accuracy=1"], 4
    r.grpo.prompts_per_step, r.grpo.group_size, r.grpo.beta = 16, 8, 0.0
    r.optim.lr, r.train.batch_size, r.train.steps = 1e-4, 128, 60
    r.ckpt.every, r.ckpt.export, r.log.every = 0, False, 0
    for k, v in keys.items():
        r.set(k, v)
    rows = [{"prompt": p.question, "answer": p.answer} for p in train]
    trainer = GRPOTrainer(r, model, tok, rows, quiet=True)

    held_out = ([tok.encode(p.question) for p in test], [p.answer for p in test])
    before = evaluate(trainer.engine, *held_out, samples=4, max_tokens=4)
    before_greedy = evaluate(trainer.engine, *held_out, temperature=0, max_tokens=4)
    trainer.fit()
    after = evaluate(trainer.engine, *held_out, samples=4, max_tokens=4)
    after_greedy = evaluate(trainer.engine, *held_out, temperature=0, max_tokens=4)

    recs = [json.loads(ln) for ln in (tmp_path / f"run{seed}" / "metrics.jsonl").read_text().splitlines()]
    first = sum(x["reward"] for x in recs[:5]) / 5
    last = sum(x["reward"] for x in recs[-5:]) / 5
    print(f"seed {seed}: reward {first:.3f} -> {last:.3f}; held-out {before:.3f} -> {after:.3f}, greedy "
          f"{before_greedy:.3f} -> {after_greedy:.3f}")
    return {"reward": last - first, "held_out": after - before, "greedy": after_greedy - before_greedy,
            "recs": recs}


def test_grpo_raises_reward_and_held_out_accuracy(tmp_path):
    assert_learns([grpo_run(tmp_path, seed) for seed in range(5)])


def assert_learns(runs: list[dict]) -> None:
    """The margins of the module docstring, on the means over the seeds' runs, and what the log must hold."""
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("reward", "held_out", "greedy")}
    print("mean gains", {k: round(v, 3) for k, v in mean.items()})
    assert mean["reward"] >= 0.06, mean
    assert mean["held_out"] >= 0.05, mean
    assert mean["greedy"] >= 0.08, mean
    # The trainer logged what it promised.
    recs = runs[0]["recs"]
    for k in ("reward/accuracy", "accuracy", "pass@8", "response_len_mean", "truncated", "clip_frac", "entropy",
              "zero_var_groups", "gen_s", "train_s", "gen_tokens_per_s"):
        assert k in recs[-1]
    # the policy sharpened: mean entropy of the last 5 updates below the first 5's, on average over the seeds
    ent = [sum(x["entropy"] for x in r["recs"][-5:]) - sum(x["entropy"] for x in r["recs"][:5]) for r in runs]
    assert sum(ent) < 0, ent
