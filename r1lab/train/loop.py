"""The one training loop: pretraining and SFT (and later stages) differ only in the data they feed it.

One optimizer step = `train.grad_accum` micro-batches: forward, loss (next-token cross-entropy over the target
tokens of the whole step, + lambda x the MTP loss, + the sequence-wise balance loss), backward; then gradient
clipping, AdamW, the aux-loss-free router-bias update (DeepSeek-V3 section 2.1.2, once per step, from the
tokens each expert received during the step) and the learning-rate schedule.

Precision (the README's policy): the model's weights are in the compute dtype (bfloat16 on CUDA), so the
matmuls and the grouped-GEMM experts run in bf16 while the model's router, norms' statistics, RoPE and the
correction bias stay fp32 as the model defines them; AdamW updates fp32 master copies of the weights
(`MasterWeights`), which are copied back after each step; gradients of micro-batches accumulate in fp32. On
the CPU everything is fp32 and the master weights are the model's own; runs there are bitwise deterministic
(same seed and thread count, same losses; `--resume` after a kill gives the losses of an uninterrupted run).
On the GPU they are not: atomics in some backward kernels sum in a varying order.

MFU counts 6 FLOPs per parameter per token for the matmul weights a token passes through, plus attention
(`train_flops_per_token`), against the accelerator's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import lora, parallel
from ..checkpoint import load_pretrained, save_pretrained
from ..data import IGNORE, Batch, BatchOrder, Sequences
from ..model.config import ModelConfig, get_preset
from ..model.transformer import Transformer
from ..parallel import apply_activation_checkpointing, compile_blocks
from . import state as ckpt
from .recipe import Recipe

# Dense bf16 tensor-core peak (no sparsity, SXM parts), TFLOP/s, matched against torch.cuda.get_device_name();
# anything else: set log.peak_tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step was NaN or infinite (the run stops; nothing was updated)."""


# ---------------------------------------------------------------------- FLOPs and MFU (the one place)
def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0,
                          adapters: int | None = None) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward.

    Matmuls: 6 x N, where N counts the weights one token multiplies with: `num_params(active=True,
    embeddings=False)` (attention, the dense MLPs, the shared + num_experts_per_tok routed experts, the router)
    plus the output head (vocab x hidden). The input embedding is excluded: it is a row lookup, not a matmul.
    Norm weights are in N too (a rounding error). MTP depths add their block, projection and a second pass
    through the head.
    Attention: per layer and token, QK^T and PV over on average seq_len/2 keys (causal) for H heads:
    2 x H x (qk_head_dim + v_head_dim) x seq_len/2 FLOPs forward, x3 for training. Packed documents under the
    document mask do less work than this; the count is the causal one either way (MFU, not useful-work
    accounting), and activation-checkpointing recomputation is not counted.
    adapters: LoRA on a frozen base, the adapter parameters a token passes through (`lora.active_parameters`):
    the base's matmuls then cost 4 x N (forward, and the backward to their inputs: no weight gradient), the
    adapters 6 x theirs.
    """
    head = cfg.vocab_size * cfg.hidden_size
    n = cfg.num_params(active=True, embeddings=False) + head
    layers = cfg.num_hidden_layers
    if mtp_depth:
        n += (cfg.num_params(active=True, embeddings=False, mtp=True)
              - cfg.num_params(active=True, embeddings=False)) * mtp_depth // max(cfg.num_nextn_predict_layers, 1)
        n += head * mtp_depth
        layers += mtp_depth
    attn = 3 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    if adapters is not None:
        return 4.0 * n + 6.0 * adapters + attn
    return 6.0 * n + attn


def peak_flops(device: torch.device, tflops: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of `device`: the given TFLOP/s, a known GPU's, or None (no MFU)."""
    if tflops:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------- precision
