"""Where a decode step's time goes: the engine's step without the CUDA graph, under torch.profiler.

    python benchmarks/profile_decode.py --batch 1 [--compile] [--temperature 1 --prompt-len 32]

Prints the GPU kernels by total time over --steps steps, the number of kernels per step, and the wall time per
step with and without the CUDA graph (the difference is launch overhead).
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
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).to(torch.bfloat16).eval()
    prompts = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.prompt_len)).tolist()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.steps * 4 + 16, ignore_eos=True)
    for graph in (False, True):
        eng = Engine(model, max_batch=args.batch, max_seq_len=args.prompt_len + params.max_tokens, cuda_graph=graph,
                     compile=args.compile)
        for p in prompts:
            eng.add_request(p, params)
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        print(f"cuda_graph={graph}: {(time.perf_counter() - t) / args.steps * 1e3:.3f} ms per step", flush=True)
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


if __name__ == "__main__":
    main()
