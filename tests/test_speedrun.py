"""The speedrun: its task vocabulary, its data files, and a miniature run of every stage end to end."""

import json
import re
import sys
from pathlib import Path

import pytest

from r1lab.grading import extract_answer, math_equal
from r1lab.speedrun import PRESETS, STAGES, Speedrun, parse_stages
from r1lab.speedrun import data as sdata
from r1lab.speedrun.vocab import build_task_tokenizer
from r1lab.tasks.synthetic import Addition


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, machine-independent results


def test_task_tokenizer_round_trips_and_keeps_markers_whole(tmp_path):
    texts = [sdata.ZERO_TEMPLATE.format(question=p.question) + sdata.zero_completion(Addition.solution(p), p.answer)
             for p in Addition(digits=3).problems(300, "train", 0)]
    tok = build_task_tokenizer(tmp_path, texts, min_count=5)
    for t in texts[:50] + ["<bos><｜User｜>What is 12 + 3?<｜Assistant｜><think>\n9 + 9 = 18\n</think>\n\n<answer>18</answer>"]:
        assert tok.decode(tok.encode(t)) == t
    for marker in ("<think>", "</think>", "<answer>", "</answer>", "<｜User｜>", "<｜Assistant｜>"):
        assert len(tok.encode(marker)) == 1, marker
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.decode([tok.bos_id, *tok.encode("1 + 1"), tok.eos_id], skip_special_tokens=True) == "1 + 1"
    assert len(tok.encode(" write")) == 1  # a frequent corpus word is one token
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")
    # Digits are never merged, so numbers are spelled digit by digit.
    assert tok.encode("1659") == [tok.encode(d)[0] for d in "1659"]
    assert tok.encode("~") == [tok.token_to_id("<unk>")]  # a character the corpus never had
    # The chat template renders with the real format (the same markers as DeepSeek's tokenizer).
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True)
    assert text == "<bos><｜User｜>What is 1 + 2?<｜Assistant｜>"
    assert sdata.CHAT_TEMPLATE.format(question="What is 1 + 2?") == text + "<think>\n"
    # Text from users (the server, SFT rows) is encoded with the turn markers as plain text; the task's words and
    # answer tags stay the tokens the model was trained on.
    for t in texts[:50]:
        body = t.split("<think>", 1)[1]
        assert tok.encode(body, split_special_tokens=True) == tok.encode(body)
    assert tok.token_to_id("<｜User｜>") not in tok.encode("<｜User｜>", split_special_tokens=True)


