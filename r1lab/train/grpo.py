"""`r1lab grpo`: Group Relative Policy Optimization with verifiable rewards (DeepSeekMath section 4.1,
DeepSeek-R1 section 2.2), with the DAPO and Dr. GRPO variants as options.

One step:
  1. rollouts: `grpo.prompts_per_step` prompts, `grpo.group_size` (G) samples each, from the engine running
     on the policy's own weights (no copy: the optimizer writes them in place, see `MasterWeights`; under
     torchrun each rank samples its share of the prompts on a full copy, see `GRPOTrainer`); the
     engine returns each sampled token's fp32 log-prob under the temperature-scaled policy, which are the
     "old" log-probs of the importance ratio.
  2. rewards (r1lab.rewards, weighted), then group-relative advantages, the same for every token of a sample:
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      grpo.scale_rewards = "group" (GRPO)
        A_i =  r_i - mean(r_group)                              grpo.scale_rewards = "none"  (Dr. GRPO)
     With grpo.dynamic_sampling, groups whose rewards are all equal (A = 0, no signal) are dropped and more
     prompts are sampled to refill the batch (DAPO section 3.2), at most grpo.max_resample extra rounds.
  3. `grpo.mu` passes over the rollout batch, each in mini-batches of grpo.mini_batch_size sequences, one
     optimizer update per mini-batch, minimising per token
        -( min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta KL_k3 ),   rho = exp(logp - logp_old)
        KL_k3 = exp(ref - logp) - (ref - logp) - 1     (unbiased, always >= 0; DeepSeekMath eq. 4)
     aggregated per sequence then averaged (grpo.loss_agg = "sequence", GRPO), over all tokens of the
     mini-batch ("token", DAPO), or summed and divided by sequences x max_tokens ("constant", Dr. GRPO).
     beta = 0 builds no reference model at all; grpo.ref_sync_every copies the policy into the reference.

Prompt styles (grpo.prompt_style):
  r1-zero  the R1 paper's Table 1 template, plain text. Our choice: the prompt ends with "Assistant: <think>"
           (the paper's ends with "Assistant:"), so every sample starts reasoning at once; the rewards know the
           block is open (r1lab.rewards.opened_think). The model answers in <answer> </answer>.
  chat     the R1 chat template (`apply_chat_template(..., add_generation_prompt=True)`), optionally with
           "<think>\\n" appended (grpo.open_think), as DeepSeek's later templates do.
  raw      the row's prompt text as it is (already formatted).

Tools (grpo.tools, chat style): the prompt lists the tools (the template's tools section) and a rollout is up to
grpo.max_turns model turns. A turn ends at the end of the reply or at a tool-call block; the calls then run
(r1lab.tools.run_tool: a child process, grpo.tool_timeout seconds, an exception or a hang becomes "Error: ..."
text), their outputs are appended in the template's tool-output block, and the model continues from there. The
tool-output tokens are part of the completion's ids but not of its loss: they get no log-prob, no KL, no
entropy and do not count in the token denominators. Each turn resubmits the conversation so far to the engine,
whose prefix cache (on unless speculating) serves the full pages of the earlier turns, so only the last partial
page and the tool output are prefilled again; metrics.jsonl's `resubmitted_cached` is the share served. User
rewards get the whole trajectory in TRL's conversational format: the assistant turns (with `tool_calls`) and the
tool messages.

Asynchronous rollouts (grpo.async, one process): step N+1's rollouts are sampled in a background thread while step
N's update runs, as verl's and AReaL's one-step off-policy modes do. The engine then runs on a snapshot of the
trained weights (a second copy in the compute dtype: 2 bytes per trained parameter in bf16; with LoRA only the
adapters, the frozen base is shared), which takes the policy's weights after each step, once the update and the
sampling beside it are both done. So the rollout of step N+1 always comes from the weights step N's update
started from, whatever the timing, and between steps the engine's weights are the policy's. The importance ratio
is taken against the sampling-time log-probs the engine returned, i.e. against that older policy (policy_lag 1
in the log; the first step samples on-policy, before its update, and equals the synchronous step). The batch in
flight is finished before a step ends, and a checkpoint holds it: a resumed run trains on the batch the
uninterrupted run would have (so the last step samples one batch more, overlapped with its update). On a GPU the
background thread samples on its own CUDA stream. Logged: policy_lag, overlap_s (seconds the update and the next
batch's sampling ran together) and wait_s (seconds the step waited for that batch after its update).

Logged per step (terminal + metrics.jsonl): reward and each reward's mean, accuracy, pass@G, response
lengths, share truncated, KL, clip fraction, entropy, share of zero-variance groups, generation vs training
seconds, tokens/s; `grpo.log_samples` completions per step go to samples.jsonl. Checkpoints and resume as in
the training loop: the prompt order is a pure function of the position and the sampling seeds of the step, so
a resumed run sees the prompts (and, on the CPU, the samples) the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .. import lora, parallel
from ..data import IGNORE, BatchOrder, read_jsonl
from ..engine import Engine, SamplingParams
from ..model.head import DEFAULT_CHUNK
from ..rewards import WeightedReward, check_row_rewards, combine, load_rewards, overlong_penalty, route_rewards
from ..tokenizer import THINK_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END
from ..tools import TOOL_CALLS_BEGIN, function_schema, load_tool, parse_tool_calls, run_tool
from . import state as ckpt
from .loop import Trainer, build_model, setup
from .recipe import SECTIONS, Recipe, _key, load_recipe

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question} Assistant: <think>")


# ====================================================================== the math (pure functions)
def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (groups, G) -> advantages (groups, G). scale "group": divide by the group's standard deviation
    (unbiased, as torch.std / TRL) + eps; "none": only subtract the mean (Dr. GRPO). A group of equal rewards
    gets zeros either way."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale != "group":
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased estimator of KL(pi || pi_ref) from samples of pi (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token with DAPO's separate bounds. logp, old_logp (B, L); adv (B,) or
    (B, L). Returns (objective to maximise (B, L), bool (B, L): the clipped branch was taken, i.e. the token
    gets no gradient)."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def loss_denominator(mode: str, sequences: int, tokens: int, max_tokens: int) -> int:
    """What a mini-batch's summed loss is divided by: its sequences (GRPO: each sample weighs the same, after the
    mean over its own tokens), its completion tokens (DAPO: each token weighs the same) or sequences x max_tokens
    (Dr. GRPO: no length normalisation at all)."""
    if mode == "sequence":
        return sequences
    if mode == "token":
        return tokens
    if mode == "constant":
        return sequences * max_tokens
    raise ValueError(f"loss aggregation must be sequence, token or constant, got {mode!r}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, denom: float) -> torch.Tensor:
    """A micro-batch's share of the mini-batch loss: its (B, L) per-token loss over the valid tokens `mask`,
    summed (per sequence: the mean over its tokens, for "sequence") and divided by `denom`, the mini-batch's
    `loss_denominator`. Summed over the micro-batches of a mini-batch, these give the loss of one large batch."""
    m = mask.to(per_token.dtype)
    if mode == "sequence":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / denom
    return (per_token * m).sum() / denom


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                        with_entropy: bool = False, compiled: bool = False,
                        chunk: int = DEFAULT_CHUNK, token_mask: list[list[int]] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs of each completion token under `model` at `temperature` (fp32), as the engine computes them.

    Returns logp (B, L) and mask (B, L) (L = longest completion; padding is 0 / False) and, when asked, the
    per-token entropy (B, L) of the temperature-scaled distribution (no gradient).
    Only the completion positions go through the output head, `chunk` tokens at a time (`Transformer.logprobs`):
    neither (B, S, vocab) nor the fp32 (B, L, vocab) logits are ever held (8K-token completions of a 129K
    vocabulary would be 4.2 GB per sequence in fp32). compiled: the per-chunk log-softmax (and entropy) math
    through torch.compile.
    token_mask: per completion, 1 for the model's tokens and 0 for others (tool outputs): those are 0 / False
    in logp and mask, as padding is.
    """
    dev = model.device
    B = len(prompts)
    full = [p + c for p, c in zip(prompts, completions)]
    S = max(len(f) for f in full) - 1
    L = max(len(c) for c in completions)
    # All index tensors are built on the host as one (4, B, max(S, L)) block and copied in one transfer that
    # does not wait for the device (a plain .to(device) of host memory synchronises the stream).
    W = max(S, L)
    host = torch.zeros(4, B, W, dtype=torch.long)
    ids, targets, idx, mask = host.unbind(0)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        f = p + c
        ids[i, : len(f) - 1] = torch.tensor(f[:-1])  # right padding: causal attention never looks at it
        targets[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1 if token_mask is None else torch.tensor(token_mask[i])
    starts = torch.tensor([len(p) - 1 for p in prompts])  # input index whose output predicts completion[0]
    idx[:, :L] = (starts[:, None] + torch.arange(L)[None]).clamp(max=S - 1)  # (B, L)
    ids, targets, idx, mask = to_device(host, dev).unbind(0)
    ids, targets, idx, mask = ids[:, :S].contiguous(), targets[:, :L], idx[:, :L], mask[:, :L].bool()
    h = model(ids, return_hidden=True)  # (B, S, D)
    h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, D)
    # fp32 log-probs (precision policy); padding has no target (log-prob 0, no gradient); entropy without gradient
    logp, ent = model.logprobs(h, targets.masked_fill(~mask, IGNORE), temperature, chunk=chunk,
                               with_entropy=with_entropy, compiled=compiled)
    return logp, mask, ent


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the device's queue: through pinned memory
    and a non-blocking copy on a GPU (PyTorch keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ====================================================================== the recipe
@dataclass
class GRPO:
    task: str = _key("", "prompts from a task instead of data.train: a synthetic task NAME[:KNOB=V,...] "
                     "(addition, arithmetic, linear; e.g. arithmetic:digits=1,n_operands=4,ops=+-; addition-N is "
                     "addition:digits=N), gsm8k, "
                     "math500, aime24, amc23")
    task_split: str = _key("train", "split of the task")
    task_size: int = _key(10000, "synthetic tasks: problems to draw (seeded by run.seed); benchmarks: 0 = all")
    prompt_style: str = _key("r1-zero", "r1-zero: the R1-Zero plain-text template ending in 'Assistant: <think>'; "
                             "chat: the R1 chat template; raw: the prompt text as given", ("r1-zero", "chat", "raw"))
    system: str = _key("", "chat style: system prompt")
    open_think: bool = _key(False, "chat style: end the prompt with '<think>\\n' (as later R1 templates do)")
    prompts_per_step: int = _key(16, "prompts (groups) per rollout batch (under torchrun: over all ranks, each "
                                 "sampling an equal share)")
    group_size: int = _key(8, "G: samples per prompt")
    max_tokens: int = _key(256, "longest completion in tokens (EOS included)")
    temperature: float = _key(1.0, "sampling temperature (the loss uses the same temperature)")
    top_p: float = _key(1.0, "nucleus sampling (1 = off; the importance ratio ignores the truncation)")
    mu: int = _key(1, "optimisation passes over each rollout batch (DeepSeekMath's mu)")
    mini_batch_size: int = _key(0, "sequences per optimizer update (over all ranks); 0 = the whole rollout batch "
                                "(one update per pass); train.batch_size is the sequences per forward/backward "
                                "micro-batch")
    micro_tokens: int = _key(0, "size the update's micro-batches by tokens instead: each takes as many of the "
                             "length-sorted rows as fit in this many padded positions (rows x longest row, over "
                             "all ranks), one row at least; train.batch_size is then unused. Completions that end "
                             "early (EOS) then make fewer, larger micro-batches; 0 = off")
    eps_low: float = _key(0.2, "ratio clip below: 1 - eps_low")
    eps_high: float = _key(0.2, "ratio clip above: 1 + eps_high (DAPO clip-higher: 0.28)")
    beta: float = _key(0.001, "KL coefficient (R1: 0.001); 0 = no KL and no reference model")
    ref_sync_every: int = _key(0, "copy the policy into the reference every this many steps; 0 = never")
    scale_rewards: str = _key("group", "group: (r - mean) / (std + 1e-4); none: r - mean (Dr. GRPO)",
                              ("group", "none"))
    loss_agg: str = _key("sequence", "sequence: mean per sequence, then over sequences (GRPO); token: over all "
                         "tokens (DAPO); constant: sum / (sequences x max_tokens) (Dr. GRPO)",
                         ("sequence", "token", "constant"))
    dynamic_sampling: bool = _key(False, "drop groups whose rewards are all equal and sample more prompts (DAPO)")
    max_resample: int = _key(3, "dynamic sampling: extra rollout rounds per step at most")
    rewards: list = _key(["accuracy=1.0", "format=0.5"], "rewards as name=weight (accuracy, format, language) or "
                         "module:function=weight for your own (TRL signature)")
    overlong_buffer: int = _key(0, "DAPO soft overlong penalty over the last this many tokens (weight 1); 0 = off")
    max_batch: int = _key(0, "engine slots (sequences decoded together, per rank); 0 = prompts_per_step x "
                          "group_size (under torchrun: this rank's share of them)")
    log_samples: int = _key(2, "completions per step written to samples.jsonl")
    tools: list = _key([], "tools the policy may call in rollouts (chat style): 'calculator' (built in: + - * / "
                       "// % ** on numbers) or 'module:function' (typed arguments and a docstring, from which its "
                       "schema is derived); max_tokens then counts the tool outputs too")
    max_turns: int = _key(4, "with tools: model turns per rollout at most (a turn ends at a tool call or the end)")
    tool_timeout: float = _key(5.0, "with tools: seconds a tool call may run (in its own process) before it is "
                               "killed and its output is an error")
    speculate: int = _key(0, "rollouts by speculative decoding: draft this many tokens per step with the model's MTP "
                          "module (samples and log-probs follow the policy exactly; the draft is not trained here, "
                          "so acceptance falls as the policy moves away from it); 0 = off")
    async_: bool = _key(False, "sample step N+1's rollouts in the background while step N's update runs, on a snapshot "
                        "of the weights step N started from (one-step off-policy; the ratio is taken against the "
                        "sampling-time log-probs); one process only; costs a second copy of the trained weights in "
                        "the compute dtype")


GRPO_DEFAULTS = {("run", "out"): "runs/grpo", ("optim", "lr"): 1e-6, ("optim", "weight_decay"): 0.0,
                 ("optim", "warmup_steps"): 0, ("optim", "schedule"): "constant", ("optim", "beta2"): 0.99,
                 ("moe", "mtp_weight"): 0.0, ("moe", "bias_gamma"): 0.0, ("train", "batch_size"): 16,
                 ("ckpt", "every"): 50}


@dataclass
class GRPORecipe(Recipe):
    """The training recipe ([run] [model] [data] [optim] [train] [moe] [ckpt] [log]) plus a [grpo] table.
    Used here: data.train (JSONL prompt files), data.tokenizer, data.shuffle; train.steps (GRPO steps),
    train.batch_size (sequences per micro-batch), train.compile, train.activation_checkpointing."""

    kind_defaults: ClassVar[dict[str, dict]] = {"grpo": GRPO_DEFAULTS}
    default_kind: ClassVar[str | None] = "grpo"
    sections: ClassVar[dict[str, type]] = {**SECTIONS, "grpo": GRPO}

    grpo: GRPO = field(default_factory=GRPO)

    def validate(self) -> None:
        super().validate()
        g = self.grpo
        for k in ("prompts_per_step", "max_tokens", "mu"):
            if getattr(g, k) < 1:
                raise ValueError(f"recipe: grpo.{k} must be >= 1 (got {getattr(g, k)})")
        if g.group_size < 2:
            raise ValueError(f"recipe: grpo.group_size must be >= 2: advantages compare samples of a group "
                             f"(got {g.group_size})")
        for k in ("mini_batch_size", "micro_tokens", "eps_low", "eps_high", "beta", "ref_sync_every", "max_resample",
                  "overlong_buffer", "max_batch", "log_samples", "task_size", "speculate"):
            if getattr(g, k) < 0:
                raise ValueError(f"recipe: grpo.{k} must be >= 0 (got {getattr(g, k)})")
        if g.eps_low >= 1:
            raise ValueError(f"recipe: grpo.eps_low must be < 1 (got {g.eps_low})")
        if g.temperature <= 0:
            raise ValueError(f"recipe: grpo.temperature must be > 0: the policy's log-probs need a sampling "
                             f"distribution (got {g.temperature})")
        if not g.task and not self.data.train:
            raise ValueError("recipe: give prompts with grpo.task or data.train (JSONL files)")
        if g.tools and g.prompt_style != "chat":
            raise ValueError(f"recipe: grpo.tools need grpo.prompt_style = 'chat' (the chat template holds the tools "
                             f"and their calls), got {g.prompt_style!r}")
        if g.max_turns < 1 or g.tool_timeout <= 0:
            raise ValueError(f"recipe: grpo.max_turns must be >= 1 and grpo.tool_timeout > 0 (got {g.max_turns} "
                             f"and {g.tool_timeout})")


def load_grpo_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> GRPORecipe:
    """Defaults, then the TOML file, then `overrides` {"grpo.beta": "0", ...} (as load_recipe for the others)."""
    return load_recipe(path, "grpo", overrides, GRPORecipe)


# ====================================================================== prompts
def load_prompt_rows(recipe: GRPORecipe) -> list[dict]:
    """Prompt rows {"prompt" or "messages", "answer", ...} from grpo.task or the data.train JSONL files.
    A bad row raises ValueError naming file:line."""
    g = recipe.grpo
    if g.task:
        name = g.task.partition(":")[0]
        if name.startswith("addition-") or name in ("addition", "arithmetic", "linear", "countdown"):
            probs = synthetic_task(g.task).problems(g.task_size, g.task_split, recipe.run.seed)
        else:
            from ..tasks import load_benchmark

            probs = load_benchmark(g.task, g.task_split, limit=g.task_size or None)
        return [{"prompt": p.question, "answer": p.answer, "id": p.id} for p in probs]
    rows = []
    for path in recipe.data.train:
        for where, row in read_jsonl(path):
            if isinstance(row.get("prompt"), list):  # TRL's conversational prompt-only rows (open-r1's datasets)
                row = {**{k: v for k, v in row.items() if k != "prompt"}, "messages": row["prompt"]}
            if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
                raise ValueError(f"{where}: a GRPO row needs 'prompt' (a string, or TRL's list of messages) or "
                                 f"'messages' (a list), found keys {sorted(row)}")
            if "messages" in row:
                bad = next((i for i, m in enumerate(row["messages"]) if not isinstance(m, dict) or not
                            isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)), None)
                if bad is not None or not row["messages"]:
                    raise ValueError(f"{where}: the prompt's messages must be a non-empty list of {{'role': str, "
                                     f"'content': str}} objects" + (f" (message {bad} is not)" if bad is not None
                                                                    else ""))
            if "answer" in row and not isinstance(row["answer"], (str, int, float)):
                raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(row['answer']).__name__}")
            rows.append({**row, "where": where})
    if not rows:
        raise ValueError(f"data.train {recipe.data.train}: no prompt rows")
    return rows


