"""benchmarks/speedrun_seeds.py: the command each run gets, new or resumed (a resumed --stages run must continue
its stages, not redo them from scratch)."""

import argparse
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("speedrun_seeds",
                                              Path(__file__).resolve().parents[1] / "benchmarks/speedrun_seeds.py")
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def args(**kw):
    base = dict(preset="cpu", set=["lookup_share=0.1"], stages="0,6", resume=False)
    return argparse.Namespace(**{**base, **kw})


def test_new_and_resumed_runs_get_their_own_commands(tmp_path):
    folder = tmp_path / "default-s3"
    new = seeds.run_command(args(), folder, 3, ["check_share=0.4"])
    assert new[:3] == [sys.executable, "-m", "r1lab.cli"] and new[new.index("--out") + 1] == str(folder)
    assert [new[i + 1] for i, a in enumerate(new) if a == "--set"] == ["seed=3", "lookup_share=0.1", "check_share=0.4"]
    assert new[-2:] == ["--stages", "0,6"] and "--resume" not in new
    # --resume of a folder that holds no run yet starts it as new
    assert seeds.run_command(args(resume=True), folder, 3, ["check_share=0.4"]) == new
    folder.mkdir()
    (folder / "speedrun.json").write_text("{}")
    resumed = seeds.run_command(args(resume=True), folder, 3, ["check_share=0.4"])
    assert resumed[-1] == "--resume" and "--set" not in resumed and "--stages" not in resumed
    assert new[new.index("--device") + 1] == "cpu"
    gpu = seeds.run_command(args(device="cuda"), tmp_path / "other", 3, [])
    assert gpu[gpu.index("--device") + 1] == "cuda"