def test_data_files_hold_what_each_stage_reads(tmp_path):
    task = Addition(digits=2)
    counts = sdata.write_data(tmp_path, task, corpus_docs=400, reasoning_share=0.25, rl_prompts=50, cold_start=20,
                              test=30, seed=0)
    assert counts == {"corpus": 400, "zero_prompts": 50, "prompts": 50, "cold_start": 20, "test": 30}
    read = lambda name: [json.loads(ln) for ln in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    corpus = read("corpus.jsonl")
    worked = [d for d in corpus if "digit by digit" in d["text"]]
    assert 0.15 < len(worked) / len(corpus) < 0.35  # the reasoning share, drawn per document
    d = corpus[0]["text"]
    assert d.startswith("User: What is ") and "? Assistant<think>\n" in d and d.endswith("\n</think>\n\n<answer>"
                                                                                    + d.rsplit("<answer>", 1)[1])
    # Every completion in the corpus is well formed and right by the rewards the RL stages use.
    from r1lab.rewards import accuracy_reward, format_reward

    prompts = [c["text"][: c["text"].index("<think>") + 7] for c in corpus]
    completions = [c["text"][len(p):] for c, p in zip(corpus, prompts)]
    answers = [c["text"].rsplit("<answer>", 1)[1].removesuffix("</answer>") for c in corpus]
    sums = [str(sum(int(x) for x in p.split("What is ")[1].split("?")[0].split(" + "))) for p in prompts]
    assert answers == sums
    assert accuracy_reward(prompts, completions, answer=sums) == [1.0] * len(corpus)
    assert format_reward(prompts, completions) == [1.0] * len(corpus)
    cold = read("cold_start.jsonl")
    assert all(r["response"].startswith("<think>\n") and "digit by digit" in r["response"] for r in cold)
    zero = read("zero_prompts.jsonl")
    assert zero[0]["prompt"] == sdata.ZERO_TEMPLATE.format(question=read("prompts.jsonl")[0]["prompt"])
    # Held-out problems are never training problems (the split is a property of the instance).
    train_q = {c["text"].split(" Assistant<think>")[0] for c in corpus} | {"User: " + r["prompt"] for r in cold}
    assert not {"User: " + r["question"] for r in read("test.jsonl")} & train_q


def test_cold_start_demonstrations_check_and_fix_when_asked(tmp_path):
    """cold_check_share / cold_fix_share: that share of the cold-start demonstrations checks its result, or slips,
    catches the slip and fixes it; every one still ends at the right answer. Off by default: plain solutions."""
    task = sdata.make_task("running-sum", n_operands=4)
    kw = dict(corpus_docs=50, reasoning_share=0.5, rl_prompts=4, cold_start=400, test=4, seed=0)
    read = lambda d: [json.loads(ln) for ln in (d / "cold_start.jsonl").read_text().splitlines()]  # noqa: E731
    sdata.write_data(tmp_path / "plain", task, **kw)
    plain = read(tmp_path / "plain")
    assert not any("Check" in r["response"] for r in plain)
    sdata.write_data(tmp_path / "checked", task, cold_check_share=0.5, cold_fix_share=0.25, **kw)
    checked = read(tmp_path / "checked")
    assert [r["prompt"] for r in checked] == [r["prompt"] for r in plain]  # the same problems
    n_check = sum("Check" in r["response"] for r in checked)
    n_fix = sum("slipped" in r["response"] for r in checked)
    assert 0.65 < n_check / len(checked) < 0.85, n_check  # checked or fixed: 75% expected
    assert 0.15 < n_fix / len(checked) < 0.35, n_fix  # fixed: 25% expected
    for r, p in zip(checked, plain):  # the answer tag and the text's last answer are the right ones
        assert r["response"].endswith(p["response"].rsplit("\n\n", 1)[1])
        body = r["response"].split("</think>")[0]
        assert body.rsplit("The answer is ", 1)[1].startswith(p["response"].rsplit("<answer>", 1)[1].split("<")[0])



def test_cold_start_demonstrations_slip_unnoticed_when_asked(tmp_path):
    """cold_slip_share: that share of the plain (unchecked) cold-start demonstrations makes a slip nobody catches.
    Its answer tag is the wrong total the text arrives at, as in the corpus; every other demonstration is right.
    The right total is worked out here from the question itself."""
    import re

    task = sdata.make_task("running-sum", n_operands=4)
    kw = dict(corpus_docs=50, reasoning_share=0.5, rl_prompts=4, cold_start=400, test=4, seed=1)
    sdata.write_data(tmp_path, task, cold_check_share=0.3, cold_fix_share=0.1, cold_slip_share=0.5, **kw)
    rows = [json.loads(ln) for ln in (tmp_path / "cold_start.jsonl").read_text().splitlines()]
    wrong = 0
    for r in rows:
        body, tail = r["response"].split("</think>")
        tag = tail.split("<answer>")[1].split("</answer>")[0]
        assert body.rsplit("The answer is ", 1)[1].startswith(tag + ".")  # the tag states what the text says
        truth = sum(int(d) for d in re.findall(r"[a-z](\d)", r["prompt"]))
        if int(tag) != truth:
            wrong += 1
            assert "Check" not in body  # an unnoticed slip: only plain solutions slip without a fix
    # 60% of the demonstrations are plain, half of those slip: 30% expected
    assert 0.22 < wrong / len(rows) < 0.38, wrong


def test_default_preset_checks_by_undoing_steps_in_corpus_and_cold_start(tmp_path, monkeypatch):
    """The cpu preset's checks undo each step of the first pass ("15-c5=10"), in the corpus and in the cold start,
    and its cold-start demonstrations check (30%) and fix a slip (10%) too, if less often than the corpus's worked
    documents (50% and 15%; thirteenth session: the checked cold start leaves reasoning RL groups with a signal), and
    a fifth of its plain ones slip unnoticed, as in the corpus (twenty-first session); the gpu preset runs the same recipe on sums of twenty, and the mini preset keeps plain demonstrations. The data
    are written by the speedrun's own stage 0 (its training stubbed out), so the wiring is what is tested."""
    import r1lab.speedrun.pipeline as pipeline

    p = PRESETS["cpu"]
    assert (p.cold_check_share, p.cold_fix_share) == (0.3, 0.1) and (p.check_share, p.fix_share) == (0.5, 0.15)
    assert p.cold_slip_share == p.slip_share == 0.2  # the plain demonstrations slip as the corpus's do
    g = PRESETS["gpu"]
    assert (g.task, dict(g.task_knobs)) == ("running-sum", {"n_operands": 20, "check_route": "inverse"})
    assert (g.cold_check_share, g.cold_fix_share, g.check_share, g.fix_share) == (0.3, 0.1, 0.5, 0.15)
    assert g.cold_slip_share == 0.0  # not yet run on a GPU
    mini = PRESETS["mini"]
    assert (mini.cold_check_share, mini.cold_fix_share, mini.cold_slip_share) == (0.0, 0.0, 0.0)
    run = Speedrun(tmp_path, "cpu", device="cpu", quiet=True,
                   overrides={"corpus_docs": 400, "cold_start": 300, "rl_prompts": 4, "eval_problems": 4})
    run._train = lambda module, recipe: {}
    monkeypatch.setattr(pipeline, "_params", lambda folder: {})
    run.stage_pretrain()
    read = lambda name, key: [json.loads(ln)[key] for ln in (tmp_path / "data" / name).read_text().splitlines()]  # noqa: E731
    cold = read("cold_start.jsonl", "response")
    corpus = [t for t in read("corpus.jsonl", "text") if "Check:" in t]
    assert len(corpus) > 20
    checks = [r.split("Check:", 1)[1] for r in cold if "Check:" in r]
    assert 0.3 < len(checks) / len(cold) < 0.5  # 40% expected
    # a check begins by undoing the first pass's first step ("total-tag operand=total before") and looks nothing
    # up anew until it finds a slip
    for c in checks + [t.split("Check:", 1)[1] for t in corpus]:
        assert re.match(r" \d+-b\d=\d+", c) and "+" not in c.split("Wait")[0], c
    fixed = [r for r in cold if "the first pass slipped" in r]
    assert 0.05 < len(fixed) / len(cold) < 0.17  # 10% expected
    # plain demonstrations whose total is wrong (worked out here from the question): 20% of the 60% plain ones
    truth = [sum(int(d) for d in re.findall(r"[a-z](\d)", q)) for q in read("cold_start.jsonl", "prompt")]
    wrong = [r for r, t in zip(cold, truth) if int(r.rsplit("<answer>", 1)[1].split("<")[0]) != t]
    assert all("Check" not in r for r in wrong)
    assert 0.06 < len(wrong) / len(cold) < 0.19, len(wrong)  # 12% expected


def test_r1_zero_and_reasoning_rl_take_their_own_learning_rates(tmp_path):
    """zero_rl_lr sets R1-Zero's learning rate (0: rl_lr's), rl_lr reasoning RL's; each stage trains from its own
    start with its own prompts."""
    seen = {}
    for zero_lr, want in ((2e-4, 2e-4), (0.0, 5e-5)):
        run = Speedrun(tmp_path / str(zero_lr), "mini", device="cpu", quiet=True,
                       overrides={"zero_rl_lr": zero_lr, "rl_lr": 5e-5})
        run._train = lambda module, recipe: seen.update({Path(recipe.run.out).name: recipe}) or {}
        run.stage_r1_zero(), run.stage_reasoning_rl()
        zero, reasoning = seen["1-r1-zero"], seen["3-reasoning-rl"]
        assert (zero.optim.lr, reasoning.optim.lr) == (want, 5e-5)
        assert zero.model.init.endswith("0-pretrain/base/final") and zero.data.train[0].endswith("zero_prompts.jsonl")
        assert reasoning.model.init.endswith("2-cold-start/final") and reasoning.data.train[0].endswith("/prompts.jsonl")


def test_parse_stages():
    assert parse_stages("0-6") == list(range(7)) and parse_stages("3") == [3] and parse_stages("5,1-2") == [1, 2, 5]
    for bad in ("7", "2-9", "a", "3-1"):
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad)
    assert len(STAGES) == 7


