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

Learned rewards sit beside the rules: `rm:PATH[=weight][,scope=answer|full][,name=NAME][,batch_size=N][,device=D]`
scores (prompt, completion) with a reward model trained by `r1lab rm` (`RewardModelReward`, in batches on its
device, loaded on first use); group normalisation happens in GRPO's advantages, like for every reward. In a mixed
prompt set `route_rewards` applies each reward to its rows only: a row's `reward_names` decide, else rules score
rows with an `answer` and reward models (those given as `rm:` specs, whatever their name) the rows without.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import load_pretrained, save_pretrained
from .grading import extract_answer, math_equal
from .tokenizer import load_tokenizer, split_reasoning

__all__ = ["accuracy_reward", "format_reward", "language_reward", "overlong_penalty", "opened_think",
           "RewardFn", "WeightedReward", "parse_reward", "load_rewards", "combine", "BUILTIN",
           "RewardModelReward", "save_reward_model", "load_reward_model", "is_reward_model", "route_rewards",
           "check_row_rewards"]

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
    reward_model: bool = False  # an `rm:PATH` spec, scoring open-ended rows (`route_rewards`); never by name


def parse_reward(spec: str) -> WeightedReward:
    """`name[=weight]` for a built-in reward or `module:function[=weight]` (weight default 1.0) for a user's.
    Errors name the spec and what failed. `rm:PATH[=weight][,scope=answer|full]` scores with a reward model."""
    if spec.strip().startswith("rm:"):
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
            chat_completions: Sequence[list[dict]] | None = None,
            **row_fields) -> tuple[list[float], dict[str, list[float | None]]]:
    """Run every reward; return the weighted total per sample (a None counts as absent: 0 contribution) and
    each reward's raw values by name.

    conversations: the rows' chat messages when the prompts are conversations. Users' reward functions then get
    what TRL gives them for a conversational dataset (prompts as message lists, each completion as
    `[{"role": "assistant", "content": text}]`, or `chat_completions` when given: a multi-turn trajectory's
    assistant and tool messages), so functions written for TRL work unchanged; built-in rewards always get the
    rendered prompt and the completion text.
    """
    per: dict[str, list[float | None]] = {}
    if conversations and chat_completions is None:
        chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
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


# ---------------------------------------------------------------------- the reward-model scorer
# A reward model folder (written by `r1lab rm`, r1lab.train.reward_model) is the transformer in the HF layout, a
# scalar head on the last token's final hidden state, and a marker file; here it is loaded and used as a
# TRL-signature reward (DeepSeek-R1 section 2.3.4: learned rewards for open-ended prompts).

HEAD_FILE = "reward_head/score.safetensors"  # in a subfolder: load_pretrained reads every top-level *.safetensors
MARKER_FILE = "reward_model.json"
SCOPES = ("full", "answer")

def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0,
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids (B, S) long, right-padded with `pad_id` to `length` (default: the longest), and
    lengths (B,). Right padding is safe under causal attention: the last real token never attends to the padding
    after it. (The MoE layers do route the padding: it counts in the expert loads and the balance loss.)"""
    S = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


def last_token_scores(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scores (B,) fp32: score_head on the final normed hidden state of each row's last real token."""
    h = model(ids.to(model.device), return_hidden=True)  # (B, S, D)
    last = h[torch.arange(len(ids), device=h.device), (lengths - 1).to(h.device)]  # (B, D)
    return model.score_head(last).float().squeeze(-1)



def scoped(response: str, scope: str, started_in_prompt: bool = False) -> str:
    """The part of a response a reward model of `scope` sees: all of it, or the text after `</think>`
    (empty when the reasoning never finished)."""
    if scope == "full":
        return response
    if scope != "answer":
        raise ValueError(f"scope must be 'full' or 'answer', got {scope!r}")
    return split_reasoning(response, started_in_prompt=started_in_prompt)[1]


def encode_response(tokenizer, prompt_text: str, response: str, max_len: int) -> list[int]:
    """prompt ids + response ids + EOS, cut from the left to max_len tokens (the end, which is scored, stays)."""
    ids = tokenizer.encode(prompt_text) + tokenizer.encode(response) + [tokenizer.eos_id]
    return ids[-max_len:]



