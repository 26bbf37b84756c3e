"""OpenAI-compatible HTTP API over the engine, and the chat page.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streamed over server-sent events when
"stream": true), GET /v1/models, GET /health, GET / (the page). Chat responses carry the reasoning (inside
<think>) as `reasoning_content`, apart from `content`, as DeepSeek's API does. A last assistant message with
"prefix": true is continued rather than answered (DeepSeek's chat prefix completion), e.g. "<think>\\n" to make
R1 start by reasoning.

Function calling: `tools` and `tool_choice` as OpenAI takes them (see `tool_mode`); the tools are rendered into
the system prompt (r1lab.tools), the model's tool-call block comes back as `tool_calls` with finish_reason
"tool_calls" (streamed as OpenAI streams them: each call's id, type and name, then its arguments, then the
finish), and a malformed block as plain content.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 malformed JSON (lone surrogates,
nesting too deep, integers of over 4,300 digits included) or a request that cannot be served (max_tokens beyond
the context, n above the slots, bad messages), 401 wrong API key, 403 a Host header not allowed, 404 unknown
model or route, 408 a body too slow to arrive, 413 a body over 8 MB or a prompt that fills the context, 415 a
POST that is not application/json, 422 missing, wrong-typed or out-of-range fields. The checks before the API
(guard.py) defend against hostile clients; the README's "Security" section says what they cover.

Prompts are tokenised in worker threads (the BPE releases the GIL), after a check by character count that
rejects a text no context could hold without tokenising it. Chat message content is encoded as plain text:
only the template writes turn markers. A /v1/completions prompt is the client's own whole text and keeps its
markers as tokens (as in vLLM and llama.cpp's server): a token-id prompt may hold any id anyway.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..engine import SamplingParams
from ..tools import call_prefix, check_tools, parse_tool_calls
from .guard import Gate, bearer_ok, check_api_key, guarded_protocol, openai_error
from .stream import ReasoningSplitter, TextStream, ToolCallSplitter, split_text
from .worker import EngineWorker, Handle

MAX_BODY_BYTES = 8 << 20
STATIC = Path(__file__).parent / "static"
# "\ud800"-"\udfff" escapes: json.loads admits one without its pair, which no tokenizer or UTF-8 reply can carry
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DISCONNECTED = object()  # posted to a request's event queue when its client goes away


# ---------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; unknown fields (OpenAI has many) are ignored
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object as text, rendered back as written


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    prefix: bool = False  # DeepSeek chat prefix completion: continue this (last, assistant) message
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message's call (the template goes by order; accepted, not needed)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    # checked by tools.check_tools and tool_mode (400 with the field named), not by the schema (422)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted; the model may always make several calls


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _sse_error(e: APIError) -> str:
    return "data: " + json.dumps({"error": {"message": e.message, "type": e.type, "param": e.param,
                                            "code": e.code}}) + "\n\n"


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("function-after",)))]
    param = ".".join(loc) or None
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return APIError(422, f"{param or 'body'}: {err['msg']}", param, code)


# ---------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str, api_key: str | None = None, *, host: str = "127.0.0.1",
               allowed_hosts=(), allowed_origins=(), request_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine` (its own thread runs the engine while the app lives).

    host: the address the server is bound to, which decides the Host headers accepted; allowed_hosts and
    allowed_origins widen them (see guard.Gate); request_timeout: seconds a request body may take to arrive.
    """
    check_api_key(api_key)
    key = None if api_key is None else api_key.encode()
    tokenizer.encode("", split_special_tokens=True)  # build the plain-text BPE now, not in the first request
    worker = EngineWorker(engine)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="r1lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    created = int(time.time())
    if allowed_origins:  # CORS headers only for the origins asked for; none by default
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    # outermost (added last): Host, key and Content-Type of POSTs, body size and time, before anything else
    app.add_middleware(Gate, api_key=api_key, bind_host=host, allowed_hosts=allowed_hosts, max_body=MAX_BODY_BYTES,
                       body_timeout=request_timeout)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return openai_error(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return openai_error(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request, e: RequestValidationError):
        return openai_error(422, str(e.errors()[:1]), code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return openai_error(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                            code="internal_error")

    def check_key(request: Request) -> None:
        # POSTs are checked by the Gate before their body is read; this is for GET /v1/models
        if key is not None and not bearer_ok(request.scope["headers"], key):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    async def parse(request: Request, schema):
        body = await request.body()  # the Gate read it: at most MAX_BODY_BYTES, in time
        try:
            text = body.decode("utf-8")  # strict: a surrogate sent as raw bytes is not UTF-8
            data = json.loads(text)
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as e:  # bad JSON or UTF-8, or an integer of over 4,300 digits (Python's limit)
            why = "a number has too many digits" if "integer string conversion" in str(e) else e
            raise APIError(400, f"request body is not valid JSON: {why}", code="invalid_json") from None
        if _SURROGATE_ESCAPE.search(text):  # rare: only then look for one without its pair
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except (UnicodeEncodeError, RecursionError):
                raise APIError(400, "request body holds a lone surrogate escape (\\ud800-\\udfff without its "
                                    "pair), which is not text", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        # Validation runs on the event loop at ~0.3 us per list item (0.8 s for an 8 MB list of token ids):
        # refuse first the lists that could not fit the context, as every message or id takes a token.
        for field in ("messages", "prompt"):
            if isinstance(data.get(field), list) and len(data[field]) > engine.max_seq_len:
                raise APIError(413, f"{field} has {len(data[field]):,} items, more than this model's context of "
                                    f"{engine.max_seq_len} tokens can hold", field, "context_length_exceeded")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        return req

    def check_chars(chars: int, param: str) -> None:
        """Reject a text no context could hold by its length alone: tokenising megabytes costs seconds."""
        limit = tokenizer.max_token_chars * engine.max_seq_len
        if chars > limit:
            raise APIError(413, f"the prompt is {chars:,} characters, more than this model's context of "
                                f"{engine.max_seq_len} tokens can hold (a token spans at most "
                                f"{tokenizer.max_token_chars} characters)", param, "context_length_exceeded")

    def sampling(req: _Sampling, prompt_len: int, param: str = "messages") -> SamplingParams:
        room = engine.max_seq_len - prompt_len
        if room < 1:
            raise APIError(413, f"the prompt is {prompt_len} tokens; this model's context is {engine.max_seq_len} "
                                f"tokens, which leaves no room to generate", param, "context_length_exceeded")
        max_tokens = req.max_tokens or req.max_completion_tokens or room
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {prompt_len} prompt tokens exceed this model's context "
                                f"of {engine.max_seq_len} tokens; ask for at most {room}", "max_tokens",
                           "context_length_exceeded")
        n = 1 if req.n is None else req.n
        if n > engine.max_batch:
            raise APIError(400, f"n {n} exceeds the server's {engine.max_batch} sequence slots (--max-batch)", "n",
                           "invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop is not None and (len(stop) > 16 or not all(stop)):
            raise APIError(422, "stop must be up to 16 non-empty strings", "stop", "invalid_value")
        return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, max_tokens=max_tokens, n=n,
                              stop=stop or None, seed=req.seed)

    async def watch(request: Request, h: Handle) -> None:
        # The body is read, so the next message is the disconnect (or the end of our response).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        h.events.put_nowait(_DISCONNECTED)

    async def events(request: Request, h: Handle):
        """Yield the engine's event lists for a request; abort it as soon as the client leaves (the engine
        thread frees its slots before its next step) or we stop early."""
        watcher = asyncio.ensure_future(watch(request, h))
        try:
            while h.finished < h.total:
                batch = await h.events.get()
                if batch is _DISCONNECTED:
                    return
                if isinstance(batch, ValueError):
                    raise APIError(400, str(batch))
                if isinstance(batch, Exception):
                    raise APIError(500, str(batch), type="server_error", code="internal_error")
                h.finished += sum(done is not None for _, _, done in batch)
                yield batch
        finally:
            watcher.cancel()
            worker.cancel(h)  # no-op once every sequence finished

    async def collect(request: Request, h: Handle) -> dict:
        outs = {}
        async for batch in events(request, h):
            outs.update({i: done for i, _, done in batch if done is not None})
        if len(outs) < h.total:
            raise APIError(400, "client disconnected", code="client_disconnected")
        return outs

    def tool_mode(req: ChatRequest) -> tuple[list[dict] | None, list[str] | None, str]:
        """(tools to render or None, names a call may use or None, the forced start of the reply) from the
        request's `tools` and `tool_choice`: "none" renders no tools and parses no calls; "auto" lets the model
        choose; "required" and a named function start the reply with the tool-call block (skipping reasoning)."""
        tools, choice = req.tools, req.tool_choice
        if tools is not None:
            try:
                check_tools(tools)
            except ValueError as e:
                raise APIError(400, str(e), "tools", "invalid_value") from None
        names = [t["function"]["name"] for t in tools or []]
        if choice is None:
            choice = "auto" if tools else "none"
        if choice in ("none", "auto", "required"):
            if choice == "required" and not tools:
                raise APIError(400, "tool_choice 'required' needs tools", "tool_choice", "invalid_value")
            if choice == "none" or not tools:
                return None, None, ""
            return tools, names, call_prefix() if choice == "required" else ""
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in names:
                raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools "
                                    f"({', '.join(names) or 'none given'})", "tool_choice", "invalid_value")
            return tools, [name], call_prefix(name)
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {json.dumps(choice)[:200]}", "tool_choice", "invalid_value")

    async def chat_prompt(req: ChatRequest, tools: list[dict] | None, forced: str) -> tuple[list[int], str]:
        msgs = []
        for m in req.messages:
            d = {"role": m.role, "content": m.content}
            if isinstance(d["content"], list):
                d["content"] = "".join(p.text for p in d["content"])
            if m.tool_calls:  # the template renders a tool-call turn for any tool_calls key, even an empty list
                if m.role != "assistant":
                    raise APIError(400, f"only assistant messages may have tool_calls, not {m.role!r}", "messages",
                                   "invalid_value")
                d["tool_calls"] = [{"type": c.type, "function": {"name": c.function.name,
                                                                  "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            msgs.append(d)
        prefix = ""
        if req.messages[-1].prefix:
            if req.messages[-1].role != "assistant":
                raise APIError(400, "only a last assistant message may have prefix: true", "messages", "invalid_value")
            if forced:
                raise APIError(400, "tool_choice 'required' or a named function starts the reply with a tool call; "
                                    "it cannot continue an assistant prefix", "tool_choice", "invalid_value")
            prefix, msgs = msgs[-1]["content"] or "", msgs[:-1]
        calls_chars = sum(len(c["function"]["name"]) + len(c["function"]["arguments"])
                          for m in msgs for c in m.get("tool_calls", []))
        tools_chars = len(json.dumps(tools)) if tools else 0
        check_chars(sum(len(m["content"] or "") for m in msgs) + len(prefix) + calls_chars + tools_chars, "messages")

        def encode():  # in a worker thread: the event loop keeps serving meanwhile
            # content, the prefix included, is plain text: only the template writes turn markers; the forced
            # tool-call start is ours (markers and a checked function name)
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, tools=tools)
            return ids + tokenizer.encode(prefix, split_special_tokens=True) + tokenizer.encode(forced)

        try:
            return await asyncio.to_thread(encode), prefix
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """OpenAI's usage; cached_tokens: prompt tokens found in the engine's prefix cache."""
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def cached(outs) -> int:
        """Prefix-cache hits of a request's prompts (their samples share them: counted once per prompt)."""
        return sum(o.cached_tokens for o in outs if o.sample_index == 0)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        spec = {}
        if engine.speculate:  # speculative decoding: the MTP draft's counts since the server started
            st = engine.stats
            spec = {"speculate": engine.speculate, "speculative": {
                k: st[k] for k in ("drafted", "accepted", "acceptance_rate", "tokens_per_step")}}
        st = engine.stats  # the paged latent cache: pages in use, kept for the prefix cache, free; hits
        cache = {k: st[k] for k in ("cache_tokens", "page_size", "pages_total", "pages_used", "pages_cached",
                                    "pages_free", "cache_use", "prompt_tokens", "cached_tokens", "preemptions")}
        return {"status": "ok", "model": model_name, "max_batch": engine.max_batch,
                "max_seq_len": engine.max_seq_len, **worker.stats, **spec, "cache": cache}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "r1lab", "max_model_len": engine.max_seq_len}]}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        tools, names, forced = tool_mode(req)
        ids, prefix = await chat_prompt(req, tools, forced)
        params = sampling(req, len(ids))
        h = worker.submit([ids], params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": model_name, "system_fingerprint": None}

        if not req.stream:
            outs = await collect(request, h)
            choices = []
            for i in range(params.n):
                # a forced tool-call start is the model's reply as much as what it generated after it
                reasoning, content = split_text(forced + outs[i].text, prefix)
                msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
                finish = outs[i].finish_reason
                parsed = parse_tool_calls(content, names) if names else None
                if parsed is not None:  # else a malformed call stays content, with the engine's finish reason
                    msg["content"], finish = parsed[0] or None, "tool_calls"
                    msg["tool_calls"] = [_tool_call(c) for c in parsed[1]]
                choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": finish})
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": usage(len(ids), sum(len(o.token_ids) for o in outs.values()), cached(outs.values()))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            texts = [TextStream(tokenizer, params.stop) for _ in range(params.n)]
            splitters = [ReasoningSplitter() for _ in range(params.n)]
            calls = [ToolCallSplitter(names) for _ in range(params.n)] if names else None
            for i, sp in enumerate(splitters):
                sp.feed(prefix)  # the assistant turn's given start is not part of the answer
                if forced:  # but a forced tool-call start is (it holds no reasoning)
                    calls[i].feed(sp.feed(forced)[1])
            chunk = lambda choices, **extra: "data: " + json.dumps(  # noqa: E731
                {**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)])
            completion_tokens, cached_tokens = 0, 0
            try:
                async for batch in events(request, h):
                    merged: dict[int, list] = {}  # a step may bring a choice two tokens (prefill + decode)
                    for i, t, done in batch:
                        text = texts[i].push(t) if done is None else texts[i].finish(done.text)
                        r, c = splitters[i].feed(text)
                        found = None
                        if done is not None:
                            r2, c2 = splitters[i].flush()
                            r, c = r + r2, c + c2
                            completion_tokens += len(done.token_ids)
                            cached_tokens += cached([done])
                        if calls:
                            c = calls[i].feed(c)
                            if done is not None:
                                c2, found = calls[i].finish()
                                c += c2
                        m = merged.setdefault(i, ["", "", None, None])
                        m[0], m[1], m[2], m[3] = m[0] + r, m[1] + c, done.finish_reason if done else None, found
                    delta = lambda r, c: {k: v for k, v in (("reasoning_content", r), ("content", c)) if v}  # noqa: E731
                    choices = [{"index": i, "delta": delta(r, c), "logprobs": None, "finish_reason": f}
                               for i, (r, c, f, found) in merged.items() if (r or c or f) and not found]
                    if choices:
                        yield chunk(choices)
                    for i, (r, c, _, found) in merged.items():
                        if not found:
                            continue
                        # as OpenAI streams calls: id, type and name first, then the arguments, then the finish
                        if r or c:
                            yield chunk([{"index": i, "delta": delta(r, c), "logprobs": None, "finish_reason": None}])
                        for k, call in enumerate(found):
                            tc = _tool_call(call)
                            first = {**tc, "function": {"name": call.name, "arguments": ""}}
                            for part in ({**first, "index": k}, {"index": k, "function": {"arguments": call.arguments}}):
                                yield chunk([{"index": i, "delta": {"tool_calls": [part]}, "logprobs": None,
                                              "finish_reason": None}])
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}])
            except APIError as e:  # the status line is already sent: report it in the stream
                yield _sse_error(e)
                return
            finally:
                worker.cancel(h)  # the client left mid-stream: free its slots now
            if include_usage:
                yield chunk([], usage=usage(len(ids), completion_tokens, cached_tokens))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt", "invalid_value")
        for p in prompts:
            check_chars(len(p) if isinstance(p, str) else 0, "prompt")
        # in a worker thread; the client's own whole text, so its markers are tokens (see the module docstring)
        encoded = await asyncio.to_thread(lambda: [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts])
        ids = []
        for p_ids in encoded:
            if not p_ids:
                raise APIError(400, "prompt is empty", "prompt", "invalid_value")
            if min(p_ids) < 0 or max(p_ids) >= engine.model.config.vocab_size:
                raise APIError(400, f"prompt token ids must be in [0, {engine.model.config.vocab_size})", "prompt",
                               "invalid_value")
            ids.append(p_ids)
        params = sampling(req, max(map(len, ids)), "prompt")
        if len(ids) * params.n > engine.max_batch:
            raise APIError(400, f"{len(ids)} prompts x n {params.n} exceed the server's {engine.max_batch} slots",
                           "n", "invalid_value")
        h = worker.submit(ids, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        prompt_tokens = sum(map(len, ids))
        total = len(ids) * params.n

        if not req.stream:
            outs = await collect(request, h)
            choices = [{"index": i, "text": outs[i].text, "logprobs": None, "finish_reason": outs[i].finish_reason}
                       for i in range(total)]
            return {**head, "choices": choices,
                    "usage": usage(prompt_tokens, sum(len(o.token_ids) for o in outs.values()),
                                   cached(outs.values()))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            texts = [TextStream(tokenizer, params.stop) for _ in range(total)]
            completion_tokens, cached_tokens = 0, 0
            try:
                async for batch in events(request, h):
                    merged: dict[int, list] = {}
                    for i, t, done in batch:
                        text = texts[i].push(t) if done is None else texts[i].finish(done.text)
                        if done is not None:
                            completion_tokens += len(done.token_ids)
                            cached_tokens += cached([done])
                        m = merged.setdefault(i, ["", None])
                        m[0], m[1] = m[0] + text, done.finish_reason if done else None
                    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                               for i, (t, f) in merged.items() if t or f]
                    if choices:
                        yield "data: " + json.dumps({**head, "choices": choices}) + "\n\n"
            except APIError as e:  # the status line is already sent: report it in the stream
                yield _sse_error(e)
                return
            finally:
                worker.cancel(h)
            if include_usage:
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage(
                    prompt_tokens, completion_tokens, cached_tokens)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _tool_call(call) -> dict:
    """An OpenAI tool_calls entry for a parsed call, with a fresh id."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, max_seq_len: int | None = None, device: str | None = None,
          model_name: str | None = None, allowed_hosts=(), allowed_origins=(), request_timeout: float = 30.0,
          max_connections: int = 512, speculate: int = 0, lora: str | None = None,
          cache_tokens: int | None = None) -> None:
    """Load a checkpoint (and merge a LoRA adapter folder into it) and serve it until interrupted (the arguments
    are `r1lab serve`'s flags)."""
    import torch
    import uvicorn

    from ..checkpoint import load_pretrained
    from ..engine import Engine
    from ..tokenizer import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_pretrained(model_dir, device=device, dtype=dtype)
    if lora:  # folded into the weights once: the engine then serves at the base model's speed
        from ..lora import load_adapter, merge_and_unload

        merge_and_unload(model, load_adapter(model, lora))
    tok = load_tokenizer(model_dir)
    engine = Engine(model, tok, max_batch=max_batch, max_seq_len=max_seq_len, cache_tokens=cache_tokens,
                    speculate=speculate)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(engine, tok, name, api_key, host=host, allowed_hosts=allowed_hosts,
                     allowed_origins=allowed_origins, request_timeout=request_timeout)
    max_connections = _fit_open_files(max_connections)
    print(f"r1lab serve: {name} on {device}, {max_batch} slots, {engine.max_seq_len} positions per sequence, "
          f"{engine.cache_tokens} in the paged cache, "
          f"http://{host}:{port}/ (API under /v1)", flush=True)
    # uvicorn's own limit_concurrency is not used: it answers 503 to every request past the limit, /health too
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                http=guarded_protocol(request_timeout, max_connections), backlog=min(2048, max_connections))


def _fit_open_files(max_connections: int, spare: int = 256) -> int:
    """Raise the open-file limit to admit 3 x max_connections sockets (those open, a batch accepted before the
    cap evicts, as many closing) plus `spare` files (model, tokenizer, pipes); if the hard limit forbids it,
    lower max_connections and say so."""
    try:
        import resource  # Unix only
    except ImportError:
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if soft < want:
            max_connections = max(1, (soft - spare) // 3)
            print(f"r1lab serve: the open-file limit is {soft}: --max-connections lowered to {max_connections}",
                  flush=True)
    return max_connections
