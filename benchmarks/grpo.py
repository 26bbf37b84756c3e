"""GRPO step time and rollout tokens/s: r1lab's GRPOTrainer against TRL's GRPOTrainer, same run, same setup.

    python benchmarks/grpo.py --compile --out grpo.json       # r1lab, then TRL with both generation backends
    python benchmarks/grpo.py --compile --eos --out eos.json  # the same, completions ending at stop tokens
    python benchmarks/grpo.py --only trl --trl-modes paged    # TRL with continuous batching alone
    python benchmarks/grpo.py --only r1lab                    # r1lab alone
    python benchmarks/grpo.py --only r1lab --compile --breakdown   # where r1lab's generation time goes
    python benchmarks/grpo.py --only r1lab --compile --profile-step 3 --trace t.json   # kernels of one step
    python benchmarks/grpo.py --only r1lab --compile --async   # grpo.async: sampling beside the update
    python benchmarks/grpo.py --device cpu --preset tiny --prompts 2 --g 2 --tokens 8 --micro 4 --steps 3 --eos 4
                                                              # dry run of every path (TRL needs trl, datasets)

Setup (issue 5): `bench-moe-1b` random weights, bf16, 16 prompts x G=8 of at most 256 completion tokens, beta 0,
AdamW lr 1e-6 constant (r1lab's GRPO optimizer defaults on both), one optimizer step per GRPO step (TRL: per-device
batch 32 x 4 accumulation = 128 sequences, generated in one call), the same constant-in-expectation reward.

What is compared (issue 22): r1lab's GRPOTrainer (its engine: paged MLA cache, continuous batching, CUDA-graph
decode; `--compile` compiles the update) against TRL 1.16's GRPOTrainer in each of --trl-modes:
  default  transformers' `generate` on the left-padded batch of 128 (TRL's default without vLLM, which the
           device lacks);
  paged    `use_transformers_continuous_batching=True` (TRL 1.16's name; `use_transformers_paged` is its
           deprecated alias): transformers' continuous batching (`generate_batch`, a paged KV cache, the model's
           "sdpa" attention run over the pages, or flash attention where it is installed), TRL's default
           ContinuousBatchingConfig (max_memory_percent 0.5) unless --trl-cb-config says otherwise. It needs
           transformers >= 5.8 with MLA support in the paged cache (keys of qk_nope + qk_rope dims, values of
           v_head_dim): 5.25 runs it; 5.17 sizes its cache by config.head_dim, the first write fails and
           generate_batch returns empty completions, which this script turns into an error. A run that fails is
           recorded with its error, the others go on, and the script exits with status 1.
Each TRL run prints and records its configuration (generation backend, batch sizes, gradient checkpointing,
dtypes, attention, versions). TRL's generation time is measured around `GRPOTrainer._generate_single_turn`.

Lengths. By default no completion ends early, so both sides generate exactly --tokens per completion (r1lab: the
engine's ignore_eos; TRL default: min_new_tokens; TRL paged, whose continuous batching drops the min_new_tokens
processor: no EOS id). With --eos [L] completions end at a stop token, so lengths vary (a finished sequence frees
its slot in r1lab and TRL paged; in TRL default it rides along as padding until the batch's longest one ends): the
stop set is EOS plus one in L of the vocabulary's other ids, drawn with a fixed seed (stop_ids).
Random weights make next-token distributions nearly uniform (largest probability ~1e-4 over 129k ids), so each
token ends its completion with probability ~1/L, lengths are geometric, capped at --tokens (L = 128 and 256
tokens: mean ~111), and the distribution is the same on both sides: the weights are the same, and so is the stop
set (r1lab: SamplingParams.stop_token_ids; TRL: the model's generation_config.eos_token_id). Each side reports its
mean completion length, so the work can be compared, and tokens/s counts the tokens generated.

Timing: a step is one optimizer step, generation included. Step 1 (r1lab compiles and captures its decode graph;
TRL warms up) is reported apart; the summary is the median and mean of steps 2..N (--steps, default 12), and
rollout tokens/s is the tokens of steps 2..N over their generation seconds. On `--device cpu` both sides run in
fp32 (a dry run of the plumbing, not a measurement). Results: benchmarks/LOG.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import emitter  # noqa: E402  (benchmarks/decode.py, beside this script)
from r1lab import load_tokenizer, save_pretrained  # noqa: E402
from r1lab.model.config import get_preset  # noqa: E402
from r1lab.model.transformer import Transformer  # noqa: E402


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"What is {17 * i + 3} + {29 * i + 11}? Think step by step.", "answer": str(46 * i + 14)}
            for i in range(n)]


def constant_reward(prompts, completions, **_):  # the same signal in both trainers (TRL signature)
    return [float(len(c) % 7) for c in completions]


def stop_ids(vocab_size: int, every: int, eos: int, bos: int) -> list[int]:
    """The --eos stop set: `eos` and vocab_size // every of the other ids (not `bos`), drawn with a fixed seed, so
    that a nearly uniform sampler meets one with probability ~1/every per token whatever came before."""
    g = torch.Generator().manual_seed(22)
    others = [i for i in torch.randperm(vocab_size, generator=g).tolist() if i not in (eos, bos)]
    return [eos, *sorted(others[: vocab_size // every])]


def expected_length(p: float, cap: int) -> float:
    """Mean length of a completion that stops with probability p per token, cut at `cap` tokens."""
    return (1 - (1 - p) ** cap) / p


def summarise(times: list[float], gens: list[float], tokens: list[float], n_seq: int) -> dict:
    """Step 1 apart (compilation, graph capture, warm-up); medians and means over steps 2..N."""
    t, gs, tk = times[1:], gens[1:], tokens[1:]
    nan = float("nan")
    return {"first_s": times[0] if times else nan,
            "step_s": statistics.median(t) if t else nan, "step_s_mean": statistics.mean(t) if t else nan,
            "gen_s": statistics.median(gs) if gs else nan,
            "tok_s": sum(tk) / sum(gs) if gs and sum(gs) > 0 else nan,
            "mean_len": sum(tk) / (n_seq * len(tk)) if tk else nan,
            "gen_share": statistics.median(g / s for g, s in zip(gs, t)) if t else nan,
            "measured_steps": len(t)}


def bench_r1lab(model_dir: Path, args, stops: list[int] | None, record: dict) -> dict:
    from r1lab import load_pretrained
    from r1lab.engine import engine as eng_mod
    from r1lab.rewards import WeightedReward
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer

    r = GRPORecipe.defaults()
    r.run.out, r.run.device = tempfile.mkdtemp(), args.device
    g = r.grpo
    g.prompt_style, g.prompts_per_step, g.group_size, g.max_tokens, g.beta = "raw", args.prompts, args.g, args.tokens, 0.0
    r.optim.lr, r.train.batch_size, r.train.steps = 1e-6, args.micro, args.steps
    r.ckpt.every, r.ckpt.export, r.log.every = 0, False, 1
    r.train.compile, g.async_, g.micro_tokens = args.compile, args.async_, args.micro_tokens
    record["config"] = {"micro_batch": args.micro, "micro_tokens": args.micro_tokens, "compile": args.compile,
                        "async": args.async_,
                        "dtype": str(_dtype(args)), "master_weights": "float32",
                        "stop": f"{len(stops)} stop ids" if stops else "none (ignore_eos)"}
    model = load_pretrained(model_dir, device=args.device, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    tr = GRPOTrainer(r, model, tok, prompts(args.prompts * args.steps), dtype=_dtype(args),
                     rewards=[WeightedReward("constant", constant_reward, 1.0)])
    # The trainer builds its SamplingParams itself: set the stopping rule on every one it makes. Fixed lengths: no
    # stop token (ignore_eos). --eos: EOS and the stop set; a frozenset, so that the engine's per-token membership
    # test is a hash lookup (transformers' continuous batching keeps its EOS ids in a set too).
    orig = eng_mod.SamplingParams.__post_init__
    stop_set = frozenset(stops) if stops else None

    def stopping(self):
        orig(self)
        if stop_set is None:
            self.ignore_eos = True
        else:
            self.stop_token_ids = stop_set

    eng_mod.SamplingParams.__post_init__ = stopping
    parts = breakdown(tr) if args.breakdown else None
    n_seq = args.prompts * args.g
    times, gens, toks = record["step_s"], record["gen_s"], record["tokens"]
    try:
        for _ in range(args.steps):
            prof = profiler(args) if tr.step + 1 == args.profile_step else None
            t0 = time.perf_counter()
            with prof or contextlib.nullcontext():
                rec = tr.grpo_step()
            tr.step += 1
            times.append(time.perf_counter() - t0)
            gens.append(rec["gen_s"])
            toks.append(rec["response_len_mean"] * n_seq)
            overlap = (f", overlapped {rec['overlap_s']:.2f} s, waited {rec['wait_s']:.2f} s, lag {rec['policy_lag']}"
                       if "overlap_s" in rec else "")  # grpo.async: gen_s is the batch sampled during the last step
            print(f"r1lab step {tr.step}: {times[-1]:.2f} s (gen {rec['gen_s']:.2f} s, train {rec['train_s']:.2f} s, "
                  f"{rec['gen_tokens_per_s']:,.0f} rollout tok/s{overlap}) mean length "
                  f"{rec['response_len_mean']:.1f} (max {rec['response_len_max']}) reward {rec['reward']:.3f}",
                  flush=True)
            if prof is not None:
                report_profile(prof, args)
            if parts is not None:
                print("  generation: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
                parts.clear()
    finally:
        eng_mod.SamplingParams.__post_init__ = orig
    return summarise(times, gens, toks, n_seq)


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


def bench_trl(model_dir: Path, args, mode: str, stops: list[int] | None, record: dict) -> dict:
    """TRL's GRPOTrainer generating with `mode` ("default": transformers' generate; "paged": its continuous
    batching). Fills `record` as it goes (configuration, then each step), so that a failure keeps what ran."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    n_seq = args.prompts * args.g
    times, gens, toks = record["step_s"], record["gen_s"], record["tokens"]
    acc = {"gen_s": 0.0, "tokens": 0}

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
            gens.append(acc["gen_s"])
            toks.append(acc["tokens"])
            self.t0, acc["gen_s"], acc["tokens"] = t, 0.0, 0
            print(f"trl {mode} step {len(times)}: {times[-1]:.2f} s (gen {gens[-1]:.2f} s, train "
                  f"{times[-1] - gens[-1]:.2f} s, {toks[-1] / max(gens[-1], 1e-9):,.0f} rollout tok/s) mean length "
                  f"{toks[-1] / n_seq:.1f}", flush=True)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                record["logs"].append({k: logs.get(k) for k in ("reward", "completions/mean_length",
                                                                "completions/min_length", "completions/max_length",
                                                                "completions/clipped_ratio")})

    # 16 prompts x G=8 = 128 sequences per optimizer step as per-device batch 32 x 4 accumulation; TRL then
    # generates all 128 in one call (generation_batch_size = 32 x steps_per_generation 4) once per step.
    # The optimizer and loss as r1lab's GRPO defaults: AdamW lr 1e-6 constant, betas (0.9, 0.99), eps 1e-8, no
    # weight decay, grad-norm clip 1.0; one pass (mu 1), eps 0.2, group-scaled advantages, per-sequence loss
    # ("grpo"; TRL's default is "dapo"), no reference model (beta 0); no gradient checkpointing (TRL's default is
    # on, r1lab's off; --trl-grad-ckpt turns it on).
    assert n_seq % 4 == 0, "prompts x g must be a multiple of the 4 accumulation steps"
    if stops:
        gen_kwargs = None  # the stop set is the model's EOS ids (below), which TRL passes to both backends
    elif mode == "default":
        gen_kwargs = {"min_new_tokens": args.tokens}  # EOS banned until the last token
    else:  # continuous batching drops the min_new_tokens processor; no EOS id (-1) keeps every row to --tokens
        gen_kwargs = {"eos_token_id": -1}
    paged = mode == "paged"
    cb_config = args.trl_cb_config
    if paged and cb_config is None and not cuda:  # sized by free memory, the cache would fill GBs of host RAM
        cb_config = {"num_blocks": 64, "max_batch_tokens": 512}
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n_seq // 4,
                     gradient_accumulation_steps=4, num_generations=args.g, max_completion_length=args.tokens,
                     beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, max_grad_norm=1.0, num_iterations=1,
                     epsilon=0.2, scale_rewards="group", loss_type="grpo",
                     gradient_checkpointing=args.trl_grad_ckpt, bf16=cuda, max_steps=args.steps, logging_steps=1,
                     save_strategy="no", report_to=[], disable_tqdm=True, temperature=1.0, top_p=1.0, top_k=0,
                     generation_kwargs=gen_kwargs, use_transformers_continuous_batching=paged,
                     transformers_continuous_batching_config=cb_config if paged else None,
                     use_cpu=not cuda, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype(args)).to(args.device)
    if stops:
        model.generation_config.eos_token_id = stops  # TRL stops and masks completions at each of these
    # r1lab's config.json has no transformers_version, which transformers 5 takes for an old Mistral tokenizer
    # and warns about; the DeepSeek pre-tokenizer is right as it is.
    tok = AutoTokenizer.from_pretrained(model_dir, fix_mistral_regex=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = Dataset.from_list(prompts(args.prompts * args.steps))
    trainer = GRPOTrainer(model=model, reward_funcs=constant_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    attn_set = []  # attention implementations continuous batching switches to (and back from)
    record["config"] = trl_config(trainer, model, mode, stops, attn_set)
    print(f"trl {mode} configuration: {record['config']}", flush=True)

    orig_set_attn = model.set_attn_implementation

    def set_attn(impl, *a, **k):
        attn_set.append(impl)
        return orig_set_attn(impl, *a, **k)

    model.set_attn_implementation = set_attn
    if paged:
        # generate_batch logs a failed request and returns it with no tokens, which TRL would train on as an empty
        # completion: raise its error instead.
        orig_batch = model.generate_batch

        def generate_batch(inputs, *a, **k):
            # Under bf16, accelerate wraps the model's forward to cast its outputs to fp32, and that cast fails on
            # the paged cache continuous batching returns ("'PagedAttentionCache' object has no attribute 'float'"):
            # generate with the forward it wrapped (the weights are bf16 already; training keeps the wrapper).
            wrapped = model.__dict__.get("forward") if hasattr(model, "_original_forward") else None
            if wrapped is not None:
                model.forward = model._original_forward
            try:
                out = orig_batch(inputs, *a, **k)
            finally:
                if wrapped is not None:
                    model.forward = wrapped
            failed = [o.error for o in out.values() if getattr(o, "error", None)]
            if failed or len(out) != len(inputs):
                raise RuntimeError(f"generate_batch failed {len(failed)} and lost {len(inputs) - len(out)} of "
                                   f"{len(inputs)} requests: {sorted(set(failed))}")
            return out

        model.generate_batch = generate_batch
    orig = trainer._generate_single_turn  # the generate / generate_batch call (and its unpadding)

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = orig(*a, **k)
        sync()
        acc["gen_s"] += time.perf_counter() - t0
        acc["tokens"] += sum(len(c) for c in out[0])
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    logs = record["logs"]
    print(f"trl {mode} completion lengths (min-max per step, cap {args.tokens}): "
          f"{[(x['completions/min_length'], x['completions/max_length']) for x in logs]}")
    print(f"trl {mode} reward (mean per step): {[round(x['reward'], 3) for x in logs]}")
    return summarise(times, gens, toks, n_seq)


def trl_config(trainer, model, mode: str, stops: list[int] | None, attn_set: list) -> dict:
    """What a TRL run used, as TRL resolved it: backend, batch sizes, checkpointing, dtypes, attention, versions."""
    a = trainer.args
    cb = trainer.continuous_batching_config
    versions = {}
    for pkg in ("trl", "transformers", "accelerate", "datasets", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return {
        "mode": mode,
        "generation": ("transformers continuous batching (generate_batch, paged KV cache)" if mode == "paged"
                       else "transformers generate (left-padded batch)"),
        "continuous_batching_config": ({k: v for k, v in vars(cb).items() if v is not None and not k.startswith("_")}
                                       if cb is not None else None),
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "generation_batch_size": a.generation_batch_size, "steps_per_generation": a.steps_per_generation,
        "num_generations": a.num_generations, "max_completion_length": a.max_completion_length,
        "gradient_checkpointing": a.gradient_checkpointing, "bf16": a.bf16,
        "model_dtype": str(model.dtype), "attn_implementation": model.config._attn_implementation,
        "attn_switches": attn_set,  # filled during training
        "loss_type": a.loss_type, "beta": a.beta, "learning_rate": a.learning_rate,
        "generation_kwargs": a.generation_kwargs,
        "eos_token_ids": f"{len(trainer.eos_token_ids)} ids" if stops else trainer.eos_token_ids,
        "versions": versions,
    }


def _dtype(args) -> torch.dtype:
    """bf16 on the GPU (the measured setup); fp32 on CPU (the dry run)."""
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def _plain(v):
    """A JSON-friendly value for the record (configuration objects become their repr)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-moe-1b", help="model preset, random weights (default: bench-moe-1b)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--g", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--tokens", type=int, default=256, help="completion tokens, the cap with --eos (default 256)")
    p.add_argument("--micro", type=int, default=32, help="r1lab sequences per forward/backward (default 32)")
    p.add_argument("--micro-tokens", type=int, default=0, help="r1lab: grpo.micro_tokens, micro-batches by padded "
                   "positions instead of --micro rows (default 0: off)")
    p.add_argument("--steps", type=int, default=12, help="GRPO steps (default 12: step 1 apart, then median and "
                   "mean of steps 2-12)")
    p.add_argument("--eos", type=int, nargs="?", const=128, default=0, metavar="L",
                   help="completions end at a stop token: EOS and one in L of the other token ids (alone: L = "
                        "128), so lengths are geometric with mean ~L, capped at --tokens (default: off, every "
                        "completion is exactly --tokens long)")
    p.add_argument("--compile", action="store_true", help="r1lab: train.compile = true for the policy update")
    p.add_argument("--async", dest="async_", action="store_true", help="r1lab: grpo.async = true (the next step's "
                   "rollouts are sampled during this step's update, one step off-policy)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="sys.setswitchinterval(S) before the runs (Python's default 0.005): how long a thread "
                        "waits for the GIL held by another, e.g. the async sampler's decode loop beside the update")
    p.add_argument("--only", choices=("r1lab", "trl"), help="run one side only")
    p.add_argument("--trl-modes", nargs="+", choices=("default", "paged"), default=["default", "paged"],
                   help="TRL generation backends, run one after the other: default (transformers' generate) and "
                        "paged (use_transformers_continuous_batching) (default: both)")
    p.add_argument("--trl-cb-config", type=json.loads, default=None, metavar="JSON",
                   help="paged: keyword arguments of transformers' ContinuousBatchingConfig, e.g. "
                        "'{\"max_memory_percent\": 0.3}' (default: TRL's; on --device cpu a small cache)")
    p.add_argument("--trl-grad-ckpt", action="store_true", help="TRL with gradient checkpointing (its default)")
    p.add_argument("--device", default="cuda", help="cuda (default; bf16) or cpu (an fp32 dry run of both sides)")
    p.add_argument("--breakdown", action="store_true", help="r1lab: print where each step's generation time goes")
    p.add_argument("--profile-step", type=int, default=0, help="r1lab: profile this step (torch.profiler) and print "
                   "its busiest kernels (default 0: none)")
    p.add_argument("--profile-rows", type=int, default=40, help="rows of the profile table (default 40)")
    p.add_argument("--trace", default=None, help="with --profile-step: write the chrome trace here")
    p.add_argument("--out", default=None, help="write the setup and every run (configuration, per-step times) as "
                   "JSON here, rewritten after each run")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/grpo.py needs a CUDA GPU (or --device cpu for a dry run)")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    cfg = get_preset(args.preset)
    tok = load_tokenizer()
    stops = stop_ids(cfg.vocab_size, args.eos, tok.eos_id, tok.bos_id) if args.eos else None
    setup = {k: v for k, v in vars(args).items() if k not in ("trace", "out")}
    setup.update(device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                 torch=torch.__version__, vocab_size=cfg.vocab_size)
    if stops:
        p_stop = len(stops) / cfg.vocab_size
        setup.update(stop_ids=len(stops), expected_mean_len=expected_length(p_stop, args.tokens))
        print(f"--eos {args.eos}: {len(stops)} stop ids of {cfg.vocab_size} (EOS {tok.eos_id} among them); with "
              f"near-uniform sampling a completion stops with p = {p_stop:.4f} per token, expected mean length "
              f"{setup['expected_mean_len']:.1f} of at most {args.tokens}")
    results = {"setup": setup, "runs": []}
    emit = emitter(results, args.out)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device=args.device).init_weights(seed=0)
        save_pretrained(model, d, tokenizer=tok)
        del model
        sides = ([] if args.only == "trl" else ["r1lab"]) + ([] if args.only == "r1lab" else
                                                             [f"trl {m}" for m in args.trl_modes])
        for side in sides:
            record = {"run": side, "step_s": [], "gen_s": [], "tokens": [], "logs": []}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                if side == "r1lab":
                    res[side] = bench_r1lab(Path(d), args, stops, record)
                else:
                    res[side] = bench_trl(Path(d), args, side.split()[1], stops, record)
                if torch.cuda.is_available():  # weights, optimizer, the rollout pool and the update's activations
                    res[side]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                record["summary"] = res[side]
            except Exception as e:  # e.g. TRL paged on a transformers whose paged cache has no MLA: record, go on
                traceback.print_exc()
                record["error"] = res[side] = f"{type(e).__name__}: {e}"
            if not record["logs"]:
                del record["logs"]
            emit(_plain(record))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for k, v in res.items():
        if isinstance(v, str):
            print(f"{k:12s} failed: {v}")
            continue
        print(f"{k:12s} {v['step_s']:.2f} s/step median, {v['step_s_mean']:.2f} mean (steps 2-{args.steps}), "
              f"{v['tok_s']:,.0f} rollout tok/s, mean length {v['mean_len']:.1f}, generation {v['gen_share']:.0%} "
              f"of the step{' (beside the update)' if k == 'r1lab' and args.async_ else ''}; first step "
              f"{v['first_s']:.1f} s" + (f", peak memory {v['peak_gb']:.1f} GB" if "peak_gb" in v else ""))
    if isinstance(res.get("r1lab"), dict):
        for k, v in res.items():
            if k != "r1lab" and isinstance(v, dict):
                print(f"r1lab is {v['step_s'] / res['r1lab']['step_s']:.1f}x faster per step than {k} "
                      f"(medians; goal >= 10x)")
    if any(isinstance(v, str) for v in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
