"""Tests for r1lab.grading: answer extraction and mathematical equivalence.

Every equivalence case has a twin that must be rejected, so a grader that says True (or False) to
everything fails here. The symbolic stage runs in a worker process; the hostile-input test runs
in a fresh interpreter with a hard wall-clock limit, so a broken guard fails instead of hanging.
"""

import subprocess
import sys
import textwrap
import time

import pytest

import r1lab.grading as grading
from r1lab.grading import extract_answer, math_equal

# ----- extraction ------------------------------------------------------------------------------

EXTRACTION_CASES = [
    # <answer> tags win over everything, the last block counts, a \boxed inside is unwrapped
    ("Reasoning... \\boxed{4}\n<answer>7</answer>", "7"),
    ("<answer>1</answer> then <answer> 2 </answer>", "2"),
    ("<answer>The answer is $\\boxed{\\frac{1}{2}}$.</answer>", "\\frac{1}{2}"),
    # \boxed: the last one, nested braces, \fbox, \framebox, no-brace form, truncated box ignored
    ("First \\boxed{1}, finally \\boxed{2}.", "2"),
    ("So $\\boxed{\\frac{\\sqrt{3}}{2}}$ is it.", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("Answer: \\fbox{12}", "12"),
    ("or $\\framebox{204}$ minutes", "204"),
    ("hence $\\boxed 5$.", "5"),
    ("\\boxed{3} and then \\boxed{4", "3"),
    # <think> is ignored: closed block, prompt-opened block (lone </think>), several blocks
    ("<think>maybe \\boxed{1}? the answer is 1</think>The answer is 2.", "2"),
    ("the prompt opened it... \\boxed{9}</think>So the result is \\boxed{10}", "10"),
    ("<think>a</think>x <think>\\boxed{5}</think> The answer is 6", "6"),
    # "the answer is" / "final answer" phrases: rest of the sentence, $ and period stripped
    ("We get 12 apples. The answer is 42.", "42"),
    ("The final answer is $3.5$. Done", "3.5"),
    ("**Final Answer:** 17\n", "17"),
    ("so the answer is: x = 4.", "4"),
    ("The answer is $x = 1, y = 2$.", "x = 1, y = 2"),
    ("The answer is therefore 3.", "3"),
    ("the final answer is 15 * 8 = 120 pints", "120 pints"),
    ("The answer is\n\n 99", "99"),
    # GSM8K's #### (calculator annotations removed)
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("Total 1,000 + 200 = 1,200\n#### 1,200", "1,200"),
    # last number: integers, commas, decimals, negatives, fractions; a minus between terms is not a sign
    ("He walked 3 miles and then 12 more", "12"),
    ("It costs 1,234,567 dollars", "1234567"),
    ("temperature fell to -5 degrees", "-5"),
    ("the difference is 5-3", "3"),
    ("about 2.75 liters.", "2.75"),
    ("she ate 3/4 of it", "3/4"),
    # nothing to find
    ("I don't know.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unclosed_think_has_no_answer():
    # The model hit the length limit while reasoning: nothing in there counts, not even a box.
    assert extract_answer("<think>so the answer is \\boxed{5} and 12") is None
    assert extract_answer("The answer is 3 <think> wait, let me check 4") is None
    # ... but a closed block followed by the answer is fine.
    assert extract_answer("<think>12</think>") is None  # nothing after the reasoning
    assert extract_answer("<think>12</think>\n8") == "8"


def test_extraction_is_linear_on_long_hostile_completions():
    # Completions can be 100k+ characters; none of these may take quadratic time.
    for text in ["<answer>" * 30000, "</think>" * 30000, "<think></think>" * 20000, "\\boxed{" * 50000,
                 "\\boxed " * 50000, "the answer is " * 20000, "1," * 100000, "- " * 100000]:
        start = time.monotonic()
        extract_answer(text)
        assert time.monotonic() - start < 2.0, text[:20]
    assert extract_answer("\\boxed{" * 1000 + "7}") == "7"


def test_extract_answer_garbage():
    # Not text, or text with no answer in it: no answer (None), never an exception or a made-up one.
    for junk in [None, 5, b"\\boxed{1}", "\\boxed{", "}}}{{{", "<think>", "</think>", "<answer></answer>", "#### "]:
        assert extract_answer(junk) is None, junk
    # ... while the same shapes with an answer inside still give it
    assert extract_answer("\\boxed{1}") == "1" and extract_answer("<answer>7</answer>") == "7"
    assert extract_answer("#### 12") == "12"


# ----- equivalence -----------------------------------------------------------------------------

EQUIVALENT = [
    ("1,000", "1000"), ("1,\\!000", "1000"), ("1\\,000", "1000"), ("025", "25"),
    ("$18", "18"), ("\\$18.00", "18"), ("18 dollars", "18"), ("5 cm", "5"), ("5cm", "5"),
    ("10\\text{ inches}", "10"), ("6\\mbox{ cm}^2", "6"), ("6 square units", "6"),
    ("30^\\circ", "30"), ("30^{\\circ}", "30"), ("30°", "30"), ("30 degrees", "30"),
    ("50\\%", "50"), ("50%", "0.5"), ("0.5", "50\\%"),
    ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("\\dfrac12", "0.5"), ("\\tfrac{1}{2}", "1/2"),
    ("-\\frac12", "-0.5"), ("\\frac{14}{3}", "4\\frac{2}{3}"), ("2", "2.0"), ("(073)", "73"),
    ("\\sqrt2", "\\sqrt{2}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("\\sqrt[3]{8}", "2"), ("2\\pi", "2 \\pi"), ("\\pi", "\\pi"), ("3.14159", "\\pi"), ("10^{3}", "1000"),
    ("5!", "120"), ("\\binom{5}{2}", "10"), ("e^{i\\pi}", "-1"), ("1+2i", "2i+1"),
    ("(x+2)(x+5)", "x^2+7x+10"), ("\\frac{x}{2}", "0.5x"),
    ("(1, 2)", "(1,2)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"), ("(0.5, 2)", "(\\frac12, 2)"),
    ("[1, 3)", "[1,3)"), ("(-\\infty, 5]", "(-\\infty,5]"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
    ("1, 2, 3", "3, 2, 1"), ("\\{1, 2\\}", "2, 1"), ("x = 1, y = 2", "1, 2"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\begin{pmatrix} 0.5 & 1 \\\\ 2 & 3 \\end{pmatrix}", "\\begin{bmatrix}\\frac12 & 1 \\\\ 2 & 3\\end{bmatrix}"),
    ("x = 3", "3"), ("x=3", "x = 3"), ("\\theta = 30^\\circ", "30"),
    ("\\text{Evelyn}", "Evelyn"), ("evelyn", "\\text{Evelyn}"), ("\\textbf{Yes}", "yes"),
    ("\\left(1,2\\right)", "(1,2)"), ("\\!3\\,", "3"), ("3.", "3"), (" 3 ", "3"), ("$3$", "3"), ("\\boxed{3}", "3"),
    ("(A)", "A"), ("\\text{(C)}", "C"), ("b", "(B)"), ("\u22125", "-5"),
]

NOT_EQUIVALENT = [
    ("12", "1.2"), ("1/2", "12"), ("\\frac{1}{3}", "0.33"), ("\\frac13", "0.333"), ("3", "-3"), ("10^{3}", "103"),
    ("2\\pi", "2"), ("3.14", "\\pi"), ("\\sqrt{2}", "2"), ("100001", "100000"), ("1,000", "1"), ("1,000", "1, 0"),
    ("50", "0.5"), ("0.12", "12"),  # no percent sign, no factor 100
    ("(1,2)", "(2,1)"), ("[1,3)", "[1,3]"), ("(1,3)", "[1,3)"), ("(1,2)", "1, 2"), ("1, 2", "1, 2, 3"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup[1,\\infty)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1 & 2\\end{pmatrix}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("x=3", "x=4"), ("x = 3", "-3"), ("2x", "2"), ("5m", "5"), ("x^2+7x+11", "(x+2)(x+5)"),
    ("A", "B"), ("(A)", "(C)"), ("Evelyn", "Evelin"), ("\\frac{14}{3}", "\\frac{8}{3}"), ("e", "2.718"),
]


@pytest.mark.parametrize("predicted,reference", EQUIVALENT)
def test_equivalent(predicted, reference):
    assert math_equal(predicted, reference)
    assert math_equal(reference, predicted)  # symmetric


@pytest.mark.parametrize("predicted,reference", NOT_EQUIVALENT)
def test_not_equivalent(predicted, reference):
    assert not math_equal(predicted, reference)
    assert not math_equal(reference, predicted)


def test_relative_tolerance_is_tight():
    # 1e-4 relative: 5 significant digits of 1/3 pass, 3 do not; whole numbers compare exactly.
    assert math_equal("0.33333", "\\frac{1}{3}")
    assert not math_equal("0.333", "\\frac{1}{3}")
    assert math_equal("1234.5", "1234.56")  # 4.9e-6 relative
    assert not math_equal("1234.5", "1236")
    assert not math_equal("1000000", "1000001")


@pytest.mark.parametrize("a,b", [("\\frac{1}{0}", "\\frac{2}{0}"), ("0^{-1}", "\\frac{7}{0}"), ("1/0", "2/0"),
                                 ("0/0", "\\frac{0}{0}"), ("\\infty - \\infty", "0/0"), ("\\frac{1}{0}", "\\infty"),
                                 ("\\frac{x}{0}", "\\frac{y}{0}"), ("(1/0, 2)", "(2/0, 2)")])
def test_undefined_values_equal_nothing(a, b):
    # issue 24: sympy makes 1/0 and 2/0 both complex infinity (zoo), and 0/0 NaN, which compare equal; an answer
    # that is undefined is never right (infinity itself, \infty, still equals \infty)
    assert not math_equal(a, b) and not math_equal(b, a)
    assert math_equal("\\infty", "\\infty") and math_equal("-\\infty", "-\\infty")


def test_none_and_garbage_never_raise():
    assert not math_equal(None, "1")
    garbage = ["", " ", "}}}{{{", "\\frac{", "\\frac{1}{", "\\boxed{", "\\sqrt[", "^^^", "(((", ")", "\\begin{pmatrix}",
               "1/0", "0/0", "\\frac{1}{0}", "\x00", "a" * 20000, "{" * 5000 + "}" * 5000, "\\frac{" * 2000, "(" * 3000,
               "\\left(", "[1,", ",,,", "\\infty - \\infty", "0^{-1}", "\\cup", "x = ", "= 3", "\\text{", "$", "%"]
    for g in garbage:
        for pair in ((g, "1"), ("1", g), (g, g + "x")):
            assert math_equal(*pair) in (True, False)
    assert not math_equal(12, "1.2") and math_equal(12, "12")  # non-strings are str()-ed


def test_parse_expr_input_is_whitelisted(tmp_path):
    # sympy's parse_expr evaluates Python: an answer must never reach it as code.
    marker = tmp_path / "pwned"
    for attack in [f"__import__('pathlib').Path('{marker}').touch()", "x.__class__", "exec('1')", "(lambda: 1)()"]:
        assert not math_equal(attack, "1")
    assert not marker.exists()
    assert grading._latex_to_python("__import__('os')") is None
    assert grading._latex_to_python("x.real") is None
    assert grading._latex_to_python("\\frac{x}{2}") is not None


def test_timeout_zero_skips_only_the_symbolic_stage():
    assert math_equal("1,000", "1000", timeout=0)  # string / numeric stages are not timed
    assert not math_equal("2\\sqrt{3}", "\\sqrt{12}", timeout=0)
    assert math_equal("2\\sqrt{3}", "\\sqrt{12}")


def test_hostile_expression_times_out_fast():
    # Run in a fresh interpreter under a hard limit, so a broken guard fails here instead of hanging
    # pytest. 9^(9^(9^9)) is evaluated by sympy inside one C call no signal interrupts; a big factorial
    # likewise. Each must come back False within the 1 s timeout + worker restart (~0.5 s).
    script = textwrap.dedent("""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("g", sys.argv[1])
        g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
        assert g.math_equal("x+x", "2x")  # worker warm-up, not timed
        for hostile in ["9^{9^{9^{9}}}", "(10^{10})!"]:
            start = time.monotonic()
            assert g.math_equal(hostile, "1", timeout=1.0) is False
            elapsed = time.monotonic() - start
            assert elapsed < 4.0, (hostile, elapsed)
        assert g.math_equal("\\sqrt{12}", "2\\sqrt{3}")  # the worker was replaced and still works
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script, grading.__file__], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_hostile_in_process_and_recovery():
    start = time.monotonic()
    assert not math_equal("2^{2^{2^{2^{2^{2}}}}}", "3", timeout=0.5)
    assert time.monotonic() - start < 3.0
    assert math_equal("(x+1)^2", "x^2+2x+1")


def test_extract_then_compare_end_to_end():
    completion = "<think>Let me compute 1000 * 1.5 ... maybe 1400?</think>The total is $\\boxed{1,500}$ dollars."
    assert math_equal(extract_answer(completion), "1500")
    assert not math_equal(extract_answer(completion), "1400")
    assert not math_equal(extract_answer("<think>1500"), "1500")  # unfinished reasoning scores 0
