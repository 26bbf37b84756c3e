"""The `r1lab` command. Each subcommand has --help; errors are one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def model_summary(cfg) -> dict:
    """Sizes of a model built on the meta device (no memory is allocated), as printed by `r1lab info`."""
    from .model.moe import MoE
    from .model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)

    def numel(module) -> int:  # parameters + the router's correction bias, which checkpoints store too
        return sum(p.numel() for p in module.parameters()) + sum(
            b.numel() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias"))

    main = numel(model.model) + numel(model.lm_head) * (not cfg.tie_word_embeddings)
    # Routed experts a token does not visit are the only inactive weights.
    idle = sum(m.experts.gate_proj.numel() * 3 * (1 - m.top_k / m.n_experts)
               for m in model.model.modules() if isinstance(m, MoE))
    emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    kv = cfg.kv_cache_bytes_per_token(2)
    rs = cfg.rope_scaling or {}
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.num_hidden_layers - n_moe,
        "moe_layers": n_moe,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "routed_experts": cfg.n_routed_experts or 0,
        "experts_per_token": cfg.num_experts_per_tok or 0,
        "shared_experts": cfg.n_shared_experts or 0,
        "params_total": main,
        "params_active": int(main - idle),
        "params_total_no_embeddings": main - emb,
        "params_active_no_embeddings": int(main - idle - emb),
        "params_mtp": numel(model.mtp),
        "max_positions": cfg.max_position_embeddings,
        "original_positions": rs.get("original_max_position_embeddings", cfg.max_position_embeddings),
        "yarn_factor": rs.get("factor") if rs.get("type") == "yarn" else None,
        "kv_cache_bytes_per_token_mla_bf16": kv["mla_latent"],
        "kv_cache_bytes_per_token_mha_bf16": kv["mha"],
        "latent_width": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    }


def cmd_info(args) -> None:
    from .checkpoint import read_config
    from .model.config import get_preset

    cfg = read_config(args.model) if args.model else get_preset(args.preset)
    s = model_summary(cfg)
    if args.json:
        print(json.dumps(s, indent=2))
        return
    name = args.model or args.preset
    b = lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"  # noqa: E731
    print(f"{name} ({s['model_type']})")
    print(f"  layers          {s['layers']} ({s['dense_layers']} dense + {s['moe_layers']} MoE), hidden {s['hidden_size']}, "
          f"{s['heads']} heads")
    if s["routed_experts"]:
        print(f"  experts         {s['routed_experts']} routed ({s['experts_per_token']} per token) + "
              f"{s['shared_experts']} shared")
    print(f"  parameters      {b(s['params_total'])} total, {b(s['params_active'])} active per token "
          f"(embedding and head included)")
    print(f"                  {b(s['params_total_no_embeddings'])} total, {b(s['params_active_no_embeddings'])} active "
          f"without embedding and head")
    if s["params_mtp"]:
        print(f"                  + {b(s['params_mtp'])} in the multi-token-prediction module")
    ctx = f"{s['max_positions']:,} positions"
    if s["yarn_factor"]:
        ctx += f" ({s['original_positions']:,} extended by YaRN, factor {s['yarn_factor']:g})"
    print(f"  context         {ctx}")
    mla, mha = s["kv_cache_bytes_per_token_mla_bf16"], s["kv_cache_bytes_per_token_mha_bf16"]
    print(f"  KV cache/token  {mla:,} B MLA latent ({s['layers']} layers x {s['latent_width']} x 2 B, bf16) vs "
          f"{mha:,} B for standard multi-head attention ({mha / mla:.1f}x more)")


def cmd_init(args) -> None:
    from .checkpoint import save_pretrained
    from .model.config import get_preset
    from .model.transformer import Transformer

    cfg = get_preset(args.preset)
    if cfg.num_params() > 5e9:
        raise ValueError(f"preset {args.preset!r} has {cfg.num_params() / 1e9:.0f}B parameters: too large to "
                         f"initialise randomly here; load real weights with r1lab.load_pretrained")
    torch.manual_seed(args.seed)
    model = Transformer(cfg).init_weights(seed=args.seed)
    out = save_pretrained(model, args.out)
    print(f"wrote a randomly initialised {args.preset} model to {out}")


def build_parser() -> argparse.ArgumentParser:
    from .model.config import PRESETS

    p = argparse.ArgumentParser(prog="r1lab", description="DeepSeek-R1 end to end in one readable PyTorch codebase.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser("info", help="sizes of a model: parameters (total / active), context, KV cache per token",
                          description="Build a model on the meta device (no memory used) and print its sizes.")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS),
                     help="named configuration (default: deepseek-v3)")
    src.add_argument("--model", metavar="DIR", help="a Hugging Face-layout folder; its config.json is read")
    info.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    info.set_defaults(fn=cmd_info)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint of a small preset",
                          description="Write a randomly initialised model (HF layout + tokenizer) to a folder.")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="configuration (default: tiny)")
    init.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it exists)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    init.set_defaults(fn=cmd_init)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"r1lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
