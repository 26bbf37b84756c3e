"""Serving under open-loop load: `r1lab serve` beside `transformers serve`, same checkpoint, same requests.

For each of --rates (requests/s), requests arrive as a Poisson process (exponential gaps from a seeded RNG)
for --duration seconds (or --requests of them), and each is sent when it arrives, whether or not the earlier
ones have finished (open loop: a slow server meets a growing queue, as it would in service, instead of a
load generator that politely waits for it). Each request is a chat completion streamed with the official
`openai` client (async), its prompt --prompt-words words long (words that are one token each) and its
max_tokens drawn uniformly from --max-tokens, with the same seed for every server and run. A warm-up burst
of the longest requests comes first (on a GPU it triggers compilation and CUDA-graph capture).

Per rate it reports: p50/p99 time to first token; p50/p99 inter-token latency (the gaps between streamed
chunks with text; a chunk may carry more than one token) and p50 time per output token (first to last chunk
over the tokens after the first); output tokens/s (from the first arrival to the last completion);
requests completed, unfinished (still running --drain-timeout s after the last arrival: cancelled, and
counted in the latencies and tokens with what they streamed until then) and failed (count and the first
error's text); the offered rate (arrivals per second of arrival window) against
the achieved one (completions per second between the first and the last completion), which falls behind
once the server saturates; and the client's own lag (how late the p99 request was sent: if it grows, the
load generator, not the server, is the limit). --out FILE is rewritten after every rate, so a run cut
short keeps what it measured; each started server's output goes to FILE.SERVER.log.

The servers run one after the other on --model, each started here on a free loopback port and stopped at
the end (or give --url for one already running):
  r1lab         python -m r1lab.cli serve --model DIR --max-batch 64 --device D --max-connections 4096
  transformers  python -m transformers.cli.transformers serve /abs/DIR --continuous-batching --device D
                --dtype bfloat16 (float32 on a CPU, as r1lab serve) --host 127.0.0.1 --port P
                with HF_HUB_OFFLINE=1 (flags that exist in transformers 5.17 and 5.25; more with
                --transformers-args). transformers-nocb: the same without --continuous-batching.
A server that fails to start or to answer is recorded as {"server", "failed": its error and output} and the
next one runs; the exit status is 1 only where r1lab (or --url) failed, or every server did.
transformers 5.17's continuous batching cannot serve DeepSeek-V3 (its paged cache is sized by config.head_dim,
which DeepseekV3Config sets to qk_rope_head_dim, and the first step fails in index_copy_); 5.25's can.
transformers-nocb works in both, one request at a time. Output tokens come from the streams' usage; a
server that sends none would have them counted as chunks ("tokens_counted_from").

    python benchmarks/serve_load.py --model ckpt/ --rates 1 2 4 --requests 6 --prompt-words 8 32 \\
        --max-tokens 4 12 --max-batch 8 --out serve_load_cpu.json                 # CPU, tiny, ~1.5 min
    python benchmarks/serve_load.py --model B --out serve_load.json               # H200, ~5 min
    python benchmarks/serve_load.py --model B --servers transformers-nocb --out serve_load_nocb.json

(`r1lab init --preset bench-moe-1b --out B` makes the H200 benchmark's checkpoint; each of the two H200 runs
stays under 10 minutes, the second, saturated at every rate, cut by --drain-timeout.) `run_load` (N clients
at once, one closed burst) is the earlier benchmark, kept for the serving tests and reachable with --burst N:
    python benchmarks/serve_load.py --model B --servers r1lab --burst 64 --max-tokens 256 256 --max-batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

import torch

# One token each in the DeepSeek tokenizer after a space, so a prompt of n of them is n tokens (plus the
# chat template's).
WORDS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force
education""".split()


