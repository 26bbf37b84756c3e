"""The synthetic reasoning tasks: arithmetic, countdown, linear equations (and the registry over them)."""

import re

import pytest

from r1lab.grading import extract_answer, math_equal
from r1lab.tasks.synthetic import (TASKS, Arithmetic, Countdown, LinearEquation, RunningSum, load_task,
                                   parse_expression)

SMALL = {"addition": {"digits": 1}, "arithmetic": {"digits": 1, "n_operands": 2},
         "countdown": {"n_numbers": 3, "max_target": 30, "max_number": 6}, "linear": {"max_coef": 3},
         "running-sum": {"n_operands": 2}}


def _key(p):
    return p.question


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_problems_other_seed_other_problems(name):
    a = load_task(name, "train", 40, seed=1)
    b = load_task(name, "train", 40, seed=1)
    assert [(p.question, p.answer, p.solution) for p in a] == [(p.question, p.answer, p.solution) for p in b]
    assert [p.question for p in a] != [p.question for p in load_task(name, "train", 40, seed=2)]


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_disjoint_whatever_the_seeds(name):
    knobs = SMALL[name]  # small instance spaces, so collisions would show
    train = {_key(p) for s in range(3) for p in load_task(name, "train", 150, seed=s, **knobs)}
    test = {_key(p) for s in range(3) for p in load_task(name, "test", 60, seed=s, **knobs)}
    assert train and test and not train & test


@pytest.mark.parametrize("name", list(TASKS))
def test_worked_solutions_verify_through_the_grader(name):
    task_cls = TASKS[name]
    for split in ("train", "test"):
        for p in load_task(name, split, 100, seed=3):
            assert p.solution and p.solution.rstrip().endswith(".")
            got = extract_answer(p.solution)
            assert task_cls.verify(p, got), (p.solution, got)
            assert task_cls.verify(p, extract_answer(f"<think>{p.solution}</think><answer>{p.answer}</answer>"))


def test_knobs_change_difficulty():
    p = Arithmetic(digits=4, ops=("*",), n_operands=3).problems(20, "train", 0)
    assert all(len(q.meta["operands"]) == 3 and all(1000 <= x <= 9999 for x in q.meta["operands"]) for q in p)
    assert all(int(q.answer) == q.meta["operands"][0] * q.meta["operands"][1] * q.meta["operands"][2] for q in p)
    c = Countdown(n_numbers=5, max_target=50).problems(20, "train", 0)
    assert all(len(q.meta["numbers"]) == 5 and 1 <= q.meta["target"] <= 50 for q in c)
    with pytest.raises(ValueError):
        Arithmetic(ops=("/",))


def test_arithmetic_precedence_and_numeric_equivalence():
    p = Arithmetic(digits=2, n_operands=3).problems(200, "train", 0)
    for q in p:
        value, _ = parse_expression(q.meta["expression"])
        assert value == int(q.answer)
    q = p[0]
    assert Arithmetic.verify(q, f" {q.answer}.0 ") and not Arithmetic.verify(q, str(int(q.answer) + 1))
    assert not Arithmetic.verify(q, None)


def test_every_countdown_instance_is_solvable():
    for knobs in ({}, {"n_numbers": 2, "max_target": 20}, {"n_numbers": 6, "max_target": 500, "max_number": 25}):
        for split in ("train", "test"):
            for p in Countdown(**knobs).problems(100, split, seed=7):
                assert Countdown.verify(p, p.answer)
                assert Countdown.verify(p, p.meta["expression"] + f" = {p.meta['target']}")
                value, literals = parse_expression(p.answer)
                assert value == p.meta["target"] and sorted(literals) == sorted(p.meta["numbers"])


def _countdown(numbers, target):
    from r1lab.tasks.benchmarks import Problem

    return Problem(id="t", question="", answer="", meta={"numbers": numbers, "target": target})


