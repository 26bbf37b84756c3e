"""OpenAI-compatible HTTP API over the engine, and the chat page.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streamed over server-sent events when
"stream": true), GET /v1/models, GET /health, GET / (the page). Chat responses carry the reasoning (inside
<think>) as `reasoning_content`, apart from `content`, as DeepSeek's API does. A last assistant message with
"prefix": true is continued rather than answered (DeepSeek's chat prefix completion), e.g. "<think>\\n" to make
R1 start by reasoning.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 malformed JSON or a request
that cannot be served (max_tokens beyond the context, n above the slots, bad messages), 401 wrong API key,
404 unknown model or route, 413 a prompt that fills the context, 422 missing, wrong-typed or out-of-range
fields.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import SamplingParams
from .stream import ReasoningSplitter, TextStream, split_text
from .worker import EngineWorker, Handle

MAX_BODY_BYTES = 8 << 20
STATIC = Path(__file__).parent / "static"


# ---------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; unknown fields (OpenAI has many) are ignored
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    prefix: bool = False  # DeepSeek chat prefix completion: continue this (last, assistant) message


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


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error(status: int, message: str, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


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
def create_app(engine, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (its own thread runs the engine while the app lives)."""
    worker = EngineWorker(engine)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="r1lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request, e: RequestValidationError):
        return _error(422, str(e.errors()[:1]), code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    async def parse(request: Request, schema):
        check_key(request)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body is {len(body):,} bytes; at most {MAX_BODY_BYTES:,}",
                           code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        return req

    def sampling(req: _Sampling, prompt_len: int) -> SamplingParams:
        room = engine.max_seq_len - prompt_len
        if room < 1:
            raise APIError(413, f"the prompt is {prompt_len} tokens; this model's context is {engine.max_seq_len} "
                                f"tokens, which leaves no room to generate", "messages", "context_length_exceeded")
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

    async def events(request: Request, h: Handle, streaming: bool):
        """Yield the engine's event lists for a request; abort it if the client leaves or we stop early."""
        try:
            while h.finished < h.total:
                try:
                    batch = await asyncio.wait_for(h.events.get(), 1.0)
                except asyncio.TimeoutError:
                    # A non-streaming client that disconnects is only noticed by asking.
                    if not streaming and await request.is_disconnected():
                        return
                    continue
                if isinstance(batch, ValueError):
                    raise APIError(400, str(batch))
                if isinstance(batch, Exception):
                    raise APIError(500, str(batch), type="server_error", code="internal_error")
                h.finished += sum(done is not None for _, _, done in batch)
                yield batch
        finally:
            worker.cancel(h)  # no-op once every sequence finished

    async def collect(request: Request, h: Handle) -> dict:
        outs = {}
        async for batch in events(request, h, streaming=False):
            outs.update({i: done for i, _, done in batch if done is not None})
        if len(outs) < h.total:
            raise APIError(400, "client disconnected", code="client_disconnected")
        return outs

    def chat_prompt(req: ChatRequest) -> tuple[list[int], str]:
        msgs = [m.model_dump(exclude={"prefix"}) for m in req.messages]
        for m in msgs:
            if isinstance(m["content"], list):
                m["content"] = "".join(p["text"] for p in m["content"])
        prefix = ""
        if req.messages[-1].prefix:
            if req.messages[-1].role != "assistant":
                raise APIError(400, "only a last assistant message may have prefix: true", "messages", "invalid_value")
            prefix, msgs = msgs[-1]["content"] or "", msgs[:-1]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        return tokenizer.encode(text + prefix), prefix

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "max_batch": engine.max_batch,
                "max_seq_len": engine.max_seq_len, **worker.stats}

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
        ids, prefix = chat_prompt(req)
        params = sampling(req, len(ids))
        h = worker.submit([ids], params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": model_name, "system_fingerprint": None}

        if not req.stream:
            outs = await collect(request, h)
            choices = []
            for i in range(params.n):
                reasoning, content = split_text(outs[i].text, prefix)
                choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                         "reasoning_content": reasoning},
                                "logprobs": None, "finish_reason": outs[i].finish_reason})
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": usage(len(ids), sum(len(o.token_ids) for o in outs.values()))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            texts = [TextStream(tokenizer, params.stop) for _ in range(params.n)]
            splitters = [ReasoningSplitter() for _ in range(params.n)]
            for sp in splitters:
                sp.feed(prefix)  # the assistant turn's given start is not part of the answer
            chunk = lambda choices, **extra: "data: " + json.dumps(  # noqa: E731
                {**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)])
            completion_tokens = 0
            try:
                async for batch in events(request, h, streaming=True):
                    merged: dict[int, list] = {}  # a step may bring a choice two tokens (prefill + decode)
                    for i, t, done in batch:
                        text = texts[i].push(t) if done is None else texts[i].finish(done.text)
                        r, c = splitters[i].feed(text)
                        if done is not None:
                            r2, c2 = splitters[i].flush()
                            r, c = r + r2, c + c2
                            completion_tokens += len(done.token_ids)
                        m = merged.setdefault(i, ["", "", None])
                        m[0], m[1], m[2] = m[0] + r, m[1] + c, done.finish_reason if done else None
                    choices = [{"index": i, "delta": {k: v for k, v in (("reasoning_content", r), ("content", c)) if v},
                                "logprobs": None, "finish_reason": f} for i, (r, c, f) in merged.items() if r or c or f]
                    if choices:
                        yield chunk(choices)
            except APIError as e:  # the status line is already sent: report it in the stream
                yield _sse_error(e)
                return
            finally:
                worker.cancel(h)  # the client left mid-stream: free its slots now
            if include_usage:
                yield chunk([], usage=usage(len(ids), completion_tokens))
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
        ids = []
        for p in prompts:
            p_ids = tokenizer.encode(p) if isinstance(p, str) else p
            if not p_ids:
                raise APIError(400, "prompt is empty", "prompt", "invalid_value")
            if min(p_ids) < 0 or max(p_ids) >= engine.model.config.vocab_size:
                raise APIError(400, f"prompt token ids must be in [0, {engine.model.config.vocab_size})", "prompt",
                               "invalid_value")
            ids.append(p_ids)
        params = sampling(req, max(map(len, ids)))
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
                    "usage": usage(prompt_tokens, sum(len(o.token_ids) for o in outs.values()))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            texts = [TextStream(tokenizer, params.stop) for _ in range(total)]
            completion_tokens = 0
            try:
                async for batch in events(request, h, streaming=True):
                    merged: dict[int, list] = {}
                    for i, t, done in batch:
                        text = texts[i].push(t) if done is None else texts[i].finish(done.text)
                        if done is not None:
                            completion_tokens += len(done.token_ids)
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
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}) \
                    + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, max_seq_len: int | None = None, device: str | None = None,
          model_name: str | None = None) -> None:
    """Load a checkpoint and serve it until interrupted."""
    import torch
    import uvicorn

    from ..checkpoint import load_pretrained
    from ..engine import Engine
    from ..tokenizer import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_pretrained(model_dir, device=device, dtype=dtype)
    tok = load_tokenizer(model_dir)
    engine = Engine(model, tok, max_batch=max_batch, max_seq_len=max_seq_len)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(engine, tok, name, api_key)
    print(f"r1lab serve: {name} on {device}, {max_batch} slots x {engine.max_seq_len} positions, "
          f"http://{host}:{port}/ (API under /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