SERVERS = {"r1lab": "r1lab serve",
           "transformers": "transformers serve --continuous-batching (the peer)",
           "transformers-nocb": "transformers serve without continuous batching, one request at a time "
                                "(transformers 5.17's continuous batching cannot run DeepSeek-V3's MLA)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], port: int, timeout: float, env: dict | None = None) -> subprocess.Popen:
    """Run a server command and wait until its /health answers {"status": "ok"}; raises with its output
    if it exits first, or if it does not answer within timeout seconds (then it is killed)."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads would block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
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
    out = stop_server(proc)
    raise RuntimeError(f"server did not answer /health within {timeout:.0f} s; its output:\n{out}")


def start_server(model: str, port: int, max_batch: int = 32, api_key: str | None = None,
                 extra: list[str] | None = None, timeout: float = 120) -> subprocess.Popen:
    """Start `r1lab serve` (as `python -m r1lab.cli serve`) and wait until /health answers."""
    cmd = [sys.executable, "-m", "r1lab.cli", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch)]
    if api_key:
        cmd += ["--api-key", api_key]
    return launch(cmd + (extra or []), port, timeout)


def start_transformers(model: str, port: int, device: str, extra: list[str] | None = None,
                       timeout: float = 600, continuous_batching: bool = True) -> subprocess.Popen:
    """Start `transformers serve` (transformers' own OpenAI-compatible server) on the checkpoint folder,
    with continuous batching unless told otherwise (then its one inference thread runs one request's
    generate at a time), in this interpreter, offline, and wait until /health answers. Its flags here
    exist in transformers 5.17 and 5.25 alike; requests must name the model as the folder is given here
    (the absolute path)."""
    dtype = "bfloat16" if device.startswith("cuda") else "float32"  # as r1lab serve loads it
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", os.path.abspath(model),
           *(["--continuous-batching"] if continuous_batching else []), "--device", device,
           "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    # no network: the hub offline, and no check for a newer release at start
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    return launch(cmd + (extra or []), port, timeout, env)


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


async def one_client(client, model: str, i: int, max_tokens: int, temperature: float,
                     messages: list[dict] | None = None, seed: int | None = None,
                     chunk_s: list[float] | None = None) -> dict:
    """Stream one chat completion (by default the question "Client i: what is i + i?") -> its reasoning
    and content, finish reason, token counts (None where the server sends no usage), time to first token
    and when each chunk with text came (`chunk_s`, appended to the list given if any, which the caller
    keeps if the request is cancelled), in seconds from the send."""
    t0 = time.perf_counter()
    chunk_s = [] if chunk_s is None else chunk_s
    reasoning, content, finish, usage = "", "", None, None
    messages = messages or [{"role": "user", "content": f"Client {i}: what is {i} + {i}?"}]
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature,
        stream_options={"include_usage": True}, **({} if seed is None else {"seed": seed}))
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            r, t = getattr(c.delta, "reasoning_content", None), c.delta.content
            if r or t:
                chunk_s.append(time.perf_counter() - t0)
            reasoning += r or ""
            content += t or ""
            finish = c.finish_reason or finish
    return {"client": i, "reasoning": reasoning, "content": content, "finish_reason": finish,
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "ttft_s": chunk_s[0] if chunk_s else None, "chunk_s": chunk_s,
            "latency_s": time.perf_counter() - t0}


def async_client(base_url: str, api_key: str | None, timeout: float = 600):
    import openai  # the serve extra's client: optional, and the tests load this file only where it is

    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout)


async def run_load(base_url: str, model: str, clients: int = 64, max_tokens: int = 16,
                   temperature: float = 0.8, api_key: str | None = None) -> dict:
    """Run `clients` concurrent streaming chats at once (seed i for client i); returns per-client results
    and totals."""
    client = async_client(base_url, api_key)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(one_client(client, model, i, max_tokens, temperature, seed=i) for i in range(clients)),
        return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if isinstance(r, dict)]
    errors = [repr(r) for r in results if not isinstance(r, dict)]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    return {"clients": clients, "ok": len(ok), "errors": errors, "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "ttft_max_s": ttft[-1] if ttft else None, "results": ok}


def make_requests(rate: float, seed: int, duration: float, count: int, prompt_words: tuple[int, int],
                  max_tokens: tuple[int, int]) -> list[dict]:
    """One rate's requests: arrival times `at` (s) of a Poisson process of `rate` per second, for
    `duration` seconds or, if count > 0, the first `count` arrivals; a prompt of uniformly many WORDS
    and a uniform max_tokens each. Seeded by seed and rate alone, so every server gets the same."""
    rng = random.Random(f"{seed}/{rate}")
    reqs, at = [], 0.0
    while True:
        at += rng.expovariate(rate)
        if (len(reqs) >= count) if count > 0 else (at >= duration):
            return reqs
        words = rng.choices(WORDS, k=rng.randint(*prompt_words))
        reqs.append({"at": at, "prompt": " ".join(words), "max_tokens": rng.randint(*max_tokens)})


async def open_loop(base_url: str, model: str, reqs: list[dict], temperature: float, drain_timeout: float,
                    api_key: str | None = None) -> dict:
    """Send each request at its arrival time, not waiting for the others; requests still running
    drain_timeout s after the last arrival are cancelled -> {"results": one_client's, or {"error": text}
    for a failure; "cut": the cancelled ones, what they streamed so far (`chunk_s`); "end_s": when the
    last finished or the rest were cancelled}. Times in seconds from the start; each request has
    `sent_s` and `lag_s` (how late it was sent), each finished one `done_s`."""
    client = async_client(base_url, api_key)
    t0 = time.perf_counter()
    state = [{"client": i, "chunk_s": []} for i in range(len(reqs))]  # survives a cancelled request

    async def send(i: int, req: dict) -> dict:
        await asyncio.sleep(max(0.0, t0 + req["at"] - time.perf_counter()))
        st = state[i]
        st["sent_s"] = time.perf_counter() - t0
        st["lag_s"] = st["sent_s"] - req["at"]
        messages = [{"role": "user", "content": req["prompt"]}]
        try:
            res = await one_client(client, model, i, req["max_tokens"], temperature, messages,
                                   chunk_s=st["chunk_s"])
        except Exception as e:  # noqa: BLE001 - a failed request is a result: count it, keep its text
            res = {"client": i, "error": f"{type(e).__name__}: {e}"}
        return st | res | {"done_s": time.perf_counter() - t0}

    tasks = [asyncio.create_task(send(i, r)) for i, r in enumerate(reqs)]
    if tasks:
        await asyncio.wait(tasks, timeout=reqs[-1]["at"] + drain_timeout)
    end = time.perf_counter() - t0
    cut = [state[i] for i, t in enumerate(tasks) if not t.done()]
    for t in tasks:  # the client closes their streams, which frees the server's slots for the next rate
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    done = [t.result() for t in tasks if not t.cancelled()]
    return {"results": done, "cut": cut, "end_s": end}


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of xs, linearly interpolated between ranks; None if xs is empty."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    i = int(k)
    return xs[i] + (xs[min(i + 1, len(xs) - 1)] - xs[i]) * (k - i)


def summarize(rate: float, reqs: list[dict], load: dict, span: float) -> dict:
    """One rate's metrics (see the module docstring) from open_loop's `load`; span: the arrival window
    in seconds. Requests cancelled at the drain timeout count with what they streamed (their time to
    first token, their gaps, their chunks as tokens): leaving them out would hide the slowest."""
    ok = [r for r in load["results"] if "error" not in r]
    errors = [r["error"] for r in load["results"] if "error" in r]
    # a server that sends no usage (stream_options is not in every server's API): count chunks instead
    counted = "usage" if all(r["completion_tokens"] is not None for r in ok) else "chunks"

    def tokens(r: dict) -> int:  # a cancelled request has no usage: its chunks
        n = r.get("completion_tokens") if counted == "usage" else None
        return len(r["chunk_s"]) if n is None else n

    streamed = ok + load["cut"]
    out = sum(tokens(r) for r in streamed)
    done = sorted(r["done_s"] for r in ok)
    sent = [r for r in load["results"] + load["cut"] if "sent_s" in r]
    first = min((r["sent_s"] for r in sent), default=0.0)
    end = load["end_s"] if load["cut"] else max(done, default=first)
    ttft = [r["chunk_s"][0] for r in streamed if r["chunk_s"]]
    itl = [b - a for r in streamed for a, b in zip(r["chunk_s"], r["chunk_s"][1:])]
    tpot = [(r["chunk_s"][-1] - r["chunk_s"][0]) / (tokens(r) - 1) for r in ok
            if tokens(r) > 1 and len(r["chunk_s"]) > 1]
    prompt = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    return {
        "rate": rate, "requests": len(reqs), "offered_rate": len(reqs) / span if span else None,
        "achieved_rate": (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else None,
        "completed": len(ok), "unfinished": len(load["cut"]), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "stopped_early": sum(r["finish_reason"] != "length" for r in ok),
        "no_first_token": sum(not r["chunk_s"] for r in load["cut"]),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "output_tokens": out, "output_tokens_per_s": out / (end - first) if end > first else 0.0,
        "tokens_counted_from": counted,
        "prompt_tokens_mean": sum(prompt) / len(prompt) if prompt else None,
        "send_lag_p99_s": percentile([r["lag_s"] for r in sent], 99),
    }


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(runs: list[dict]) -> str:
    """The runs side by side, one line per server and rate."""
    head = (f"{'server':<18}{'rate':>6}{'offered':>8}{'achieved':>9}{'done':>11}{'cut':>6}{'err':>5}"
            f"{'ttft p50':>9}{'p99':>7}{'itl p50':>8}{'p99':>7}{'tok/s':>8}")
    lines = [head]
    for r in sorted((r for r in runs if "rate" in r), key=lambda r: (r["rate"], r["server"])):
        lines.append(
            f"{r['server']:<18}{r['rate']:>6g}{fmt(r['offered_rate'], '.2f'):>8}"
            f"{fmt(r['achieved_rate'], '.2f'):>9}{str(r['completed']) + '/' + str(r['requests']):>11}"
            f"{r['unfinished']:>6}{r['errors']:>5}"
            f"{fmt(r['ttft_p50_s']):>9}{fmt(r['ttft_p99_s']):>7}{fmt(r['itl_p50_s']):>8}"
            f"{fmt(r['itl_p99_s']):>7}{r['output_tokens_per_s']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    # benchmarks/decode.py, beside this script (the tests load this file by path, without it on sys.path)
    from decode import emitter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder to serve (starts a server here); or use --url")
    p.add_argument("--url", help="an already running server instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model-name", default=None, help="model name for --url (default: the server's first)")
    p.add_argument("--api-key", default=None, help="bearer key for --url (default: none)")
    p.add_argument("--rates", type=float, nargs="+", default=[2, 8, 32],
                   help="request arrival rates, requests/s, one run each (default: 2 8 32; on an H200 "
                        "with bench-moe-1b the last saturates r1lab serve)")
    p.add_argument("--duration", type=float, default=30,
                   help="seconds of arrivals per rate (default: 30)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per rate instead of --duration (default: 0 = use --duration)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                   help="prompt length, uniform, in one-token words (default: 16 256)")
    p.add_argument("--max-tokens", type=int, nargs=2, default=[32, 480], metavar=("MIN", "MAX"),
                   help="max_tokens per request, uniform (default: 32 480, mean 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts (default: 0)")
    p.add_argument("--drain-timeout", type=float, default=60,
                   help="seconds after a rate's last arrival before requests still running are "
                        "cancelled and counted unfinished (default: 60)")
    p.add_argument("--burst", type=int, default=0, metavar="N",
                   help="instead of the rates: one closed burst of N streaming chats sent at once, each of the "
                        "--max-tokens range's top (the README's earlier serving numbers; default: 0 = off)")
    p.add_argument("--warmup", type=int, default=4,
                   help="concurrent requests of the longest prompt and max_tokens sent before the rates "
                        "(default: 4; 0 = none)")
    p.add_argument("--servers", nargs="+", choices=list(SERVERS), default=["r1lab", "transformers"],
                   metavar="SERVER",
                   help="servers to start on --model, one after the other: "
                        + "; ".join(f"{k}: {v}" for k, v in SERVERS.items())
                        + " (default: r1lab transformers)")
    p.add_argument("--device", default=None, help="cpu or cuda for the servers (default: cuda if any)")
    p.add_argument("--max-batch", type=int, default=64, help="r1lab serve's slots (default: 64)")
    p.add_argument("--transformers-args", default="",
                   help="more flags for transformers serve, one string, e.g. '--cb-use-cuda-graph "
                        "--compile' (default: none)")
    p.add_argument("--start-timeout", type=float, default=600,
                   help="seconds a started server has to answer /health (default: 600)")
    p.add_argument("--out", default=None, help="JSON file of all runs, rewritten after each (default: none)")
    args = p.parse_args()
    if not (args.model or args.url):
        p.error("give --model DIR (start a server) or --url URL")
    if args.prompt_words[0] < 1 or args.max_tokens[0] < 1:
        p.error("--prompt-words and --max-tokens take ranges of at least 1")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf_version = None
    results = {"benchmark": "serve_load", "args": vars(args), "device": device,
               "transformers": tf_version, "commands": {}, "runs": []}
    emit = emitter(results, args.out)
    servers, failed = (["url"] if args.url else args.servers), []
    for kind in servers:
        try:
            if kind == "url":
                bench(kind, None, args.url, args, emit)
                continue
            with serving(kind, args, device) as (proc, url):
                results["commands"][kind] = shlex.join(proc.args)
                on = f"{device}, transformers {tf_version}" if kind != "r1lab" else device
                print(f"{kind} ({on}): {shlex.join(proc.args)}", flush=True)
                bench(kind, proc, url, args, emit)
        except Exception as e:  # noqa: BLE001 - one server failing must not lose the other's runs
            failed.append(kind)
            why = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
            emit({"server": kind, "failed": why})
    print(table(results["runs"]))
    # the peer fails soft: an error only where r1lab (or --url) failed, or every server did
    if set(failed) - {"transformers", "transformers-nocb"} or len(failed) == len(servers):
        sys.exit(1)


@contextmanager
def serving(kind: str, args, device: str):
    """Start `kind`'s server (one of SERVERS) on args.model -> (its process, its /v1 URL);
    stops it at the end and writes its output beside --out (OUT.KIND.log) if given."""
    port = free_port()
    log = f"{args.out}.{kind}.log" if args.out else None
    try:
        if kind == "r1lab":
            proc = start_server(args.model, port, max_batch=args.max_batch, timeout=args.start_timeout,
                                extra=["--device", device, "--max-connections", "4096"])
        else:
            proc = start_transformers(args.model, port, device, shlex.split(args.transformers_args),
                                      args.start_timeout, continuous_batching=kind == "transformers")
    except RuntimeError as e:  # it did not start: keep what it printed
        if log:
            with open(log, "w") as f:
                f.write(str(e))
        raise
    out = None
    try:
        yield proc, f"http://127.0.0.1:{port}/v1"
    except Exception as e:  # a client sees "An error occurred during streaming": the cause is in here
        out = stop_server(proc)
        raise RuntimeError(f"{type(e).__name__}: {e}\nthe server's output ends:\n{out[-3000:]}") from e
    finally:
        out = stop_server(proc) if out is None else out
        if log:
            with open(log, "w") as f:
                f.write(out)


def bench(kind: str, proc: subprocess.Popen | None, url: str, args, emit) -> None:
    """The warm-up, then one open-loop run per rate against the server at url, each emitted."""
    if kind.startswith("transformers"):
        # the folder as it was given; 5.17's /v1/models fails (500) where the hub cache folder is missing
        name = os.path.abspath(args.model)
    elif kind == "r1lab":
        name = os.path.basename(os.path.realpath(args.model))  # r1lab serve's default name
    elif args.model_name:
        name = args.model_name
    else:
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/models", headers=auth)) as r:
            name = json.load(r)["data"][0]["id"]
    if args.warmup:
        rng = random.Random(args.seed)
        warm = [{"at": 0.0, "prompt": " ".join(rng.choices(WORDS, k=args.prompt_words[1])),
                 "max_tokens": args.max_tokens[1]}] * args.warmup
        res = asyncio.run(open_loop(url, name, warm, args.temperature, args.start_timeout,
                                    args.api_key))["results"]
        if all("error" in r for r in res):
            raise RuntimeError("every warm-up request failed, the first with "
                               + (res[0]["error"] if res else "none finishing in --start-timeout"))
    if args.burst:  # the closed burst instead of the rates: N streams at once, max_tokens the range's top
        burst = asyncio.run(run_load(url, name, args.burst, args.max_tokens[1], args.temperature, args.api_key))
        emit({"server": kind, "burst": args.burst, "max_tokens": args.max_tokens[1]}
             | {k: v for k, v in burst.items() if k != "results"})
        return
    for rate in args.rates:
        reqs = make_requests(rate, args.seed, args.duration, args.requests, args.prompt_words,
                             args.max_tokens)
        load = asyncio.run(open_loop(url, name, reqs, args.temperature, args.drain_timeout, args.api_key))
        span = reqs[-1]["at"] if args.requests and reqs else args.duration
        emit({"server": kind} | summarize(rate, reqs, load, span))
        if load["cut"]:  # time for the server to see the closed streams and free their slots
            time.sleep(5)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")

if __name__ == "__main__":
    main()