def test_countdown_verifier_rejects_bad_answers():
    p = _countdown([3, 5, 2, 7], 16)
    assert Countdown.verify(p, "(3 + 5) * 2") and Countdown.verify(p, "(3+5)*2 = 16") and Countdown.verify(p, "7*2+5-3")
    assert Countdown.verify(p, "(7 + 5 + 3 + 2) - 1 * 1") is False  # 1 is not given
    assert not Countdown.verify(p, "(3 + 5) * 3 - 8")  # wrong numbers
    assert not Countdown.verify(p, "(5 + 5 + 3) + 3")  # reused numbers
    assert not Countdown.verify(p, "3 + 5 + 2")  # wrong target
    assert not Countdown.verify(p, "(3 + 5) * 2 = 17")
    assert not Countdown.verify(p, "16") and not Countdown.verify(p, "")
    assert Countdown.verify(_countdown([6, 4, 3], 8), "6 / 3 * 4") and not Countdown.verify(_countdown([6, 4], 1), "6/4")
    assert not Countdown.verify(_countdown([4, 0], 1), "4 / 0")
    for evil in ("__import__('os')", "__import__('os').system('true')", "3**5", "-3+19", "(" * 5000 + "3" + ")" * 5000,
                 "(" * 60 + "3" + ")" * 60, "2 ++ 3", "(3 + 5) * 2)", "((3 + 5) * 2", "3 5", None, 16, "1e2", "2.0*8"):
        assert Countdown.verify(p, evil) is False


def test_linear_answers_are_integers_and_solve_the_equation():
    for q in LinearEquation(max_coef=20).problems(200, "test", 5):
        x = int(q.answer)
        a, b, c = q.meta["a"], q.meta["b"], q.meta["c"]
        assert a != 0 and a * x + b == c and str(x) == q.answer
        assert LinearEquation.verify(q, q.answer) and LinearEquation.verify(q, f"x = {x}")
        assert math_equal(f"{x}.0", q.answer) and not LinearEquation.verify(q, str(x + 1))


def test_registry_rejects_unknown_task():
    with pytest.raises(ValueError):
        load_task("nope")


def test_running_sum_steps_are_local_and_checks_catch_the_slip():
    import random

    t = RunningSum(n_operands=4)
    p = t.problems(1, "train", 0)[0]
    p.meta["operands"], p.answer = [7, 3, 5, 8], "23"  # a known instance
    assert t.solution(p) == "a7+b3=10 +c5=15 +d8=23. The answer is 23."
    # The check works the sum out again; the answer is its total.
    assert t.checked_solution(p) == ("a7+b3=10 +c5=15 +d8=23. Check: a7+b3=10 +c5=15 +d8=23, as before. "
                                     "The answer is 23.")
    for seed in range(40):  # every slip is caught by the check, whose total is the answer
        for q in t.problems(5, "train", seed):
            text = t.fixed_solution(q, random.Random(seed))
            first, check = text.split(". Check: ")
            wrong = first.rsplit("=", 1)[1]
            assert wrong != q.answer and abs(int(wrong) - int(q.answer)) == 1  # the slip carried to the total
            assert f", not {wrong}. Wait, " in check and check.split(", not ")[0].rsplit("=", 1)[1] == q.answer
            assert extract_answer(text) == q.answer and RunningSum.verify(q, extract_answer(text))
            slipped = t.slipped_solution(q, random.Random(seed))  # a slip nobody catches: wrong by one
            assert "Check" not in slipped and abs(int(extract_answer(slipped)) - int(q.answer)) == 1
            assert all(int(x) >= 0 for x in re.findall(r"=(-?\d+)", slipped))  # a slip never goes below zero
    q = t.problems(1, "test", 0)[0]
    assert q.question.startswith("Add a") and q.question.count(" ") == 4 and q.answer == str(sum(q.meta["operands"]))
    # Shuffled: the same tagged operands in another order; the split follows the operands, not their order.
    s = RunningSum(n_operands=4, shuffled=True)
    for q in s.problems(30, "test", 0):
        words = q.question.removeprefix("Add ").rstrip(".").split()
        assert sorted(words) == [f"{tag}{x}" for tag, x in zip("abcd", q.meta["operands"])]
        assert t.split_of((q.meta["operands"], ())) == "test"
    assert any(not q.question.startswith("Add a") for q in s.problems(30, "train", 0))
    with pytest.raises(ValueError, match="n_operands"):
        RunningSum(n_operands=1)
    with pytest.raises(ValueError, match=r"n_operands must be in \[2, 26\]"):
        RunningSum(n_operands=27)
    # up to one operand per letter: a 24-operand sum is tagged a..x, and its worked chain ends at the sum
    long = RunningSum(n_operands=24, check_route="inverse")
    q = long.problems(1, "train", 5)[0]
    words = q.question.removeprefix("Add ").rstrip(".").split()
    assert [w[0] for w in words] == list("abcdefghijklmnopqrstuvwx")
    assert q.answer == str(sum(q.meta["operands"])) and long.verify(q, extract_answer(long.solution(q)))
    assert long.solution(q).endswith(f"+x{q.meta['operands'][-1]}={q.answer}. The answer is {q.answer}.")
    # Modulo 10: every total of the chain is a digit, the answer the sum's last digit; slips wrap around.
    m = RunningSum(n_operands=4, modulus=10)
    p = m.problems(1, "train", 0)[0]
    p.meta["operands"], p.answer = [7, 3, 5, 8], "3"
    assert m.solution(p) == "a7+b3=0 +c5=5 +d8=3. The answer is 3."
    for q in m.problems(60, "train", 1):
        assert q.question.endswith(" mod 10.") and q.answer == str(sum(q.meta["operands"]) % 10)
        text = m.fixed_solution(q, random.Random(q.question))
        assert extract_answer(text) == q.answer and all(0 <= int(x) < 10 for x in re.findall(r"=(\d+)", text))
        assert extract_answer(m.slipped_solution(q, random.Random(q.question))) != q.answer
    with pytest.raises(ValueError, match="modulus"):
        RunningSum(modulus=1)


