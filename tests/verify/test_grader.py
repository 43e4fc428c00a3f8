"""Mathematical equivalence (``grade``), the fast path's agreement with math-verify, time limits."""

import json
import signal
import threading
import time

import pytest

from jaxalign.verify import GradingTimeout, grade, grade_with_status, grader, normalize

EQUIVALENT = [
    # numbers
    ("27", "27"),
    ("27.0", "27"),
    ("27.00", "27"),
    ("027", "27"),  # AIME writes 025
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("10,\\!080", "10080"),
    ("-5", "-5"),
    ("0.25", "\\frac14"),
    ("\\frac{1}{4}", "0.25"),
    ("1/4", "\\frac{1}{4}"),
    ("0.333333", "\\frac{1}{3}"),  # math-verify rounds decimals to 6 places
    ("\\$18.90", "18.9"),
    ("18.90", "\\$18.90"),
    # fractions, roots, pi
    ("\\frac{6}{4}", "\\frac{3}{2}"),  # unreduced: equal value is correct
    ("\\dfrac{3}{2}", "\\frac32"),
    ("\\frac{3}{2}", "1.5"),
    ("\\sqrt{117}", "3\\sqrt{13}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("12\\pi", "12 \\pi"),
    ("\\pi", "3.14159265"),
    # assignments and equations
    ("x = 5", "5"),
    ("x=5", "5"),
    ("5", "x = 5"),
    ("y = 2x + 3", "y = 2x + 3"),
    ("y = 3 + 2x", "y = 2x + 3"),
    # percent (the problem asks for a percent or a fraction: either is unambiguous)
    ("10\\%", "10"),
    ("10\\%", "0.1"),
    ("10%", "10\\%"),
    # intervals, tuples, sets, matrices
    ("(2, \\infty)", "(2,\\infty)"),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, \\frac83]"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("[-2,7]", "x \\in [-2,7]"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(1,-16,-4,43)", "(1, -16, -4, 43)"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("1, -2", "-2,1"),  # a list of solutions is a set
    ("7, 5, 3", "3, 5, 7"),
    ("1 + \\sqrt{19}, 1 - \\sqrt{19}", "1 \\pm \\sqrt{19}"),
    (
        "\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}",
        "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}",
    ),
    (
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}",
    ),
    # expressions
    ("x^2 + 2x + 1", "(x+1)^2"),
    ("(a+5)(b+2)", "ab + 2a + 5b + 10"),
    ("2i + 1", "1+2i"),
    ("9 i + 6", "6+9i"),
    # text, degrees, units
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("evelyn", "\\text{Evelyn}"),
    ("\\text{(B)}", "\\text{(B)}"),
    ("B", "\\text{(B)}"),
    ("(B)", "\\text{(B)}"),
    ("120", "120^\\circ"),
    ("120^{\\circ}", "120^\\circ"),
    ("120°", "120"),
    ("15", "15\\mbox{ cm}^2"),
    ("15 \\text{ cm}^2", "15\\mbox{ cm}^2"),
    ("5.4", "5.4 \\text{ cents}"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("864", "864 \\mbox{ inches}^2"),
]

