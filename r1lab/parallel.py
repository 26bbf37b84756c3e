"""Distribution applied to an unmodified model, for runs under torchrun.

    init_distributed()                      process group from torchrun's environment variables
    make_meshes(ep)                         a 1-D data-parallel mesh over all ranks, and a 2-D (edp, ep) mesh
    apply_expert_parallel(model, mesh2d)    routed experts split over the EP group, tokens sent by all-to-all
    compile_blocks(model, dynamic)          torch.compile each block on its own (regional compilation)
    apply_activation_checkpointing(model)   recompute each block's activations in the backward pass
    apply_fsdp(model, dp_mesh, ...)         FSDP2 `fully_shard` per block, then the root
    parallelize(model, ep, ...)             the four above, in that order (what the trainers call)
    shard(items, rank, world)               each rank's share of a batch
    grad_norm(params) / clip_grad_norm_(params, max_norm)
                                            the global gradient norm over every rank's shards (and clipping)
    full_tensors / copy_full_weights / unsharded_copy / full_state_dict
                                            the sharded model gathered, one tensor at a time
    checkpoint_state / load_checkpoint_state / load_full_state
                                            distributed checkpoints (DCP) that resume on any number of ranks

Expert parallelism (DeepSeek-V3 paper, section 3.2; torchtitan's layout): EP runs inside data parallelism. The
world of dp ranks is split as (edp, ep): each EP group of `ep` ranks holds the E routed experts of every MoE
layer between them (rank r keeps experts r*E/ep ... (r+1)*E/ep - 1), and each expert is replicated over the
edp = dp/ep groups. Every rank routes its own tokens, sends each (token, slot) row to the rank holding its
expert (all-to-all with per-rank split sizes), runs its local experts with the model's own grouped GEMM, and
sends the outputs back. The model's MoE code is untouched: only `moe.experts`' parameters are replaced by their
local slices and its `forward` by one that wraps the exchange around the original.

Gradients: the non-expert weights' gradients are averaged over dp by FSDP. An expert's gradient arrives already
summed over its EP group (the backward all-to-all brings back every token it saw), so it is divided by the full
dp (FSDP's divide factor on the experts' own unit over edp): the same mean as one process over the batch.

Every gradient element therefore lives on exactly one rank (FSDP shards the rest over dp, the experts over edp
within their EP slice), which is what `clip_grad_norm_` and the checkpoints rely on.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from .model.moe import MoE
from .model.transformer import Block, Transformer


# ---------------------------------------------------------------------- process group and meshes
def init_distributed(device_type: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on CUDA (one GPU per local rank, made the current device), gloo on the CPU; device_type picks one
    (default: CUDA when available). Returns (rank, world_size, device). Without torchrun's variables it returns
    (0, 1, device) and starts no group, so scripts run unchanged on one process.
    """
    cuda = torch.cuda.is_available() and device_type != "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group; 1 without one (a plain `python` or `r1lab` run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def make_meshes(ep: int = 1, device_type: str | None = None) -> tuple[DeviceMesh, DeviceMesh]:
    """(dp_mesh, ep_mesh): a 1-D mesh over all ranks for FSDP, and a 2-D ("edp", "ep") mesh for experts."""
    world = dist.get_world_size()
    if world % ep:
        raise ValueError(f"expert parallelism: ep={ep} must divide the world size {world}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    dp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return dp_mesh, ep_mesh


# ---------------------------------------------------------------------- expert parallelism
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable all-to-all over dim 0: send in_splits[r] rows to rank r, receive out_splits[r] from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _ep_forward(experts: nn.Module, forward, group, x: torch.Tensor, counts: torch.Tensor,
                impl: str = "auto") -> torch.Tensor:
    """x (M, D): this rank's (token, slot) rows sorted by global expert, counts (E,) -> outputs (M, D), same order.

    El = E/ep local experts. Rows for rank r are the contiguous block of experts r*El ... (r+1)*El - 1.
    `forward` is the experts module's own (`Experts.forward`, or `LoRAExperts.forward` with adapters).
    """
    ep = dist.get_world_size(group)
    El = counts.numel() // ep
    # recv_counts[s, e]: rows rank s sends to my local expert e (counts are exchanged first, El per rank)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(ep, El)
    # split sizes must be host integers: one device sync per MoE layer (as every EP implementation has)
    send = counts.view(ep, El).sum(1).tolist()
    recv = recv_counts.sum(1).tolist()
    xr = all_to_all(x, recv, send, group)  # (R, D), ordered (source rank, local expert)
    # Regroup source-major blocks into expert-major order for the grouped GEMM: block (s, e) -> position of e.
    sizes = recv_counts.flatten()  # (ep*El,) source-major
    starts = sizes.cumsum(0) - sizes
    blocks = torch.arange(ep * El, device=x.device).view(ep, El).T.flatten()  # expert-major block ids
    bs, st = sizes[blocks], starts[blocks]
    out_start = bs.cumsum(0) - bs
    perm = torch.repeat_interleave(st - out_start, bs, output_size=xr.shape[0]) + torch.arange(
        xr.shape[0], device=x.device)  # perm[j]: source row of expert-major row j
    y = forward(experts, xr[perm], recv_counts.sum(0), impl)  # the model's own expert computation
    back = torch.empty_like(y)
    back[perm] = y  # undo the regrouping: (source rank, local expert) order again
    return all_to_all(back, send, recv, group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's E/ep routed experts of every MoE layer and exchange tokens with its EP group.

    `model` must hold the full experts, identical on all ranks (same seed or the same checkpoint). Parameter
    names are unchanged; `gate_proj`/`up_proj`/`down_proj` become (E/ep, ...) slices, rank r's being experts
    r*E/ep onwards. On its own this is exact: each local expert's gradient is the sum over every token of the
    EP group that it saw. Averaging over data-parallel ranks is `apply_fsdp`'s business.
    Routed experts with adapters (`lora.LoRAExperts`, applied before this) are split the same way: every
    parameter of the module, the frozen stacked weights and the (E, ...) factors alike, keeps its rank's experts.
    """
    group, ep, r = ep_mesh.get_group("ep"), ep_mesh.size(1), ep_mesh.get_local_rank("ep")
    dp = ep_mesh.size()
    # For checkpoints: expert rows are split over "ep" first (contiguous slices), then FSDP splits each slice
    # over "edp". A DTensor sharded on dim 0 over a mesh ordered (ep, edp) describes exactly that layout, so
    # DCP can reshard it; building the transposed mesh creates its process groups (collective, once).
    ckpt_mesh = ep_mesh["ep"] if ep == dp else DeviceMesh(ep_mesh.device_type, ep_mesh.mesh.T.contiguous(),
                                                            mesh_dim_names=("ep", "edp"))
    for moe in _moe_modules(model):
        ex = moe.experts
        E = ex.gate_proj.shape[0]
        if E % ep:
            raise ValueError(f"expert parallelism: ep={ep} must divide the {E} routed experts")
        lo, hi = r * E // ep, (r + 1) * E // ep
        for owner in ex.modules():  # (with adapters: the LoRAExperts' factors, then its base's weights)
            for name, full in list(owner.named_parameters(recurse=False)):
                assert full.shape[0] == E, f"{name} {tuple(full.shape)}: not stacked by expert"
                setattr(owner, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        ex.forward = lambda x, counts, impl="auto", _ex=ex, _f=type(ex).forward: _ep_forward(_ex, _f, group, x,
                                                                                              counts, impl)
        ex._r1lab_ep = (ep, r, dp)
        ex._r1lab_ep_mesh = ep_mesh["ep"]
        ex._r1lab_ckpt_mesh = ckpt_mesh
    return model


def all_reduce_expert_load(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's `expert_load` over the data-parallel ranks (collective).

    Call it before `model.update_router_bias(gamma)`: the aux-loss-free bias is a buffer FSDP does not
    synchronise, and it must move by the load of the global batch, identically on every rank.
    """
    layers = _moe_modules(model)
    if layers:  # one collective for all layers
        load = torch.stack([m.expert_load for m in layers])
        dist.all_reduce(load, group=group)
        for m, row in zip(layers, load):
            m.expert_load.copy_(row)


def _moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _ep_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name prefix ("model.layers.1.mlp.experts.") -> expert-parallel module (Experts or LoRAExperts)."""
    return {name + ".": m for name, m in model.named_modules() if getattr(m, "_r1lab_ep", None) is not None}


# ---------------------------------------------------------------------- regional compilation
def compile_blocks(model: Transformer, dynamic: bool = False) -> Transformer:
    """torch.compile each decoder block (main layers and MTP blocks) on its own, for training: regional
    compilation, as torch's recipe and torchtitan do.

    Every block runs one compiled `Block.forward`, whose graphs take the block's parameters as inputs (guarded
    by shape and dtype, not identity): all blocks of one kind share one graph, one for the dense blocks and one
    for the MoE blocks however deep the model (with LoRA the first block compiles apart: its input, from the
    frozen embedding, needs no gradient), where a compile of the whole model traces and compiles every layer,
    unrolled, forward and backward (~77 s for bench-moe-1b's 12 layers on an H200). The price: nothing fuses
    across a block boundary (one block's last residual add with the next one's first norm).

    Training mode only: a block in eval mode runs eagerly (the engine's prefill, and its decode step, which the
    engine compiles whole; the no-grad reference passes). dynamic: the batch and sequence dimensions of the
    blocks' inputs are marked dynamic before every call, so that micro-batches of every shape share the graphs
    (GRPO's completions change in number and length every step); otherwise they are specialised to the first
    shape, and torch.compile makes them symbolic when a second one comes (a second compilation).

    Apply before activation checkpointing, which then recomputes the compiled block from outside, and before
    FSDP, whose hooks around each block then stay eager. torchtitan compiles the checkpointed block instead;
    here Dynamo cannot trace the checkpoint wrapper (it counts its calls to undo a MoE's side effects in the
    recomputation: a graph break, after which nothing of the block was compiled, tried on the CPU). The forward
    is replaced on the instance (parameter names do not change), as a bound method: a deep copy of the model
    (GRPO's reference) runs its own blocks.
    """
    compiled = torch.compile(Block.forward)
    for block in list(model.model.layers) + [m.block for m in model.mtp]:
        if getattr(block, "_r1lab_checkpointed", False) or isinstance(block, FSDPModule):
            raise ValueError("compile_blocks: compile the blocks before activation checkpointing and FSDP wrap them")
        block.forward = types.MethodType(functools.partial(_block_forward, compiled, dynamic), block)
    return model


def _block_forward(compiled, dynamic: bool, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   *args, **kwargs) -> torch.Tensor:
    if not block.training:
        return Block.forward(block, x, cos, sin, *args, **kwargs)
    if dynamic:
        for t in (x, cos, sin):  # (B, S, ...); maybe_: a dimension of size 1 stays specialised rather than raise
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 1)
    return compiled(block, x, cos, sin, *args, **kwargs)


# ---------------------------------------------------------------------- activation checkpointing
def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute every decoder block's activations (main layers and MTP blocks) during the backward pass.

    Applied from outside: each block's `forward` is replaced on the instance, so parameter names (and
    checkpoints) do not change; by a method bound to the block, which calls the forward it wraps (Block.forward,
    or compile_blocks') on that block, so that a deep copy of the model (GRPO's reference, grpo.async's rollout
    copy) runs its own blocks, not the original's. A MoE layer counts its routed tokens in `expert_load` and
    stores its balance loss during forward; the recomputation puts both back, so loads are counted once.
    """
    blocks = list(model.model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        if getattr(block, "_r1lab_checkpointed", False):
            continue

        def forward(self, *args, _inner=block.forward.__func__, **kwargs):
            moe, calls = self.mlp if isinstance(self.mlp, MoE) else None, 0

            def run(*a, **k):
                nonlocal calls
                calls += 1
                if calls == 1 or moe is None:
                    return _inner(self, *a, **k)
                load, bal = moe.expert_load.clone(), moe.balance_loss  # recomputation: undo its side effects
                try:
                    return _inner(self, *a, **k)
                finally:  # also when torch stops the recomputation early (by raising) once it has what it needs
                    moe.expert_load.copy_(load)
                    moe.balance_loss = bal

            if not torch.is_grad_enabled():
                return _inner(self, *args, **kwargs)
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(forward, block)
        block._r1lab_checkpointed = True
    return model


# ---------------------------------------------------------------------- FSDP2
def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, ep_mesh: DeviceMesh | None = None,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> Transformer:
    """FSDP2: `fully_shard` every decoder block (and MTP block), then the root (embedding, head, norms).

    Precision (the README's one policy): parameters stay fp32 (the sharded fp32 copy is the master the
    optimizer updates); on CUDA they are all-gathered in bf16 for compute and gradients are reduced in fp32.
    On the CPU (gloo) everything is fp32. `param_dtype` overrides the all-gather dtype. Frozen parameters may be
    stored in another dtype than the trained ones of their unit (FSDP2 asks one dtype of the trained ones only):
    a LoRA base is sharded in the compute dtype (`lora.cast_base`), its fp32 adapters beside it.
    With expert parallelism applied first (pass its `ep_mesh`), each layer's local experts become their own FSDP
    unit over the "edp" dimension (their replicas), with gradients divided by the full dp (module docstring).
    """
    if param_dtype is None:
        param_dtype = torch.bfloat16 if dp_mesh.device_type == "cuda" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for moe in _moe_modules(model):
        ex = moe.experts
        if getattr(ex, "_r1lab_ep", None) is None:
            continue
        if ep_mesh is None:
            raise ValueError("apply_fsdp: the model is expert-parallel; pass the ep_mesh given to apply_expert_parallel")
        # Experts get their own FSDP unit over "edp" (their replicas), even when edp = 1: then it shards
        # nothing but still casts them to the compute dtype and divides their gradients by dp, like the rest.
        fully_shard(ex, mesh=ep_mesh["edp"], mp_policy=mp, reshard_after_forward=reshard_after_forward)
        ex.set_gradient_divide_factor(float(ex._r1lab_ep[2]))
        if dist.get_backend() == "gloo" and ep_mesh["edp"].size() > 1:
            # gloo lacks the pre-multiplied sum FSDP reduces with for a custom factor: sum, then divide
            ex.set_force_sum_reduction_for_comms(True)
    blocks = list(model.model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps its weights gathered after forward: the head is used again at once in backward.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def parallelize(model: Transformer, ep: int = 1, activation_checkpointing: bool = False,
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                compile: bool = False, dynamic: bool = False) -> Transformer:
    """Expert parallelism (when ep > 1), regional compilation (when asked; `compile_blocks(model, dynamic)`),
    activation checkpointing (when asked), then FSDP2, over every rank of the process group: torchtitan's order,
    so the recomputation repeats the all-to-alls on every rank alike and FSDP wraps the final modules (except
    that torchtitan compiles the checkpointed blocks; see compile_blocks). `model` must be the same full fp32
    model on every rank."""
    dp_mesh, ep_mesh = make_meshes(ep, model.device.type)
    if ep > 1:
        apply_expert_parallel(model, ep_mesh)
    if compile:
        compile_blocks(model, dynamic)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return apply_fsdp(model, dp_mesh, ep_mesh, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)


# ---------------------------------------------------------------------- data
def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s 1/world of a batch (rows of a micro-batch, prompts of a GRPO step): items rank, rank + world,
    ..., so that the ranks together see exactly the batch one process would (and in GRPO each rank's i-th
    mini-batch holds its part of one process's i-th). The batch must divide evenly: every rank then does the
    same work, and a loss normalised by the global count equals the one-process loss."""
    if len(items) % world:
        raise ValueError(f"a batch of {len(items)} does not split evenly over {world} ranks")
    return list(items[rank::world])


# ---------------------------------------------------------------------- gradient clipping
@torch.no_grad()
def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the gradients of `params` (a device scalar, no host sync).

    One process: torch.nn.utils.get_total_norm. Sharded: torch's version cannot mix DTensors of different
    meshes (the experts' "edp" and the rest's "dp") and would miss the other EP ranks' experts. But every
    gradient element lives on exactly one rank (module docstring), so the squared norm is the sum over ranks of
    the local shards' squared norms: one all-reduce.
    """
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    if world_size() == 1:
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    grads = [g for g in grads if g.numel()]  # uneven FSDP shards can be empty on some ranks
    device = grads[0].device if grads else torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum() if grads else \
        torch.zeros((), device=device)
    dist.all_reduce(sq)
    return sq.sqrt()


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping multiplies the gradients by: max_norm / norm, at most 1 (torch's formula, eps included)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` so that their global 2-norm is at most max_norm; returns the norm."""
    total = grad_norm(params)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if grads:
        torch._foreach_mul_(grads, clip_factor(total, max_norm).to(grads[0].dtype))
    return total


# ---------------------------------------------------------------------- the full model, gathered
def _expert_keys(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """State-dict key -> (expert-parallel module, parameter name in it) of every tensor split over EP: the
    stacked weights, and with adapters (`base.gate_proj`, ..., `gate_up_A`, ...) the factors too."""
    return {prefix + n: (ex, n) for prefix, ex in _ep_experts(model).items() for n, _ in ex.named_parameters()}


def gather_experts(t: torch.Tensor, ex: nn.Module) -> torch.Tensor:
    """All E experts' rows of `t`, this EP rank's (E/ep, ...) slice of a parameter of `ex` (FSDP's shards over
    "edp" already gathered), gathered over the EP group (collective)."""
    parts = [torch.empty_like(t) for _ in range(ex._r1lab_ep[0])]
    dist.all_gather(parts, t.contiguous(), group=ex._r1lab_ep_mesh.get_group())
    return torch.cat(parts)


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of a parallelized model's state dict, gathered one at a time on this
    rank's device (collective: every rank must exhaust the iterator). FSDP shards are all-gathered over their
    mesh, expert-parallel slices over their EP group; plain entries (buffers) are the same on every rank."""
    experts = _expert_keys(model)
    for key, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if key in experts:
            t = gather_experts(t, experts[key][0])
        yield key, t


@torch.no_grad()
def copy_full_weights(model: nn.Module, into: nn.Module | None) -> None:
    """Copy a parallelized model's full weights (and buffers) into a plain model of the same architecture, in
    place (its tensors keep their storage, so an engine's CUDA graph over them stays valid). Collective:
    every rank calls it; `into` may be None on ranks that only take part."""
    dst = into.state_dict() if into is not None else None
    for key, t in full_tensors(model):
        if dst is not None:
            dst[key].copy_(t)


def unsharded_copy(model: Transformer, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   on_every_rank: bool = True) -> Transformer | None:
    """A plain Transformer holding a parallelized model's full weights, on `device` in `dtype` (collective).
    With on_every_rank=False only rank 0 gets one (the others return None): what exporting needs."""
    into = None
    if on_every_rank or rank() == 0:
        with torch.device("meta"):
            into = Transformer(model.config)
        into = into.to_empty(device=device).init_buffers()
    copy_full_weights(model, into)
    return into.to(dtype) if into is not None else None


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The whole model's state dict, unsharded (collective: call it on every rank).

    cpu_offload (default): rank 0 gets CPU tensors and the other ranks an empty dict, so no GPU ever holds the
    whole model; without it every rank gets the full tensors on its device.
    """
    keep = not cpu_offload or rank() == 0
    sd = {}
    for key, t in full_tensors(model):
        if keep:
            sd[key] = t.cpu() if cpu_offload else t
    return sd


# ---------------------------------------------------------------------- distributed checkpoints
def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"model": ..., "optim": ...} for `torch.distributed.checkpoint.save/load`, resumable on any world size.

    FSDP parameters are DTensors already; expert-parallel slices (plain tensors, different on every EP rank,
    or FSDP DTensors over "edp" that only know their own slice) and their AdamW moments are presented as
    DTensors of the full expert tensor, sharded on dim 0 over (ep, edp), so DCP knows their global shape and
    reshards them to any world size (a plain one-process model included). Optimizer entries are keyed by
    parameter name. After `dcp.load` call `load_checkpoint_state(model, optimizer, state)`, which copies them
    back.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_model_state_dict(model), None)
    for key, (ex, name) in _expert_keys(model).items():
        mesh, rows = ex._r1lab_ckpt_mesh, ex.get_parameter(name).shape  # this EP rank's (E/ep, ...)
        full = torch.Size((ex._r1lab_ep[0] * rows[0], *rows[1:]))

        def wrap(t):
            if not torch.is_tensor(t) or not t.dim():  # AdamW's step count: the same on every rank
                return t
            local = t.to_local() if isinstance(t, DTensor) else t  # FSDP's shard of this EP rank's slice
            return DTensor.from_local(local, mesh, [Shard(0)] * mesh.ndim, run_check=False, shape=full,
                                      stride=torch.empty(full, device="meta").stride())
        msd[key] = wrap(msd[key])
        if osd is not None and key in osd["state"]:
            osd["state"][key] = {k: wrap(v) for k, v in osd["state"][key].items()}
    return {"model": msd, "optim": osd} if osd is not None else {"model": msd}


def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Put a `checkpoint_state` dict that `dcp.load` filled back into the model (and optimizer)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

    keys = _expert_keys(model)
    msd, osd = dict(state["model"]), state.get("optim")
    if keys:  # the model's own expert entries (plain or FSDP tensors), with the loaded slices copied in
        raw_m, raw_o = get_state_dict(model, optimizer) if optimizer is not None else (get_model_state_dict(model), None)
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        for k in keys:
            local(raw_m[k]).copy_(local(msd[k]))
            msd[k] = raw_m[k]
        if osd is not None:
            osd = {**osd, "state": dict(osd["state"])}
            for k in keys:
                if k in osd["state"]:
                    for n, t in osd["state"][k].items():
                        if torch.is_tensor(t):  # moments and AdamW's step count
                            local(raw_o["state"][k][n]).copy_(local(t))
                    osd["state"][k] = raw_o["state"][k]
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=msd,
                   optim_state_dict=osd if osd is not None else {})


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict) -> None:
    """Load full (unsharded) model and optimizer state, optimizer entries keyed by parameter name (a
    one-process checkpoint), into a parallelized model: every rank takes its EP slice of the experts and its
    FSDP shards of everything. Every rank passes the same full dicts."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    msd, osd = dict(msd), {**osd, "state": dict(osd["state"])}
    for key, (ex, _) in _expert_keys(model).items():
        ep, r, _ = ex._r1lab_ep

        def slice_(t):  # this EP rank's experts: rows r*E/ep ... (r+1)*E/ep - 1
            return t.chunk(ep)[r] if torch.is_tensor(t) and t.dim() else t
        if key in msd:  # (a one-process LoRA checkpoint holds the adapters alone)
            msd[key] = slice_(msd[key])
        if key in osd["state"]:
            osd["state"][key] = {k: slice_(v) for k, v in osd["state"][key].items()}
    set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True))
    # not strict: a parameter that never had a gradient (the MTP module's while its loss is off) has no AdamW state
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
