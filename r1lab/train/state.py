"""Training checkpoints: written atomically, the last K kept, found again on resume.

Layout of a run folder:

    run.out/
      checkpoints/step-00000050/   state.pt (model, optimizer, scheduler, data position, RNG, recipe),
                                   recipe.toml, meta.json
                                   (a run of several ranks: sharded/ holds the model and optimizer, written by
                                   every rank with torch.distributed.checkpoint; state.pt the rest)
      checkpoints/.step-....tmp-*  a checkpoint being written (or left by a crash): never read
      metrics.jsonl, recipe.toml, final/ (HF layout), tensorboard/

A checkpoint is written into a temporary folder beside its final name, flushed to disk, then renamed: the
rename is atomic on POSIX file systems, so `step-*` folders are always complete, and a crash (or kill -9)
while writing leaves the previous checkpoint as the latest. With several ranks, all write their shards into
the same temporary folder (on a file system they share) and rank 0 renames it once DCP has finished.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every random generator the run may draw from (data order has its own seeded generator)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving process; a run resumed on a machine with fewer GPUs sets those it has
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], recipe_toml: str, keep: int,
                    meta: dict[str, Any] | None = None, sharded: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. Returns its folder.

    sharded: the model and optimizer of a run of several ranks (`r1lab.parallel.checkpoint_state`). Then every
    rank calls this (it is collective): each writes its shards with DCP into `sharded/` of one temporary folder,
    rank 0 writes `state` beside them and renames the folder.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    several = sharded is not None and dist.is_initialized() and dist.get_world_size() > 1
    main = not several or dist.get_rank() == 0
    tmp = None
    if main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    if several:  # rank 0 named the folder: tell the others
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        tmp = box[0]
    try:
        if sharded is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)  # returns once every rank's shards are written
        if main:
            torch.save(state, tmp / STATE_FILE)
            (tmp / "recipe.toml").write_text(recipe_toml)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
            for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
                _fsync(f)
            _fsync(tmp)
            if final.exists():  # a step saved again (e.g. Ctrl-C right after a periodic save): swap it out
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=root))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync(root)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if several:
        dist.barrier()  # nobody goes on (or reads it) before rank 0 has renamed it
    if main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (expected {path}/checkpoints/step-N/ or a "
                                f"checkpoint folder holding {STATE_FILE})")
    return found[-1]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint folder (tensors on the CPU)."""
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint ({e}); it may be truncated or corrupt") from None


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint was written by several ranks (model and optimizer in DCP shards)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def load_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (`r1lab.parallel.checkpoint_state` of this run's model and optimizer) from a sharded
    checkpoint, in place; DCP reshards to this run's number of ranks (collective). Every model entry must be
    there; optimizer entries may not (a parameter that never had a gradient, such as the MTP module's while its
    loss is off, has no AdamW state): those keep the fresh state the template was given."""
    import torch.distributed.checkpoint as dcp

    where = Path(path) / SHARDED_DIR
    dcp.load({"model": state["model"]}, checkpoint_id=where)
    dcp.load({"optim": state["optim"]}, checkpoint_id=where, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))


def load_sharded_full(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's model and optimizer as full tensors on the CPU, in one process:
    {"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:  # DCP's public converter goes through a file
        dcp_to_torch_save(Path(path) / SHARDED_DIR, Path(d) / STATE_FILE)
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def remove_after(run_dir: str | Path, step: int) -> list[Path]:
    """Delete the run's checkpoints newer than `step` (a run resumed from an older checkpoint replaces them)."""
    gone = [p for p in list_checkpoints(run_dir) if int(_STEP.match(p.name).group(1)) > step]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def remove_partial(run_dir: str | Path) -> None:
    """Delete temporary folders left by a crash during a checkpoint write."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
