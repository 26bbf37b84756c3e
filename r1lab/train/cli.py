"""Command-line adapters: `r1lab pretrain` and `r1lab sft` (register with `add_parsers(subparsers)`).

    r1lab pretrain --recipe recipes/pretrain-tiny.toml --optim.lr 1e-3 --train.steps 200
    r1lab pretrain --resume runs/pretrain-tiny          # continue a stopped run where it left off
    torchrun --nproc-per-node 8 -m r1lab.cli pretrain --recipe ... --parallel.ep 8    # on 8 GPUs
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .recipe import Recipe, add_recipe_arguments, load_recipe, overrides_from_args

DESCRIPTIONS = {
    "pretrain": ("train a model on plain text (next-token prediction, packed documents)",
                 "Pretrain (or continue pretraining) on .txt / JSONL {\"text\"} / {\"input_ids\"} files, packed into "
                 "fixed-length rows with document boundaries respected."),
    "sft": ("supervised fine-tuning on chat data (loss on the final assistant turn, reasoning included)",
            "Fine-tune on JSONL conversations ({\"messages\": [...]} or {\"prompt\", \"response\"}) rendered with the "
            "R1 chat template; the loss covers the final assistant reply only, its <think> block included."),
}

EPILOG = """\
Every recipe key above can be set in the TOML file ([table] key = value) or here as --table.key VALUE
(kebab- or snake_case). Precedence: defaults < --recipe file < command line. Lists on the command line are
comma-separated, tables are JSON. Paths (data.train, data.tokenizer, model.init) in a recipe file are
relative to the file, on the command line (and run.out everywhere) to the working directory.

--resume continues from the newest checkpoint of a run folder (or a given checkpoint folder) with the recipe
stored in the checkpoint; options given here still override it (e.g. --train.steps to extend the run).
Ctrl-C finishes the current step and saves a checkpoint; a second Ctrl-C quits at once.

Under torchrun (torchrun --nproc-per-node N -m r1lab.cli COMMAND ...) the model is sharded with FSDP2 (and
expert parallelism with --parallel.ep), batch sizes are split over the ranks, rank 0 logs, and checkpoints
are sharded; --resume works with any number of ranks, one process included.
"""

# The trainers that run under torchrun (the others refuse rather than train N copies side by side).
DISTRIBUTED = ("pretrain", "sft", "grpo", "rm")


def add_trainer_parser(subparsers, kind: str, help: str, description: str, run: str,
                       recipe_cls: type[Recipe] = Recipe, epilog: str = EPILOG, prepare=None) -> argparse.ArgumentParser:
    """Register one trainer's subcommand: --recipe, --resume, --print-recipe and every recipe key.

    run: "module:function" called as run(recipe, resume_checkpoint) (imported only when the command runs);
    prepare: optional callable(recipe, args) for the command's own flags (GRPO's --reward)."""
    p = subparsers.add_parser(kind, help=help, description=textwrap.fill(description, 110), epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", metavar="TOML", help="recipe file (default: built-in defaults only)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from the newest checkpoint in DIR (a run folder or a checkpoint folder); "
                        "without DIR, in run.out")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as TOML and exit")
    add_recipe_arguments(p, kind, recipe_cls)
    p.set_defaults(fn=cmd_train, kind=kind, recipe_cls=recipe_cls, run=run, prepare=prepare)
    return p


def add_parsers(subparsers) -> None:
    """Register the `pretrain` and `sft` subcommands on an argparse subparsers object."""
    for kind, (short, long) in DESCRIPTIONS.items():
        add_trainer_parser(subparsers, kind, short, long, run=f"r1lab.train.{kind}:run")


def resolve(args, kind: str, recipe_cls: type[Recipe] = Recipe) -> tuple[Recipe, Path | None]:
    """The recipe to run and the checkpoint to resume from (None for a fresh run)."""
    from . import state

    overrides = overrides_from_args(args)
    if args.resume is None:
        return load_recipe(args.recipe, kind, overrides, recipe_cls), None
    where = Path(args.resume) if args.resume else Path(load_recipe(args.recipe, kind, overrides, recipe_cls).run.out)
    ck = state.find_checkpoint(where)
    saved_kind = _saved_kind(ck)
    if saved_kind != kind:
        raise ValueError(f"{ck} is a checkpoint of `r1lab {saved_kind}`, not `r1lab {kind}`")
    recipe = load_recipe(ck / "recipe.toml", kind, overrides, recipe_cls)
    if "run.out" not in overrides:
        recipe.run.out = str(ck.parent.parent)  # the run folder the checkpoint lives in
    return recipe, ck


def _saved_kind(ck: Path) -> str:
    import json

    try:
        return json.loads((ck / "meta.json").read_text()).get("kind", "pretrain")
    except (OSError, ValueError):
        return "pretrain"


def cmd_train(args) -> None:
    import importlib
    import os

    import torch.distributed as dist

    from .loop import NonFiniteLoss

    kind = args.kind
    recipe, resume = resolve(args, kind, args.recipe_cls)
    if args.prepare is not None:
        args.prepare(recipe, args)
    if args.print_recipe:
        print(recipe.to_toml(), end="")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and kind not in DISTRIBUTED:
        raise ValueError(f"`r1lab {kind}` does not run under torchrun yet; run it as one process")
    module, _, fn = args.run.partition(":")
    run = getattr(importlib.import_module(module), fn)
    joined = dist.is_initialized()  # a caller's process group stays; one the trainer joined is left at the end
    main = os.environ.get("RANK", "0") == "0"  # every rank stops alike: one report is enough
    try:
        run(recipe, resume)
    except NonFiniteLoss as e:
        if main:
            print(f"r1lab {kind}: stopped: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except KeyboardInterrupt as e:
        if main:
            print(f"r1lab {kind}: interrupted" + (f": {e}" if str(e) else " (no checkpoint saved)"), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if not joined and dist.is_initialized():
            dist.destroy_process_group()