def synthetic_task(spec: str):
    """"arithmetic:digits=1,n_operands=4,ops=+-" -> the task object ("addition-N" = addition:digits=N). Knob
    values are integers, or for `ops` the operator characters. Countdown is refused: its answer is an expression
    that only its own verifier can check, and the accuracy reward compares values."""
    from ..tasks.synthetic import TASKS

    name, _, knobs = spec.partition(":")
    if name.startswith("addition-"):
        name, knobs = "addition", f"digits={name.removeprefix('addition-')}" + (f",{knobs}" if knobs else "")
    if name == "countdown":
        raise ValueError("grpo.task countdown: its answers are expressions checked by Countdown.verify, which the "
                         "accuracy reward does not call; give the prompts as data.train with your own reward")
    kw: dict = {}
    for item in filter(None, knobs.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"grpo.task {spec!r}: knob {item!r} is not KEY=VALUE")
        try:
            kw[key.strip()] = tuple(value.strip()) if key.strip() == "ops" else int(value)
        except ValueError:
            raise ValueError(f"grpo.task {spec!r}: knob {item!r} is not KEY=INTEGER (or ops=+-*)") from None
    try:
        return TASKS[name](**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"grpo.task {spec!r}: {e}") from None


def prompt_messages(row: dict, system: str = "") -> list[dict]:
    """The conversation a chat-style prompt renders: the row's messages (or its prompt as one user turn), with
    the recipe's system prompt first unless the row has one. Also what user rewards get as the prompt (TRL's
    conversational format)."""
    msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    if system and not any(m.get("role") == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def render_prompt(row: dict, style: str, tokenizer=None, system: str = "", open_think: bool = False,
                  tools: list[dict] | None = None) -> str:
    """The prompt text the policy continues, in `style` (see the module docstring); chat style lists `tools`
    (OpenAI schemas) in the system prompt."""
    if style == "chat":
        text = tokenizer.apply_chat_template(prompt_messages(row, system), add_generation_prompt=True, tools=tools)
        return text + "<think>\n" if open_think else text
    question = row.get("prompt")
    if question is None:  # messages in r1-zero / raw style: the last user turn
        question = next(m["content"] for m in reversed(row["messages"]) if m.get("role") == "user")
    if style == "raw":
        return question
    if style == "r1-zero":
        q = question.strip()
        return R1_ZERO_TEMPLATE.format(question=q if q[-1:] in ".?!" else q + ".")
    raise ValueError(f"unknown prompt style {style!r}")


def render_prompt_ids(row: dict, text: str, style: str, tokenizer, system: str = "", open_think: bool = False,
                      tools: list[dict] | None = None) -> list[int]:
    """The ids of `render_prompt`'s `text`. Chat style: the template's markers as single tokens and the messages
    as plain text, so a message that spells "<｜Assistant｜>" cannot forge a turn (without markers in the
    messages, exactly `tokenizer.encode(text)`). Raw and r1-zero styles: the text as written, which is the
    user's own format."""
    if style == "chat":
        ids = tokenizer.apply_chat_template(prompt_messages(row, system), add_generation_prompt=True,
                                            tokenize=True, tools=tools)
        return ids + tokenizer.encode("<think>\n") if open_think else ids
    return tokenizer.encode(text)


# ====================================================================== the trainer
@dataclass
class Rollout:
    """One rollout batch, groups of G consecutive samples."""
    rows: list[dict]  # one per sample
    prompts: list[str]
    prompt_ids: list[list[int]]
    completions: list[str]
    completion_ids: list[list[int]]
    old_logp: list[list[float]]
    finish: list[str]
    rewards: torch.Tensor  # (N,) weighted total
    per_reward: dict[str, list]
    # per completion token: 1 if the model sampled it, 0 for tool output (no loss); None: all the model's
    token_mask: list[list[int]] | None = None
    tool_calls: list[int] | None = None  # calls run per sample (rollouts with tools)
    # per sample with tools: [tokens of the conversation resubmitted after its tool calls, of them found in the
    # engine's prefix cache (not prefilled again)]
    resubmitted: list[list[int]] | None = None

    def select(self, groups: list[int], G: int) -> "Rollout":
        idx = [g * G + j for g in groups for j in range(G)]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Rollout(pick(self.rows), pick(self.prompts), pick(self.prompt_ids), pick(self.completions),
                       pick(self.completion_ids), pick(self.old_logp), pick(self.finish), self.rewards[idx],
                       {k: pick(v) for k, v in self.per_reward.items()}, pick(self.token_mask),
                       pick(self.tool_calls), pick(self.resubmitted))

    def model_tokens(self, i: int) -> int:
        """Completion tokens of sample i that the model sampled (those that get a loss)."""
        return len(self.completion_ids[i]) if self.token_mask is None else sum(self.token_mask[i])

    @staticmethod
    def cat(parts: list["Rollout"]) -> "Rollout":
        f = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return Rollout(f("rows"), f("prompts"), f("prompt_ids"), f("completions"), f("completion_ids"),
                       f("old_logp"), f("finish"), torch.cat([p.rewards for p in parts]),
                       {k: [x for p in parts for x in p.per_reward[k]] for k in parts[0].per_reward},
                       None if parts[0].token_mask is None else f("token_mask"),
                       None if parts[0].tool_calls is None else f("tool_calls"),
                       None if parts[0].resubmitted is None else f("resubmitted"))


@dataclass
class Sampled:
    """A step's sampling: every group drawn, the batch kept for the update, the counts the log reports, and the
    policy version it came from (GRPO steps done when its weights were taken) with its start and end times
    (time.perf_counter)."""
    drawn: Rollout
    batch: Rollout
    groups: int  # groups drawn
    zero_var: int  # of which all rewards were equal
    version: int
    start: float
    end: float

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (lists, strings, numbers, tensors)."""
        return {**vars(self), "drawn": vars(self.drawn), "batch": vars(self.batch)}

    @staticmethod
    def from_state(st: dict[str, Any]) -> Sampled:
        return Sampled(**{**st, "drawn": Rollout(**st["drawn"]), "batch": Rollout(**st["batch"])})


class GRPOTrainer(Trainer):
    """GRPO on `model` (fp32 on its device) with prompt `rows`; reuses the training loop's master weights,
    AdamW, schedule, checkpoints and signal handling. `grpo_step()` is one step (what the benchmark times);
    `fit(resume=None)` runs the recipe.

    Under torchrun the policy is parallelized as in `Trainer`, and each rank takes 1/world of every step's
    prompts (a prompt's G samples stay on its rank), samples them, scores them and computes their advantages;
    FSDP synchronises the gradients, and the logged numbers are gathered over all ranks. Rollouts run on a
    plain full copy of the policy in the compute dtype (`parallel.unsharded_copy`), refreshed at the start of
    each step, rather than through the FSDP modules: there every decode step would be collective (FSDP's
    all-gathers, EP's all-to-alls) while the ranks sample different lengths, and unsharded parameters are
    re-allocated at each gather, under an engine's CUDA graph. The reference model is such a copy too."""

    def __init__(self, recipe: GRPORecipe, model, tokenizer, rows: list[dict], dtype: torch.dtype | None = None,
                 quiet: bool = False, rewards: list[WeightedReward] | None = None):
        g, world = recipe.grpo, parallel.world_size()
        if g.async_ and world > 1:
            raise ValueError(f"grpo.async is not supported under torchrun ({world} ranks) yet: each rank's batch in "
                             f"flight would have to be saved in the sharded checkpoint; run it on one process or "
                             f"set grpo.async = false")
        for key, n in (("prompts_per_step", g.prompts_per_step), ("mini_batch_size", g.mini_batch_size)):
            if n % world:
                raise ValueError(f"grpo.{key}={n} must be a multiple of the {world} ranks: each takes an equal share")
        super().__init__(recipe, model, None, tokenizer, kind="grpo", dtype=dtype, quiet=quiet)
        self.g, self.rows = g, rows
        self.rewards = rewards if rewards is not None else load_rewards(g.rewards)
        # Mixed prompt sets (R1's final stage): each row gets its rewards (`reward_names`, or rule-based rewards
        # where there is an answer and reward models where there is none).
        check_row_rewards(rows, self.rewards)
        self.rewards = route_rewards(self.rewards)
        if g.overlong_buffer:
            self.rewards.append(WeightedReward("overlong", overlong_penalty(g.max_tokens, g.overlong_buffer), 1.0))
        self.tools = {spec: load_tool(spec) for spec in g.tools}  # fails here, naming the spec
        self.tool_fns = {fn.__name__: fn for fn in self.tools.values()}
        if len(self.tool_fns) < len(self.tools):
            raise ValueError(f"grpo.tools {g.tools}: two tools have the same function name")
        schemas = [function_schema(fn) for fn in self.tool_fns.values()] or None
        self.prompt_text = [render_prompt(r, g.prompt_style, tokenizer, g.system, g.open_think, schemas)
                            for r in rows]
        self.prompt_ids = [render_prompt_ids(r, t, g.prompt_style, tokenizer, g.system, g.open_think, schemas)
                           for r, t in zip(rows, self.prompt_text)]
        longest = max(len(p) for p in self.prompt_ids)
        limit = model.config.max_position_embeddings
        if longest + g.max_tokens > limit:
            where = rows[max(range(len(rows)), key=lambda i: len(self.prompt_ids[i]))].get("where", "a prompt")
            raise ValueError(f"{where}: {longest} prompt tokens + grpo.max_tokens {g.max_tokens} exceed the model's "
                             f"{limit} positions")
        self.order = BatchOrder(len(rows), g.prompts_per_step, recipe.run.seed, recipe.data.shuffle)
        self.share = g.prompts_per_step // self.world  # prompts (groups) this rank samples per rollout
        # The reference: a frozen copy in the compute dtype, none at all when beta = 0. With LoRA it is the rollout
        # model with its adapters off (see _optimise): no second model.
        self.ref = None
        if g.beta > 0 and self.use_lora and g.ref_sync_every:
            raise ValueError("grpo.ref_sync_every: with LoRA the KL reference is the base model (the adapters off), "
                             "which does not move; set grpo.ref_sync_every = 0")
        if g.beta > 0 and not self.use_lora:
            ref = copy.deepcopy(model) if self.world == 1 else parallel.unsharded_copy(model, self.device, self.dtype)
            self.ref = ref.eval().requires_grad_(False)
        # Built after MasterWeights cast the model: the engine (and its CUDA graph) sees the final tensors,
        # which the optimizer then updates in place (under torchrun: which each step copies into; with
        # grpo.async: a snapshot, which each step copies into).
        policy = self._rollout_copy(model) if self.world > 1 or g.async_ else model
        slots = g.max_batch or self.share * g.group_size
        self.engine = Engine(policy, tokenizer, max_batch=max(slots, g.group_size),
                             max_seq_len=min(limit, longest + g.max_tokens), speculate=g.speculate)
        self._next: Sampled | None = None  # grpo.async: the batch sampled during the last update
        self._sampler = self._side_stream = None
        if g.async_:
            self._sampler = ThreadPoolExecutor(1, thread_name_prefix="grpo-rollout")
            self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            # the snapshot's own tensors, paired with the policy's (the frozen ones they share are left out)
            own = [(d, p) for d, p in zip(policy.state_dict().values(), model.state_dict().values())
                   if d.data_ptr() != p.data_ptr()]
            self._snapshot_pairs = [list(x) for x in zip(*own)] if own else [[], []]

    def _rollout_copy(self, model):
        """Under torchrun: a plain full copy of the policy in the compute dtype, adapters included (wrapped as the
        policy is, so the state-dict names match and each step's copy is by name). With grpo.async on one process:
        a copy of the policy that shares its frozen tensors (a LoRA base) and owns the trained ones."""
        if self.world == 1:
            frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
            return copy.deepcopy(model, frozen).eval().requires_grad_(False)
        if not self.use_lora:
            return parallel.unsharded_copy(model, self.device, self.dtype)
        copy_ = lora.empty_like(model, self.device)
        parallel.copy_full_weights(model, copy_)
        return copy_.to(self.dtype).eval()

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, position: int) -> Rollout:
        """Sample G completions for this rank's prompts of rollout position `position` and score them. The seeds
        are a function of (run.seed, position, the prompt's place in the step), so a resumed run draws the same
        samples (CPU), and so does a run on another number of ranks."""
        g, eng = self.g, self.engine
        eng.model.eval()
        eng.reset_prefix_cache()  # the weights changed since the last rollout: cached prompt latents are stale
        idx = self.order.rows(position)
        mine = range(len(idx)) if self.world == 1 else parallel.shard(range(len(idx)), self.rank, self.world)
        base = (self.recipe.run.seed * 1_000_003 + position * 7919) * 4096
        seqs = []
        for k in mine:
            params = SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, n=g.group_size,
                                    seed=(base + k * g.group_size) & 0x7FFFFFFF, logprobs=True)
            seqs += eng.add_request(self.prompt_ids[idx[k]], params, prompt_index=k)
        while eng.has_work():
            eng.step()
        outs = [eng.completion(s) for s in seqs]
        if self.tool_fns:
            return self._tool_rollout(idx, outs, base)
        for m in eng.model.moe_layers():  # rollouts must not steer the router-bias update
            m.expert_load.zero_()
        rows = [self.rows[idx[o.prompt_index]] for o in outs]
        prompts = [self.prompt_text[idx[o.prompt_index]] for o in outs]
        completions = [o.text for o in outs]
        fields = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r}
                  if k not in ("prompt", "messages", "where")}
        fields["completion_ids"] = [o.token_ids for o in outs]
        # Chat prompts: user rewards get TRL's conversational format, the prompt as messages and the completion as
        # an assistant message that starts with what the prompt opened ("<think>\n"), as TRL prepends the
        # assistant turn's given start.
        conversations = chat_completions = None
        if self.g.prompt_style == "chat":
            conversations = [prompt_messages(r, self.g.system) for r in rows]
            start = "<think>\n" if self.g.open_think else ""
            chat_completions = [[{"role": "assistant", "content": start + c}] for c in completions]
        total, per = combine(self.rewards, prompts, completions, conversations, chat_completions=chat_completions,
                             **fields)
        return Rollout(rows, prompts, [self.prompt_ids[idx[o.prompt_index]] for o in outs], completions,
                       [o.token_ids for o in outs], [o.logprobs for o in outs], [o.finish_reason for o in outs],
                       torch.tensor(total, dtype=torch.float32), per)

    def _tool_rollout(self, idx: list[int], outs: list, base: int) -> Rollout:
        """Continue the first turns `outs` through tool calls, up to grpo.max_turns model turns each; score the
        trajectories. A turn's calls run when it ended its reply (finish "stop") with a well-formed block."""
        g, eng, tok = self.g, self.engine, self.tokenizer
        names = list(self.tool_fns)
        trajs = []
        for o in outs:
            msgs = prompt_messages(self.rows[idx[o.prompt_index]], g.system)
            trajs.append({"k": o.prompt_index, "ids": [], "mask": [], "logp": [], "messages": [], "calls": 0,
                          "turns": 0, "finish": None, "outputs_open": any(m.get("role") == "tool" for m in msgs),
                          "resubmitted": [0, 0]})
        todo = list(zip(trajs, outs))
        while todo:
            resubmit = []
            for t, o in todo:
                t["turns"] += 1
                t["ids"] += o.token_ids
                t["mask"] += [1] * len(o.token_ids)
                t["logp"] += o.logprobs
                text = ("<think>\n" if g.open_think and t["turns"] == 1 else "") + o.text
                # a call is in the answer, after the reasoning (a block inside unfinished reasoning is not one)
                parsed = parse_tool_calls(text.rpartition(THINK_END)[2], names)
                if parsed is None or o.finish_reason != "stop" or t["turns"] >= g.max_turns:
                    t["messages"].append({"role": "assistant", "content": text})
                    t["finish"] = o.finish_reason
                    continue
                calls = parsed[1]
                t["messages"].append({"role": "assistant", "content": text[: text.rindex(TOOL_CALLS_BEGIN)],
                                      "tool_calls": [{"type": "function", "function": {
                                          "name": c.name, "arguments": c.arguments}} for c in calls]})
                outputs = [run_tool(self.tool_fns[c.name], c.arguments, g.tool_timeout) for c in calls]
                t["calls"] += len(calls)
                t["messages"] += [{"role": "tool", "name": c.name, "content": out} for c, out in zip(calls, outputs)]
                block = self._tool_output_ids(outputs, first=not t["outputs_open"])
                t["outputs_open"] = True
                t["ids"] += block
                t["mask"] += [0] * len(block)
                t["logp"] += [0.0] * len(block)
                room = g.max_tokens - len(t["ids"])
                if room <= 0:  # the tool output filled the completion's budget
                    for key in ("ids", "mask", "logp"):
                        del t[key][g.max_tokens:]
                    t["finish"] = "length"
                    continue
                # The conversation so far goes back to the engine as a prompt (no engine API continues a finished
                # sequence): its full pages, released into the prefix cache when the turn finished, are found there
                # and not prefilled again (counted in `resubmitted`). Seeds: a function of the step's position, the
                # trajectory's place and the turn, as the first turn's are.
                seed = (base + 7 * 4096 * t["turns"] + trajs.index(t)) & 0x7FFFFFFF
                params = SamplingParams(temperature=g.temperature, top_p=g.top_p, max_tokens=room, n=1, seed=seed,
                                        logprobs=True)
                resubmit.append((t, eng.add_request(self.prompt_ids[idx[t["k"]]] + t["ids"], params)))
            while eng.has_work():
                eng.step()
            todo = [(t, eng.completion(s)) for t, (s,) in resubmit]
            for t, c in todo:
                t["resubmitted"][0] += c.prompt_tokens
                t["resubmitted"][1] += c.cached_tokens
        for m in eng.model.moe_layers():  # rollouts must not steer the router-bias update
            m.expert_load.zero_()
        rows = [self.rows[idx[t["k"]]] for t in trajs]
        prompts = [self.prompt_text[idx[t["k"]]] for t in trajs]
        completions = [tok.decode(t["ids"]) for t in trajs]
        fields = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r}
                  if k not in ("prompt", "messages", "where")}
        fields["completion_ids"] = [t["ids"] for t in trajs]
        conversations = [prompt_messages(r, g.system) for r in rows]
        total, per = combine(self.rewards, prompts, completions, conversations,
                             chat_completions=[t["messages"] for t in trajs], **fields)
        return Rollout(rows, prompts, [self.prompt_ids[idx[t["k"]]] for t in trajs], completions,
                       [t["ids"] for t in trajs], [t["logp"] for t in trajs], [t["finish"] for t in trajs],
                       torch.tensor(total, dtype=torch.float32), per, [t["mask"] for t in trajs],
                       [t["calls"] for t in trajs], [t["resubmitted"] for t in trajs])

    def _tool_output_ids(self, outputs: list[str], first: bool) -> list[int]:
        """The template's tool-output block for `outputs` as ids (markers as tokens, outputs as plain text). As the
        official template does, only a conversation's first block opens with <｜tool▁outputs▁begin｜>."""
        tok = self.tokenizer
        ids = [tok.token_to_id(TOOL_OUTPUTS_BEGIN)] if first else []
        for out in outputs:
            ids += [tok.token_to_id(TOOL_OUTPUT_BEGIN), *tok.encode(out, split_special_tokens=True),
                    tok.token_to_id(TOOL_OUTPUT_END)]
        return ids + [tok.token_to_id(TOOL_OUTPUTS_END)]

    # ------------------------------------------------------------------ one GRPO step
    def grpo_step(self) -> dict[str, Any]:
        """One GRPO step: a rollout batch, then the updates on it; returns the step's metrics. With grpo.async the
        batch is the one sampled during the previous step's update (see `_async_step`)."""
        if self.g.async_:
            return self._async_step()
        if self.world > 1:  # the rollout copy takes the policy's current weights (collective)
            parallel.copy_full_weights(self.model, self.engine.model)
        s = self._sample()
        t1 = time.perf_counter()
        train, lr = self._update(s.batch)
        return {**self._metrics(s, time.perf_counter() - t1, lr, train), "policy_lag": 0}

    def _async_step(self) -> dict[str, Any]:
        """grpo.async: train on the batch sampled during the last step (the first step samples its own, on-policy)
        while the engine samples the next one in a background thread, from the snapshot of the weights this
        update starts from; the snapshot takes the updated weights once both are done."""
        s, self._next = self._next, None
        if s is None:  # nothing in flight: the run's first step (or a checkpoint of a synchronous run)
            s = self._sample()
        main = torch.cuda.current_stream(self.device) if self._side_stream is not None else None
        future = self._sampler.submit(self._sample_in_background, main)
        t1 = time.perf_counter()
        try:
            train, lr = self._update(s.batch)
        finally:
            t2 = time.perf_counter()
            wait_for([future])  # the engine and the snapshot are idle before anything else touches them
        self._next = nxt = future.result()  # (raises what the sampling raised)
        self._refresh_snapshot()
        rec = self._metrics(s, t2 - t1, lr, train)
        rec.update(policy_lag=self.step - s.version, overlap_s=max(0.0, min(t2, nxt.end) - max(t1, nxt.start)),
                   wait_s=max(0.0, nxt.end - t2))
        return rec

    def _sample_in_background(self, main: torch.cuda.Stream | None) -> Sampled:
        """`_sample` in the sampler thread; on a GPU on its own stream, after what the main stream queued so far."""
        if main is None:
            return self._sample()
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_stream(main)
            s = self._sample()
            self._side_stream.synchronize()  # its last kernels are done before the snapshot is written again
        return s

    @torch.no_grad()
    def _refresh_snapshot(self) -> None:
        """grpo.async: the engine's snapshot takes the policy's trained weights and router biases."""
        if self._snapshot_pairs[0]:
            torch._foreach_copy_(*self._snapshot_pairs)

    def _sample(self) -> Sampled:
        """The rollout batch of this rank from the engine's model: grpo.prompts_per_step groups, each rollout round
        at the next rollout position; with dynamic sampling, groups without signal are dropped and more rounds
        drawn (at most grpo.max_resample more)."""
        g, G = self.g, self.g.group_size
        t0 = time.perf_counter()
        parts, kept, sampled, zero_var = [], [], 0, 0
        rounds = 0
        while True:
            ro = self.rollout(self.micro)
            self.micro += 1
            rounds += 1
            parts.append(ro)
            r = ro.rewards.view(-1, G)
            ok = (r.max(1).values != r.min(1).values).tolist()
            sampled += len(ok)
            zero_var += ok.count(False)
            keep = [i for i, x in enumerate(ok) if x] if g.dynamic_sampling else list(range(len(ok)))
            kept.append(ro.select(keep, G))
            done = (not g.dynamic_sampling or sum(len(k.rows) for k in kept) >= self.share * G
                    or rounds > g.max_resample)
            if self._ranks_with(done) == self.world:  # the rollout position is shared: all ranks sample alike
                break
        batch = Rollout.cat(kept)
        if len(batch.rows) > self.share * G:
            batch = batch.select(list(range(self.share)), G)
        return Sampled(Rollout.cat(parts), batch, sampled, zero_var, self.step, t0, time.perf_counter())

    def _update(self, batch: Rollout) -> tuple[dict[str, Any], float]:
        """The updates of one step on its batch, the reference refresh and the schedule. Returns the first pass's
        statistics and the step's learning rate."""
        g = self.g
        train = self._optimise(batch) if self._ranks_with(bool(batch.rows)) else {
            "loss": None, "kl": None, "clip_frac": None, "entropy": None, "grad_norm": None, "updates": 0}
        if self.ref is not None and g.ref_sync_every and (self.step + 1) % g.ref_sync_every == 0:
            if self.world == 1:
                with torch.no_grad():
                    torch._foreach_copy_(list(self.ref.parameters()), list(self.model.parameters()))
            else:
                parallel.copy_full_weights(self.model, self.ref)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a step whose groups were all dropped made no update; the schedule moves on
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return train, lr

    def _counts(self, values: list[int]) -> list[int]:
        """Integer counts summed over all ranks; themselves on one process."""
        if self.world == 1:
            return values
        return [int(x) for x in self._sum_over_ranks(torch.tensor(values, device=self.device)).tolist()]

    def _ranks_with(self, flag: bool) -> int:
        """How many ranks have `flag` set (collective); 0 or 1 on one process."""
        return self._counts([int(flag)])[0]

    def _plan(self, lengths: list[int]) -> list[list[list[int]]]:
        """One pass over the rollout rows of these token `lengths` (prompt and completion): the optimizer updates
        (grpo.mini_batch_size sequences over all ranks, each rank its share), each a list of micro-batches of row
        indices (train.batch_size sequences over all ranks). An update's rows go into its micro-batches shortest
        first, so each micro-batch is padded only to the longest of rows of about its own length (an update's
        gradient is the sum over its micro-batches, whatever rows each holds); with grpo.micro_tokens each
        micro-batch takes rows while they fit in that many padded positions. Under torchrun every rank must run
        as many forward/backward passes and updates as the others (FSDP's collectives pair up across ranks), but
        dynamic sampling can leave ranks with different numbers of rows: shorter plans are padded with empty
        micro-batches, which run a pass with zero loss."""
        N = len(lengths)
        mb = self.g.mini_batch_size // self.world or N
        updates = [sorted(range(s, min(N, s + mb)), key=lengths.__getitem__) for s in range(0, N, mb)] if N else []
        if self.g.micro_tokens:  # grpo.micro_tokens: rows while (rows x the longest) fits, the longest last
            budget, plan = max(1, self.g.micro_tokens // self.world), []
            for rows in updates:
                micro: list[list[int]] = []
                for i in rows:
                    if micro and (len(micro[-1]) + 1) * lengths[i] <= budget:
                        micro[-1].append(i)
                    else:
                        micro.append([i])
                plan.append(micro)
        else:
            micro_rows = max(1, self.recipe.train.batch_size // self.world)
            plan = [[rows[m:m + micro_rows] for m in range(0, len(rows), micro_rows)] for rows in updates]
        if self.world > 1:
            n = torch.tensor([len(plan)], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            plan += [[] for _ in range(int(n) - len(plan))]
            widths = torch.tensor([len(u) for u in plan], device=self.device)
            dist.all_reduce(widths, op=dist.ReduceOp.MAX)
            plan = [u + [[] for _ in range(w - len(u))] for u, w in zip(plan, widths.tolist())]
        return plan

    def _dummy_pass(self) -> None:
        """A forward/backward with zero loss, so that a rank without rows takes part in FSDP's (and EP's)
        collectives; the token it routes is not counted in the expert load."""
        load = [m.expert_load.clone() for m in self.model.moe_layers()]
        logp, _, _ = completion_logprobs(self.model, [[0]], [[0]], 1.0)
        (logp.sum() * 0).backward()
        for m, x in zip(self.model.moe_layers(), load):
            m.expert_load.copy_(x)

    def _optimise(self, b: Rollout) -> dict[str, Any]:
        """mu passes of mini-batch updates over a rollout batch; returns the first pass's statistics."""
        g, G, model, dev = self.g, self.g.group_size, self.model, self.device
        N = len(b.rows)
        # The batch's advantages and sampling-time log-probs (padded, (N, longest)) in one transfer; nothing in
        # the passes below waits for the device until their statistics are read once at the end.
        width = max((len(x) for x in b.old_logp), default=0)
        host = torch.zeros(N, width + 1)
        host[:, 0] = group_advantages(b.rewards.view(-1, G), g.scale_rewards).view(-1)
        for i, x in enumerate(b.old_logp):
            host[i, 1:1 + len(x)] = torch.tensor(x, dtype=torch.float32)
        host = to_device(host, dev)
        adv, old = host[:, 0], host[:, 1:]
        masks = lambda ids: None if b.token_mask is None else [b.token_mask[i] for i in ids]  # noqa: E731
        plan = self._plan([len(p) + len(c) for p, c in zip(b.prompt_ids, b.completion_ids)])
        ref_logp = None
        if g.beta > 0:  # once per rollout batch; the reference does not move within it
            # (with LoRA: the base under the policy itself on one process, and under its full copy under torchrun,
            # refreshed at the start of the step, so no forward here is collective)
            ref = self.ref if self.ref is not None else self.model if self.world == 1 else self.engine.model
            ref.eval()
            # In the training passes' own micro-batches: the same shapes as the policy's forward, so while the
            # policy still equals the reference (step 1's first update) the KL and its gradient are exactly 0 on
            # every CPU, not rounding noise that AdamW's first, sign-like update would turn into full-size steps
            # (measured: 0.3% apart in the next loss between micro-batch sizes, with MKL's AVX2 kernels).
            ref_logp = [None] * N
            with torch.no_grad(), lora.adapters_off(ref) if self.ref is None else contextlib.nullcontext():
                for ids in (ids for update in plan for ids in update if ids):
                    lp, _, _ = completion_logprobs(ref, [b.prompt_ids[i] for i in ids],
                                                   [b.completion_ids[i] for i in ids], g.temperature,
                                                   compiled=self.recipe.train.compile,
                                                   chunk=self.recipe.train.head_chunk, token_mask=masks(ids))
                    for j, i in enumerate(ids):
                        ref_logp[i] = lp[j, : len(b.completion_ids[i])]
        model.train()
        # device sums of the first pass: loss, clipped tokens, entropy, KL
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        grad_norm = 0.0
        # sequences and completion tokens of the whole batch, over all ranks: the statistics' denominators
        n_all, n_tok_total = self._counts([N, sum(b.model_tokens(i) for i in range(N))])
        updates = skipped = 0
        upd_loss = torch.zeros((), device=dev)  # the update's loss, whose finiteness decides whether it is applied
        for p in range(g.mu):
            for update in plan:
                rows = [i for ids in update for i in ids]
                # the mini-batch's, over all ranks (tokens: those that get a loss)
                n_rows, n_lens = self._counts([len(rows), sum(b.model_tokens(i) for i in rows)])
                # divided by world: FSDP averages the ranks' gradients (as in Trainer.train_step)
                denom = loss_denominator(g.loss_agg, n_rows, n_lens, g.max_tokens) / self.world
                for ids in update:
                    if not ids:
                        self._dummy_pass()
                        continue
                    logp, mask, ent = completion_logprobs(model, [b.prompt_ids[i] for i in ids],
                                                          [b.completion_ids[i] for i in ids], g.temperature,
                                                          with_entropy=p == 0,
                                                          compiled=self.recipe.train.compile,
                                                          chunk=self.recipe.train.head_chunk, token_mask=masks(ids))
                    L = logp.shape[1]
                    rows_t = to_device(torch.tensor(ids), dev)
                    old_lp = old[rows_t, :L]  # 0 past each completion's end
                    obj, clipped = clipped_surrogate(logp, old_lp, adv[rows_t], g.eps_low, g.eps_high)
                    per_tok = -obj
                    if ref_logp is not None:
                        ref = torch.zeros(len(ids), L, device=dev)
                        for j, i in enumerate(ids):
                            ref[j, : len(ref_logp[i])] = ref_logp[i]
                        kl = k3_kl(logp, ref)
                        per_tok = per_tok + g.beta * kl
                    mf = mask.float()
                    loss = aggregate(per_tok, mask, g.loss_agg, denom)
                    loss.backward()
                    self.master.accumulate_grads()
                    upd_loss += loss.detach()
                    if p == 0:
                        scale = denom / loss_denominator(g.loss_agg, n_all, n_tok_total, g.max_tokens)
                        sums += torch.stack([loss.detach().double() * scale, (clipped & mask).sum().double(),
                                             (ent * mf).sum().double(),
                                             (kl.detach() * mf).sum().double() if ref_logp is not None
                                             else sums.new_zeros(())])
                if self.world > 1:  # the bias moves by the load of all ranks' tokens
                    parallel.all_reduce_expert_load(model)
                _, gnorm_v, finite, _ = self.end_step(self._sum_over_ranks(upd_loss))  # the update's host sync
                skipped += not finite
                if p == 0:
                    grad_norm = max(grad_norm, gnorm_v)
                upd_loss = upd_loss.new_zeros(())
                updates += 1
        # each rank summed its own rows' shares of the averages
        loss_v, clip_v, ent_v, kl_v = self._sum_over_ranks(sums).tolist()
        stats = {"loss": loss_v, "clip_frac": clip_v / n_tok_total, "entropy": ent_v / n_tok_total,
                 "kl": kl_v / n_tok_total, "grad_norm": grad_norm}
        if ref_logp is None:
            stats["kl"] = None
        stats["updates"] = updates
        stats["skipped"] = skipped
        return stats

    def _metrics(self, s: Sampled, train_s: float, lr: float, train: dict) -> dict[str, Any]:
        G = self.g.group_size
        allr, batch, sampled, zero_var, gen_s = s.drawn, s.batch, s.groups, s.zero_var, s.end - s.start
        trained = [len(batch.rows), sum(len(c) + len(p) for c, p in zip(batch.completion_ids, batch.prompt_ids))]
        if self.world > 1:  # every rank's samples and counts, so that the logged numbers cover the whole step
            parts = [None] * self.world
            dist.all_gather_object(parts, allr)
            allr = Rollout.cat(parts)
        sampled, zero_var, n_trained, train_tokens = self._counts([sampled, zero_var, *trained])
        lens = [len(c) for c in allr.completion_ids]
        rec: dict[str, Any] = {"reward": allr.rewards.mean().item()}
        for name, vals in allr.per_reward.items():
            v = [x for x in vals if x is not None]
            rec[f"reward/{name}"] = sum(v) / len(v) if v else None
        if "accuracy" in allr.per_reward:
            acc = [x or 0.0 for x in allr.per_reward["accuracy"]]
            rec["accuracy"] = sum(acc) / len(acc)
            rec[f"pass@{G}"] = sum(max(acc[i:i + G]) for i in range(0, len(acc), G)) / (len(acc) // G)
        rec.update({"response_len_mean": sum(lens) / len(lens), "response_len_max": max(lens),
                    "truncated": allr.finish.count("length") / len(lens),
                    "kl": train["kl"], "clip_frac": train["clip_frac"], "entropy": train["entropy"],
                    "loss": train["loss"], "grad_norm": train["grad_norm"], "lr": lr,
                    "zero_var_groups": zero_var / sampled, "groups_sampled": sampled,
                    "groups_trained": n_trained // G, "updates": train["updates"],
                    "gen_s": gen_s, "train_s": train_s, "gen_tokens_per_s": sum(lens) / max(gen_s, 1e-9),
                    "train_tokens_per_s": train_tokens * self.g.mu / max(train_s, 1e-9)})
        if allr.tool_calls is not None:
            rec["tool_calls"] = sum(allr.tool_calls) / len(allr.tool_calls)  # calls run per sample
            again, cached = (sum(x) for x in zip(*allr.resubmitted))
            # share of the conversations resubmitted after tool calls that the prefix cache served
            rec["resubmitted_cached"] = cached / again if again else None
        if train.get("skipped"):  # updates left out as non-finite (train.on_nonfinite = "skip")
            rec["skipped"] = train["skipped"]
        self._last_rollout = allr
        return rec

    # ------------------------------------------------------------------ the run
    # ------------------------------------------------------------------ the hooks of Trainer.fit
    def _log_files(self) -> dict[str, Path]:
        return {**super()._log_files(), "samples": self.run_dir / "samples.jsonl"}

    def run_step(self) -> dict[str, Any]:
        return self.grpo_step()

    def _after_step(self, rec: dict[str, Any], files: dict[str, Any]) -> None:
        """A few of the step's completions with their rewards go to samples.jsonl."""
        ro, sf = self._last_rollout, files["samples"]
        for i in range(min(self.g.log_samples, len(ro.rows))):
            sf.write(json.dumps({"step": rec["step"], "prompt": ro.prompts[i], "completion": ro.completions[i],
                                 "answer": ro.rows[i].get("answer"), "reward": ro.rewards[i].item(),
                                 **{k: v[i] for k, v in ro.per_reward.items()}}) + "\n")
        sf.flush()

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        if self.ref is not None and self.g.ref_sync_every:  # a refreshed reference is not the initial model
            st["reference"] = {k: v.detach().to("cpu", copy=True) for k, v in self.ref.state_dict().items()}
        if self._next is not None:  # grpo.async: the batch the next step trains on, sampled during this one
            st["next_batch"] = self._next.state()
        return st

    def load(self, path: str | Path) -> Path:
        path = super().load(path)
        if (self.ref is not None and self.g.ref_sync_every) or self.g.async_:
            st = ckpt.load_checkpoint(path)
            if "reference" in st and self.ref is not None:
                self.ref.load_state_dict(st["reference"])
            if self.g.async_:
                self._refresh_snapshot()
                self._next = Sampled.from_state(st["next_batch"]) if "next_batch" in st else None
        return path

    def _log(self, rec: dict[str, Any], bar) -> None:
        def f(k, fmt):
            return "-" if rec.get(k) is None else format(rec[k], fmt)

        bar.set_postfix_str(f"reward {rec['reward']:.3f} acc {f('accuracy', '.3f')}", refresh=False)
        self._to_tensorboard(rec)
        every = self.recipe.log.every
        if self.quiet or not every or (rec["step"] % every and rec["step"] != self.recipe.train.steps):
            return
        from tqdm import tqdm

        tqdm.write(" | ".join([
            f"step {rec['step']}/{self.recipe.train.steps}", f"reward {rec['reward']:.3f}",
            f"acc {f('accuracy', '.3f')}", f"pass@{self.g.group_size} {f(f'pass@{self.g.group_size}', '.2f')}",
            f"len {rec['response_len_mean']:.0f}/{rec['response_len_max']}", f"trunc {rec['truncated']:.0%}",
            f"kl {f('kl', '.4f')}", f"clip {f('clip_frac', '.3f')}", f"ent {f('entropy', '.3f')}",
            f"zero-var {rec['zero_var_groups']:.0%}", f"gen {rec['gen_s']:.1f}s train {rec['train_s']:.1f}s",
            f"{rec['gen_tokens_per_s']:,.0f} tok/s"]))


# ====================================================================== evaluation
@torch.no_grad()
def evaluate(engine: Engine, prompts: list[list[int]], answers: list[str], prompt_texts: list[str] | None = None,
             samples: int = 1, temperature: float = 1.0, max_tokens: int = 16, seed: int = 12345) -> float:
    """Mean accuracy (pass@1 averaged over `samples`) of the engine's model on prompts with reference answers,
    graded by the accuracy reward (extract_answer + math_equal). temperature 0 is greedy."""
    from ..rewards import accuracy_reward

    engine.model.eval()
    engine.reset_prefix_cache()  # the weights may have changed since the engine last ran
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens, n=samples,
                                                   seed=seed))
    texts = prompt_texts or [""] * len(prompts)
    acc = accuracy_reward([texts[o.prompt_index] for o in outs], [o.text for o in outs],
                          answer=[answers[o.prompt_index] for o in outs])
    return sum(acc) / len(acc)


# ====================================================================== running a recipe
def run(recipe: GRPORecipe, resume=None, quiet: bool = False) -> dict:
    """`r1lab grpo`: device, seed, policy, tokenizer, prompts, then GRPOTrainer.fit."""
    from .pretrain import load_data_tokenizer

    device, dtype = setup(recipe)
    model = build_model(recipe, device)
    tok = load_data_tokenizer(recipe)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary only "
                         f"{model.config.vocab_size}")
    rows = load_prompt_rows(recipe)
    trainer = GRPOTrainer(recipe, model, tok, rows, dtype=dtype, quiet=quiet)
    trainer._note(f"{len(rows):,} prompts, {recipe.grpo.prompts_per_step} x G={recipe.grpo.group_size} per step, "
                  f"rewards {', '.join(f'{w.name}={w.weight:g}' for w in trainer.rewards)}")
    return trainer.fit(resume)


# ====================================================================== command line
DESCRIPTION = ("Reinforcement learning with verifiable rewards (GRPO, as in DeepSeek-R1; DAPO and Dr. GRPO "
               "variants by option). Rollouts come from the r1lab engine on the policy's own weights.")
EPILOG = """\
Every recipe key can be set in the TOML file ([table] key = value) or here as --table.key VALUE (kebab- or
snake_case); --reward adds a reward (repeatable): --reward my_module:my_fn=0.5. Precedence: defaults <
--recipe file < command line. --resume continues from the newest checkpoint of a run folder with the recipe
stored in it, on the same prompts the uninterrupted run would have seen.

Under torchrun (torchrun --nproc-per-node N -m r1lab.cli grpo ...) the policy is sharded with FSDP2 (and expert
parallelism with --parallel.ep), each rank samples and scores its share of every step's prompts, rank 0 logs,
and checkpoints are sharded; --resume works with any number of ranks.
"""


def add_parsers(subparsers) -> None:
    """Register `grpo` on an argparse subparsers object."""
    from .cli import add_trainer_parser

    p = add_trainer_parser(subparsers, "grpo", "reinforcement learning with verifiable rewards (GRPO)", DESCRIPTION,
                           run="r1lab.train.grpo:run", recipe_cls=GRPORecipe, epilog=EPILOG, prepare=_add_rewards)
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="add a reward: name=weight or module:function=weight (repeatable; added to grpo.rewards)")


def _add_rewards(recipe: GRPORecipe, args) -> None:
    if args.reward:
        recipe.grpo.rewards = list(recipe.grpo.rewards) + list(args.reward)
    load_rewards(recipe.grpo.rewards)  # fail now, with the spec named, not after loading the model
