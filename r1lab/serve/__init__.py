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
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: none required)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="sequences decoded together; more requests wait for a free slot (default: 32)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + generated tokens per sequence (default: the model's, at most 4096)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients must send (default: the checkpoint folder's name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(fn=cmd_serve)
    return p


def cmd_serve(args) -> None:
    try:
        from .app import serve
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install 'r1lab[serve]'") from None
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1 (got {args.max_batch})")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_seq_len=args.max_seq_len, device=args.device, model_name=args.served_model_name)
