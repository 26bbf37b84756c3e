"""The calculator demonstration (r1lab/speedrun/calculator.py): the problem split, the demonstrations as the
template and the RL prompts render them, the answer reward, and the whole pipeline at toy sizes."""

import json
import re

import pytest

from r1lab.data import render_sft
from r1lab.speedrun import calculator as demo
from r1lab.speedrun.report import paired_margin
from r1lab.speedrun.vocab import MARKERS, TOOL_MARKERS, build_task_tokenizer
from r1lab.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN,
                             TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_SEP)
from r1lab.train.grpo import render_prompt, render_prompt_ids


pytestmark = pytest.mark.usefixtures("one_thread")


def test_held_out_problems_are_never_trained_on():
    train, test = demo.problems(500, 100, seed=3)
    assert len(train) == 500 and len(test) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        a, b = map(int, r["expression"].split(" * "))
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert r["prompt"] == f"What is {a} * {b}?" and r["answer"] == str(a * b)
    assert demo.problems(500, 100, seed=3) == (train, test)  # seeded


def test_the_tokenizer_keeps_the_speedrun_ids_and_adds_tool_markers(tmp_path):
    texts = ["Add a7 b3 c5.", "What is 12 * 34?"]
    plain = build_task_tokenizer(tmp_path / "a", texts, min_count=1)
    tools = build_task_tokenizer(tmp_path / "b", texts, min_count=1, markers=MARKERS + TOOL_MARKERS)
    assert [plain.token_to_id(m) for m in MARKERS] == list(range(4, 4 + len(MARKERS)))  # as before
    assert plain.token_to_id(TOOL_MARKERS[0]) is None
    assert all(len(tools.encode(m)) == 1 for m in TOOL_MARKERS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calc")
    s = demo.Settings(train=30, test=6, demos=30, tool_share=0.5)
    return folder, s, demo.write_data(folder, s)


def test_demonstrations_call_the_calculator_with_the_question_and_read_the_product(data):
    folder, s, tok = data
    train = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    demos = [json.loads(x)["messages"] for x in (folder / "cold_start.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in train}
    calls = answers = 0
    for msgs in demos:
        row = by_prompt[msgs[1]["content"]]
        ids, mask = render_sft(msgs, tok)  # trainable as `r1lab sft` reads it
        assert tok.token_to_id("<unk>") not in ids
        # the conversation starts exactly as GRPO renders the row's prompt with the calculator offered
        text = render_prompt(row, "chat", tok, tools=[demo.SCHEMA])
        prompt = render_prompt_ids(row, text, "chat", tok, tools=[demo.SCHEMA])
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        for m in msgs:
            for c in m.get("tool_calls", []):
                calls += 1
                assert c["function"]["name"] == "calculator"
                assert json.loads(c["function"]["arguments"]) == {"expression": row["expression"]}
        tool = [m for m in msgs if m["role"] == "tool"]
        if tool:
            answers += 1
            assert tool[0]["content"] == row["answer"] == str(eval(row["expression"]))
            # the output is read between the template's tool-output markers
            out = [tok.token_to_id(TOOL_OUTPUT_BEGIN), *tok.encode(row["answer"]), tok.token_to_id(TOOL_OUTPUT_END)]
            assert any(ids[i:i + len(out)] == out for i in range(len(ids)))
        if msgs[-1].get("tool_calls") is None:
            assert demo.final_answer([None], [msgs[-1:]], [row["answer"]]) == [1.0]
    assert calls > 0 and answers > 0 and len(demos) == s.demos + answers  # a call turn and an answer per tool demo


def test_the_pretraining_corpus_repeats_its_numbers():
    docs = demo.copy_corpus(50, seed=1)
    assert len(docs) == 50 and docs == demo.copy_corpus(50, seed=1)
    for d in docs:
        for line in d["text"].splitlines():
            nums = re.findall(r"\d+", line)
            assert nums and all(nums.count(n) >= 2 for n in nums), line  # every number occurs again


def test_the_schema_is_the_built_in_calculator_described_in_a_line(data):
    folder, s, tok = data
    assert demo.calculator("347 * 829") == "287663"
    fn = demo.SCHEMA["function"]
    assert fn["name"] == "calculator" and "\n" not in fn["description"]
    assert fn["parameters"]["required"] == ["expression"]
    row = {"prompt": "What is 347 * 829?"}
    text = render_prompt(row, "chat", tok, tools=[demo.SCHEMA])
    assert len(render_prompt_ids(row, text, "chat", tok, tools=[demo.SCHEMA])) < 160  # was about 330


def test_the_reward_reads_the_last_turn_only():
    conv = [{"role": "assistant", "content": "x", "tool_calls": []}, {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "The answer is 42."}]
    assert demo.final_answer([None] * 3, [conv, conv[:2], conv[-1:]], ["42", "42", "41"]) == [1.0, 0.0, 0.0]
    thinking = [{"role": "assistant", "content": "<think>\nThe answer is 42.\n</think>\n\nNo idea."}]
    assert demo.final_answer([None], [thinking], ["42"]) == [0.0]


def test_copy_rates_find_where_a_tool_using_sample_went_wrong():
    """The diagnostics of the report: of the samples that called the calculator, the share whose call copied the
    question and the share whose answer copied the tool's output (right or wrong); samples without a call do
    not count."""
    def sample(expr, output, said):
        return (f'<think>\nx\n</think>\n\n{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}calculator\n```json\n'
                f'{{"expression": "{expr}"}}\n```{TOOL_CALL_END}{TOOL_CALLS_END}<eos>{TOOL_OUTPUTS_BEGIN}'
                f'{TOOL_OUTPUT_BEGIN}{output}{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}The answer is {said}.<eos>')
    row = {"expression": "347 * 829", "answer": "287663"}
    texts = [sample("347 * 829", "287663", "287663"),  # all right
             sample("347 * 828", "287316", "287316"),  # a wrong call, its output copied
             sample("347 * 829", "287663", "287668"),  # a right call, the output miscopied
             "<think>\nx\n</think>\n\nThe answer is 287663."]  # no call: not counted
    assert demo.copy_rates([row] * 4, texts, [1, 1, 1, 0]) == (2 / 3, 2 / 3)
    assert demo.copy_rates([row], texts[-1:], [0]) == (None, None)


def test_paired_standard_error_by_hand():
    """The report's gains (report.paired_margin, after - before, paired by problem), by hand."""
    before, after = {"a": 0.0, "b": 0.5, "c": 1.0}, {"a": 1.0, "b": 0.5, "c": 1.0}
    mean, se = paired_margin(after, before)  # differences 1, 0, 0: mean 1/3, sample variance 1/3
    assert mean == pytest.approx(1 / 3) and se == pytest.approx((1 / 3 / 3) ** 0.5)


def test_the_defaults_start_split_between_the_habits():
    """The validated preset (benchmarks/LOG.md, tenth session): half the demonstrations call the calculator, so
    RL has both habits to choose between, and the cold start is long enough for the digits to be copied."""
    s = demo.Settings()
    assert 0 < s.tool_share < 1 and s.demos >= 400 and s.sft_steps >= 1200
    demos = [demo.demonstration(r, use) for r, use in zip(demo.problems(4, 1)[0], (True, False, True, False))]
    assert [len(d) for d in demos] == [2, 1, 2, 1]  # a call turn and an answer turn; one direct answer


def test_the_whole_demonstration_at_toy_sizes(tmp_path, capsys):
    """Every stage runs and writes its files; the numbers mean nothing at this size (no learning asserted)."""
    argv = ["--out", str(tmp_path / "run"), "--train", "24", "--test", "4", "--demos", "8", "--corpus", "20",
            "--pretrain-steps", "2", "--pretrain-batch", "2", "--sft-steps", "2",
            "--sft-batch", "4", "--rl-steps", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--max-tokens", "40", "--quiet"]
    assert demo.main(argv) == 0
    out = tmp_path / "run"
    for f in ("data/train.jsonl", "data/test.jsonl", "data/cold_start.jsonl", "data/tokenizer/tokenizer.json",
              "data/corpus.jsonl", "pretrain/final/model.safetensors", "cold-start/final/model.safetensors", "rl/final/model.safetensors", "rl/metrics.jsonl",
              "results.json", "report.md", "curve.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert [c["step"] for c in res["curve"]] == [1, 2]
    report = (out / "report.md").read_text()
    for key in ("cold_start", "no_tool", "rl"):
        assert 0 <= res[key]["accuracy"] <= 1 and f"{res[key]['accuracy']:.3f}" in report
    assert f"{res['rl']['tool_calls']:.2f}" in report and "standard error" in report
    assert len(res["tool_call_gain"]) == 2 and "call copies the question" in report
    assert "accuracy" in capsys.readouterr().out
