"""`r1lab rm`: training a Bradley-Terry reward model (DeepSeek-R1 section 2.3.4, "RL for all scenarios": rule-based
rewards for reasoning prompts, learned reward models for open-ended ones). Using one as a GRPO reward, its folder
format and the per-row routing of rewards are in r1lab.rewards, beside the rule-based rewards.

The model is the r1lab Transformer with a scalar head `score_head` (Linear(D, 1)) on the final normed hidden
state of each sequence's last token (the EOS appended to every response). Trained on pairwise JSONL rows
`{"prompt" or "messages", "chosen", "rejected"}` with the Bradley-Terry loss (Ouyang et al. 2022, eq. 1)
        loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
averaged over the pairs of an optimizer step. A sequence is the prompt rendered by the chat template (with
the generation prompt) + the response text + EOS, exactly as SFT renders the final turn. rm.scope = "answer"
trains on the text after `</think>` only (the helpfulness model of the R1 paper), "full" on the whole
response (the harmlessness model).

Training reuses the one loop's pieces (`Trainer`: MasterWeights, AdamW, schedule, clipping, checkpoints and
exact resume, metrics.jsonl, Ctrl-C, and under torchrun FSDP2 + expert parallelism with sharded checkpoints);
only the step (`RewardTrainer.train_step`), its batches and the export differ. Every rm.eval_every
steps and at the end, pairwise accuracy and loss on a held-out split (rm.eval_fraction of the pairs, seeded)
go to metrics.jsonl. The exported folder (run.out/final) is `save_reward_model`'s: the transformer in the HF
layout (save_pretrained, tokenizer included), the head in `reward_head/score.safetensors`, and `reward_model.json`
(scope, max_len); `r1lab.rewards.load_reward_model(path)` reads it back, and GRPO's
`--reward rm:PATH[=weight][,scope=answer|full]` scores with it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import lora, parallel
from ..data import BatchOrder, read_jsonl
from ..model.transformer import Transformer
from ..rewards import SCOPES, last_token_scores, pad_right, save_reward_model, scoped
from .loop import Trainer, build_model, peak_memory_gb, setup
from .recipe import SECTIONS, Recipe, _key, load_recipe

# ====================================================================== the math
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair (fp32), mean or sum over pairs. logsigmoid is the stable
    form: for a margin of -100 it gives 100, where log(sigmoid(.)) gives inf."""
    per = -F.logsigmoid(r_chosen.float() - r_rejected.float())
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def add_score_head(model, seed: int = 0) -> torch.nn.Linear:
    """Attach `score_head` = Linear(hidden, 1) (fp32, on the model's device) to a Transformer, as a submodule,
    so the loop's MasterWeights, AdamW, checkpoints and resume cover it unchanged. Initialised with
    std 1/sqrt(D + 1) (InstructGPT's reward head) and zero bias, so initial scores are O(1)."""
    D = model.config.hidden_size
    head = torch.nn.Linear(D, 1, device=model.device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, D, generator=g) / math.sqrt(D + 1))
        head.bias.zero_()
    model.score_head = head.to(model.dtype)
    return model.score_head


