"""GRPO and TRL's conventions: conversational prompt rows, conversational reward inputs, TRL's shipped rewards;
and GRPO rollouts that call tools."""

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch

from r1lab import Transformer, get_preset
from r1lab.cli import main
from r1lab.data import render_sft
from r1lab.tokenizer import load_tokenizer, tools_prompt
from r1lab.tools import calculator, function_schema
from r1lab.train.grpo import GRPORecipe, GRPOTrainer, completion_logprobs, load_prompt_rows, render_prompt

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, machine-independent results


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny_real_vocab(seed=0):
    """The tiny preset with the real tokenizer's vocabulary (random weights)."""
    cfg = get_preset("tiny").replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.to_empty(device="cpu").init_weights(seed=seed)


def chat_recipe(tmp_path, rewards, **grpo):
    r = GRPORecipe.defaults()
    r.run.out, r.run.device = str(tmp_path / "run"), "cpu"
    r.grpo.prompt_style, r.grpo.rewards, r.grpo.max_tokens = "chat", rewards, 6
    r.grpo.prompts_per_step, r.grpo.group_size, r.grpo.beta = 2, 2, 0.0
    r.train.steps, r.train.batch_size, r.ckpt.every, r.ckpt.export, r.log.every = 1, 4, 0, False, 0
    for k, v in grpo.items():
        setattr(r.grpo, k, v)
    return r


