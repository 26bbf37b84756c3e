"""A speedrun folder that was damaged or copied (issue 24, finding 12): speedrun.json is checked, naming the
file and the field; evaluation samples resume from a copied folder; errors give advice speedrun can follow."""

import json
import shutil
from pathlib import Path

import pytest

import r1lab
from r1lab import eval as ev
from r1lab.engine import Completion
from r1lab.speedrun import Speedrun


def speedrun_folder(tmp_path: Path, text: str) -> Path:
    out = tmp_path / "sr"
    out.mkdir()
    Speedrun(out, "mini")._save()  # the speedrun.json of a new run
    (out / "speedrun.json").write_text(text(json.loads((out / "speedrun.json").read_text())))
    return out


def test_truncated_speedrun_json_names_the_file(tmp_path):
    out = speedrun_folder(tmp_path, lambda st: json.dumps(st)[:40])
    with pytest.raises(ValueError, match=rf"{out / 'speedrun.json'}: not valid JSON"):
        Speedrun(out, resume=True)


@pytest.mark.parametrize("key,value,want", [("rl_steps", "40", "an integer"), ("rl_lr", "fast", "a number"),
                                            ("model", 3, "a string"),
                                            ("task_knobs", 5, r"a list of \[name, value\] pairs")])
def test_speedrun_json_settings_are_type_checked(tmp_path, key, value, want):
    out = speedrun_folder(tmp_path, lambda st: json.dumps({**st, "settings": {**st["settings"], key: value}}))
    with pytest.raises(ValueError, match=rf"{out / 'speedrun.json'}: settings\.{key} must be {want}, got"):
        Speedrun(out, resume=True)


def test_speedrun_json_unknown_setting_is_an_error(tmp_path):
    out = speedrun_folder(tmp_path, lambda st: json.dumps({**st, "settings": {**st["settings"], "rl_step": 1}}))
    with pytest.raises(ValueError, match=r"speedrun\.json: unknown setting 'rl_step'"):
        Speedrun(out, resume=True)


def test_eval_stage_of_a_copied_folder_resumes_and_advises_speedrun_flags(tmp_path, monkeypatch):
    out = tmp_path / "sr"
    out.mkdir()
    run = Speedrun(out, "mini")
    run._save()
    model = r1lab.Transformer(r1lab.get_preset("tiny")).init_weights(seed=0)
    r1lab.save_pretrained(model, out / "0-pretrain/base/final")
    (out / "data").mkdir()
    rows = [{"id": f"t{i}", "question": f"{i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    (out / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def generate(engine, prompts, params):  # stands in for the engine: answer 2 to every problem
        for i, p in enumerate(params):
            yield i, [Completion(i, j, [0], "<answer>2</answer>", "stop", None, len(prompts[i]))
                      for j in range(p.n)]

    monkeypatch.setattr(ev, "_generate", generate)
    monkeypatch.setattr(ev, "_load_engine", lambda *a: None)
    first = run.stage_eval()
    assert first["base"]["pass@1"] == pytest.approx(1 / 3)

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    monkeypatch.setattr(ev, "_generate", lambda *a: pytest.fail("the copied samples must be resumed"))
    assert Speedrun(copy, resume=True).stage_eval()["base"] == first["base"]

    samples = copy / "eval" / "base.jsonl"
    lines = [json.loads(ln) for ln in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps({**r, "settings": {**r["settings"], "temperature": 1.0}}) + "\n"
                               for r in lines))
    with pytest.raises(ValueError, match=rf"other settings .*; redo the evaluation: r1lab speedrun --out {copy} "
                                         rf"--stages 6") as e:
        Speedrun(copy, resume=True).stage_eval()
    assert "--no-resume" not in str(e.value) and "--out FILE" not in str(e.value)


def test_resume_after_an_interrupted_stages_run_continues_those_stages_only(tmp_path, monkeypatch):
    """`--stages 0,6` stopped in its evaluation: --resume evaluates and stops there (it does not go on to R1-Zero
    and the rest), and the pretrained base is not trained again."""
    out, real, calls = tmp_path / "run", Speedrun.job, []

    def job(self, stage, part=""):
        calls.append(stage)
        if stage == "eval" and interrupt:
            raise KeyboardInterrupt("test")
        return real(self, stage, part)

    monkeypatch.setattr(Speedrun, "job", job)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        Speedrun(out, "mini", device="cpu", quiet=True, overrides={"student_pretrain_steps": 1}).run([0, 6])
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == ["pretrain"] and state["pending"] == ["pretrain", "eval"]
    calls.clear()
    interrupt = False
    state = Speedrun(out, "mini", device="cpu", resume=True, quiet=True).run()
    assert set(calls) == {"eval"} and list(state["stages"]) == ["pretrain", "eval"] and "pending" not in state
    assert json.loads((out / "speedrun.json").read_text()) == state

    def stop(self, stage, part=""):
        calls.append(stage)
        raise KeyboardInterrupt("test")

    calls.clear()
    monkeypatch.setattr(Speedrun, "job", stop)
    with pytest.raises(KeyboardInterrupt):  # the next --resume goes on with the rest of the recipe
        Speedrun(out, "mini", device="cpu", resume=True, quiet=True).run()
    assert len(calls) == 1 and calls[0] not in ("pretrain", "eval")
