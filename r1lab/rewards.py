"""Rule-based rewards for GRPO, each a plain function with TRL's signature.

    reward(prompts: list[str], completions: list[str], **row_fields) -> list[float | None]

`row_fields` are the prompt rows' other columns as lists aligned with `completions` (`answer=[...]`,
`language=[...]`), plus `completion_ids` (the sampled token ids, EOS included). `None` leaves a sample out of
that reward (it neither helps nor hurts). Functions written for TRL's `GRPOTrainer` therefore work unchanged,
and these work in TRL.

Built in (DeepSeek-R1 paper, section 2.2.2 and 2.3.2; DAPO section 3.4):
  accuracy  1 when the extracted answer is mathematically equal to the row's `answer`, else 0
  format    1 when the completion is `<think> reasoning </think> <answer> answer </answer>` and nothing else
  language  share of the reasoning's letters written in the row's target language's script
  overlong  DAPO's soft length penalty (0 up to max_tokens - buffer, linear down to -1 at max_tokens)

The known trap: R1-style prompts often end with `<think>` already (our R1-Zero template does; R1 chat
templates do when they open the think block), so the completion starts inside the reasoning and has only
`</think>`. Every reward here asks `opened_think(prompt)` and puts the tag back before judging.

`load_rewards(["accuracy=1", "format=0.5", "my_module:my_fn=0.2"])` builds the weighted set; the total is
the weighted sum over the rewards that did not return None (TRL's nansum).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .grading import extract_answer, math_equal

__all__ = ["accuracy_reward", "format_reward", "language_reward", "overlong_penalty", "opened_think",
           "RewardFn", "WeightedReward", "parse_reward", "load_rewards", "combine", "BUILTIN"]

RewardFn = Callable[..., list]


def opened_think(prompt: str) -> bool:
    """Whether the prompt ends inside a `<think>` block (its last `<think>` is not closed), so the completion
    continues the reasoning. Instructions that merely *mention* `<think> ... </think>` do not count."""
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def _full(prompt: str, completion: str) -> str:
    """The completion as if the prompt had not opened the think block."""
    return "<think>" + completion if opened_think(prompt) else completion


# ---------------------------------------------------------------------- accuracy
def accuracy_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None,
                    **_) -> list[float | None]:
    """1.0 when `extract_answer` of the completion `math_equal`s the row's answer, 0.0 otherwise (reasoning
    never graded; unfinished reasoning has no answer); None for rows without an answer."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for p, c, a in zip(prompts, completions, answer):
        if a is None:
            out.append(None)
            continue
        out.append(1.0 if math_equal(extract_answer(_full(p, c)), str(a)) else 0.0)
    return out


# ---------------------------------------------------------------------- format
_TAGS = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def format_ok(prompt: str, completion: str) -> bool:
    """`<think>` r `</think>` `<answer>` a `</answer>` with r and a non-empty, each tag exactly once and in
    that order, only whitespace between the blocks and after the answer."""
    text = _full(prompt, completion)
    if [m.group() for m in _TAGS.finditer(text)] != ["<think>", "</think>", "<answer>", "</answer>"]:
        return False
    m = _FORMAT.fullmatch(text)
    return bool(m and m.group("think").strip() and m.group("answer").strip())


def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float | None]:
    """1.0 for a well-formed `<think>...</think><answer>...</answer>` completion, else 0.0."""
    return [1.0 if format_ok(p, c) else 0.0 for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------------- language consistency
# Target language -> the Unicode script names (prefixes of unicodedata.name) its letters are written in.
SCRIPTS = {"en": ("LATIN",), "fr": ("LATIN",), "de": ("LATIN",), "es": ("LATIN",), "it": ("LATIN",),
           "pt": ("LATIN",), "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",),
           "ru": ("CYRILLIC",), "uk": ("CYRILLIC",), "ar": ("ARABIC",), "he": ("HEBREW",), "el": ("GREEK",),
           "hi": ("DEVANAGARI",), "th": ("THAI",)}


def script_share(text: str, language: str) -> float | None:
    """Share of the letters of `text` in `language`'s script; None when it has no letters.

    The R1 paper measures the proportion of target-language words in the chain of thought; by script is the
    dependency-free version of that (it cannot tell English from French, but catches the mixing the paper
    reports: Chinese and English in one reasoning)."""
    scripts = SCRIPTS.get(language)
    if scripts is None:
        raise ValueError(f"language reward: unknown language {language!r}; known: {', '.join(SCRIPTS)}")
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    good = sum(1 for ch in letters if unicodedata.name(ch, "").startswith(scripts))
    return good / len(letters)