def test_running_sums_of_two_digit_operands():
    """digits=2 draws operands 0-99 ("Add a47 b3 c91 d0."); each worked step is still one addition to the total
    before it, checks and slips work as with one digit, and the default task's problems do not change."""
    import random

    t = RunningSum(n_operands=4, digits=2, check_route="inverse")
    assert t.name == "running-sum-4-d2" and RunningSum().name == "running-sum-8"
    assert RunningSum(n_operands=4, digits=2, padded=True).width == 3  # the largest total, 4 x 99 = 396
    p = t.problems(1, "train", 0)[0]
    p.meta["operands"], p.answer = [47, 3, 91, 0], "141"  # a hand-worked instance
    assert t.solution(p) == "a47+b3=50 +c91=141 +d0=141. The answer is 141."
    assert t.checked_solution(p) == ("a47+b3=50 +c91=141 +d0=141. Check: 50-b3=47 141-c91=50 141-d0=141, "
                                     "as before. The answer is 141.")
    problems = t.problems(200, "train", 3)
    ops = [x for q in problems for x in q.meta["operands"]]
    assert min(ops) >= 0 and max(ops) <= 99 and sum(x >= 10 for x in ops) > len(ops) // 2
    errors = []
    for q in problems[:100]:
        assert q.answer == str(sum(q.meta["operands"]))
        assert q.question == "Add " + " ".join(f"{a}{x}" for a, x in zip("abcd", q.meta["operands"])) + "."
        fixed = t.fixed_solution(q, random.Random(q.question))  # the check catches the slip; the answer is right
        assert ", not " in fixed and extract_answer(fixed) == q.answer
        slipped = t.slipped_solution(q, random.Random(q.question))
        errors.append(int(extract_answer(slipped)) - int(q.answer))
        assert all(int(x) >= 0 for x in re.findall(r"=(-?\d+)", slipped))  # never below zero
    # half the slips of two-digit sums are a carry dropped or added (off by ten), the rest off by one
    assert set(errors) <= {-10, -1, 1, 10} and 25 <= sum(abs(e) == 10 for e in errors) <= 75
    for route in RunningSum.CHECK_ROUTES:  # every route's slips, carries too, and every fixed answer right
        r = RunningSum(n_operands=4, digits=2, check_route=route)
        off = set()
        for q in r.problems(60, "train", 5):
            text = r.fixed_solution(q, random.Random(q.question))
            assert extract_answer(text) == q.answer, (route, text)
            off.add(int(text.split(". Check: ")[0].rsplit("=", 1)[1]) - int(q.answer))  # the first pass's total
        assert off - {0} <= {-10, -1, 1, 10} and off & {-10, 10}, (route, off)
    one = [q.question for q in RunningSum().problems(20, "test", 4)]
    assert [q.question for q in RunningSum(digits=1).problems(20, "test", 4)] == one
    assert all(len(w) == 2 for q in one for w in q.removeprefix("Add ").rstrip(".").split())
    with pytest.raises(ValueError, match=r"digits must be in \[1, 3\]"):
        RunningSum(digits=4)


