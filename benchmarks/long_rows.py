"""Long training rows on one GPU (issue 19, training half): an SFT step at 32K tokens per row and a GRPO update
at 8K-token completions; tokens/s, step time and peak memory.

    python benchmarks/long_rows.py --out long_rows.json                      # all three, one H200, < 5 minutes
    python benchmarks/long_rows.py --device cpu --sft-preset tiny --sft-full-preset tiny --seq 512 --grpo-preset tiny \\
        --prompt 16 --completion 64 --sequences 2 --micro 1 --steps 1 --warmup 1   # CPU dry run of the plumbing

SFT: `Trainer.train_step` on one packed row of --seq tokens (documents of 9 different lengths, the loss on the
second half of each, as SFT replies), document masking (FlexAttention block mask on CUDA, no (S, S) mask) and the
output head in chunks of train.head_chunk (no fp32 (S, vocab) logits). The model is --sft-preset with random
weights in bf16; on `deepseek-v2-lite` (15.7B parameters) a full fine-tune's fp32 master weights and AdamW
moments alone are 190 GB, so it trains LoRA adapters (--lora-rank, default 16, on attention, MLPs and shared
experts; 0 = full fine-tune) with activation checkpointing (--no-checkpointing to turn off). A second SFT step
fine-tunes all of --sft-full-preset (bench-moe-1b: 0.9B parameters) at the same length.
GRPO: the update of `GRPOTrainer._optimise` for one mini-batch, written out with the same functions
(`completion_logprobs` with the chunked head and entropy, `clipped_surrogate`, `aggregate` "token", the
trainer's `end_step`): --sequences sequences of --prompt + --completion random tokens, micro-batches of --micro,
on --grpo-preset (bench-moe-1b: full fine-tune, fp32 master weights) with its context raised to fit. No
reference model (beta 0) and no rollout: the engine half of issue 19 measures generation.
Times are medians of --steps steps after --warmup (the first compiles FlexAttention's kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
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
from r1lab.train.grpo import aggregate, clipped_surrogate, completion_logprobs  # noqa: E402
from r1lab.train.loop import Trainer  # noqa: E402
from r1lab.train.recipe import Recipe  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def recipe(args, dev: torch.device, lora_rank: int, checkpointing: bool) -> Recipe:
    r = Recipe.defaults("sft")
    r.run.device, r.run.out = str(dev), tempfile.mkdtemp(prefix="r1lab-long-rows-")
    r.run.dtype = "bfloat16" if dev.type == "cuda" else "float32"
    r.train.batch_size, r.train.compile, r.train.activation_checkpointing = 1, args.compile, checkpointing
    r.train.head_chunk = args.head_chunk
    r.optim.lr, r.optim.warmup_steps, r.optim.schedule = 1e-5, 0, "constant"
    r.moe.mtp_weight, r.moe.balance_alpha = 0.0, 0.0
    r.lora.rank = lora_rank
    r.log.tensorboard = False
    return r


def build(preset: str, dev: torch.device, context: int) -> Transformer:
    cfg = get_preset(preset)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, context), num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.to_empty(device=dev).init_weights(seed=0)  # fp32; the trainer casts to the compute dtype


def timed(step, warmup: int, steps: int, dev: torch.device) -> tuple[float, list]:
    out = []
    for _ in range(warmup):
        out.append(step())
    times = []
    for _ in range(steps):
        sync(dev)
        t = time.perf_counter()
        out.append(step())
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_sft(args, dev: torch.device, preset: str, lora_rank: int) -> dict:
    S = args.seq
    model = build(preset, dev, S)
    V = model.config.vocab_size
    r = recipe(args, dev, lora_rank, not args.no_checkpointing)
    r.data.seq_len = S
    # one packed row: 9 documents of different lengths (the last one fills the row), targets on their second halves
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([3, 1, 5, 2, 8, 1, 4, 6, 2], dtype=torch.float64)
    lengths = (weights / weights.sum() * (S + 1)).long().clamp(min=2)
    lengths[-1] = S + 1 - lengths[:-1].sum()
    tokens = torch.randint(0, V, (1, S + 1), generator=g, dtype=torch.int32)
    starts = torch.zeros(1, S + 1, dtype=torch.bool)
    targets = torch.zeros(1, S + 1, dtype=torch.bool)
    pos = 0
    for n in lengths.tolist():
        starts[0, pos] = True
        targets[0, pos + n // 2: pos + n] = True
        pos += n
    data = Sequences(tokens, starts, targets)
    trainer = Trainer(r, model, data, kind="sft", dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                      quiet=True)
    reset_peak(dev)
    batch = data.batch([0], dev)
    dt, recs = timed(lambda: trainer.train_step([batch]), args.warmup, args.steps, dev)
    res = {"preset": preset, "seq": S, "documents": len(lengths), "lora_rank": lora_rank,
           "activation_checkpointing": not args.no_checkpointing, "compile": args.compile,
           "head_chunk": args.head_chunk, "step_s": dt, "tokens_per_s": S / dt, "peak_mem_gb": peak_gb(dev),
           "loss": recs[-1]["loss"], "flex": batch.attn_mask.block_mask is not None,
           # what the replaced paths would have held: the dense bool mask, the fp32 logits (and their gradient)
           "dense_mask_gb": S * S / 2**30, "full_fp32_logits_gb": S * V * 4 / 2**30}
    mem = f", peak {res['peak_mem_gb']:.1f} GB" if res["peak_mem_gb"] is not None else ""
    print(f"SFT  {preset} 1 x {S} tokens ({len(lengths)} documents), LoRA rank {lora_rank}: "
          f"{res['tokens_per_s']:,.0f} tokens/s, {dt:.2f} s/step{mem}, loss {res['loss']:.4f} "
          f"(flex {res['flex']}; a dense mask would be {res['dense_mask_gb']:.1f} GB, full fp32 logits "
          f"{res['full_fp32_logits_gb']:.1f} GB)", flush=True)
    del trainer, model
    return res


def bench_grpo(args, dev: torch.device) -> dict:
    P, L, N, micro = args.prompt, args.completion, args.sequences, args.micro
    model = build(args.grpo_preset, dev, P + L)
    V = model.config.vocab_size
    r = recipe(args, dev, 0, args.grpo_checkpointing)
    trainer = Trainer(r, model, None, kind="grpo", dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                      quiet=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (P,), generator=g).tolist() for _ in range(N)]
    completions = [torch.randint(0, V, (L,), generator=g).tolist() for _ in range(N)]
    adv = torch.randn(N, generator=g).to(dev)
    old_shift = (0.1 * torch.randn(N, L, generator=g)).to(dev)  # sampling-time log-probs a little off: some clip
    denom = N * L  # "token" aggregation over the mini-batch

    def update():
        total, ent_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for s in range(0, N, micro):
            logp, mask, ent = completion_logprobs(trainer.model, prompts[s:s + micro], completions[s:s + micro],
                                                  1.0, with_entropy=True,
                                                  compiled=args.compile, chunk=args.head_chunk)
            old = logp.detach() + old_shift[s:s + micro]
            obj, _ = clipped_surrogate(logp, old, adv[s:s + micro], 0.2, 0.28)
            loss = aggregate(-obj, mask, "token", denom)
            loss.backward()
            trainer.master.accumulate_grads()
            total += loss.detach()
            ent_sum += (ent * mask).sum()
        loss_v, gnorm, _, (ent_v,) = trainer.end_step(total, [ent_sum / denom])
        return loss_v, ent_v

    reset_peak(dev)
    dt, outs = timed(update, args.warmup, args.steps, dev)
    res = {"preset": args.grpo_preset, "sequences": N, "prompt": P, "completion": L, "micro": micro,
           "activation_checkpointing": args.grpo_checkpointing, "update_s": dt,
           "completion_tokens_per_s": N * L / dt, "tokens_per_s": N * (P + L) / dt, "peak_mem_gb": peak_gb(dev),
           "entropy": outs[-1][1], "full_fp32_logits_gb_per_micro": micro * L * V * 4 / 2**30}
    mem = f", peak {res['peak_mem_gb']:.1f} GB" if res["peak_mem_gb"] is not None else ""
    print(f"GRPO {args.grpo_preset} update of {N} x ({P} + {L}) tokens, micro-batches of {micro}: "
          f"{res['completion_tokens_per_s']:,.0f} completion tokens/s, {dt:.2f} s/update{mem}, entropy "
          f"{res['entropy']:.3f} (full fp32 logits would be {res['full_fp32_logits_gb_per_micro']:.1f} GB per "
          f"micro-batch)", flush=True)
    del trainer, model
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the plumbing)")
    ap.add_argument("--only", choices=("sft", "grpo"), default=None, help="run one of the two (default: both)")
    ap.add_argument("--sft-preset", default="deepseek-v2-lite", help="SFT model preset (default deepseek-v2-lite)")
    ap.add_argument("--seq", type=int, default=32768, help="SFT tokens per row (default 32768)")
    ap.add_argument("--lora-rank", type=int, default=16, help="SFT LoRA rank; 0 = full fine-tune (default 16)")
    ap.add_argument("--sft-full-preset", default="bench-moe-1b", help="also a full fine-tune SFT step at --seq "
                    "on this preset ('' = skip; default bench-moe-1b)")
    ap.add_argument("--no-checkpointing", action="store_true", help="SFT without activation checkpointing")
    ap.add_argument("--grpo-preset", default="bench-moe-1b", help="GRPO model preset (default bench-moe-1b)")
    ap.add_argument("--prompt", type=int, default=512, help="GRPO prompt tokens (default 512)")
    ap.add_argument("--completion", type=int, default=8192, help="GRPO completion tokens (default 8192)")
    ap.add_argument("--sequences", type=int, default=8, help="GRPO sequences per update (default 8)")
    ap.add_argument("--micro", type=int, default=2, help="GRPO sequences per forward/backward (default 2)")
    ap.add_argument("--grpo-checkpointing", action="store_true", help="GRPO with activation checkpointing")
    ap.add_argument("--head-chunk", type=int, default=2048, help="train.head_chunk: tokens per head chunk "
                    "(default 2048)")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the model (default off)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps / updates each (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1: compiles flex)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    runs = {"sft": lambda: bench_sft(args, dev, args.sft_preset, args.lora_rank),
            "sft_full": lambda: bench_sft(args, dev, args.sft_full_preset, 0),
            "grpo": lambda: bench_grpo(args, dev)}
    for name, run in runs.items():
        if args.only not in (None, name.split("_")[0]) or (name == "sft_full" and not args.sft_full_preset):
            continue
        try:  # one part failing (out of memory, a kernel) still leaves the others' numbers
            res[name] = run()
        except Exception as e:  # noqa: BLE001 (reported, and the next part runs)
            res[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{name}: FAILED {res[name]['error']}", flush=True)
        gc.collect()
        reset_peak(dev)
        if args.out:  # after every part: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
