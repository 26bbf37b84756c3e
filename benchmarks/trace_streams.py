"""Where an overlapped GRPO step's time goes on the GPU, from a profiler trace (`benchmarks/grpo.py --async
--profile-step N --trace t.json`): per CUDA stream, its kernels' count and busy time; then, for the stream with the
most kernels (the sampler's decode), how its kernels behave while another stream (the update) is busy against
while it is alone. Longer kernels beside the update mean the two contend on the device (SMs, memory bandwidth);
the same kernels with longer gaps between them mean the sampler waits on the host (launches, the GIL, syncs).

    python benchmarks/trace_streams.py t.json [--busy STREAM]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
from collections import defaultdict


def kernels(path: str) -> list[tuple[int, float, float, str]]:
    """(stream, start us, duration us, name) of every GPU kernel in a chrome trace (plain or gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    out = []
    for e in events:
        if e.get("cat") == "kernel" and e.get("ph") == "X":
            out.append((int(e.get("args", {}).get("stream", e.get("tid", -1))), float(e["ts"]), float(e["dur"]),
                        e.get("name", "")))
    return sorted(out, key=lambda k: k[1])


def windows(ks: list[tuple[int, float, float, str]], gap_us: float) -> list[tuple[float, float]]:
    """The intervals a stream is busy, kernels less than gap_us apart merged."""
    spans: list[list[float]] = []
    for _, t, d, _ in ks:
        if spans and t - spans[-1][1] <= gap_us:
            spans[-1][1] = max(spans[-1][1], t + d)
        else:
            spans.append([t, t + d])
    return [(a, b) for a, b in spans]


def inside(t: float, spans: list[tuple[float, float]]) -> bool:
    """Whether t falls in one of the sorted, disjoint spans."""
    i = bisect.bisect_right(spans, (t, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= t <= spans[i][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--busy", type=int, default=None, help="the other stream (default: the one with the most busy "
                    "time besides the sampler's)")
    ap.add_argument("--merge-us", type=float, default=200.0, help="kernels of the other stream less than this far "
                    "apart make one busy window (default 200 us)")
    args = ap.parse_args()
    ks = kernels(args.trace)
    by_stream: dict[int, list] = defaultdict(list)
    for k in ks:
        by_stream[k[0]].append(k)
    t0, t1 = ks[0][1], max(t + d for _, t, d, _ in ks)
    print(f"{len(ks)} kernels over {(t1 - t0) / 1e3:.1f} ms")
    for s, lst in sorted(by_stream.items(), key=lambda x: -len(x[1])):
        print(f"  stream {s}: {len(lst)} kernels, {sum(d for _, _, d, _ in lst) / 1e3:.1f} ms busy, "
              f"from {(lst[0][1] - t0) / 1e3:.1f} to {(lst[-1][1] + lst[-1][2] - t0) / 1e3:.1f} ms")
    sampler = max(by_stream, key=lambda s: len(by_stream[s]))
    others = [s for s in by_stream if s != sampler]
    if not others:
        print("one stream only: nothing ran beside the sampler")
        return
    other = args.busy if args.busy is not None else max(others, key=lambda s: sum(d for _, _, d, _ in by_stream[s]))
    spans = windows(by_stream[other], args.merge_us)
    busy_ms = sum(b - a for a, b in spans) / 1e3
    print(f"sampler: stream {sampler}; beside stream {other}, busy {busy_ms:.1f} ms in {len(spans)} windows")
    mine = by_stream[sampler]
    groups = {"beside": [], "alone": []}
    for i, (s, t, d, name) in enumerate(mine):
        gap = t - (mine[i - 1][1] + mine[i - 1][2]) if i else 0.0
        groups["beside" if inside(t, spans) else "alone"].append((d, max(gap, 0.0), name))
    # the same kernel names in both groups, so that the comparison is like for like
    names = {n for _, _, n in groups["beside"]} & {n for _, _, n in groups["alone"]}
    for g, lst in groups.items():
        if not lst:
            continue
        span = sum(d + gap for d, gap, _ in lst)
        print(f"  {g:6s}: {len(lst)} kernels, busy {sum(d for d, _, _ in lst) / 1e3:.1f} ms + gaps "
              f"{sum(gap for _, gap, _ in lst) / 1e3:.1f} ms ({sum(d for d, _, _ in lst) / span:.0%} busy); "
              f"median kernel {statistics.median(d for d, _, _ in lst):.1f} us, median gap "
              f"{statistics.median(gap for _, gap, _ in lst):.1f} us")
    ratios = []
    for n in names:
        a = [d for d, _, m in groups["alone"] if m == n]
        b = [d for d, _, m in groups["beside"] if m == n]
        ratios.append((sum(b) / len(b) / (sum(a) / len(a)), len(b), n))
    if ratios:
        ratios.sort(key=lambda r: -r[1])
        w = sum(r[0] * r[1] for r in ratios) / sum(r[1] for r in ratios)
        print(f"  the same kernels beside / alone: {w:.2f}x mean duration (weighted by count, {len(ratios)} names); "
              f"most frequent:")
        for r, n, name in ratios[:8]:
            print(f"    {r:5.2f}x  x{n:<6d} {name[:90]}")


if __name__ == "__main__":
    main()
