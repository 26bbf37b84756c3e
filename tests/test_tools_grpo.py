"""GRPO and TRL's conventions: conversational prompt rows, conversational reward inputs, TRL's shipped rewards;
and GRPO rollouts that call tools."""

import json
import sys
from pathlib import Path

import pytest
import torch

from r1lab import Transformer, get_preset
from r1lab.cli import main
from r1lab.tokenizer import load_tokenizer
from r1lab.train.grpo import GRPORecipe, GRPOTrainer, load_prompt_rows, render_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
