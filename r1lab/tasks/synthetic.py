"""A seeded synthetic task with an exact verifier: multi-digit addition.

    task = Addition(digits=2)
    train = task.problems(1000, split="train", seed=0)   # list[Problem], the same for the same arguments
    test = task.problems(100, split="test", seed=0)      # never shares an (a, b) pair with any train problem

Difficulty is the number of digits of each operand. The split is a property of the pair, not of the draw:
a pair is in the test split when a hash of (digits, a, b) falls in the test fraction, so every train and test
draw, whatever its seed, is disjoint from the other split. The verifier is `r1lab.math_equal` through
`Problem.answer` (an integer string), or `Addition.verify` directly.

More tasks in the same style (seeded `problems(n, split, seed)`, split by a hash of the instance, exact
`verify(problem, extracted_answer) -> bool`, and `solution(problem) -> str`, a short worked chain of thought
ending with "The answer is X." that `r1lab.grading.extract_answer` reads back; `Problem.solution` holds it):

- `Arithmetic(digits, ops=("+", "-", "*"), n_operands=2)`: an expression with usual precedence, integer answer;
- `Countdown(n_numbers, max_target)`: reach the target from the given numbers with + - * / and parentheses,
  each number at most once; the answer is an expression, checked by a small parser (never `eval`) with exact
  fractions. Only solvable instances are generated (the target is built from a random expression);
- `LinearEquation(max_coef)`: solve `a*x + b = c` for the integer x;
- `RunningSum(n_operands)`: the sum of many tagged one-digit numbers ("Add a7 b3 c5 d8."), a serial task whose
  worked solution is a running sum with one local step per operand ("a7+b3=10, 10+c5=15, 15+d8=23."), with
  variants that check the result backwards and that catch and fix a slip (`checked_solution`, `fixed_solution`).

`TASKS` maps names to the classes and `load_task(name, split, n, seed, **knobs)` draws problems.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from ..grading import math_equal
from .benchmarks import Problem

__all__ = ["TASKS", "Addition", "Arithmetic", "Countdown", "LinearEquation", "RunningSum", "load_task",
           "parse_expression"]


@dataclass(frozen=True)
class Addition:
    digits: int = 2  # digits of each operand (difficulty)
    test_fraction: float = 0.2  # share of (a, b) pairs reserved for the test split
    template: str = "What is {a} + {b}?"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise ValueError(f"Addition.digits must be in [1, 18], got {self.digits}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"Addition.test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def name(self) -> str:
        return f"addition-{self.digits}"

    def split_of(self, a: int, b: int) -> str:
        h = int.from_bytes(hashlib.sha256(f"{self.digits}:{a}:{b}".encode()).digest()[:8], "big")
        return "test" if h / 2**64 < self.test_fraction else "train"

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """`n` problems of `split` drawn with `seed` (with replacement from the split's pairs)."""
        if split not in ("train", "test"):
            raise ValueError(f"Addition split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1
        out: list[Problem] = []
        while len(out) < n:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if self.split_of(a, b) != split:
                continue
            out.append(Problem(id=f"{self.name}/{split}/{seed}/{len(out)}", question=self.template.format(a=a, b=b),
                               answer=str(a + b), meta={"a": a, "b": b}))
        return out

    @staticmethod
    def solution(problem: Problem) -> str:
        """A worked column addition, ending with the answer."""
        a, b = problem.meta["a"], problem.meta["b"]
        da, db = str(a)[::-1], str(b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            t = x + y + carry
            steps.append(f"{x} + {y}" + (f" + carry {carry}" if carry else "") + f" = {t}, write {t % 10}"
                         + (", carry 1." if t >= 10 else "."))
            carry = t // 10
        if carry:
            steps.append("Write the final carry 1.")
        return f"Add {a} and {b} digit by digit from the right. " + " ".join(steps) + f" The answer is {a + b}."

    @staticmethod
    def verify(problem: Problem, answer: str | None) -> bool:
        """Exact check of an extracted answer (an integer, surrounding spaces ignored)."""
        return answer is not None and answer.strip() == problem.answer


# ====================================================================== shared helpers
def _hash_split(key: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def _check_common(split: str, test_fraction: float, cls: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{cls} split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"{cls}.test_fraction must be in (0, 1), got {test_fraction}")


def _draw(n: int, split: str, seed: int, name: str, make, split_of, solution=None) -> list[Problem]:
    """`n` problems: `make(rng)` -> (key, question, answer, meta) or None, kept when `split_of(key) == split`;
    `solution(problem)`, when given, fills in the worked solution."""
    rng = random.Random(f"{name}:{split}:{seed}")
    out: list[Problem] = []
    tries, limit = 0, 1000 * n + 100_000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise ValueError(f"{name}: could not draw {n} {split} problems (too few instances for these knobs)")
        made = make(rng)
        if made is None:
            continue
        key, question, answer, meta = made
        if split_of(key) != split:
            continue
        out.append(Problem(id=f"{name}/{split}/{seed}/{len(out)}", question=question, answer=answer, meta=meta))
        if solution is not None:
            out[-1].solution = solution(out[-1])
    return out


def _verify_number(problem: Problem, answer: str | None) -> bool:
    """A numeric answer (a leading `x =` allowed) equal to the reference by `math_equal`."""
    a = _numeric_answer(answer)
    return a is not None and math_equal(a, problem.answer)


def _numeric_answer(answer: str | None) -> str | None:
    """An extracted answer without a leading `x =` and surrounding spaces, or None."""
    if answer is None or not isinstance(answer, str):
        return None
    a = answer.strip()
    if len(a) > 2 and a[0] in "xX" and a[1:].lstrip().startswith("="):
        a = a[1:].lstrip()[1:].strip()
    return a or None


# ====================================================================== a safe expression parser
class _ParseError(ValueError):
    pass


_MAX_EXPR_CHARS = 200
_MAX_DEPTH = 50


def _tokens(text: str) -> list[str]:
    text = text.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    text = text.replace("\\cdot", "*").replace("−", "-")
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "+-*/()":
            out.append(c)
            i += 1
        elif c in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            out.append(text[i:j])
            i = j
        else:
            raise _ParseError(f"unexpected character {c!r}")
    return out


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value (exact) and the integer literals of an expression over non-negative integers, + - * / and
    parentheses, usual precedence, no unary operators. Raises ValueError on anything else (or division by 0).
    Never evaluates code: a recursive-descent parser with a length and nesting limit."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR_CHARS:
        raise _ParseError("not a string or too long")
    toks, pos, literals = _tokens(text), 0, []

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def expr(depth: int) -> Fraction:
        nonlocal pos
        v = term(depth)
        while peek() in ("+", "-"):
            op = toks[pos]
            pos += 1
            r = term(depth)
            v = v + r if op == "+" else v - r
        return v

    def term(depth: int) -> Fraction:
        nonlocal pos
        v = atom(depth)
        while peek() in ("*", "/"):
            op = toks[pos]
            pos += 1
            r = atom(depth)
            if op == "*":
                v = v * r
            elif r == 0:
                raise _ParseError("division by zero")
            else:
                v = v / r
        return v

    def atom(depth: int) -> Fraction:
        nonlocal pos
        if depth > _MAX_DEPTH:
            raise _ParseError("nested too deeply")
        t = peek()
        if t is None:
            raise _ParseError("unexpected end")
        if t == "(":
            pos += 1
            v = expr(depth + 1)
            if peek() != ")":
                raise _ParseError("missing )")
            pos += 1
            return v
        if t.isdigit():
            pos += 1
            literals.append(int(t))
            return Fraction(int(t))
        raise _ParseError(f"unexpected {t!r}")

    value = expr(0)
    if pos != len(toks):
        raise _ParseError(f"unexpected {toks[pos]!r}")
    return value, literals


def _reduce_steps(operands: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Steps of evaluating `o0 op0 o1 op1 ...` (* before + -, then left to right) and the value."""
    vals, ops, steps = list(operands), list(ops), []
    for pass_ops in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] in pass_ops:
                a, b, op = vals[i], vals[i + 1], ops[i]
                r = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append(f"{a} {op} {b} = {r}.")
                vals[i : i + 2] = [r]
                del ops[i]
            else:
                i += 1
    return steps, vals[0]


# ====================================================================== arithmetic
@dataclass(frozen=True)
class Arithmetic:
    """`n_operands` numbers of `digits` digits joined by operators from `ops` (usual precedence)."""

    digits: int = 3
    ops: tuple[str, ...] = ("+", "-", "*")
    n_operands: int = 2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise ValueError(f"Arithmetic.digits must be in [1, 18], got {self.digits}")
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.ops or any(o not in ("+", "-", "*") for o in self.ops):
            raise ValueError(f"Arithmetic.ops must be a non-empty subset of + - *, got {self.ops}")
        if not 2 <= self.n_operands <= 10:
            raise ValueError(f"Arithmetic.n_operands must be in [2, 10], got {self.n_operands}")
        _check_common("train", self.test_fraction, "Arithmetic")

    @property
    def name(self) -> str:
        return f"arithmetic-{self.digits}-{self.n_operands}-{''.join(self.ops)}"

    def split_of(self, expression: str) -> str:
        return _hash_split(f"arithmetic:{expression}", self.test_fraction)

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        _check_common(split, self.test_fraction, "Arithmetic")
        lo, hi = (0 if self.digits == 1 else 10 ** (self.digits - 1)), 10**self.digits - 1

        def make(rng: random.Random):
            nums = [rng.randint(lo, hi) for _ in range(self.n_operands)]
            ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
            expression = " ".join([str(nums[0])] + [f"{o} {x}" for o, x in zip(ops, nums[1:])])
            _, value = _reduce_steps(nums, ops)
            return expression, f"What is {expression}?", str(value), {"operands": nums, "ops": ops,
                                                                     "expression": expression}

        return _draw(n, split, seed, self.name, make, self.split_of, solution=self.solution)

    verify = staticmethod(_verify_number)

    @staticmethod
    def solution(problem: Problem) -> str:
        steps, value = _reduce_steps(problem.meta["operands"], problem.meta["ops"])
        head = "Multiplication comes before addition and subtraction; then go left to right. "
        if "*" not in problem.meta["ops"]:
            head = "Go left to right. "
        return f"Compute {problem.meta['expression']}. " + head + " ".join(steps) + f" The answer is {value}."


# ====================================================================== countdown
@dataclass(frozen=True)
class Countdown:
    """Reach a target in [1, max_target] from `n_numbers` numbers in [1, max_number] with + - * / and
    parentheses, each number at most once. The answer is an expression; `Problem.answer` is one solution."""

    n_numbers: int = 4
    max_target: int = 100
    max_number: int = 10
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 2 <= self.n_numbers <= 8:
            raise ValueError(f"Countdown.n_numbers must be in [2, 8], got {self.n_numbers}")
        if self.max_target < 1 or self.max_number < 1:
            raise ValueError("Countdown.max_target and max_number must be >= 1")
        _check_common("train", self.test_fraction, "Countdown")

    @property
    def name(self) -> str:
        return f"countdown-{self.n_numbers}-{self.max_target}-{self.max_number}"

    def split_of(self, numbers, target: int) -> str:
        return _hash_split(f"countdown:{sorted(numbers)}:{target}", self.test_fraction)

    def _split_key(self, key) -> str:
        return self.split_of(key[0], key[1])

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        _check_common(split, self.test_fraction, "Countdown")

        def make(rng: random.Random):
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            # combine random pairs until one value is left: (value, expression text, is_atom)
            items = [(Fraction(x), str(x), True) for x in nums]
            steps = []
            while len(items) > 1:
                i, j = rng.sample(range(len(items)), 2)
                (a, ea, aa), (b, eb, ab) = items[i], items[j]
                choices = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
                op = rng.choice(choices)
                v = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
                steps.append(f"{a} {op} {b} = {v}.")
                wrap = lambda e, atom: e if atom else f"({e})"  # noqa: E731
                items = [it for k, it in enumerate(items) if k not in (i, j)] + [(v, f"{wrap(ea, aa)} {op} {wrap(eb, ab)}", False)]
            target, expression, _ = items[0]
            if target.denominator != 1 or not 1 <= target <= self.max_target:
                return None
            target = int(target)
            question = (f"Using the numbers {', '.join(map(str, nums))}, each at most once, and + - * / with "
                        f"parentheses, make {target}.")
            return ((nums, target), question, expression,
                    {"numbers": nums, "target": target, "expression": expression, "steps": steps})

        return _draw(n, split, seed, self.name, make, self._split_key, solution=self.solution)

    @staticmethod
    def verify(problem: Problem, answer: str | None) -> bool:
        """True when `answer` is an expression over the given numbers (each at most once) equal to the target;
        an optional trailing `= target` is allowed. Never raises."""
        try:
            if not isinstance(answer, str):
                return False
            target = problem.meta["target"]
            parts = answer.split("=")
            if len(parts) > 2:
                return False
            if len(parts) == 2:
                rhs_value, rhs_literals = parse_expression(parts[1])
                if len(rhs_literals) != 1 or rhs_value != target:
                    return False
            value, literals = parse_expression(parts[0])
            if not literals or Counter(literals) - Counter(problem.meta["numbers"]):
                return False
            return value == target
        except (ValueError, ZeroDivisionError, RecursionError, KeyError, TypeError):
            return False

    @staticmethod
    def solution(problem: Problem) -> str:
        m = problem.meta
        return (f"We need {m['target']} from {', '.join(map(str, m['numbers']))}. " + " ".join(m["steps"])
                + f" That reaches {m['target']}. The answer is {m['expression']}.")


# ====================================================================== linear equations
def _linear_lhs(a: int, b: int) -> str:
    ax = "x" if a == 1 else "-x" if a == -1 else f"{a}x"
    return ax if b == 0 else f"{ax} + {b}" if b > 0 else f"{ax} - {-b}"


@dataclass(frozen=True)
class LinearEquation:
    """`a*x + b = c` with a, b, x in [-max_coef, max_coef] (a != 0): the answer is the integer x."""

    max_coef: int = 10
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 1 <= self.max_coef <= 10**9:
            raise ValueError(f"LinearEquation.max_coef must be in [1, 1e9], got {self.max_coef}")
        _check_common("train", self.test_fraction, "LinearEquation")

    @property
    def name(self) -> str:
        return f"linear-{self.max_coef}"

    def split_of(self, a: int, b: int, c: int) -> str:
        return _hash_split(f"linear:{a}:{b}:{c}", self.test_fraction)

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        _check_common(split, self.test_fraction, "LinearEquation")
        m = self.max_coef

        def make(rng: random.Random):
            a = rng.randint(1, m) * rng.choice((1, -1))
            b, x = rng.randint(-m, m), rng.randint(-m, m)
            c = a * x + b
            return ((a, b, c), f"Solve for x: {_linear_lhs(a, b)} = {c}.", str(x),
                    {"a": a, "b": b, "c": c, "x": x})

        return _draw(n, split, seed, self.name, make, lambda k: self.split_of(*k), solution=self.solution)

    verify = staticmethod(_verify_number)

    @staticmethod
    def solution(problem: Problem) -> str:
        a, b, c, x = (problem.meta[k] for k in ("a", "b", "c", "x"))
        steps = [f"Solve {_linear_lhs(a, b)} = {c}."]
        if b > 0:
            steps.append(f"Subtract {b} from both sides: {_linear_lhs(a, 0)} = {c} - {b} = {c - b}.")
        elif b < 0:
            steps.append(f"Add {-b} to both sides: {_linear_lhs(a, 0)} = {c} + {-b} = {c - b}.")
        if a != 1:
            steps.append(f"Divide both sides by {a}: x = {c - b} / {a} = {x}.")
        par = lambda v: f"({v})" if v < 0 else str(v)  # noqa: E731
        steps.append(f"Check: {a} * {par(x)} + {par(b)} = {c}. The answer is {x}.")
        return " ".join(steps)


# ====================================================================== running sums
@dataclass(frozen=True)
class RunningSum:
    """The sum of `n_operands` one-digit numbers (or of `digits` digits), each tagged with a letter: "Add a7 b3 c5
    d8 e2 f9."

    A serial task for the speedrun's reasoning emergence: answering at once needs the whole sum in one forward
    pass, which a model of a million parameters does poorly, while the worked solution is a chain of local steps
    a small model learns well: "a7+b3=10 +c5=15 +d8=23". Each step adds the tagged operand to the number just
    before it, and the operand is found by its tag, the same two-token pattern as in the question (a copy, not a
    count of positions, which is what a tiny model got wrong when steps named bare operands; benchmarks/LOG.md,
    second session); steps are short, so the distance to the operand grows slowly along the chain."""

    n_operands: int = 8
    test_fraction: float = 0.2
    shuffled: bool = False  # the question lists the tagged operands in random order (the solution goes a, b, c)
    modulus: int = 0  # > 0: the sum modulo this ("Add a7 b3 c5 mod 10."), every total in the chain reduced too
    padded: bool = False  # worked totals written with leading zeros to the width of the largest ("+c1=06")
    # digits of each operand: 1 draws 0-9, 2 draws 0-99 ("Add a47 b3 c91."), so that a sum is far harder to give
    # at once while each worked step ("+c91=141") is still one local addition
    digits: int = 1
    # How a worked solution checks its result (`checked_solution`): "same" works the sum out again in the same
    # order; "backward" sums from the last operand to the first, and where the two totals differ, a third pass
    # (odd tags, then even) settles it; "inverse" undoes each step of the first pass in turn (total minus the
    # operand it added should give the total before it), reading only what the first pass wrote; "unwind" undoes
    # them from the last step back to the first, so each check step starts from the total the one before it
    # arrived at and the answer stands right before the check; "tagged" undoes them in order as "inverse" does,
    # each step naming its tagged operand before the total it undoes ("c5: 15-5=10"); "closed" undoes them in
    # order as "inverse" does, then adds the last operand back ("15+d8=23"), so that the answer after the check
    # repeats the total just written, as it does after a plain chain; "pairs" adds
    # the question's operands two by two (a+b, c+d, ...), then the pair sums, and where its total differs from the
    # first pass's, works the sum once more the first way, whose total is the answer.
    check_route: str = "same"
    TAGS = "abcdefghijklmnopqrstuvwxyz"  # up to 26 operands
    CHECK_ROUTES = ("same", "backward", "inverse", "unwind", "pairs", "tagged", "closed")

    def __post_init__(self) -> None:
        if not 2 <= self.n_operands <= len(self.TAGS):
            raise ValueError(f"RunningSum.n_operands must be in [2, {len(self.TAGS)}], got {self.n_operands}")
        if not 1 <= self.digits <= 3:
            raise ValueError(f"RunningSum.digits must be in [1, 3], got {self.digits}")
        if self.modulus < 0 or self.modulus == 1:
            raise ValueError(f"RunningSum.modulus must be 0 (none) or at least 2, got {self.modulus}")
        if self.check_route not in self.CHECK_ROUTES:
            raise ValueError(f"RunningSum.check_route must be one of {', '.join(self.CHECK_ROUTES)}, "
                             f"got {self.check_route!r}")
        _check_common("train", self.test_fraction, "RunningSum")

    @property
    def name(self) -> str:
        return (f"running-sum-{self.n_operands}" + (f"-d{self.digits}" if self.digits > 1 else "")
                + (f"-mod{self.modulus}" if self.modulus else ""))

    @property
    def width(self) -> int:
        """Digits of a worked total when `padded` (the largest total's), else 0 (as many as it has)."""
        largest = self.modulus - 1 if self.modulus else (10**self.digits - 1) * self.n_operands
        return len(str(largest)) if self.padded else 0

    def split_of(self, key) -> str:
        """Split by the operands (in tag order) alone, so a shuffled listing of a test sum is a test problem."""
        return _hash_split(f"running-sum:{list(key[0])}", self.test_fraction)

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        _check_common(split, self.test_fraction, "RunningSum")
        m = self.modulus

        def make(rng: random.Random):
            nums = [rng.randint(0, 10**self.digits - 1) for _ in range(self.n_operands)]
            order = list(range(self.n_operands))
            if self.shuffled:
                rng.shuffle(order)
            question = "Add " + " ".join(f"{self.TAGS[i]}{nums[i]}" for i in order) + (f" mod {m}." if m else ".")
            answer = sum(nums) % m if m else sum(nums)
            return (tuple(nums), tuple(order)), question, str(answer), {"operands": nums, "modulus": m,
                                                                        "width": self.width, "digits": self.digits,
                                                                        "check_route": self.check_route}

        return _draw(n, split, seed, self.name, make, self.split_of, solution=self.solution)

    verify = staticmethod(_verify_number)

    @classmethod
    def _forward(cls, nums: list[int], modulus: int = 0, width: int = 0, slip: tuple[int, int] | None = None,
                 order: list[int] | None = None,
                 misread: tuple[int, int] | None = None) -> tuple[list[str], list[int]]:
        """Steps "a7+b3=10", "+c5=15", ... and the running totals (totals[i] after the i-th operand added;
        reduced modulo `modulus` when it is set; written with `width` digits, leading zeros included, when it is
        set); `slip` = (step, error) adds `error` to that step's result, and the later steps carry the wrong total
        on; `misread` = (step, digit) writes and adds that digit in place of the step's operand (a wrong lookup,
        added right). `order`: the operands' indices in the order they are added (default: a, b, c, ...). A step
        is short (the total it adds to is the number just before it), so the distance from a step to its operand
        in the question grows slowly along the chain; with a width, it grows by the same number of tokens at
        every step whatever the totals are."""
        order = list(range(len(nums))) if order is None else order
        first = order[0]
        totals, steps = [nums[first] % modulus if modulus else nums[first]], []
        for k, i in enumerate(order[1:], 1):
            x = misread[1] if misread and misread[0] == k else nums[i]
            new = totals[-1] + x + (slip[1] if slip and slip[0] == k else 0)
            new = new % modulus if modulus else new
            head = f"{cls.TAGS[first]}{nums[first]}" if k == 1 else ""
            steps.append(f"{head}+{cls.TAGS[i]}{x}={new:0{width}d}")
            totals.append(new)
        return steps, totals

    @staticmethod
    def _meta(problem: Problem) -> tuple[list[int], int, int]:
        return problem.meta["operands"], problem.meta.get("modulus", 0), problem.meta.get("width", 0)

    @classmethod
    def solution(cls, problem: Problem) -> str:
        """The worked running sum: "a7+b3=10 +c5=15 +d8=23. The answer is 23." """
        steps, totals = cls._forward(*cls._meta(problem))
        return " ".join(steps) + f". The answer is {totals[-1]}."

    @classmethod
    def _slip(cls, nums: list[int], modulus: int, rng: random.Random, digits: int = 1) -> tuple[int, int]:
        """A slip: (step, error), one step's result off by one (never below zero); `nums` in the order added.
        Operands of two `digits` or more: half the slips are a carry dropped or added instead, off by ten, the
        slip a model makes most in such sums (benchmarks/LOG.md, twenty-fourth session)."""
        step = rng.randrange(1, len(nums))
        size = 10 if digits > 1 and rng.random() < 0.5 else 1
        return step, size * (rng.choice((-1, 1)) if modulus or sum(nums[:step + 1]) >= size else 1)

    @classmethod
    def slipped_solution(cls, problem: Problem, rng: random.Random) -> str:
        """A worked running sum with one slip that nobody catches, so its answer is wrong (as worked solutions
        in real text sometimes are): "a7+b3=10 +c5=16 +d8=24. The answer is 24." """
        nums, m, w = cls._meta(problem)
        steps, totals = cls._forward(nums, m, w, slip=cls._slip(nums, m, rng, problem.meta.get("digits", 1)))
        return " ".join(steps) + f". The answer is {totals[-1]}."

    @classmethod
    def checked_solution(cls, problem: Problem, rng: random.Random | None = None) -> str:
        """The running sum, then a check that works it out again and compares the totals; the answer is the
        check's total. With `rng`, the first pass makes a slip (`_slip`) that the check, done with care, does not
        repeat: "a7+b3=10 +c5=16 +d8=24. Check: a7+b3=10 +c5=15 +d8=23, not 24. Wait, the first pass slipped.
        The answer is 23." Without, the totals agree: "... Check: a7+b3=10 +c5=15 +d8=23, as before. The answer
        is 23." """
        nums, m, w = cls._meta(problem)
        route, digits = problem.meta.get("check_route", "same"), problem.meta.get("digits", 1)
        if route == "backward":
            return cls._checked_backward(nums, m, w, rng, digits)
        if route in ("inverse", "unwind", "tagged", "closed"):
            return cls._checked_inverse(nums, m, w, rng, digits, unwind=route == "unwind", tagged=route == "tagged",
                                        closed=route == "closed")
        if route == "pairs":
            return cls._checked_pairs(nums, m, w, rng, digits)
        steps, totals = cls._forward(nums, m, w, slip=cls._slip(nums, m, rng, digits) if rng is not None else None)
        again, right = cls._forward(nums, m, w)
        verdict = "as before" if totals[-1] == right[-1] else f"not {totals[-1]:0{w}d}. Wait, the first pass slipped"
        return " ".join(steps) + ". Check: " + " ".join(again) + f", {verdict}. The answer is {right[-1]}."

    @classmethod
    def _checked_backward(cls, nums: list[int], m: int, w: int, rng: random.Random | None, digits: int = 1) -> str:
        """check_route "backward": the sum a to h, then a check from h back to a, which passes through other
        totals and so other lookups than the first pass. Equal totals end it; different ones call for a third
        pass (odd tags, then even: "a7+c5=12 +e2=14 ..."), whose total is the answer. With `rng`, one of the first
        two passes (either, at random) makes a slip that the other two do not repeat:
        "a7+b3=10 +c5=16 +d8=24. Check: d8+c5=13 +b3=16 +a7=23, not 24. Wait, a third way: a7+c5=12 +b3=15
        +d8=23. The answer is 23." A model whose errors depend on the route it takes can catch them this way:
        two routes agree on a wrong total rarely, and the third decides."""
        n = len(nums)
        routes = [list(range(n)), list(range(n - 1, -1, -1)), [*range(0, n, 2), *range(1, n, 2)]]
        slipped = rng.randrange(2) if rng is not None else None
        passes = []
        for r, order in enumerate(routes):
            slip = cls._slip([nums[i] for i in order], m, rng, digits) if r == slipped else None
            passes.append(cls._forward(nums, m, w, slip=slip, order=order))
        (steps, totals), (check, again), (third, right) = passes
        text = " ".join(steps) + ". Check: " + " ".join(check)
        if again[-1] == totals[-1]:
            return text + f", as before. The answer is {totals[-1]}."
        return (text + f", not {totals[-1]:0{w}d}. Wait, a third way: " + " ".join(third)
                + f". The answer is {right[-1]}.")

    @classmethod
    def _checked_inverse(cls, nums: list[int], m: int, w: int, rng: random.Random | None, digits: int = 1,
                         unwind: bool = False, tagged: bool = False, closed: bool = False) -> str:
        """check_route "inverse": the sum, then each step undone in turn: "10-b3=7" checks "a7+b3=10" (the total
        before it was 7). Every number a check step needs stands in the first pass's matching step, one chain
        length back, so the check looks up nothing in the question. All steps agreeing ends it ("as before"). With
        `rng`, the first pass makes a slip (`_slip`); the first check step past it disagrees with the total before,
        and the sum is worked again from there: "a7+b3=10 +c5=16 +d8=24. Check: 10-b3=7 16-c5=11, not 10. Wait,
        the first pass slipped: 10+c5=15 +d8=23. The answer is 23."
        `unwind` (check_route "unwind"): the steps undone from the last back to the first, "a7+b3=10 +c5=15
        +d8=23. Check: 23-d8=15 15-c5=10 10-b3=7, as before. The answer is 23.", so a check step starts from the
        total the step before it arrived at, and the first from the first pass's answer, written right before it.
        A check whose totals drift from the first pass's then cannot carry the drift into the answer, which is
        the total the check started from. A slip is found the same way, at its own step: the steps after it
        added right, so undoing them agrees with the first pass: "a7+b3=10 +c5=16 +d8=24. Check: 24-d8=16
        16-c5=11, not 10. Wait, the first pass slipped: 10+c5=15 +d8=23. The answer is 23."
        `tagged` (check_route "tagged"): the inverse route's steps in order, each naming its tagged operand first:
        "a7+b3=10 +c5=15 +d8=23. Check: b3: 10-3=7 c5: 15-5=10 d8: 23-8=15, as before. The answer is 23." The
        total a step undoes then follows its tag as it does in the first pass ("c5=15" there, "c5: 15" here), one
        copy by the tag, where the inverse route writes it before the tag and must first work out which step
        comes next (benchmarks/LOG.md, twenty-fourth session).
        `closed` (check_route "closed"): the inverse route's steps, then the last operand added back to the total
        the last step arrived at: "a7+b3=10 +c5=15 +d8=23. Check: 10-b3=7 15-c5=10 23-d8=15 15+d8=23, as before.
        The answer is 23." The answer then repeats the number written just before it, where after the inverse
        route it repeats one written a step back, which a base can learn to estimate instead (benchmarks/LOG.md,
        twenty-sixth session); a slip is caught and fixed as by the inverse route. """
        slip = cls._slip(nums, m, rng, digits) if rng is not None else None
        steps, totals = cls._forward(nums, m, w, slip=slip)
        text = " ".join(steps) + ". Check:"
        for i in (range(len(nums) - 1, 0, -1) if unwind else range(1, len(nums))):
            back = totals[i] - nums[i]
            back = back % m if m else back
            if tagged:
                text += f" {cls.TAGS[i]}{nums[i]}: {totals[i]:0{w}d}-{nums[i]}={back:0{w}d}"
            else:
                text += f" {totals[i]:0{w}d}-{cls.TAGS[i]}{nums[i]}={back:0{w}d}"
            if back != totals[i - 1]:  # the slip is step i: the totals before it are right, so go on from there
                total, redo = totals[i - 1], []
                for j in range(i, len(nums)):
                    head = f"{total:0{w}d}" if j == i else ""
                    total = (total + nums[j]) % m if m else total + nums[j]
                    redo.append(f"{head}+{cls.TAGS[j]}{nums[j]}={total:0{w}d}")
                return (text + f", not {totals[i - 1]:0{w}d}. Wait, the first pass slipped: " + " ".join(redo)
                        + f". The answer is {total}.")
        if closed:
            text += f" {back:0{w}d}+{cls.TAGS[len(nums) - 1]}{nums[-1]}={totals[-1]:0{w}d}"
        return text + f", as before. The answer is {totals[-1]}."

    @classmethod
    def _checked_pairs(cls, nums: list[int], m: int, w: int, rng: random.Random | None, digits: int = 1) -> str:
        """check_route "pairs": the check adds the question's operands again two by two, then the pair sums, so
        its totals are computed afresh rather than copied from the first pass: "a7+b3=10 +c5=15 +d8=23 +e2=25.
        Check: a7+b3=10 c5+d8=13 e2, 10+13=23 +2=25, as before. The answer is 25." (an odd operand out stands
        alone). Where the two totals differ, either may have slipped, so the sum is worked once more the first
        way, and that third total is the answer: "..., not 26. Wait, once more: a7+b3=10 +c5=15 +d8=23 +e2=25.
        The answer is 25." With `rng`, one of the two passes slips (either, at random): the first pass's result
        off by one at a step (`_slip`) or an operand misread (a neighbouring digit, added right); the check's pair
        sum or running total off by one. A model whose slips vary between passes gets its answer right whenever
        two of its three passes are, and a check that slips costs a third pass, not a wrong answer."""
        n = len(nums)
        red = (lambda v: v % m) if m else (lambda v: v)  # noqa: E731
        groups = [list(range(i, min(i + 2, n))) for i in range(0, n, 2)]
        sums = [red(sum(nums[i] for i in g)) for g in groups]
        slip = misread = check_slip = None
        if rng is not None:
            if rng.random() < 0.5:  # the first pass slips: a result or a lookup
                step, error = cls._slip(nums, m, rng, digits)
                if rng.random() < 0.5:
                    slip = (step, error)
                else:  # a neighbouring value, kept within the operands' digits
                    top = 10**digits - 1
                    misread = (step, nums[step] + error if 0 <= nums[step] + error <= top else nums[step] - error)
            else:  # the check slips: a pair sum (when there are pairs) or a total of its running sum
                at = rng.randrange(sum(len(g) == 2 for g in groups) + len(groups) - 1)
                check_slip = (at, rng.choice((-1, 1)))
        steps, totals = cls._forward(nums, m, w, slip=slip, misread=misread)
        written = list(sums)
        pairs = [j for j, g in enumerate(groups) if len(g) == 2]
        if check_slip and check_slip[0] < len(pairs):  # a pair sum off by one (never below zero)
            j = pairs[check_slip[0]]
            written[j] = red(sums[j] + (check_slip[1] if m or sums[j] + check_slip[1] >= 0 else 1))
        words = [f"{cls.TAGS[g[0]]}{nums[g[0]]}+{cls.TAGS[g[1]]}{nums[g[1]]}={s:0{w}d}" if len(g) == 2
                 else f"{cls.TAGS[g[0]]}{nums[g[0]]}" for g, s in zip(groups, written)]
        total, chain = written[0], []
        for k, s in enumerate(written[1:], 1):
            total = total + s
            if check_slip and check_slip[0] - len(pairs) == k - 1:  # a running total off by one
                total += check_slip[1] if m or total + check_slip[1] >= 0 else 1
            total = red(total)
            chain.append(f"{written[0]:0{w}d}+{s:0{w}d}={total:0{w}d}" if k == 1 else f"+{s:0{w}d}={total:0{w}d}")
        text = " ".join(steps) + ". Check: " + " ".join(words) + (", " + " ".join(chain) if chain else "")
        if totals[-1] == total:
            return text + f", as before. The answer is {total}."
        again, right = cls._forward(nums, m, w)
        return (text + f", not {totals[-1]:0{w}d}. Wait, once more: " + " ".join(again)
                + f". The answer is {right[-1]}.")

    @classmethod
    def fixed_solution(cls, problem: Problem, rng: random.Random) -> str:
        """A running sum with a slip that its check catches (`checked_solution` with a slip)."""
        return cls.checked_solution(problem, rng)

    @classmethod
    def lookup_drill(cls, problem: Problem, rng: random.Random) -> str:
        """A document that practises the worked solution's lookups alone: the question, then every tagged operand
        recalled in a random order, "Add a7 b3 c5 d8. Recall: c5 a7 d8 b3." A random order can be followed only
        by finding each tag in the question and copying what follows it (a copy by content, which a worked
        chain's fixed order lets a small model fake by distance, and which the bases that failed had not learned;
        benchmarks/LOG.md, twenty-fourth and twenty-fifth sessions)."""
        nums = problem.meta["operands"]
        order = list(range(len(nums)))
        rng.shuffle(order)
        return problem.question + " Recall: " + " ".join(f"{cls.TAGS[i]}{nums[i]}" for i in order) + "."

    @classmethod
    def sum_drill(cls, problem: Problem, rng: random.Random) -> str:
        """A document that practises the worked solution's additions alone: as many steps as the problem's chain
        has, each written as a step of the chain ("17 +c5=22": the total before, the tagged operand, the new
        total), drawn evenly over the steps a chain can take: a step k (tag c is the third operand), a total
        before it that k operands can make, any operand. "Sums: 17 +c5=22 40 +f9=49 3 +b8=11." A chain of eight
        operands reaches totals in the forties at its last steps only, so those additions are rare in worked
        solutions, and they are where a base's running totals went wrong most (benchmarks/LOG.md,
        twenty-ninth session)."""
        nums, m, w = cls._meta(problem)
        top = 10 ** problem.meta.get("digits", 1) - 1
        facts = []
        for _ in range(len(nums) - 1):
            k = rng.randrange(1, len(nums))
            before = rng.randint(0, m - 1) if m else rng.randint(0, top * k)
            x = rng.randint(0, top)
            after = (before + x) % m if m else before + x
            facts.append(f"{before:0{w}d} +{cls.TAGS[k]}{x}={after:0{w}d}")
        return "Sums: " + " ".join(facts) + "."


# ====================================================================== registry
TASKS = {"addition": Addition, "arithmetic": Arithmetic, "countdown": Countdown, "linear": LinearEquation,
         "running-sum": RunningSum}


def load_task(name: str, split: str = "train", n: int = 100, seed: int = 0, **knobs) -> list[Problem]:
    """`n` problems of task `name` (a key of TASKS) built with `knobs`, drawn from `split` with `seed`."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    task = TASKS[name](**knobs)
    probs = task.problems(n, split, seed)
    for p in probs:
        if p.solution is None:
            p.solution = task.solution(p)
    return probs
