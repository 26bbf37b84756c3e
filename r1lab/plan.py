"""`r1lab plan`: size a training (and inference) layout before renting the cluster.

For a model config and a layout (GPUs, pipeline stages `pp`, tensor-parallel degree `tp`, expert-parallel
degree `ep`, ZeRO/FSDP stage), estimate per GPU:

  weights, gradients, optimizer state   from parameter counts (ModelConfig.num_params) and byte widths,
                                        sharded as the ZeRO stage says (1: optimizer, 2: + gradients,
                                        3 = FSDP: + weights, plus a gathered-block buffer);
  activations                           an estimate of what autograd saves per token and layer (below),
                                        with and without activation checkpointing;
  latent KV cache (inference)           MLA's (kv_lora_rank + qk_rope_head_dim) values per token and layer;
  tokens/s                              peak FLOP/s x assumed MFU / training FLOPs per token, the FLOPs
                                        counted by r1lab.train.loop.train_flops_per_token (6 x active
                                        matmul parameters + causal attention), the one formula the trainer's
                                        MFU uses too.

Layout rules (as in torchtitan and the DeepSeek-V3 paper): data-parallel degree dp = gpus / (pp x tp); expert
parallelism runs inside data parallelism (ep divides dp), each EP rank holding E/ep routed experts of its
stage; expert weights are replicated dp/ep times ("expert data parallel", edp) and ZeRO shards their states
over edp, the other weights' states over dp. tp splits the non-expert weights and the activations.

Cross-check against the DeepSeek-V3 paper (section 1 and 3.1): 2048 H800 GPUs, 180K H800 GPU hours per
trillion tokens => 1e12 / (180e3 x 3600 s) = 1,543 tokens/s per GPU. With 2.61e11 training FLOPs per token
(37B active parameters, seq 4096, the MTP module included) that is 41% of the H800's 989 TFLOP/s dense bf16
peak, but only 20% of its 1,979 TFLOP/s FP8 peak, which is what V3's GEMMs ran in. At the default assumed MFU
of 30% (bf16) this planner predicts 1,138 tokens/s per GPU, i.e. 244K GPU hours per trillion tokens: 26% fewer
tokens/s (36% more GPU hours) than the paper's 180K. Pass --mfu 0.41 to reproduce the paper. `plan_v3_paper_check()` computes these numbers and the tests pin them.

Activation estimate (elements per token and layer, saved for the backward pass, compute dtype unless noted):
  attention  2D (norm in/out) + 2 q_lora_rank (q_a out, normed) + (kv_lora_rank + rope) (kv_a out)
             + kv_lora_rank (normed latent) + H (nope + v) (kv_b out) + 3 H qk_head_dim (q, q roped, k)
             + 2 H v_head_dim (v, attention out) + 2D (residual, post-attention norm)
  dense MLP  4 x intermediate_size (gate out, up out, silu, product)
  MoE        router scores E in fp32 (counted as 2E) + K D (tokens sorted by expert) + 4 K I (routed
             experts as the dense MLP) + K D (expert outputs before weighting) + 4 n_shared I (shared experts)
  head       vocab x (2 + 4) bytes (bf16 logits and fp32 log-softmax) once per micro-batch, on the last stage.
It ignores allocator fragmentation, communication buffers and the CUDA context (budget ~5-10% headroom).
With activation checkpointing only each block's input (D) stays, plus one block's working set recomputed.
Under 1F1B pipelining the first stage holds pp micro-batches of L/pp layers, which is L layers' worth: the
activation memory does not shrink with pp.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from .model.config import ModelConfig, get_preset

GB = 1e9  # memory is reported in GB = 1e9 bytes, as GPU vendors quote it (an H800 has 80 GB)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# DeepSeek-V3 technical report: pre-training on 2048 H800s, 180K H800 GPU hours per trillion tokens.
V3_PAPER_GPUS = 2048
V3_PAPER_GPU_HOURS_PER_T = 180e3
V3_PAPER_SEQ = 4096
H800_BF16_TFLOPS = 989.0
H800_FP8_TFLOPS = 1979.0


@dataclass
class Layout:
    """A parallel layout. dp is derived: gpus / (pp x tp)."""

    gpus: int
    gpu_memory_gb: float = 80.0
    ep: int = 1
    pp: int = 1
    tp: int = 1
    zero: int = 3  # 1: optimizer state sharded, 2: + gradients, 3 (FSDP): + weights
    micro_batch: int = 1  # sequences per micro-batch per GPU (per pipeline stage)
    seq: int = 4096
    dtype: str = "bf16"  # weights, gradients and activations
    optimizer_bits: int = 32  # AdamW moments: 32 (fp32) or 16 (bf16, as DeepSeek-V3)
    mtp: bool = True  # include the multi-token-prediction modules the config has
    peak_tflops: float = H800_BF16_TFLOPS
    mfu: float = 0.30

    @property
    def dp(self) -> int:
        return self.gpus // (self.pp * self.tp)

    def check(self, cfg: ModelConfig) -> None:
        def bad(flag: str, why: str) -> ValueError:
            return ValueError(f"--{flag}: {why}")

        for name in ("gpus", "ep", "pp", "tp", "micro_batch", "seq"):
            if getattr(self, name) < 1:
                raise bad(name.replace("_", "-"), f"must be >= 1 (got {getattr(self, name)})")
        if self.gpus % (self.pp * self.tp):
            raise bad("gpus", f"{self.gpus} GPUs are not a multiple of pp x tp = {self.pp * self.tp}")
        if self.dp % self.ep:
            raise bad("ep", f"expert parallelism runs inside data parallelism: ep={self.ep} must divide "
                            f"dp = gpus / (pp x tp) = {self.dp}")
        if cfg.is_moe and cfg.n_routed_experts % self.ep:
            raise bad("ep", f"must divide the {cfg.n_routed_experts} routed experts (got {self.ep})")
        if not cfg.is_moe and self.ep > 1:
            raise bad("ep", "the model has no routed experts")
        if self.pp > cfg.num_hidden_layers:
            raise bad("pp", f"more stages than the {cfg.num_hidden_layers} layers")
        if self.zero not in (1, 2, 3):
            raise bad("zero", f"must be 1, 2 or 3 (got {self.zero})")
        if self.dtype not in DTYPE_BYTES:
            raise bad("dtype", f"one of {', '.join(DTYPE_BYTES)} (got {self.dtype!r})")
        if self.optimizer_bits not in (16, 32):
            raise bad("optimizer-bits", f"16 or 32 (got {self.optimizer_bits})")
        if not 0 < self.mfu <= 1:
            raise bad("mfu", f"a fraction in (0, 1] (got {self.mfu})")


def expert_params(cfg: ModelConfig, mtp: bool) -> int:
    """Routed-expert weights of the whole model (what expert parallelism splits)."""
    if not cfg.is_moe:
        return 0
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if mtp and cfg.is_moe_layer(cfg.num_hidden_layers):
        n_moe += cfg.num_nextn_predict_layers
    return n_moe * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def activation_elems_per_token(cfg: ModelConfig, layer: int) -> int:
    """Elements autograd keeps per token for one block (the module docstring's table)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    attn = 2 * D + 2 * (cfg.q_lora_rank or 0) + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    attn += H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + 3 * H * cfg.qk_head_dim + 2 * H * cfg.v_head_dim + 2 * D
    if not cfg.is_moe_layer(layer):
        return attn + 4 * cfg.intermediate_size
    K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    moe = 2 * cfg.n_routed_experts + K * D + 4 * K * I + K * D + 4 * (cfg.n_shared_experts or 0) * I
    return attn + moe


def plan(cfg: ModelConfig, lay: Layout) -> dict:
    """Memory per GPU (bytes) and throughput for `lay`; see the module docstring for the model."""
    lay.check(cfg)
    w = DTYPE_BYTES[lay.dtype]
    total = cfg.num_params(embeddings=True, mtp=lay.mtp)
    experts = expert_params(cfg, lay.mtp)
    dense = total - experts
    # parameters this GPU owns before ZeRO sharding, and the group ZeRO shards them over
    dense_local, expert_local = dense / (lay.pp * lay.tp), experts / (lay.pp * lay.ep)
    edp = lay.dp // lay.ep

    def sharded(stage: int) -> float:  # parameters per GPU of a state sharded from ZeRO stage `stage` on
        return dense_local / lay.dp + expert_local / edp if lay.zero >= stage else dense_local + expert_local

    master = 0 if lay.dtype == "fp32" else 4  # fp32 master weights, kept by the optimizer
    mem = {
        "weights": sharded(3) * w,
        "gradients": sharded(2) * w,
        "optimizer": sharded(1) * (master + 2 * lay.optimizer_bits // 8),
    }
    # FSDP all-gathers one block at a time, prefetching the next: two of the largest blocks, unsharded.
    n_layers = cfg.num_hidden_layers
    if lay.zero >= 3:
        k = cfg.first_k_dense_replace if cfg.is_moe else 0  # the first MoE block (or any dense one)
        block = (cfg.replace(num_hidden_layers=k + 1).num_params(embeddings=False)
                 - cfg.replace(num_hidden_layers=k).num_params(embeddings=False)) if k else (
                 cfg.replace(num_hidden_layers=1).num_params(embeddings=False) - cfg.hidden_size)
        block_experts = cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size if cfg.is_moe else 0
        mem["fsdp_gather"] = 2 * ((block - block_experts) / lay.tp + block_experts / lay.ep) * w
    else:
        mem["fsdp_gather"] = 0.0
    tokens = lay.micro_batch * lay.seq
    per_layer = [activation_elems_per_token(cfg, i) * w for i in range(n_layers)]
    head = cfg.vocab_size * (w + 4)
    act_full = (sum(per_layer) + head) * tokens / lay.tp
    act_ckpt = (n_layers * cfg.hidden_size * w + max(per_layer) + head) * tokens / lay.tp
    train_static = sum(mem.values())

    # inference: bf16-or-given weights split over pp x tp x ep (no data-parallel sharding), latent cache
    infer_weights = (dense_local + expert_local) * w
    kv_per_token = cfg.kv_cache_bytes_per_token(w)["mla_latent"] / lay.pp
    free = lay.gpu_memory_gb * GB - infer_weights

    from .train.loop import train_flops_per_token  # the one FLOP formula (the trainer's MFU uses it)
    flops = train_flops_per_token(cfg, lay.seq, cfg.num_nextn_predict_layers if lay.mtp else 0)
    tps_gpu = lay.peak_tflops * 1e12 * lay.mfu / flops
    cap = lay.gpu_memory_gb * GB
    return {
        "layout": {**asdict(lay), "dp": lay.dp, "edp": edp},
        "params": {"total": total, "routed_experts": experts, "other": dense,
                   "per_gpu": dense_local / (lay.dp if lay.zero >= 3 else 1) + expert_local / (edp if lay.zero >= 3 else 1)},
        "train_bytes": {**mem, "activations": act_full, "activations_checkpointed": act_ckpt,
                        "total": train_static + act_full, "total_checkpointed": train_static + act_ckpt},
        "fits": train_static + act_full <= cap, "fits_checkpointed": train_static + act_ckpt <= cap,
        "inference_bytes": {"weights": infer_weights, "kv_cache_per_token": kv_per_token,
                            "kv_cache_micro_batch": kv_per_token * tokens,
                            "max_cached_tokens": max(0, int(free // kv_per_token))},
        "throughput": {"flops_per_token": flops, "tokens_per_s_per_gpu": tps_gpu,
                       "tokens_per_s": tps_gpu * lay.gpus, "gpu_hours_per_trillion_tokens": 1e12 / tps_gpu / 3600},
    }


def plan_v3_paper_check(mfu: float = 0.30, peak_tflops: float = H800_BF16_TFLOPS) -> dict:
    """The DeepSeek-V3 paper's pre-training throughput against this planner's prediction at `mfu`."""
    cfg = get_preset("deepseek-v3")
    from .train.loop import train_flops_per_token
    flops = train_flops_per_token(cfg, V3_PAPER_SEQ, cfg.num_nextn_predict_layers)
    paper_tps = 1e12 / (V3_PAPER_GPU_HOURS_PER_T * 3600)
    ours = peak_tflops * 1e12 * mfu / flops
    return {
        "paper_tokens_per_s_per_gpu": paper_tps,
        "paper_mfu_bf16_peak": paper_tps * flops / (H800_BF16_TFLOPS * 1e12),
        "paper_mfu_fp8_peak": paper_tps * flops / (H800_FP8_TFLOPS * 1e12),
        "flops_per_token": flops,
        "plan_tokens_per_s_per_gpu": ours,
        "plan_gpu_hours_per_trillion_tokens": 1e12 / ours / 3600,
        "tokens_per_s_vs_paper": ours / paper_tps - 1,  # < 0: the plan is slower than the paper
        "gpu_hours_vs_paper": paper_tps / ours - 1,
    }


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `r1lab plan` on an argparse subparsers object; returns its parser."""
    from .model.config import PRESETS

    p = subparsers.add_parser(
        "plan", help="memory per GPU and tokens/s of a parallel layout, before renting the cluster",
        description="Estimate memory per GPU (weights, gradients, optimizer state, activations with and without "
                    "activation checkpointing, MLA latent KV cache for inference) and training tokens/s for a "
                    "layout. Cross-checked against DeepSeek-V3's 2048 H800s and 180K GPU hours per trillion "
                    "tokens (printed with every plan).")
    p.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS), help="model (default: deepseek-v3)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB = 1e9 B (default: 80)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree, divides dp (default: 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree for non-expert weights (default: 1)")
    p.add_argument("--zero", type=int, default=3, choices=(1, 2, 3),
                   help="ZeRO stage: 1 shards optimizer state, 2 + gradients, 3 (FSDP) + weights (default: 3)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per GPU (default: 1)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default: 4096)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES),
                   help="weights, gradients, activations (default: bf16; fp32 master weights are added)")
    p.add_argument("--optimizer-bits", type=int, default=32, choices=(16, 32),
                   help="AdamW moment precision (default: 32; DeepSeek-V3 used 16 = bf16)")
    p.add_argument("--no-mtp", action="store_true", help="leave the multi-token-prediction modules out")
    p.add_argument("--peak-tflops", type=float, default=H800_BF16_TFLOPS,
                   help="dense peak TFLOP/s per GPU (default: 989, H100/H800/H200 bf16)")
    p.add_argument("--mfu", type=float, default=0.30, help="assumed model FLOPs utilisation (default: 0.30)")
    p.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    p.set_defaults(fn=cmd_plan)
    return p


def cmd_plan(args) -> None:
    cfg = get_preset(args.preset)
    lay = Layout(gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb, ep=args.ep, pp=args.pp, tp=args.tp,
                 zero=args.zero, micro_batch=args.micro_batch, seq=args.seq, dtype=args.dtype,
                 optimizer_bits=args.optimizer_bits, mtp=not args.no_mtp, peak_tflops=args.peak_tflops, mfu=args.mfu)
    r = plan(cfg, lay)
    check = plan_v3_paper_check()
    if args.json:
        print(json.dumps({**r, "v3_paper_check": check}, indent=2))
        return
    g = lambda b: f"{b / GB:8.2f} GB"  # noqa: E731
    t, L = r["train_bytes"], r["layout"]
    print(f"{args.preset} on {lay.gpus} GPUs x {lay.gpu_memory_gb:g} GB: dp {L['dp']} x pp {lay.pp} x tp {lay.tp}, "
          f"ep {lay.ep} (experts replicated {L['edp']}x), ZeRO-{lay.zero}, micro-batch {lay.micro_batch} x "
          f"{lay.seq} tokens, {lay.dtype}")
    print(f"  parameters      {r['params']['total'] / 1e9:.2f}B ({r['params']['routed_experts'] / 1e9:.2f}B in routed "
          f"experts), {r['params']['per_gpu'] / 1e9:.3f}B stored per GPU")
    print("  training memory per GPU")
    for k in ("weights", "gradients", "optimizer", "fsdp_gather"):
        print(f"    {k:<26}{g(t[k])}")
    print(f"    {'activations':<26}{g(t['activations'])}   ({g(t['activations_checkpointed']).strip()} "
          f"with activation checkpointing)")
    ok = lambda b: "fits" if b else "does NOT fit"  # noqa: E731
    print(f"    {'total':<26}{g(t['total'])}   {ok(r['fits'])}; {g(t['total_checkpointed']).strip()} "
          f"checkpointed: {ok(r['fits_checkpointed'])}")
    inf = r["inference_bytes"]
    print(f"  inference       weights {g(inf['weights']).strip()} per GPU, MLA latent cache "
          f"{inf['kv_cache_per_token']:,.0f} B/token per GPU, room for {inf['max_cached_tokens']:,} cached tokens")
    th = r["throughput"]
    print(f"  throughput      {th['flops_per_token'] / 1e9:.1f} GFLOP/token x {lay.mfu:.0%} MFU of {lay.peak_tflops:g} "
          f"TFLOP/s: {th['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, {th['tokens_per_s']:,.0f} tokens/s, "
          f"{th['gpu_hours_per_trillion_tokens'] / 1e3:,.0f}K GPU hours per trillion tokens")
    print(f"  V3 paper check  180K H800 hours/T tokens = {check['paper_tokens_per_s_per_gpu']:,.0f} tokens/s/GPU = "
          f"{check['paper_mfu_bf16_peak']:.0%} of bf16 peak ({check['paper_mfu_fp8_peak']:.0%} of FP8 peak); "
          f"at 30% MFU this planner says {check['plan_gpu_hours_per_trillion_tokens'] / 1e3:,.0f}K hours "
          f"({-check['tokens_per_s_vs_paper']:.0%} fewer tokens/s, {check['gpu_hours_vs_paper']:+.0%} GPU hours; "
          f"--mfu {check['paper_mfu_bf16_peak']:.2f} reproduces the paper)")
    print("  (estimates: no fragmentation, communication buffers or CUDA context; keep ~10% headroom)")