# ---------------------------------------------------------------------- TRL's data and reward conventions
def test_trl_conversational_prompt_rows_are_accepted(tmp_path, tok):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "answer": "4"},
            {"prompt": "3+4?", "answer": "7"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = GRPORecipe.defaults()
    r.data.train = [str(f)]
    got = load_prompt_rows(r)
    assert got[0]["messages"] == rows[0]["prompt"] and "prompt" not in got[0] and got[1]["prompt"] == "3+4?"
    assert render_prompt(got[0], "chat", tok) == \
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>"
    assert render_prompt(got[0], "r1-zero").endswith("User: 2+2? Assistant: <think>")
    f.write_text('{"prompt": [{"role": "user"}], "answer": "4"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: the prompt's messages must be .* \(message 0 is not\)"):
        load_prompt_rows(r)
    f.write_text('{"prompt": [], "answer": "4"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: the prompt's messages must be a non-empty list"):
        load_prompt_rows(r)


SEEN = []


def record(prompts, completions, **kw):
    """A user reward that keeps what it was given."""
    SEEN.append((prompts, completions, kw))
    return [0.0] * len(completions)


@pytest.mark.parametrize("open_think", [False, True])
def test_task_prompts_in_chat_style_give_user_rewards_trl_conversations(tmp_path, tok, open_think):
    # rows from a built-in task have a string prompt; rendered with the chat template, user rewards get the
    # conversation (system prompt included) and the completion as an assistant message, as TRL gives them
    SEEN.clear()
    r = chat_recipe(tmp_path, ["test_tools_grpo:record=1", "accuracy=1"], system="Sys.", open_think=open_think)
    rows = [{"prompt": f"{a}+1?", "answer": str(a + 1)} for a in range(2)]
    t = GRPOTrainer(r, tiny_real_vocab(), tok, rows, quiet=True)
    ro = t.rollout(0)
    ((prompts, completions, kw),) = SEEN
    order = [rows.index(x) for x in ro.rows]
    assert prompts == [[{"role": "system", "content": "Sys."}, {"role": "user", "content": f"{i}+1?"}] for i in order]
    start = "<think>\n" if open_think else ""
    assert completions == [[{"role": "assistant", "content": start + c}] for c in ro.completions]
    assert kw["answer"] == [str(i + 1) for i in order] and kw["completion_ids"] == ro.completion_ids
    assert len(completions) == 4 and all(isinstance(c, str) for c in ro.completions)


def test_trl_shipped_rewards_run_unchanged(tmp_path, capsys):
    """TRL's own reward functions through `--reward trl.rewards:NAME` on a built-in task in chat style (they read
    completion[0]["content"]: with plain strings they fail with "string indices must be integers")."""
    trl_rewards = pytest.importorskip("trl.rewards", reason="TRL is not installed")
    assert hasattr(trl_rewards, "think_format_reward")
    args = ["grpo", "--recipe", str(ROOT / "recipes" / "grpo-tiny.toml"), "--run.out", str(tmp_path / "run"),
            "--grpo.prompt-style", "chat", "--grpo.open-think", "true", "--train.steps", "1",
            "--grpo.max-tokens", "4", "--grpo.task-size", "8", "--ckpt.export", "false", "--run.device", "cpu",
            "--reward", "trl.rewards:think_format_reward=1"]
    assert main(args) == 0, capsys.readouterr().err
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["reward/think_format_reward"] is not None and 0.0 <= rec["reward/think_format_reward"] <= 1.0


# ---------------------------------------------------------------------- GRPO rollouts that call tools
CALC = [function_schema(calculator)]
ASK = [{"role": "user", "content": "6*7?"}]
THINK = "<think>\nuse it\n</think>\n\n"
CALL = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
WITH_TOOL = ASK + [{"role": "assistant", "content": THINK, "tool_calls": [CALL]}]
AFTER_TOOL = WITH_TOOL + [{"role": "tool", "content": "42"}]
GOOD = "The answer is 42."
BAD = "The answer is 41."


def teach(model, tok, lessons, steps=100, lr=5e-3, schemas=CALC):
    """AdamW on the last turn of each lesson (render_sft's mask), the conversation rendered with `schemas`
    listed; the output head only on the predicted positions."""
    with_tools = lambda m: m[:-1] + [{"role": "system", "content": tools_prompt(schemas)}] + m[-1:]  # noqa: E731
    seqs = [render_sft(with_tools(m), tok) for m in lessons]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        for ids, mask in seqs:
            h = model(torch.tensor([ids[:-1]]), return_hidden=True)[0]
            where = torch.tensor(mask[1:])
            torch.nn.functional.cross_entropy(model.lm_head(h[where]), torch.tensor(ids[1:])[where]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def caller(tok):
    """A tiny model that, asked "6*7?", reasons, calls the calculator and after its output answers."""
    torch.manual_seed(0)
    return teach(tiny_real_vocab(), tok, [WITH_TOOL, AFTER_TOOL + [{"role": "assistant", "content": GOOD}]])


def tool_trainer(tmp_path, model, tok, tools=("calculator",), rewards=("test_tools_grpo:record=1",), **grpo):
    r = chat_recipe(tmp_path, list(rewards), tools=list(tools), max_tokens=80, temperature=0.05, **grpo)
    return GRPOTrainer(r, copy.deepcopy(model), tok, [{"prompt": "6*7?", "answer": "42"}] * 2, quiet=True)


def test_tool_rollout_trajectory_mask_and_logprobs(tmp_path, tok, caller):
    SEEN.clear()
    t = tool_trainer(tmp_path, caller, tok)
    ro = t.rollout(0)
    # every sample calls the tool (the taught reply has nearly all the mass at temperature 0.05)
    assert sum(ro.tool_calls) == 4 and all(f == "stop" for f, n in zip(ro.finish, ro.tool_calls) if n)
    i = ro.tool_calls.index(1)
    # the ids are the template's rendering of the whole conversation, tool output included
    conversation = AFTER_TOOL + [{"role": "assistant", "content": GOOD}]
    full = tok.apply_chat_template(conversation, tools=CALC, tokenize=True)
    prompt = tok.apply_chat_template(ASK, add_generation_prompt=True, tools=CALC, tokenize=True)
    assert ro.prompt_ids[i] == prompt and ro.prompt_ids[i] + ro.completion_ids[i] == full
    # by hand: the tool block is these tokens, and only they are out of the loss
    marker = tok.token_to_id
    block = [marker("<｜tool▁outputs▁begin｜>"), marker("<｜tool▁output▁begin｜>"), *tok.encode("42"),
             marker("<｜tool▁output▁end｜>"), marker("<｜tool▁outputs▁end｜>")]
    ids, mask = ro.completion_ids[i], ro.token_mask[i]
    start = ids.index(block[0])
    assert ids[start:start + len(block)] == block and ids[start - 1] == tok.eos_id  # after the call turn's EOS
    assert mask == [1] * start + [0] * len(block) + [1] * (len(ids) - start - len(block))
    assert all(lp == 0.0 for lp, m in zip(ro.old_logp[i], mask) if not m)
    # The second turn is the conversation so far resubmitted; every full page of the first turn's context
    # (prompt and reply; its last token is written by the next step) comes from the prefix cache, not a prefill.
    from r1lab.engine.pages import PAGE

    assert len(prompt) + start > PAGE  # the tools prompt alone fills a page
    assert ro.resubmitted[i] == [len(prompt) + start + len(block), (len(prompt) + start - 1) // PAGE * PAGE]
    assert all((c > 0) == (n > 0) and (r > 0) == (n > 0) for n, (r, c) in zip(ro.tool_calls, ro.resubmitted))
    # the user reward got the trajectory in TRL's conversational format
    ((prompts, completions, _),) = SEEN
    assert prompts[i] == ASK and completions[i] == [
        {"role": "assistant", "content": THINK, "tool_calls": [CALL]},
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "assistant", "content": GOOD}]
    # teacher forcing of the whole trajectory = the engine's log-probs of both turns (the second one sampled from
    # the resubmitted conversation): fp32, different kernels and shapes, observed ~1e-6 apart
    logp, m, _ = completion_logprobs(t.model, [ro.prompt_ids[i]], [ro.completion_ids[i]], 0.05, token_mask=[mask])
    assert m[0].tolist() == [bool(x) for x in mask]
    assert (logp[0][~m[0]] == 0).all()
    torch.testing.assert_close(logp[0], torch.tensor(ro.old_logp[i]), rtol=0, atol=1e-3)


def test_tool_rollouts_sampled_in_the_background_with_grpo_async(tmp_path, tok, caller):
    """grpo.async: step 2 trains on the batch sampled in the sampler thread during step 1's update; its tool calls
    ran from that thread (each in its own child process) as a synchronous rollout's do."""
    t = tool_trainer(tmp_path, caller, tok, async_=True)
    first = t.grpo_step()
    t.step += 1
    second = t.grpo_step()
    assert (first["policy_lag"], second["policy_lag"]) == (0, 1)
    assert first["tool_calls"] == second["tool_calls"] == 1  # every sample called the calculator once
    assert 0.5 < first["resubmitted_cached"] < 1  # the full pages of each first turn (the tail is prefilled)
    assert t._last_rollout.tool_calls == [1] * 4 and 0 in t._last_rollout.token_mask[0]


def test_tool_output_tokens_get_no_gradient(tmp_path, tok, caller):
    """The loss's gradient does not depend on what the tool answered beyond its effect as context: changing the
    sampling-time log-probs stored for the tool tokens (which a bug would feed into the ratio) changes nothing."""
    t = tool_trainer(tmp_path, caller, tok, rewards=["test_tools_grpo:record=1"])
    ro = t.rollout(0)
    assert not all(all(m) for m in ro.token_mask)  # tool tokens are there
    # The taught model writes the same trajectory four times, and identical samples cancel (a group's
    # advantages sum to zero): change one model token of the first sample so the gradient is not zero.
    j = max(k for k, m in enumerate(ro.token_mask[0]) if m and ro.completion_ids[0][k] != tok.eos_id)
    ro.completion_ids[0][j] = (ro.completion_ids[0][j] + 1) % tok.vocab_size
    ro.rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    grads = []
    for fill in (0.0, -5.0):
        for i, mask in enumerate(ro.token_mask):
            ro.old_logp[i] = [lp if m else fill for lp, m in zip(ro.old_logp[i], mask)]
        t.model.zero_grad()
        seen = []
        t.optimizer.step = lambda seen=seen: seen.append(
            torch.cat([p.grad.flatten() for p in t.master.master if p.grad is not None]).clone())
        t._optimise(ro)
        grads.append(seen[0])
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # the same computation: bitwise equal


HANG_MODULE = '''
import time
def calculator(expression: str) -> str:
    if expression == "6*7":
        {body}
    return "0"


calculator.__doc__ = {doc!r}
'''


@pytest.mark.parametrize("body, says", [("while True: time.sleep(1)", "did not finish within 0.5 s"),
                                        ("raise RuntimeError('broken tool')", "RuntimeError: broken tool")])
def test_a_tool_that_hangs_or_raises_does_not_stop_training(tmp_path, tok, caller, monkeypatch, body, says):
    # a tool with the built-in calculator's schema (so the same prompt), that hangs or raises
    name = f"bad_tool_{'hang' if 'sleep' in body else 'raise'}"
    (tmp_path / f"{name}.py").write_text(HANG_MODULE.format(doc=calculator.__doc__, body=body))
    monkeypatch.syspath_prepend(str(tmp_path))
    SEEN.clear()
    t = tool_trainer(tmp_path, caller, tok, tools=[f"{name}:calculator"], tool_timeout=0.5)
    assert t.prompt_text[0] == tool_trainer(tmp_path / "b", caller, tok).prompt_text[0]
    rec = t.run_step()
    assert rec["tool_calls"] == 1.0 and rec["updates"] == 1
    tool_msgs = [m for c in SEEN[0][1] for m in c if m["role"] == "tool"]
    assert len(tool_msgs) == 4 and all(says in m["content"] and m["content"].startswith("Error: ")
                                       for m in tool_msgs)


def test_tool_recipe_errors(tmp_path, tok, caller):
    with pytest.raises(ValueError, match="grpo.tools need grpo.prompt_style = 'chat'"):
        r = chat_recipe(tmp_path, ["accuracy=1"], tools=["calculator"], prompt_style="raw")
        r.grpo.task = "addition-1"
        r.validate()
    with pytest.raises(ValueError, match="tool 'nowhere:f': cannot load it"):
        tool_trainer(tmp_path, caller, tok, tools=["nowhere:f"])


def oracle() -> str:
    """Tell the secret number of this moment (1 to 4)."""
    # It changes at every call: 1, 2, 3, 4, 1, ... counted in a file, since each call runs in its own process
    # (a deterministic sequence keeps the test's outcome a function of its seeds).
    path = Path(os.environ["R1LAB_TEST_ORACLE"])
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    return str(n % 4 + 1)


ASK_SECRET = [{"role": "user", "content": "Secret?"}]
ORACLE_CALL = ASK_SECRET + [{"role": "assistant", "content": THINK, "tool_calls": [
    {"type": "function", "function": {"name": "oracle", "arguments": "{}"}}]}]
_GUESS = random.Random(0)


def says_the_secret(prompts, completions, **kw):
    """1 when the final answer names the number the oracle told in this trajectory; a trajectory that did not
    ask it is checked against a fresh draw (as if the secret were drawn when it answered): right 1 time in 4."""
    out = []
    for c in completions:
        told = [m["content"] for m in c if m["role"] == "tool"]
        secret = told[-1] if told else str(_GUESS.randint(1, 4))
        out.append(1.0 if c[-1]["content"].strip() == f"The answer is {secret}." else 0.0)
    return out


def test_grpo_learns_to_call_the_tool(tmp_path, tok, monkeypatch):
    """Cold start: asked "Secret?", one demonstration asks the oracle tool and answers what it said, another
    guesses at once; the model starts split between the two. Only the tool knows the answer (it changes every
    call), so GRPO on the answer's correctness must make the model call it more often, and the reward rise."""
    monkeypatch.setenv("R1LAB_TEST_ORACLE", str(tmp_path / "oracle-calls"))
    torch.manual_seed(0)
    # the call's first turn is taught twice to the guess's once: a call is a longer turn to get right, and with one
    # lesson each the model on an Intel Xeon started calling in 6% of its samples, too few for GRPO's groups to
    # see calls pay (calls then died out, at any rate, temperature or group size tried); with two it starts at 38%
    lessons = [ORACLE_CALL, ORACLE_CALL, ASK_SECRET + [{"role": "assistant", "content": "The answer is 1."}]]
    lessons += [ORACLE_CALL + [{"role": "tool", "content": d}, {"role": "assistant", "content": f"The answer is {d}."}]
                for d in "1234"]
    model = teach(tiny_real_vocab(), tok, lessons, schemas=[function_schema(oracle)])
    r = chat_recipe(tmp_path, ["test_tools_grpo:says_the_secret=1"], tools=["test_tools_grpo:oracle"],
                    max_tokens=60, temperature=0.7, group_size=8)
    r.optim.lr, r.train.steps = 3e-4, 30
    t = GRPOTrainer(r, model, tok, [{"prompt": "Secret?"}] * 2, quiet=True)
    calls, with_tool, without = [], [], []
    for _ in range(r.train.steps):
        calls.append(t.run_step()["tool_calls"])
        ro = t._last_rollout
        for n, rw in zip(ro.tool_calls, ro.rewards.tolist()):
            (with_tool if n else without).append(rw)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert calls[0] <= 0.5, calls  # the premise: calling is not the habit at first
    # observed with one call lesson: on an AMD EPYC calls stayed at 0-0.25 for 15 steps, then rose to 0.94 by step
    # 29; with two, on an Intel Xeon: 0.38 at step 1, 0.94 by step 7, 1.0 from step 24 (with-tool reward 0.51
    # against 0.20)
    assert mean(calls[-3:]) > mean(calls[:3]) + 0.2, calls
    # and it paid: the samples that called the tool earned more (observed 0.54 against 0.23)
    assert mean(with_tool) > mean(without) + 0.15, (mean(with_tool), mean(without), calls)