DIFFERENT = [
    ("28", "27"),
    ("27.5", "27"),
    ("27.000001", "27"),
    ("1,001", "1000"),
    ("0.26", "\\frac14"),
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("0.33", "\\frac{1}{3}"),
    ("-5", "5"),
    ("\\sqrt{116}", "3\\sqrt{13}"),
    ("\\pi", "3.14"),
    ("x = 6", "5"),
    ("y = 2x + 4", "y = 2x + 3"),
    ("(4, 2)", "(2,4)"),  # a point: order matters
    ("[2, 4]", "(2,4)"),  # closed vs open interval
    ("(2, \\infty)", "[2,\\infty)"),
    ("\\{1, 2, 3\\}", "\\{1, 2\\}"),
    ("1", "1 \\pm \\sqrt{19}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("x^2 + 1", "(x+1)^2"),
    ("2i + 1", "1+3i"),
    ("\\text{Navin}", "\\text{Evelyn}"),
    ("C", "\\text{(B)}"),
    ("121", "120^\\circ"),
    ("16", "15\\mbox{ cm}^2"),
    ("", "5"),
    ("   ", "5"),
    ("5", ""),
]


@pytest.mark.parametrize("given,gold", EQUIVALENT)
def test_equivalent_answers_are_correct(given, gold):
    assert grade(given, gold) is True


@pytest.mark.parametrize("given,gold", DIFFERENT)
def test_different_answers_are_wrong(given, gold):
    assert grade(given, gold) is False


def test_numeric_ground_truths():
    assert grade("27", 27.0)  # AMC23 stores integer answers as floats
    assert grade("27.0", 27)
    assert grade("2.5", 2.5)
    assert not grade("28", 27.0)


def test_list_ground_truth_means_any():
    assert grade("5", ["4", "5"])
    assert grade("\\frac{1}{2}", ["0.5", "7"])
    assert not grade("6", ["4", "5"])
    assert not grade("5", [])
    assert not grade("5", [None])
    assert grade("5", (5.0,))


def test_none_is_never_correct():
    assert not grade(None, "5")
    assert grade_with_status(None, "5") == (False, False)


def test_strict_form_rejects_unreduced_fractions():
    assert grade("\\frac{6}{4}", "\\frac32")
    assert not grade("\\frac{6}{4}", "\\frac32", strict_form=True)
    assert not grade("\\dfrac{6}{4}", "\\frac32", strict_form=True)
    assert not grade("6/4", "1.5", strict_form=True)
    assert grade("\\frac{3}{2}", "\\frac32", strict_form=True)
    assert grade("1.5", "\\frac32", strict_form=True)
    assert grade("x = 5", "5", strict_form=True)  # other forms are unaffected


def test_normalize():
    assert normalize("$\\left( 1, 2 \\right)$") == "(1,2)"
    assert normalize("\\text{ 5 apples}.") == "5apples"
    assert normalize("\\dfrac{1}{2}") == normalize("\\tfrac{1}{2}") == "\\frac{1}{2}"
    assert normalize("90^\\circ") == normalize("90^{\\circ}") == normalize("90°") == "90"
    assert normalize("1,234,567") == "1234567"
    assert normalize("(1,234)") == "(1234)"  # ambiguous; read as a number, like math-verify
    assert normalize("1,23") == "1,23"
    assert normalize("\\$5") == "5"
    assert normalize("X") == "X"  # case is kept


def test_grading_is_deterministic():
    pairs = [("\\sqrt{117}", "3\\sqrt{13}"), ("(4, 2)", "(2,4)"), ("x = 5", "5")]
    cached = [grade(a, b) for a, b in pairs]
    uncached = [grader._grade_short.__wrapped__(a, b, False) for a, b in pairs]  # recomputed
    assert cached == uncached == [grade(a, b) for a, b in pairs] == [True, False, True]


def test_fast_path_never_contradicts_math_verify(shared_data):
    """Wherever the fast path decides, math-verify agrees, except where math-verify fails to
    read an ``x = ...`` assignment that the fast path unwraps as math-verify intends to."""
    golds = [json.loads(line)["answer"] for line in open(shared_data / "math500" / "test.jsonl")]
    numbers = ["5", "5.0", "5.000001", "05", "-5", "1,000", "1000", "0.5", ".5", "\\frac12",
               "2/4", "\\frac{2}{4}", "0.333333", "\\frac13", "1/3", "0.25", "x=5", "\\$18.90",
               "18.9", "0", "120^\\circ", "120", "10\\%", "0.1"]  # fmt: skip
    pairs = [(a, b) for a in numbers for b in numbers]
    pairs += [(g, g.replace(" ", "")) for g in golds] + [(f"x = {g}", g) for g in golds]
    pairs += [(golds[(i + 1) % len(golds)], g) for i, g in enumerate(golds)]
    decided = 0
    for given, gold in pairs:
        fast = grader._fast_path(normalize(given), normalize(gold))
        if fast is None:
            continue
        decided += 1
        gold_parsed, given_parsed = grader._parse(gold), grader._parse(given)
        mv = bool(gold_parsed and given_parsed and grader._verify(gold_parsed, given_parsed))
        assert fast == mv or (fast and given.startswith("x =")), (given, gold, fast, mv)
    assert decided > 1000


# --- time limits ----------------------------------------------------------------------------

SLOW = "10^{10^{10^{10}}}"  # sympy tries to evaluate it: interruptible, but endless


def test_timeout_in_the_main_thread_scores_false_and_says_so():
    start = time.monotonic()
    assert grade_with_status(SLOW, "5", timeout=0.3) == (False, True)
    assert grade(SLOW, "5", timeout=0.3) is False
    assert time.monotonic() - start < 4.0  # unbounded without the limit; slack for load
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left armed
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_time_limit_survives_a_swallowed_timeout():
    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    start = time.monotonic()
    with pytest.raises(GradingTimeout):
        with grader.time_limit(0.1):
            try:
                spin(5)
            except BaseException:  # a library that swallows everything
                pass
            spin(5)
    assert time.monotonic() - start < 3.0  # 5 s if the swallowed timeout never re-fired
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_time_limit_keeps_an_outer_alarm():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with grader.time_limit(1.0):
            pass
        time.sleep(0.5)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_grading_off_the_main_thread_is_bounded_and_correct():
    """Off the main thread signals cannot interrupt: the call goes to a worker process."""
    out = {}

    def work():
        out["slow"] = grade_with_status(SLOW, "5", timeout=0.5)
        out["right"] = grade_with_status("\\sqrt{117}", "3\\sqrt{13}", timeout=3)
        out["wrong"] = grade_with_status("\\sqrt{116}", "3\\sqrt{13}", timeout=3)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)  # includes starting the shared pool
    assert not thread.is_alive()
    assert out == {"slow": (False, True), "right": (True, False), "wrong": (False, False)}


def test_time_limit_refuses_other_threads():
    errors = []

    def work():
        try:
            with grader.time_limit(1.0):
                pass
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(errors) == 1
