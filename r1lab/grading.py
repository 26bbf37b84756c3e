"""Grading math completions: pull out the final answer, decide if it equals the reference.

``extract_answer(text)`` finds the final answer of a completion; ``math_equal(predicted, reference)``
decides mathematical equivalence. No generation happens here, and nothing here needs torch.

How ``math_equal`` decides, cheapest first (most pairs stop at step 1 or 2):

1. both strings are normalised (``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\left``/``\\right``, spacing
   commands, ``$``, ``\\text{}`` wrappers, trailing units, degrees, percent, ``x =`` prefixes, letter
   choices ``(A)``) and compared as strings, case-insensitively;
2. plain numbers (``1,000``, ``-0.5``, ``3/4``, ``\\frac{3}{4}``, ``025``) are compared as exact
   fractions: two whole numbers must be equal, anything else within a relative tolerance of 1e-4
   (the bound the Qwen2.5-Math / DeepSeek-Math harnesses use; tight enough that ``0.33`` != ``1/3``);
3. structures are compared element by element, recursively: ordered tuples and intervals (bracket
   types must match: ``[1,3)`` != ``[1,3]``), unordered sets ``\\{...\\}`` and bare comma lists
   (``1, 2`` == ``2, 1``), unions of intervals, matrices (``pmatrix``/``bmatrix``, same shape);
4. otherwise both sides are turned into sympy expressions by a small LaTeX-to-sympy translator
   written here (no antlr) and compared: exact equality, then numeric value (relative 1e-4) for
   constant expressions, then ``simplify(a - b) == 0`` / ``a.equals(b)``.

Step 4 runs in a separate worker process (only stdlib + sympy loaded there) that is killed when a
comparison exceeds its time limit, so a hostile answer such as ``9^{9^{9^{9}}}`` costs ``timeout``
seconds and returns False instead of hanging the run: sympy evaluates such powers inside one C call
that no signal can interrupt, which is why ``signal.alarm`` alone is not enough.

Percent policy: ``50\\%`` == ``50`` and ``50\\%`` == ``0.5``, but ``50`` != ``0.5``. The ToRA /
Qwen2.5-Math / DeepSeek-Math graders accept reference x {1, 1/100, 100} for every numeric pair; here
that only applies when one side actually carries a percent sign, because unconditionally it would
accept ``12`` for ``0.12``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
from fractions import Fraction

__all__ = ["extract_answer", "math_equal"]

REL_TOL = 1e-4  # relative tolerance for non-integer numeric comparison (see module docstring)
# Longer answers skip the symbolic stage: real final answers are far shorter (MATH-500's longest
# reference has 53 characters), and sympy on thousands of symbols is slow even before any timeout.
MAX_SYMBOLIC_CHARS = 500
# Longer answers are not graded at all (False): this bounds the time of the string stages too.
MAX_ANSWER_CHARS = 2000


# ----- extraction ------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox|framebox)\b")
_ANSWER_PHRASE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is\b|:)[\s:*]*(.*)", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(.*)")
# A number: optional sign (not a minus between two terms, as in "5-3"), thousands groups or plain
# digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?(?:/\d+)?")


def _strip_reasoning(text: str) -> str | None:
    """The completion without its reasoning; None when a ``<think>`` block never closes."""
    # One left-to-right pass; each find() resumes where the last one stopped, so this stays linear
    # even on many unclosed tags (a non-greedy regex would be quadratic there).
    kept: list[str] = []
    pos, opening, closing = 0, text.find("<think>"), text.find("</think>")
    while True:
        if closing != -1 and (opening == -1 or closing < opening):
            # A lone </think>: the prompt opened the block, so everything before it is reasoning.
            kept, pos = [], closing + len("</think>")
            closing = text.find("</think>", pos)
        elif opening == -1:
            kept.append(text[pos:])
            return " ".join(kept)
        elif closing == -1:
            return None  # reasoning that never finished
        else:  # a block <think> ... </think>, closing > opening
            kept.append(text[pos:opening])
            pos = closing + len("</think>")
            opening, closing = text.find("<think>", pos), text.find("</think>", pos)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """``text[start]`` is ``{``: return (content, index after the matching ``}``), None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1 : i] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its matching ``}`` (escaped ``\\{``, ``\\}`` skipped), in one pass."""
    pairs, stack = {}, []
    for i, ch in enumerate(text):
        if ch in "{}" and text[i - 1 : i] != "\\":
            if ch == "{":
                stack.append(i)
            elif stack:
                pairs[stack.pop()] = i
    return pairs


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{}`` / ``\\framebox{}`` / ``\\boxed x``."""
    matches = list(_BOXED.finditer(text))
    pairs = _brace_pairs(text) if matches else {}
    for match in reversed(matches):
        i = match.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if text[i : i + 1] == "{":
            if i in pairs:  # an unbalanced (truncated) box does not count
                return text[i + 1 : pairs[i]].strip()
        elif i > match.end() and i < len(text):
            # "\boxed 5$": the argument runs to the end of the math (a $ or the line).
            return re.split(r"[$\n]", text[i : i + 200], maxsplit=1)[0].strip().rstrip(".").strip() or None
    return None


