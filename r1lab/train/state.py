"""Training checkpoints: written atomically, the last K kept, found again on resume.

Layout of a run folder:

    run.out/
      checkpoints/step-00000050/   state.pt (model, optimizer, scheduler, data position, RNG, recipe),
                                   recipe.toml, meta.json, manifest.json (each file's size and sha256)
                                   (a run of several ranks: sharded/ holds the model and optimizer, written by
                                   every rank with torch.distributed.checkpoint; state.pt the rest)
      checkpoints/.step-....tmp-*  a checkpoint being written (or left by a crash): never read
      metrics.jsonl, recipe.toml, final/ (HF layout), tensorboard/

A checkpoint is written into a temporary folder beside its final name, flushed to disk, then renamed: the
rename is atomic on POSIX file systems, so `step-*` folders are always complete, and a crash (or kill -9)
while writing leaves the previous checkpoint as the latest. With several ranks, all write their shards into
the same temporary folder (on a file system they share) and rank 0 renames it once DCP has finished.

Resume verifies every file against manifest.json, so a truncated file or a flipped bit is an error naming the
file, not a NaN ten steps later; given a run folder, it takes the newest checkpoint that verifies and says
which one it skipped. A full disk during a save stops the run with "no space left on <folder>" and keeps the
previous checkpoint.

A run folder is data, never code: state.pt is read with `torch.load(weights_only=True)`, and the shards of a
run of several ranks through `SafeReader`, which admits only DCP's own metadata classes in `.metadata` and plain
data (numbers, strings, lists, tensors) in the shards. A crafted file is refused before anything in it runs.
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
MANIFEST_FILE = "manifest.json"
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, incomplete, or holding more than data."""


class NoSpaceError(OSError):
    """The disk filled up while a checkpoint was written (errno ENOSPC); the previous checkpoint is kept."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every other file of a checkpoint folder, by relative path."""
    files = {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _rank_failures(e: BaseException) -> list[BaseException]:
    """The exceptions of each rank that DCP's CheckpointException carries (its `failures`: rank -> (exception,
    traceback)), or `e` itself."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return [e]
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _is_disk_full(e: BaseException) -> bool:
    """Whether an exception (or one it wraps) comes from a full disk or quota."""
    todo, seen = [e], 0
    while todo and seen < 20:
        e, seen = todo.pop(), seen + 1
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        todo += [x for x in _rank_failures(e) if x is not e] + [x for x in (e.__cause__, e.__context__) if x]
    return False


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], recipe_toml: str, keep: int,
                    meta: dict[str, Any] | None = None, sharded: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. Returns its folder.

    sharded: the model and optimizer of a run of several ranks (`r1lab.parallel.checkpoint_state`). Then every
    rank calls this (it is collective): each writes its shards with DCP into `sharded/` of one temporary folder,
    rank 0 writes `state` beside them, the manifest of every file's checksum, and renames the folder.

    Raises NoSpaceError (on every rank) when the disk fills up: the partial folder is removed, the previous
    checkpoint stays the newest.
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
    error: BaseException | None = None
    try:
        if sharded is not None:
            import torch.distributed.checkpoint as dcp  # ~0.8 s to import: only runs of several ranks need it

            dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)  # returns once every rank's shards are written
        if main:
            # Through a Python file, so that a full disk raises OSError(ENOSPC) here rather than an opaque
            # RuntimeError from torch's C++ zip writer ("unexpected pos ...", "iostream error").
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
            (tmp / "recipe.toml").write_text(recipe_toml)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
            _write_manifest(tmp)
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
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or (not several and not _is_disk_full(e)):
            raise
        error = e
    if several:  # nobody goes on (or reads it) before rank 0 has renamed it, and all stop if one rank failed
        failed: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(failed, None if error is None else "disk" if _is_disk_full(error) else repr(error))
        bad = next(((r, what) for r, what in enumerate(failed) if what), None)
        if error is None and bad is not None:
            error = (OSError(errno.ENOSPC, f"rank {bad[0]} ran out of space") if bad[1] == "disk" else
                     RuntimeError(f"checkpoint {final.name}: rank {bad[0]} could not write its part: {bad[1]}"))
        if error is not None and not _is_disk_full(error):
            raise error
    if error is not None:
        kept = [p.name for p in list_checkpoints(run_dir)]  # the failed one was never renamed
        kept_text = f"the newest checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was written yet"
        raise NoSpaceError(f"no space left on {root} while writing checkpoint {final.name}: {kept_text}; free "
                           f"some space (or lower ckpt.keep) and continue with --resume") from error
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


def _note(text: str) -> None:
    """A message for the user, from rank 0 only (every rank resolves the checkpoint to resume from)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest valid checkpoint of a run folder.

    A checkpoint folder is returned as it is (`load_checkpoint` verifies it). Of a run folder's checkpoints,
    the newest that passes `verify_checkpoint` is taken, naming on stderr any newer damaged one it skips.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if _STEP.match(path.name) or (path / "meta.json").is_file() or (path / MANIFEST_FILE).is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        where = f"--resume {run} takes the newest complete checkpoint of the run" if run else "pick another"
        raise FileNotFoundError(f"{path / STATE_FILE} is missing: {path} is not a complete checkpoint; {where}")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (neither a run folder with "
                                f"checkpoints/step-N/ folders nor a checkpoint folder holding {STATE_FILE})")
    damaged: list[str] = []
    for ck in reversed(found):
        try:
            verify_checkpoint(ck)
        except (CheckpointError, OSError) as e:
            damaged.append(str(e))
            continue
        if damaged:
            _note(f"resuming from {ck}: the newer checkpoint(s) are damaged: {'; '.join(damaged)}")
        return ck
    raise CheckpointError(f"{path}: no valid checkpoint to resume from; the newest, {found[-1].name}: "
                          f"{damaged[0]}")


def _verified_key(f: Path) -> tuple[str, int, int]:
    st = f.stat()
    return str(f.resolve()), st.st_size, st.st_mtime_ns


_VERIFIED: set[tuple[str, int, int]] = set()  # files whose sha256 matched (path, size, mtime): hashed once


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint folder: a state.pt (FileNotFoundError if not), and every file its manifest.json lists
    there with the size and sha256 written (CheckpointError naming the first that is not).

    A checkpoint written before manifests existed is only checked for a state.pt that is a whole zip archive.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path / STATE_FILE} is missing")
    if not (path / MANIFEST_FILE).is_file() and not zipfile.is_zipfile(path / STATE_FILE):
        raise CheckpointError(f"{path / STATE_FILE}: not a whole checkpoint file (truncated or corrupt)")
    _verify_manifest(path)


