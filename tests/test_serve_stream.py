"""The server's streaming pieces: the reasoning splitter agrees with `split_reasoning` (its whole-text twin) for
every chunking, and token-by-token text equals the engine's final text with stop strings held back."""

import random

import pytest

from r1lab.serve.stream import ReasoningSplitter, TextStream, split_text
from r1lab.tokenizer import load_tokenizer, split_reasoning

PIECES = ["a", "b c", " ", "\n", "\n\n", "<", "/", "think", ">", "<th", "</", "ink>", "é", "2+2=4", "x<y", " </t"]


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]


def _stream(text: str, chunks: list[str], started: bool = False) -> tuple[str | None, str]:
    sp = ReasoningSplitter(started)
    r = c = ""
    for ch in chunks:
        dr, dc = sp.feed(ch)
        r, c = r + dr, c + dc
    dr, dc = sp.flush()
    return (r + dr if sp.thinking else None), c + dc


def _body(rng: random.Random, tags: bool) -> str:
    while True:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))
        if tags or ("<think>" not in text and "</think>" not in text):
            return text


def test_splitter_matches_split_reasoning_for_any_chunking():
    rng = random.Random(0)
    for _ in range(3000):
        ws = rng.choice(["", " ", "\n"])
        kind = rng.randrange(3)
        # Texts on which the streaming rule and split_reasoning agree: a think block at the start, or no tags.
        if kind == 0:
            text = ws + "<think>" + _body(rng, False) + rng.choice(["", "</think>" + _body(rng, True)])
        else:
            text = ws + _body(rng, False)
            if text.lstrip().startswith("<") or "</think>" in text or "<think>" in text:
                continue
        expected = split_reasoning(text)
        assert _stream(text, [text]) == expected, text
        assert _stream(text, list(text)) == expected, text  # one character at a time: every tag split
        assert _stream(text, _chunks(text, rng)) == expected, text
        if kind != 0:  # the prompt opened the think block (R1-style "<think>\n" generation prompt)
            expected = split_reasoning(text, started_in_prompt=True)
            assert _stream(text, _chunks(text, rng), started=True) == expected, text


@pytest.mark.parametrize("text, chunks, expected", [
    ("<think>\nplan\n</think>\n\nanswer", ["<th", "ink>\npl", "an\n</thi", "nk>\n\n", "answer"], ("plan", "answer")),
    ("<think>no end", ["<think>no end"], ("no end", "")),
    ("plain answer <think>kept</think>", ["plain ans", "wer <think>kept</think>"],
     (None, "plain answer <think>kept</think>")),  # not at the start: verbatim content
    ("<thin", ["<thin"], (None, "<thin")),  # a partial tag at the end is text after all
    ("  ", [" ", " "], (None, "")),
])
def test_splitter_by_hand(text, chunks, expected):
    assert _stream(text, chunks) == expected
    assert split_text(text) == expected


def test_splitter_streams_before_the_end():
    sp = ReasoningSplitter()
    assert sp.feed("<think>\n") == ("", "")
    assert sp.feed("step one ") == ("step one", "")  # trailing space held until more text comes
    assert sp.feed("two</th") == (" two", "")  # a possible </think> is held
    assert sp.feed("ink>\n\nYes") == ("", "Yes")


def test_split_text_prefix_is_not_returned():
    # DeepSeek prefix completion: the assistant turn already holds "<think>\n"; only the continuation comes back.
    assert split_text("I see.</think>It is 4.", prefix="<think>\n") == ("I see.", "It is 4.")
    assert split_text("still thinking", prefix="<think>\n") == ("still thinking", "")


def test_text_stream_equals_final_text_with_stop_held_back():
    tok = load_tokenizer()
    text = "Hello wörld, this is 🙂 a test. STOP here and more"
    ids = tok.encode(text)
    for stop in (None, ["STOP"], ["ST", "🙂 a t"]):
        ts = TextStream(tok, stop)
        sent = "".join(ts.push(t) for t in ids)
        final = tok.decode(ids)
        cuts = [final.find(s) for s in stop or [] if s in final]
        final = final[: min(cuts)] if cuts else final
        assert final.startswith(sent)  # nothing past a stop string (or half a character) was ever sent
        assert not any(s in sent for s in stop or [])
        assert sent + ts.finish(final) == final
    # an emoji split over byte tokens is never sent half-way
    ts = TextStream(tok)
    assert all("\ufffd" not in ts.push(t) for t in tok.encode("🙂🙂"))