def test_padded_running_sums_take_the_same_tokens_at_every_step():
    """padded=True writes every worked total with the largest total's digits, so each step is as long as the
    next whatever the totals are (a model that finds operands by distance then finds them on sums that stay
    small); the answer itself is the plain number, and the problems are those of the unpadded task."""
    import random

    t = RunningSum(n_operands=4, padded=True)
    assert t.width == 2 and RunningSum(n_operands=12, padded=True).width == 3 and RunningSum().width == 0
    assert RunningSum(n_operands=4, modulus=10, padded=True).width == 1
    p = t.problems(1, "train", 0)[0]
    p.meta["operands"], p.answer = [2, 3, 1, 0], "6"  # a hand-worked instance that stays below ten
    assert t.solution(p) == "a2+b3=05 +c1=06 +d0=06. The answer is 6."
    assert t.checked_solution(p) == ("a2+b3=05 +c1=06 +d0=06. Check: a2+b3=05 +c1=06 +d0=06, as before. "
                                     "The answer is 6.")
    plain = RunningSum(n_operands=4)
    assert [q.question for q in t.problems(20, "test", 3)] == [q.question for q in plain.problems(20, "test", 3)]
    for q in RunningSum(n_operands=8, padded=True).problems(50, "train", 1):
        text = RunningSum.fixed_solution(q, random.Random(q.question))
        assert all(len(x) == 2 for x in re.findall(r"=(\d+)", text))  # every total, slipped ones too
        assert f", not {text.split('. Check: ')[0].rsplit('=', 1)[1]}. Wait, " in text
        assert extract_answer(text) == q.answer == str(int(q.answer))
        steps = RunningSum.solution(q).split(". The answer")[0].split(" ")[1:]
        assert len({len(s) for s in steps}) == 1  # "+c1=06": six characters, one token each in the speedrun


def _hand_worked(route: str):
    """a7 + b3 + c5 + d8 = 23 as a RunningSum problem whose checks take `route`; its plain worked solution is the
    same whatever the route."""
    t = RunningSum(n_operands=4, check_route=route)
    p = t.problems(1, "train", 0)[0]
    p.meta["operands"], p.answer = [7, 3, 5, 8], "23"
    assert t.solution(p) == "a7+b3=10 +c5=15 +d8=23. The answer is 23."
    return t, p