class MasterWeights:
    """fp32 master copies of a low-precision model's parameters, which the optimizer updates.

    For an fp32 model the masters are the parameters themselves and every method is (almost) a no-op.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        """Take the (fp32) model's weights as the masters, then cast the model to `dtype`."""
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        # A frozen base (LoRA) is rebuilt from the recipe (model.init or the seed): state dicts hold the trained
        # parameters alone.
        self.partial = any(not p.requires_grad for p in model.parameters())
        self.separate = dtype != torch.float32
        self.master = ([p.detach().float().clone().requires_grad_(True) for p in self.params]
                       if self.separate else self.params)
        self._grad_buffers: dict[int, torch.Tensor] = {}
        if self.separate:  # (an fp32 model stays untouched: FSDP's sharded parameters must not be re-assigned)
            model.to(dtype)  # in place: the Parameter objects stay, their data changes dtype

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """After a micro-batch's backward: add the model's gradients into the fp32 master gradients (kept in
        buffers reused from step to step). A weight that got no gradient keeps grad None, so AdamW skips it as
        it would in fp32 (an unused MTP module is not decayed)."""
        if not self.separate:
            return
        fresh, acc = ([], []), ([], [])
        for p, m in zip(self.params, self.master):
            if p.grad is not None:
                if m.grad is None:
                    m.grad = self._grad_buffers.setdefault(id(m), torch.empty_like(m))
                    fresh[0].append(m.grad), fresh[1].append(p.grad)
                else:
                    acc[0].append(m.grad), acc[1].append(p.grad)
                p.grad = None
        if fresh[0]:
            torch._foreach_copy_(*fresh)  # one launch per dtype/device group instead of one per tensor
        if acc[0]:
            torch._foreach_add_(*acc)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if self.separate:
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self) -> None:
        for t in self.master + self.params:
            t.grad = None

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with fp32 master weights in place of the parameters (the trained ones alone when
        part of the model is frozen)."""
        if self.partial:
            return {n: m.detach().to("cpu", copy=True) for (n, _), m in zip(self.named, self.master)}
        sd = model.state_dict()
        for (n, _), m in zip(self.named, self.master):
            sd[n] = m.detach()
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    @torch.no_grad()
    def load_state_dict(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        if self.partial:  # (a full state dict, from the ranks' shards, holds the frozen tensors too)
            missing = [n for n, _ in self.named if n not in sd]
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} of this model's {len(self.named)} trained "
                                 f"tensors (e.g. {missing[:3]}): was it written with other lora settings?")
            for (n, p), m in zip(self.named, self.master):
                p.copy_(sd[n])
                if self.separate:
                    m.copy_(sd[n])
            return
        model.load_state_dict(sd)
        if self.separate:
            for (n, _), m in zip(self.named, self.master):
                m.copy_(sd[n])


def cross_entropy_sum(model: Transformer, h: torch.Tensor, labels: torch.Tensor, chunk: int,
                      compiled: bool = False) -> torch.Tensor:
    """Next-token cross-entropy summed over the targets that are not IGNORE, in fp32 (precision policy), from the
    final normed hidden states h (B, S, D): the output head runs `chunk` tokens at a time
    (`Transformer.cross_entropy_sum`), so neither the fp32 (tokens, vocab) logits nor their gradient are ever held
    whole (at 32K tokens of a 102,400 vocabulary they would be 13.4 GB each). compiled: the per-chunk fp32 math
    fused by torch.compile.
    """
    return model.cross_entropy_sum(h, labels, chunk=chunk, compiled=compiled)


def lr_factor(step: int, recipe: Recipe) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup over warmup_steps, then
    constant or a cosine from 1 down to min_lr_ratio at the last step."""
    o, total = recipe.optim, recipe.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps - 1))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- building
def resolve_device(recipe: Recipe) -> tuple[torch.device, torch.dtype]:
    name = recipe.run.device
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[recipe.run.dtype]
    return device, dtype


