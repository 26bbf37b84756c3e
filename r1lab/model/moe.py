"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 paper, section 2.1.2).

Dimension legend
  T tokens (batch * seq flattened), D hidden_size, E n_routed_experts, K num_experts_per_tok,
  G n_group, I moe_intermediate_size

Routing, V3 ("noaux_tc"): s = sigmoid(x W_gate^T) in fp32. Selection uses s + b, where b is the
auxiliary-loss-free correction bias; each group of E/G experts is scored by the sum of its top-2 biased
scores, the best `topk_group` groups survive, and the top K experts among them are chosen. The gating
weights come from the *unbiased* s of the chosen experts, renormalised to sum to 1 when `norm_topk_prob`,
times `routed_scaling_factor`. V2 ("greedy" / "group_limited_greedy"): softmax scores, plain top-k (or
groups scored by their max expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .layers import MLP, KeepFP32Buffers

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
SMALL_ROWS = 16  # (token, expert) rows up to which MoE gathers expert weights instead of grouping rows


class Gate(KeepFP32Buffers):
    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            # fp32 always: bias updates of size gamma=1e-3 vanish in bf16 next to scores near 1.
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinity of every token to every expert, (T, E), fp32 (the router is kept in fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> weights (T, K) fp32, expert indices (T, K), scores (T, E)."""
        s = self.scores(x)
        choice = s if self.e_score_correction_bias is None else s + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))  # (T, G, E/G)
            m1 = grouped.amax(dim=-1)  # (T, G)
            if self.method == "noaux_tc":
                # sum of each group's top-2 scores, with max-reductions the compiler fuses (no top-k kernel):
                # the second best is the max of the rest, or the max again when it occurs twice.
                is_max = grouped == m1[..., None]
                m2 = grouped.masked_fill(is_max, float("-inf")).amax(dim=-1)
                group_score = m1 + torch.where(is_max.sum(-1) > 1, m1, m2)
            else:
                group_score = m1
            # keep the topk_group best groups: those with fewer than topk_group better ones (ties by index)
            g, idx_g = group_score[:, :, None], torch.arange(self.n_group, device=x.device)
            earlier = idx_g[None, :] < idx_g[:, None]  # [i, j]: group j comes before group i
            better = (group_score[:, None, :] > g) | ((group_score[:, None, :] == g) & earlier)
            mask = better.sum(-1) >= self.topk_group  # (T, G), True = drop
            fill = float("-inf") if self.method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(mask[..., None], fill).flatten(1)
        idx = choice.topk(self.top_k, dim=-1).indices  # (T, K)
        w = s.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale, idx, s


class Experts(nn.Module):
    """E SwiGLU experts stored stacked, (E, out, in) like nn.Linear weights, for grouped matrix products.

    Checkpoints store them one by one (`experts.7.gate_proj.weight`); r1lab.checkpoint maps between the two.
    """

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """x (M, D): tokens sorted by expert, counts (E,) tokens per expert -> (M, D)."""
        if impl == "auto":
            impl = "grouped" if self.grouped_ok(x) else "loop"
        if impl == "grouped":
            # One grouped GEMM per projection: no per-expert launch, no host sync (CUDA-graph friendly).
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(_grouped_mm(x, self.gate_proj.transpose(-2, -1), offs=offs))
            h = h * _grouped_mm(x, self.up_proj.transpose(-2, -1), offs=offs)
            return _grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs)
        # Reference path: one matmul per expert. counts.tolist() syncs with the device.
        out, start = torch.empty_like(x), 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = x[start:start + n]
                he = F.silu(xe @ self.gate_proj[e].T) * (xe @ self.up_proj[e].T)
                out[start:start + n] = he @ self.down_proj[e].T
                start += n
        return out

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows, experts (M,) the expert of each row -> (M, D). For a handful of rows (a decode step of
        one or two tokens): each row's expert weights are gathered and applied with batched matmuls, which
        costs fewer and cheaper kernels than sorting the rows and setting up grouped GEMMs."""
        xr = x[:, None, :]  # (M, 1, D)
        h = F.silu(torch.bmm(xr, self.gate_proj[experts].transpose(1, 2)))
        h = h * torch.bmm(xr, self.up_proj[experts].transpose(1, 2))  # (M, 1, I)
        return torch.bmm(h, self.down_proj[experts].transpose(1, 2))[:, 0]

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """torch's grouped GEMM runs bf16 on Hopper-class GPUs and fp32 on CPU, with 16-byte aligned rows."""
        if _grouped_mm is None or x.dtype != self.gate_proj.dtype:
            return False
        aligned = all(d * x.element_size() % 16 == 0 for d in self.down_proj.shape[1:])
        if x.is_cuda:
            return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        # CPU fp32 runs eagerly, but torch.compile's shape checker accepts only bf16 there.
        return aligned and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


def host_sync(model: nn.Module) -> str | None:
    """Why a forward of `model` (on its device, in its dtype) reads a count back to the host, which a CUDA graph
    cannot capture: routed experts that run one matmul per expert (the loop path) where the grouped GEMM does
    not apply, e.g. fp32 weights on a GPU, or an MoE set to impl "loop". None when no layer does."""
    for name, m in model.named_modules():
        if not isinstance(m, MoE) or hasattr(m.experts, "_r1lab_ep"):
            continue
        if m.impl == "loop":
            return f"{name} runs its experts one by one (impl 'loop')"
        w = m.experts.gate_proj
        if m.impl == "auto" and not m.experts.grouped_ok(torch.empty(1, w.shape[-1], dtype=w.dtype, device=w.device)):
            return (f"{name}'s experts in {str(w.dtype).removeprefix('torch.')} on {w.device.type} run one matmul "
                    f"per expert (the grouped GEMM runs bf16 on GPUs of compute capability 9 or more)")
    return None


class MoE(KeepFP32Buffers):
    fp32_buffers = ("expert_load",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None
        self.impl = "auto"  # "grouped" | "loop" | "auto"
        self.balance_alpha = 0.0  # sequence-wise balance loss weight (V3 eq. 17-20); the trainer sets it
        self.balance_loss: torch.Tensor | None = None
        # Tokens routed to each expert since the last bias update (what the aux-loss-free rule balances).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, S, D)
        xt = x.reshape(-1, shape[-1])  # (T, D)
        if self._use_kernels(xt):
            return self._fused(xt).view(shape)
        w, idx, scores = self.gate(xt)
        flat = idx.flatten()  # (T*K,) expert of each (token, slot)
        # scatter_add, not bincount: bincount's output size depends on the data and syncs with the device.
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        self.expert_load += counts.to(self.expert_load.dtype).detach()
        # (not under expert parallelism: there every rank must take part in the experts' all-to-all)
        if flat.numel() <= SMALL_ROWS and self.impl == "auto" and not hasattr(self.experts, "_r1lab_ep"):
            y = self.experts.gathered(xt.repeat_interleave(self.top_k, dim=0), flat)  # (T*K, D)
        else:
            y = self._grouped(xt, flat, counts)
        y = y.view(-1, self.top_k, shape[-1]) * w[..., None].to(y.dtype)  # (T, K, D)
        out = y.sum(1, dtype=torch.float32).to(xt.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(xt)
        self.balance_loss = None
        if self.training and self.balance_alpha > 0:
            self.balance_loss = self.balance_alpha * sequence_balance_loss(
                scores.view(shape[0], shape[1], -1), idx.view(shape[0], shape[1], -1), self.top_k)
        return out.view(shape)

    def _use_kernels(self, xt: torch.Tensor) -> bool:
        """The Triton decode path (kernels.py): inference on a GPU, a decode-sized batch, tile-friendly sizes."""
        n_shared = 0 if self.shared_experts is None else self.shared_experts.gate_proj.weight.shape[0]
        inter = self.experts.gate_proj.shape[1]
        return (kernels.enabled(xt) and self.impl == "auto" and not hasattr(self.experts, "_r1lab_ep")
                and xt.shape[0] * (self.top_k + n_shared // inter) <= kernels.MAX_ENTRIES
                and n_shared % inter == 0 and kernels.experts_supported(xt.shape[-1], inter)
                and all(p.is_contiguous() for p in self.parameters()))  # the kernels index weights by shape

    def _fused(self, xt: torch.Tensor) -> torch.Tensor:
        """Routing in two kernels, routed and shared experts in three more (no gradient; see kernels.py)."""
        if xt.shape[0] <= kernels.MAX_ROUTER_TOKENS and kernels.router_supported(self.gate):
            w, idx = kernels.route(xt, self.gate)
        else:
            w, idx, _ = self.gate(xt)
        out, counts = kernels.experts(xt, w, idx, self.experts, self.shared_experts)
        self.expert_load += counts.to(self.expert_load.dtype)
        self.balance_loss = None
        return out

    def _grouped(self, xt: torch.Tensor, flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert through one grouped GEMM per projection; returns (T*K, D) in (token, slot) order."""
        # dest[r]: the row's place when rows are grouped by expert (stable), as the grouped GEMM wants them.
        if flat.numel() <= 1024:  # decode-sized: a counting sort the compiler fuses, no sort kernel
            onehot = flat[:, None] == torch.arange(self.n_experts, device=flat.device)  # (T*K, E)
            rank = (onehot.long().cumsum(0) * onehot).sum(1) - 1  # earlier rows with the same expert
            dest = (counts.cumsum(0) - counts)[flat] + rank
        else:
            order = flat.argsort(stable=True)
            dest = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        x_sorted = torch.empty(flat.numel(), xt.shape[-1], dtype=xt.dtype, device=xt.device)
        x_sorted[dest] = xt.repeat_interleave(self.top_k, dim=0)
        # Gathering back by a permutation is deterministic, unlike a scatter-add whose atomics sum in a
        # different order each run on GPU (and flip later routing decisions in bf16).
        return self.experts(x_sorted, counts, self.impl)[dest]  # (T*K, D), back in (token, slot) order

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing (V3 paper, section 2.1.2): push the bias of overloaded experts down,
        underloaded up, by gamma, then start counting afresh. Call once per optimizer step."""
        bias = self.gate.e_score_correction_bias
        if bias is not None and gamma:
            load = self.expert_load
            bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 paper, eq. 17-20), without the alpha factor.

    scores (B, S, E): affinities s_{i,t}; idx (B, S, K): chosen experts.
      f_i = E / (K S) * #{t : i in topk(t)},  P_i = 1/S sum_t s_{i,t} / sum_j s_{j,t},  L = sum_i f_i P_i,
    computed per sequence and averaged over the batch. f is a count (no gradient); P carries the gradient.
    """
    B, S, E = scores.shape
    chosen = torch.zeros(B, S, E, device=scores.device).scatter_(2, idx, 1.0)
    f = chosen.sum(1) * E / (top_k * S)  # (B, E)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()