def _clean_phrase(text: str) -> str | None:
    # The sentence ends at a period that is not a decimal point, or at the end of the line.
    text = re.split(r"\.(?=\s|\$|\*|$)", text, maxsplit=1)[0]
    text = re.sub(r"^(?:therefore|thus|hence|so|then|simply|just|clearly)\b[\s,:]*", "", text.strip(), flags=re.I)
    # "the answer is 15 * 8 = 120 pints": the result is the last side of a chain of equalities
    # (but "x = 1, y = 2" is an answer made of several assignments, kept whole).
    if not re.search(r",\s*\\?[a-zA-Z]\w*\s*=", text):
        text = text.rsplit("=", 1)[-1]
    text = text.strip().strip("*").strip().strip("$").strip().rstrip(".").strip()
    return text or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None when it has none.

    Tried in this order, the first that matches wins:

    1. the content of the last ``<answer>...</answer>`` block (its last ``\\boxed{}`` if it has one);
    2. the last complete ``\\boxed{...}`` (nested braces respected), ``\\boxed x``, ``\\fbox{}``,
       ``\\framebox{}``;
    3. the last "the answer is ..." / "final answer is ..." / "Final answer: ..." phrase: the rest of
       that sentence or line, without markdown ``**``, ``$`` and a trailing period;
    4. GSM8K's ``#### N``;
    5. the last number in the text (integer, decimal, ``1,000``, negative, ``3/4``), commas removed.

    In a phrase, filler ("the answer is therefore 3") is dropped and of a chain of equalities only
    the last side is kept ("the final answer is 15 * 8 = 120"). GSM8K's ``<<48/2=24>>`` calculator
    annotations are removed before any search.

    Reasoning is never searched: ``<think>...</think>`` blocks are removed, and a ``</think>``
    without an opening tag (the prompt opened the block, as R1 prompts do) drops everything before
    it. A ``<think>`` that is never closed means the model did not finish reasoning (typically it hit
    the length limit), so the completion has no answer and this returns None, even if the
    unfinished reasoning contains a number: grading it would reward truncated outputs.
    """
    if not isinstance(text, str):
        return None
    text = _strip_reasoning(text)
    if text is None:
        return None
    text = re.sub(r"<<[^<>]*>>", "", text)  # GSM8K calculator annotations: "48/2 = <<48/2=24>>24"

    close = text.rfind("</answer>")
    open_ = text.rfind("<answer>", 0, close) if close != -1 else -1
    if open_ != -1 and text[open_ + len("<answer>") : close].strip():
        content = text[open_ + len("<answer>") : close]
        return _last_boxed(content) or content.strip().strip("$").strip() or None

    boxed = _last_boxed(text)
    if boxed:
        return boxed

    phrases = _ANSWER_PHRASE.findall(text)
    for phrase in reversed(phrases):
        cleaned = _clean_phrase(phrase)
        if cleaned:
            return cleaned

    gsm = _GSM8K.findall(text)
    if gsm and gsm[-1].strip():
        return gsm[-1].strip().rstrip(".").strip()

    numbers = [m.group() for m in _NUMBER.finditer(text) if any(ch.isdigit() for ch in m.group())]
    if numbers:
        return numbers[-1].replace(",", "")
    return None


# ----- normalisation ---------------------------------------------------------------------------

# Units dropped from the end of an answer after a number (and anything inside a trailing \text{}).
_UNIT_WORDS = (
    "dollars dollar cents cent percent degrees degree units unit square cubic sq inches inch feet foot ft "
    "yards yard yd miles mile mi meters meter metres metre m cm mm km kilometers kilometer centimeters "
    "centimeter millimeters millimeter grams gram g kg kilograms kilogram pounds pound lbs lb ounces ounce "
    "oz liters liter litres litre l ml gallons gallon quarts quart pints pint cups cup hours hour hrs hr "
    "h minutes minute mins min seconds second secs sec s days day weeks week months month years year "
    "mph kmh students people points marbles apples cookies eggs pages"
).split()
_UNIT = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
_LONG_UNIT = "|".join(sorted((u for u in _UNIT_WORDS if len(u) > 1), key=len, reverse=True))
_POWER = r"(?:\s*\^\s*\{?[23]\}?)?"  # cm^2, cm^{3}
# "5 m" is a unit but "5m" may be 5*m, so one-letter units need a space before them.
# Possessive quantifiers (++, *+) keep the search linear on long inputs.
_UNIT_AT_END = re.compile(rf"(?:\s++(?:{_UNIT})|(?<=[\d}})])\s*+(?:{_LONG_UNIT}))\b{_POWER}[\s.]*+$")
_TEXT_UNIT_TAIL = re.compile(r"^(?P<head>.*\S)\s*\\(?:text|mbox|mathrm|textrm)\{\s*(?P<word>[a-zA-Z][a-zA-Z .]*)\}"
                             r"(?:\^\{?[23]\}?)?$")
_NOT_UNITS = {"and", "or", "i", "e", "pi", "inf", "infinity", "undefined", "none", "sqrt"}
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname|boldsymbol)\s*\{")
_THIN_SPACE = re.compile(r"(?<!\\)\\[!,;:]")  # removed outright: "1,\!000" is one number
_SPACING = re.compile(r"(?<!\\)\\ |\\q?quad\b|\\displaystyle\b|\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_ASSIGNMENT = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in\b)\s*(?P<rhs>[^=]+)$")
_CHOICE = re.compile(r"^\(?(?P<letter>[A-Ea-e])\)?$")


def _unwrap_commands(s: str, pattern: re.Pattern) -> str:
    """Replace ``\\cmd{content}`` by ``content`` for every command ``pattern`` matches."""
    while (m := pattern.search(s)) is not None:
        found = _braced(s, m.end() - 1)
        if found is None:
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + found[0] + s[found[1] :]
    return s


def _normalize(s: str) -> tuple[str, bool]:
    """Canonical LaTeX-ish form of an answer and whether it carried a percent sign."""
    s = s.strip()
    boxed = _last_boxed(s)
    if boxed is not None and s.lstrip("$ ").startswith(("\\boxed", "\\fbox", "\\framebox")):
        s = boxed
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "").replace("\u2212", "-")  # U+2212 minus sign
    s = re.sub(r"(?<!\\)\\[()\[\]]", "", s)  # \( \) \[ \] math delimiters, not the \\ row break
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _SPACING.sub(" ", _THIN_SPACE.sub("", s)).replace("~", " ")
    # Degrees, percent, currency.
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°", "", s)
    percent = bool(re.search(r"\\?%|\\text\{\s*percent\s*\}|\bpercent\b", s))
    s = re.sub(r"\\?%", "", s)
    s = s.replace("€", "").replace("£", "")
    s = s.strip().rstrip(".").strip()
    # A unit inside \text{} after a value: "10\text{ inches}", "5\mbox{ cm}^2".
    if (m := _TEXT_UNIT_TAIL.match(s)) and m["word"].strip().lower() not in _NOT_UNITS:
        s = m["head"]
    s = _unwrap_commands(s, _TEXT_WRAPPERS)
    # Plain-word units after a number: "18 dollars", "5 cm", "6 square units".
    head = s
    for _ in range(3):
        if (m := _UNIT_AT_END.search(head)) is None:
            break
        head = head[: m.start()]
    if head != s and re.search(r"\d", head) and head.rstrip()[-1:] in "0123456789})":
        s = head
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    # "x = 3" -> "3", "x \in [1, 2]" -> "[1, 2]": a single variable on the left only.
    if (m := _ASSIGNMENT.match(s)) and not s.startswith(("\\frac", "\\sqrt")):
        s = m["rhs"].strip()
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}: single-token arguments get braces.
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    if (m := _CHOICE.match(s)) is not None:
        s = m["letter"].upper()
    if (m := re.fullmatch(r"\(\s*([+-]?\d+(?:\.\d+)?)\s*\)", s)) is not None:
        s = m[1]  # "(073)": a parenthesised number
    return s, percent


def _key(s: str) -> str:
    return re.sub(r"\s+", "", s).casefold()


# ----- numbers ---------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def _to_number(s: str) -> Fraction | None:
    """Exact value of a plain number (``-1,000.5``, ``3/4``, ``\\frac{3}{4}``, ``-\\frac34``)."""
    s = re.sub(r"\s+", "", s)
    sign = 1
    if re.match(r"[+-]\d*\\frac", s):  # -\frac{1}{2}, -4\frac{2}{3}
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if (m := re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)) is not None and int(m[2]) < int(m[3]):
        # A mixed number: 4\frac{2}{3} means 4 + 2/3 (implicit multiplication would read 8/3).
        return sign * (int(m[1]) + Fraction(int(m[2]), int(m[3])))
    if (m := re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", s)) is not None:
        num, den = m.groups()
    elif s.count("/") == 1:
        num, den = s.split("/")
    else:
        num, den = s, "1"
    try:
        if not (_PLAIN_NUMBER.match(num) and _PLAIN_NUMBER.match(den)) or not re.search(r"\d", num + den):
            return None
        value = Fraction(num.replace(",", "")) / Fraction(den.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return sign * value


def _close(a: Fraction | float | complex, b: Fraction | float | complex) -> bool:
    """Whole numbers must be equal; anything else within REL_TOL of each other."""
    if a == b:
        return True
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a.denominator == 1 and b.denominator == 1:
        return False
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _numbers_equal(p: Fraction, r: Fraction, p_percent: bool, r_percent: bool) -> bool:
    # The side that carries a percent sign may mean v or v/100 (see the module docstring).
    p_values = [p, p / 100] if p_percent and not r_percent else [p]
    r_values = [r, r / 100] if r_percent and not p_percent else [r]
    return any(_close(a, b) for a in p_values for b in r_values)


# ----- structures ------------------------------------------------------------------------------

_MATRIX = re.compile(r"^\\begin\{(?P<env>[pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(?P<body>.*)\\end\{(?P=env)\}$",
                     re.DOTALL)


def _split_top(s: str, separator: str) -> list[str]:
    """Split on ``separator`` outside any brackets or braces."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith(separator, i) and depth == 0:
            parts.append(s[start:i])
            i += len(separator)
            start = i
            continue
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX.match(s.strip())
    if m is None:
        return None
    rows = [r for r in _split_top(m["body"].strip(), "\\\\") if r]
    return [_split_top(r, "&") for r in rows]