def build_model(recipe: Recipe, device: torch.device) -> Transformer:
    """The recipe's model in fp32 on `device`: model.init's weights, or model.preset (+ model.config)
    initialised with run.seed."""
    if recipe.model.init:
        return load_pretrained(recipe.model.init, device=device, dtype=torch.float32)
    cfg = get_preset(recipe.model.preset)
    try:
        cfg = cfg.replace(**recipe.model.config)
    except TypeError as e:
        raise ValueError(f"recipe: model.config: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.to_empty(device=device).init_weights(seed=recipe.run.seed)


# ---------------------------------------------------------------------- the loop
class Trainer:
    """Trains `model` (fp32, on its device) on `data` as `recipe` says, logging and checkpointing in run.out.

    `train_step(batches)` is one optimizer step on given micro-batches (what the benchmark times);
    `fit(resume=None)` runs the whole recipe.

    Under torchrun (a process group of more than one rank) every rank runs this same loop on the same full
    model, which is first parallelized (`r1lab.parallel.parallelize`: parallel.ep, activation checkpointing,
    FSDP2; FSDP's fp32 shards are then the master weights and its policy casts them to the compute dtype, so
    there is no `MasterWeights` copy). Each rank takes its 1/world of every micro-batch, so the ranks together
    see the one-process batch; losses are divided by the global target count and the router bias moves by the
    global expert load, so losses and updates equal one process's (up to summation order). Rank 0 alone
    prints, logs and writes metrics; checkpoints are sharded (DCP) and resume on any number of ranks.
    """

    def __init__(self, recipe: Recipe, model: Transformer, data: Sequences | None = None, tokenizer=None,
                 kind: str = "pretrain", dtype: torch.dtype | None = None, quiet: bool = False):
        self.recipe, self.data, self.tokenizer, self.kind = recipe, data, tokenizer, kind
        self.rank, self.world = parallel.rank(), parallel.world_size()
        self.main = self.rank == 0
        self.quiet = quiet or not self.main
        self.device = model.device
        self.dtype = dtype or torch.float32
        self.run_dir = Path(recipe.run.out)
        self.model = model
        cfg = model.config
        self.mtp_depth = len(model.mtp) if recipe.moe.mtp_weight > 0 else 0
        if recipe.moe.mtp_weight > 0 and not len(model.mtp):
            self._note(f"moe.mtp_weight={recipe.moe.mtp_weight} ignored: the model has no MTP module")
        model.set_balance_alpha(recipe.moe.balance_alpha)
        self.bias_gamma = recipe.moe.bias_gamma
        self.use_lora = recipe.lora.rank > 0
        if self.use_lora:
            self._apply_lora()
        # train.compile: regional compilation (parallel.compile_blocks). The loop's own data are rows of
        # data.seq_len tokens, one shape; trainers that bring their own batches (GRPO's completions, a reward
        # model's padded pairs) change shape every micro-batch, so theirs are compiled symbolic from the start.
        compile, dynamic = recipe.train.compile, data is None
        if self.world > 1:
            if data is not None and recipe.train.batch_size % self.world:
                raise ValueError(f"train.batch_size={recipe.train.batch_size} must be a multiple of the {self.world} "
                                 f"ranks: each takes an equal share of every micro-batch")
            if self.use_lora:  # the frozen base sharded in the compute dtype: it has no master to keep in fp32
                lora.cast_base(model, self.dtype)
            parallel.parallelize(model, recipe.parallel.ep, recipe.train.activation_checkpointing, self.dtype,
                                 recipe.parallel.reshard_after_forward, compile, dynamic)
            self.master = MasterWeights(model)  # FSDP's sharded fp32 parameters are the master weights
        else:
            if recipe.parallel.ep > 1:
                self._note(f"parallel.ep={recipe.parallel.ep} ignored: one process (expert parallelism needs torchrun)")
            self.master = MasterWeights(model, self.dtype)
            if compile:  # (before checkpointing, as parallelize does)
                compile_blocks(model, dynamic)
            if recipe.train.activation_checkpointing:
                apply_activation_checkpointing(model)
        self.head_chunk = recipe.train.head_chunk
        o = recipe.optim
        decay = [m for (n, _), m in zip(self.master.named, self.master.master) if m.dim() >= 2]
        no_decay = [m for (n, _), m in zip(self.master.named, self.master.master) if m.dim() < 2]
        fused = self.device.type in ("cuda", "cpu")  # one kernel per step over all tensors
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.recipe))
        # clip and skip inside the fused AdamW kernel (see _clip_and_step)
        self.fused_clip = self.world == 1 and fused and self.device.type == "cuda"
        self.step = 0  # optimizer steps done
        self.skipped = 0  # optimizer updates skipped as non-finite (train.on_nonfinite = "skip"), for the log
        self.micro = 0  # micro-batches consumed (the data position)
        if data is not None:
            self.order = BatchOrder(len(data), recipe.train.batch_size, recipe.run.seed, recipe.data.shuffle)
        seq_len = data.seq_len if data is not None else cfg.max_position_embeddings
        self.flops_per_token = train_flops_per_token(cfg, seq_len, self.mtp_depth,
                                                     lora.active_parameters(model) if self.use_lora else None)
        self.peak = peak_flops(self.device, recipe.log.peak_tflops)
        self._stop: str | None = None
        self._tb = None

    def _apply_lora(self) -> None:
        """Freeze the model and wrap it with the recipe's adapters (before MasterWeights: only they get fp32 master
        copies and optimizer state; the base is cast to the compute dtype and stays there)."""
        c = self.recipe.lora
        lora.apply_lora(self.model, c.rank, c.alpha, c.targets, c.dropout, seed=self.recipe.run.seed)
        head = getattr(self.model, "score_head", None)
        if head is not None:  # a reward model's new head trains in full (PEFT's modules_to_save)
            head.requires_grad_(True)
        trainable, frozen = lora.parameter_counts(self.model)
        b = torch.finfo(self.dtype).bits // 8
        # The frozen base in the compute dtype (under torchrun sharded, `lora.cast_base`). Per trained parameter:
        # one process keeps it and its gradient in the compute dtype, plus an fp32 master with its gradient
        # unless that is fp32; FSDP keeps an fp32 shard (the master) and its fp32 gradient (the bf16 copies it
        # gathers for compute are transient). Then AdamW's two fp32 moments. Activations not counted.
        per_trained = (2 * b + (8 if b != 4 else 0) if self.world == 1 else 8) + 8
        self.memory_plan = (frozen * b + trainable * per_trained) / 2**30 / self.world  # GiB per process
        name = str(self.dtype).removeprefix("torch.")
        self._note(f"LoRA rank {c.rank}, alpha {c.alpha:g} on {', '.join(c.targets)}: {trainable:,} trainable and "
                   f"{frozen:,} frozen parameters (adapters with fp32 masters, the base in {name} without); weights "
                   f"and optimizer state {self.memory_plan:.2f} GiB per process")
        if self.bias_gamma:
            self._note(f"moe.bias_gamma={self.bias_gamma} ignored: the router bias belongs to the frozen base")
            self.bias_gamma = 0.0

    # ------------------------------------------------------------------ one optimizer step
    def cross_entropy(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`cross_entropy_sum` through this trainer's model and recipe (head chunk, compiled chunk math)."""
        return cross_entropy_sum(self.model, h, labels, self.head_chunk, self.recipe.train.compile)

    def train_step(self, batches: list[Batch]) -> dict[str, Any]:
        """Forward/backward over the micro-batches, then clip, AdamW, router-bias update, schedule. Returns the
        step's metrics. Raises NonFiniteLoss (before any update) when train.on_nonfinite is "stop"."""
        r, model = self.recipe, self.model
        t0 = time.perf_counter()
        model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        mtp_labels = [b.mtp_labels(self.mtp_depth) for b in batches] if self.mtp_depth else None
        # The step's target counts over all ranks: next-token targets, then those of each MTP depth.
        counts = [torch.stack([(b.labels != IGNORE).sum() for b in batches]).sum()]
        counts += [torch.stack([(m[k] != IGNORE).sum() for m in mtp_labels]).sum() for k in range(self.mtp_depth)]
        counts = self._sum_over_ranks(torch.stack(counts).float())
        # Each rank divides its loss sum by count / world: FSDP averages the ranks' gradients, and the mean over
        # ranks of sum_r / (N / world) is sum / N, the one-process loss.
        denom, *mtp_denoms = counts.clamp(min=1) / self.world
        zero = torch.zeros((), device=self.device)
        ce_sum, mtp_sum, bal_sum = zero.clone(), zero.clone(), zero.clone()
        for i, b in enumerate(batches):
            out = model(b.input_ids, b.positions, attn_mask=b.attn_mask, return_mtp=bool(self.mtp_depth),
                        return_hidden=True)
            h, mtp_h = out if self.mtp_depth else (out, [])
            # fp32 loss (precision policy), the head in chunks; summed here, divided by the step's target count so
            # that accumulated micro-batches give the gradient of one large batch
            ce = self.cross_entropy(h, b.labels)
            loss = ce / denom
            for k, mh in enumerate(mtp_h):  # V3 eq. 25: lambda / D x sum over depths of the mean CE
                mce = self.cross_entropy(mh, mtp_labels[i][k]) / mtp_denoms[k]
                loss = loss + r.moe.mtp_weight / self.mtp_depth * mce
                mtp_sum += mce.detach()
            bal = model.balance_loss()
            if bal is not None:  # already x alpha; averaged over the micro-batches (and, by FSDP, the ranks)
                loss = loss + bal / len(batches)
                bal_sum += bal.detach() / len(batches)
            loss.backward()
            ce_sum += ce.detach()
            self.master.accumulate_grads()
        sums = self._sum_over_ranks(torch.stack([ce_sum, mtp_sum, bal_sum]))
        if self.world > 1:  # the load of the global batch, for the log and the bias update
            parallel.all_reduce_expert_load(model)
        stats = [counts[0], sums[1] / self.world / max(self.mtp_depth, 1), sums[2] / self.world]
        n_moe = len(model.moe_layers())
        if n_moe:  # per MoE layer: max load / mean load and the tokens counted, over this step's micro-batches
            load = model.expert_load()  # (layers, E)
            stats += [load.max(1).values / load.mean(1).clamp(min=1e-9), load.sum(1)]
        loss_v, gnorm_v, finite, values = self.end_step(sums[0] / counts[0].clamp(min=1), stats)
        n_tok_v, mtp_v, bal_v = values[:3]
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        n_in = sum(b.input_ids.numel() for b in batches) * self.world  # every rank's share has the same size
        rec = {"loss": loss_v, "lr": lr, "grad_norm": gnorm_v, "target_tokens": int(n_tok_v),
               "tokens_per_s": n_in / dt, "step_time_s": dt,
               "mfu": n_in / dt * self.flops_per_token / (self.peak * self.world) if self.peak else None,
               "peak_mem_gb": peak_memory_gb(self.device)}
        if self.mtp_depth:
            rec["mtp_loss"] = mtp_v
        if r.moe.balance_alpha > 0:
            rec["balance_loss"] = bal_v
        if n_moe:  # None for a layer that saw no tokens (an MTP block while the MTP loss is off)
            ratio, counted = values[3:3 + n_moe], values[3 + n_moe:]
            rec["moe_max_over_mean"] = [round(x, 4) if c > 0 else None for x, c in zip(ratio, counted)]
        if not finite:
            rec["skipped"] = 1  # optimizer updates skipped in this step (train.on_nonfinite = "skip")
        return rec

    def end_step(self, loss: torch.Tensor, read: list[torch.Tensor] = ()) -> tuple[float, float, bool, list[float]]:
        """The end of every trainer's optimizer step, once its gradients are in the master weights: clip, the
        non-finite policy, AdamW, the router-bias update (the schedule is the caller's: GRPO steps it once per
        GRPO step, over several updates).

        loss: the step's loss as a device scalar, the same on every rank (summed over them first); the step is
        finite when it and the gradient norm are. read: device tensors the caller wants on the host; they come
        back flattened, with the loss and the gradient norm, in the step's one host sync. A non-finite step
        changes no weight, moment or router bias; with train.on_nonfinite = "stop" it raises NonFiniteLoss
        (the trainer's fit adds the step number and the last good checkpoint), with "skip" it is counted in
        `self.skipped` and the caller marks its metrics. Returns (loss, gradient norm, finite, values of `read`).
        """
        loss = loss.detach().reshape(1)
        gnorm, stepped = self._clip_and_step(torch.isfinite(loss[0]))
        # float64 on the way out: every value reaches the host exactly as the device holds it
        values = torch.cat([t.detach().reshape(-1).double() for t in (loss, gnorm, *read)]).tolist()
        loss_v, gnorm_v = values[0], values[1]  # the step's one host sync
        finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
        if finite and not stepped:
            self.optimizer.step()
            self.master.copy_to_model()
        self.master.zero_grad()
        self.model.update_router_bias(self.bias_gamma if finite else 0.0)  # also restarts the counters
        if not finite:
            if self.recipe.train.on_nonfinite == "stop":
                raise NonFiniteLoss(f"loss {loss_v} / gradient norm {gnorm_v}")
            self.skipped += 1
        return loss_v, gnorm_v, finite, values[2:]

    # ------------------------------------------------------------------ the run
    def next_batches(self) -> list[Batch]:
        out = []
        for _ in range(self.recipe.train.grad_accum):
            rows = self.order.rows(self.micro)
            if self.world > 1:
                rows = parallel.shard(rows, self.rank, self.world)
            out.append(self.data.batch(rows, self.device, self.recipe.data.attention))
            self.micro += 1
        return out

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Run (or continue, from a checkpoint folder or a run folder) until train.steps. Returns the last step's
        metrics. Ctrl-C / SIGTERM: finish the step, save a checkpoint, raise KeyboardInterrupt."""
        r = self.recipe
        logs = self._log_files()
        self._start(resume, list(logs.values()))
        self._open_tensorboard()
        last: dict[str, Any] = {}
        saved_at = self.step if resume is not None else -1
        from tqdm import tqdm

        bar = tqdm(total=r.train.steps, initial=self.step, desc=self.kind, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not sys.stderr.isatty())
        old_handlers = self._install_signal_handlers()
        self._t_start, self._first_step = time.perf_counter(), self.step
        try:
            with contextlib.ExitStack() as stack:
                files = {k: stack.enter_context(open(self._log_path(p), "a")) for k, p in logs.items()}
                while self.step < r.train.steps:
                    rec = self._fit_step(files["metrics"])
                    self.step += 1
                    last = rec = {"step": self.step, **rec}
                    files["metrics"].write(json.dumps(rec) + "\n")
                    files["metrics"].flush()
                    self._after_step(rec, files)
                    self._log(rec, bar)
                    bar.update(1)
                    self._agree_on_stop()
                    if self._stop or (r.ckpt.every and self.step % r.ckpt.every == 0):
                        self.save()
                        saved_at = self.step
                    if self._stop:
                        bar.close()
                        raise KeyboardInterrupt(f"{self._stop} at step {self.step}: checkpoint saved in "
                                                f"{ckpt.list_checkpoints(self.run_dir)[-1]}; continue with --resume")
            if saved_at != self.step:
                self.save()
            if r.ckpt.export:
                self.export()
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
            if self._tb is not None:
                self._tb.close()
        return last

    # Hooks of `fit` that subclasses (GRPO) replace: the step itself, the run's log files, what a step logs.
    def _log_files(self) -> dict[str, Path]:
        """The JSON-lines logs of a run, truncated to the checkpoint on resume; "metrics" gets every step."""
        return {"metrics": self.run_dir / "metrics.jsonl"}

    def run_step(self) -> dict[str, Any]:
        """One step of the run: an optimizer step on the next batches (GRPO: a rollout and its updates)."""
        return self.train_step(self.next_batches())

    def _fit_step(self, metrics) -> dict[str, Any]:
        """`run_step`; a non-finite loss is logged and stops the run with the step number."""
        try:
            return self.run_step()
        except NonFiniteLoss as e:
            metrics.write(json.dumps({"step": self.step + 1, "nonfinite": str(e)}) + "\n")
            last_ckpt = ckpt.list_checkpoints(self.run_dir)
            where = f"the last good checkpoint is {last_ckpt[-1]}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLoss(f"step {self.step + 1}: non-finite {e}; stopped, {where} (set "
                                f"train.on_nonfinite = \"skip\" to skip such steps)") from None

    def _after_step(self, rec: dict[str, Any], files: dict[str, Any]) -> None:
        """Anything else a finished step writes to its log files (nothing here)."""

    def _start(self, resume: str | Path | None, logs: list[Path]) -> None:
        """Before the first step: load the checkpoint to resume from (deleting newer checkpoints and the log lines
        after it), or check that run.out holds no run yet (emptying the logs); then write the recipe."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            path = self.load(resume)
            self._note(f"resumed from {path} at step {self.step}")
            if self.main:
                for gone in ckpt.remove_after(self.run_dir, self.step):
                    self._note(f"deleted {gone}: it is newer than the checkpoint this run continues from")
                for p in logs:
                    p.write_text("".join(ln for ln in _read_lines(p) if json.loads(ln)["step"] <= self.step))
        else:
            if ckpt.list_checkpoints(self.run_dir):
                raise ValueError(f"{self.run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                                 f"or choose another run.out")
            if self.main:
                for p in logs:
                    p.write_text("")
        if self.main:
            ckpt.remove_partial(self.run_dir)
            (self.run_dir / "recipe.toml").write_text(self.recipe.to_toml())
        if self.world > 1:
            dist.barrier()  # nobody starts while rank 0 still tidies the run folder

    def _log_path(self, path: Path) -> str | Path:
        """Where this rank writes a log file: rank 0 the file itself, the others nowhere (each computes the same
        globally reduced numbers)."""
        return path if self.main else os.devnull

    def _clip_and_step(self, ok: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Clip the master gradients to optim.grad_clip; returns the norm before clipping (a device scalar) and
        whether the optimizer step has been taken already.

        One process on a GPU (`fused_clip`): the step is queued now, with the clip factor and the skip flag
        handed to the fused AdamW kernel (`grad_scale` / `found_inf`, the GradScaler interface): no pass over the
        gradients to scale them, and no host sync before the update. The kernel leaves every weight and moment
        untouched when the norm (or `ok`, e.g. the loss's finiteness) is not finite, so a bad step changes
        nothing, as before. Otherwise (torchrun; the CPU, where there is no device to keep busy and runs stay
        bitwise what they were) the gradients are scaled in place and the caller steps after its host sync when
        all is finite.
        """
        clip = self.recipe.optim.grad_clip if self.recipe.optim.grad_clip > 0 else float("inf")
        params = [m for m in self.master.master if m.grad is not None]
        if not (self.fused_clip and params):
            return parallel.clip_grad_norm_(params, clip), False
        norm = parallel.grad_norm(params)
        bad = ~torch.isfinite(norm) if ok is None else ~(torch.isfinite(norm) & ok)
        self.optimizer.grad_scale = 1.0 / parallel.clip_factor(norm, clip)  # the kernel divides the gradients by it
        self.optimizer.found_inf = bad.float()
        self.optimizer.step()
        self.master.copy_to_model()
        return norm, True

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all ranks (in place); itself on one process."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def _agree_on_stop(self) -> None:
        """A signal reaches the ranks at slightly different times; all must stop after the same step, since
        saving the checkpoint is collective."""
        if self.world > 1:
            flag = torch.tensor(float(self._stop is not None), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self._stop:
                self._stop = "a signal to another rank"

    def export(self) -> Path:
        """Write the model in the HF layout to run.out/final; under torchrun it is gathered to rank 0, one tensor
        at a time, and rank 0 writes it. With LoRA: the adapters in PEFT's format to run.out/adapter, and with
        lora.merge base + adapters merged to run.out/final."""
        if self.use_lora:  # (under torchrun the adapters are gathered, and rank 0 writes them)
            out = lora.save_adapter(self.model, self.run_dir / "adapter", base_model=self.recipe.model.init or None,
                                    write=self.main)
            self._note(f"saved the adapters to {out} (PEFT's format)")
            if not self.recipe.lora.merge:
                return out
            if self.world == 1:
                out = save_pretrained(lora.merged_model(self.model), self.run_dir / "final", tokenizer=self.tokenizer)
            else:  # gathered into a copy wrapped as the model is, merged and written by rank 0
                full = lora.empty_like(self.model, "cpu") if self.main else None
                parallel.copy_full_weights(self.model, full)  # collective
                out = (save_pretrained(lora.merged_model(full).to(self.dtype), self.run_dir / "final",
                                       tokenizer=self.tokenizer) if self.main else None)
                dist.barrier()
        elif self.world == 1:
            out = save_pretrained(self.model, self.run_dir / "final", tokenizer=self.tokenizer)
        else:
            full = parallel.unsharded_copy(self.model, "cpu", self.dtype, on_every_rank=False)
            out = save_pretrained(full, self.run_dir / "final", tokenizer=self.tokenizer) if self.main else None
            dist.barrier()
        self._note(f"exported the model to {out}")
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the recipe. One process: everything. Under torchrun the model and the
        optimizer are sharded and `save` writes them with DCP; this is the rest (rank 0's RNG state)."""
        st = {"step": self.step, "data_position": self.micro, "kind": self.kind,
              "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(), "recipe": self.recipe.to_dict()}
        if self.world == 1:
            st.update(model=self.master.state_dict(self.model), optimizer=self.optimizer.state_dict())
        return st

    def save(self) -> Path:
        sharded = parallel.checkpoint_state(self.model, self.optimizer) if self.world > 1 else None
        return ckpt.save_checkpoint(self.run_dir, self.step, self.state_dict(), self.recipe.to_toml(),
                                    self.recipe.ckpt.keep, meta={"kind": self.kind}, sharded=sharded)

    def load(self, path: str | Path) -> Path:
        path = ckpt.find_checkpoint(path)
        st = ckpt.load_checkpoint(path)
        self._load_weights(path, st)
        self.scheduler.load_state_dict(st["scheduler"])
        self.step, self.micro = st["step"], st["data_position"]
        ckpt.set_rng_state(st["rng"])
        for m in self.model.moe_layers():
            m.expert_load.zero_()
        return path

    def _load_weights(self, path: Path, st: dict[str, Any]) -> None:
        """Model and optimizer from a checkpoint of any number of ranks. In its own format (state.pt for one
        process, DCP shards for several, which DCP reshards to this world size) directly; across formats
        through full tensors, with the optimizer's entries keyed by parameter name."""
        sharded = ckpt.is_sharded(path)
        if self.world == 1 and not sharded:
            self.master.load_state_dict(self.model, st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            return
        if self.world > 1 and sharded:
            state = parallel.checkpoint_state(self.model, self.optimizer)
            ckpt.load_sharded(path, state)
            parallel.load_checkpoint_state(self.model, self.optimizer, state)
            return
        names = self._param_names()
        if sharded:  # written by several ranks, read by one
            full = ckpt.load_sharded_full(path)
            msd, osd = full["model"], full["optim"]
        else:  # written by one process, read by several
            msd, osd = st["model"], rekey_optimizer_state(st["optimizer"], dict(enumerate(names)))
        if self.world == 1:
            self.master.load_state_dict(self.model, msd)
            self.optimizer.load_state_dict(rekey_optimizer_state(osd, {n: i for i, n in enumerate(names)}))
        else:
            parallel.load_full_state(self.model, self.optimizer, msd, osd)

    def _param_names(self) -> list[str]:
        """The optimizer's parameters' names, in the order a one-process optimizer state dict numbers them."""
        name = {id(m): n for (n, _), m in zip(self.master.named, self.master.master)}
        return [name[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ logging
    def _note(self, text: str) -> None:
        if not self.quiet:
            from tqdm import tqdm
            tqdm.write(f"[{self.kind}] {text}")

    def _log(self, rec: dict[str, Any], bar) -> None:
        moe = [x for x in rec.get("moe_max_over_mean") or [] if x is not None]
        bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s"
                            + (f" mfu {rec['mfu']:.1%}" if rec["mfu"] is not None else ""), refresh=False)
        self._to_tensorboard(rec)
        if moe and self._tb is not None:
            self._tb.add_scalar("moe_max_over_mean_max", max(moe), rec["step"])
        every = self.recipe.log.every
        if self.quiet or not every or (rec["step"] % every and rec["step"] != self.recipe.train.steps):
            return
        done = rec["step"] - self._first_step  # steps of this session, for the ETA
        eta = (self.recipe.train.steps - rec["step"]) * (time.perf_counter() - self._t_start) / max(done, 1)
        parts = [f"step {rec['step']}/{self.recipe.train.steps}", f"loss {rec['loss']:.4f}"]
        if "mtp_loss" in rec:
            parts.append(f"mtp {rec['mtp_loss']:.4f}")
        parts += [f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s"]
        if rec["mfu"] is not None:
            parts.append(f"mfu {rec['mfu']:.1%}")
        parts.append(f"mem {rec['peak_mem_gb']:.2f} GB")
        if moe:
            parts.append(f"moe max/mean {max(moe):.2f}")
        parts.append(f"eta {_hms(eta)}")
        if rec.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        from tqdm import tqdm
        tqdm.write(" | ".join(parts))

    def _to_tensorboard(self, rec: dict[str, Any]) -> None:
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, rec["step"])

    def _open_tensorboard(self) -> None:
        if not self.recipe.log.tensorboard or self.quiet:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop:  # a second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop = signal.Signals(signum).name
            self._note(f"{self._stop}: finishing step {self.step + 1}, then saving a checkpoint "
                       f"(press Ctrl-C again to quit without one)")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of the run so far: allocated on the GPU, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def rekey_optimizer_state(osd: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through `key`: torch numbers parameters (0, 1, ...),
    DCP names them; the mapping between the two is `Trainer._param_names`."""
    return {"state": {key[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in osd["param_groups"]]}


def setup(recipe: Recipe) -> tuple[torch.device, torch.dtype]:
    """A trainer's start: the device and compute dtype; under torchrun, joining the process group (NCCL on CUDA,
    where "cuda" then means this rank's GPU, gloo on the CPU); the seed."""
    device, dtype = resolve_device(recipe)
    parallel.init_distributed(device.type)
    torch.manual_seed(recipe.run.seed)
    return device, dtype


def run_recipe(recipe: Recipe, kind: str, build_data, resume: str | Path | None = None, quiet: bool = False) -> dict:
    """Shared body of `r1lab pretrain` / `r1lab sft`: device, seed, model, data (`build_data(recipe, model)` ->
    (Sequences, tokenizer)), then `Trainer.fit`. Under torchrun every rank builds the same full model (same
    seed or the same model.init) and the trainer parallelizes it."""
    device, dtype = setup(recipe)
    model = build_model(recipe, device)
    if recipe.data.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={recipe.data.seq_len} is longer than the model's context "
                         f"(max_position_embeddings={model.config.max_position_embeddings})")
    data, tokenizer = build_data(recipe, model)
    trainer = Trainer(recipe, model, data, tokenizer, kind=kind, dtype=dtype, quiet=quiet)
    stats = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in data.stats.items())
    trainer._note(f"{len(data):,} rows of {data.seq_len} tokens: {stats}")
    return trainer.fit(resume)
