"""Training throughput: r1lab's training step against transformers' DeepseekV3ForCausalLM, same config, same run.

    python benchmarks/train.py --preset bench-moe-1b --batch 4 --seq 2048 --compile --out train.json
    python benchmarks/train.py --device cpu --preset tiny --batch 2 --seq 32 --steps 2 --warmup 2  # dry run

Both train the same randomly initialised weights on the same random tokens (plain causal attention, loss on
every position), bf16 matmuls with fp32 master weights, fused AdamW, gradient clipping at 1.0.
  r1lab:        `Trainer.train_step` (bf16 weights + fp32 master copies, grouped-GEMM experts, fp32 router,
                aux-loss-free bias update every step).
  transformers: the recipe of its Trainer with bf16=True: fp32 weights under torch.autocast(bfloat16), fused
                AdamW on them, `labels=input_ids`; run twice, each from the same weights on the same batches:
                eager (its Trainer's default) and compiled (its torch_compile=True: torch.compile(model),
                inductor, default mode; the warm-up steps hold the compile). Each prints and writes its
                configuration (version, attention and experts implementations, compile and its graph breaks),
                or its error if it fails (the run goes on).
Printed and written: tokens/s (input tokens per second), MFU by the standard formula (`train_flops_per_token`: 6 x
the matmul weights a token passes through, output head included, embedding lookup excluded, + causal attention,
against the dense bf16 peak), r1lab's ratio to each transformers run, peak memory and the first step's loss of
each (same weights and tokens, so they should agree to bf16 noise). An earlier convention (6 x all active
parameters, the embedding included) overstated MFU by about a third for this model and is retired.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch

from torch._dynamo.utils import counters

from r1lab import Transformer, get_preset, save_pretrained
from r1lab.data import Sequences
from r1lab.train.loop import Trainer, peak_flops, train_flops_per_token
from r1lab.train.recipe import Recipe


def timed(step, warmup: int, steps: int, sync) -> tuple[float, list[float]]:
    """Seconds per step after `warmup` steps, and the losses of all steps."""
    losses = [step() for _ in range(warmup)]
    sync()
    t = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync()
    return (time.perf_counter() - t) / steps, losses


def transformers_step(weights: str, batches: list, dev: torch.device, compiled: bool, experts: str | None,
                      capture_scalars: bool = False):
    """One optimizer step of transformers' DeepseekV3ForCausalLM on the next of `batches`, by the recipe of its
    Trainer with bf16=True: fp32 weights under autocast(bfloat16), fused AdamW, clipping at 1.0; `compiled` as
    its torch_compile=True does it, torch.compile(model) with inductor's default mode. No KV cache
    (use_cache=False: a training step has no use for one, and under torch.compile the cache's `is_initialized`
    guard recompiled each step). `capture_scalars`: Dynamo traces `.item()` calls (the grouped-mm experts'
    offsets) into the graph instead of breaking it there. Returns the step (it returns the loss) and the
    configuration that runs."""
    import transformers

    kw = {"experts_implementation": experts} if experts else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, **kw).to(dev).train()
    if compiled and capture_scalars:
        torch._dynamo.config.capture_scalar_outputs = True
    forward = torch.compile(hf) if compiled else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    it = iter(batches)

    def step():
        x = next(it).input_ids
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = forward(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    config = {"attn_implementation": hf.config._attn_implementation,
              "experts_implementation": hf.config._experts_implementation, "weights": "float32",
              "autocast": "bfloat16", "optimizer": "AdamW(fused)", "compiled": compiled,
              "use_cache": False,
              "compile": {"backend": "inductor", "mode": "default", "capture_scalar_outputs": capture_scalars}
              if compiled else None}
    return step, config


def profile_steps(step, n: int, step_s: float) -> None:
    """GPU kernels of n steps under torch.profiler, by total time, and their share of the timed step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in events) / n / 1e6
    print(f"profile: {sum(e.count for e in events) / n:.0f} GPU kernels per step, GPU busy {busy * 1e3:.1f} ms "
          f"of a {step_s * 1e3:.1f} ms step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))


def dynamo_counts() -> dict[str, int]:
    """What torch.compile did so far in this process: graph breaks, graphs compiled, and frames it gave up on
    and ran eagerly (a backend failure, or the recompile limit reached; these are not graph breaks)."""
    f = counters["frames"]
    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
            "frames_run_eagerly": f["total"] - f["ok"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3; more with --compile)")
    ap.add_argument("--compile", action="store_true", help="r1lab: train.compile = true (torch.compile the model)")
    ap.add_argument("--checkpointing", action="store_true", help="r1lab: activation checkpointing on")
    ap.add_argument("--head-chunk", type=int, default=None, metavar="N",
                    help="r1lab: train.head_chunk, tokens per chunk of the output head and its loss (default: the "
                         "recipe's; 0 = all tokens at once)")
    ap.add_argument("--hf-experts", default=None,
                    help="transformers' experts_implementation (e.g. eager, grouped_mm; default: its default)")
    ap.add_argument("--hf-capture-scalars", action="store_true",
                    help="transformers compiled: torch._dynamo.config.capture_scalar_outputs = True (no graph break "
                         "at .item())")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N more r1lab steps and print the GPU kernels by time")
    ap.add_argument("--device", default="cuda", help="cuda (bf16), or cpu for an fp32 dry run (default: cuda)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    cfg = get_preset(args.preset)
    B, S = args.batch, args.seq

    r = Recipe.defaults("pretrain")
    dtype = torch.bfloat16 if gpu else torch.float32
    r.run.device, r.run.dtype = args.device, "bfloat16" if gpu else "float32"
    r.run.out = tempfile.mkdtemp(prefix="r1lab-bench-")
    r.train.batch_size, r.data.seq_len, r.data.attention = B, S, "causal"
    r.train.compile, r.train.activation_checkpointing = args.compile, args.checkpointing
    if args.head_chunk is not None:
        r.train.head_chunk = args.head_chunk
    r.optim.lr, r.optim.warmup_steps, r.optim.schedule = 1e-4, 0, "constant"
    r.moe.mtp_weight, r.moe.balance_alpha = 0.0, 0.0
    r.log.tensorboard = False

    g = torch.Generator().manual_seed(0)
    n_batches = args.warmup + args.steps + args.profile
    tokens = torch.randint(0, cfg.vocab_size, (n_batches * B, S + 1), generator=g, dtype=torch.int32)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    data = Sequences(tokens, starts, torch.ones_like(starts))
    batches = [data.batch(range(i * B, (i + 1) * B), dev, "causal") for i in range(n_batches)]

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0)
    weights = tempfile.mkdtemp(prefix="r1lab-bench-weights-")
    if not args.no_hf:
        save_pretrained(model, weights, tokenizer=False)  # fp32: transformers starts from the same weights

    peak = peak_flops(dev)
    fpt = train_flops_per_token(cfg, S)
    res = {"gpu": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__, "preset": args.preset,
           "batch": B, "seq": S, "steps": args.steps, "peak_tflops": peak / 1e12 if peak else None,
           "flops_per_token": fpt,
           "r1lab_compile": args.compile, "r1lab_activation_checkpointing": args.checkpointing,
           "r1lab_head_chunk": r.train.head_chunk}

    def report(name, dt, losses):
        tps = B * S / dt
        res[f"{name}_tokens_per_s"] = tps
        res[f"{name}_step_s"] = dt
        res[f"{name}_mfu"] = tps * fpt / peak if peak else None
        res[f"{name}_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
        res[f"{name}_first_loss"] = losses[0]
        mfu = f", MFU {res[f'{name}_mfu']:.1%}" if peak else ""
        mem = f", peak {res[f'{name}_peak_mem_gb']:.1f} GB" if gpu else ""
        print(f"{name:>21}: {tps:,.0f} tokens/s{mfu}, {dt * 1e3:.1f} ms/step{mem}, first loss {losses[0]:.4f}",
              flush=True)

    def reset_memory():
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    # ---- r1lab
    reset_memory()
    trainer = Trainer(r, model, data, kind="pretrain", dtype=dtype, quiet=True)
    it = iter(batches)
    dt, losses = timed(lambda: trainer.train_step([next(it)])["loss"], args.warmup, args.steps, sync)
    report("r1lab", dt, losses)
    if args.profile:
        profile_steps(lambda: trainer.train_step([next(it)]), args.profile, dt)
    trainer = model = None  # frees them for transformers (rebinding, not del: the lambdas above close over it)

    # ---- transformers: eager, then compiled, each from the same weights on the same batches
    if not args.no_hf:
        import transformers

        transformers.logging.set_verbosity_error()
        res["transformers"] = transformers.__version__
        for name, compiled in (("transformers", False), ("transformers_compiled", True)):
            reset_memory()
            try:
                step, config = transformers_step(weights, batches, dev, compiled, args.hf_experts,
                                                 args.hf_capture_scalars)
                before = dynamo_counts()
                dt, losses = timed(step, args.warmup, args.steps, sync)
                if compiled:  # a break splits the graph and runs the code between in Python: slower, not wrong
                    config.update({k: v - before[k] for k, v in dynamo_counts().items()})
            except Exception as e:  # fail soft: the other numbers still count
                res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{name:>21}: failed: {res[f'{name}_error']}", flush=True)
                continue
            finally:
                step = None  # frees the model and its optimizer
            res[f"{name}_config"] = config
            print(f"{name:>21}: transformers {transformers.__version__}, {json.dumps(config)}", flush=True)
            report(name, dt, losses)
            res[f"speedup_over_{name}"] = res["r1lab_tokens_per_s"] / res[f"{name}_tokens_per_s"]
            print(f"r1lab / {name}: {res[f'speedup_over_{name}']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
