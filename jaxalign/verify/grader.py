"""Mathematical equivalence of an answer and a ground truth, under a hard time limit.

``grade(given, gold)`` tries, in order:

1. A fast path with no parsing: equal after light normalisation (spaces, ``\\left``,
   ``\\dfrac``, ``^\\circ``, ``\\text{}``, thousands separators, ...), or both sides exact
   rationals (integers, decimals, ``\\frac{p}{q}``, ``p/q``) compared exactly. Most GSM8K
   answers and most correct MATH answers end here in microseconds.
2. math-verify: gold and prediction parsed separately (``verify(gold, pred)`` is
   asymmetric: an assignment ``x = 5`` in the prediction is unwrapped, a gold ``y = 2x + 3``
   is kept), then compared as numbers, symbolically, as sets, intervals, matrices, equations.
3. A case-insensitive comparison of purely textual answers (``\\text{Evelyn}`` vs ``evelyn``).

Why our own time limit: math-verify's timeouts use ``signal.alarm``, which only works in the
main thread (elsewhere it raises, and with ``raise_on_error=False`` a reward can silently
become 0 in a thread or pool worker), and takes whole seconds. So math-verify runs with its
timeouts off and we bound the whole call ourselves:

- in the main thread, with ``setitimer`` raising ``GradingTimeout``, a ``BaseException``
  so that the many ``except Exception`` blocks in math-verify and sympy cannot swallow it;
- in any other thread, the call is sent to a worker process (``jaxalign.verify.pool``),
  which grades in its own main thread and is killed if it overruns anyway (C code that
  never returns to the interpreter cannot be interrupted by a signal handler).

No model text is ever ``eval``-ed: expressions are read by math-verify's LaTeX parser
(latex2sympy) and by sympy's ``parse_expr`` only on strings math-verify's own regexes
restrict to digits and operators.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction

DEFAULT_TIMEOUT = 3.0  # seconds per grading call (all ground truths of a list together)
# Answers longer than this are not parsed: no real answer is this long, and parsing cost
# grows with length. They can still match by normalised string.
MAX_PARSE_CHARS = 1000


class GradingTimeout(BaseException):  # noqa: N818 -- "Timeout" reads better than "Error"
    """A grading call exceeded its time limit. Rewards score it 0 and set ``timed_out``.

    A ``BaseException`` on purpose: math-verify and sympy catch ``Exception`` in many places,
    which would swallow a timeout and let the computation run on unbounded.
    """


class time_limit:  # noqa: N801 -- used like a function: ``with time_limit(3.0): ...``
    """Raises ``GradingTimeout`` in the block after ``seconds`` (main thread only).

    The timer then re-fires every ``_REFIRE`` seconds until the block exits, so a timeout
    that some library swallows (an ``except BaseException``, a ``__del__``) is raised again.
    Leaving the block disarms it first, retrying if a last signal lands while doing so, and
    restores the previous SIGALRM handler and a previous timer's remaining time.

    Args:
        seconds: the limit; None or <= 0 means no limit.
    """

    _REFIRE = 0.05

    def __init__(self, seconds: float | None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self._armed = False

    def _on_alarm(self, signum, frame):
        if self._armed:
            raise GradingTimeout(f"grading exceeded {self.seconds:g}s")

    def __enter__(self) -> time_limit:
        if self.seconds is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("time_limit needs the main thread; use jaxalign.verify.pool")
        self._start = time.monotonic()
        self._previous_handler = signal.signal(signal.SIGALRM, self._on_alarm)
        self._armed = True
        self._previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, self.seconds, self._REFIRE)
        return self

    def __exit__(self, *exc) -> None:
        if self.seconds is None:
            return
        while True:
            try:
                self._armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                # None: a handler installed outside Python, which cannot be restored.
                signal.signal(signal.SIGALRM, self._previous_handler or signal.SIG_DFL)
                break
            except GradingTimeout:  # fired before _armed was cleared: the block is done
                continue
        if self._previous_timer > 0:
            remaining = self._previous_timer - (time.monotonic() - self._start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))


# --- normalisation and the fast path ------------------------------------------------------

_TEXT_CMD = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\s+|\\[,;:! ]|\\q?quad\b")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\circ|°|\\degree")
_FRAC_CMD = re.compile(r"\\[dt]frac")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_BRACE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape (\\{) or a brace
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")


def normalize(answer: str) -> str:
    """A light canonical form of an answer for string comparison (not a parser).

    Removes ``$`` delimiters, spacing commands and whitespace, ``\\left``/``\\right``,
    ``\\text{...}`` wrappers (keeping the text), degree marks, a leading ``\\$``, a trailing
    period, braces around the whole answer, and thousands separators in numbers;
    ``\\dfrac``/``\\tfrac`` become ``\\frac``.
    Case is kept: ``x`` and ``X`` are different variables.
    """
    s = str(answer).strip().strip("$").strip()
    s = _TEXT_CMD.sub(r"\1", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC_CMD.sub(r"\\frac", s).replace("\\displaystyle", "")
    s = _DEGREES.sub("", s)
    s = _SPACING.sub("", s)
    s = s.replace("\\%", "%").removeprefix("\\$").removeprefix("$").rstrip(".")
    s = _strip_outer_braces(s)
    return _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)


def _strip_outer_braces(s: str) -> str:
    """``{{5}}`` -> ``5``: a group around the whole answer means nothing (linear time)."""
    if not (s.startswith("{") and s.endswith("}")):
        return s
    opened, closes_at = [], {}  # position of each "{" -> position of its "}"
    for m in _BRACE.finditer(s):
        if m.group() == "{":
            opened.append(m.start())
        elif m.group() == "}" and opened:
            closes_at[opened.pop()] = m.start()
    start, end = 0, len(s) - 1
    while start < end and closes_at.get(start) == end:
        start, end = start + 1, end - 1
    return s[start : end + 1]


# An exact rational in normalised form: "-12", "3.50", ".5", "\frac{3}{4}", "\frac34",
# "-\frac{3}{4}", "3/4". No exponents: Fraction("1e999999999") would build a huge integer.
_INT = r"\d{1,50}"
_DECIMAL = re.compile(r"([-+]?)(\d{0,50}\.\d{1,50}|\d{1,50})")
_FRACTION = re.compile(
    rf"([-+]?)(?:\\frac(?:\{{({_INT})\}}|(\d))(?:\{{({_INT})\}}|(\d))|({_INT})/({_INT}))"
)
# "x=" or "a_1=" at the start of an answer, a single assignment (no further "=").
_ASSIGNMENT = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?=(?=[^=<>]*$)")


def _exact_rational(s: str) -> tuple[Fraction, bool] | None:
    """(value, written with a decimal point) if normalised ``s`` is a plain rational."""
    if m := _DECIMAL.fullmatch(s):
        value = Fraction(m.group(2))
        return (-value if m.group(1) == "-" else value), "." in m.group(2)
    if m := _FRACTION.fullmatch(s):
        sign, num1, num2, den1, den2, num3, den3 = m.groups()
        num, den = int(num1 or num2 or num3), int(den1 or den2 or den3)
        if den == 0:
            return None
        value = Fraction(num, den)
        return (-value if sign == "-" else value), False
    return None


def _short(value: Fraction) -> bool:
    """At most 6 decimal places and 14 significant digits: exact in math-verify's floats."""
    return (value * 10**6).denominator == 1 and abs(value) < 10**8