def test_backward_checks_take_another_route_and_a_third_pass_settles_a_disagreement():
    """check_route="backward": the check sums from the last operand to the first (other totals, so other
    lookups than the first pass); agreeing totals end it, and where they differ a third pass (odd tags, then
    even) gives the answer, whichever of the first two slipped. Hand-worked, then every slip over many draws."""
    import random

    t, p = _hand_worked("backward")
    assert t.checked_solution(p) == ("a7+b3=10 +c5=15 +d8=23. Check: d8+c5=13 +b3=16 +a7=23, as before. "
                                     "The answer is 23.")
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        text = t.fixed_solution(p, rng)
        first, rest = text.split(". Check: ")
        check, third = rest.split(". Wait, a third way: ")
        a, b = first.rsplit("=", 1)[1], check.split(", not ")[0].rsplit("=", 1)[1]
        assert check.split(", not ")[1] == a and a != b and "23" in (a, b)  # exactly one of the two slipped
        assert check.startswith("d8+c5=") and third.startswith("a7+c5=12 +b3=15 +d8=23.")
        assert extract_answer(text) == "23"
        seen.add("first" if b == "23" else "check")
    assert seen == {"first", "check"}
    for q in t.problems(60, "train", 2):  # any instance: the answer is right and no total goes below zero
        text = t.fixed_solution(q, random.Random(q.question))
        assert extract_answer(text) == q.answer and all(int(x) >= 0 for x in re.findall(r"=(-?\d+)", text))
    m = RunningSum(n_operands=5, modulus=10, check_route="backward")
    for q in m.problems(40, "train", 3):
        text = m.fixed_solution(q, random.Random(q.question))
        assert extract_answer(text) == q.answer and all(0 <= int(x) < 10 for x in re.findall(r"=(\d+)", text))
    same = [q.question for q in RunningSum().problems(20, "test", 4)]  # the problems are the default task's
    assert [q.question for q in RunningSum(check_route="backward").problems(20, "test", 4)] == same
    with pytest.raises(ValueError, match="check_route"):
        RunningSum(check_route="sideways")


@pytest.mark.parametrize("route, checked, caught", [
    ("inverse", "Check: 10-b3=7 15-c5=10 23-d8=15, as before.",
     ["a7+b3=10 +c5=16 +d8=24. Check: 10-b3=7 16-c5=11, not 10. Wait, the first pass slipped: 10+c5=15 +d8=23."]),
    ("unwind", "Check: 23-d8=15 15-c5=10 10-b3=7, as before.",
     ["a7+b3=10 +c5=16 +d8=24. Check: 24-d8=16 16-c5=11, not 10. Wait, the first pass slipped: 10+c5=15 +d8=23.",
      "a7+b3=9 +c5=14 +d8=22. Check: 22-d8=14 14-c5=9 9-b3=6, not 7. Wait, the first pass slipped: 7+b3=10 +c5=15 "
      "+d8=23."]),
    ("closed", "Check: 10-b3=7 15-c5=10 23-d8=15 15+d8=23, as before.",
     ["a7+b3=10 +c5=16 +d8=24. Check: 10-b3=7 16-c5=11, not 10. Wait, the first pass slipped: 10+c5=15 +d8=23."]),
    ("tagged", "Check: b3: 10-3=7 c5: 15-5=10 d8: 23-8=15, as before.",
     ["a7+b3=10 +c5=16 +d8=24. Check: b3: 10-3=7 c5: 16-5=11, not 10. Wait, the first pass slipped: 10+c5=15 "
      "+d8=23."]),
])
def test_checks_that_undo_the_steps_hand_worked(route, checked, caught):
    """a7 + b3 + c5 + d8 = 23 checked by each route that undoes the first pass's steps: the check when nothing
    slipped, and fixed solutions of slips written out by hand among the six (+1 or -1 at each of three steps)."""
    import random

    t, p = _hand_worked(route)
    assert t.checked_solution(p) == f"a7+b3=10 +c5=15 +d8=23. {checked} The answer is 23."
    texts = {t.fixed_solution(p, random.Random(k)) for k in range(200)}
    assert len(texts) == 6
    assert {c + " The answer is 23." for c in caught} <= texts


def _caught_slips(route: str):
    """(operands by tag, first pass, check up to its verdict, verdict) of fixed solutions of eight-operand sums
    whose checks take `route`: 80 problems, three slips each; every answer is right and says the pass slipped."""
    import random

    e = RunningSum(check_route=route)
    for q in e.problems(80, "train", 2):
        for k in range(3):
            text = e.fixed_solution(q, random.Random(f"{q.question}/{k}"))
            assert extract_answer(text) == q.answer and "Wait, the first pass slipped: " in text
            first, check = text.split(". Check: ")
            yield (dict(zip("abcdefgh", q.meta["operands"])), first, *check.split(", not "))


