"""`r1lab serve`: an OpenAI-compatible server (chat and text completions, streamed or not, reasoning apart
from the answer) over the engine's continuous batching, with a chat page at `/`.

Needs the `serve` extra (FastAPI, uvicorn). Run it as `r1lab serve --model DIR`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible API server (streaming, reasoning_content) and a web chat page",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API: POST /v1/chat/completions, "
                    "POST /v1/completions, GET /v1/models, GET /health, and a chat page at /. Concurrent requests "
                    "share the engine's continuous batching.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (HF layout, with tokenizer)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests; compared as UTF-8 bytes, so any "
                        "non-empty key works (default: none required)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="sequences decoded together; more requests wait for a free slot (default: 32)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + generated tokens one sequence may hold (default: the model's full context)")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="positions the paged latent cache holds, all sequences together, at least one "
                        "--max-seq-len sequence; requests wait for free pages, and the youngest sequence is "
                        "preempted (recomputed later) when it runs out (default: on a GPU half the free memory "
                        "after the weights, on a CPU 262144, each at most what --max-batch full-length sequences "
                        "need); /health reports its use")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients must send (default: the checkpoint folder's name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="LoRA adapter folder in PEFT's format (from r1lab or PEFT) for --model, merged into its "
                        "weights before serving (default: none)")
    p.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="speculative decoding: draft K tokens per step with the model's MTP module and verify them "
                        "in one forward; outputs are distributed as without, /health reports the draft's "
                        "acceptance (default: 0 = off)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names clients may put in the Host header, a DNS rebinding defence; "
                        "always accepted: localhost and loopback addresses, and when not bound to loopback any IP "
                        "address and this machine's name; '*' for any (default: none)")
    p.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                   help="comma-separated origins (https://app.example.com) whose web pages may call the API: they "
                        "get CORS headers, which browsers need to send or read cross-origin API requests; '*' for "
                        "any (default: none, no CORS headers)")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send a request's head, and then its body; slower clients are "
                        "disconnected or get 408 (default: 30)")
    p.add_argument("--max-connections", type=int, default=512, metavar="N",
                   help="open connections at most; at the cap, a new one closes the connection slowest to send "
                        "its request (default: 512)")
    p.set_defaults(fn=cmd_serve)
    return p


def cmd_serve(args) -> None:
    try:
        from .app import serve
        from .guard import check_api_key
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install 'r1lab[serve]'") from None
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1 (got {args.max_batch})")
    if args.request_timeout <= 0 or args.max_connections < 1:
        raise ValueError(f"--request-timeout must be > 0 and --max-connections >= 1 (got {args.request_timeout} "
                         f"and {args.max_connections})")
    check_api_key(args.api_key)  # before loading the model: an empty key would let any client in
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_seq_len=args.max_seq_len, cache_tokens=args.cache_tokens, device=args.device,
          model_name=args.served_model_name,
          speculate=args.speculate,
          allowed_hosts=split(args.allowed_hosts), allowed_origins=split(args.allowed_origins),
          request_timeout=args.request_timeout, max_connections=args.max_connections, lora=args.lora)
