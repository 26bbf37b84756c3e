"""The model on a GPU: fast paths against their slow twins in bf16, and a forward-pass comparison with
transformers' DeepseekV3ForCausalLM on the same weights.

    python benchmarks/model_gpu.py --preset bench-moe-1b --out results.json

Checks (bf16 on CUDA): grouped-GEMM MoE vs the per-expert loop; absorbed MLA decode over the latent cache vs
the full path; r1lab logits vs transformers' logits on the same checkpoint. Then times one forward pass
(prefill-shaped, no cache) of both implementations; timing is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from r1lab import Transformer, get_preset, load_pretrained, save_pretrained


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, reps=10):
    fn(), fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward (default: 8)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).to(torch.bfloat16).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)

    with torch.no_grad():
        # 1. grouped GEMM vs loop
        res["grouped_mm_used"] = model.moe_layers()[0].experts.grouped_ok(
            torch.empty(1, cfg.hidden_size, device=dev, dtype=torch.bfloat16))
        for m in model.moe_layers():
            m.impl = "loop"
        loop = model(x)
        t_loop = timed(lambda: model(x), reps=3)
        for m in model.moe_layers():
            m.impl = "grouped"
        grouped = model(x)
        t_grouped = timed(lambda: model(x), reps=3)
        res["grouped_vs_loop_rel_err"] = rel(grouped, loop)
        res["forward_ms_loop"], res["forward_ms_grouped"] = t_loop * 1e3, t_grouped * 1e3
        for m in model.moe_layers():
            m.impl = "auto"

        # 2. absorbed decode vs full path (prefill 48 tokens, then 16 single-token steps)
        seq = x[:2, :64]
        full = model(seq)
        T = 64
        cache = model.new_cache(2, T)
        pos = torch.arange(48, device=dev).expand(2, 48)
        model(seq[:, :48], pos, cache=cache, attn_mask=model.cache_mask(pos, T))
        errs = []
        for p in range(48, 64):
            pos = torch.full((2, 1), p, device=dev)
            step = model(seq[:, p:p + 1], pos, cache=cache, attn_mask=model.cache_mask(pos, T))
            errs.append(rel(step[:, 0], full[:, p]))
        res["absorbed_vs_full_max_rel_err"] = max(errs)
        res["absorbed_vs_full_argmax_agree"] = float((step[:, 0].argmax(-1) == full[:, 63].argmax(-1)).float().mean())

    # 3. transformers on the same weights
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d, tokenizer=False)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
            back = load_pretrained(d, device=dev)
        with torch.no_grad():
            ref = hf(x).logits
            ours = model(x)
            res["hf_vs_r1lab_rel_err_bf16"] = rel(ours, ref)
            res["reload_bitwise_equal"] = bool(torch.equal(back(x), ours))
            t_hf = timed(lambda: hf(x), reps=3)
            t_ours = timed(lambda: model(x), reps=3)
        res["transformers_version"] = transformers.__version__
        res["forward_ms_transformers"], res["forward_ms_r1lab"] = t_hf * 1e3, t_ours * 1e3
        res["forward_speedup_vs_transformers"] = t_hf / t_ours
        res["forward_tokens_per_s_r1lab"] = args.batch * args.seq / t_ours
    except ImportError:
        res["transformers"] = "not installed"
    res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
