"""Run folders from elsewhere and damaged run folders (issue 24, findings 1, 9 and 10).

A run folder may hold data (tensors, numbers, strings), never code: a crafted `sharded/.metadata` or a crafted
non-tensor item in a DCP shard is refused before anything in it runs. A damaged newest checkpoint (truncated,
empty, a flipped bit: each file's sha256 is in the checkpoint's manifest.json) makes --resume fall back to the
newest valid one; a full disk during a save stops the run with one line and keeps the previous checkpoint.
"""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from r1lab.cli import main as cli_main
from r1lab.train import state
from test_train import REPO, SUBPROCESS_ENV, corpus, losses, small_args

STEPS = 6  # checkpoints at steps 3 and 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, machine-independent results


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def args(d: Path, out: str, **extra) -> list[str]:
    return small_args(d / "corpus.jsonl", d / out, steps=STEPS, **extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 (copy it before changing it)."""
    d = tmp_path_factory.mktemp("runs")
    corpus(d / "corpus.jsonl")
    assert cli_main(args(d, "run")) == 0
    return d


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copy(finished / "corpus.jsonl", tmp_path)
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------- 1: no code from a run folder
def sharded_checkpoint(folder: Path, optim_extra=None) -> Path:
    """A one-process DCP checkpoint in `folder`/sharded, the layout a run of several ranks writes."""
    st = {"model": {"w": torch.arange(4.0)}, "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    if optim_extra is not None:
        st["optim"]["extra"] = optim_extra
    dcp.save(st, checkpoint_id=folder / state.SHARDED_DIR, no_dist=True)
    return folder


def test_real_sharded_checkpoint_reads_back(tmp_path):
    ck = sharded_checkpoint(tmp_path)
    full = state.load_sharded_full(ck)
    assert torch.equal(full["model"]["w"], torch.arange(4.0))
    assert full["optim"]["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    template = {"model": {"w": torch.zeros(4)}, "optim": {"param_groups": [{"lr": 0.0, "params": ["x"]}]}}
    state.load_sharded(ck, template)
    assert torch.equal(template["model"]["w"], torch.arange(4.0))
    assert template["optim"]["param_groups"][0]["lr"] == 0.1


def test_crafted_metadata_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    ck = sharded_checkpoint(tmp_path)
    (ck / state.SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    for load in (lambda: state.load_sharded_full(ck),
                 lambda: state.load_sharded(ck, {"model": {}, "optim": {}})):
        with pytest.raises(ValueError, match=r"sharded/\.metadata: refusing .*(posix|os)\.system"):
            load()
    assert not marker.exists()


def test_crafted_non_tensor_item_in_a_shard_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    ck = sharded_checkpoint(tmp_path, optim_extra=RunsCode(marker))  # DCP pickles non-tensors into the shard
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"sharded: refusing optim\.extra"):
        state.load_sharded_full(ck)
    assert not marker.exists()


def test_resume_of_a_crafted_run_folder_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    marker = tmp_path / "ran"
    ck = state.list_checkpoints(run)[-1]
    sharded_checkpoint(ck)
    (ck / state.SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    assert cli_main(args(tmp_path, "run") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and ".metadata" in err and not marker.exists()


# ---------------------------------------------------------------------- 9: damaged checkpoints
def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "bit flip":  # a byte in the middle: tensor data, which torch.load alone reads without complaint
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif how == "missing":
        file.unlink()


def test_checkpoint_manifest_holds_each_file_checksum(finished):
    ck = state.list_checkpoints(finished / "run")[-1]
    files = json.loads((ck / state.MANIFEST_FILE).read_text())["files"]
    assert set(files) == {"state.pt", "recipe.toml", "meta.json"}
    import hashlib
    assert files["state.pt"]["sha256"] == hashlib.sha256((ck / "state.pt").read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["truncated", "empty", "bit flip", "missing"])
def test_resume_falls_back_to_the_newest_valid_checkpoint(finished, tmp_path, capsys, how):
    run = copy_run(finished, tmp_path)
    ref = losses(run)
    older, newest = state.list_checkpoints(run)
    damage(newest / state.STATE_FILE, how)
    assert state.find_checkpoint(run) == older
    err = capsys.readouterr().err
    assert str(newest) in err and str(older) in err, err
    assert cli_main(args(tmp_path, "run") + ["--resume"]) == 0
    assert losses(run) == ref  # steps 4-6 again, bitwise as before
    assert state.find_checkpoint(run) == newest  # rewritten, valid again
    state.load_checkpoint(newest)


@pytest.mark.parametrize("how", ["truncated", "bit flip"])
def test_a_damaged_checkpoint_folder_is_an_error_naming_the_file(finished, tmp_path, how):
    run = copy_run(finished, tmp_path)
    newest = state.list_checkpoints(run)[-1]
    damage(newest / state.STATE_FILE, how)
    with pytest.raises(ValueError, match=rf"{newest / state.STATE_FILE}: .*(size|sha256)"):
        state.load_checkpoint(newest)


def test_missing_state_names_the_file_that_is_missing(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    older, newest = state.list_checkpoints(run)
    damage(newest / state.STATE_FILE, "missing")
    with pytest.raises(FileNotFoundError) as e:
        state.find_checkpoint(newest)
    msg = str(e.value)
    assert f"{newest / state.STATE_FILE} is missing" in msg and str(run) in msg
    assert "checkpoints/step-00000006/checkpoints" not in msg  # no made-up path
    damage(older / state.STATE_FILE, "empty")
    with pytest.raises(ValueError, match=rf"{run}: no valid checkpoint .*{newest.name}"):
        state.find_checkpoint(run)


# ---------------------------------------------------------------------- 10: disk full during a save
def test_disk_full_while_saving_keeps_the_previous_checkpoint(finished, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if obj.get("step") == 6:  # the second checkpoint: part of it reaches the disk, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    corpus(tmp_path / "corpus.jsonl")
    monkeypatch.setattr(torch, "save", full_disk)
    assert cli_main(args(tmp_path, "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    root = tmp_path / "run" / "checkpoints"
    assert len(err) == 1 and f"no space left on {root}" in err[0] and "step-00000003" in err[0], err
    assert [p.name for p in state.list_checkpoints(tmp_path / "run")] == ["step-00000003"]
    assert not list(root.glob(".step-*"))  # the partial write is gone
    monkeypatch.setattr(torch, "save", real_save)
    assert cli_main(args(tmp_path, "run") + ["--resume"]) == 0
    assert losses(tmp_path / "run") == losses(finished / "run")


def _failing_save_on_rank0(rank: int, world: int, run: str, kind: str) -> None:
    """Both ranks save one sharded checkpoint; rank 0's state.pt fails (a full disk, or another error)."""
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if not str(getattr(f, "name", "")).endswith(state.STATE_FILE):  # DCP's shards are written as usual
            return real_save(obj, f, *a, **k)
        if kind == "disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise TypeError("cannot pickle 'generator' object")

    torch.save = failing if rank == 0 else real_save
    try:
        state.save_checkpoint(run, 1, {"step": 1}, "", keep=2, sharded={"model": {"w": torch.ones(4)}})
    except Exception as e:  # noqa: BLE001 - the test compares what each rank saw
        Path(run, f"rank{rank}").write_text(f"{type(e).__name__}: {e}")
    finally:
        torch.save = real_save


@pytest.mark.parametrize("kind", ["disk", "other"])
def test_a_failed_save_under_torchrun_stops_every_rank(tmp_path, kind):
    from test_parallel import run_ranks

    run_ranks(_failing_save_on_rank0, 2, str(tmp_path), kind, timeout=120)  # a rank left waiting fails here
    seen = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if kind == "disk":
        assert all(s.startswith("NoSpaceError: no space left on") for s in seen), seen
    else:
        assert seen[0].startswith("TypeError") and seen[1].startswith("RuntimeError: checkpoint step-00000001: "
                                                                      "rank 0 could not write its part"), seen
    assert not state.list_checkpoints(tmp_path) and not list((tmp_path / "checkpoints").glob(".step-*"))


TMPFS_SCRIPT = """
set -e
mount -t tmpfs -o size={size} tmpfs {mnt}
cp {corpus} {mnt}/
set +e
"{python}" -m r1lab.cli {args} 2> {log}
echo $? > {rc}
cp -r {mnt}/run {copy}
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
def test_disk_full_on_a_real_small_file_system(finished, tmp_path):
    ck = state.list_checkpoints(finished / "run")[0]
    size = sum(f.stat().st_size for f in ck.rglob("*")) * 3 // 2 + 200_000  # the first checkpoint fits, not two
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = " ".join(f"'{a}'" for a in small_args(mnt / "corpus.jsonl", mnt / "run", steps=STEPS))
    script = TMPFS_SCRIPT.format(size=size, mnt=mnt, corpus=finished / "corpus.jsonl", python=sys.executable,
                                 args=argv, log=tmp_path / "log", rc=tmp_path / "rc", copy=tmp_path / "run")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {mnt}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mounts here: {probe.stderr.decode().strip()}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=SUBPROCESS_ENV, check=True, timeout=300)
    log = (tmp_path / "log").read_text().strip().splitlines()
    assert (tmp_path / "rc").read_text().strip() == "2", log
    assert len(log) == 1 and f"no space left on {mnt / 'run' / 'checkpoints'}" in log[0], log
    assert [p.name for p in state.list_checkpoints(tmp_path / "run")] == ["step-00000003"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))
    state.load_checkpoint(state.find_checkpoint(tmp_path / "run"))  # intact