def test_miniature_speedrun_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="needs .*0-pretrain/base/final"):
        Speedrun(tmp_path / "other", "mini", device="cpu", resume=True, quiet=True).run([1])
    Speedrun(out, "mini", device="cpu", quiet=True).run([0, 1, 2])
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == ["pretrain", "r1-zero", "cold-start"]
    with pytest.raises(ValueError, match="--resume"):
        Speedrun(out, "mini", device="cpu", quiet=True)
    # --resume: the finished stages are skipped (their models are not retrained), the rest run, here on two
    # lanes (worker processes of one thread each, as on a 2-core CPU).
    before = (out / "1-r1-zero/final/model.safetensors").stat().st_mtime_ns
    state = Speedrun(out, "mini", device="cpu", resume=True, quiet=True).run(lanes=2, threads=2)
    assert (out / "1-r1-zero/final/model.safetensors").stat().st_mtime_ns == before
    assert list(state["stages"]) == list(STAGES) and not state["parts"]
    assert state["wall_seconds"] > 0 and all(v["seconds"] > 0 for v in state["stages"].values())
    for folder in ("0-pretrain/base", "0-pretrain/student", "1-r1-zero", "2-cold-start", "3-reasoning-rl",
                   "5-distill/distilled", "5-distill/control"):
        assert (out / folder / "final/config.json").is_file(), folder
        assert (out / folder / "recipe.toml").is_file(), folder  # each stage reruns as a command of its own
    grpo_metrics = [json.loads(ln) for ln in (out / "1-r1-zero/metrics.jsonl").read_text().splitlines()]
    assert len(grpo_metrics) == PRESETS["mini"].rl_steps and "reward/format" in grpo_metrics[0]
    # Rejection sampling kept only correct, well-formed samples of the RL model, in the chat format.
    rej = state["stages"]["rejection"]
    assert rej["sampled"] == PRESETS["mini"].rejection_prompts * PRESETS["mini"].rejection_samples
    assert 0 < rej["kept"] <= min(rej["correct"], rej["well_formed"])
    rows = [json.loads(ln) for ln in (out / "data/distill.jsonl").read_text().splitlines()]
    assert len(rows) == rej["kept"]
    from r1lab.rewards import accuracy_reward, format_reward

    prompts = [sdata.CHAT_TEMPLATE.format(question=r["prompt"]) for r in rows]
    completions = [r["response"].removeprefix("<think>\n") for r in rows]
    answers = [str(sum(int(w[1:]) for w in r["prompt"].removeprefix("Add ").rstrip(".").split()))
               for r in rows]  # "Add a3 b5." -> 8
    assert accuracy_reward(prompts, completions, answer=answers) == [1.0] * len(rows)
    assert format_reward(prompts, completions) == [1.0] * len(rows)
    # Evaluation of every stage, and the report card with its plots.
    ev = state["stages"]["eval"]
    for key in ("base", "r1-zero", "cold-start", "reasoning-rl", "student-distill", "student-control"):
        lines = (out / "eval" / f"{key}.jsonl").read_text().splitlines()
        assert len(lines) == PRESETS["mini"].eval_problems * PRESETS["mini"].eval_k
        # The stage's numbers are its samples' verdicts, regraded here from the text: every problem has k
        # samples, so pass@1 (the mean over problems of correct / k) is the share of correct samples.
        recs = [json.loads(ln) for ln in lines]
        regraded = [math_equal(extract_answer(r["text"]), r["reference"]) for r in recs]
        assert regraded == [r["correct"] for r in recs]
        assert ev[key]["pass@1"] == pytest.approx(sum(regraded) / len(recs))
        assert 0.0 <= ev[key]["cons@k"] <= 1.0
    assert len(ev["expert_load"]) == 2 and all(abs(sum(row) - 1) < 1e-5 for row in ev["expert_load"])
    report = (out / "report.md").read_text()
    assert "| 3 reasoning RL |" in report and "Hardware:" in report and "Commit:" in report
    assert "## What the models write" in report and "Response classifier" in report
    from r1lab.speedrun.report import check_changes

    for key, whose in (("base", "The base's"), ("r1-zero", "R1-Zero's")):  # how often checks change an answer
        recs = [json.loads(ln) for ln in (out / "eval" / f"{key}.jsonl").read_text().splitlines()]
        ch = check_changes(recs)
        assert (f"{whose} checks: {ch['checked']} responses check their result; {ch['changed']} of the checks "
                f"changed the answer" in report) == (ch["checked"] > 0)
    assert report.count("SE)") >= 5  # the signature's claims, each with its margin in standard errors
    samples = [json.loads(ln) for ln in (out / "1-r1-zero/samples.jsonl").read_text().splitlines()]
    mini = PRESETS["mini"]
    assert len(samples) == mini.rl_steps * mini.prompts_per_step * mini.group_size  # every sample, classified
    for png in ("rl_curves", "accuracy", "expert_load"):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png}.png" in report
    # The report says where the stages ran, as recorded when they ran (once here: one machine, one commit).
    assert len(state["ran_on"]) == 1 and f"Hardware: {state['ran_on'][0]['hardware']}." in report
    assert "where this report was written" not in report
    # --report rewrites the report from the folder as it stands and runs nothing.
    from r1lab.cli import main

    saved = (out / "speedrun.json").read_text()
    (out / "report.md").unlink()
    assert main(["speedrun", "--out", str(out), "--report"]) in (0, None)
    assert (out / "report.md").read_text() == report and (out / "speedrun.json").read_text() == saved
    # --stages reruns part of the recipe on the same folder.
    state = Speedrun(out, "mini", device="cpu", resume=True, quiet=True).run([6])
    assert set(state["stages"]) == set(STAGES)
    assert state["stages"]["eval"]["base"] == ev["base"]  # the same seeds, here or in a lane's worker
    # A job that fails in a lane's worker stops the run with its own error; its stage stays unfinished.
    good = (out / "data/test.jsonl").read_text()
    (out / "data/test.jsonl").write_text(good + "{not json\n")
    with pytest.raises(ValueError, match="test.jsonl"):
        Speedrun(out, "mini", device="cpu", resume=True, quiet=True).run([6], lanes=2, threads=2)
    state = json.loads((out / "speedrun.json").read_text())
    assert "eval" not in state["stages"] and list(state["stages"]) == list(STAGES[:-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_speedrun_stops_its_lanes_workers(tmp_path):
    """`kill` (SIGTERM) of a speedrun running two lanes stops it as Ctrl-C does: the workers, which run in process
    groups of their own, are stopped too rather than left running their jobs, and the run says how to resume."""
    import os
    import signal
    import subprocess
    import time

    tag = f"r1lab-kill-test-{os.getpid()}"
    env = {**os.environ, "R1LAB_TEST_TAG": tag, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "r1lab.cli", "speedrun", "--preset", "mini", "--out",
                             str(tmp_path / "run"), "--lanes", "2"], env=env, stderr=subprocess.PIPE, text=True)

    def tagged() -> list[int]:  # processes with the tag in their environment: the run and its workers
        pids = []
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and int(d) != os.getpid() and tag.encode() in open(f"/proc/{d}/environ", "rb").read():
                    pids.append(int(d))
            except OSError:
                continue
        return pids

    deadline = time.time() + 120
    while len(tagged()) < 3 and time.time() < deadline:  # the run and both lanes' workers
        time.sleep(0.5)
    assert len(tagged()) >= 3, f"the lanes never started (exit {proc.poll()})"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "--resume" in err
    deadline = time.time() + 30
    while tagged() and time.time() < deadline:
        time.sleep(0.5)
    assert not tagged()


def test_jobs_wait_for_what_they_read_and_lanes_share_the_threads():
    from r1lab.speedrun.pipeline import JOBS, MODELS, _all_wait_for, _dependents, _schedule, job_name

    names = [job_name(st, part) for st, part, _ in JOBS]
    assert len(set(names)) == len(names) and {st for st, _, _ in JOBS} == set(STAGES)
    for i, (st, part, needs) in enumerate(JOBS):  # JOBS in order is a valid serial order
        assert set(needs) <= set(names[:i]), names[i]
    after = _dependents()
    # What each job reads, from whom: the model stages wait for their init model, evaluation for its model.
    assert {"cold-start", "reasoning-rl", "rejection", "distill/distilled", "r1-zero"} <= after["pretrain/base"]
    assert "distill/control" in after["pretrain/student"] and "distill/control" not in after["pretrain/base"]
    assert "distill/distilled" in after["rejection"] and "eval/student-distill" in after["rejection"]
    assert {f"eval/{k}" for k, _, _ in MODELS} | {"eval/expert-load"} == {n for n in names if n.startswith("eval/")}
    assert "eval/expert-load" in after["eval/reasoning-rl"] and "eval/base" not in after["reasoning-rl"]

    def start(done, busy, threads=2, lanes=2, pending=None):
        pending = [j for j in JOBS if job_name(*j[:2]) not in done] if pending is None else pending
        return [(job_name(*j[:2]), n) for j, n in _schedule(pending, set(done), busy, threads, lanes)]

    assert start(set(), []) == [("pretrain/data", 2)]  # everything waits for the data: every thread
    assert start({"pretrain/data"}, []) == [("pretrain/base", 1), ("pretrain/student", 1)]
    assert start({"pretrain/data"}, [], threads=8) == [("pretrain/base", 4), ("pretrain/student", 4)]
    assert start({"pretrain/data"}, [], lanes=1) == [("pretrain/base", 2)]  # one lane: one job, every thread
    assert start({"pretrain/data"}, [1, 1]) == []  # no lane free
    # The student is done while the base trains: the control student (it reads the cold-start data only) goes.
    assert start({"pretrain/data", "pretrain/student"}, [1],
                 pending=[j for j in JOBS if job_name(*j[:2]) not in {"pretrain/data", "pretrain/student",
                                                                      "pretrain/base"}]) == [("distill/control", 1)]
    # At the end, the distilled student and its evaluation wait for rejection sampling: it takes both threads.
    tail = {"pretrain/data", "pretrain/base", "pretrain/student", "cold-start", "reasoning-rl", "r1-zero",
            "distill/control", *(f"eval/{k}" for k in ("base", "r1-zero", "cold-start", "reasoning-rl",
                                                       "student-control")), "eval/expert-load"}
    assert start(tail, []) == [("rejection", 2)]
    assert start(tail - {"eval/base"}, []) == [("rejection", 1), ("eval/base", 1)]
    # The same rule lets a lone running job take the threads that came free (the driver signals its worker).
    left = [j for j in JOBS if job_name(*j[:2]) not in tail]
    assert _all_wait_for("rejection", left) and not _all_wait_for("distill/distilled", left)
    assert not _all_wait_for("rejection", left + [j for j in JOBS if job_name(*j[:2]) == "eval/base"])


def test_a_stage_of_several_jobs_continues_from_its_finished_ones(tmp_path, monkeypatch):
    from r1lab.speedrun import pipeline

    calls = []

    class Recorded(Speedrun):  # each job returns which call it was
        def job(self, stage, part=""):
            calls.append(pipeline.job_name(stage, part))
            return {part or stage: len(calls)}

    monkeypatch.setattr(pipeline, "write_report", lambda out, state: out / "report.md")
    run = Recorded(tmp_path, "mini", device="cpu", quiet=True)
    run.state["parts"] = {"pretrain": {"student": {"seconds": 3.0, "result": {"student": "s"}},
                                       "data": {"seconds": 2.0, "result": {"data": "d"}}}}
    run._save()
    state = Recorded(tmp_path, resume=True, quiet=True).run()
    assert calls[0] == "pretrain/base" and "pretrain/data" not in calls and "pretrain/student" not in calls
    pre = state["stages"]["pretrain"]
    assert list(pre) == ["seconds", "data", "base", "student"] and pre["base"] == 1 and pre["seconds"] > 5.0
    assert list(state["stages"]) == list(STAGES) and state["parts"] == {}
    assert list(state["stages"]["eval"])[1:] == [k for k, _, _ in pipeline.MODELS] + ["expert-load"]
    # A damaged record of finished jobs is one clear error.
    (tmp_path / "speedrun.json").write_text(json.dumps({**state, "parts": {"pretrain": 3}}))
    with pytest.raises(ValueError, match="'parts' must map stage names"):
        Speedrun(tmp_path, resume=True)


def test_command_line_errors_are_clear(tmp_path, capsys):
    from r1lab.cli import main

    assert main(["speedrun", "--out", str(tmp_path / "a"), "--set", "rl_steps=many"]) == 2
    assert "--set rl_steps: 'many' is not a int" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--set", "nope=1"]) == 2
    assert "expected KEY=VALUE with KEY one of" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--set", "task_knobs=[8]"]) == 2
    assert "--set task_knobs: '[8]' is not a JSON object" in capsys.readouterr().err
    from r1lab.speedrun import parse_sets
    assert parse_sets(['task_knobs={"n_operands": 6, "ops": ["+", "-"]}', "rl_steps=7"]) == {
        "task_knobs": (("n_operands", 6), ("ops", ("+", "-"))), "rl_steps": 7}
    assert main(["speedrun", "--preset", "mini", "--out", str(tmp_path / "k"), "--set",
                 'task_knobs={"n_operand": 6}']) == 2
    assert "speedrun task 'running-sum' has no knob n_operand; its knobs: n_operands" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--stages", "9"]) == 2
    assert "outside 0-6" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--lanes", "0"]) == 2
    assert "--lanes 0: give 1 or more" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "a"), "--lanes", "2", "--device", "cuda"]) == 2
    assert "jobs run side by side on a CPU only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # A run folder remembers its preset: another --preset on it is refused, no --preset continues it.
    (tmp_path / "b").mkdir()
    Speedrun(tmp_path / "b", "mini", device="cpu", quiet=True)._save()
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--preset", "gpu", "--resume"]) == 2
    assert "holds a speedrun of preset 'mini'" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "b")]) == 2
    assert "pass --resume" in capsys.readouterr().err
    # --report runs nothing: it refuses what would run stages, and a folder without a run.
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--report", "--stages", "6"]) == 2
    assert "--report runs nothing, so it takes no --stages" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "none"), "--report"]) == 2
    assert "holds no speedrun (no speedrun.json)" in capsys.readouterr().err
    # A folder from before the record of where its stages ran: the report says whose machine it names.
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--report"]) in (0, None)
    assert "(both where this report was written)" in (tmp_path / "b" / "report.md").read_text()
    bad = json.loads((tmp_path / "b" / "speedrun.json").read_text())
    (tmp_path / "b" / "speedrun.json").write_text(json.dumps({**bad, "ran_on": [{"hardware": 3}]}))
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--report"]) == 2
    assert "'ran_on' must be a list of objects" in capsys.readouterr().err