def language_reward(prompts: Sequence[str], completions: Sequence[str], language: Sequence[str] | None = None,
                    **_) -> list[float | None]:
    """Share of the reasoning (inside `<think>`) in the row's `language` (default English); None when there is
    no reasoning with letters."""
    from .tokenizer import split_reasoning

    out: list[float | None] = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        reasoning, _ = split_reasoning(c, started_in_prompt=opened_think(p))
        lang = language[i] if language is not None and language[i] else "en"
        out.append(script_share(reasoning, lang) if reasoning else None)
    return out


# ---------------------------------------------------------------------- overlong penalty
def overlong_penalty(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment (eq. 13): 0 for at most max_tokens - buffer tokens, then falling
    linearly to -1 at max_tokens (and -1 beyond). Counts `completion_ids` (EOS included)."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong penalty: buffer must be in (0, max_tokens={max_tokens}], got {buffer}")
    free = max_tokens - buffer

    def overlong(prompts, completions, completion_ids=None, **_):
        if completion_ids is None:
            raise ValueError("overlong penalty needs completion_ids (the sampled token ids)")
        return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / buffer) for ids in completion_ids]

    return overlong


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "language": language_reward}


# ---------------------------------------------------------------------- combination
@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float
    user: bool = False  # a user's `module:function`: called with TRL's conversational format for chat prompts


def parse_reward(spec: str) -> WeightedReward:
    """`name[=weight]` for a built-in reward or `module:function[=weight]` (weight default 1.0) for a user's.
    Errors name the spec and what failed. `rm:PATH[=weight][,scope=answer|full]` scores with a reward model."""
    if spec.strip().startswith("rm:"):
        from .train.reward_model import parse_rm_reward
        return parse_rm_reward(spec)
    text, _, w = spec.partition("=")
    text = text.strip()
    try:
        weight = float(w) if w.strip() else 1.0
    except ValueError:
        raise ValueError(f"reward {spec!r}: weight {w!r} is not a number (write name=0.5)") from None
    if ":" not in text:
        if text not in BUILTIN:
            raise ValueError(f"reward {spec!r}: unknown reward {text!r}; built in: {', '.join(BUILTIN)} "
                             f"(or module:function for your own)")
        return WeightedReward(text, BUILTIN[text], weight)
    mod_name, _, fn_name = text.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); is it "
                         f"on PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {mod_name!r} ({getattr(module, '__file__', '?')}) has no "
                         f"attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {mod_name}.{fn_name} is not callable")
    return WeightedReward(fn_name, fn, weight, user=True)


def load_rewards(specs: Sequence[str]) -> list[WeightedReward]:
    rewards = [parse_reward(s) for s in specs]
    names = [r.name for r in rewards]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"rewards: {', '.join(sorted(dup))} given more than once")
    return rewards


def combine(rewards: Sequence[WeightedReward], prompts: Sequence[str], completions: Sequence[str],
            conversations: Sequence[list[dict]] | None = None,
            **row_fields) -> tuple[list[float], dict[str, list[float | None]]]:
    """Run every reward; return the weighted total per sample (a None counts as absent: 0 contribution) and
    each reward's raw values by name.

    conversations: the rows' chat messages when the prompts are conversations. Users' reward functions then get
    what TRL gives them for a conversational dataset (prompts as message lists, each completion as
    `[{"role": "assistant", "content": text}]`), so functions written for TRL work unchanged; built-in
    rewards always get the rendered prompt and the completion text.
    """
    per: dict[str, list[float | None]] = {}
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions] if conversations else None
    for r in rewards:
        if r.user and conversations:
            vals = list(r.fn(prompts=list(conversations), completions=chat_completions, **row_fields))
        else:
            vals = list(r.fn(prompts=list(prompts), completions=list(completions), **row_fields))
        if len(vals) != len(completions):
            raise ValueError(f"reward {r.name!r} returned {len(vals)} values for {len(completions)} completions")
        per[r.name] = [None if v is None else float(v) for v in vals]
    total = [sum(r.weight * per[r.name][i] for r in rewards if per[r.name][i] is not None)
             for i in range(len(completions))]
    return total, per
