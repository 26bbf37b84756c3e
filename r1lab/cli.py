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


def _load_for_generation(args):
    from . import lora
    from .checkpoint import load_pretrained
    from .engine import Engine
    from .tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_pretrained(args.model, device=device, dtype=dtype)
    if args.lora:  # folded into the weights once: decoding then runs at the base model's speed
        lora.merge_and_unload(model, lora.load_adapter(model, args.lora))
    tok = load_tokenizer(args.model)
    eng = Engine(model, tok, max_batch=max(args.n, 1), max_seq_len=args.max_seq_len,
                 cache_tokens=args.cache_tokens, speculate=args.speculate)
    return eng, tok


class _Streamer:
    """Prints the text of one sample as tokens arrive (holding back incomplete UTF-8 characters)."""

    def __init__(self, tok, out=None, style=None):
        # sys.stdout when called, not when imported (a test's captured stream may since have been closed)
        self.tok, self.out, self.ids, self.shown = tok, out if out is not None else sys.stdout, [], 0
        self.style = style  # callable(text) -> styled text, or None

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        new, self.shown = text[self.shown:], len(text)
        if new:
            self.out.write(self.style(new) if self.style else new)
            self.out.flush()


def _params(args, n=None):
    from .engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                          n=n or args.n, seed=args.seed)


def cmd_generate(args) -> None:
    eng, tok = _load_for_generation(args)
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(prompt)
    if args.n == 1:  # stream the single sample
        stream = _Streamer(tok)
        (out,) = eng.generate([ids], _params(args), on_token=lambda p, s, t: stream(t))
        print(f"\n[{out.finish_reason}, {len(out.token_ids)} tokens]")
    else:
        for out in eng.generate([ids], _params(args)):
            print(f"--- sample {out.sample_index} [{out.finish_reason}, {len(out.token_ids)} tokens]\n{out.text}")
    if args.speculate:
        st = eng.stats
        print(f"[speculate {args.speculate}: {st['accepted']} of {st['drafted']} drafted tokens accepted, "
              f"{st['tokens_per_step'] or 0:.2f} tokens per step]")


def cmd_chat(args) -> None:
    from .tokenizer import THINK_END

    eng, tok = _load_for_generation(args)
    args.n = 1
    dim = (lambda t: f"\033[2m{t}\033[0m") if sys.stdout.isatty() else None
    history: list[dict] = []
    print("r1lab chat: type a message, /reset to clear the history, Ctrl-D to quit.")
    while True:
        try:
            line = input("\n> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        state = {"thinking": True}
        think_stream, answer_stream = _Streamer(tok, style=dim), _Streamer(tok)

        def on_token(p, s, t):  # reasoning (up to </think>) dimmed, the answer plain
            if state["thinking"]:
                think_stream(t)
                if THINK_END in tok.decode(think_stream.ids):
                    state["thinking"] = False
            else:
                answer_stream(t)

        (out,) = eng.generate([ids], _params(args, n=1), on_token=on_token)
        history.append({"role": "assistant", "content": out.text})
        print()


def _add_sampling_flags(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (HF layout, with tokenizer)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + generated tokens one sequence may hold (default: the model's full context)")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="positions the paged latent cache holds, all sequences together, at least one "
                        "--max-seq-len sequence (default: on a GPU half the free memory, on a CPU 262144, each at "
                        "most what --n full-length sequences need)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="LoRA adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors, "
                        "from r1lab or PEFT) for --model, merged into its weights (default: none)")
    p.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="speculative decoding: draft K tokens per step with the model's MTP module and verify them "
                        "in one forward; the output is distributed as without (default: 0 = off)")


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

    gen = sub.add_parser("generate", help="generate from a prompt, streaming the text",
                         description="Generate from a prompt with the inference engine, streaming the text.")
    _add_sampling_flags(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the R1 chat template as a user turn")
    gen.add_argument("--n", type=int, default=1, help="samples (default: 1; more than 1 prints them at the end)")
    gen.set_defaults(fn=cmd_generate)

    chat = sub.add_parser("chat", help="interactive terminal chat (reasoning dimmed, answer plain)",
                          description="Chat with a model in the terminal, keeping the conversation history.")
    _add_sampling_flags(chat)
    chat.set_defaults(fn=cmd_chat, n=1)

    # Each stage's command lives beside its code.
    from .eval import add_parser as add_eval_parser
    from .plan import add_parser as add_plan_parser
    from .serve import add_parser as add_serve_parser
    from .speedrun import add_parser as add_speedrun_parser
    from .train.cli import add_parsers as add_train_parsers
    from .train.grpo import add_parsers as add_grpo_parsers
    from .train.reward_model import add_parsers as add_rm_parsers
    add_train_parsers(sub)
    add_grpo_parsers(sub)
    add_rm_parsers(sub)
    add_eval_parser(sub)
    add_serve_parser(sub)
    add_plan_parser(sub)
    add_speedrun_parser(sub)
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
