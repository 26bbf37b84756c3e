"""The model on a GPU: fast paths against their slow twins in bf16, and a forward-pass comparison with
transformers' DeepseekV3ForCausalLM on the same weights.

    python benchmarks/model_gpu.py --preset bench-moe-1b --out results.json

Checks on CUDA: the grouped-GEMM experts and the per-expert loop against fp32; in fp32, r1lab against
transformers and the absorbed decode against the full path; in bf16, every implementation (loop, grouped,
absorbed decode, transformers) against the fp32 reference on the same weights, and repeat/reload determinism.
Random routers make bf16 logits sensitive (a rounding flips a top-k choice), so bf16 is judged relative to
transformers' own bf16 error, not to zero. Then times one prefill-shaped forward of both; timing is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from decode import seconds_per_call  # benchmarks/decode.py, beside this script
from r1lab import Transformer, get_preset, load_pretrained, save_pretrained


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, reps=10):
    fn(), fn()  # warm-up
    return seconds_per_call(fn, reps)


def set_impl(model, impl):
    for m in model.moe_layers():
        m.impl = impl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moe-1b", help="model preset (default: bench-moe-1b)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward (default: 8)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset}
    cfg = get_preset(args.preset)

    # 1. Experts alone (no routing cascade): grouped GEMM vs per-expert loop vs an fp32 reference.
    from r1lab.model.moe import Experts
    torch.manual_seed(0)
    ex = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size).to(dev)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = torch.randint(0, 200, (cfg.n_routed_experts,), device=dev)
    counts[::7] = 0  # empty experts
    xs = torch.randn(int(counts.sum()), cfg.hidden_size, device=dev)
    with torch.no_grad():
        ref = ex(xs, counts, "loop")
        exb = ex.to(torch.bfloat16)
        res["grouped_mm_used"] = exb.grouped_ok(xs.bfloat16())
        res["experts_bf16_grouped_vs_fp32"] = rel(exb(xs.bfloat16(), counts, "grouped"), ref)
        res["experts_bf16_loop_vs_fp32"] = rel(exb(xs.bfloat16(), counts, "loop"), ref)

    # 2. Whole model: fp32 on the GPU as the reference, then bf16 implementations against it.
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).init_weights(seed=0).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    seq, T, P = x[:2, :64], 64, 48

    def decode_logits(m):
        """Prefill P tokens into the latent cache, then one token at a time on the absorbed path."""
        cache = m.new_cache(2, T)
        pos = torch.arange(P, device=dev).expand(2, P)
        out = [m(seq[:, :P], pos, cache=cache, attn_mask=m.cache_mask(pos, T))]
        for p in range(P, T):
            pos = torch.full((2, 1), p, device=dev)
            out.append(m(seq[:, p:p + 1], pos, cache=cache, attn_mask=m.cache_mask(pos, T)))
        return torch.cat(out, 1)

    with torch.no_grad():
        ref32 = model(x)
        res["fp32_absorbed_vs_full_rel_err"] = rel(decode_logits(model)[:, P:], model(seq)[:, P:])
        full32 = model(seq)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, tokenizer=False)
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            res["transformers_version"] = transformers.__version__
            hf32 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(dev).eval()
            with torch.no_grad():
                res["fp32_hf_vs_r1lab_rel_err"] = rel(model(x), hf32(x).logits)
            del hf32
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev).eval()
        except ImportError:
            hf = None
        back = load_pretrained(d, device=dev, dtype=torch.bfloat16)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        set_impl(model, "loop")
        res["bf16_loop_vs_fp32"] = rel(model(x), ref32)
        t_loop = timed(lambda: model(x), reps=3)
        set_impl(model, "grouped")
        ours = model(x)
        res["bf16_grouped_vs_fp32"] = rel(ours, ref32)
        res["bf16_repeat_bitwise_equal"] = bool(torch.equal(model(x), ours))
        res["bf16_reload_bitwise_equal"] = bool(torch.equal(back(x), ours))
        t_grouped = timed(lambda: model(x), reps=3)
        res["bf16_absorbed_decode_vs_fp32_full"] = rel(decode_logits(model)[:, P:], full32[:, P:])
        res["bf16_full_vs_fp32_full_same_tokens"] = rel(model(seq)[:, P:], full32[:, P:])
        res["forward_ms_loop"], res["forward_ms_grouped"] = t_loop * 1e3, t_grouped * 1e3
        if hf is not None:
            res["bf16_hf_vs_fp32"] = rel(hf(x).logits, ref32)
            t_hf = timed(lambda: hf(x), reps=3)
            res["forward_ms_transformers"] = t_hf * 1e3
            res["forward_speedup_vs_transformers"] = t_hf / t_grouped
        res["forward_tokens_per_s_r1lab"] = args.batch * args.seq / t_grouped
    res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