def _sequence(s: str) -> tuple[str, str, list[str]] | None:
    """``(open, close, items)`` for ``(a, b)``, ``[a, b)``, ``\\{a, b\\}`` or ``a, b``; None otherwise."""
    s = s.strip()
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        return None  # "1,000" is a number, not a list
    for opener, closer in (("\\{", "\\}"), ("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"), ("{", "}")):
        if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
            inner = s[len(opener) : len(s) - len(closer)]
            # The outer brackets must enclose everything: "(1)(2)" is not a tuple.
            if _brackets_balanced(inner):
                items = _split_top(inner, ",")
                if len(items) >= 2 or opener == "\\{":  # plain {5} is a LaTeX group
                    return opener, closer, items
                return None
    items = _split_top(s, ",")
    if len(items) >= 2:
        return "", "", items
    return None


def _brackets_balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return False
    return depth == 0


# ----- LaTeX -> sympy source -------------------------------------------------------------------

_FUNCTIONS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh",
    "log": "log", "ln": "log", "exp": "exp",
}
_GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi "
          "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega").split()
# Names the generated source may contain; everything else is split into one-letter symbols.
_ALLOWED_NAMES = set(_FUNCTIONS.values()) | {"sqrt", "pi", "oo", "E", "I", "binomial", "root"} | {
    "G" + g for g in _GREEK}


