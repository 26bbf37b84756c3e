"""The engine loop of the server: one thread owns the Engine (which is not thread-safe).

HTTP handlers run on the asyncio event loop. They submit requests through a thread-safe inbox; the engine
thread admits them between steps, runs `Engine.step()` while there is work, and hands each request the
tokens it produced through that request's asyncio queue (one message per request per step). Cancelling a
request (its client went away) aborts its sequences, which frees their slots before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass, field

from ..engine import Completion, Engine, SamplingParams


@dataclass
class Handle:
    """One HTTP request's sequences. `events` yields lists of (choice index, token, Completion or None), the
    Completion set when that choice finished; or an Exception if the engine failed."""

    loop: asyncio.AbstractEventLoop
    n: int  # samples per prompt
    total: int  # sequences: prompts x n
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seqs: list = field(default_factory=list)
    finished: int = 0  # sequences the handler has seen finish


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owner: dict[int, Handle] = {}  # id(seq) -> its request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r1lab-engine", daemon=True)
        self.stats = {"running": 0, "waiting": 0, "requests": 0, "aborted": 0, "tokens": 0, "steps": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ called from the event loop
    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Handle:
        """Queue prompts (token ids, already checked to fit the context); n samples each."""
        h = Handle(asyncio.get_running_loop(), n=params.n, total=len(prompts) * params.n)
        self._inbox.put(("add", h, prompts, params))
        return h

    def cancel(self, h: Handle) -> None:
        """Abort a request's unfinished sequences (a disconnected client): frees their slots. Idempotent."""
        if h.finished < h.total:
            self._inbox.put(("abort", h))

    # ------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain(block=not eng.has_work())
            if not eng.has_work():
                continue
            try:
                produced = eng.step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                traceback.print_exc()
                self._fail_all(e)
                continue
            self._dispatch(produced)
            self.stats["steps"] += 1
            self._count()

    def _count(self) -> None:
        eng = self.engine
        self.stats["running"] = sum(s is not None for s in eng.slots)
        self.stats["waiting"] = sum(len(g) for g in eng.waiting)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                self._handle(msg)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._count()

    def _handle(self, msg) -> None:
        kind, h = msg[0], msg[1]
        if kind == "add":
            prompts, params = msg[2], msg[3]
            try:
                for i, p in enumerate(prompts):
                    h.seqs += self.engine.add_request(p, params, prompt_index=i)
            except ValueError as e:  # the handler checks lengths first; this is a safety net
                self.engine.abort(h.seqs)
                _post(h, e)
                return
            for s in h.seqs:
                self._owner[id(s)] = h
            self.stats["requests"] += 1
        elif kind == "abort":
            live = [s for s in h.seqs if s.finish_reason is None]
            if live:
                self.engine.abort(live)
                self.stats["aborted"] += 1
            for s in h.seqs:
                self._owner.pop(id(s), None)

    def _dispatch(self, produced) -> None:
        out: dict[int, tuple[Handle, list]] = {}
        for s, t in produced:
            h = self._owner.get(id(s))
            if h is None:  # aborted meanwhile
                continue
            done: Completion | None = None
            if s.finish_reason is not None:
                done = self.engine.completion(s)
                del self._owner[id(s)]
            out.setdefault(id(h), (h, []))[1].append((s.prompt_index * h.n + s.sample_index, t, done))
        self.stats["tokens"] += len(produced)
        for h, events in out.values():
            _post(h, events)

    def _fail_all(self, e: Exception) -> None:
        handles = {id(h): h for h in self._owner.values()}.values()
        for h in handles:
            self.engine.abort(h.seqs)
            _post(h, RuntimeError(f"engine failed: {e}"))
        self._owner.clear()


def _post(h: Handle, item) -> None:
    try:
        h.loop.call_soon_threadsafe(h.events.put_nowait, item)
    except RuntimeError:  # its event loop is closed (server shutting down)
        pass
