"""Long context on the paged latent cache: a 128K-token prefill, and decode speed by context length and batch.

    python benchmarks/long_context.py --out long_context.json          # deepseek-v2-lite, random bf16 weights

1. Prefill: one prompt of --prefill-len tokens (default 131,072) through the engine (chunked prefill of
   --chunk tokens, each chunk attending to the pages before it), to its first token: seconds and peak memory
   (goal: <= 60 s on one H200).
2. Decode at each --contexts length (default 1000 8000 32000 128000) for each --batches size (default 1 32),
   where the pool fits in memory: random prompts of that length are prefilled (distinct pages: no sharing that
   would let the L2 cache serve repeated reads), then --steps decode steps are timed, with the torch attention
   path (pages gathered up to the block-table width) and with the paged Triton kernel (R1LAB_ATTN_KERNEL=1:
   each sequence reads its own length). Reported: tokens/s, ms per step, the latent-cache bytes one step reads
   (sum over sequences of positions x 576 x 2 bytes x layers), the weight bytes, and the achieved bandwidth as a
   fraction of the device-to-device copy bandwidth measured at the start (goal: >= 50% at 32K context, batch 32; FlashMLA publishes
   ~3,000 GB/s for memory-bound MLA decode on an H800).
3. --hf: transformers' generate on the same weights at --hf-contexts (batch 1): tokens/s of decoding (time of
   1 + n new tokens minus time of 1), where its expanded K/V cache fits.

Contexts are a little under powers of two (1000, not 1024) so that a sequence's pages plus the decoded ones
stay within the power-of-two block-table width the step is graphed at. --device cpu with a tiny --preset is a
dry run of the script: python benchmarks/long_context.py --device cpu --preset tiny --prefill-len 900
--contexts 300 --batches 1 2 --steps 4 --chunk 256
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from decode import copy_bandwidth, emitter, weight_bytes_per_step  # benchmarks/decode.py, beside this script
from r1lab import Engine, SamplingParams, Transformer, get_preset, save_pretrained
from r1lab.model import kernels


def prefill(model, cfg, L, chunk, g, gpu, sync, emit):
    """One prompt of L tokens through the engine, chunked, to its first token: seconds and peak memory."""
    eng = Engine(model, max_batch=1, max_seq_len=L + 64, cache_tokens=L + 256, prefill_tokens=chunk,
                 compile=False, cuda_graph=False)
    prompt = torch.randint(0, cfg.vocab_size - 1, (L,), generator=g).tolist()
    warm = torch.randint(0, cfg.vocab_size - 1, (chunk + 100,), generator=g).tolist()
    eng.generate([warm], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # first calls of kernels
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    sync()
    dt = time.perf_counter() - t0
    emit({"run": "prefill", "tokens": L, "chunk": chunk, "seconds": dt, "tokens_per_s": L / dt,
          "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if gpu else None})
    del eng
    if gpu:
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek-v2-lite", help="model preset (default: deepseek-v2-lite)")
    ap.add_argument("--prefill-len", type=int, default=131072,
                    help="tokens of the prefill run (default: 131072; 0 skips it)")
    ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk, tokens (default: 16384)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1000, 8000, 32000, 128000],
                    help="decode context lengths, tokens (default: 1000 8000 32000 128000)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes (default: 1 32)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run (default: 32)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (~30 s once; default: eager, graphed)")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate at --hf-contexts")
    ap.add_argument("--hf-contexts", type=int, nargs="+", default=[1000, 8000],
                    help="contexts for transformers, batch 1 (default: 1000 8000)")
    ap.add_argument("--memory-fraction", type=float, default=0.85,
                    help="skip decode runs whose pool would exceed this fraction of free memory (default: 0.85)")
    ap.add_argument("--attn-config", default=None, metavar="JSON",
                    help="launch parameters of the paged kernel, e.g. '{\"BT\": 64, \"num_warps\": 8}' (default: "
                         "kernels.PAGED_ATTN; benchmarks/paged_attention.py finds the fastest)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (default: cuda)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).to(dtype).eval()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    results = {"gpu": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
               "preset": args.preset, "cache_bytes_per_token": per_token, "runs": []}
    copy_bw = copy_bandwidth(dev)
    results["copy_bandwidth_TBps"] = copy_bw / 1e12
    print(f"device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s", flush=True)
    g = torch.Generator().manual_seed(0)

    emit = emitter(results, args.out)

    if args.attn_config:
        kernels.PAGED_ATTN.update(json.loads(args.attn_config))
    results["paged_attn"] = dict(kernels.PAGED_ATTN) if kernels.triton is not None else None
    if args.prefill_len:  # 1. one long prefill, to the first generated token
        prefill(model, cfg, args.prefill_len, args.chunk, g, gpu, sync, emit)

    # 2. decode by context and batch
    for ctx in args.contexts:
        for B in args.batches:
            # tokens each sequence may generate: while the others are prefilled (a step per chunk), then the
            # warm-up and timed steps of both attention paths
            new = -(-B * ctx // args.chunk) + B + 2 * (3 + args.steps) + 8
            tokens = B * (ctx + new + 128)
            if gpu and tokens * per_token > args.memory_fraction * torch.cuda.mem_get_info()[0]:
                emit({"run": "decode", "context": ctx, "batch": B, "skipped": f"pool of {tokens * per_token / 1e9:.0f} GB "
                      f"does not fit in {args.memory_fraction} of free memory"})
                continue
            eng = Engine(model, max_batch=B, max_seq_len=ctx + new + 64, cache_tokens=tokens + 64,
                         prefill_tokens=args.chunk, compile=args.compile)
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            for _ in range(B):
                eng.add_request(torch.randint(0, cfg.vocab_size - 1, (ctx,), generator=g).tolist(), params)
            t0 = time.perf_counter()
            while eng.waiting or eng._chunks:  # prefill everything (decoding those already running)
                eng.step()
            sync()
            prefill_s = time.perf_counter() - t0
            for kernel in ("0", "1"):
                os.environ["R1LAB_ATTN_KERNEL"] = kernel
                eng.reset_graphs()  # the attention path is read at capture
                for _ in range(3):  # capture (and compile) at this width, outside the timing
                    eng.step()
                sync()
                running = [s for s in eng.slots if s is not None]
                if len(running) < B:
                    emit({"run": "decode", "context": ctx, "batch": B, "skipped": "sequences finished early"})
                    break
                positions = sum(len(s.prompt) + len(s.tokens) for s in running)  # per step, at the start
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    eng.step()
                sync()
                dt = (time.perf_counter() - t0) / args.steps
                cache_bytes = (positions + B * args.steps / 2) * per_token  # the mean over the timed steps
                weights = weight_bytes_per_step(cfg, B, dtype.itemsize)
                emit({"run": "decode", "context": ctx, "batch": B, "attention": "kernel" if kernel == "1" else "torch",
                      "compiled": args.compile, "prefill_s": prefill_s, "ms_per_step": dt * 1e3,
                      "tokens_per_s": B / dt, "cache_GB_per_step": cache_bytes / 1e9,
                      "weight_GB_per_step": weights / 1e9, "achieved_TBps": (cache_bytes + weights) / dt / 1e12,
                      "cache_only_TBps": cache_bytes / dt / 1e12,
                      "copy_bandwidth_fraction": (cache_bytes + weights) / dt / copy_bw,
                      "longest_seq_pages": max(len(s.pages) for s in eng.slots if s is not None), "stats": {k: eng.stats[k] for k in (
                          "pages_used", "pages_total", "preemptions")}})
            os.environ.pop("R1LAB_ATTN_KERNEL", None)
            eng.abort([s for s in eng.slots if s is not None])
            del eng
            if gpu:
                torch.cuda.empty_cache()

    # 3. transformers on the same weights, where its expanded K/V cache fits
    if args.hf:
        import transformers

        transformers.logging.set_verbosity_error()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fast: a checkpoint of tens of GB
        with tempfile.TemporaryDirectory(dir=shm) as d:
            save_pretrained(model, d, tokenizer=False)
            del model
            if gpu:
                torch.cuda.empty_cache()
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
        n = 16
        for ctx in args.hf_contexts:
            x = torch.randint(0, cfg.vocab_size - 1, (1, ctx), generator=g).to(dev)
            try:
                with torch.no_grad():
                    times = []
                    for new in (1, 1, 1 + n):  # the first call warms up
                        sync()
                        t0 = time.perf_counter()
                        hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
                        sync()
                        times.append(time.perf_counter() - t0)
                emit({"run": "transformers", "context": ctx, "batch": 1, "prefill_s": times[1],
                      "tokens_per_s": n / (times[2] - times[1])})
            except torch.OutOfMemoryError:
                emit({"run": "transformers", "context": ctx, "batch": 1, "skipped": "out of memory"})
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
