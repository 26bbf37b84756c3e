"""The paged latent-attention decode kernel alone: bandwidth by launch parameters, against the device's copy bandwidth.

    python benchmarks/paged_attention.py --out paged_attention.json          # V2-Lite's MLA shapes, 32 x 32,000

One decode token per sequence, DeepSeek-V2-Lite's shapes (16 heads, latent 512 + roped key 64, bf16), --batch
sequences of --context positions each in a pool of 64-position pages (pages shuffled, as a long-running engine
leaves them). For each combination of --bt (slots per inner iteration), --warps, --stages and --programs (the
programs aimed at over the batch, which set the splits per sequence) and --span (least positions per split) the op `kernels.paged_latent_attention`
(kernel + flash-decoding combine) is timed over --iters CUDA-graphed calls; reported: microseconds per call, the
cache bytes read (positions x 576 x 2 bytes), the bandwidth and its fraction of the copy bandwidth measured at the
start. The fastest setting is what `kernels.PAGED_ATTN` should hold; issue 19's goal is >= 50% of copy
bandwidth for the whole decode step at 32K context, batch 32 (benchmarks/long_context.py). Each setting is
checked against the default's output first (fp32 relative error < 1e-2).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from decode import copy_bandwidth, seconds_per_call  # benchmarks/decode.py, beside this script
from r1lab.model import kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="sequences (default: 32)")
    ap.add_argument("--context", type=int, default=32000, help="positions per sequence (default: 32000)")
    ap.add_argument("--heads", type=int, default=16, help="query heads (default: 16, V2-Lite)")
    ap.add_argument("--latent", type=int, default=512, help="kv_lora_rank (default: 512)")
    ap.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim (default: 64)")
    ap.add_argument("--bt", type=int, nargs="+", default=[32, 64], help="slots per iteration (default: 32 64)")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="num_warps (default: 4 8)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4], help="num_stages (default: 2 3 4)")
    ap.add_argument("--programs", type=int, nargs="+", default=[264, 528, 1056],
                    help="programs over the batch (default: 264 528 1056)")
    ap.add_argument("--span", type=int, nargs="+", default=[64], help="least positions per split (default: 64)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per setting (default: 50)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    assert torch.cuda.is_available() and kernels.triton is not None, "needs a GPU and triton"
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    B, H, C, R, page = args.batch, args.heads, args.latent, args.rope, 64
    pages = -(-args.context // page)
    g = torch.Generator(device=dev).manual_seed(0)
    pool = torch.randn(B * pages + 1, page, C + R, device=dev, generator=g).to(torch.bfloat16)
    table = (torch.randperm(B * pages, device=dev, generator=g) + 1).view(B, pages).int()
    lens = torch.full((B,), args.context, device=dev, dtype=torch.int32)
    q = torch.randn(B, H, C + R, device=dev, generator=g).to(torch.bfloat16)
    scale = (C + R) ** -0.5
    cache_bytes = B * args.context * (C + R) * 2
    default = dict(kernels.PAGED_ATTN)
    ref = kernels.paged_latent_attention(q, pool, table, lens, scale, C)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_TBps": copy_bw / 1e12,
               "batch": B, "context": args.context, "default": default, "runs": []}
    print(f"{results['gpu']}: copy {copy_bw / 1e12:.2f} TB/s; {B} x {args.context} positions, "
          f"{cache_bytes / 1e9:.2f} GB of cache per call; default {default}", flush=True)
    for bt, warps, stages, programs, span in itertools.product(args.bt, args.warps, args.stages, args.programs,
                                                               args.span):
        setting = dict(BT=bt, num_warps=warps, num_stages=stages, programs=programs, span=span)
        kernels.PAGED_ATTN.update(setting)
        run = dict(setting)
        try:
            out = kernels.paged_latent_attention(q, pool, table, lens, scale, C)
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"relative error {err:.2e} against the default setting"
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                kernels.paged_latent_attention(q, pool, table, lens, scale, C)
            seconds_per_call(graph.replay, 3)  # warm-up
            dt = seconds_per_call(graph.replay, args.iters)
            run.update(us=dt * 1e6, TBps=cache_bytes / dt / 1e12, copy_fraction=cache_bytes / dt / copy_bw,
                       rel_err=err)
            del graph
        except Exception as e:  # noqa: BLE001 - a setting that does not compile (registers, shared memory)
            run["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    kernels.PAGED_ATTN.update(default)
    ok = [r for r in results["runs"] if "us" in r]
    if ok:
        best = min(ok, key=lambda r: r["us"])
        base = next((r for r in ok if all(r[k] == default[k] for k in default)), None)
        print(f"fastest: {best}" + (f"; default {base['us']:.0f} us ({base['copy_fraction']:.1%})" if base else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