def test_response_classifier_and_accuracy_per_type():
    from r1lab.speedrun.report import accuracy_by_type, check_changes, classify_response, worked_accuracy

    direct = " The answer is 23. </think> <answer>23</answer>"
    restated = " 3 + 5 + 2 + 4 = 14. </think> <answer>14</answer>"  # one written step: still at once
    worked = " a7+b3=10, 10+c5=15, 15+d8=23. The answer is 23. </think> <answer>23</answer>"
    spaced = " Step by step: 3 + 5 = 8, so 8 + 2 + 4. 8 + 2 = 10, so 10 + 4. 10 + 4 = 14."  # no </think>: all text
    checked = (" a7+b3=10, 10+c5=15. Check: 15-c5=10, 10-b3=7, 7-a7=0. The answer is 15. </think> "
               "<answer>15</answer>")
    fixed = (" a7+b3=10, 10+c5=16. Check: 16-c5=11, not 10. Wait: 10+c5=15. The answer is 15. </think> "
             "<answer>15</answer>")
    after = " The answer is 15. </think> check: 7+3=10, 10+5=15 <answer>15</answer>"  # steps after the think block
    assert [classify_response(t) for t in (direct, restated, worked, spaced, checked, fixed, after)] == [
        "direct", "direct", "worked", "worked", "checked", "checked", "direct"]
    recs = [{"text": direct, "correct": True}, {"text": direct, "correct": False}, {"text": restated, "correct": False},
            {"text": worked, "correct": True}, {"text": checked, "correct": True}, {"text": fixed, "correct": False}]
    t = accuracy_by_type(recs)
    assert t["direct"] == {"n": 3, "share": 0.5, "accuracy": 1 / 3}
    assert t["worked"] == {"n": 1, "share": 1 / 6, "accuracy": 1.0}
    assert t["checked"] == {"n": 2, "share": 1 / 3, "accuracy": 0.5}
    assert accuracy_by_type([])["worked"]["accuracy"] is None
    # the worked answers, checked or not, together: 1 + 1 right of 3
    assert worked_accuracy(t) == (2 / 3, 3) and worked_accuracy(accuracy_by_type([])) is None
    # A check "changed the answer" when the last step before it disagrees with the final answer.
    recs = [{"text": checked, "extracted": "15", "correct": True}, {"text": fixed, "extracted": "15", "correct": True},
            {"text": fixed, "extracted": "16", "correct": False}, {"text": worked, "extracted": "23", "correct": True}]
    assert check_changes(recs) == {"checked": 3, "changed": 1, "changed_right": 1}


