"""Distribution applied to an unmodified model, for runs under torchrun.

    init_distributed()                      process group from torchrun's environment variables
    make_meshes(ep)                         a 1-D data-parallel mesh over all ranks, and a 2-D (edp, ep) mesh
    apply_expert_parallel(model, mesh2d)    routed experts split over the EP group, tokens sent by all-to-all
    apply_fsdp(model, dp_mesh, ...)         FSDP2 `fully_shard` per block, then the root
    apply_activation_checkpointing(model)   r1lab.train.loop's (re-exported, not duplicated)
    ShardedSampler                          each rank's share of a dataset, by rank

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
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .model.moe import Experts, MoE
from .model.transformer import Transformer
from .train.loop import apply_activation_checkpointing  # noqa: F401  (one implementation; re-exported)


# ---------------------------------------------------------------------- process group and meshes
def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on CUDA (one GPU per local rank), gloo on the CPU. Returns (rank, world_size, device). Without
    torchrun's variables it returns (0, 1, device) and starts no group, so scripts run unchanged on one process.
    """
    cuda = torch.cuda.is_available()
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


def _ep_forward(experts: Experts, group, x: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x (M, D): this rank's (token, slot) rows sorted by global expert, counts (E,) -> outputs (M, D), same order.

    El = E/ep local experts. Rows for rank r are the contiguous block of experts r*El ... (r+1)*El - 1.
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
    y = Experts.forward(experts, xr[perm], recv_counts.sum(0), impl)  # the model's own expert computation
    back = torch.empty_like(y)
    back[perm] = y  # undo the regrouping: (source rank, local expert) order again
    return all_to_all(back, send, recv, group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's E/ep routed experts of every MoE layer and exchange tokens with its EP group.

    `model` must hold the full experts, identical on all ranks (same seed or the same checkpoint). Parameter
    names are unchanged; `gate_proj`/`up_proj`/`down_proj` become (E/ep, ...) slices, rank r's being experts
    r*E/ep onwards. On its own this is exact: each local expert's gradient is the sum over every token of the
    EP group that it saw. Averaging over data-parallel ranks is `apply_fsdp`'s business.
    """
    group, ep, r = ep_mesh.get_group("ep"), ep_mesh.size(1), ep_mesh.get_local_rank("ep")
    dp = ep_mesh.size()
    for moe in _moe_modules(model):
        ex = moe.experts
        E = ex.gate_proj.shape[0]
        if E % ep:
            raise ValueError(f"expert parallelism: ep={ep} must divide the {E} routed experts")
        lo, hi = r * E // ep, (r + 1) * E // ep
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(ex, name)
            setattr(ex, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        ex.forward = lambda x, counts, impl="auto", _ex=ex: _ep_forward(_ex, group, x, counts, impl)
        ex._r1lab_ep = (ep, r, dp)
        ex._r1lab_ep_mesh = ep_mesh["ep"]
    return model


def all_reduce_expert_load(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's `expert_load` over the data-parallel ranks (collective).

    Call it before `model.update_router_bias(gamma)`: the aux-loss-free bias is a buffer FSDP does not
    synchronise, and it must move by the load of the global batch, identically on every rank.
    """
    for m in _moe_modules(model):
        dist.all_reduce(m.expert_load, group=group)


def _moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _ep_experts(model: nn.Module) -> dict[str, Experts]:
    """Qualified name prefix ("model.layers.1.mlp.experts.") -> expert-parallel Experts module."""
    return {name + ".": m for name, m in model.named_modules() if getattr(m, "_r1lab_ep", None) is not None}


# ---------------------------------------------------------------------- FSDP2
def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, ep_mesh: DeviceMesh | None = None,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> Transformer:
    """FSDP2: `fully_shard` every decoder block (and MTP block), then the root (embedding, head, norms).

    Precision (the README's one policy): parameters stay fp32 (the sharded fp32 copy is the master the
    optimizer updates); on CUDA they are all-gathered in bf16 for compute and gradients are reduced in fp32.
    On the CPU (gloo) everything is fp32. `param_dtype` overrides the all-gather dtype.
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


# ---------------------------------------------------------------------- data
class ShardedSampler:
    """Indices 0..n-1 dealt to ranks: rank r gets r, r + world, r + 2 world, ... of a (seeded) permutation.

    Every rank sees n // world items per epoch (the tail that does not divide is dropped, so all ranks take the
    same number of steps). `set_epoch(e)` reshuffles with seed + e, identically on every rank.
    """

    def __init__(self, n: int, rank: int, world: int, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"ShardedSampler: rank {rank} outside 0..{world - 1}")
        self.n, self.rank, self.world, self.shuffle, self.seed, self.epoch = n, rank, world, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        order = order[: len(self) * self.world]
        return iter(order[self.rank::self.world])


# ---------------------------------------------------------------------- checkpoints and export
_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _expert_keys(model: nn.Module) -> dict[str, Experts]:
    return {prefix + w: ex for prefix, ex in _ep_experts(model).items() for w in _EXPERT_WEIGHTS}


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """The whole model's state dict, unsharded (collective: call it on every rank).

    cpu_offload (default): rank 0 gets CPU tensors and the other ranks an empty dict, so no GPU ever holds the
    whole model; without it every rank gets the full tensors on its device. FSDP's shards are gathered by
    torch's `get_model_state_dict`, expert-parallel slices by an all-gather over their EP group, one layer at a
    time. Export to the HF layout from a sharded run: `model_1 = Transformer(cfg)` on rank 0,
    `model_1.load_state_dict(full_state_dict(model))`, `r1lab.save_pretrained(model_1, dir)`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    keep = not cpu_offload or dist.get_rank() == 0
    for key, ex in _expert_keys(model).items():
        t = getattr(ex, key.rsplit(".", 1)[1]).detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t  # this EP rank's experts, gathered over edp
        parts = [torch.empty_like(t) for _ in range(ex._r1lab_ep[0])]
        dist.all_gather(parts, t.contiguous(), group=ex._r1lab_ep_mesh.get_group())
        if keep:
            sd[key] = torch.cat(parts).cpu() if cpu_offload else torch.cat(parts)
    return sd


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"model": ..., "optim": ...} for `torch.distributed.checkpoint.save/load`, resumable on any world size.

    FSDP parameters are DTensors already; expert-parallel slices (plain tensors, different on every EP rank)
    and their AdamW moments are presented as DTensors sharded on dim 0 over the EP mesh, so DCP knows their
    global shape and reshards them to any world size (a plain one-process model included). After `dcp.load`
    call `load_checkpoint_state(model, optimizer, state)`, which copies them back. Not yet supported: EP with
    ep < world size (experts also sharded by FSDP over edp).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from torch.distributed.tensor import DTensor, Shard

    msd, osd = get_state_dict(model, optimizer) if optimizer is not None else (get_model_state_dict(model), None)
    for key, ex in _expert_keys(model).items():
        if ex._r1lab_ep[2] != ex._r1lab_ep[0]:
            raise NotImplementedError("checkpoints of expert parallelism with experts also sharded by FSDP "
                                      "(ep < world size) are not supported yet; use ep = world size")

        def wrap(t):
            if not torch.is_tensor(t) or not t.dim():  # AdamW's step count: the same on every rank
                return t
            if isinstance(t, DTensor):  # FSDP's unit over a 1-rank "edp" mesh: the local tensor is the slice
                t = t.to_local()
            return DTensor.from_local(t, ex._r1lab_ep_mesh, [Shard(0)], run_check=False)
        msd[key] = wrap(msd[key])
        if osd is not None and key in osd["state"]:
            osd["state"][key] = {k: wrap(v) for k, v in osd["state"][key].items()}
    return {"model": msd, "optim": osd} if osd is not None else {"model": msd}


def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Put a `checkpoint_state` dict that `dcp.load` filled back into the model (and optimizer)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

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