def save_reward_model(model, path: str | Path, tokenizer=None, scope: str = "full", max_len: int = 0) -> Path:
    """Write the reward model folder: the transformer via save_pretrained (HF layout, loads in transformers
    as a causal LM), `reward_head/score.safetensors` (score.weight (1, D), score.bias (1,)) and `reward_model.json`.
    tokenizer: an r1lab Tokenizer to save, None (the DeepSeek one when the vocab matches) or False; an object
    without `save` (a test's) is not saved."""
    head = model.score_head
    del model.score_head  # save_pretrained writes the transformer's own tensors only
    try:
        tok = tokenizer if tokenizer is None or tokenizer is False or hasattr(tokenizer, "save") else False
        out = save_pretrained(model, path, tokenizer=tok)
    finally:
        model.score_head = head
    (out / HEAD_FILE).parent.mkdir(exist_ok=True)
    save_file({"score.weight": head.weight.detach().float().cpu().contiguous(),
               "score.bias": head.bias.detach().float().cpu().contiguous()}, str(out / HEAD_FILE))
    (out / MARKER_FILE).write_text(json.dumps({"type": "r1lab-reward-model", "head": HEAD_FILE, "scope": scope,
                                               "max_len": max_len or model.config.max_position_embeddings},
                                              indent=2) + "\n")
    return out


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A saved reward model folder -> (Transformer with `score_head`, info dict {scope, max_len, ...}).
    Raises ValueError naming the folder when it is not a reward model."""
    path = Path(path)
    if not is_reward_model(path):
        raise ValueError(f"{path}: not a reward model folder (no {MARKER_FILE}; train one with `r1lab rm`)")
    info = json.loads((path / MARKER_FILE).read_text())
    model = load_pretrained(path, device=device, dtype=dtype)
    sd = load_file(str(path / info.get("head", HEAD_FILE)))
    D = model.config.hidden_size
    if tuple(sd["score.weight"].shape) != (1, D):
        raise ValueError(f"{path / HEAD_FILE}: score.weight has shape {tuple(sd['score.weight'].shape)}, the model "
                         f"needs (1, {D})")
    head = torch.nn.Linear(D, 1, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        head.weight.copy_(sd["score.weight"]), head.bias.copy_(sd["score.bias"])
    model.score_head = head
    model.eval()
    return model, info



class RewardModelReward:
    """A TRL-signature reward scoring (prompt, completion) with a reward model, in batches on its device.

    `source` is a reward model folder (loaded on the first call, with its tokenizer unless one is given) or a
    (model, info) pair. scope None = the scope the model was trained with. The prompt is the text the policy
    was given (GRPO's rendered prompt); with scope "answer" an open `<think>` at its end is dropped and only
    the text after `</think>` is appended, so the reasoning never reaches the reward model."""

    def __init__(self, source, scope: str | None = None, tokenizer=None, batch_size: int = 16,
                 device: str | torch.device | None = None):
        self.source, self.tokenizer, self.batch_size = source, tokenizer, batch_size
        self.device = device
        self._scope = scope
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"reward model scope must be 'full' or 'answer', got {scope!r}")
        self.model, self.info = (source if isinstance(source, tuple) else (None, None))

    def _load(self):
        if self.model is None:
            dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model, self.info = load_reward_model(self.source, device=dev,
                                                      dtype=torch.bfloat16 if str(dev).startswith("cuda") else None)
        if self.tokenizer is None:
            folder = Path(self.source) if not isinstance(self.source, tuple) else None
            self.tokenizer = load_tokenizer(folder if folder and (folder / "tokenizer.json").is_file() else None)

    @property
    def scope(self) -> str:
        return self._scope or (self.info or {}).get("scope", "full")

    def texts(self, prompt: str, completion: str) -> tuple[str, str]:
        """(prompt text, response text) the reward model scores for one sample."""
        opened = opened_think(prompt)
        if self.scope == "answer":
            if opened:
                prompt = prompt[: prompt.rfind("<think>")]
            return prompt, scoped(completion, "answer", started_in_prompt=opened)
        return prompt, completion

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        self._load()
        max_len = min(int(self.info.get("max_len") or 1 << 30), self.model.config.max_position_embeddings)
        seqs = [encode_response(self.tokenizer, *self.texts(p, c), max_len) for p, c in zip(prompts, completions)]
        out: list[float] = []
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
        scores = [0.0] * len(seqs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, lens = pad_right([seqs[i] for i in idx])
            for i, v in zip(idx, last_token_scores(self.model, ids, lens).tolist()):
                scores[i] = v
        for m in self.model.moe_layers():
            m.expert_load.zero_()
        out.extend(scores)
        return out


def parse_rm_reward(spec: str):
    """`rm:PATH[=weight][,scope=answer|full][,name=NAME][,batch_size=N][,device=D]` -> WeightedReward.
    The folder is checked now and loaded on the first call. The name defaults to `rm:PATH`."""
    body = spec.strip().removeprefix("rm:")
    head, *opts = body.split(",")
    path, eq, w = head.rpartition("=") if "=" in head else (head, "", "")
    try:
        weight = float(w) if eq and w.strip() else 1.0
    except ValueError:
        raise ValueError(f"reward {spec!r}: weight {w!r} is not a number (write rm:PATH=0.5)") from None
    kw: dict[str, Any] = {}
    name = f"rm:{path.strip()}"
    for o in opts:
        k, _, v = o.partition("=")
        k, v = k.strip(), v.strip()
        if k == "scope":
            if v not in SCOPES:
                raise ValueError(f"reward {spec!r}: scope must be full or answer, got {v!r}")
            kw["scope"] = v
        elif k == "name":
            name = v
        elif k == "batch_size":
            kw["batch_size"] = int(v)
        elif k == "device":
            kw["device"] = v
        else:
            raise ValueError(f"reward {spec!r}: unknown option {k!r}; options are scope, name, batch_size, device")
    if not is_reward_model(path.strip()):
        raise ValueError(f"reward {spec!r}: {path.strip()!r} is not a reward model folder (no {MARKER_FILE}; "
                         f"train one with `r1lab rm`)")
    return WeightedReward(name, RewardModelReward(path.strip(), **kw), weight, reward_model=True)


# ---------------------------------------------------------------------- mixed prompt sets: which reward scores which row
def applicable(row_rewards, answer, name: str, is_rm: bool, any_rm: bool) -> bool:
    """Whether reward `name` applies to a row. A row's `reward_names` list decides when given (not `rewards`:
    that name would collide with `combine`'s first argument when GRPO passes row fields as keywords); otherwise a
    row with an `answer` is a reasoning prompt (every reward but the reward models) and one without is
    open-ended (only the reward models; every reward when no reward model is configured)."""
    if row_rewards is not None:
        return name in row_rewards
    if answer is not None:
        return not is_rm
    return is_rm or not any_rm


def route_rewards(rewards: Sequence, field: str = "reward_names") -> list:
    """Wrap each WeightedReward so it returns None (left out, as `combine` treats it) for the rows it does not
    apply to (`applicable`), and runs only on the rows it does (a reward model scores nothing it need not)."""
    any_rm = any(r.reward_model for r in rewards)
    out = []
    for r in rewards:
        def fn(prompts, completions, _r=r, _rm=r.reward_model, **fields):
            n = len(completions)
            sel, ans = fields.get(field) or [None] * n, fields.get("answer") or [None] * n
            keep = [i for i in range(n) if applicable(sel[i], ans[i], _r.name, _rm, any_rm)]
            vals: list = [None] * n
            if keep:
                sub = {k: [v[i] for i in keep] if isinstance(v, list) and len(v) == n else v for k, v in fields.items()}
                got = list(_r.fn(prompts=[prompts[i] for i in keep], completions=[completions[i] for i in keep], **sub))
                if len(got) != len(keep):
                    raise ValueError(f"reward {_r.name!r} returned {len(got)} values for {len(keep)} completions")
                for i, v in zip(keep, got):
                    vals[i] = v
            return vals

        out.append(WeightedReward(r.name, fn, r.weight, user=r.user, reward_model=r.reward_model))
    return out


def check_row_rewards(rows: Sequence[dict], rewards: Sequence, field: str = "reward_names") -> None:
    """Each row's `reward_names` list must be a list of configured reward names; errors name the row (file:line)."""
    names = {r.name for r in rewards}
    for row in rows:
        sel = row.get(field)
        if sel is None:
            continue
        where = row.get("where", "a prompt row")
        if not isinstance(sel, list) or not all(isinstance(s, str) for s in sel):
            raise ValueError(f"{where}: {field!r} must be a list of reward names, got {sel!r}")
        unknown = [s for s in sel if s not in names]
        if unknown:
            raise ValueError(f"{where}: {field!r} names {', '.join(unknown)}, which this run does not have; "
                             f"its rewards are {', '.join(sorted(names))}")
