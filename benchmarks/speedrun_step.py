"""Time a speedrun pretraining step at one and at two threads, alone and two processes side by side: the
measurement behind the speedrun's lanes (README, "The speedrun"; benchmarks/LOG.md, eighteenth session).

    python benchmarks/speedrun_step.py runs/speedrun            # base and student, 15 steps after 3
    python benchmarks/speedrun_step.py runs/speedrun --who base --steps 30
    python benchmarks/speedrun_step.py runs/speedrun --update 0 4096   # a reasoning-RL update per micro-batching

The run folder must hold a finished stage 0 (its data/ and 0-pretrain/*/recipe.toml); --update also stages 2 and 3
(the cold start's model, reasoning RL's recipe). Nothing is written there: each timing trains in a temporary
folder. --update samples one step's rollouts from the cold start, then times GRPO updates on that same batch at
one thread for each grpo.micro_tokens given (0: the recipe's train.batch_size rows per micro-batch).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_steps(run: Path, who: str, threads: int, steps: int, warmup: int = 3) -> float:
    """Seconds per pretraining step of `who` (base or student) on `threads` threads, in this process."""
    import torch

    from r1lab.train.loop import Trainer, build_model, resolve_device
    from r1lab.train.pretrain import build_data
    from r1lab.train.recipe import load_recipe

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        rec = load_recipe(str(run / "0-pretrain" / who / "recipe.toml"), "pretrain",
                          {"run.out": tmp, "data.train": [str(run / "data/corpus.jsonl")],
                           "data.tokenizer": str(run / "data/tokenizer")})
        device, _ = resolve_device(rec)
        torch.manual_seed(0)
        model = build_model(rec, device)
        data, tok = build_data(rec, model)
        trainer = Trainer(rec, model, data, tok, quiet=True)
        for _ in range(warmup):
            trainer.train_step(trainer.next_batches())
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(trainer.next_batches())
        return (time.perf_counter() - t0) / steps


def time_updates(run: Path, micro_tokens: int, steps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `steps` GRPO updates (after `warmup`) on one sampled batch of reasoning RL, one thread."""
    import torch

    from r1lab.train import grpo
    from r1lab.train.loop import build_model, setup
    from r1lab.train.pretrain import load_data_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r = grpo.load_grpo_recipe(str(run / "3-reasoning-rl" / "recipe.toml"), {
            "run.out": tmp, "model.init": str(run / "2-cold-start" / "final"),
            "data.tokenizer": str(run / "data/tokenizer"), "data.train": [str(run / "data/prompts.jsonl")],
            "grpo.micro_tokens": micro_tokens})
        device, dtype = setup(r)
        model = build_model(r, device)
        trainer = grpo.GRPOTrainer(r, model, load_data_tokenizer(r), grpo.load_prompt_rows(r), dtype=dtype,
                                   quiet=True)
        batch = trainer._sample().batch
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            trainer._update(batch)
            times.append(time.perf_counter() - t0)
        return times[warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a speedrun folder with stage 0 done")
    p.add_argument("--who", nargs="+", default=["base", "student"], choices=("base", "student"))
    p.add_argument("--steps", type=int, default=15, help="timed steps after 3 warm-up steps (default 15)")
    p.add_argument("--update", type=int, nargs="+", metavar="MICRO_TOKENS",
                   help="time reasoning RL's GRPO update instead, at each of these grpo.micro_tokens (0: rows)")
    p.add_argument("--one", nargs=2, metavar=("WHO", "THREADS"), help=argparse.SUPPRESS)  # a side-by-side child
    args = p.parse_args()
    if args.one:
        print(f"{time_steps(args.run, args.one[0], int(args.one[1]), args.steps):.3f}")
        return
    if args.update:
        for m in args.update:
            times = time_updates(args.run, m, args.steps)
            print(f"micro_tokens {m}: update {sorted(times)[len(times) // 2]:.3f} s median of {len(times)} "
                  f"({min(times):.3f}-{max(times):.3f}) at one thread", flush=True)
        return
    for who in args.who:
        alone = {n: time_steps(args.run, who, n, args.steps) for n in (1, 2)}
        cmd = [sys.executable, __file__, str(args.run), "--steps", str(args.steps), "--one", who, "1"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        pair = [float(proc.communicate()[0]) for proc in procs]
        print(f"{who}: {alone[1]:.3f} s/step at one thread, {alone[2]:.3f} at two; two one-thread processes side "
              f"by side: {pair[0]:.3f} and {pair[1]:.3f} s/step (work per second vs two threads: "
              f"{2 * alone[2] / max(pair):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
