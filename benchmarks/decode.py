"""Decode throughput: r1lab's Engine against transformers' generate on the same bf16 weights, same run.

    python benchmarks/decode.py --preset bench-moe-1b --batches 1 32 256 --compile --out decode.json
    python benchmarks/decode.py --device cpu --preset tiny --batches 1 2 --prompt-len 8 --new-tokens 8  # dry run

Greedy, random prompts of --prompt-len tokens, --new-tokens generated (EOS ignored), random bf16 weights.
Prints tokens/s for both, the ratio, and for r1lab the decode-only step rate, the achieved weight bandwidth
(bytes of weights one step reads x steps/s, the gpt-fast way; routed experts counted by the expected number
of distinct experts a batch touches) and its fraction of the H200's measured 4.2 TB/s copy bandwidth.

Transformers runs in two modes, side by side at each batch, each timed after a warm-up, each with its tokens/s
and the r1lab/transformers ratio ("speedup"):
  dynamic:          generate's default: a DynamicCache, eager.
  static_compiled:  generate(cache_implementation="static"): a StaticCache, and generate compiles its decode
                    forward itself (inductor, reduce-overhead = CUDA graphs); the warm-up, a full-length call at
                    the same shapes, holds the compile.
Printed once and written under "transformers": its version, the attention implementation that ran, the experts
implementation (and the one generate swaps in while decoding); per mode: the cache, whether it compiled and the
compile config, or the error of a mode that failed (the run goes on).
The engine runs at each batch with its cache "sized" to this benchmark's positions (the record transformers
joins), and with its "default" one, Engine(model, max_batch=B) as a user gets it: max_position_embeddings
positions per sequence and the page pool from free memory ("speedup_over_sized_cache").

Speculative decoding with the MTP module (random weights give a meaningless acceptance, so train first):

    python benchmarks/decode.py --preset bench-moe-1b --batches 1 32 --speculate 1 2 --train-steps 500 --no-hf

--train-steps N first pretrains the model N steps with the MTP loss (weight 0.3) on worked additions
("Question: What is 74 + 25?\nReasoning: Add 74 and 25 digit by digit ... Answer: 99", r1lab.tasks), and the
prompts become held-out questions of that kind, whose continuations (the reasoning, then further documents) the
model has learnt; or --model DIR loads a checkpoint trained with MTP. Each batch then runs speculate=0 and each
--speculate K in the same process: tokens/s, speedup over speculate=0, the draft's acceptance rate, tokens per
step, and how many leading greedy tokens agree with speculate=0 (bf16: the verify forward's other shapes round
differently, so long greedy paths may part; on the CPU in fp32 they are identical, tests/test_speculative.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time

import torch

from r1lab import Engine, SamplingParams, Transformer, get_preset, load_pretrained, load_tokenizer, save_pretrained
from r1lab.data import pretrain_sequences
from r1lab.tasks.synthetic import Addition
from r1lab.train.loop import Trainer
from r1lab.train.recipe import load_recipe

HF_MODES = ("dynamic", "static_compiled")  # transformers' default generate, and its fastest (time_transformers)
COPY_BW = 4.2e12  # bytes/s, device-to-device copy on the H200 (see benchmarks/LOG.md); used off the GPU


def seconds_per_call(fn, reps: int) -> float:
    """Mean seconds of `fn()` over `reps` calls, the GPU synchronised before and after (warm up first)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(device, gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), measured on `device` now: the
    denominator of every bandwidth fraction, so that a fraction means the same on an H100 and an H200."""
    if torch.device(device).type != "cuda":
        return COPY_BW
    n = int(gib * 2**30) // 2
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    copy = functools.partial(b.copy_, a)
    copy()
    bw = 2 * n * 2 / seconds_per_call(copy, reps)
    del a, b, copy
    torch.cuda.empty_cache()
    return bw


def emitter(results: dict, out: str | None):
    """emit(run): print the run as a JSON line, add it to results["runs"] and rewrite `out` (if given) with all of
    results, so that a benchmark cut short keeps what it measured."""
    def emit(run: dict) -> None:
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        if out:
            with open(out, "w") as f:
                json.dump(results, f, indent=2)
    return emit


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


def transformers_setup(hf) -> dict:
    """What transformers runs beside the engine: its version and the attention and experts implementations it
    chose, and the experts it decodes with (generate swaps grouped_mm for batched_mm on a GPU; asked of it)."""
    import transformers

    decode_experts = None
    if hasattr(hf, "_optimize_model_for_decode"):  # private, in 5.17 and 5.25: the swap generate makes
        with hf._optimize_model_for_decode():
            decode_experts = hf.config._experts_implementation
    return {"version": transformers.__version__, "attn_implementation": hf.config._attn_implementation,
            "experts_implementation": hf.config._experts_implementation,
            "decode_experts_implementation": decode_experts}


def time_transformers(hf, x, n: int, mode: str, sync) -> tuple[dict, list[int] | None]:
    """Greedy `generate` of exactly n tokens after each prompt of x in one of transformers' modes, timed after a
    warm-up: "dynamic", its default (a DynamicCache, eager), or "static_compiled", its fastest documented one (a
    StaticCache, and generate then compiles the decode forward itself: inductor, reduce-overhead = CUDA graphs).
    Returns the record (tokens/s and the mode's configuration, or the error) and the first sequence's tokens."""
    import transformers

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    if mode == "static_compiled":
        kw["cache_implementation"] = "static"
        if x.device.type == "cpu":  # generate compiles only on accelerators unless told to (a dry run)
            kw["compile_config"] = transformers.CompileConfig()
            kw["compile_config"]._compile_all_devices = True
    rec = {"mode": mode, "cache_implementation": kw.get("cache_implementation", "dynamic")}
    try:
        with torch.no_grad():
            # a compiled run warms up at the timed shapes (its static cache is prompt + n long); eager needs little.
            # Each call makes a fresh StaticCache, so the CUDA graphs re-record at the timed call's first decode
            # step: a cost of every generate call in this mode, kept in its time.
            warm = 4 if mode == "dynamic" else n
            t0 = time.perf_counter()
            hf.generate(x, **{**kw, "max_new_tokens": warm, "min_new_tokens": warm})
            sync()
            rec["warmup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(x, **kw)
            sync()
            rec["tokens_per_s"] = x.shape[0] * n / (time.perf_counter() - t0)
    except Exception as e:  # fail soft: the other mode and the engine's numbers still count
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"transformers {mode} failed: {rec['error']}", flush=True)
        return rec, None
    # generate builds `_compiled_call` only on its compile path (`_valid_auto_compile_criteria`: device and cache
    # type, the same at every call), so its presence says this mode compiled
    compiled = mode != "dynamic" and hasattr(hf, "_compiled_call")
    rec["compiled"] = compiled
    rec["compile_config"] = hf._last_compile_config.to_dict() if compiled else None
    return rec, out[0, x.shape[1]:].tolist()


def addition_text(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs of worked additions, 2-4 digits: the --train-steps corpus and prompts."""
    out = []
    for digits in (2, 3, 4):
        for p in Addition(digits=digits).problems(n // 3, split, seed):
            out.append((f"Question: {p.question}\nReasoning:",
                        f" {Addition.solution(p)}\nAnswer: {p.answer}"))
    return out


def train_with_mtp(model, steps: int, seq_len: int = 256, batch: int = 16, lr: float = 1e-3):
    """Pretrain `model` in place for `steps` steps with the MTP loss (weight 0.3) on addition_text."""
    tok = load_tokenizer()
    r = load_recipe(None, "pretrain", {"data.seq_len": str(seq_len), "train.batch_size": str(batch),
                                       "train.steps": str(steps), "optim.lr": str(lr), "optim.warmup_steps": "20",
                                       "moe.mtp_weight": "0.3", "log.every": "0", "log.tensorboard": "false",
                                       "ckpt.export": "false", "run.out": "unused"})
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/train.jsonl"
        with open(path, "w") as f:
            for q, a in addition_text(6000, "train", 0):
                f.write(json.dumps({"text": q + a}) + "\n")
        data = pretrain_sequences([path], tok, seq_len, model.config.vocab_size)
    dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
    trainer = Trainer(r, model, data, dtype=dtype, quiet=True)
    t0 = time.perf_counter()
    for step in range(steps):
        rec = trainer.train_step(trainer.next_batches())
        if step % 100 == 0 or step == steps - 1:
            print(json.dumps({"train_step": step + 1, "loss": round(rec["loss"], 4),
                              "mtp_loss": round(rec.get("mtp_loss", 0.0), 4),
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
    return trainer.model.eval()


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
    ap.add_argument("--speculate", type=int, nargs="*", default=[],
                    help="also run speculative decoding with these draft lengths, each against speculate=0 at the "
                         "same batch (default: none)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="first train the model this many steps with the MTP loss on worked additions, and prompt "
                         "with held-out ones (default: 0 = random weights and random prompts)")
    ap.add_argument("--eos-rounds", type=int, default=8,
                    help="with --train-steps/--model, also time answers that end at EOS: this many held-out prompts "
                         "per slot (default: 8; 0 = off)")
    ap.add_argument("--model", default=None, metavar="DIR", help="load this checkpoint instead of --preset")
    ap.add_argument("--save", default=None, metavar="DIR", help="save the --train-steps model here (for --model)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script (default: cuda)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    copy_bw = copy_bandwidth(dev)
    print(f"device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s", flush=True)
    if args.model:
        model = load_pretrained(args.model, device=dev, dtype=torch.bfloat16 if gpu else torch.float32).eval()
    else:
        cfg = get_preset(args.preset)
        if args.speculate or args.train_steps:  # the bench presets have no MTP module: give them V3's one
            cfg = cfg.replace(num_nextn_predict_layers=max(cfg.num_nextn_predict_layers, 1))
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device=dev).init_weights(seed=0)
        if args.train_steps:
            small = {} if gpu else dict(seq_len=64, batch=2)  # a CPU dry run of the script
            model = train_with_mtp(model, args.train_steps, **small)
        model = model.to(torch.bfloat16 if gpu else torch.float32).eval()
        if args.save:
            save_pretrained(model, args.save, tokenizer=False)
    cfg = model.config
    text_prompts = None
    if args.train_steps or args.model:  # prompts the model knows how to continue
        tok = load_tokenizer()
        text_prompts = [tok.encode(q) for q, _ in addition_text(3 * max(args.batches) * max(args.eos_rounds, 1),
                                                                 "test", 1)]
    hf = None
    if not args.no_hf:
        import transformers
        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d, tokenizer=False)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
    n_hf = args.hf_new_tokens or args.new_tokens
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    results = {"gpu": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
               "preset": args.model or args.preset, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "train_steps": args.train_steps, "runs": []}
    if hf is not None:
        results["transformers"] = {**transformers_setup(hf), "new_tokens": n_hf, "modes": list(HF_MODES)}
        print("transformers:", json.dumps(results["transformers"]), flush=True)
    g = torch.Generator().manual_seed(0)
    emit = emitter(results, args.out)

    def timed(eng, prompts, params):
        """Generate for `prompts` (continuous batching over the engine's slots); returns the run's numbers."""
        sync()
        before = eng.stats
        t0 = time.perf_counter()
        seqs = [s for p in prompts for s in eng.add_request(p, params)]
        eng.step()  # admits (prefills) the first slots' prompts, then the first decode step
        sync()
        t1 = time.perf_counter()
        steps = 1
        while eng.has_work():
            eng.step()
            steps += 1
        sync()
        t2 = time.perf_counter()
        st = eng.stats
        generated = sum(len(s.tokens) for s in seqs)
        run = {"sequences": len(seqs), "generated_tokens": generated, "r1lab_tokens_per_s": generated / (t2 - t0),
               "r1lab_decode_steps_per_s": (steps - 1) / (t2 - t1), "r1lab_prefill_s": t1 - t0}
        if eng.speculate:
            drafted, accepted = st["drafted"] - before["drafted"], st["accepted"] - before["accepted"]
            seq_steps = st["sequence_steps"] - before["sequence_steps"]
            run.update(acceptance_rate=accepted / max(drafted, 1),
                       tokens_per_step=(accepted + seq_steps) / max(seq_steps, 1))
        return run, [s.tokens for s in seqs]

    for B in args.batches:
        if text_prompts is None:
            prompts = torch.randint(0, cfg.vocab_size - 1, (B, args.prompt_len), generator=g).tolist()
        else:
            prompts = text_prompts[:B]
        # "fixed": every sequence generates --new-tokens (EOS ignored: past its answer a trained model writes
        # further documents); "eos": answers as a user gets them, each ended by EOS (at most --new-tokens), with
        # --eos-rounds x B held-out prompts through the B slots (continuous batching; prefills included)
        modes = {"fixed": (prompts, SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True))}
        if args.eos_rounds and text_prompts is not None:
            modes["eos"] = (text_prompts[:B * args.eos_rounds],
                            SamplingParams(temperature=0, max_tokens=args.new_tokens))
        longest = max(len(p) for ps, _ in modes.values() for p in ps)
        # warm-up at full length: the decode step is captured once per block-table width (compiled once)
        warm = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        base = {}
        # "sized": the engine's cache exactly the positions this benchmark uses; "default": what
        # Engine(model, max_batch=B) gives a user, max_position_embeddings per sequence and a pool sized by
        # free memory (its constructor's defaults)
        variants = [(0, "sized")] + [(k, "sized") for k in args.speculate if k > 0] + [(0, "default")]
        for k, cache in variants:
            compiled = args.compile
            opts = dict(max_batch=B, speculate=k)
            if cache == "sized":
                opts["max_seq_len"] = longest + max(args.new_tokens, n_hf)  # n_hf: the agreement check below
            try:
                eng = Engine(model, compile=compiled, **opts)
                tc = time.perf_counter()
                eng.generate(prompts, warm)  # compile, capture, and first calls at these shapes
                compile_s = time.perf_counter() - tc
            except Exception as e:  # report and fall back to the eager step, graphed
                print(f"compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                compiled, compile_s = False, None
                eng = Engine(model, compile=False, **opts)
                eng.generate(prompts, warm)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            main_run = k == 0 and cache == "sized"  # the one the others and transformers are compared with
            for mode, (mode_prompts, params) in modes.items():
                run, tokens = timed(eng, mode_prompts, params)
                run = {"batch": B, "speculate": k, "mode": mode, "engine_cache": cache,
                       "engine_max_seq_len": eng.max_seq_len, "engine_cache_tokens": eng.cache_tokens,
                       "compiled": compiled, "warmup_s": compile_s, **run}
                if k == 0:
                    if main_run:
                        base[mode] = run["r1lab_tokens_per_s"], tokens
                    else:
                        run["speedup_over_sized_cache"] = run["r1lab_tokens_per_s"] / base[mode][0]
                    if mode == "fixed":
                        cache_bytes = sum(c.numel() * c.element_size() for c in eng.cache)
                        bw = weight_bytes_per_step(cfg, B) * run["r1lab_decode_steps_per_s"]  # a token per sequence
                        run.update(cache_bytes=cache_bytes, r1lab_bandwidth_TBps=bw / 1e12,
                                   bandwidth_fraction=bw / copy_bw)
                else:
                    plain_tps, plain_tokens = base[mode]
                    run.update(speedup_over_speculate_0=run["r1lab_tokens_per_s"] / plain_tps,
                               greedy_sequences_equal=f"{sum(x == y for x, y in zip(tokens, plain_tokens))} of "
                                                      f"{len(tokens)}",
                               greedy_prefix_agreement_min=min(
                                   next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                                   for x, y in zip(tokens, plain_tokens)))
                if mode == "fixed" and main_run:
                    fixed_run = run
                    continue  # transformers' numbers join this record below
                emit(run)
            if not main_run:
                del eng
                continue
            run, ours_tps = fixed_run, fixed_run["r1lab_tokens_per_s"]
            if hf is not None and text_prompts is None:  # (same-length random prompts: no padding for HF)
                x = torch.tensor(prompts, device=dev)
                # bf16 greedy paths drift apart eventually; report how many leading tokens agree (first sequence)
                ours = eng.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=n_hf,
                                                                 ignore_eos=True))[0].token_ids
                run["transformers"] = []
                for hf_mode in HF_MODES:
                    rec, ref = time_transformers(hf, x, n_hf, hf_mode, sync)
                    if ref is not None:
                        rec["speedup"] = ours_tps / rec["tokens_per_s"]  # r1lab / transformers
                        rec["greedy_prefix_agreement_tokens"] = next(
                            (i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
                    run["transformers"].append(rec)
                    if gpu:
                        torch.cuda.empty_cache()
            emit(run)
            del eng
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
