"""Distributed vs single process, on the CPU: gloo, 2 processes (4 for one checkpoint) on the loopback interface.

Every test spawns its ranks with torch.multiprocessing (bounded by a deadline; the processes are killed when it
passes), the ranks write their results with torch.save, and the parent compares them with one process.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from r1lab.model.config import get_preset
from r1lab.model.transformer import Transformer

WORLD = 2
DEADLINE_S = 120


# ---------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    torch.set_num_threads(1)
    from r1lab.parallel import init_distributed

    assert init_distributed(timeout_s=60) == (rank, world, torch.device("cpu"))  # gloo on the CPU
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown, where a gloo worker thread still being destroyed has
    # occasionally aborted the process ("terminate called without an active exception") after a test passed.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = DEADLINE_S) -> None:
    """Run fn(rank, world, *args) on `world` spawned processes in one gloo group; fail after `timeout` s."""
    ctx = mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed test did not finish in {timeout:.0f} s")


# ---------------------------------------------------------------------- shared setup
def small_cfg():
    # tiny (2 MoE layers of 8 experts, top-2 within 2 of 4 groups, 1 shared) with a small vocabulary and no MTP,
    # so that a few training steps take well under a second per process
    return get_preset("tiny").replace(vocab_size=256, num_nextn_predict_layers=0)


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_cfg()).init_weights(seed=seed)


def make_data(n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, small_cfg().vocab_size, (n, seq + 1), generator=torch.Generator().manual_seed(1))


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def make_opt(model, kind: str):
    # SGD for the training test: its update is proportional to the gradient, so a wrong gradient scale (e.g.
    # experts summed instead of averaged over ranks) shows in the loss; AdamW (scale-invariant) for the
    # checkpoint test, whose point is resharding the optimizer's moments and step count.
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)


def reference_losses(steps: int, opt_kind: str, return_model: bool = False):
    """One process, the whole batch: the losses the distributed runs must reproduce."""
    torch.set_num_threads(1)
    model, data = make_model(), make_data()
    opt = make_opt(model, opt_kind)
    out = []
    for _ in range(steps):
        loss = loss_of(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return (out, model) if return_model else out


# ---------------------------------------------------------------------- expert-parallel MoE layer
def _ep_layer_worker(rank, world, out_dir):
    from r1lab.parallel import apply_expert_parallel, make_meshes

    moe = make_model().model.layers[1].mlp
    x_all, w_all = _ep_inputs()
    x = x_all[rank].clone().requires_grad_()  # this rank's half of the batch
    _, ep_mesh = make_meshes(ep=world, device_type="cpu")
    apply_expert_parallel(moe, ep_mesh)
    y = moe(x)
    (y * w_all[rank]).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    for n, g in grads.items():
        if not n.startswith("experts."):  # replicated weights: each rank holds its tokens' part of the gradient
            dist.all_reduce(g)
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads}, f"{out_dir}/{rank}.pt")


def _ep_inputs():
    cfg = small_cfg()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(WORLD, 3, 16, cfg.hidden_size, generator=g)  # (rank, B, S, D)
    return x, torch.randn(x.shape, generator=g)


def test_expert_parallel_moe_equals_local(tmp_path):
    run_ranks(_ep_layer_worker, WORLD, str(tmp_path))
    moe = make_model().model.layers[1].mlp
    x_all, w_all = _ep_inputs()
    x = x_all.clone().requires_grad_()
    y = moe(x.flatten(0, 1))  # all 96 tokens on one process
    (y * w_all.flatten(0, 1)).sum().backward()
    outs = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    # fp32: the same per-row arithmetic on both sides; only the GEMM blocking (rows per call differ) and the
    # order in which weight gradients sum over the 96 x 2 rows change, each a few ulps of fp32 (eps 1.2e-7) on
    # values of order 1-100: 1e-5 relative/absolute is ~100 ulps of slack and would catch any misrouted row.
    tol = dict(rtol=1e-5, atol=1e-5)
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["y"], y.detach().view_as(x_all)[r], **tol)
        torch.testing.assert_close(o["x_grad"], x.grad[r], **tol)
    e_local = moe.n_experts // WORLD
    for n, p in moe.named_parameters():
        if n.startswith("experts."):
            got = torch.cat([o["grads"][n] for o in outs])  # rank r holds experts r*E/2 ...
            assert outs[0]["grads"][n].shape[0] == e_local
        else:
            got = outs[0]["grads"][n]
        torch.testing.assert_close(got, p.grad, **tol, msg=f"gradient of {n}")


# ---------------------------------------------------------------------- FSDP (and FSDP + EP) training
def _train_worker(rank, world, out_dir, ep, ac, steps):
    from r1lab.parallel import (all_reduce_expert_load, apply_activation_checkpointing, apply_expert_parallel,
                                apply_fsdp, full_state_dict, make_meshes, shard)

    model, data = make_model(), make_data()
    dp_mesh, ep_mesh = make_meshes(ep=ep, device_type="cpu")
    if ep > 1:
        apply_expert_parallel(model, ep_mesh)
    if ac:  # before FSDP, as torchtitan does; the recomputation repeats the all-to-alls on every rank alike
        apply_activation_checkpointing(model)
    apply_fsdp(model, dp_mesh, ep_mesh)
    opt = make_opt(model, "sgd")
    batch = data[shard(range(len(data)), rank, world)]
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # equal token counts per rank: the mean of the ranks' means is the global mean
        losses.append(mean.item() / world)
    torch.save(losses, f"{out_dir}/{rank}.pt")
    all_reduce_expert_load(model)  # what the trainer must do before update_router_bias
    sd = full_state_dict(model)  # collective: every rank takes part
    if rank == 0:
        torch.save({"sd": sd, "load": model.expert_load()}, f"{out_dir}/full.pt")


@pytest.mark.parametrize("ep,ac", [(1, False), (2, False), (2, True)], ids=["fsdp", "fsdp+ep", "fsdp+ep+ac"])
def test_fsdp_training_matches_one_process(tmp_path, ep, ac):
    steps = 4
    run_ranks(_train_worker, WORLD, str(tmp_path), ep, ac, steps)
    ref, ref_model = reference_losses(steps, "sgd", return_model=True)
    got = torch.load(tmp_path / "0.pt")
    # fp32 throughout. The sharded run sums gradients in another order (per-rank partial sums, then the
    # reduce-scatter), ~1e-7 relative per gradient; observed loss differences are ~1e-7 relative after 4 steps.
    # 2e-5 leaves 100x room, yet doubling the experts' gradients (summed, not averaged, over the 2 ranks) moves
    # the step-2..4 losses by 2e-4 .. 1.2e-3 relative, which this bound catches.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-5, atol=0)
    assert ref[-1] < ref[0]  # it trains
    # export: the sharded (and expert-split) weights gathered into one state dict equal the one-process model's
    # (fp32 weights after 4 SGD steps: differences ~1e-7 of summation order, scaled by lr 0.5)
    saved, want = torch.load(tmp_path / "full.pt"), ref_model.state_dict()
    full = saved["sd"]
    assert full.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(full[k], want[k], rtol=1e-5, atol=1e-6, msg=f"exported {k}")
    # tokens per expert summed over ranks (and counted once under activation checkpointing): exact counts
    torch.testing.assert_close(saved["load"], ref_model.expert_load(), rtol=0, atol=0)


# ---------------------------------------------------------------------- distributed checkpoints
def _dcp_worker(rank, world, ckpt_dir, out_dir, mode, steps):
    """mode 'save': train `steps` from scratch and save; 'load': load, then train `steps` more."""
    import torch.distributed.checkpoint as dcp

    from r1lab.parallel import (apply_expert_parallel, apply_fsdp, checkpoint_state, load_checkpoint_state,
                                make_meshes, shard)

    model, data = make_model(seed=0 if mode == "save" else 123), make_data()  # 'load' starts from other weights
    if world > 1:  # FSDP + expert parallelism over 2 ranks (on 4, each expert also FSDP-sharded over its 2
        # replicas); the 1-rank side is a plain model
        dp_mesh, ep_mesh = make_meshes(ep=2, device_type="cpu")
        apply_expert_parallel(model, ep_mesh)
        apply_fsdp(model, dp_mesh, ep_mesh)
    opt = make_opt(model, "adamw")
    if mode == "load":
        state = checkpoint_state(model, opt)
        dcp.load(state, checkpoint_id=ckpt_dir)
        load_checkpoint_state(model, opt, state)
    batch = data[shard(range(len(data)), rank, world)]
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if mode == "save":
        dcp.save(checkpoint_state(model, opt), checkpoint_id=ckpt_dir)
    torch.save(losses, f"{out_dir}/{mode}-{rank}.pt")


@pytest.mark.parametrize("save_world,load_world", [(2, 1), (1, 2), (4, 2)], ids=["2to1", "1to2", "4to2"])
def test_dcp_checkpoint_resumes_on_other_world_size(tmp_path, save_world, load_world):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(_dcp_worker, save_world, ckpt, str(tmp_path), "save", 2)
    run_ranks(_dcp_worker, load_world, ckpt, str(tmp_path), "load", 2)
    ref = reference_losses(4, "adamw")
    got = torch.load(tmp_path / "save-0.pt") + torch.load(tmp_path / "load-0.pt")
    # as the training test: fp32, only summation order differs (observed ~1e-7). Resuming must carry the
    # weights (the loading run starts from other ones) *and* the AdamW state: fresh moments and step count
    # change the 4th loss by 7%.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-5, atol=0)


def test_shard_deals_a_batch_to_ranks():
    from r1lab.parallel import shard

    shards = [shard(list(range(12)), r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]  # disjoint, together the whole batch
    assert shard(range(4), 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        shard(list(range(10)), 0, 3)  # unequal shares would leave ranks waiting for each other
