"""GRPO step time and rollout tokens/s: r1lab's GRPOTrainer against TRL's GRPOTrainer, same run, same setup.

    python benchmarks/grpo.py                 # both (needs trl, datasets, transformers), bench-moe-1b, bf16
    python benchmarks/grpo.py --only r1lab    # r1lab alone
    python benchmarks/grpo.py --only r1lab --compile --breakdown   # where r1lab's generation time goes
    python benchmarks/grpo.py --only r1lab --compile --profile-step 3 --trace t.json   # kernels of one step
    python benchmarks/grpo.py --only r1lab --compile --async --steps 12   # grpo.async: sampling beside the update
    python benchmarks/grpo.py --device cpu --preset tiny --prompts 2 --g 2 --tokens 8 --micro 4 --steps 2  # dry run

Setup (issue 5): `bench-moe-1b` random weights, bf16, 16 prompts x G=8, completions of exactly 256 tokens
(EOS ignored so both generate the same lengths: the engine's ignore_eos, TRL's min_new_tokens), beta 0, AdamW lr
1e-6 constant (r1lab's GRPO optimizer defaults on both), one optimizer step per GRPO step (TRL: per-device batch
32 x 4 accumulation = 128 sequences, generated in one call); the same constant reward. Median step time of steps
2-4 (step 1 compiles / captures graphs). TRL 1.16 generates with transformers' `generate` (no vLLM on the
device); its generation time is measured around `GRPOTrainer._generate_single_turn`. On `--device cpu` both
sides run in fp32 (a dry run of the plumbing, not a measurement). Results: benchmarks/LOG.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
    r.run.out, r.run.device = tempfile.mkdtemp(), args.device
    g = r.grpo
    g.prompt_style, g.prompts_per_step, g.group_size, g.max_tokens, g.beta = "raw", args.prompts, args.g, args.tokens, 0.0
    r.optim.lr, r.train.batch_size, r.train.steps = 1e-6, args.micro, args.steps
    r.ckpt.every, r.ckpt.export, r.log.every = 0, False, 1
    r.train.compile, g.async_ = args.compile, args.async_
    model = load_pretrained(model_dir, device=args.device, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    tr = GRPOTrainer(r, model, tok, prompts(args.prompts * args.steps), dtype=_dtype(args),
                     rewards=[WeightedReward("constant", constant_reward, 1.0)])
    # Same lengths as TRL: no stop token (the engine's ignore_eos).
    from r1lab.engine import engine as eng_mod
    orig = eng_mod.SamplingParams.__post_init__

    def no_eos(self):
        orig(self)
        self.ignore_eos = True

    eng_mod.SamplingParams.__post_init__ = no_eos
    parts = breakdown(tr) if args.breakdown else None
    times, toks, gens = [], [], []
    for _ in range(args.steps):
        prof = profiler(args) if tr.step + 1 == args.profile_step else None
        t0 = time.perf_counter()
        with prof or contextlib.nullcontext():
            rec = tr.grpo_step()
        tr.step += 1
        times.append(time.perf_counter() - t0)
        toks.append(rec["gen_tokens_per_s"])
        gens.append(rec["gen_s"])
        overlap = (f", overlapped {rec['overlap_s']:.2f} s, waited {rec['wait_s']:.2f} s, lag {rec['policy_lag']}"
                   if "overlap_s" in rec else "")  # grpo.async: gen_s is the batch sampled during the last step
        print(f"r1lab step {tr.step}: {times[-1]:.2f} s (gen {rec['gen_s']:.2f} s, train {rec['train_s']:.2f} s, "
              f"{rec['gen_tokens_per_s']:,.0f} rollout tok/s{overlap}) reward {rec['reward']:.3f}")
        if prof is not None:
            report_profile(prof, args)
        if parts is not None:
            print("  generation: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
            parts.clear()
    eng_mod.SamplingParams.__post_init__ = orig
    gen_share = statistics.median(gs / t for gs, t in zip(gens[1:4], times[1:4]))
    return {"step_s": statistics.median(times[1:4]), "tok_s": statistics.median(toks[1:4]),
            "gen_share": gen_share, "first_s": times[0], "async": args.async_}


def profiler(args):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    return profile(activities=acts)


def report_profile(prof, args) -> None:
    """The profiled step's busiest kernels (device time) and, with --trace, its timeline for chrome://tracing."""
    cuda = args.device.startswith("cuda")
    key = "device_time_total" if cuda else "cpu_time_total"
    events = prof.key_averages()
    if cuda:  # the GPU kernels; on the CPU (a dry run) the operators
        ops = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        busy = sum(e.self_device_time_total for e in ops) / 1e3
    else:
        ops, busy = list(events), sum(e.self_cpu_time_total for e in events) / 1e3
    print(f"  profiled step {args.profile_step}: {len(ops)} distinct {'GPU kernels' if cuda else 'operators'}, "
          f"{busy:.1f} ms of {'GPU' if cuda else 'CPU'} time (self, summed)")
    print(events.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"  trace written to {args.trace}")


