"""What the `r1lab serve` end-to-end tests share: a real server process on a checkpoint (the load benchmark's start
and stop helpers), the official `openai` client on it, raw JSON posts, and chat streams collected as the OpenAI docs
show. Importing it skips the importing test module where the serve extras are missing."""

import importlib.util
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client: pip install 'r1lab[serve,test]'")
try:  # the HTTP client the openai package is built on (httpx, or its successor httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="serving needs FastAPI: pip install 'r1lab[serve]'")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)


def init_tiny(out):
    """A tiny random checkpoint written by `r1lab init` in its own process, as a user makes one -> out."""
    subprocess.run([sys.executable, "-m", "r1lab.cli", "init", "--preset", "tiny", "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


@contextmanager
def server_process(ckpt, **options):
    """`r1lab serve` on ckpt (start_server's options) -> (its process, its base URL). Its output must hold no
    traceback when it stops: no request may have crashed a handler or the engine thread."""
    port = serve_load.free_port()
    proc = serve_load.start_server(str(ckpt), port, **options)
    yield proc, f"http://127.0.0.1:{port}"
    out = serve_load.stop_server(proc)
    assert "Traceback" not in out, out


@contextmanager
def running_server(ckpt, **options):
    """`r1lab serve` on ckpt -> its base URL (server_process without the process)."""
    with server_process(ckpt, **options) as (_, url):
        yield url


def wait_until(cond, timeout=10.0) -> bool:
    """Poll cond() every 20 ms until it holds (True) or timeout seconds pass (False)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def openai_client(server, key):
    return openai.OpenAI(base_url=server + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path, body, key, raw=None, timeout=5.0):
    """A JSON body, or raw text sent as one, with key as the bearer token (none if None); 5 s is httpx's default."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(server + path, json=body, headers=headers, timeout=timeout)


def collect_stream(stream, n=1):
    """Accumulate a chat stream of n choices as the OpenAI docs show: content and reasoning by concatenation, tool
    calls by their index (id, type and name from the first delta of each, arguments concatenated) -> per-choice
    lists of reasoning, content, tool calls and finish reason, and the usage."""
    reasoning, content, calls, finish, usage = [""] * n, [""] * n, [{} for _ in range(n)], [None] * n, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            reasoning[c.index] += getattr(c.delta, "reasoning_content", None) or ""
            content[c.index] += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                cur = calls[c.index].setdefault(d.index, {"id": None, "type": None, "name": "", "arguments": ""})
                cur["id"] = d.id or cur["id"]
                cur["type"] = d.type or cur["type"]
                if d.function:
                    cur["name"] += d.function.name or ""
                    cur["arguments"] += d.function.arguments or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return reasoning, content, [[cs[k] for k in sorted(cs)] for cs in calls], finish, usage