def _verify_manifest(path: Path) -> None:
    """Every file that `path`/manifest.json lists, of its size and sha256 (nothing to check without one)."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(v["bytes"]), str(v["sha256"])) for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: not a valid manifest ({type(e).__name__}: {e})") from None
    for rel, (size, digest) in expected.items():
        f = path / rel
        if not f.resolve().is_relative_to(path.resolve()):
            raise CheckpointError(f"{manifest}: {rel!r} is outside the checkpoint folder")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST_FILE})")
        key = _verified_key(f)
        if key in _VERIFIED:
            continue
        if key[1] != size:
            raise CheckpointError(f"{f}: size {key[1]} bytes, but {size} were written (truncated or corrupt)")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: sha256 differs from the one written in {MANIFEST_FILE} (the file is "
                                  f"corrupt)")
        _VERIFIED.add(key)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint folder (tensors on the CPU), after `verify_checkpoint`."""
    path = Path(path)
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        if path.parent.name != "checkpoints":
            raise
        raise CheckpointError(f"{e}; --resume {path.parent.parent} takes the newest valid checkpoint of the run "
                              f"instead") from None
    file = path / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{file}: cannot read the checkpoint ({e}); it may be truncated or corrupt") from None


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint was written by several ranks (model and optimizer in DCP shards)."""
    return (Path(path) / SHARDED_DIR).is_dir()


# ---------------------------------------------------------------------- reading DCP shards safely
@functools.cache
def _metadata_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP `.metadata` file may name: DCP's metadata classes and the torch and pathlib types
    they hold (what torch 2.11-2.13 write, as pickletools lists them). Constructing any of these with any
    arguments runs no code of the file's choosing."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
        if hasattr(metadata, name)}
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed.update({("torch", name): v for name, v in vars(torch).items()
                    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))})
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by name
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for module in ("pathlib", "pathlib._local"):  # StorageMeta.checkpoint_id (pathlib._local: Python 3.13)
        for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
            allowed[(module, name)] = getattr(pathlib, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _metadata_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not checkpoint metadata")
        return found


@functools.cache
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader  # ~0.8 s to import: only sharded checkpoints
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeReader(FileSystemReader):
        """DCP's file-system reader without its two ways of running a checkpoint's code: `.metadata` goes
        through `_MetadataUnpickler` (DCP's `pickle.load` would run any callable the file names), and the
        non-tensor items of the shards (optimizer hyperparameters, DCP's BYTE_IO items) must load with
        `torch.load(weights_only=True)` before DCP's planner loads them (with weights_only=False)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")  # torch >= 2.9 may ask for a rank's own metadata file
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            where = self.fs.concat_path(self.path, name)
            with self.fs.create_stream(where, "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{where}: refusing to read it: {e}") from None
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{where}: refusing to read it: it holds a {type(md).__name__}, not DCP "
                                      f"metadata")
            for info in (md.storage_data or {}).values():  # shard files are plain names inside this folder
                rel = getattr(info, "relative_path", None)
                if not isinstance(rel, str) or rel in ("", ".", "..") or Path(rel).name != rel:
                    raise CheckpointError(f"{where}: refusing to read it: shard file {rel!r} is not a file "
                                          f"name inside {self.path}")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan, planner):
            return super().read_data(plan, _PlainBytes(planner, self.path, LoadItemType.BYTE_IO))

    return SafeReader