def _argument(s: str, i: int) -> tuple[str, int] | None:
    """The argument starting at ``s[i]``: a braced group or a single character (spaces skipped)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        return _braced(s, i)
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(), i + m.end()
    return s[i], i + 1


def _latex_to_python(s: str) -> str | None:
    """Translate a normalised LaTeX expression into sympy ``parse_expr`` source, or None.

    Handles ``\\frac``, ``\\sqrt[n]{}``, ``\\binom``, ``^``, ``\\cdot``/``\\times``/``\\div``, ``\\pi``,
    ``\\infty``, trig/log functions, Greek letters and braces; implicit multiplication is left to
    sympy's ``implicit_multiplication_application``. The result is checked against a whitelist
    (digits, operators, known names, one-letter symbols) because ``parse_expr`` evaluates it.
    """
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            m = re.match(r"\\([a-zA-Z]+|\{|\})", s[i:])
            if m is None:
                return None
            name = m.group(1)
            i += m.end()
            if name in ("frac", "binom"):
                first = _argument(s, i)
                second = _argument(s, first[1]) if first else None
                if second is None:
                    return None
                a, b = _latex_to_python(first[0]), _latex_to_python(second[0])
                if a is None or b is None:
                    return None
                out.append(f"(({a})/({b}))" if name == "frac" else f"binomial(({a}),({b}))")
                i = second[1]
            elif name == "sqrt":
                index = None
                if s[i : i + 1] == "[":
                    end = s.find("]", i)
                    if end < 0:
                        return None
                    index, i = _latex_to_python(s[i + 1 : end]), end + 1
                    if index is None:
                        return None
                arg = _argument(s, i)
                if arg is None or (inner := _latex_to_python(arg[0])) is None:
                    return None
                out.append(f"sqrt({inner})" if index is None else f"(({inner})**(1/({index})))")
                i = arg[1]
            elif name in ("cdot", "times", "ast"):
                out.append("*")
            elif name == "div":
                out.append("/")
            elif name == "pi":
                out.append(" pi ")
            elif name == "infty":
                out.append(" oo ")
            elif name in ("{", "}"):
                out.append("(" if name == "{" else ")")
            elif name in _FUNCTIONS:
                out.append(f" {_FUNCTIONS[name]} ")
            elif name in _GREEK:
                out.append(f" G{name} ")
            else:
                return None  # a command we do not understand: no symbolic verdict
        elif ch == "^":
            arg = _argument(s, i + 1)
            if arg is None or (inner := _latex_to_python(arg[0])) is None:
                return None
            out.append(f"**({inner})")
            i = arg[1]
        elif ch in "{}":
            out.append("(" if ch == "{" else ")")
            i += 1
        else:
            out.append(ch)
            i += 1
    source = "".join(out)

    # Multi-letter words that are not known names are products of one-letter symbols ("xy" -> x*y).
    def word(m: re.Match) -> str:
        w = m.group()
        if w in _ALLOWED_NAMES:
            return w
        return " ".join({"e": "E", "i": "I"}.get(c, c) for c in w)

    source = re.sub(r"[A-Za-z]+", word, source)
    source = re.sub(r"(?<![\d.])0+(?=\d)", "", source)  # "073": Python rejects leading zeros
    # Whitelist: parse_expr evaluates its input, so nothing but arithmetic may get through.
    if not re.fullmatch(r"[0-9A-Za-z+\-*/().,!\s]*", source) or not source.strip():
        return None
    if "." in re.sub(r"\d*\.\d+", "0", source):
        return None  # a dot that is not a decimal point (attribute access)
    if any(len(w) > 1 and w not in _ALLOWED_NAMES for w in re.findall(r"[A-Za-z]+", source)):
        return None
    return source


# ----- the sympy worker ------------------------------------------------------------------------


def _sympy_equal(a_src: str, b_src: str) -> bool:
    """Symbolic/numeric equality of two ``_latex_to_python`` sources (runs in the worker)."""
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        rationalize,
        standard_transformations,
    )

    names = {name: getattr(sympy, name) for name in
             ("Integer", "Float", "Rational", "Symbol", "Function", "factorial", "sqrt", "pi", "oo", "E", "I",
              "binomial", "root", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh",
              "cosh", "tanh", "log", "exp")}
    names.update({"G" + g: sympy.Symbol(g) for g in _GREEK})
    names["__builtins__"] = {}
    transformations = standard_transformations + (implicit_multiplication_application, rationalize)

    def parse(src: str):
        return parse_expr(src, global_dict=dict(names), transformations=transformations)

    a, b = parse(a_src), parse(b_src)
    # x/0 is complex infinity (zoo) and 0/0 NaN: sympy calls zoo == zoo, so 1/0 "equalled" 2/0. An undefined
    # value equals no other answer; infinity (oo, from \infty) is a value and stays equal to itself.
    if any(isinstance(x, sympy.Basic) and x.has(sympy.zoo, sympy.nan) for x in (a, b)):
        return False
    if a == b:
        return True
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return False
    if a.is_Integer and b.is_Integer:
        return False
    if not a.free_symbols and not b.free_symbols:
        va, vb = complex(a.evalf(30)), complex(b.evalf(30))
        if all(math.isfinite(abs(v)) for v in (va, vb)):
            return _close(va, vb)
        return False
    if sympy.simplify(a - b) == 0:
        return True
    return a.equals(b) is True


def _worker_loop() -> None:
    """Main loop of the worker process: one JSON ``[a, b]`` per line in, ``1``/``0`` per line out."""
    import sympy  # noqa: F401  (import before saying ready, so start-up time is not a timeout)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            verdict = _sympy_equal(a, b)
        except Exception:  # any parse or sympy failure is "not shown equal"
            verdict = False
        print("1" if verdict else "0", flush=True)


# Loads this file as a standalone module in a fresh interpreter: only stdlib + sympy get imported,
# not the r1lab package (torch), so a restart after a timeout takes ~0.5 s.
_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_r1lab_grading_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_loop()\n"
)


class _SympyWorker:
    """One long-lived sympy process; killed and lazily restarted when a comparison times out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue | None = None
        self._owner = 0  # pid that started the process (a forked child must not share it)

    def _start(self) -> bool:
        try:
            proc = subprocess.Popen([sys.executable, "-c", _BOOT, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError:
            return False
        replies: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                replies.put(line.strip())
            replies.put(None)  # the process ended

        threading.Thread(target=pump, daemon=True, name="r1lab-grading-reader").start()
        try:
            ready = replies.get(timeout=60)
        except queue.Empty:
            ready = None
        if ready != "ready":
            proc.kill()
            proc.wait()
            return False
        self._proc, self._replies, self._owner = proc, replies, os.getpid()
        return True

    def stop(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._proc = self._replies = None

    def equal(self, a_src: str, b_src: str, timeout: float) -> bool | None:
        """True/False from sympy, or None when it timed out or no worker could run."""
        with self._lock:
            if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
                self._proc = None
                if not self._start():
                    return None
            try:
                self._proc.stdin.write(json.dumps([a_src, b_src]) + "\n")
                self._proc.stdin.flush()
                reply = self._replies.get(timeout=max(timeout, 0.0))
            except (OSError, queue.Empty):
                reply = None
            if reply not in ("0", "1"):
                self.stop()  # stuck or dead: kill it, the next call starts a fresh one
                return None
            return reply == "1"


_WORKER = _SympyWorker()
atexit.register(_WORKER.stop)


# ----- equivalence -----------------------------------------------------------------------------


def _equal(p: str, r: str, deadline: float, depth: int) -> bool:
    if depth > 8:
        return False
    np_, p_percent = _normalize(p)
    nr, r_percent = _normalize(r)
    if not np_ or not nr:
        return False
    if _key(np_) == _key(nr):
        return True

    p_num, r_num = _to_number(np_), _to_number(nr)
    if p_num is not None and r_num is not None:
        return _numbers_equal(p_num, r_num, p_percent, r_percent)

    p_mat, r_mat = _matrix(np_), _matrix(nr)
    if p_mat is not None or r_mat is not None:
        if p_mat is None or r_mat is None or [len(row) for row in p_mat] != [len(row) for row in r_mat]:
            return False
        return all(_equal(a, b, deadline, depth + 1) for ra, rb in zip(p_mat, r_mat) for a, b in zip(ra, rb))

    # Unions of intervals: piece by piece, in order.
    p_union, r_union = _split_top(np_, "\\cup"), _split_top(nr, "\\cup")
    if len(p_union) > 1 or len(r_union) > 1:
        return len(p_union) == len(r_union) and all(
            _equal(a, b, deadline, depth + 1) for a, b in zip(p_union, r_union))

    p_seq, r_seq = _sequence(np_), _sequence(nr)
    if p_seq is not None or r_seq is not None:
        if p_seq is None or r_seq is None:
            return False
        (p_open, p_close, p_items), (r_open, r_close, r_items) = p_seq, r_seq
        if len(p_items) != len(r_items):
            return False
        unordered = {p_open, r_open} <= {"", "\\{", "{"}
        if not unordered:
            if (p_open, p_close) != (r_open, r_close):
                return False
            return all(_equal(a, b, deadline, depth + 1) for a, b in zip(p_items, r_items))
        # Sets and bare lists: every reference item matches a distinct predicted item.
        remaining = list(p_items)
        for item in r_items:
            match = next((k for k, cand in enumerate(remaining) if _equal(cand, item, deadline, depth + 1)), None)
            if match is None:
                return False
            remaining.pop(match)
        return True

    if max(len(np_), len(nr)) > MAX_SYMBOLIC_CHARS:
        return False
    p_src, r_src = _latex_to_python(np_), _latex_to_python(nr)
    if p_src is None or r_src is None:
        return False
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    return _WORKER.equal(p_src, r_src, remaining) is True


def math_equal(predicted: str | None, reference: str, timeout: float = 2.0) -> bool:
    """Whether ``predicted`` is mathematically equivalent to ``reference``.

    Args:
        predicted: the model's answer (e.g. from ``extract_answer``); None is never equal.
        reference: the reference answer (plain text or LaTeX).
        timeout: seconds the symbolic (sympy) stage may take in total for this comparison; when it
            runs out the answer counts as wrong. String and numeric checks are not timed (they are
            linear in the input).

    Returns:
        True when equal by the rules in the module docstring. Never raises: garbage gives False.
    """
    if predicted is None or reference is None:
        return False
    predicted, reference = str(predicted), str(reference)
    if max(len(predicted), len(reference)) > MAX_ANSWER_CHARS:
        return False
    try:
        return _equal(predicted, reference, time.monotonic() + timeout, 0)
    except Exception:  # noqa: BLE001 - a grader must not crash an evaluation run
        return False