def _fast_path(given_norm: str, gold_norm: str) -> bool | None:
    """True/False when decidable without parsing, else None (ask math-verify).

    Mirrors math-verify's verdicts: an assignment ``x=5`` is compared by its right-hand side
    (unless both sides are equations), exact rationals by value. Unequal rationals are
    wrong, except where math-verify rounds decimals to 6 places (``1/3`` vs ``0.333333``)
    and could call them equal: those go to math-verify.
    """
    if given_norm == gold_norm:
        return bool(given_norm)
    if "=" not in gold_norm and (m := _ASSIGNMENT.match(given_norm)):
        given_norm = given_norm[m.end() :]
    elif "=" not in given_norm and (m := _ASSIGNMENT.match(gold_norm)):
        gold_norm = gold_norm[m.end() :]
    if given_norm == gold_norm:
        return bool(given_norm)
    x, y = _exact_rational(given_norm), _exact_rational(gold_norm)
    if x is None or y is None:
        return None
    if x[0] == y[0]:
        return True
    if not (x[1] or y[1]) or (_short(x[0]) and _short(y[0])):
        return False
    return None


_FRACTION_ANYWHERE = re.compile(r"\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?|(?<![\d.])(\d+)/(\d+)(?![\d.])")


def has_unreduced_fraction(answer: str) -> bool:
    """Whether ``answer`` writes an integer fraction not in lowest terms (``\\frac{6}{4}``)."""
    for a, b, c, d in _FRACTION_ANYWHERE.findall(_FRAC_CMD.sub(r"\\frac", answer)):
        num, den = int(a or c), int(b or d)
        if den != 0 and math.gcd(num, den) > 1:
            return True
    return False