class _PlainBytes:
    """A load planner's stand-in that admits only plain data in a shard's non-tensor items."""

    def __init__(self, planner, where, byte_io):
        self._planner, self._where, self._byte_io = planner, where, byte_io

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.getvalue()
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever the reason, these bytes are not plain data
            named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's words for the callable it refused
            why = f"it names {named[1]}" if named else f"{type(e).__name__}"
            raise CheckpointError(f"{self._where}: refusing {read_item.dest_index.fqn}: it is not plain data "
                                  f"({why})") from None
        # The same bytes just loaded with weights_only=True, so DCP's own (weights_only=False) load of them
        # can only rebuild what that load admitted.
        self._planner.load_bytes(read_item, io.BytesIO(data))


def safe_reader(folder: str | Path):
    """A DCP storage reader of `folder` that refuses a crafted `.metadata` or shard (`SafeReader`)."""
    return _safe_reader_class()(folder)


def _dcp_load(state: dict[str, Any], where: Path, planner=None, load=None) -> None:
    """`dcp.load` through `SafeReader`, with its refusals as one clear CheckpointError.

    The metadata is read once before DCP does (DCP would fold a refusal into an AssertionError of its own);
    a refused shard item comes back from DCP inside a CheckpointException, per rank."""
    import torch.distributed.checkpoint as dcp  # ~0.8 s to import: only sharded checkpoints need it

    safe_reader(where).read_metadata()
    try:
        if load is None:
            dcp.load(state, storage_reader=safe_reader(where), planner=planner)
        else:  # one process, all of it
            load(state, storage_reader=safe_reader(where), planner=planner, no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        refused = next((exc for exc in _rank_failures(e) if isinstance(exc, CheckpointError)), None)
        if refused is not None:
            raise CheckpointError(str(refused)) from None
        raise


def load_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (`r1lab.parallel.checkpoint_state` of this run's model and optimizer) from a sharded
    checkpoint, in place; DCP reshards to this run's number of ranks (collective). Every model entry must be
    there; optimizer entries may not (a parameter that never had a gradient, such as the MTP module's while its
    loss is off, has no AdamW state): those keep the fresh state the template was given."""
    from torch.distributed.checkpoint import DefaultLoadPlanner  # ~0.8 s to import: only sharded checkpoints

    _verify_manifest(Path(path))
    where = Path(path) / SHARDED_DIR
    _dcp_load({"model": state["model"]}, where)
    _dcp_load({"optim": state["optim"]}, where, planner=DefaultLoadPlanner(allow_partial_load=True))


def load_sharded_full(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's model and optimizer as full tensors on the CPU, in one process:
    {"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]}}."""
    # DCP's own converter (dcp_to_torch_save) in memory and with our reader: its private loader fills an empty
    # state dict from the metadata (the public dcp.load only fills the keys it is given).
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _verify_manifest(Path(path))
    full: dict[str, Any] = {}
    _dcp_load(full, Path(path) / SHARDED_DIR, planner=_EmptyStateDictLoadPlanner(), load=_load_state_dict)
    return full


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
