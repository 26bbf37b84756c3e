"""`r1lab speedrun`: the whole DeepSeek-R1 recipe on a small model, with a report card (pipeline.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .pipeline import PRESETS, STAGES, Preset, Speedrun, parse_stages

__all__ = ["PRESETS", "STAGES", "Preset", "Speedrun", "parse_sets", "parse_stages", "add_parser"]


# What a setting of [name, value] pairs holds, and an example of it as --set takes it.
PAIR_EXAMPLES = {"task_knobs": ("task knobs", '{"n_operands": 6}'),
                 "model_config": ("model config fields", '{"num_attention_heads": 8}')}


def parse_sets(items) -> dict:
    """--set KEY=VALUE items -> preset overrides, each converted to the field's type (task knobs: a JSON
    object); raises ValueError naming the bad item."""
    overrides = {}
    fields = Preset.__dataclass_fields__
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        want = type(getattr(PRESETS["cpu"], key))
        if want is tuple:  # task knobs or a model config: a JSON object, e.g. --set 'task_knobs={"n_operands": 6}'
            try:
                knobs = json.loads(value)
            except json.JSONDecodeError:
                knobs = None
            if not isinstance(knobs, dict):
                what, example = PAIR_EXAMPLES.get(key, PAIR_EXAMPLES["task_knobs"])
                raise ValueError(f"--set {key}: {value!r} is not a JSON object of {what}, like '{example}'")
            overrides[key] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in knobs.items())
            continue
        try:
            overrides[key] = want(value)
        except ValueError:
            raise ValueError(f"--set {key}: {value!r} is not a {want.__name__}") from None
    return overrides


def cmd_speedrun(args) -> None:
    if args.report:
        return _report_only(args)
    overrides = parse_sets(args.set)
    stages = parse_stages(args.stages) if args.stages else None
    run = Speedrun(args.out, args.preset or "cpu", device=args.device, resume=args.resume or stages is not None,
                   quiet=args.quiet, overrides=overrides)
    if args.preset is not None and run.state["preset"] != args.preset:
        raise ValueError(f"{args.out} holds a speedrun of preset {run.state['preset']!r}, not {args.preset!r}: "
                         f"drop --preset to continue it, or choose another --out")
    if overrides and run.state["stages"]:
        raise ValueError(f"--set changes a new run's settings; {args.out} already has finished stages")
    lanes = args.lanes
    if lanes is None:  # two on a CPU of two threads or more, one on a GPU
        import torch

        lanes = 2 if _device_type(args.device) == "cpu" and torch.get_num_threads() >= 2 and os.name == "posix" else 1
    elif lanes < 1:
        raise ValueError(f"--lanes {lanes}: give 1 or more")
    elif lanes > 1 and _device_type(args.device) != "cpu":
        raise ValueError(f"--lanes {lanes}: jobs run side by side on a CPU only; a GPU runs them one after another")
    elif lanes > 1 and os.name != "posix":
        raise ValueError(f"--lanes {lanes}: side-by-side jobs need a POSIX system (Linux, macOS)")
    try:
        run.run(stages, lanes=lanes)
    except KeyboardInterrupt as e:
        print(f"\n[speedrun] interrupted ({e or 'Ctrl-C'}); continue with: r1lab speedrun --out {args.out} --resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    _print_card(run.state, run.out)


def _print_card(state: dict, out) -> None:
    """The report card's headline and claims, and where the report is."""
    from .report import claims, headline

    print(headline(state))
    print("\n".join(claims(state, out)))
    print(f"report: {out / 'report.md'}")


def _report_only(args) -> None:
    """--report: report.md and its plots rewritten from what the run folder holds; nothing runs."""
    from pathlib import Path

    from .pipeline import read_state
    from .report import write_report

    given = [flag for flag, on in (("--resume", args.resume), ("--stages", args.stages), ("--set", args.set),
                                   ("--preset", args.preset), ("--lanes", args.lanes is not None)) if on]
    if given:
        raise ValueError(f"--report runs nothing, so it takes no {', '.join(given)}: it rewrites the report of "
                         f"the run folder --out as it stands")
    out = Path(args.out)
    if not (out / "speedrun.json").is_file():
        raise ValueError(f"{out} holds no speedrun (no speedrun.json): nothing to report")
    state = read_state(out / "speedrun.json")
    write_report(out, state)
    _print_card(state, out)


def _device_type(name: str) -> str:
    from .pipeline import _device

    return _device(name).type


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "speedrun", help="the whole R1 recipe on a small model (pretrain, R1-Zero, cold start, RL, rejection "
                         "sampling, distillation, evaluation) with a report card",
        description="Walk the DeepSeek-R1 pipeline on a small MoE + MLA model and a synthetic task with exact "
                    "answers: 0 pretrain, 1 R1-Zero (GRPO on the base), 2 cold-start SFT, 3 reasoning RL, "
                    "4 rejection sampling, 5 distillation into a smaller student (and a control student), 6 "
                    "evaluation of every stage; then report.md with tables and plots in the run folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: cpu (default: running sums of eight tagged one-digit numbers, a 1.4M-parameter model; "
               "R1-Zero learns to work the sum out; a 2-core CPU in about 13 minutes), gpu (the same "
               "recipe on running sums of twenty, a 54M model; one H100 in about 8 minutes), mini (every stage at toy "
               "sizes, for tests).\n"
               "Each training stage is an ordinary r1lab pretrain / sft / grpo run with its recipe.toml in its "
               "folder.\nExamples:\n  r1lab speedrun\n  r1lab speedrun --preset gpu --out runs/speedrun-gpu\n"
               "  r1lab speedrun --out runs/speedrun --resume      # after Ctrl-C or a crash\n"
               "  r1lab speedrun --out runs/speedrun --stages 5-6  # redo distillation and evaluation\n"
               "  r1lab speedrun --out runs/speedrun --report      # rewrite the report only")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="sizes and steps of a new run (default: cpu; a resumed run keeps its own)")
    p.add_argument("--out", default="runs/speedrun", metavar="DIR", help="run folder (default: runs/speedrun)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run folder: finished stages are skipped, an interrupted one continues from "
                        "its last checkpoint (after an interrupted --stages run: those stages only)")
    p.add_argument("--stages", metavar="LIST",
                   help=f"redo only these stages of an existing run folder, from scratch, e.g. 3-6 or 1,3 "
                        f"({', '.join(f'{i} {s}' for i, s in enumerate(STAGES))})")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change one preset setting for a new run, e.g. --set rl_steps=80 (repeatable); task "
                        "knobs and changes to the main model's config as JSON objects: --set 'task_knobs={\"n_operands\": 6}', "
                        "--set 'model_config={\"num_attention_heads\": 8}'")
    p.add_argument("--lanes", type=int, default=None, metavar="N",
                   help="jobs run side by side, each in a process of its own with a share of the threads "
                        "(default: 2 on a CPU with two threads or more, 1 on a GPU); the recipe and its seeds are "
                        "the same either way")
    p.add_argument("--report", action="store_true",
                   help="rewrite report.md and its plots from what the run folder holds (finished or not) and "
                        "run nothing, e.g. after a change to the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(fn=cmd_speedrun)
    return p
