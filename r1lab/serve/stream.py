"""Streaming text: token ids -> text deltas, and R1 text -> (reasoning, content) deltas.

Both work for any chunking, so a streamed response concatenates to exactly what the non-streamed one returns
(the non-streamed path runs the same code on the whole text at once).
"""

from __future__ import annotations

from ..tokenizer import THINK_END, THINK_START
from ..tools import TOOL_CALLS_BEGIN, ToolCall, parse_tool_calls


class TextStream:
    """Token ids of one sample -> text deltas that are safe to send.

    Holds back an incomplete UTF-8 character (the text ends in U+FFFD until its last byte arrives) and, when
    stop strings are set, the last len(longest stop) - 1 characters, which may be the start of a stop string
    the engine will cut off. `finish(final_text)` sends the rest of the engine's final text (stop string and
    end-of-sequence token removed); what was sent is always a prefix of it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.base, self.base_ids = "", 0  # text of ids[:base_ids], committed (ends on a whole character)
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        tail = self.tok.decode(self.ids[self.base_ids:])
        if tail.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            return ""
        text = self.base + tail
        if len(self.ids) - self.base_ids >= 8:  # decode only a short window per token
            self.base, self.base_ids = text, len(self.ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        visible = text[: min(cuts)] if cuts else text[: len(text) - self.hold]
        return self._send(visible)

    def finish(self, final_text: str) -> str:
        return self._send(final_text)

    def _send(self, visible: str) -> str:
        # Byte-level BPE decodes prefixes to prefixes, so `visible` extends what was sent; it never shrinks.
        delta = visible[len(self.sent):]
        self.sent += delta
        return delta


class _Stripped:
    """One part (reasoning or content) streamed without its leading and trailing whitespace, like str.strip():
    leading whitespace is dropped, trailing whitespace is held until more text follows."""

    def __init__(self):
        self.started, self.ws = False, ""

    def feed(self, s: str) -> str:
        if not self.started:
            s = s.lstrip()
            if not s:
                return ""
            self.started = True
        s = self.ws + s
        body = s.rstrip()
        self.ws = s[len(body):]
        return body


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag split across tokens)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Split R1 output into reasoning (between <think> and </think>) and content, incrementally.

    Rule: if the output starts (after whitespace) with <think>, or the prompt opened the think block
    (started_in_prompt), everything up to the first </think> is reasoning and the rest is content; otherwise all
    of it is content (tags, if any, kept verbatim). Both parts are stripped of surrounding whitespace. On such
    text this equals `r1lab.tokenizer.split_reasoning`, which needs the whole text (tests check they agree).
    `reasoning` is None when no think block was opened.
    """

    def __init__(self, started_in_prompt: bool = False):
        self.state = "reasoning" if started_in_prompt else "start"
        self.thinking = started_in_prompt
        self.buf = ""
        self.parts = (_Stripped(), _Stripped())

    def feed(self, text: str) -> tuple[str, str]:
        """Add text; returns the (reasoning, content) deltas that can be sent now."""
        self.buf += text
        r = c = ""
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_START):
                    self.buf, self.state, self.thinking = s[len(THINK_START):], "reasoning", True
                elif not s or THINK_START.startswith(s):  # may still become <think>
                    self.buf = s
                    return r, c
                else:
                    self.buf, self.state = s, "content"
            elif self.state == "reasoning":
                i = self.buf.find(THINK_END)
                if i >= 0:
                    r += self.parts[0].feed(self.buf[:i])
                    self.buf, self.state = self.buf[i + len(THINK_END):], "content"
                else:
                    keep = _partial_suffix(self.buf, THINK_END)
                    r += self.parts[0].feed(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return r, c
            else:
                c += self.parts[1].feed(self.buf)
                self.buf = ""
                return r, c

    def flush(self) -> tuple[str, str]:
        """End of output: the held-back text (a partial tag is plain text after all)."""
        r = c = ""
        if self.state == "reasoning":
            r = self.parts[0].feed(self.buf)
        else:
            c = self.parts[1].feed(self.buf)
        self.buf = ""
        return r, c


def split_text(text: str, prefix: str = "", started_in_prompt: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole completion: the streaming splitter run on it at once.
    prefix: text the assistant turn already holds (DeepSeek prefix completion), not part of the result."""
    sp = ReasoningSplitter(started_in_prompt)
    sp.feed(prefix)
    r1, c1 = sp.feed(text)
    r2, c2 = sp.flush()
    return (r1 + r2 if sp.thinking else None), c1 + c2


class ToolCallSplitter:
    """The content stream of a request with tools -> content deltas, and at the end the tool calls.

    Content passes through until the tool-call block opens (`<｜tool▁calls▁begin｜>`, one token, but held back
    while the text ends in what may be its start, and whitespace before it held as `str.strip()` would drop it);
    the block is then kept and parsed at the end (`tools.parse_tool_calls`). A malformed block is sent as content
    after all, so the stream always concatenates to the non-streamed response: content `parse_tool_calls(...)[0]`
    and its calls, or the whole content.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self.held = ""  # content not sent yet: trailing whitespace, or a partial marker
        self.block: str | None = None  # from the marker on, once it appeared

    def feed(self, content: str) -> str:
        if self.block is not None:
            self.block += content
            return ""
        s = self.held + content
        i = s.find(TOOL_CALLS_BEGIN)
        if i >= 0:
            head = s[:i].rstrip()
            self.held, self.block = s[len(head):i], s[i:]
            return head
        cut = len(s) - _partial_suffix(s, TOOL_CALLS_BEGIN)
        body = s[:cut].rstrip()
        self.held = s[len(body):]
        return body

    def finish(self) -> tuple[str, list[ToolCall] | None]:
        """The content still to send and the calls (None: no block, or a malformed one sent as content)."""
        if self.block is None:
            out, self.held = self.held.rstrip(), ""
            return out, None
        parsed = parse_tool_calls(self.block, self.names)
        if parsed is not None:
            return "", parsed[1]
        return self.held + self.block, None
