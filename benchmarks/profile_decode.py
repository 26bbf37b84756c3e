"""Where a decode step's time goes: the engine's step without the CUDA graph, under torch.profiler.

    python benchmarks/profile_decode.py --batch 1 [--compile] [--temperature 1 --prompt-len 32]
    python benchmarks/profile_decode.py --batch 32 --compile --cache sized default --cpu-rows 15

Prints the GPU kernels by total time over --steps steps, the number of kernels per step, and the wall time per
step with and without the CUDA graph (the difference is launch overhead). --cache: the engine's cache "sized" to
the positions the run uses, or at its "default" size (the model's full context per slot, the page pool from free
memory), or both in turn. --cpu-rows N also lists the N host-side operators by time (the step's Python and
dispatch, which the graphed step still runs around each replay).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from r1lab import Engine, SamplingParams, Transformer, get_preset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--batch", type=int, default=1, help="slots decoded per step (default: 1)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (default: 20)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    ap.add_argument("--rows", type=int, default=30, help="kernels to list (default: 30)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: 64)")
    ap.add_argument("--cache", nargs="+", choices=("sized", "default"), default=["sized"],
                    help="engine cache size(s) to profile in turn (default: sized)")
    ap.add_argument("--sized-len", type=int, default=None,
                    help="max_seq_len of the sized cache (default: prompt + generated tokens)")
    ap.add_argument("--cpu-rows", type=int, default=0, help="host operators to list, graphed step (default: 0)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).to(torch.bfloat16).eval()
    prompts = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.prompt_len)).tolist()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.steps * 4 + 16, ignore_eos=True)
    for cache, graph in [(c, g) for c in args.cache for g in (False, True)]:
        size = dict(max_seq_len=args.sized_len or args.prompt_len + params.max_tokens) if cache == "sized" else {}
        eng = Engine(model, max_batch=args.batch, cuda_graph=graph, compile=args.compile, **size)
        print(f"cache={cache}: max_seq_len {eng.max_seq_len}, cache_tokens {eng.cache_tokens}", flush=True)
        for p in prompts:
            eng.add_request(p, params)
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        print(f"cache={cache} cuda_graph={graph}: {(time.perf_counter() - t) / args.steps * 1e3:.3f} ms per step",
              flush=True)
        if graph and args.cpu_rows:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    eng.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.cpu_rows,
                                            max_name_column_width=70))
        if not graph:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    eng.step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            n_kernels = sum(e.count for e in events) / args.steps
            total = sum(e.self_device_time_total for e in events) / args.steps
            print(f"{n_kernels:.0f} GPU kernels per step, {total / 1e3:.3f} ms of GPU time per step")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        del eng
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
