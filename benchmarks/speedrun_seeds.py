"""Run `r1lab speedrun` for several seeds (and setting variants) side by side, then summarise R1-Zero's signature
over them: each claim of the report per run, and per variant the mean and range over the seeds.

Each run gets its own cores (`--cores`, default 2: a 2-core laptop each) pinned with sched_setaffinity and
OMP_NUM_THREADS set to match, so runs in parallel on a many-core host do not slow each other down much.

    python benchmarks/speedrun_seeds.py --seeds 0 1 2 --out runs/seeds
    python benchmarks/speedrun_seeds.py --seeds 0 1 --variant more-checks:check_share=0.5
    python benchmarks/speedrun_seeds.py --out runs/seeds --summarize      # the table again, nothing run
    python benchmarks/speedrun_seeds.py --seeds 0 1 --stop-after 540     # stopped with a checkpoint after 9 min,
    python benchmarks/speedrun_seeds.py --seeds 0 1 --resume              # ... then continued
    python benchmarks/speedrun_seeds.py --summarize --runs runs/a runs/b  # any run folders, printed only
    python benchmarks/speedrun_seeds.py --seeds 0 1 2 --device cuda      # small models: several share one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1lab.speedrun.report import _samples, accuracy_by_type, signature_claims, worked_accuracy  # noqa: E402

STAGES = ("base", "r1-zero", "cold-start", "reasoning-rl", "student-distill", "student-control")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, _, sets = spec.partition(":")
    return name, [s for s in sets.split(",") if s]


def run_command(args, folder: Path, seed: int, sets: list[str]) -> list[str]:
    """The speedrun command of one run. With --resume, a folder that holds a run continues it on its own
    settings and stages (an interrupted --stages run continues those stages: passing --stages again would redo
    them from scratch); any other folder starts a new run."""
    cmd = [sys.executable, "-m", "r1lab.cli", "speedrun", "--preset", args.preset, "--out", str(folder), "--device",
           getattr(args, "device", "cpu"), "--quiet"]
    if args.resume and (folder / "speedrun.json").is_file():
        return cmd + ["--resume"]
    for s in [f"seed={seed}", *args.set, *sets]:
        cmd += ["--set", s]
    return cmd + (["--stages", args.stages] if args.stages else [])


def launch(args) -> bool:
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    jobs = [(name, sets, seed) for name, sets in variants for seed in args.seeds]
    cpus = sorted(os.sched_getaffinity(0))
    slots = [cpus[i:i + args.cores] for i in range(0, len(cpus) - args.cores + 1, args.cores)]
    slots = slots[:args.parallel] if args.parallel else slots
    print(f"{len(jobs)} runs, {len(slots)} at a time, {args.cores} cores each", flush=True)
    running: list[tuple[subprocess.Popen, list[int], str, float]] = []
    stopped: set[str] = set()
    args.out.mkdir(parents=True, exist_ok=True)
    while jobs or running:
        while jobs and slots:
            name, sets, seed = jobs.pop(0)
            cores = slots.pop(0)
            folder = args.out / f"{name}-s{seed}"
            cmd = run_command(args, folder, seed, sets)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.cores), "MKL_NUM_THREADS": str(args.cores)}
            log = open(args.out / f"{name}-s{seed}.log", "a" if args.resume else "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=lambda c=tuple(cores): os.sched_setaffinity(0, c))
            running.append((proc, cores, folder.name, time.time()))
            print(f"start {folder.name} on cores {cores}: {' '.join(cmd[3:])}", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, cores, name, t0 = item
            if args.stop_after and time.time() - t0 > args.stop_after and proc.poll() is None and name not in stopped:
                proc.send_signal(signal.SIGINT)  # the speedrun saves a checkpoint and exits; --resume continues it
                stopped.add(name)
                print(f"stop {name} after {args.stop_after:.0f} s (continue with --resume)", flush=True)
            if proc.poll() is not None:
                running.remove(item)
                slots.append(cores)
                wall = time.time() - t0
                walls = args.out / name / "wall_seconds.txt"
                if walls.parent.is_dir():  # summed over the calls of a stopped and resumed run
                    before = float(walls.read_text()) if args.resume and walls.is_file() else 0.0
                    walls.write_text(f"{before + wall:.0f}\n")
                print(f"done {name}: rc {proc.returncode}, {wall:.0f} s", flush=True)
    return bool(stopped)


def run_folders(folders: list[Path]) -> list[Path]:
    """Each folder that is a run, and the runs inside each folder that holds runs."""
    runs = []
    for f in folders:
        runs += [f] if (f / "speedrun.json").is_file() else sorted(
            p for p in f.iterdir() if (p / "speedrun.json").is_file())
    return runs


def endpoints(runs: list[Path]) -> str:
    """Where the RL models end against what the base can do when it works the sum out: pass@1 of R1-Zero, the
    cold start and reasoning RL beside the accuracy of the base's worked answers."""
    lines = ["| run | base's worked answers right (n) | R1-Zero | cold start | reasoning RL | RL - cold | "
             "R1-Zero - base worked | RL - base worked |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        recs = {k: _samples(run, k) for k in ("base", "r1-zero", "cold-start", "reasoning-rl")}
        if not all(recs.values()) or (w := worked_accuracy(accuracy_by_type(recs["base"]))) is None:
            continue
        acc = {k: 100 * sum(r["correct"] for r in v) / len(v) for k, v in recs.items()}
        lines.append(f"| {run.parent.name}/{run.name} | {100 * w[0]:.1f} ({w[1]}) | {acc['r1-zero']:.1f} | "
                     f"{acc['cold-start']:.1f} | {acc['reasoning-rl']:.1f} | "
                     f"{acc['reasoning-rl'] - acc['cold-start']:+.1f} | {acc['r1-zero'] - 100 * w[0]:+.1f} | "
                     f"{acc['reasoning-rl'] - 100 * w[0]:+.1f} |")
    return "\n".join(lines)


def summarize(out: Path | list[Path]) -> str:
    runs = run_folders(out if isinstance(out, list) else [out])
    rows, by_variant = [], {}
    for run in runs:
        claims = {c["key"]: c for c in signature_claims(run)}
        acc = {k: (sum(r["correct"] for r in recs) / len(recs) if (recs := _samples(run, k)) else None) for k in STAGES}
        base = _samples(run, "base")
        zero = _samples(run, "r1-zero")
        wall = (run / "wall_seconds.txt").read_text().strip() if (run / "wall_seconds.txt").is_file() else "?"
        if wall == "?":  # a run not launched here: the clock its speedrun.json kept (all its runs, reruns included)
            clock = json.loads((run / "speedrun.json").read_text()).get("wall_seconds")
            wall = f"{clock:.0f}" if clock is not None else "?"
        rec = {"run": run.name, "wall_s": wall, **{f"pass1_{k}": v for k, v in acc.items()}}
        if base and zero:
            rec["check_base"] = 100 * accuracy_by_type(base)["checked"]["share"]
            rec["check_zero"] = 100 * accuracy_by_type(zero)["checked"]["share"]
        for key, c in claims.items():
            rec[key] = c
        rows.append(rec)
        by_variant.setdefault(run.name.rsplit("-s", 1)[0], []).append(rec)

    def cell(c) -> str:
        if not isinstance(c, dict):
            return "-"
        if "z" not in c:
            return f"{c['value']:.1f}% {'(met)' if c['met'] else '(NOT met)'}"
        v = f"{c['value']:.2f}x, " if c["key"] == "zero_length" else (
            f"{c['value']:.1f}%, " if "value" in c else "")
        tgt = "" if c.get("met") is None else (" met" if c["met"] else " NOT met")
        return f"{v}{c['diff']:+.1f}{c['unit'].strip()[:3]} {c['z']:.1f} SE{tgt}"

    keys = ("base_reasoning_share", "base_gap", "zero_reasoning_share", "zero_length", "zero_pass1", "zero_self_check",
            "rl_over_cold_start", "distill_over_control")
    lines = ["| run | wall s | pass@1 base / R1-Zero / cold / RL / distilled / control | " + " | ".join(keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in rows:
        p = " / ".join("-" if r[f"pass1_{k}"] is None else f"{100 * r[f'pass1_{k}']:.1f}" for k in STAGES)
        lines.append(f"| {r['run']} | {r['wall_s']} | {p} | " + " | ".join(cell(r.get(k)) for k in keys) + " |")
    lines += ["", "Per variant, mean [min, max] over seeds:", ""]
    for name, recs in by_variant.items():
        def stat(vals):
            vals = [v for v in vals if v is not None]
            return f"{sum(vals) / len(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]" if vals else "-"
        parts = [f"pass@1 base {stat([100 * r['pass1_base'] for r in recs if r['pass1_base'] is not None])}",
                 f"R1-Zero {stat([100 * r['pass1_r1-zero'] for r in recs if r['pass1_r1-zero'] is not None])}",
                 f"reasoning share base {stat([r['base_reasoning_share']['value'] for r in recs if 'base_reasoning_share' in r])}",
                 f"R1-Zero {stat([r['zero_reasoning_share']['value'] for r in recs if 'zero_reasoning_share' in r])}",
                 f"length ratio {stat([r['zero_length']['value'] for r in recs if 'zero_length' in r])}",
                 f"self-check share base {stat([r.get('check_base') for r in recs])} -> "
                 f"R1-Zero {stat([r.get('check_zero') for r in recs])}",
                 f"RL - cold start {stat([r['rl_over_cold_start']['diff'] for r in recs if 'rl_over_cold_start' in r])} pts",
                 f"distilled - control {stat([r['distill_over_control']['diff'] for r in recs if 'distill_over_control' in r])} pts",
                 f"wall s {stat([float(r['wall_s']) for r in recs if r['wall_s'] != '?'])}"]
        lines.append(f"- **{name}** ({len(recs)} seeds): " + "; ".join(parts))
    lines += ["", "Where RL ends, against the base's worked answers:", "", endpoints(runs)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/seeds"))
    ap.add_argument("--cores", type=int, default=2, help="cores (and threads) per run")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default), or cuda: every run on the one GPU, each still pinned to its --cores")
    ap.add_argument("--parallel", type=int, default=0, help="runs at a time (default: as many as the cores allow)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:KEY=VALUE,KEY=VALUE, a group of runs over the seeds (repeatable)")
    ap.add_argument("--stages", default="", help="only these stages of each run, e.g. 0,1,6 (base and R1-Zero)")
    ap.add_argument("--stop-after", type=float, default=0, metavar="S",
                    help="interrupt each run S seconds after it starts (it saves a checkpoint; for machines lent in "
                         "time-limited calls); continue with --resume (default 0: never)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the runs whose folders exist (their own settings; --set is ignored for them), "
                         "start the others")
    ap.add_argument("--summarize", action="store_true", help="only print the summary of the runs in --out")
    ap.add_argument("--runs", type=Path, nargs="+", metavar="DIR",
                    help="with --summarize: these run folders (or folders of runs) instead of --out's, printed only")
    args = ap.parse_args()
    if args.runs:
        print(summarize(args.runs))
        return
    if not args.summarize and launch(args):
        print("runs stopped: continue them with the same command and --resume")
        return
    text = summarize(args.out)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
