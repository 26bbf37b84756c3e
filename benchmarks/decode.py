"""Decode throughput: r1lab's Engine against transformers' generate on the same bf16 weights, same run.

    python benchmarks/decode.py --preset bench-moe-1b --batches 1 32 256 --out decode.json

Greedy, random prompts of --prompt-len tokens, --new-tokens generated (EOS ignored), random bf16 weights.
Prints tokens/s for both, the ratio, and for r1lab the decode-only step rate, the achieved weight bandwidth
(bytes of weights one step reads x steps/s, the gpt-fast way; routed experts counted by the expected number
of distinct experts a batch touches) and its fraction of the H200's measured 4.2 TB/s copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from r1lab import Engine, SamplingParams, Transformer, get_preset, save_pretrained

COPY_BW = 4.2e12  # bytes/s, device-to-device copy measured on the H200 (see benchmarks/LOG.md)


def weight_bytes_per_step(cfg, batch: int, elem: int = 2) -> float:
    """Bytes of weights a decode step of `batch` tokens reads: all dense weights + the lm_head + one embedding
    row per token + the routed experts the batch is expected to touch (uniform routing)."""
    D = cfg.hidden_size
    dense = cfg.num_params(active=True, embeddings=False)  # includes the K routed experts of one token
    expert = 3 * D * cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = E * (1 - (1 - K / E) ** batch)
    dense += n_moe * expert * (touched - K)
    return elem * (dense + cfg.vocab_size * D + batch * D)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256], help="batch sizes (default: 1 32 256)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: 64)")
    ap.add_argument("--new-tokens", type=int, default=256, help="generated tokens per sequence (default: 256)")
    ap.add_argument("--hf-new-tokens", type=int, default=None,
                    help="tokens for transformers' run (default: --new-tokens); its rate is per token either way")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step (then graph it)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = get_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).to(torch.bfloat16).eval()
    hf = None
    if not args.no_hf:
        import transformers
        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d, tokenizer=False)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": []}
    g = torch.Generator().manual_seed(0)
    for B in args.batches:
        prompts = torch.randint(0, cfg.vocab_size - 1, (B, args.prompt_len), generator=g)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        compiled = args.compile
        try:
            eng = Engine(model, max_batch=B, max_seq_len=args.prompt_len + args.new_tokens, compile=compiled)
            tc = time.perf_counter()
            eng.generate(prompts.tolist(), warm)  # compile, capture, and first calls at these shapes
            compile_s = time.perf_counter() - tc
        except Exception as e:  # report and fall back to the eager step, graphed
            print(f"compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            compiled, compile_s = False, None
            eng = Engine(model, max_batch=B, max_seq_len=args.prompt_len + args.new_tokens)
            eng.generate(prompts.tolist(), warm)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for p in prompts.tolist():
            eng.add_request(p, params)
        eng.step()  # admits (prefills) everything, then the first decode step
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        steps = 1
        while eng.has_work():
            eng.step()
            steps += 1
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ours_tps = B * args.new_tokens / (t2 - t0)
        step_rate = (steps - 1) / (t2 - t1)
        bw = weight_bytes_per_step(cfg, B) * step_rate
        cache_bytes = sum(c.numel() * c.element_size() for c in eng.cache)
        run = {"batch": B, "compiled": compiled, "warmup_s": compile_s, "r1lab_tokens_per_s": ours_tps, "r1lab_decode_steps_per_s": step_rate,
               "r1lab_prefill_s": t1 - t0, "r1lab_bandwidth_TBps": bw / 1e12, "bandwidth_fraction": bw / COPY_BW,
               "cache_bytes": cache_bytes,
               "cache_bytes_per_token": cache_bytes / (B * (args.prompt_len + args.new_tokens))}
        if hf is not None:
            n_hf = args.hf_new_tokens or args.new_tokens
            x = prompts.to(dev)
            with torch.no_grad():
                hf.generate(x, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = hf.generate(x, max_new_tokens=n_hf, min_new_tokens=n_hf, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
                torch.cuda.synchronize()
                hf_tps = B * n_hf / (time.perf_counter() - t0)
            run["transformers_tokens_per_s"] = hf_tps
            run["speedup"] = ours_tps / hf_tps
            # bf16 greedy paths drift apart eventually; report how many leading tokens agree (first sequence)
            ref = out[0, args.prompt_len:].tolist()
            ours = eng.generate(
                [prompts[0].tolist()], SamplingParams(temperature=0, max_tokens=len(ref), ignore_eos=True))[0].token_ids
            run["greedy_prefix_agreement_tokens"] = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        del eng
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