def test_inverse_checks_undo_each_step_from_what_the_first_pass_wrote():
    """check_route="inverse": each step of the first pass undone in turn ("10-b3=7" checks "a7+b3=10"), using
    only numbers and tagged operands the first pass wrote; the first step whose undoing disagrees is the slip,
    and the sum goes on from the total before it. Every slip over many draws (hand-worked above)."""
    import random

    for _, first, check, _ in _caught_slips("inverse"):
        written = set(re.findall(r"[a-p]\d|\d+", first))
        for step in check.split():  # "15-c5=10": the total and the operand stand in the first pass
            total, operand = re.fullmatch(r"(\d+)-([a-p]\d)=-?\d+", step).groups()
            assert total in written and operand in written
    m = RunningSum(n_operands=5, modulus=10, check_route="inverse")
    for q in m.problems(40, "train", 3):
        text = m.fixed_solution(q, random.Random(q.question))
        assert extract_answer(text) == q.answer and all(0 <= int(x) < 10 for x in re.findall(r"=(\d+)", text))


def test_unwind_checks_undo_the_steps_from_the_last_and_chain_their_totals():
    """check_route="unwind": the inverse check run from the last step back to the first, so each check step
    starts from the total the one before it arrived at (the first from the first pass's answer), and the first
    step whose undoing disagrees with the first pass is the slip. Every slip over many draws (hand-worked above)."""
    import random

    for ops, first, check, verdict in _caught_slips("unwind"):
        total = first.rsplit("=", 1)[1]  # the first check step starts from the first pass's answer
        tags = []
        for step in check.split():  # "15-c5=10": each starts where the one before it arrived
            head, tag, x, back = re.fullmatch(r"(\d+)-([a-h])(\d)=(-?\d+)", step).groups()
            assert head == total and int(x) == ops[tag] and int(back) == int(head) - int(x)
            total = back
            tags.append(tag)
        assert tags == list("hgfedcb")[:len(tags)]  # from the last step back
        totals = [str(ops["a"])] + re.findall(r"=(\d+)", first)  # the first pass's, totals[i] after step i
        slipped = 8 - len(tags)  # the step whose undoing disagreed: the one before it is "not" its result
        assert verdict.split(".")[0] == totals[slipped - 1] != total
    m = RunningSum(n_operands=5, modulus=10, check_route="unwind")
    for q in m.problems(40, "train", 3):
        text = m.fixed_solution(q, random.Random(q.question))
        assert extract_answer(text) == q.answer and all(0 <= int(x) < 10 for x in re.findall(r"=(\d+)", text))


def test_tagged_checks_name_the_operand_before_the_total_they_undo():
    """check_route="tagged": the inverse route's steps, in order, each written "c5: 15-5=10", the tagged operand
    first, then the first pass's total after that operand, less the operand, giving the total before it. A slip is
    caught at its own step, and the sum worked again from there. Every slip over many draws (hand-worked above)."""
    for ops, first, check, verdict in _caught_slips("tagged"):
        after = dict(re.findall(r"([a-h])\d=(\d+)", first))  # the first pass's total after each operand
        steps = re.findall(r"([b-h])(\d): (\d+)-(\d)=(-?\d+)", check)
        assert [s[0] for s in steps] == list("bcdefgh")[:len(steps)]  # in order, from b
        for tag, x, total, x2, back in steps:
            assert int(x) == int(x2) == ops[tag] and total == after[tag] and int(back) == int(total) - int(x)
        # every step but the last agrees with the total before it; the last is the slip, "not" that total
        before = [str(ops["a"])] + [after[c] for c in "bcdefg"]
        assert all(back == before[i] for i, (*_, back) in enumerate(steps[:-1]))
        assert verdict.split(".")[0] == before[len(steps) - 1] != steps[-1][4]


