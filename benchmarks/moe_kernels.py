"""One MoE layer of a decode step, the Triton kernels (r1lab/model/kernels.py) against the torch path they
replace, both compiled and captured in a CUDA graph, at several token counts.

    python benchmarks/moe_kernels.py [--preset bench-moe-1b] [--tokens 1 8 32 128 256] [--sweep]

Prints microseconds per layer call for each path, their ratio, the bytes of expert weights a call must read
and the bandwidth that implies. --sweep first times each kernel alone under the launch parameters it could
use (tile sizes, warps, pipeline stages; the router in one kernel or two) and prints the fastest per token
count, which is how kernels.router_tiles / expert_tiles were chosen."""

from __future__ import annotations

import argparse
import json
import os

import itertools

import torch

from r1lab import get_preset
from r1lab.model import kernels
from r1lab.model.moe import MoE


def graph_time(fn, reps: int = 20, iters: int = 30) -> float:
    """Microseconds per fn() call, fn captured `reps` times in one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * reps)


@torch.no_grad()
def sweep(layer: MoE, T: int, D: int) -> dict:
    """Time the router and each expert kernel alone under every candidate launch configuration."""
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    gate, ex, sh = layer.gate, layer.experts, layer.shared_experts
    E, I = ex.gate_proj.shape[0], ex.gate_proj.shape[1]
    S = 0 if sh is None else sh.gate_proj.weight.shape[0] // I
    best = {}
    router = [dict(BD=bd, num_warps=nw, BE=0) for bd in (64, 128) for nw in (1, 2, 4, 8)]
    router += [dict(BD=bd, num_warps=4, BE=be, select_warps=sw) for bd in (128, 256) for be in (4, 8, 16)
               for sw in (1, 2)]
    res = []
    for cfg in router:
        kernels.ROUTER_TILES = lambda T_, E_, D_, c=cfg: c
        try:
            res.append((graph_time(lambda: kernels.route(x, gate)), cfg))
        except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects is just not a candidate
            print(f"router {cfg}: {type(e).__name__}")
    kernels.ROUTER_TILES = kernels.router_tiles
    res.sort(key=lambda r: r[0])
    best["router"] = [dict(us=t, **c) for t, c in res[:3]]
    w, idx = kernels.route(x, gate)
    K = idx.shape[1]
    R = T * (K + S)
    h = torch.empty(R, I, dtype=x.dtype, device="cuda")
    y = torch.empty(R, D, dtype=torch.float32, device="cuda")
    sg, su, sd = sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight
    plan = torch.empty(E, T, dtype=torch.int32, device="cuda")
    every = torch.empty(E + S, dtype=torch.int64, device="cuda")
    kernels._plan_kernel[(E + S,)](idx, plan, every, E, T, K, BR=kernels.SCAN, num_warps=4)
    for name in ("up", "down"):
        res = []
        for bn, bk, (nw, ns) in itertools.product((16, 32, 64), (64, 128, 256), ((4, 3), (4, 4), (2, 3))):
            cfg = dict(BM=16, BN=bn, BK=bk, num_warps=nw, num_stages=ns)
            if (name == "down" and bk > I) or (name == "up" and bn > I):
                continue
            split = -(-T // 16)
            if name == "up":
                fn = lambda c=cfg: kernels._experts_up_kernel[(E + S, I // c["BN"], split)](
                    x, plan, every, w, ex.gate_proj, ex.up_proj, sg, su, h, E, T, K, S, D, I, **c)
            else:
                fn = lambda c=cfg: kernels._experts_down_kernel[(E + S, D // c["BN"], split)](
                    h, plan, every, w, ex.down_proj, sd, y, E, T, K, S, D, I, **c)
            try:
                res.append((graph_time(fn), cfg))
            except Exception as e:  # noqa: BLE001
                print(f"{name} {cfg}: {type(e).__name__}")
        res.sort(key=lambda r: r[0])
        best[name] = [dict(us=t, **c) for t, c in res[:3]]
        cur = kernels.expert_tiles(T, D, I)[0 if name == "up" else 1]
        best[name + "_current"] = next((t for t, c in res if c == cur), None)
    return best


def time_layer(layer: MoE, x: torch.Tensor, kernels_on: bool) -> float:
    """Microseconds per call of the compiled layer, with the kernels or with torch's path."""
    os.environ["R1LAB_KERNELS"] = "1" if kernels_on else "0"
    torch._dynamo.reset()
    fn = torch.compile(layer, dynamic=False)
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        return graph_time(lambda: fn(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="tokens per call")
    ap.add_argument("--sweep", action="store_true", help="first time each kernel under its launch options")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    layer = MoE(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    layer = layer.to("cuda", torch.bfloat16).eval()
    D, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    expert_bytes = 3 * D * I * 2
    sweeps = {}
    if args.sweep:
        for T in args.tokens:
            sweeps[T] = sweep(layer, T, D)
            print(f"T={T}: " + json.dumps(sweeps[T]), flush=True)
    rows = []
    print(f"{'tokens':>6} {'torch us':>9} {'kernels us':>10} {'speedup':>7} {'experts read':>12} {'GB/s (kernels)':>14}")
    for T in args.tokens:
        x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            _, idx, _ = layer.gate(x.view(T, D))
        distinct = idx.unique().numel() + (cfg.n_shared_experts or 0)
        read = distinct * expert_bytes + E * D * 2  # experts touched + the gate
        t_torch = time_layer(layer, x, False)
        t_kern = time_layer(layer, x, True)
        row = dict(tokens=T, torch_us=t_torch, kernels_us=t_kern, speedup=t_torch / t_kern, bytes=read,
                   kernels_gbps=read / t_kern / 1e3)
        rows.append(row)
        print(f"{T:>6} {t_torch:>9.1f} {t_kern:>10.1f} {t_torch / t_kern:>6.2f}x {read / 1e6:>10.1f}MB "
              f"{row['kernels_gbps']:>14.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=args.preset, device=torch.cuda.get_device_name(), rows=rows, sweeps=sweeps), f,
                      indent=1)


if __name__ == "__main__":
    main()