_WORDS = re.compile(r"[A-Za-z][A-Za-z ()'-]*")


def _textual_match(given_norm: str, gold_norm: str) -> bool:
    """Case-insensitive equality of answers that are words, not mathematics."""
    g = given_norm.strip("()")
    t = gold_norm.strip("()")
    return bool(_WORDS.fullmatch(t) and _WORDS.fullmatch(g)) and g.casefold() == t.casefold()


# --- math-verify --------------------------------------------------------------------------


@functools.cache
def _math_verify():
    """Imports math-verify once, outside any time limit (the import takes about a second)."""
    import math_verify

    # math-verify warns once that its timeouts are off (we enforce ours) and logs every
    # unparsable prediction: both are noise here.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def _latex_wrapped(text: str) -> str:
    # math-verify finds mathematics by its delimiters; inline $...$ may not span lines.
    return "$" + text.strip().strip("$").replace("\n", " ") + "$"


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> tuple:
    """math-verify's parse of one answer (gold or prediction), cached.

    Cached because a ground truth is graded against many samples (a GRPO group, an eval
    with several samples per problem), and policies repeat answers.
    """
    mv = _math_verify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = mv.parse(_latex_wrapped(text), parsing_timeout=None, raise_on_error=False)
    return tuple(_imaginary_unit(p) for p in parsed)


def _imaginary_unit(parsed):
    """Reads a free symbol ``i`` as the imaginary unit.

    math-verify decides per string whether ``i`` is imaginary (``\\bi\\b``), so ``6+9i``
    gets a symbol ``i`` but ``9 i + 6`` gets ``I`` and the two compare unequal. In a final
    answer ``i`` is the imaginary unit; reading it so on both sides makes them agree.
    """
    sympy = sys.modules["sympy"]
    try:
        if isinstance(parsed, sympy.Basic | sympy.MatrixBase):
            # latex2sympy gives the symbol real=True or real=False assumptions: match by name.
            units = {s: sympy.I for s in parsed.free_symbols if getattr(s, "name", None) == "i"}
            if units:
                return parsed.xreplace(units)
    except Exception:  # an exotic object: leave it as math-verify made it
        pass
    return parsed


def _verify(gold_parsed: tuple, given_parsed: tuple) -> bool:
    mv = _math_verify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(
            mv.verify(
                list(gold_parsed), list(given_parsed), timeout_seconds=None, raise_on_error=False
            )
        )


# --- grading ------------------------------------------------------------------------------


# Pairs that walk math-verify and sympy through every kind of answer once. sympy imports and
# initialises a lot lazily (simplify, sets, matrices, relations): about a second per process
# that would otherwise land on the first batch of real answers.
_WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("(1,2)", "\\left( 1, 2 \\right)"),
    ("[1,2)", "(1,2]"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}"),
    ("\\{1,2\\}", "\\{2,3\\}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("y=2x+1", "2x+1"),
    ("10\\%", "0.1"),
    ("\\text{east}", "\\text{West}"),
    ("1+2i", "2+i"),
    ("\\frac{\\pi}{2}", "90^\\circ"),
    ("x\\in[1,2]", "[1,2]"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty,3)"),
    ("3", "x+1"),
    ("\\cos x", "\\sin x"),
    ("1,-2", "-2,1"),
    ("5r^5", "5r^4"),
)


