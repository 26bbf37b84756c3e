"""Each reward on crafted completions, the `<think>`-in-the-prompt trap, combination and user rewards."""

import sys

import pytest

from r1lab.rewards import (accuracy_reward, combine, format_reward, language_reward, load_rewards, opened_think,
                           overlong_penalty, parse_reward)
from r1lab.train.grpo import R1_ZERO_TEMPLATE

PLAIN = "User: What is 2 + 3? Assistant:"  # the completion must open <think> itself
OPENED = R1_ZERO_TEMPLATE.format(question="What is 2 + 3")  # ends with "Assistant: <think>"

GOOD = "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"
CASES = {  # completion after PLAIN -> (accuracy, format)
    "correct": (GOOD, 1.0, 1.0),
    "wrong": ("<think> 2 + 3 = 6 </think> <answer> 6 </answer>", 0.0, 1.0),
    "answer missing": ("<think> 2 + 3 = 5 </think>", 0.0, 0.0),  # the reasoning's 5 is never graded
    "empty answer": ("<think> hm </think> <answer> </answer>", 0.0, 0.0),
    "extra text after": (GOOD + " and that is all", 1.0, 0.0),
    "unclosed think": ("<think> 2 + 3 = 5 <answer>5</answer>", 0.0, 0.0),
    "tags out of order": ("<answer>5</answer><think>2+3</think>", 1.0, 0.0),  # right answer, bad format
    "nested tag": ("<think> a <think> b </think> <answer>5</answer>", 1.0, 0.0),
    "two answers": (GOOD + "<answer>5</answer>", 1.0, 0.0),
    "no tags": ("5", 1.0, 0.0),
}


@pytest.mark.parametrize("name", CASES)
def test_accuracy_and_format_on_crafted_completions(name):
    text, acc, fmt = CASES[name]
    assert accuracy_reward([PLAIN], [text], answer=["5"]) == [acc]
    assert format_reward([PLAIN], [text]) == [fmt]


def test_prompt_that_opened_think_is_not_penalised():
    # The trap: the prompt already holds "<think>", so a well-formed completion has no opening tag.
    assert opened_think(OPENED) and not opened_think(PLAIN)
    assert "<think> </think>" in OPENED  # the template *mentions* the tags; that must not count as opened
    completion = " 2 + 3 = 5 </think> <answer>5</answer>"
    assert format_reward([OPENED], [completion]) == [1.0]
    assert format_reward([PLAIN], [completion]) == [0.0]  # without the opened prompt it is malformed
    assert accuracy_reward([OPENED], [completion], answer=["5"]) == [1.0]
    # Opening it again inside the completion is malformed; never closing it means no answer.
    assert format_reward([OPENED], ["<think> 5 </think> <answer>5</answer>"]) == [0.0]
    assert accuracy_reward([OPENED], ["2 + 3 = 5, <answer>5</answer>"], answer=["5"]) == [0.0]
    # The R1 chat template's generation prompt, with the think block opened
    chat = "<｜begin▁of▁sentence｜><｜User｜>2+3?<｜Assistant｜><think>\n"
    assert format_reward([chat], ["r</think><answer>5</answer>"]) == [1.0]


def test_accuracy_uses_math_equivalence_and_skips_rows_without_answer():
    assert accuracy_reward([PLAIN] * 3, ["<answer>\\frac{1}{2}</answer>", "<answer>0.5</answer>", "x"],
                           answer=["1/2", "1/2", None]) == [1.0, 1.0, None]
    assert accuracy_reward([PLAIN], ["5"]) == [None]  # no answer column at all


def test_language_consistency_is_the_share_of_letters_in_the_target_script():
    en = "<think> abcd 中文 </think><answer>1</answer>"  # 4 Latin letters, 2 Han
    assert language_reward([PLAIN], [en]) == [pytest.approx(4 / 6)]
    assert language_reward([PLAIN], [en], language=["zh"]) == [pytest.approx(2 / 6)]
    assert language_reward([OPENED], ["только русский </think>"], language=["ru"]) == [1.0]
    assert language_reward([PLAIN], ["no reasoning"]) == [None]
    assert language_reward([PLAIN], ["<think> 1 + 2 </think>"]) == [None]  # no letters
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        language_reward([PLAIN], [en], language=["xx"])


def test_overlong_penalty_is_dapos_soft_ramp():
    f = overlong_penalty(max_tokens=10, buffer=4)  # free up to 6 tokens, -1 at 10
    got = f([""] * 5, [""] * 5, completion_ids=[[0] * n for n in (3, 6, 7, 8, 10)])
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(10, 0)


def test_weighted_combination_ignores_none():
    rewards = load_rewards(["accuracy=1", "format=0.5"])
    total, per = combine(rewards, [PLAIN, PLAIN], [GOOD, "6"], answer=["5", None])
    assert per == {"accuracy": [1.0, None], "format": [1.0, 0.0]}
    assert total == [1.5, 0.0]


def test_user_rewards_by_module_function_with_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
        "NOT_A_FN = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = parse_reward("my_rewards:length=0.25")
    assert (r.name, r.weight) == ("length", 0.25)
    assert combine([r], ["p"], ["abcd"])[0] == [1.0]
    assert parse_reward("format").weight == 1.0
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'.*ModuleNotFoundError"):
        parse_reward("no_such_module:f=1")
    with pytest.raises(ValueError, match="cannot import module 'broken_rewards'.*does_not_exist_anywhere"):
        parse_reward("broken_rewards:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        parse_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="not callable"):
        parse_reward("my_rewards:NOT_A_FN")
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        parse_reward("acc=1")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        parse_reward("format=x")
    with pytest.raises(ValueError, match="more than once"):
        load_rewards(["format", "format=2"])
    sys.modules.pop("my_rewards", None)


def test_user_rewards_get_trl_conversational_format_for_chat_prompts(tmp_path, monkeypatch):
    """A reward written for TRL's conversational datasets reads completion[0]["content"]; built-ins get text."""
    (tmp_path / "trl_style.py").write_text(
        "def says_four(prompts, completions, **kw):\n"
        "    assert isinstance(prompts[0], list) and prompts[0][-1]['role'] == 'user'\n"
        "    return [1.0 if '4' in c[0]['content'] else 0.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from r1lab.rewards import combine, load_rewards

    rewards = load_rewards(["trl_style:says_four=1", "accuracy=1"])
    conversations = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = ["<think>2+2</think><answer>4</answer>", "<think>hm</think><answer>5</answer>"]
    total, per = combine(rewards, ["rendered prompt"] * 2, completions, conversations, answer=["4", "4"])
    assert per["says_four"] == [1.0, 0.0] and per["accuracy"] == [1.0, 0.0] and total == [2.0, 0.0]
    # without conversations (R1-Zero plain-text prompts) the same function would get strings, as in TRL
    plain = load_rewards(["accuracy=1"])
    assert combine(plain, ["p"] * 2, completions, None, answer=["4", "4"])[0] == [1.0, 0.0]