def test_first_slips_tell_a_misread_operand_from_a_wrong_running_total():
    from r1lab.speedrun.report import first_slips

    q = {"p": "Add a2 b0 c8 d3."}  # 13
    think = "</think>\n\n<answer>{}</answer>"

    def rec(text, correct=False):
        return {"problem_id": "p", "text": text + think.format(text.rsplit(" ", 1)[-1].rstrip(".")), "correct": correct}

    records = [
        rec("a2+b0=2 +c8=10 +d3=14. The answer is 14."),  # 10 + 3 is not 14
        rec("a2+b0=2 +c9=11 +d3=14. The answer is 14."),  # c is 8, not 9 (its sum is right)
        rec("a2+b0=3 +c8=11 +d3=14. The answer is 14."),  # the first step's sum is wrong
        rec("a2+b0=2 +c8=10 +d3=13. Check: 13-d3=10 10-c8=2 2-b0=3, wrong. The answer is 12."),  # the check did it
        rec("The answer is 12."),  # answers at once: not a worked answer
        rec("a2+b0=2 +c8=10 +d3=13. The answer is 13.", correct=True),  # right: not counted
    ]
    assert first_slips(records, q) == {"wrong": 4, "lookup": 1, "addition": 2, "other": 1}
    # A lookup after an addition slip counts as the addition: the first error is what counts.
    assert first_slips([rec("a2+b0=2 +c8=11 +d4=15. The answer is 15.")], q)["addition"] == 1
    assert first_slips([rec("a2+b0=2 +c8=10 +d4=14. The answer is 14.")], q)["lookup"] == 1
    # Operands of two digits: "c47" misread as "c74" is a lookup, "c47" added wrong an addition.
    q2 = {"p": "Add a12 b5 c47."}  # 64
    assert first_slips([rec("a12+b5=17 +c74=91. The answer is 91.")], q2)["lookup"] == 1
    assert first_slips([rec("a12+b5=17 +c47=63. The answer is 63.")], q2)["addition"] == 1


def test_training_types_split_rl_rollouts_into_spans_by_type(tmp_path):
    """The report's table of RL's own rollouts: six steps in three spans of two, each type's accuracy and count
    within a span, worked out by hand."""
    from r1lab.speedrun.report import _training_types_table, training_types

    direct, worked = "The answer is 9.</think>", "a4+b5=9 +c0=9. The answer is 9.</think>"
    checked = "a4+b5=9 +c0=9. Check: 9-c0=9 9-b5=4, as before. The answer is 9.</think>"
    rows = []
    for step in range(1, 7):
        rows += [{"step": step, "completion": direct, "accuracy": float(step == 1)},
                 {"step": step, "completion": worked, "accuracy": 1.0}]
        if step >= 3:  # checks appear in the second span, right one time in two
            rows.append({"step": step, "completion": checked, "accuracy": float(step % 2)})
    run = tmp_path / "1-r1-zero"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = training_types(run)
    assert [x["steps"] for x in t] == [(1, 2), (3, 4), (5, 6)]
    assert t[0]["direct"] == {"n": 2, "accuracy": 0.5} and t[0]["checked"] == {"n": 0, "accuracy": None}
    assert t[1]["worked"] == {"n": 2, "accuracy": 1.0} and t[1]["checked"] == {"n": 2, "accuracy": 0.5}
    assert t[2]["direct"] == {"n": 2, "accuracy": 0.0}
    table = _training_types_table(tmp_path)
    assert "| R1-Zero | 1-2 | 50.0% (2) | 100.0% (2) | - |" in table
    assert "| R1-Zero | 3-4 | 0.0% (2) | 100.0% (2) | 50.0% (2) |" in table
    assert training_types(tmp_path / "3-reasoning-rl") == [] and len(table) == 8  # no reasoning RL: its rows absent


def test_paired_margin_counts_problems_not_samples():
    from r1lab.speedrun.report import _per_problem, paired_margin

    recs = [{"problem_id": p, "correct": c} for p, c in (("x", 1), ("x", 1), ("y", 1), ("y", 0))]
    a = _per_problem(recs, lambda r: r["correct"])
    assert a == {"x": 1.0, "y": 0.5}
    diff, se = paired_margin({"x": 1.0, "y": 0.5, "z": 0.0}, {"x": 0.5, "y": 0.5, "z": 0.0, "w": 1.0})
    # differences 0.5, 0, 0 over the 3 shared problems: mean 1/6, sd sqrt(1/12), se sqrt(1/12 / 3) = 1/6
    assert abs(diff - 1 / 6) < 1e-12 and abs(se - 1 / 6) < 1e-12


