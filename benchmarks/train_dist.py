"""Multi-GPU training throughput: r1lab's own Trainer under FSDP2 (+ expert parallelism), one torchrun per config.

    python benchmarks/train_dist.py --out OUT                  # all GPUs of this machine (2 H200: ~3-6 min)
    python benchmarks/train_dist.py --out OUT --configs moe1b-ep2,v2lite12-ep2 --steps 8
    python benchmarks/train_dist.py --out OUT --device cpu --preset-override tiny --steps 2 --seq-len 64 \\
        --micro-batch 2                                         # CPU smoke test (gloo, 2 processes)

Run it with plain `python`: it is a launcher that starts one `torchrun --standalone --nproc-per-node N` per
configuration (N = --nproc, default every visible GPU), so an OOM, a crash or a hang in one configuration costs
only that configuration, and each starts on empty GPUs. (Started under torchrun itself, local rank 0 becomes the
launcher and the other ranks exit.) Each finished configuration is appended at once as one JSON line to
OUT/train_dist.jsonl and printed; per-step records, logs and worker outputs are kept in OUT/train_dist-<time>/.

What each worker does: every rank builds the same randomly initialised fp32 model (`init_weights(seed=0)`) on its
GPU and a `Sequences` of random tokens in memory (rows of seq_len + 1 tokens, one document per row, loss on every
position, plain causal attention), then hands both to `r1lab.train.loop.Trainer` exactly as `r1lab pretrain`
does under torchrun: `parallel.parallelize` applies expert parallelism (`parallel.ep`), activation checkpointing
when asked and FSDP2 (`fully_shard` per block, bf16 compute, fp32 gradient reduction, the fp32 shards being the
master weights), then fused AdamW (lr 1e-4 constant, clipping at 1.0), the aux-loss-free router-bias update every
step; no MTP or balance loss, no checkpoints, no export (`Trainer.train_step` is called directly, as
benchmarks/train.py does). Each rank takes micro_batch rows of every step (global batch = micro_batch x N).
Timing is the Trainer's own: `train_step` returns the step's wall time (ending with a device synchronisation),
tokens/s over all ranks and MFU per GPU (tokens/s x train_flops_per_token / (peak x N); peak = 989 TFLOP/s dense
bf16 for H100/H200, --peak-tflops otherwise); these are the numbers `r1lab pretrain` writes to metrics.jsonl.
Reported per configuration: the medians over steps 4..end (steps 1-3 warm up: cuBLAS/NCCL initialisation,
AdamW state allocation, compilation) of tokens/s per GPU, MFU and step time; MFU also by torchtitan's convention:
  mfu              the standard formula (`train_flops_per_token`): 6 x the matmul weights a token passes through
                   (active experts, output head; not the input embedding) + causal attention 3 x L x H x (dqk + dv)
                   x S, against the dense bf16 peak.
  mfu_torchtitan   torchtitan's: 6 x (active parameters - input embedding) + 12 x L x H x (hidden/H) x S
                   (attention counted as non-causal). The anchor, torchtitan's DeepSeek-V2-Lite (27 layers,
                   seq 4096) on 8 H100s, ~20.5% MFU at ~11.6k tokens/s/GPU, is in this convention (0.205 x 989e12
                   / 11.6e3 = 17.5 GFLOP/token; its formula gives 17.4 for that model).
Also peak memory (GB = 2^30 bytes; max_memory_allocated, max over ranks; the process's peak RSS on the CPU), the
per-step times, losses (~ln(vocab) for random tokens) and the router's max/mean expert load of the last step.

Configurations (--configs; default the first four, in this order):
  moe1b-ep2          bench-moe-1b (880M total / 378M active), FSDP + EP=2, seq 4096, 8 rows per GPU, 12 steps
  moe1b-fsdp         the same with EP=1: FSDP shards the experts with everything else
  v2lite12-ep2       DeepSeek-V2-Lite's widths (hidden 2048, 16 heads, MLA kv_lora 512 without q compression,
                     64 routed experts of 1408 top-6 + 2 shared, softmax routing, vocab 102400) with 12 of its 27
                     layers (--v2-layers): 6.93B total / 1.41B active parameters, whose fp32 weights + gradients
                     + AdamW (16 B/param) take ~52 GB per GPU on 2 GPUs; the full 27 layers (15.7B, 234 GB) do not
                     fit 2 x 141 GB with activations. FSDP + EP=2, seq 4096, 4 rows per GPU, 10 steps.
  moe1b-ep2-compile  moe1b-ep2 with train.compile = true (each block compiled, then FSDP), 16 steps; may fail
                     or run out of time: that is reported and the others are kept.
  extras: v2lite12-fsdp (EP=1), v2lite12-ep2-compile; `all` selects every configuration.
Memory (estimated from the saved activations of one layer on the CPU, ~2.7 MB/token for bench-moe-1b and
~4 MB/token for the V2-Lite shape, logits included): ~90 GB and ~115 GB per GPU. On an out-of-memory error the
launcher retries the configuration with half the rows per GPU (then, at 1, with activation checkpointing) while
the time budget allows; the line records every attempt.
Time: each configuration has a wall-clock cap (150 s for bench-moe-1b, 200 s for the V2-Lite shape, 240 s
compiled) inside a global budget (--budget-s, default 540 s); a worker stops stepping 25 s before its cap and
reports the steps it made; a configuration that would start with less than 60 s left is skipped (and reported).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

# V2-Lite's routing and attention (what `deepseek-v2-lite` differs in from a V3-style preset); with
# --preset-override the V2-Lite configurations apply these to the override preset so the smoke test takes the
# same code paths.
V2_FEATURES = dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy", scoring_func="softmax",
                   norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1, n_shared_experts=2,
                   num_nextn_predict_layers=0)

# name: preset, model overrides, EP, compile, rows per GPU, steps, wall-clock cap (s), description
CONFIGS = {
    "moe1b-ep2": dict(preset="bench-moe-1b", ep=2, micro_batch=8, steps=12, cap_s=150,
                      desc="bench-moe-1b, FSDP + EP=2"),
    "moe1b-fsdp": dict(preset="bench-moe-1b", ep=1, micro_batch=8, steps=12, cap_s=150,
                       desc="bench-moe-1b, FSDP only (EP=1)"),
    "v2lite12-ep2": dict(preset="deepseek-v2-lite", v2_layers=True, ep=2, micro_batch=4, steps=10, cap_s=200,
                         desc="DeepSeek-V2-Lite shape (12 of 27 layers), FSDP + EP=2"),
    "moe1b-ep2-compile": dict(preset="bench-moe-1b", ep=2, compile=True, micro_batch=8, steps=16, cap_s=240,
                              desc="bench-moe-1b, FSDP + EP=2, torch.compile"),
    "v2lite12-fsdp": dict(preset="deepseek-v2-lite", v2_layers=True, ep=1, micro_batch=4, steps=10, cap_s=200,
                          desc="DeepSeek-V2-Lite shape (12 of 27 layers), FSDP only (EP=1)"),
    "v2lite12-ep2-compile": dict(preset="deepseek-v2-lite", v2_layers=True, ep=2, compile=True, micro_batch=4,
                                 steps=14, cap_s=300,
                                 desc="DeepSeek-V2-Lite shape (12 of 27 layers), FSDP + EP=2, torch.compile"),
}
DEFAULT_CONFIGS = ["moe1b-ep2", "moe1b-fsdp", "v2lite12-ep2", "moe1b-ep2-compile"]
WARMUP = 3  # steps left out of the medians (steps 4..end are measured)
STOP_MARGIN_S = 25.0  # a worker stops stepping this long before its configuration's cap
MIN_START_S = 60.0  # a configuration is not started with less time than this left in the budget
TEARDOWN_GRACE_S = 30.0  # after the result is written, time allowed for the process group's teardown


# ====================================================================== shared: the summary of step records
def summarize(records: list[dict], world: int, peak: float | None, fpt: dict[str, float]) -> dict:
    """Medians over steps 4..end (over the last steps when there are fewer than 5) of a worker's step records."""
    if not records:
        return {"steps_done": 0}
    skip = min(WARMUP, len(records) - 1)
    meas = records[skip:]
    step_s = statistics.median(r["step_time_s"] for r in meas)
    tps = statistics.median(r["tokens_per_s"] for r in meas) / world
    out = {"steps_done": len(records), "measured_steps": [meas[0]["step"], meas[-1]["step"]],
           "tokens_per_s_per_gpu": tps, "step_time_s": step_s,
           "tokens_per_s_per_gpu_mean": sum(r["tokens_per_s"] for r in meas) / len(meas) / world}
    for key, flops in fpt.items():  # MFU of the median tokens/s, one per FLOP convention
        out[key] = tps * flops / peak if peak else None
    out["step_times_s"] = [round(r["step_time_s"], 4) for r in records]
    out["tokens_per_s_per_gpu_steps"] = [round(r["tokens_per_s"] / world, 1) for r in records]
    out["losses"] = [round(r["loss"], 4) for r in records]
    out["grad_norms"] = [round(r["grad_norm"], 4) for r in records]
    moe = [x for x in records[-1].get("moe_max_over_mean") or [] if x is not None]
    if moe:
        out["moe_max_over_mean_last_step"] = {"mean": round(sum(moe) / len(moe), 3), "max": max(moe)}
    if any(r.get("skipped") for r in records):
        out["nonfinite_steps"] = [r["step"] for r in records if r.get("skipped")]
    return out


