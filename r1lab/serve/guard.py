"""What the server checks before a request reaches the API: the defences against hostile clients (issue 24).

Two layers, because uvicorn exposes some things only to one of them:
- `Gate`, ASGI middleware, sees each request: the Host header (DNS rebinding), the API key and Content-Type
  of POSTs (CSRF: a page can POST text/plain or a form to another origin without asking, never
  application/json, for which the browser first asks for CORS headers that only --allowed-origins grants),
  the body's size (by Content-Length before reading, by counting while reading) and time (slow bodies get
  408). It hands the API the whole body, so a client that leaves mid-body costs one log line, not a traceback.
- `guarded_protocol()`, uvicorn's h11 protocol with two limits uvicorn lacks: a request head must arrive
  within the timeout, and at most `max_connections` connections are open; at the cap a new connection closes
  the one that has been sending its request the longest, so slow clients cannot crowd out /health.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import time

from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")  # uvicorn prints it (at --log-level warning and above)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status,
                        headers=headers)


def check_api_key(key: str | None) -> None:
    """Raise ValueError for a key no client could send: empty, or with surrounding whitespace."""
    if key is not None and (not key.strip() or key != key.strip()):
        raise ValueError(f"--api-key {key!r} is empty or starts or ends with whitespace, which a bearer token "
                         "cannot carry: give a non-empty key, or leave --api-key out to serve without one")


def bearer_ok(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Whether raw ASGI headers carry 'Authorization: Bearer <key>'. Bytes on both sides: a UTF-8 key (not
    ASCII) matches the bytes a client sends; constant time in the token."""
    given = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = given.partition(b" ")
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gate:
    """ASGI middleware in front of the API (see the module docstring).

    bind_host: the address the server listens on. Bound to loopback, the Host header must name loopback
    (localhost, *.localhost, 127.0.0.0/8, ::1); bound elsewhere, any IP address or this machine's name. Names in
    allowed_hosts are accepted too ("*": any Host). Bodies over max_body bytes get 413, and bodies not received
    within body_timeout seconds of the request head get 408.
    """

    def __init__(self, app, *, api_key: str | None, bind_host: str, allowed_hosts=(), max_body: int,
                 body_timeout: float):
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.loopback_only = _is_loopback(bind_host)
        self.hosts = {h.lower().rstrip(".") for h in allowed_hosts}
        if not self.loopback_only:
            self.hosts.add(socket.gethostname().lower())
        self.max_body, self.body_timeout = max_body, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check(scope)
        if refusal is None and scope["method"] == "POST":
            refusal = self._check_post(scope)
            if refusal is None:
                body = await self._read_body(scope, receive)
                if body is None:  # the client left: nobody to answer
                    return
                if isinstance(body, JSONResponse):
                    refusal = body
                else:
                    receive = _replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    # ------------------------------------------------------------ checks
    def _check(self, scope) -> JSONResponse | None:
        for k, host in scope["headers"]:
            if k == b"host" and not self._host_allowed(host.decode("latin-1")):
                return openai_error(
                    403, f"Host {host.decode('latin-1')!r} is not one this server answers to (a DNS rebinding "
                         "defence); to reach it by that name, start it with --allowed-hosts NAME",
                    code="host_not_allowed", type="permission_error")
        return None

    def _host_allowed(self, host: str) -> bool:
        name = host.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".")
        if "*" in self.hosts or name in self.hosts or name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False  # a name this server was not told about: what a rebinding attack sends
        return ip.is_loopback or not self.loopback_only

    def _check_post(self, scope) -> JSONResponse | None:
        # Refusals before reading the body close the connection: the unread body is not worth receiving.
        close = {"Connection": "close"}
        headers = scope["headers"]
        if self.key is not None and not bearer_ok(headers, self.key):
            return openai_error(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", type="authentication_error", headers=close)
        ctype = next((v for k, v in headers if k == b"content-type"), b"")
        if ctype.partition(b";")[0].strip().lower() != b"application/json":
            return openai_error(415, f"Content-Type is {ctype.decode('latin-1')!r}; send the header "
                                     "'Content-Type: application/json' with a JSON body",
                                code="unsupported_media_type", headers=close)
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and int(length) > self.max_body:  # h11 admits only digits here
            return self._too_large(int(length))
        return None

    def _too_large(self, size: int, at_least: bool = False) -> JSONResponse:
        return openai_error(413, f"request body is {'over ' if at_least else ''}{size:,} bytes; at most "
                                 f"{self.max_body:,}", code="request_too_large", headers={"Connection": "close"})

    async def _read_body(self, scope, receive) -> bytes | JSONResponse | None:
        """The whole body; a refusal (413, 408); or None if the client disconnected (logged in one line)."""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        client = "%s:%d" % tuple(scope["client"]) if scope.get("client") else "a client"
                        log.warning("%s: connection closed while sending the body of %s %s (%s bytes received)",
                                    client, scope["method"], scope["path"], f"{size:,}")
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return self._too_large(size - len(chunk), at_least=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return openai_error(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                     f"({size:,} bytes came)", code="request_timeout",
                                headers={"Connection": "close"})


def _replay(body: bytes, receive):
    """An ASGI receive that yields the body read already, then whatever the connection sends (a disconnect)."""
    pending = True

    async def replay():
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _GuardedH11Protocol(H11Protocol):
    head_timeout: float = 30.0
    max_connections: int = 512

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) <= self.max_connections:
            return
        # (a connection closed a moment ago stays in the set until its connection_lost runs)
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) > self.max_connections:
            sending = [c for c in live if c is not self and c._sending_request()]
            victim = min(sending, key=lambda c: c._since) if sending else self
            if victim.cycle is None or victim.cycle.response_complete:  # else the Gate logs it, mid-body
                log.warning("%s: closed to make room for a new connection (--max-connections %d)",
                            victim._who(), self.max_connections)
            victim.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._head_timer is not None:  # a request head arrived
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        self._await_request()  # before super(), which may read a pipelined request head at once
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    # ------------------------------------------------------------
    def _await_request(self) -> None:
        self._since = time.monotonic()
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.warning("%s: no complete request head within %g s; connection closed", self._who(),
                        self.head_timeout)
            self.transport.close()

    def _sending_request(self) -> bool:
        """Whether the client still owes us its request (head or body): what a slow client looks like."""
        c = self.cycle
        return c is None or c.more_body or c.response_complete

    def _who(self) -> str:
        return "%s:%d" % tuple(self.client) if self.client else "a client"


def guarded_protocol(head_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class (pass as uvicorn's `http=`) with a request-head timeout and a connection
    cap that closes the slowest sender to admit a new connection (see the module docstring)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"head_timeout": head_timeout, "max_connections": max_connections})