# ====================================================================== data
def pair_prompt(row: dict) -> list[dict]:
    """The conversation before the response: [{"role": "user", "content": prompt}] or the row's messages
    (which must not end with an assistant turn: chosen/rejected are that turn)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        if isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            raise ValueError("'messages' must end before the assistant reply: 'chosen' and 'rejected' are that reply")
        return msgs
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"'prompt' must be a string, got {type(row['prompt']).__name__}")
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError(f"expected 'prompt' or 'messages' with 'chosen' and 'rejected', found keys {sorted(row)}")


@dataclass
class PairBatch:
    """One micro-batch of training pairs: their indices (under torchrun this rank's share) and the length their
    sequences are padded to, the longest of the whole micro-batch's, so that every sequence gets the padding it
    would get in one process (and the expert loads and balance loss, which see the padding, the same values)."""

    rows: list[int]
    length: int


@dataclass
class Pairs:
    """Tokenized preference pairs (each sequence ends with EOS) and where each came from."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    where: list[str]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, idx: Sequence[int]) -> "Pairs":
        return Pairs([self.chosen[i] for i in idx], [self.rejected[i] for i in idx], [self.where[i] for i in idx])


def read_pairs(paths: Sequence[str | Path], tokenizer, max_len: int, scope: str = "full",
               too_long: str = "skip") -> Pairs:
    """Read pairwise JSONL files. Bad rows raise ValueError naming file:line; a pair with a sequence over
    max_len tokens is skipped (and counted) or an error (too_long="error")."""
    if not paths:
        raise ValueError("no training data: set data.train to JSONL files of {prompt|messages, chosen, rejected}")
    out, skipped = Pairs([], [], []), 0
    for path in paths:
        for where, row in read_jsonl(path):
            try:
                msgs = pair_prompt(row)
                for k in ("chosen", "rejected"):
                    if k not in row:
                        raise ValueError(f"missing {k!r} (a pair needs 'chosen' and 'rejected' responses)")
                    if not isinstance(row[k], str):
                        raise ValueError(f"{k!r} must be a string, got {type(row[k]).__name__}")
                prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            c, r = (tokenizer.encode(prompt) + tokenizer.encode(scoped(row[k], scope)) + [tokenizer.eos_id]
                    for k in ("chosen", "rejected"))
            if max(len(c), len(r)) > max_len:
                if too_long == "error":
                    raise ValueError(f"{where}: a response of {max(len(c), len(r))} tokens (prompt included) is "
                                     f"longer than data.seq_len = {max_len}; raise it or set data.too_long = \"skip\"")
                skipped += 1
                continue
            out.chosen.append(c), out.rejected.append(r), out.where.append(where)
    if not out.chosen:
        raise ValueError(f"no preference pairs in {', '.join(map(str, paths))}"
                         + (f": all {skipped} are longer than data.seq_len = {max_len}" if skipped else ""))
    out.stats = {"pairs": len(out), "skipped_too_long": skipped}
    return out


def split_pairs(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs | None]:
    """(train, held-out): a seeded random `fraction` of the pairs held out (at least one when > 0)."""
    if fraction <= 0:
        return pairs, None
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n = max(1, round(len(pairs) * fraction))
    if n >= len(pairs):
        raise ValueError(f"rm.eval_fraction = {fraction} leaves no training pairs out of {len(pairs)}")
    return pairs.subset(sorted(idx[n:])), pairs.subset(sorted(idx[:n]))


@torch.no_grad()
def evaluate_pairs(model, pairs: Pairs, batch_size: int = 32, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Pairwise accuracy (share with r_chosen > r_rejected; a tie counts as wrong) and mean Bradley-Terry loss.

    Under torchrun (world > 1; collective: every rank calls it) rank r scores pairs r, r + world, ... (the
    ranks make the same number of forward passes, as FSDP needs: one whose share ran out scores pair 0 and drops
    it), and the scores are gathered back into one process's order before the metrics are computed."""
    was = model.training
    model.eval()
    mine = range(rank, len(pairs), world)
    rc, rr = [], []
    for s in range(0, -(-len(pairs) // world), batch_size):  # up to the largest share
        sel = mine[s:s + batch_size]
        c, r = ([side[i] for i in sel or [0]] for side in (pairs.chosen, pairs.rejected))
        ids, lens = pad_right(c + r)
        sc = last_token_scores(model, ids, lens)
        rc.append(sc[: len(sel)]), rr.append(sc[len(c): len(c) + len(sel)])
    rc, rr = torch.cat(rc), torch.cat(rr)
    if world > 1:
        rc, rr = _gather_strided(rc, len(pairs), world), _gather_strided(rr, len(pairs), world)
    model.train(was)
    for m in model.moe_layers():  # evaluation must not steer the router-bias update
        m.expert_load.zero_()
    return {"eval_accuracy": (rc > rr).float().mean().item(), "eval_loss": bradley_terry_loss(rc, rr).item(),
            "eval_margin": (rc - rr).mean().item()}


def _gather_strided(x: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The n values of which each rank holds x = values rank, rank + world, ... (collective), in order."""
    m = -(-n // world)  # the largest share; the shorter ones are padded for all_gather
    parts = [x.new_empty(m) for _ in range(world)]
    dist.all_gather(parts, F.pad(x, (0, m - len(x))))
    return torch.stack(parts, 1).flatten()[:n]  # [p, r] is value p * world + r


# ====================================================================== the recipe
@dataclass
class RM:
    scope: str = _key("full", "what the model scores: the whole response, or only the text after </think> "
                      "(the R1 helpfulness model)", SCOPES)
    eval_fraction: float = _key(0.1, "share of the pairs held out for pairwise accuracy and loss (seeded by "
                                "run.seed); 0 = no held-out split")
    eval_every: int = _key(50, "evaluate on the held-out split every this many steps (and at the end); 0 = only "
                           "at the end")
    eval_batch_size: int = _key(32, "pairs per forward pass when evaluating")


RM_DEFAULTS = {("run", "out"): "runs/rm", ("optim", "lr"): 1e-5, ("optim", "weight_decay"): 0.0,
               ("moe", "mtp_weight"): 0.0, ("data", "seq_len"): 1024}


@dataclass
class RMRecipe(Recipe):
    """The training recipe plus an [rm] table. Used: data.train (pairwise JSONL), data.seq_len (longest
    sequence, prompt + response + EOS), data.too_long, data.shuffle, data.tokenizer; train.batch_size counts
    pairs per micro-batch (2 x that many sequences per forward)."""

    kind_defaults: ClassVar[dict[str, dict]] = {"rm": RM_DEFAULTS}
    default_kind: ClassVar[str | None] = "rm"
    sections: ClassVar[dict[str, type]] = {**SECTIONS, "rm": RM}

    rm: RM = field(default_factory=RM)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.rm.eval_fraction < 1:
            raise ValueError(f"recipe: rm.eval_fraction must be in [0, 1) (got {self.rm.eval_fraction})")
        if self.rm.eval_every < 0 or self.rm.eval_batch_size < 1:
            raise ValueError("recipe: rm.eval_every must be >= 0 and rm.eval_batch_size >= 1")


def load_rm_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RMRecipe:
    """Defaults, then the TOML file, then `overrides` {"rm.scope": "answer", ...}."""
    return load_recipe(path, "rm", overrides, RMRecipe)


# ====================================================================== the trainer
class RewardTrainer(Trainer):
    """The training loop with the Bradley-Terry step: each micro-batch is train.batch_size pairs, chosen and
    rejected in one forward pass of 2 x batch_size right-padded sequences.

    Under torchrun it runs as `Trainer` does (FSDP2, expert parallelism, sharded checkpoints, rank 0 logging):
    each rank takes train.batch_size / world pairs of every micro-batch, the loss is divided by the global pair
    count, clipping uses the global gradient norm, the router bias moves by the global expert load, held-out
    pairs are split over the ranks, and rank 0 exports the gathered model with its head."""

    def __init__(self, recipe: RMRecipe, model, train: Pairs, held_out: Pairs | None, tokenizer=None,
                 dtype: torch.dtype | None = None, quiet: bool = False):
        world = parallel.world_size()
        if recipe.train.batch_size % world:  # (Trainer checks this only for its own data)
            raise ValueError(f"train.batch_size={recipe.train.batch_size} pairs must be a multiple of the {world} "
                             f"ranks: each takes an equal share of every micro-batch")
        if not hasattr(model, "score_head"):
            add_score_head(model, recipe.run.seed)  # before Trainer parallelizes the model: FSDP shards it too
        # an object without `save` (a test's tokenizer) cannot go into the exported folder
        saveable = tokenizer if tokenizer is None or hasattr(tokenizer, "save") else False
        super().__init__(recipe, model, None, saveable, kind="rm", dtype=dtype, quiet=quiet)
        self.pairs, self.held_out = train, held_out
        self.order = BatchOrder(len(train), recipe.train.batch_size, recipe.run.seed, recipe.data.shuffle)
        self.max_len = recipe.data.seq_len

    def next_batches(self) -> list[PairBatch]:
        """The step's micro-batches; under torchrun this rank's share of each (as Trainer's)."""
        out = []
        for _ in range(self.recipe.train.grad_accum):
            rows = self.order.rows(self.micro)
            length = max(len(side[i]) for side in (self.pairs.chosen, self.pairs.rejected) for i in rows)
            out.append(PairBatch(parallel.shard(rows, self.rank, self.world) if self.world > 1 else rows, length))
            self.micro += 1
        return out

    def train_step(self, batches: list[PairBatch]) -> dict[str, Any]:
        """One optimizer step over micro-batches of pairs: mean Bradley-Terry loss over the step's pairs
        (+ the MoE balance loss), backward, clip, AdamW, router-bias update, schedule. Adds held-out metrics
        every rm.eval_every steps."""
        r, model = self.recipe, self.model
        t0 = time.perf_counter()
        model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        # Every rank holds the same number of pairs (`shard` splits evenly), so the global count is this rank's
        # times world. Each rank divides its loss sum by its own count, i.e. global count / world: FSDP averages
        # the ranks' gradients, and the mean over ranks of sum_r / (N / world) is sum / N, the one-process loss.
        local = sum(len(b.rows) for b in batches)
        n_pairs = local * self.world
        loss_sum, correct, n_tok = 0.0, 0, 0
        for b in batches:
            rows = b.rows
            c, rj = [self.pairs.chosen[i] for i in rows], [self.pairs.rejected[i] for i in rows]
            ids, lens = pad_right(c + rj, length=b.length)
            scores = last_token_scores(model, ids, lens)
            rc, rr = scores[: len(rows)], scores[len(rows):]
            loss = bradley_terry_loss(rc, rr, "sum") / local  # accumulated micro-batches = one large batch
            bal = model.balance_loss()
            if bal is not None:  # averaged over the micro-batches (and, by FSDP, the ranks), as in Trainer
                loss = loss + bal / len(batches)
            loss.backward()
            self.master.accumulate_grads()
            loss_sum += bradley_terry_loss(rc.detach(), rr.detach(), "sum").item()
            correct += int((rc > rr).sum())
            n_tok += int(lens.sum())
        if self.world > 1:  # the step's totals over all ranks (float64: exact for the counts), and expert loads
            totals = torch.tensor([loss_sum, correct, n_tok], dtype=torch.float64, device=self.device)
            loss_sum, correct, n_tok = self._sum_over_ranks(totals).tolist()
            parallel.all_reduce_expert_load(model)
        loss_v, gnorm, finite, _ = self.end_step(torch.tensor(loss_sum / n_pairs, device=self.device))
        self.scheduler.step()
        dt = time.perf_counter() - t0
        rec = {"loss": loss_v, "accuracy": correct / n_pairs, "lr": lr, "grad_norm": gnorm, "pairs": n_pairs,
               "tokens_per_s": n_tok / dt, "step_time_s": dt, "mfu": None,
               "peak_mem_gb": peak_memory_gb(self.device)}
        if not finite:
            rec["skipped"] = 1
        step = self.step + 1  # the step this one becomes
        e = r.rm.eval_every
        if self.held_out is not None and (step == r.train.steps or (e and step % e == 0)):
            rec.update(evaluate_pairs(model, self.held_out, r.rm.eval_batch_size, self.rank, self.world))
            self._note(f"step {step}: held-out pairwise accuracy {rec['eval_accuracy']:.3f}, "
                       f"loss {rec['eval_loss']:.4f} ({len(self.held_out)} pairs)")
        return rec

    def export(self) -> Path:
        """Trainer.fit's export (when ckpt.export): the reward-model folder (`save_reward_model`) in run.out/final.
        Under torchrun the model and its head are gathered to rank 0, one tensor at a time, and rank 0 writes it."""
        out = self.run_dir / "final"
        if self.use_lora:  # the adapters too; the reward-model folder (what rewards load) is base + adapters merged
            lora.save_adapter(self.model, self.run_dir / "adapter", base_model=self.recipe.model.init or None,
                              write=self.main)
        if self.world == 1:
            model = lora.merged_model(self.model) if self.use_lora else self.model
            save_reward_model(model, out, self.tokenizer, self.recipe.rm.scope, self.max_len)
        else:
            full = None
            if self.main:  # a plain model with the head to gather into (parallel.unsharded_copy makes one without)
                if self.use_lora:  # wrapped as the model is, so that the copy goes by name
                    full = lora.empty_like(self.model, "cpu")
                else:
                    with torch.device("meta"):
                        full = Transformer(self.model.config)
                    full = full.to_empty(device="cpu").init_buffers()
                add_score_head(full)
            parallel.copy_full_weights(self.model, full)  # collective
            if self.main:
                full = lora.merged_model(full) if self.use_lora else full
                save_reward_model(full.to(self.dtype), out, self.tokenizer, self.recipe.rm.scope, self.max_len)
            dist.barrier()
        self._note(f"exported the reward model to {out}")
        return out


def run(recipe: RMRecipe, resume=None, quiet: bool = False, tokenizer=None) -> dict:
    """`r1lab rm`: device, process group (under torchrun) and seed, model (+ head), tokenizer, pairs and held-out
    split, then RewardTrainer.fit. Under torchrun every rank builds the same model and reads the same pairs.
    `tokenizer`: any object with encode / eos_id / apply_chat_template (tests use a character-level one)."""
    from .pretrain import load_data_tokenizer

    device, dtype = setup(recipe)
    model = build_model(recipe, device)
    tok = tokenizer or load_data_tokenizer(recipe)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary only "
                         f"{model.config.vocab_size}")
    if recipe.data.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={recipe.data.seq_len} is longer than the model's context "
                         f"(max_position_embeddings={model.config.max_position_embeddings})")
    pairs = read_pairs(recipe.data.train, tok, recipe.data.seq_len, recipe.rm.scope, recipe.data.too_long)
    train, held = split_pairs(pairs, recipe.rm.eval_fraction, recipe.run.seed)
    trainer = RewardTrainer(recipe, model, train, held, tok, dtype=dtype, quiet=quiet)
    trainer._note(f"{len(train):,} training pairs, {len(held) if held else 0:,} held out "
                  f"({pairs.stats['skipped_too_long']} skipped as too long), scope {recipe.rm.scope}")
    return trainer.fit(resume)


# ====================================================================== command line
DESCRIPTION = ("Train a Bradley-Terry reward model on pairwise preferences (JSONL {prompt|messages, chosen, "
               "rejected}): the transformer with a scalar head on the last token, initialised from model.init "
               "or a preset; held-out pairwise accuracy in metrics.jsonl; run.out/final loads with "
               "load_reward_model and serves GRPO as --reward rm:PATH=weight,scope=answer.")
EPILOG = """\
Every recipe key can be set in the TOML file ([table] key = value) or here as --table.key VALUE (kebab- or
snake_case). Precedence: defaults < --recipe file < command line. --resume continues from the newest
checkpoint of a run folder with the recipe stored in it.

Under torchrun (torchrun --nproc-per-node N -m r1lab.cli rm ...) the model is sharded with FSDP2 (and expert
parallelism with --parallel.ep), each rank takes its share of every micro-batch of pairs (train.batch_size must
be a multiple of N), rank 0 logs and exports, and checkpoints are sharded; --resume works with any number of
ranks.
"""


def add_parsers(subparsers) -> None:
    """Register `rm` on an argparse subparsers object."""
    from .cli import add_trainer_parser

    add_trainer_parser(subparsers, "rm", "train a reward model on preference pairs (Bradley-Terry)", DESCRIPTION,
                       run="r1lab.train.reward_model:run", recipe_cls=RMRecipe, epilog=EPILOG)