def test_default_corpus_mixes_direct_worked_checked_fixed_and_worked_examples(tmp_path):
    from r1lab.speedrun.report import classify_response

    p = PRESETS["cpu"]
    assert p.textbook_share > 0 and p.reasoning_share <= 0.4
    task = sdata.make_task(p.task, **dict(p.task_knobs))
    sdata.write_data(tmp_path, task, corpus_docs=3000, reasoning_share=p.reasoning_share, rl_prompts=4, cold_start=4,
                     test=4, seed=0, check_share=p.check_share, fix_share=p.fix_share, slip_share=p.slip_share,
                     textbook_share=p.textbook_share, lookup_share=p.lookup_share, sum_share=p.sum_share)
    rows = [json.loads(ln)["text"] for ln in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    examples = [r.startswith("Example: Add a") for r in rows]
    assert sum(examples) == round(len(rows) * p.textbook_share)
    lookups = sum(" Recall: " in r for r in rows)  # a share of the dialogues are lookup drills (their own test)
    assert 0 < p.lookup_share and lookups == round((len(rows) - sum(examples)) * p.lookup_share)
    # and a share of the dialogues left are addition drills (their own test too)
    assert 0 < p.sum_share and sum(r.startswith("Sums: ") for r in rows) == round(
        (len(rows) - sum(examples) - lookups) * p.sum_share)
    drills = [" Recall: " in r or r.startswith("Sums: ") for r in rows]
    rows, examples = [r for r, d in zip(rows, drills) if not d], [e for e, d in zip(examples, drills) if not d]
    # A worked example has the R1-Zero layout with other role words, so every position after them is the same.
    ids = build_task_tokenizer(tmp_path / "tok", sdata.tokenizer_texts(tmp_path)).encode
    assert len(ids(sdata.TEXTBOOK_TEMPLATE.format(question="Add a1."))) == len(ids(sdata.ZERO_TEMPLATE.format(
        question="Add a1.")))
    assert all(r.startswith("User: Add a") for r, e in zip(rows, examples) if not e)
    assert all(". Solution<think>\n" in r if e else ". Assistant<think>\n" in r for r, e in zip(rows, examples))
    assert all(r.endswith("</answer>") for r in rows)
    bodies = [r.split("<think>", 1)[1] for r in rows]
    kinds = [classify_response(b) for b in bodies]
    assert all(k != "direct" for k, e in zip(kinds, examples) if e)  # worked examples always work it out
    dialogue_worked = [k != "direct" for k, e in zip(kinds, examples) if not e]
    assert abs(sum(dialogue_worked) / len(dialogue_worked) - p.reasoning_share) < 0.04
    n_worked = sum(k != "direct" for k in kinds)
    checked = sum(k == "checked" for k in kinds) / n_worked
    fixed = sum(". Wait, " in b for b in bodies) / n_worked
    # worked without a check and a wrong answer: the slips nobody catches
    truth = [str(sum(int(w[1:]) for w in r.split("Add ", 1)[1].split(".", 1)[0].split())) for r in rows]
    answers = [b.rsplit("The answer is ", 1)[1].split(".")[0] for b in bodies]
    assert all(r.endswith(f"<answer>{a}</answer>") for r, a in zip(rows, answers))
    slipped = sum(k == "worked" and a != t for k, a, t in zip(kinds, answers, truth)) / n_worked
    assert all(a == t for k, a, t in zip(kinds, answers, truth) if k != "worked")  # the others are all right
    assert abs(checked - p.check_share - p.fix_share) < 0.05 and abs(fixed - p.fix_share) < 0.04
    assert abs(slipped - (1 - p.check_share - p.fix_share) * p.slip_share) < 0.04

def test_the_chat_layout_puts_every_token_where_the_chat_template_does(tmp_path):
    """A model this small finds an operand by its distance: in the default layout, a dialogue of the corpus, a
    worked example and the cold start's chat rendering of the same solution hold the same tokens at the same
    offsets from the question's start, but the role words (and the question's first word, which follows "User: "
    with a space)."""
    from r1lab.speedrun.vocab import build_task_tokenizer

    p = PRESETS["cpu"]
    assert p.layout == "chat"
    task = sdata.make_task(p.task, **dict(p.task_knobs))
    sdata.write_data(tmp_path, task, corpus_docs=400, reasoning_share=0.5, rl_prompts=4, cold_start=20, test=4,
                     seed=3, check_share=0.3, fix_share=0.1, slip_share=0.2, textbook_share=0.25)
    tok = build_task_tokenizer(tmp_path / "tok", sdata.tokenizer_texts(tmp_path))
    layout = sdata.LAYOUTS["chat"]
    checked = 0
    for row in map(json.loads, (tmp_path / "cold_start.jsonl").read_text().splitlines()):
        q, response = row["prompt"], row["response"]
        chat = tok.encode(sdata.CHAT_TEMPLATE.format(question=q) + response.removeprefix("<think>\n"))
        body = response.removeprefix("<think>\n").split("\n</think>")[0]
        answer = response.rsplit("<answer>", 1)[1].removesuffix("</answer>")
        for template in (layout.zero, layout.textbook):
            plain = tok.encode(template.format(question=q) + sdata.zero_completion(body, answer, "chat"))
            # "User:" / "Example:" (the space after it joins the question's first word) against <bos><｜User｜>
            aligned = plain[len(tok.encode(template.split("{question}")[0].rstrip())):]
            assert len(aligned) == len(chat) - 2
            differ = [i for i, (a, b) in enumerate(zip(aligned, chat[2:])) if a != b]
            q_len = len(tok.encode(q))
            assert differ == [0, q_len], (tok.decode(aligned), differ)  # " Add"/"Add", role word/marker
            checked += 1
    assert checked == 40
    # The old layout (run folders made before it) starts the body three tokens further from the question.
    sdata.write_data(tmp_path / "old", task, corpus_docs=400, reasoning_share=0.5, rl_prompts=4, cold_start=20,
                     test=4, seed=3, textbook_share=0.25, layout="newline")
    q = "Add a1 b2."
    offsets = {}
    for name, folder in (("chat", tmp_path), ("newline", tmp_path / "old")):
        encode = build_task_tokenizer(folder / "tok", sdata.tokenizer_texts(folder)).encode
        lay = sdata.LAYOUTS[name]
        before_body = lay.zero.format(question=q) + lay.completion.split("{body}")[0]
        offsets[name] = len(encode(before_body)) - len(encode(lay.zero.split("{")[0] + q))
        offsets["chat template"] = len(encode(sdata.CHAT_TEMPLATE.format(question=q))) - len(encode("<bos><｜User｜>" + q))
    assert offsets == {"chat": 3, "chat template": 3, "newline": 6}
    with pytest.raises(ValueError, match="layout='diagonal': choose one of chat, newline"):
        Speedrun(tmp_path / "run", "mini", device="cpu", quiet=True, overrides={"layout": "diagonal"})


def test_seq_len_is_checked_against_both_models_context_before_any_stage(tmp_path):
    """A seq_len longer than the main model's or the student's context fails when the run is set up, naming the
    setting; one that fits gives SFT rows of twice seq_len, capped at the context (a GPU run with seq_len 512 on
    512-position models failed at the cold start, after pretraining and R1-Zero)."""
    with pytest.raises(ValueError, match=r"seq_len=513 is longer than the models' context: 512 positions"):
        Speedrun(tmp_path / "a", "cpu", device="cpu", quiet=True, overrides={"seq_len": 513})
    assert Speedrun(tmp_path / "b", "cpu", device="cpu", quiet=True, overrides={"seq_len": 512}).sft_seq_len == 512
    assert Speedrun(tmp_path / "c", "cpu", device="cpu", quiet=True, overrides={"seq_len": 200}).sft_seq_len == 400
    assert Speedrun(tmp_path / "d", "mini", device="cpu", quiet=True).sft_seq_len == 128
    with pytest.raises(ValueError, match=r"max_tokens=512 leaves no room for a prompt"):
        Speedrun(tmp_path / "e", "cpu", device="cpu", quiet=True, overrides={"max_tokens": 512})


def test_a_run_folder_older_than_a_setting_keeps_what_it_ran_with(tmp_path):
    import dataclasses

    from r1lab.speedrun.pipeline import SINCE

    settings = dataclasses.asdict(PRESETS["mini"])
    for key in SINCE:
        settings.pop(key)
    (tmp_path / "speedrun.json").write_text(json.dumps({"preset": "mini", "settings": settings, "stages": {}}))
    run = Speedrun(tmp_path, "mini", device="cpu", resume=True, quiet=True)
    assert {k: getattr(run.p, k) for k in SINCE} == SINCE != {k: getattr(PRESETS["cpu"], k) for k in SINCE}


def test_dynamic_sampling_setting_reaches_both_rl_stages(tmp_path):
    """`--set dynamic_sampling=true` turns on GRPO's dynamic sampling in R1-Zero and in reasoning RL (off by
    default: the run folders of the README were made without it)."""
    assert PRESETS["cpu"].dynamic_sampling is False
    for flag in (False, True):
        run = Speedrun(tmp_path / str(flag), "mini", device="cpu", quiet=True, overrides={"dynamic_sampling": flag})
        seen = []
        run._train = lambda module, recipe: seen.append(recipe.grpo.dynamic_sampling) or {}
        run.stage_r1_zero()
        run.stage_reasoning_rl()
        assert seen == [flag, flag]


def test_dtype_setting_reaches_every_trained_stage_and_the_evaluation(tmp_path, monkeypatch):
    """`--set dtype=float32` becomes run.dtype of the RL and SFT stages' recipes and the evaluation's dtype ("auto":
    bf16 on a GPU, fp32 on a CPU, as before); an unknown dtype is refused at setup, naming the setting."""
    import r1lab.eval

    assert PRESETS["cpu"].dtype == "auto"
    for value in ("auto", "float32"):
        run = Speedrun(tmp_path / value, "mini", device="cpu", quiet=True, overrides={"dtype": value})
        seen = []
        run._train = lambda module, recipe: seen.append(recipe.run.dtype) or {}
        run.stage_r1_zero()
        run.stage_cold_start()
        run.stage_reasoning_rl()
        assert seen == [value] * 3
        (run.out / "0-pretrain/base/final").mkdir(parents=True)
        (run.out / "0-pretrain/base/final/config.json").write_text("{}")
        monkeypatch.setattr(r1lab.eval, "evaluate", lambda *a, **kw: seen.append(kw["dtype"]) or
                            {"pass@1": 0.0, "cons@k": 0.0, "mean_tokens": 0.0, "truncated": 0.0})
        run._eval("base")
        assert seen[-1] == value
    with pytest.raises(ValueError, match=r"speedrun setting dtype='half': choose one of auto, float32, bfloat16"):
        Speedrun(tmp_path / "bad", "mini", device="cpu", quiet=True, overrides={"dtype": "half"})
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"unknown dtype 'half': choose one of auto, float32, bfloat16"):
        r1lab.eval.evaluate(tmp_path, "gsm8k", dtype="half")