# ====================================================================== worker (one torchrun per configuration)
def flop_conventions(cfg, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by the two conventions of the module docstring, keyed by their MFU's name."""
    from r1lab.train.loop import train_flops_per_token

    act = cfg.num_params(active=True)
    emb = cfg.vocab_size * cfg.hidden_size
    return {"mfu": train_flops_per_token(cfg, seq_len),
            "mfu_torchtitan": 6.0 * (act - emb) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len}


def model_config(spec: dict):
    from r1lab.model.config import get_preset

    cfg = get_preset(spec["preset"])
    return cfg.replace(**spec["model"]) if spec["model"] else cfg


def worker(spec: dict) -> None:
    import torch

    from r1lab import parallel

    rank, world, device = parallel.init_distributed(spec["device"], timeout_s=300.0)
    files = Path(spec["files"])
    tag = f"{spec['name']}.a{spec['attempt']}"
    (files / "pids" / f"{tag}.rank{rank}").write_text(str(os.getpid()))
    try:
        result = run_config(spec, rank, world, device, files / "steps" / f"{tag}.jsonl")
        if rank == 0:
            tmp = files / "results" / f"{tag}.json.tmp"
            tmp.write_text(json.dumps(result))
            tmp.rename(files / "results" / f"{tag}.json")
        if world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 (OOM, NCCL errors, compile failures, ...): record, then die fast
        text = f"{type(e).__name__}: {e}"
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower()
        err = {"rank": rank, "error": text[:2000], "oom": oom, "traceback": traceback.format_exc()[-6000:]}
        (files / "results" / f"{tag}.rank{rank}.error.json").write_text(json.dumps(err))
        print(f"[rank {rank}] {spec['name']} FAILED: {text[:1000]}", flush=True)
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # torchrun then stops the other ranks (which may wait in a collective)


def run_config(spec: dict, rank: int, world: int, device, steps_path: Path) -> dict:
    import torch

    from r1lab import Transformer
    from r1lab.data import Sequences
    from r1lab.train.loop import Trainer, peak_memory_gb
    from r1lab.train.recipe import Recipe

    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    main = rank == 0
    cfg = model_config(spec)
    S, mb, steps = spec["seq_len"], spec["micro_batch"], spec["steps"]
    if S > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {S} > max_position_embeddings {cfg.max_position_embeddings} of {spec['preset']}")
    dtype = torch.bfloat16 if cuda else torch.float32

    r = Recipe.defaults("pretrain")
    r.run.device, r.run.dtype = device.type, "bfloat16" if cuda else "float32"
    r.run.out = str(Path(spec["files"]) / "unused-run-dir" / spec["name"])  # train_step writes nothing there
    r.model.preset = spec["preset"]
    r.train.batch_size, r.train.steps = mb * world, steps
    r.train.compile, r.train.activation_checkpointing = spec["compile"], spec["ac"]
    r.train.on_nonfinite = "skip"
    r.data.seq_len, r.data.attention = S, "causal"
    r.optim.lr, r.optim.warmup_steps, r.optim.schedule = 1e-4, 0, "constant"
    r.moe.mtp_weight, r.moe.balance_alpha = 0.0, 0.0
    r.parallel.ep = spec["ep"]
    r.ckpt.every, r.ckpt.export = 0, False
    r.log.tensorboard, r.log.peak_tflops = False, spec["peak_tflops"]

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).init_weights(seed=0)  # the same full fp32 model on every rank

    # Random tokens, identical on every rank (the Trainer gives each rank its rows of every step). Enough rows
    # for min(steps, 4) distinct steps; the Trainer's batch order runs on over epochs after that.
    g = torch.Generator().manual_seed(1)
    n_rows = mb * world * min(steps, 4)
    tokens = torch.randint(0, cfg.vocab_size, (n_rows, S + 1), generator=g, dtype=torch.int32)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    data = Sequences(tokens, starts, torch.ones_like(starts))

    trainer = Trainer(r, model, data, kind="pretrain", dtype=dtype, quiet=True)
    del model
    init_peak = peak_memory_gb(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    init_s = time.perf_counter() - t_start

    act = cfg.num_params(active=True)
    fpt = flop_conventions(cfg, S)
    fpt["mfu"] = trainer.flops_per_token  # (the same number: no MTP loss here)
    peak = trainer.peak
    if main:
        print(f"[{spec['name']}] {world} x {device.type}: {cfg.num_hidden_layers} layers, "
              f"{cfg.num_params() / 1e9:.2f}B total / {act / 1e9:.2f}B active, ep {spec['ep']}, "
              f"{mb} x {S} tokens per rank, compile {spec['compile']}, checkpointing {spec['ac']}; "
              f"init {init_s:.1f} s, peak memory so far {init_peak:.1f} GB", flush=True)

    records: list[dict] = []
    stop_at = spec["stop_at"]  # wall-clock (time.time) after which no new step starts
    with open(steps_path if main else os.devnull, "a") as sf:
        for i in range(steps):
            rec = trainer.train_step(trainer.next_batches())
            trainer.step += 1
            rec = {"step": trainer.step, **rec}
            records.append(rec)
            if main:
                sf.write(json.dumps(rec) + "\n")
                sf.flush()
                mfu = f", MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
                print(f"[{spec['name']}] step {rec['step']}/{steps}: loss {rec['loss']:.4f}, "
                      f"{rec['step_time_s']:.3f} s, {rec['tokens_per_s'] / world:,.0f} tokens/s/GPU{mfu}, "
                      f"peak {rec['peak_mem_gb']:.1f} GB", flush=True)
            late = torch.tensor(float(time.time() > stop_at), device=device)
            if world > 1:  # all ranks stop after the same step
                torch.distributed.all_reduce(late, op=torch.distributed.ReduceOp.MAX)
            if late.item() and i + 1 < steps:
                if main:
                    print(f"[{spec['name']}] time cap: stopping after step {rec['step']}", flush=True)
                break

    mem = torch.tensor([peak_memory_gb(device),
                        torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0], device=device)
    mem0 = mem.tolist()
    if world > 1:
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    summary = summarize(records, world, peak, fpt)
    res = {
        "config": spec["name"], "status": "ok" if len(records) == steps else "partial (time cap)",
        "description": spec["desc"], **{k: summary.pop(k) for k in ("tokens_per_s_per_gpu", "mfu") if k in summary},
        "peak_mem_gb": mem[0].item(), "peak_mem_gb_rank0": mem0[0], "peak_reserved_gb": mem[1].item() if cuda else None,
        **summary,
        "world": world, "ep": spec["ep"], "fsdp": world > 1, "compile": spec["compile"],
        "activation_checkpointing": spec["ac"], "seq_len": S, "micro_batch_per_gpu": mb, "global_batch": mb * world,
        "tokens_per_step": mb * world * S, "steps": steps,
        "preset": spec["preset"], "model_overrides": spec["model"], "layers": cfg.num_hidden_layers,
        "params_total": cfg.num_params(), "params_active": act,
        "state_gb_per_gpu_est": 16 * cfg.num_params() / world / 2**30,  # fp32 weights + grads + AdamW, sharded
        "flops_per_token": fpt, "peak_tflops": peak / 1e12 if peak else None,
        "init_s": init_s, "peak_mem_gb_init": init_peak, "wall_s": time.perf_counter() - t_start,
        "device": _safe(lambda: torch.cuda.get_device_name(device)) if cuda else "cpu", "torch": torch.__version__,
        "nccl": _safe(lambda: ".".join(map(str, torch.cuda.nccl.version()))) if cuda else None,
    }
    return res


def _safe(get):
    """A descriptive value, or its error as text: nothing after the timed steps may lose the measurement."""
    try:
        return get()
    except Exception as e:  # noqa: BLE001
        return f"? ({type(e).__name__}: {e})"


# ====================================================================== launcher
def resolve(name: str, args, nproc: int) -> dict:
    c = CONFIGS[name]
    model = {}
    if args.preset_override:
        preset = args.preset_override
        if c.get("v2_layers"):
            model.update(V2_FEATURES)
    else:
        preset = c["preset"]
        if c.get("v2_layers"):
            model["num_hidden_layers"] = args.v2_layers
    ep = c["ep"] if nproc % c["ep"] == 0 else 1
    desc = c["desc"].replace("12 of 27", f"{args.v2_layers} of 27") if not args.preset_override else \
        f"{c['desc']} [{preset} instead]"
    return {"name": name, "desc": desc, "preset": preset, "model": model, "ep": ep,
            "compile": bool(c.get("compile")), "ac": bool(args.activation_checkpointing),
            "micro_batch": args.micro_batch or c["micro_batch"], "seq_len": args.seq_len,
            "steps": args.steps or c["steps"], "device": args.device, "peak_tflops": args.peak_tflops,
            "cap_s": args.cap_s or c["cap_s"]}


def child_env() -> dict:
    """This environment without an outer torchrun's variables (so the nested torchrun starts its own group)."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
            "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation across steps
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _alive_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return HERE.name.encode() in cmd and b"--worker-spec" in cmd


def run_attempt(spec: dict, nproc: int, files: Path, deadline: float) -> tuple[dict | None, list[dict], dict]:
    """One torchrun of one configuration. Returns (result or None, error records, attempt info)."""
    tag = f"{spec['name']}.a{spec['attempt']}"
    t0 = time.time()
    hard = min(t0 + spec["cap_s"], deadline)
    spec = {**spec, "files": str(files), "stop_at": hard - STOP_MARGIN_S}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE), "--worker-spec", json.dumps(spec)]
    log = open(files / "logs" / f"{tag}.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            try:
                log.write(line)
                log.flush()
            except ValueError:  # the log was closed (a killed worker's last words)
                pass

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    result_path = files / "results" / f"{tag}.json"
    why, seen_result = None, None
    while proc.poll() is None:
        time.sleep(0.5)
        now = time.time()
        if seen_result is None and result_path.exists():
            seen_result = now
        if now > hard:
            why = "timeout"
        elif seen_result is not None and now - seen_result > TEARDOWN_GRACE_S:
            why = "teardown hang (result kept)"
        if why:
            print(f"[launcher] {spec['name']}: {why}; stopping torchrun (pid {proc.pid})", flush=True)
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers (SIGTERM, then SIGKILL after 30 s)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            break
    for pid_file in (files / "pids").glob(f"{tag}.rank*"):  # workers torchrun left behind, if any
        pid = int(pid_file.read_text())
        if _alive_worker(pid):
            print(f"[launcher] killing leftover worker pid {pid}", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    th.join(5)
    log.close()
    rc = proc.returncode
    errors = [json.loads(p.read_text()) for p in sorted((files / "results").glob(f"{tag}.rank*.error.json"))]
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    info = {"micro_batch_per_gpu": spec["micro_batch"], "activation_checkpointing": spec["ac"], "rc": rc,
            "wall_s": round(time.time() - t0, 1), "log": str((files / "logs" / f"{tag}.log").name)}
    if result is None:
        info["status"] = why or ("oom" if any(e["oom"] for e in errors) else "failed")
        if errors:  # the root cause first: an OOM over the other ranks' broken collectives
            info["error"] = sorted(errors, key=lambda e: not e["oom"])[0]["error"][:600]
    else:
        info["status"] = result["status"] if not why else f"{result['status']}; {why}"
    return result, errors, info


def partial_from_steps(spec: dict, files: Path, nproc: int) -> dict | None:
    """What a killed attempt managed: the summary of the step records rank 0 wrote as it went. (The launcher
    never touches the GPUs: the peak FLOP/s is read back from the records' MFU.)"""
    p = files / "steps" / f"{spec['name']}.a{spec['attempt']}.jsonl"
    recs = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
    if not recs:
        return None
    fpt = flop_conventions(model_config(spec), spec["seq_len"])
    last = recs[-1]
    peak = last["tokens_per_s"] * fpt["mfu"] / (last["mfu"] * nproc) if last.get("mfu") else None
    s = summarize(recs, nproc, peak, fpt)
    s["peak_mem_gb_rank0"] = max(r["peak_mem_gb"] for r in recs)
    return {**s, "world": nproc, "ep": spec["ep"], "compile": spec["compile"], "seq_len": spec["seq_len"],
            "micro_batch_per_gpu": spec["micro_batch"], "activation_checkpointing": spec["ac"],
            "flops_per_token": fpt, "peak_tflops": peak / 1e12 if peak else None}


def launch(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for the smoke test")
    if args.nproc:
        nproc = args.nproc
    elif os.environ.get("LOCAL_WORLD_SIZE"):  # started under torchrun: as many as it asked for
        nproc = int(os.environ["LOCAL_WORLD_SIZE"])
    else:
        nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    names = list(CONFIGS) if args.configs == ["all"] else args.configs
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown configuration {n!r}; choose from {', '.join(CONFIGS)} or all")
    out = Path(args.out)
    files = out / f"train_dist-{time.strftime('%Y%m%d-%H%M%S')}"
    for sub in ("logs", "steps", "results", "pids"):
        (files / sub).mkdir(parents=True, exist_ok=True)
    jsonl = out / "train_dist.jsonl"
    start = time.time()
    deadline = start + args.budget_s
    print(f"[launcher] {len(names)} configuration(s) on {nproc} x {args.device}: {', '.join(names)}; "
          f"budget {args.budget_s:.0f} s; results -> {jsonl}, logs -> {files}", flush=True)
    lines = []
    for name in names:
        spec = resolve(name, args, nproc)
        attempts, result, salvaged = [], None, None
        while True:
            left = deadline - time.time()
            if left < MIN_START_S:
                attempts.append({"status": f"skipped: {left:.0f} s left of the budget",
                                 "micro_batch_per_gpu": spec["micro_batch"]})
                break
            spec["attempt"] = len(attempts)
            print(f"[launcher] {name} (attempt {spec['attempt'] + 1}): {spec['micro_batch']} x {spec['seq_len']} "
                  f"tokens per GPU, checkpointing {spec['ac']}, cap {min(spec['cap_s'], left):.0f} s", flush=True)
            result, errors, info = run_attempt(spec, nproc, files, deadline)
            attempts.append(info)
            if result is not None:
                break
            partial = partial_from_steps(spec, files, nproc)  # the steps it made before it was killed or failed
            if partial is not None:
                status = ("partial (killed at the time cap)" if info["status"] == "timeout" else
                          f"partial ({info['status']} after step {partial['steps_done']})")
                salvaged = {"config": name, "status": status, "description": spec["desc"], **partial,
                            "error": info.get("error")}
            if info["status"] != "oom":
                break
            if spec["micro_batch"] > 1:  # out of memory: half the rows per GPU, then activation checkpointing
                spec["micro_batch"] //= 2
            elif not spec["ac"]:
                spec["ac"] = True
            else:
                break
            print(f"[launcher] {name}: out of memory; retrying with {spec['micro_batch']} rows per GPU, "
                  f"checkpointing {spec['ac']}", flush=True)
        if result is None and salvaged is not None:
            result = salvaged
        if result is None:
            last = attempts[-1]
            result = {"config": name, "status": last["status"], "description": spec["desc"],
                      "error": last.get("error"), "world": nproc, "ep": spec["ep"], "compile": spec["compile"],
                      "seq_len": spec["seq_len"], "micro_batch_per_gpu": spec["micro_batch"]}
        result["attempts"] = attempts
        result["launcher_elapsed_s"] = round(time.time() - start, 1)
        line = json.dumps(result)
        with open(jsonl, "a") as f:
            f.write(line + "\n")
        print(f"[launcher] RESULT {line}", flush=True)
        lines.append(result)

    print(f"\n[launcher] done in {time.time() - start:.0f} s; {jsonl}\n")
    table = ["| config | status | tokens/s/GPU | MFU (standard) | MFU (torchtitan) | step s | "
             "peak GB | rows x seq per GPU |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(x, f):
        return format(x, f) if isinstance(x, (int, float)) else "-"

    for r in lines:
        mem = r.get("peak_mem_gb", r.get("peak_mem_gb_rank0"))
        table.append(f"| {r['config']} | {r['status']} | {fmt(r.get('tokens_per_s_per_gpu'), ',.0f')} | "
                     f"{fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('mfu_torchtitan'), '.1%')} | {fmt(r.get('step_time_s'), '.3f')} | "
                     f"{fmt(mem, '.1f')} | {r.get('micro_batch_per_gpu', '-')} x {r.get('seq_len', '-')} |")
    print("\n".join(table))
    (out / "train_dist_summary.md").write_text("\n".join(table) + "\n")
    return 0 if all(r["status"].startswith(("ok", "partial")) for r in lines) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="train_dist_out", help="folder for train_dist.jsonl and the logs")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, run in this order (default: {','.join(DEFAULT_CONFIGS)}; "
                         f"all: every one of {','.join(CONFIGS)})")
    ap.add_argument("--steps", type=int, default=0, help="steps per configuration (default: its own, 10-16)")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default: 4096)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="rows per GPU per step (default: the configuration's, 8 or 4)")
    ap.add_argument("--v2-layers", type=int, default=12, help="layers of the V2-Lite-shaped model (default: 12)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in every config")
    ap.add_argument("--preset-override", default="",
                    help="use this preset for every configuration (smoke tests: tiny); the V2-Lite ones apply "
                         "V2's routing and attention to it")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (NCCL) or cpu (gloo)")
    ap.add_argument("--nproc", type=int, default=0, help="processes per configuration (default: every GPU; 2 on cpu)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget for everything (default: 540 s, under a 10-minute limit)")
    ap.add_argument("--cap-s", type=float, default=0.0,
                    help="wall-clock cap per configuration (default: 150-240 s by configuration)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak dense bf16 TFLOP/s per GPU for MFU (default: known GPUs, H100/H200 989)")
    ap.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_spec is not None:
        worker(json.loads(args.worker_spec))
        return 0
    if "RANK" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":
        return 0  # started under torchrun: local rank 0 is the launcher, the others have nothing to do
    args.configs = [c.strip() for c in args.configs.replace(" ", ",").split(",") if c.strip()]
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
