"""Load benchmark of `r1lab serve`: N concurrent streaming chat clients (the official `openai` client).

Starts a server on a free loopback port (or uses --url), sends one warm-up request (on GPU it triggers the
decode step's compilation and CUDA-graph capture), then N clients at once, each streaming a chat completion
of exactly --max-tokens tokens (EOS ignored is not an API option, so a client that stops early is reported).
Prints requests/s, generated tokens/s, time to first token and errors.

    python benchmarks/serve_load.py --model ckpt/ --clients 64 --max-tokens 16          # CPU, tiny
    python benchmarks/serve_load.py --model bench-ckpt/ --clients 64 --max-tokens 256 --max-batch 64   # H200

(`r1lab init --preset bench-moe-1b --out bench-ckpt/` makes the H200 benchmark's checkpoint.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int = 32, api_key: str | None = None,
                 extra: list[str] | None = None, timeout: float = 120) -> subprocess.Popen:
    """Start `r1lab serve` (as `python -m r1lab.cli serve`) and wait until /health answers; raises with its output if it dies."""
    cmd = [sys.executable, "-m", "r1lab.cli", "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch)]
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads would block the server
    proc = subprocess.Popen(cmd + (extra or []), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server_output(proc)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.load(r)["status"] == "ok":
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer /health within {timeout:.0f} s")


def server_output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the server (SIGTERM, then SIGKILL) and return its output."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return server_output(proc)


async def one_client(client, model: str, i: int, max_tokens: int, temperature: float) -> dict:
    t0 = time.perf_counter()
    first, reasoning, content, finish, usage = None, "", "", None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Client {i}: what is {i} + {i}?"}], stream=True,
        max_tokens=max_tokens, temperature=temperature, seed=i, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            r, t = getattr(c.delta, "reasoning_content", None), c.delta.content
            if (r or t) and first is None:
                first = time.perf_counter() - t0
            reasoning += r or ""
            content += t or ""
            finish = c.finish_reason or finish
    return {"client": i, "reasoning": reasoning, "content": content, "finish_reason": finish,
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "ttft_s": first, "latency_s": time.perf_counter() - t0}


async def run_load(base_url: str, model: str, clients: int = 64, max_tokens: int = 16, temperature: float = 0.8,
                   api_key: str | None = None) -> dict:
    """Run `clients` concurrent streaming chats; returns per-client results and totals."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, model, i, max_tokens, temperature) for i in range(clients)),
                                   return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    return {"clients": clients, "ok": len(ok), "errors": errors, "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "ttft_max_s": ttft[-1] if ttft else None, "results": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder to serve (starts a server); or use --url")
    p.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model-name", default=None, help="model name for --url (default: the server's first)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default: 64)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default: 16)")
    p.add_argument("--max-batch", type=int, default=64, help="server slots when started here (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the load this many times (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object per round")
    args = p.parse_args()
    if not (args.model or args.url):
        p.error("give --model DIR (start a server) or --url URL")

    proc = None
    if args.url:
        url = args.url
        with urllib.request.urlopen(url.rstrip("/") + "/models") as r:
            name = args.model_name or json.load(r)["data"][0]["id"]
    else:
        port = free_port()
        proc = start_server(args.model, port, max_batch=args.max_batch)
        url, name = f"http://127.0.0.1:{port}/v1", os.path.basename(os.path.abspath(args.model))
    try:
        asyncio.run(run_load(url, name, clients=1, max_tokens=4))  # warm-up (compilation, graph capture)
        for _ in range(args.rounds):
            res = asyncio.run(run_load(url, name, args.clients, args.max_tokens, args.temperature))
            short = sum(r["finish_reason"] != "length" for r in res["results"])
            if args.json:
                print(json.dumps({k: v for k, v in res.items() if k != "results"} | {"stopped_early": short}))
            else:
                print(f"{res['ok']}/{args.clients} clients ok, {len(res['errors'])} errors, {short} stopped early; "
                      f"{res['wall_s']:.2f} s: {res['requests_per_s']:.1f} requests/s, "
                      f"{res['tokens_per_s']:.0f} tokens/s; time to first token p50 {res['ttft_p50_s']:.3f} s, "
                      f"max {res['ttft_max_s']:.3f} s")
            for e in res["errors"][:5]:
                print("  error:", e)
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