def test_rl_micro_batches_by_positions_reach_both_rl_stages(tmp_path):
    """`rl_micro_tokens` becomes grpo.micro_tokens in R1-Zero and in reasoning RL (the CPU preset's 4,096; the
    GPU preset's 0 keeps rl_batch rows per micro-batch)."""
    assert PRESETS["cpu"].rl_micro_tokens == 4096 and PRESETS["gpu"].rl_micro_tokens == 0
    for value in (0, 512):
        run = Speedrun(tmp_path / str(value), "mini", device="cpu", quiet=True, overrides={"rl_micro_tokens": value})
        seen = []
        run._train = lambda module, recipe: seen.append((recipe.grpo.micro_tokens, recipe.train.batch_size)) or {}
        run.stage_r1_zero()
        run.stage_reasoning_rl()
        assert seen == [(value, PRESETS["mini"].rl_batch)] * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_lane_workers_start_with_the_malloc_settings_and_keep_the_users(monkeypatch):
    """The lanes' worker processes start with WORKER_MALLOC in their environment (glibc reads it at start), a
    value the user set stays, and the driver's own environment is as it was afterwards."""
    import concurrent.futures as cf
    import multiprocessing
    import os

    from r1lab.speedrun.pipeline import WORKER_MALLOC, _worker_malloc

    for key in WORKER_MALLOC:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")
    keys = sorted(WORKER_MALLOC)
    with _worker_malloc(), cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seen = [pool.submit(os.getenv, k).result() for k in keys]
    want = [("12345" if k == "MALLOC_TOP_PAD_" else WORKER_MALLOC[k]) for k in keys]
    assert seen == want
    assert [os.environ.get(k) for k in keys] == [None if k != "MALLOC_TOP_PAD_" else "12345" for k in keys]


