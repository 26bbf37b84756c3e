"""GRPO step time and rollout tokens/s: r1lab's GRPOTrainer against TRL's GRPOTrainer, same run, same setup.

    python benchmarks/grpo.py                 # both (needs trl, datasets, transformers), bench-moe-1b, bf16
    python benchmarks/grpo.py --only r1lab    # r1lab alone

Setup (issue 5): `bench-moe-1b` random weights, bf16, 16 prompts x G=8, completions of exactly 256 tokens
(EOS ignored so both generate the same lengths), beta 0, AdamW lr 1e-6, one optimizer step per GRPO step
(TRL: per-device batch 32 x 4 accumulation = 128 sequences); the same constant reward. Median step time of steps
2-4 (step 1 compiles / captures graphs). Not run yet on an H200 (written on a CPU-only machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1lab import load_tokenizer, save_pretrained  # noqa: E402
from r1lab.model.config import get_preset  # noqa: E402
from r1lab.model.transformer import Transformer  # noqa: E402


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"What is {17 * i + 3} + {29 * i + 11}? Think step by step.", "answer": str(46 * i + 14)}
            for i in range(n)]


def constant_reward(prompts, completions, **_):  # the same signal in both trainers (TRL signature)
    return [float(len(c) % 7) for c in completions]


def bench_r1lab(model_dir: Path, args) -> dict:
    from r1lab import load_pretrained
    from r1lab.rewards import WeightedReward
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer

    r = GRPORecipe.defaults()
    r.run.out, r.run.device = tempfile.mkdtemp(), "cuda"
    g = r.grpo
    g.prompt_style, g.prompts_per_step, g.group_size, g.max_tokens, g.beta = "raw", args.prompts, args.g, args.tokens, 0.0
    r.optim.lr, r.train.batch_size, r.train.steps = 1e-6, args.micro, args.steps
    r.ckpt.every, r.ckpt.export, r.log.every = 0, False, 1
    model = load_pretrained(model_dir, device="cuda", dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    tr = GRPOTrainer(r, model, tok, prompts(args.prompts * args.steps), dtype=torch.bfloat16,
                     rewards=[WeightedReward("constant", constant_reward, 1.0)])
    # Same lengths as TRL: no stop token (the engine's ignore_eos).
    from r1lab.engine import engine as eng_mod
    orig = eng_mod.SamplingParams.__post_init__

    def no_eos(self):
        orig(self)
        self.ignore_eos = True

    eng_mod.SamplingParams.__post_init__ = no_eos
    times, toks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        rec = tr.grpo_step()
        tr.step += 1
        times.append(time.perf_counter() - t0)
        toks.append(rec["gen_tokens_per_s"])
        print(f"r1lab step {tr.step}: {times[-1]:.2f} s (gen {rec['gen_s']:.2f} s, train {rec['train_s']:.2f} s, "
              f"{rec['gen_tokens_per_s']:,.0f} rollout tok/s) reward {rec['reward']:.3f}")
    eng_mod.SamplingParams.__post_init__ = orig
    return {"step_s": statistics.median(times[1:4]), "tok_s": statistics.median(toks[1:4])}


def bench_trl(model_dir: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            print(f"trl step {len(times)}: {times[-1]:.2f} s")

    n_seq = args.prompts * args.g
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n_seq // 4,
                     gradient_accumulation_steps=4, num_generations=args.g, max_completion_length=args.tokens,
                     beta=0.0, learning_rate=1e-6, bf16=True, max_steps=args.steps, logging_steps=1,
                     save_strategy="no", report_to=[], temperature=1.0, generation_kwargs={"min_new_tokens": args.tokens})
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list(prompts(args.prompts * args.steps))
    trainer = GRPOTrainer(model=model, reward_funcs=constant_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    step = statistics.median(times[1:4])
    return {"step_s": step, "tok_s": n_seq * args.tokens / step}  # upper bound: all of the step as generation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-moe-1b", help="model preset, random weights (default: bench-moe-1b)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--g", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--tokens", type=int, default=256, help="completion tokens (default 256)")
    p.add_argument("--micro", type=int, default=32, help="r1lab sequences per forward/backward (default 32)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps (default 4; median of steps 2-4)")
    p.add_argument("--only", choices=("r1lab", "trl"), help="run one side only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/grpo.py needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as d:
        cfg = get_preset(args.preset)
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device="cuda").init_weights(seed=0)
        save_pretrained(model, d, tokenizer=load_tokenizer())
        del model
        res = {}
        if args.only != "trl":
            res["r1lab"] = bench_r1lab(Path(d), args)
            torch.cuda.empty_cache()
        if args.only != "r1lab":
            res["trl"] = bench_trl(Path(d), args)
    for k, v in res.items():
        print(f"{k:6s} {v['step_s']:.2f} s/step, {v['tok_s']:,.0f} rollout tok/s")
    if len(res) == 2:
        print(f"r1lab is {res['trl']['step_s'] / res['r1lab']['step_s']:.1f}x faster per step (goal: >= 10x)")


if __name__ == "__main__":
    main()