def warm_up() -> None:
    """Imports math-verify and exercises each kind of comparison once (about a second).

    Pool workers call this when they start; call it yourself before timing anything.
    """
    _math_verify()
    for a, b in _WARM_UP:
        with contextlib.suppress(Exception):
            _grade_short.__wrapped__(a, b, False)
            _grade_short.__wrapped__(b, a, False)


def gold_text(ground_truth: str | float | int) -> str:
    """A ground truth as a string: ``27.0`` -> ``"27"`` (AMC23 stores integers as floats)."""
    if isinstance(ground_truth, float) and ground_truth.is_integer():
        return str(int(ground_truth))
    return str(ground_truth).strip()


def _grade_one(given: str, gold: str, strict_form: bool) -> bool:
    """Equivalence of one answer and one ground truth, without a time limit."""
    if not given or not gold:
        return False
    if len(given) > MAX_PARSE_CHARS or len(gold) > MAX_PARSE_CHARS:
        # Not parsed, and not cached (the cache would hold megabytes of junk).
        return (
            not (strict_form and has_unreduced_fraction(given))
            and _fast_path(normalize(given), normalize(gold)) is True
        )
    return _grade_short(given, gold, strict_form)


@functools.lru_cache(maxsize=65536)
def _grade_short(given: str, gold: str, strict_form: bool) -> bool:
    """``_grade_one`` for answers short enough to parse; cached, as grading is pure."""
    if strict_form and has_unreduced_fraction(given):
        return False
    given_norm, gold_norm = normalize(given), normalize(gold)
    decided = _fast_path(given_norm, gold_norm)
    if decided is not None:
        return decided
    gold_parsed, given_parsed = _parse(gold), _parse(given)
    if gold_parsed and given_parsed and _verify(gold_parsed, given_parsed):
        return True
    return _textual_match(given_norm, gold_norm)


def grade_with_status(
    given_answer: str | None,
    ground_truth: str | float | int | list,
    *,
    strict_form: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> tuple[bool, bool]:
    """Like ``grade`` but returns ``(correct, timed_out)``; a timeout gives ``(False, True)``."""
    if given_answer is None:
        return False, False
    golds = ground_truth if isinstance(ground_truth, list | tuple) else [ground_truth]
    given = str(given_answer).strip()
    golds = [gold_text(g) for g in golds if g is not None]
    if not given or not golds:
        return False, False
    if threading.current_thread() is not threading.main_thread() and timeout:
        # Signals cannot interrupt this thread: grade in a worker process we can kill.
        from jaxalign.verify.pool import shared_pool

        return shared_pool().grade_with_status(
            given, golds, strict_form=strict_form, timeout=timeout
        )
    _math_verify()  # the first import is slow: keep it out of the time limit
    try:
        with time_limit(timeout):
            return any(_grade_one(given, g, strict_form) for g in golds), False
    except GradingTimeout:
        return False, True


def grade(
    given_answer: str | None,
    ground_truth: str | float | int | list,
    *,
    strict_form: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> bool:
    """Whether ``given_answer`` is mathematically equal to ``ground_truth``.

    Equal values are correct whatever their surface form: ``\\frac{6}{4}`` for
    ``\\frac{3}{2}``, ``x = 5`` for ``5``, ``\\sqrt{117}`` for ``3\\sqrt{13}``, ``27.0`` or
    ``027`` for ``27``, ``1,000`` for ``1000``, ``0.25`` for ``\\frac14``, ``120^\\circ`` for
    ``120``, ``15 \\text{ cm}^2`` for ``15``, reordered sets, equal intervals and matrices.

    Args:
        given_answer: the extracted answer (None or empty is never correct).
        ground_truth: a string or number, or a list meaning "correct if any matches".
        strict_form: also require integer fractions in lowest terms (``\\frac{6}{4}`` is
            wrong for ``\\frac32``), as the Dr. GRPO reference grader's fast mode does. Off
            by default: the value is what counts.
        timeout: seconds for the whole call (None: unbounded). In the main thread a signal
            interrupts it; in other threads the call runs in a worker process
            (``jaxalign.verify.pool``) that is killed at the deadline.

    Returns:
        True if equivalent. A timeout returns False; ``grade_with_status`` tells it apart.
    """
    correct, _ = grade_with_status(
        given_answer, ground_truth, strict_form=strict_form, timeout=timeout
    )
    return correct