def test_lookup_drills_recall_every_tagged_operand_in_a_random_order(tmp_path):
    """lookup_share: that share of the dialogues become drills ("Add a7 b3 c5. Recall: c5 a7 b3."), each recalling
    exactly the question's tagged operands in an order that is not always the question's; worked examples stay."""
    task = sdata.make_task("running-sum", n_operands=8, check_route="inverse")
    sdata.write_data(tmp_path, task, corpus_docs=1000, reasoning_share=0.25, rl_prompts=4, cold_start=4, test=4,
                     seed=1, textbook_share=0.25, lookup_share=0.2)
    rows = [json.loads(ln)["text"] for ln in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    drills = [r for r in rows if " Recall: " in r]
    assert sum(r.startswith("Example: ") for r in rows) == 250 and len(drills) == 150  # 0.2 of the 750 dialogues
    in_order = 0
    for r in drills:
        question, recalled = r.split(" Recall: ")
        asked = question.removeprefix("Add ").removesuffix(".").split()
        said = recalled.removesuffix(".").split()
        assert sorted(said) == sorted(asked) and len(said) == 8
        in_order += said == asked
    assert in_order <= 2  # a random order of eight: the question's own 1 time in 40,320
    small = sdata.make_task("running-sum", n_operands=3)
    p = small.problems(1, "train", 0)[0]
    assert p.question == "Add " + " ".join(f"{t}{v}" for t, v in zip("abc", p.meta["operands"])) + "."
    import random
    orders = {sdata.make_task("running-sum", n_operands=3).lookup_drill(p, random.Random(s)) for s in range(60)}
    assert len(orders) == 6  # every order of three operands turns up
    with pytest.raises(ValueError, match="has no lookup drills"):
        sdata.write_data(tmp_path / "x", sdata.make_task("addition"), corpus_docs=10, reasoning_share=0.2,
                         rl_prompts=1, cold_start=1, test=1, seed=0, lookup_share=0.1)


def test_sum_drills_write_chain_steps_spread_over_the_totals_a_chain_reaches(tmp_path):
    """sum_share: that share of the dialogues left after the lookup drills become addition drills ("Sums: 17 +c5=22
    ..."), each step a true addition written as a chain's step, its total one that as many operands as come before
    the tag can make; together they reach the large totals that a chain's last steps alone reach."""
    import random
    import re

    task = sdata.make_task("running-sum", n_operands=8, check_route="inverse")
    sdata.write_data(tmp_path, task, corpus_docs=1000, reasoning_share=0.25, rl_prompts=4, cold_start=4, test=4,
                     seed=1, textbook_share=0.2, lookup_share=0.25, sum_share=0.5)
    rows = [json.loads(ln)["text"] for ln in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    drills = [r for r in rows if r.startswith("Sums: ")]
    assert sum(" Recall: " in r for r in rows) == 200 and len(drills) == 300  # 0.5 of the 600 dialogues left
    assert sum(r.startswith("Example: ") for r in rows) == 200
    step = re.compile(r"(\d+) \+([a-h])(\d)=(\d+)")
    befores = []
    for r in drills:
        facts = step.findall(r)
        assert len(facts) == 7 and r == "Sums: " + " ".join(f"{a} +{t}{x}={b}" for a, t, x, b in facts) + "."
        for before, tag, x, after in facts:
            k = "abcdefgh".index(tag)
            assert k >= 1 and 0 <= int(before) <= 9 * k and int(after) == int(before) + int(x)
            befores.append(int(before))
    # a total of 40 or more comes before ~11% of the drills' steps (evenly over steps and totals), ~2% of a chain's
    assert max(befores) >= 55 and sum(b >= 40 for b in befores) > 0.08 * len(befores)
    # modular and padded sums write their steps as the chain does
    mod = sdata.make_task("running-sum", n_operands=4, modulus=10, padded=True)
    text = mod.sum_drill(mod.problems(1, "train", 0)[0], random.Random(3))
    for before, _, x, after in step.findall(text):
        assert len(before) == len(after) == 1 and int(after) == (int(before) + int(x)) % 10
    with pytest.raises(ValueError, match="has no addition drills"):
        sdata.write_data(tmp_path / "x", sdata.make_task("addition"), corpus_docs=10, reasoning_share=0.2,
                         rl_prompts=1, cold_start=1, test=1, seed=0, sum_share=0.1)


def test_model_config_changes_the_main_model_only_and_is_checked_at_setup(tmp_path):
    """--set 'model_config={...}' changes the main model's config, not the student's (even where both are one
    preset, as in mini), and a field ModelConfig lacks fails when the run is set up, naming the setting."""
    import torch

    from r1lab.checkpoint import CheckpointError
    from r1lab.model.config import get_preset
    from r1lab.speedrun import parse_sets
    from r1lab.train.loop import build_model

    sets = parse_sets(['model_config={"num_attention_heads": 8, "qk_nope_head_dim": 16}'])
    assert sets == {"model_config": (("num_attention_heads", 8), ("qk_nope_head_dim", 16))}
    run = Speedrun(tmp_path / "a", "mini", device="cpu", quiet=True, overrides=sets)
    build_task_tokenizer(run.data / "tokenizer", ["Add a1 b2."])
    recipes = {}
    run._train = lambda module, r: recipes.setdefault(r.run.out, r) and {}  # the recipes, not the training
    for who in ("base", "student"):
        try:
            run._pretrain(who)
        except CheckpointError:  # the parameter count of a model never written
            pass
    configs = {Path(out).name: build_model(r, torch.device("cpu")).config for out, r in recipes.items()}
    assert run.p.model == run.p.student == "speedrun-student"  # mini: one preset for both, still told apart
    assert (configs["base"].num_attention_heads, configs["base"].qk_nope_head_dim) == (8, 16)
    default = get_preset("speedrun-student")
    assert (configs["student"].num_attention_heads, configs["student"].qk_nope_head_dim) == (
        default.num_attention_heads, default.qk_nope_head_dim) != (8, 16)
    # the run folder's JSON gives the pairs back
    run._save()
    again = Speedrun(tmp_path / "a", "mini", device="cpu", quiet=True, resume=True)
    assert again.p.model_config == sets["model_config"]
    with pytest.raises(ValueError, match=r"model_config=\{'num_heads': 8\}: .*num_heads"):
        Speedrun(tmp_path / "b", "mini", device="cpu", quiet=True, overrides={"model_config": (("num_heads", 8),)})
    with pytest.raises(ValueError, match=r"model_config=\{'num_attention_heads': 0\}: .*num_attention_heads"):
        Speedrun(tmp_path / "c", "mini", device="cpu", quiet=True,
                 overrides={"model_config": (("num_attention_heads", 0),)})
    with pytest.raises(ValueError, match="not a JSON object of model config fields"):
        parse_sets(["model_config=8"])
    with pytest.raises(ValueError, match="not a JSON object of task knobs"):
        parse_sets(["task_knobs=[6]"])


def test_the_report_names_the_device_the_run_used(monkeypatch):
    """A speedrun on the CPU of a machine with a GPU (`--device cpu`) says the CPU ran it, not the GPU."""
    import torch

    from r1lab.speedrun.report import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    for device in ("cpu", torch.device("cpu")):
        assert hardware(device).endswith("(CPU)") and "Some GPU" not in hardware(device)
    for device in (None, "auto", "cuda", "cuda:0"):
        assert hardware(device).startswith("Some GPU (CUDA ")


def test_rollout_slips_count_what_the_checks_break(tmp_path):
    """RL's own rollouts over the first half of its steps, plain and checked apart: a check that turns a right first
    pass into a wrong answer counts as "other", a slip the check passes over as the first pass's own."""
    from r1lab.speedrun.report import _rollout_slips_table, rollout_slips

    prompt = "User: Add a2 b0 c8 d3. Assistant<think>\n"  # 13

    def roll(step, think, answer, right):
        return {"step": step, "prompt": prompt, "completion": f"{think}\n</think>\n\n<answer>{answer}</answer>",
                "answer": "13", "accuracy": float(right)}

    rows = [
        roll(1, "a2+b0=2 +c8=10 +d3=13. The answer is 13.", 13, True),
        roll(1, "a2+b0=2 +c8=11 +d3=14. The answer is 14.", 14, False),  # a wrong running total
        roll(2, "a2+b0=2 +c9=11 +d3=14. The answer is 14.", 14, False),  # c misread
        # a right first pass that a false alarm breaks
        roll(1, "a2+b0=2 +c8=10 +d3=13. Check: 2-b0=2 10-c8=2 13-d3=10, not 10. Wait, the first pass slipped: "
                "10+d3=14. The answer is 14.", 14, False),
        # a right first pass whose check agrees
        roll(2, "a2+b0=2 +c8=10 +d3=13. Check: 2-b0=2 10-c8=2 13-d3=10, as before. The answer is 13.", 13, True),
        # a slip the check passes over (it copies the first pass's totals)
        roll(2, "a2+b0=2 +c8=11 +d3=14. Check: 2-b0=2 11-c8=2 14-d3=11, as before. The answer is 14.", 14, False),
        # a slip the check catches and mends
        roll(1, "a2+b0=2 +c8=11 +d3=14. Check: 2-b0=2 11-c8=3, not 2. Wait, the first pass slipped: 2+c8=10 +d3=13. "
                "The answer is 13.", 13, True),
        roll(1, "The answer is 12.", 12, False),  # answers at once: in neither
        # the second half of the run's steps (4 steps: 3 and 4) is left out
        roll(3, "a2+b0=2 +c8=10 +d3=13. Check: 2-b0=2 10-c8=2 13-d3=10, not 10. The answer is 12.", 12, False),
        roll(4, "a2+b0=2 +c8=10 +d3=13. The answer is 13.", 13, True),
    ]
    run = tmp_path / "1-r1-zero"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = rollout_slips(run)
    assert got["worked"] == {"n": 3, "right": 1, "addition": 1, "lookup": 1, "other": 0, "mended": 0}
    assert got["checked"] == {"n": 4, "right": 2, "addition": 1, "lookup": 0, "other": 1, "mended": 1}
    table = _rollout_slips_table(tmp_path)
    assert "| R1-Zero | works it out and checks | 4 | 50.0% | 25.0% | 0.0% | 25.0% | 25.0% |" in table
    assert rollout_slips(tmp_path / "missing") == {} and _rollout_slips_table(tmp_path / "missing") == []