def breakdown(tr) -> dict:
    """Wall time per GRPO step of the parts of r1lab's generation, summed into the returned dict (cleared by the
    caller each step): admission (prefill + first tokens), decode steps (Engine.step less its admission, host
    bookkeeping included; a step's wait for the GPU is counted where the host waits), completions
    (detokenisation) and rewards. Plain perf_counter wrappers: they add no synchronisation of their own."""
    from r1lab.engine import engine as eng_mod
    from r1lab.train import grpo as grpo_mod

    acc: dict[str, float] = {}

    def timed(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(grpo_mod.GRPOTrainer, "rollout", "rollout total")
    timed(eng_mod.Engine, "_admit", "admission")
    timed(eng_mod.Engine, "step", "engine steps (admission included)")
    timed(eng_mod.Engine, "completion", "completions")
    timed(grpo_mod, "combine", "rewards")
    return acc


def bench_trl(model_dir: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, gens, gen_acc, logs_ = [], [], [0.0], []

    class Timer(TrainerCallback):
        # A step is the wall time from one optimizer step's end to the next one's (the prompt batch, generation,
        # rewards, the 4 forward/backward micro-batches, clipping, AdamW and TRL's logging); step 1 from the start.
        def on_train_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            t = time.perf_counter()
            times.append(t - self.t0)
            gens.append(gen_acc[0])
            self.t0, gen_acc[0] = t, 0.0
            print(f"trl step {len(times)}: {times[-1]:.2f} s (gen {gens[-1]:.2f} s, train {times[-1] - gens[-1]:.2f} s, "
                  f"{n_seq * args.tokens / max(gens[-1], 1e-9):,.0f} rollout tok/s)", flush=True)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                logs_.append(logs)

    # 16 prompts x G=8 = 128 sequences per optimizer step as per-device batch 32 x 4 accumulation; TRL then
    # generates all 128 in one generate call (generation_batch_size = 32 x steps_per_generation 4) once per step.
    # The optimizer and loss as r1lab's GRPO defaults: AdamW lr 1e-6 constant, betas (0.9, 0.99), eps 1e-8, no
    # weight decay, grad-norm clip 1.0; one pass (mu 1), eps 0.2, group-scaled advantages, per-sequence loss
    # ("grpo"; TRL's default is "dapo"), no reference model (beta 0); no gradient checkpointing (TRL's default is
    # on, r1lab's off; --trl-grad-ckpt turns it on).
    n_seq = args.prompts * args.g
    assert n_seq % 4 == 0, "prompts x g must be a multiple of the 4 accumulation steps"
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n_seq // 4,
                     gradient_accumulation_steps=4, num_generations=args.g, max_completion_length=args.tokens,
                     beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0, num_iterations=1,
                     epsilon=0.2, scale_rewards="group", loss_type="grpo",
                     gradient_checkpointing=args.trl_grad_ckpt, bf16=cuda, max_steps=args.steps, logging_steps=1,
                     save_strategy="no", report_to=[], disable_tqdm=True, temperature=1.0, top_p=1.0, top_k=0,
                     generation_kwargs={"min_new_tokens": args.tokens},  # EOS banned until the last token
                     use_cpu=not cuda, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype(args)).to(args.device)
    # r1lab's config.json has no transformers_version, which transformers 5 takes for an old Mistral tokenizer
    # and warns about; the DeepSeek pre-tokenizer is right as it is.
    tok = AutoTokenizer.from_pretrained(model_dir, fix_mistral_regex=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = Dataset.from_list(prompts(args.prompts * args.steps))
    trainer = GRPOTrainer(model=model, reward_funcs=constant_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    orig = trainer._generate_single_turn  # the transformers generate call (and its unpadding)

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = orig(*a, **k)
        sync()
        gen_acc[0] += time.perf_counter() - t0
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    print(f"trl completion lengths (min-max per step, want {args.tokens}): "
          f"{[(x.get('completions/min_length'), x.get('completions/max_length')) for x in logs_]}")
    print(f"trl reward (mean per step): {[round(x['reward'], 3) for x in logs_]}")
    step = statistics.median(times[1:4])
    gen = statistics.median(gens[1:4])
    return {"step_s": step, "tok_s": n_seq * args.tokens / gen if gen > 0 else float("nan"),
            "gen_share": statistics.median(gs / t for gs, t in zip(gens[1:4], times[1:4]))}


def _dtype(args) -> torch.dtype:
    """bf16 on the GPU (the measured setup); fp32 on CPU (the dry run)."""
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-moe-1b", help="model preset, random weights (default: bench-moe-1b)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--g", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--tokens", type=int, default=256, help="completion tokens (default 256)")
    p.add_argument("--micro", type=int, default=32, help="r1lab sequences per forward/backward (default 32)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps (default 4; median of steps 2-4)")
    p.add_argument("--compile", action="store_true", help="r1lab: train.compile = true for the policy update")
    p.add_argument("--async", dest="async_", action="store_true", help="r1lab: grpo.async = true (the next step's "
                   "rollouts are sampled during this step's update, one step off-policy)")
    p.add_argument("--only", choices=("r1lab", "trl"), help="run one side only")
    p.add_argument("--trl-grad-ckpt", action="store_true", help="TRL with gradient checkpointing (its default)")
    p.add_argument("--device", default="cuda", help="cuda (default; bf16) or cpu (an fp32 dry run of both sides)")
    p.add_argument("--breakdown", action="store_true", help="r1lab: print where each step's generation time goes")
    p.add_argument("--profile-step", type=int, default=0, help="r1lab: profile this step (torch.profiler) and print "
                   "its busiest kernels (default 0: none)")
    p.add_argument("--profile-rows", type=int, default=40, help="rows of the profile table (default 40)")
    p.add_argument("--trace", default=None, help="with --profile-step: write the chrome trace here")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/grpo.py needs a CUDA GPU (or --device cpu for a dry run)")
    with tempfile.TemporaryDirectory() as d:
        cfg = get_preset(args.preset)
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device=args.device).init_weights(seed=0)
        save_pretrained(model, d, tokenizer=load_tokenizer())
        del model
        res = {}
        if args.only != "trl":
            res["r1lab"] = bench_r1lab(Path(d), args)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.only != "r1lab":
            res["trl"] = bench_trl(Path(d), args)
    for k, v in res.items():
        print(f"{k:6s} {v['step_s']:.2f} s/step, {v['tok_s']:,.0f} rollout tok/s, generation "
              f"{v['gen_share']:.0%} of the step{' (beside the update)' if v.get('async') else ''} (medians of "
              f"steps 2-4)"
              + (f"; first step {v['first_s']:.1f} s (compilation included)" if "first_s" in v else ""))
    if len(res) == 2:
        print(f"r1lab is {res['trl']['step_s'] / res['r1lab']['step_s']:.1f}x faster per step (goal: >= 10x)")


if __name__ == "__main__":
    main()