def test_pair_checks_add_the_question_again_and_a_third_pass_settles_a_disagreement():
    """check_route="pairs": the check adds the question's operands two by two, then the pair sums (totals worked
    afresh, not copied from the first pass); where the two totals differ, the sum is worked once more the first
    way, and that total is the answer. In the corpus either pass slips: the first by a result off by one or a
    misread operand (a neighbouring digit, added right), the check by a pair sum or a running total off by one.
    Hand-worked, then every slip over many draws."""
    import random

    t, p = _hand_worked("pairs")
    assert t.checked_solution(p) == ("a7+b3=10 +c5=15 +d8=23. Check: a7+b3=10 c5+d8=13, 10+13=23, as before. "
                                     "The answer is 23.")
    texts = {t.fixed_solution(p, random.Random(k)) for k in range(600)}
    again = ". Wait, once more: a7+b3=10 +c5=15 +d8=23. The answer is 23."
    assert ("a7+b3=10 +c5=16 +d8=24. Check: a7+b3=10 c5+d8=13, 10+13=23, not 24" + again) in texts  # a slip
    assert ("a7+b3=10 +c4=14 +d8=22. Check: a7+b3=10 c5+d8=13, 10+13=23, not 22" + again) in texts  # a misread
    assert ("a7+b3=10 +c5=15 +d8=23. Check: a7+b3=10 c5+d8=14, 10+14=24, not 23" + again) in texts  # check's pair
    assert ("a7+b3=10 +c5=15 +d8=23. Check: a7+b3=10 c5+d8=13, 10+13=22, not 23" + again) in texts  # check's total
    # first pass: +1 or -1 at three steps, as a slip or a misread; check: +1 or -1 at two pair sums or one total
    assert len(texts) == 12 + 6
    odd = RunningSum(n_operands=5, check_route="pairs")
    q = odd.problems(1, "train", 0)[0]
    q.meta["operands"], q.answer = [2, 1, 1, 6, 9], "19"
    assert odd.checked_solution(q).endswith("Check: a2+b1=3 c1+d6=7 e9, 3+7=10 +9=19, as before. The answer is 19.")
    task = RunningSum(check_route="pairs")
    kinds = set()
    for q in task.problems(80, "train", 2):
        ops = dict(re.findall(r"([a-h])(\d)", q.question))
        for k in range(3):
            text = task.fixed_solution(q, random.Random(f"{q.question}/{k}"))
            first, rest = text.split(". Check: ")
            check, third = rest.split(", not ")
            assert extract_answer(text) == q.answer
            assert third.split(". Wait, once more: ")[1] == RunningSum.solution(q)  # the plain chain, right
            assert all(ops[tag] == x for tag, x in re.findall(r"([a-h])(\d)", check))  # read from the question
            pairs, chain = check.split(", ")
            assert "".join(re.findall(r"([a-h])\d", pairs)) == "abcdefgh"
            sums = [int(x) + int(y) for x, y in re.findall(r"[a-h](\d)\+[a-h](\d)", pairs)]
            written = [int(x) for x in re.findall(r"=(\d+)", pairs)]
            totals = [int(x) for x in re.findall(r"=(\d+)", chain)]
            if first != RunningSum.solution(q).split(". The answer")[0]:  # the first pass slipped, the check not
                assert written == sums and totals == [sum(sums[:i]) for i in (2, 3, 4)]
                kinds.add("misread" if any(ops[tag] != x for tag, x in re.findall(r"([a-h])(\d)", first))
                          else "slip")
            else:  # the check slipped: one pair sum or one running total off by one, carried on
                assert totals[-1] != int(q.answer) and sum(abs(a - b) for a, b in zip(written, sums)) <= 1
                kinds.add("check")
        assert task.checked_solution(q).endswith(", as before. The answer is " + q.answer + ".")
    assert kinds == {"misread", "slip", "check"}
    for n, m in ((5, 10), (2, 0), (3, 10)):
        mt = RunningSum(n_operands=n, modulus=m, check_route="pairs")
        for q in mt.problems(40, "train", 3):
            text = mt.fixed_solution(q, random.Random(q.question))
            assert extract_answer(text) == q.answer and "Wait, once more: " in text
            assert all(0 <= int(x) < (m or 99) for x in re.findall(r"=(-?\d+)", text))
            assert all(0 <= int(x) <= 9 for x in re.findall(r"[a-e](\d+)", text))
