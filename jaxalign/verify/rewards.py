"""Reward functions, and the reward spec a config names: built-ins, your own, weighted sums.

Built-ins: ``(response, ground_truth) -> {"format_reward", "answer_reward", "reward"}``.
The same functions give training rewards (GRPO, Expert Iteration and SFT data filtering)
and evaluation scores, so the two always agree. All values are floats.

- ``reward`` equals ``answer_reward`` by default: a reward for format alone is easy to farm
  (a policy learns the tags before the mathematics and then stops improving), so a format
  bonus is opt-in via ``format_bonus``.
- ``answer_reward`` is 1 only when the format is right, so a correct number in a broken
  response earns nothing.
- A grading call that exceeds its time limit scores 0 and the result carries
  ``"timed_out": True`` (the key is absent otherwise), so callers can count timeouts.

Reward functions passed to ``jaxalign.verify.pool`` must accept ``timeout`` as a keyword
and be importable by name (defined at module level), as these are.

The reward spec (``config.data.reward``, ``eval/evaluate.py --reward``) is a string,
resolved once per run by ``resolve_reward`` into a ``Reward``, the callable the loops and
the verifier workers run::

    spec := [+|-] term ((+|-) term)*        whitespace anywhere between tokens
    term := [weight *] ref                  weight: a number (1e-3, 0.1, 2); default 1
    ref  := NAME                            a registered reward: r1_zero | question_only
          | package.module:function         any importable callable (attribute may be dotted)

    "r1_zero"
    "my_rewards:length_penalty"
    "r1_zero + 0.1*my_rewards:length_penalty"
    "r1_zero - 0.001 * pkg.mod:fn"          (a minus sign negates the term's weight)

A user function is called as ``fn(response: str, ground_truth, *, timeout: float)`` and
returns a float, or a dict with ``"reward"`` and optionally ``"format_reward"``,
``"answer_reward"`` and ``"timed_out"`` (other keys are ignored). Its module is imported
in every verifier worker (a fresh interpreter with the parent's ``sys.path``), so keep it
light and on ``PYTHONPATH`` (or in the folder the run starts from).

What a ``Reward`` returns for a response:

- ``reward = sum(weight_i * reward_i)`` over the terms;
- ``format_reward`` and ``answer_reward``: those of the first term whose dict has them
  (unweighted). When no term gives one: ``format_reward`` is 1 (no format rule, so every
  response counts as formatted) and ``answer_reward`` is 1 if ``reward > 0`` else 0 (so
  accuracy, pass@k and Expert Iteration's ``keep='answer'`` mean "positive reward");
- ``reward/<term>``: each term's own, unweighted reward, for logging (only when the spec
  has more than one term, a user function, or a weight other than 1; a plain registered
  name returns exactly the built-in's dict). ``<term>`` is the registered name or the
  function's attribute name (the full ``module:function`` if two terms share one);
- ``timed_out: True`` when any term ran past the time limit.

Time limits: the terms share one ``timeout``; each gets what is left of it. In the main
thread (always, inside a verifier worker) a user term runs under the grader's soft limit
(``grader.time_limit``): one that overruns it scores 0 and sets ``timed_out``, like a
built-in whose grading overruns. Past ``timeout + grace`` the worker is killed and the
whole response scores 0 with ``timed_out`` (``jaxalign.verify.pool``). Off the main
thread with ``num_workers=0`` a user term runs unbounded: score in workers.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping

from jaxalign.verify.extract import answer_from_r1_zero, answer_from_s1, extract_boxed
from jaxalign.verify.grader import DEFAULT_TIMEOUT, GradingTimeout, grade_with_status, time_limit

GroundTruth = str | float | int | list


def make_result(
    format_ok: bool, correct: bool, *, format_bonus: float = 0.0, timed_out: bool = False
) -> dict:
    """The reward dict for a response with the given format and answer verdicts."""
    answer = 1.0 if (format_ok and correct) else 0.0
    result = {
        "format_reward": 1.0 if format_ok else 0.0,
        "answer_reward": answer,
        "reward": answer + (float(format_bonus) if format_ok else 0.0),
    }
    if timed_out:
        result["timed_out"] = True
    return result


def _score(answer, ground_truth, format_bonus, strict_form, timeout) -> dict:
    if answer is None:
        return make_result(False, False, format_bonus=format_bonus)
    correct, timed_out = grade_with_status(
        answer, ground_truth, strict_form=strict_form, timeout=timeout
    )
    return make_result(True, correct, format_bonus=format_bonus, timed_out=timed_out)


def r1_zero_reward_fn(
    response: str,
    ground_truth: GroundTruth,
    *,
    format_bonus: float = 0.0,
    strict_form: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict:
    """Reward of a continuation of the r1_zero prompt (which already ends with ``<think>``).

    format_reward is 1 iff the response is ``reasoning </think> <answer> ... </answer>``
    with exactly one ``</think>``, no ``<think>``, exactly one answer block and nothing but
    whitespace or end-of-text tokens after it (``extract.parse_r1_zero``). answer_reward is
    1 iff the format is right and the answer (the ``<answer>`` content, or the last
    ``\\boxed{}`` inside it) equals ``ground_truth`` (``grade``).

    Args:
        response: the model's continuation.
        ground_truth: the gold answer; a list means "correct if any matches".
        format_bonus: added to ``reward`` when the format is right (default 0: off).
        strict_form: reject unreduced integer fractions (see ``grade``).
        timeout: seconds for grading (see ``grade``).

    Returns:
        ``{"format_reward", "answer_reward", "reward"}`` floats, plus ``"timed_out": True``
        when grading hit the time limit.
    """
    return _score(answer_from_r1_zero(response), ground_truth, format_bonus, strict_form, timeout)


def question_only_reward_fn(
    response: str,
    ground_truth: GroundTruth,
    *,
    format_bonus: float = 0.0,
    strict_form: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict:
    """Reward for the question-only prompt: the answer is the last ``\\boxed{...}``.

    format_reward is 1 when a non-empty boxed answer can be extracted; the rest is as in
    ``r1_zero_reward_fn``.
    """
    boxed = extract_boxed(response)
    answer = boxed.strip() if boxed is not None and boxed.strip() else None
    return _score(answer, ground_truth, format_bonus, strict_form, timeout)


def s1_reward_fn(
    response: str,
    ground_truth: GroundTruth,
    *,
    format_bonus: float = 0.0,
    strict_form: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> dict:
    """Reward for s1's chat format (``--prompt s1``, the s1 SFT recipe): the answer is read
    from the section after ``<|im_start|>answer`` (``answer_from_s1``: its last ``\boxed{}``,
    else the text after ``Answer:``). format_reward is 1 when such an answer is found."""
    return _score(answer_from_s1(response), ground_truth, format_bonus, strict_form, timeout)


# --- the reward spec: a config's string, resolved once into a callable ---------------------

# The rewards a config may name by themselves (a config must name a choice: one small dict,
# next to the choices). Anything else is a ``module:function``.
REWARDS: dict[str, Callable[..., dict]] = {
    "r1_zero": r1_zero_reward_fn,
    "question_only": question_only_reward_fn,
    "s1": s1_reward_fn,
}


class RewardSpecError(ValueError):
    """A reward spec that cannot be resolved; the one-line message says what to change."""


_IDENT = r"[A-Za-z_]\w*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<ref>{_DOTTED}(?::{_DOTTED})?)\s*"
)
_SIGNATURE = "fn(response, ground_truth, *, timeout) -> float | dict"


def _choices() -> str:
    return (f"name a registered reward ({', '.join(sorted(REWARDS))}) or an importable "
            "function as package.module:function (e.g. my_rewards:length_penalty), or a "
            "weighted sum such as 'r1_zero + 0.1*my_rewards:length_penalty'")


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """The ``(weight, ref)`` terms of a reward spec, in order; imports nothing.

    Args:
        spec: e.g. ``"r1_zero - 0.001*pkg.mod:fn"`` (grammar in the module docstring).

    Returns:
        ``[(1.0, "r1_zero"), (-0.001, "pkg.mod:fn")]``.

    Raises:
        RewardSpecError: an empty or unreadable spec, a weight that is not finite, or a
            reference named twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"the reward spec is empty: {_choices()}")
    terms: list[tuple[float, str]] = []
    pos = 0
    while pos < len(spec):
        m = _TERM.match(spec, pos)
        if m is None or (terms and not m["sign"]):
            raise RewardSpecError(
                f"cannot read reward spec {spec!r} at {spec[pos:].strip()!r}: write terms like "
                "r1_zero, 0.1*my_rewards:length_penalty or 0.001*pkg.module:fn, joined by + or -")
        weight = float(m["weight"] or 1.0) * (-1.0 if m["sign"] == "-" else 1.0)
        if not math.isfinite(weight):
            raise RewardSpecError(f"reward spec {spec!r}: the weight of {m['ref']!r} is not a "
                                  "finite number")
        if any(ref == m["ref"] for _, ref in terms):
            raise RewardSpecError(f"reward spec {spec!r} names {m['ref']!r} twice: give it one "
                                  "term with the summed weight")
        terms.append((weight, m["ref"]))
        pos = m.end()
    return terms


def _load(ref: str) -> Callable:
    """The callable ``ref`` names: a registered reward or ``module:attribute``."""
    if ":" not in ref:
        if ref in REWARDS:
            return REWARDS[ref]
        raise RewardSpecError(f"unknown reward {ref!r}: {_choices()}")
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- ImportError, or whatever the module raised
        raise RewardSpecError(
            f"reward {ref!r}: cannot import module {module_name!r} ({_one_line(e)}); the module "
            "must be importable: put the folder that holds it on PYTHONPATH (or start the run "
            "from that folder)") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v)
                             and not n.startswith("_") and getattr(v, "__module__", None)
                             == module.__name__)
            raise RewardSpecError(
                f"reward {ref!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attr!r}; the functions it defines: "
                f"{', '.join(defined[:12]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(f"reward {ref!r} is a {type(obj).__name__}, not a function: a "
                              f"reward is {_SIGNATURE}")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        signature = None
    if signature is not None:
        try:
            signature.bind("response", "ground truth", timeout=1.0)
        except TypeError as e:
            raise RewardSpecError(
                f"reward {ref!r} cannot be called as {_SIGNATURE} ({e}): give it that "
                "signature (it may ignore timeout)") from None
    return obj


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One term of a ``Reward``: ``weight * fn(response, ground_truth, timeout=...)``.

    Attributes:
        name: the key its value is logged under (``reward/<name>``).
        ref: the spec's reference: a registered name or ``module:function``.
        weight: its weight in the sum.
        fn: the callable.
        builtin: whether ``ref`` is a registered reward (``REWARDS``).
    """

    name: str
    ref: str
    weight: float
    fn: Callable = dataclasses.field(repr=False)
    builtin: bool


@dataclasses.dataclass(frozen=True)
class Reward:
    """A resolved reward spec: ``reward(response, ground_truth, *, timeout) -> dict``.

    Made by ``resolve_reward``; what it returns is defined in the module docstring. It
    pickles as its spec (unpickling resolves it again), so any importable function works in
    the verifier workers, and a worker imports exactly what the spec names.

    Attributes:
        spec: the spec, written canonically (``"r1_zero + 0.1*my_rewards:length_penalty"``).
        terms: its terms, in spec order.
    """

    spec: str
    terms: tuple[RewardTerm, ...]
    # Where the user modules were imported from (the sys.path roots), so a worker started
    # before the parent put them on its path, or started elsewhere, imports them too.
    paths: tuple[str, ...] = ()

    def __reduce__(self):
        return _rebuild, (self.spec, self.paths)

    def __repr__(self) -> str:
        return f"Reward({self.spec!r})"

    @property
    def plain(self) -> bool:
        """A registered reward alone, weight 1: calls give exactly the built-in's dict."""
        (first, *rest) = self.terms
        return not rest and first.builtin and first.weight == 1.0

    @property
    def components(self) -> tuple[str, ...]:
        """The ``reward/<term>`` keys results carry (none for a ``plain`` reward)."""
        return () if self.plain else tuple(f"reward/{t.name}" for t in self.terms)

    @property
    def base(self) -> str | None:
        """The first registered reward in the spec (its answer format), else None."""
        return next((t.ref for t in self.terms if t.builtin), None)

    def __call__(self, response: str, ground_truth: GroundTruth, *,
                 timeout: float | None = DEFAULT_TIMEOUT) -> dict:
        if self.plain:
            return self.terms[0].fn(response, ground_truth, timeout=timeout)
        deadline = time.monotonic() + timeout if timeout else None
        total, parts = 0.0, {}
        format_reward = answer_reward = None
        timed_out = False
        for term in self.terms:
            left = None if deadline is None else deadline - time.monotonic()
            out = _run_term(term, response, ground_truth, left)
            total += term.weight * out["reward"]
            parts[f"reward/{term.name}"] = out["reward"]
            if format_reward is None:
                format_reward = out.get("format_reward")
            if answer_reward is None:
                answer_reward = out.get("answer_reward")
            timed_out = timed_out or bool(out.get("timed_out"))
        result = {
            "format_reward": 1.0 if format_reward is None else format_reward,
            "answer_reward": float(total > 0) if answer_reward is None else answer_reward,
            "reward": total,
            **parts,
        }
        if timed_out:
            result["timed_out"] = True
        return result


def _run_term(term: RewardTerm, response: str, ground_truth, seconds: float | None) -> dict:
    """One term's result as ``{"reward", ["format_reward", "answer_reward", "timed_out"]}``."""
    if seconds is not None and seconds <= 0:  # the terms before it used the whole limit
        return {"reward": 0.0, "timed_out": True}
    if term.builtin or seconds is None or threading.current_thread() is not threading.main_thread():
        out = term.fn(response, ground_truth, timeout=seconds)  # built-ins bound themselves
    else:
        try:
            with time_limit(seconds):
                out = term.fn(response, ground_truth, timeout=seconds)
        except GradingTimeout:
            return {"reward": 0.0, "timed_out": True}
    if not isinstance(out, Mapping):
        return {"reward": _number(term, "reward", out)}
    if "reward" not in out:
        raise TypeError(f"reward {term.ref!r} returned a dict without 'reward' (keys: "
                        f"{sorted(out)}): return a float or a dict with 'reward'")
    result = {k: _number(term, k, out[k]) for k in ("reward", "format_reward", "answer_reward")
              if k in out}
    if out.get("timed_out"):
        result["timed_out"] = True
    return result


def _number(term: RewardTerm, key: str, value) -> float:
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward {term.ref!r} gave {key}={value!r:.60}; a reward returns a "
                        "float or a dict of floats with 'reward'") from None
    if not math.isfinite(number):  # a NaN would turn every advantage of its group to NaN
        raise TypeError(f"reward {term.ref!r} gave {key}={number}; a reward must be a finite "
                        "number")
    return number


def resolve_reward(spec: str | Reward) -> Reward:
    """The ``Reward`` a spec names, every function imported and checked; call once per run.

    Args:
        spec: a reward spec (module docstring), or an already resolved ``Reward``.

    Returns:
        A picklable ``Reward`` (``reward(response, ground_truth, *, timeout) -> dict``).

    Raises:
        RewardSpecError: (a ``ValueError``) an unreadable spec, an unknown name, a module
            that cannot be imported, an attribute that is missing or not callable with
            ``(response, ground_truth, *, timeout)``; one line saying what to change.
    """
    if isinstance(spec, Reward):
        return spec
    parsed = parse_reward_spec(spec)
    short = [ref.partition(":")[2] or ref for _, ref in parsed]
    terms = tuple(
        RewardTerm(name=name if short.count(name) == 1 else ref, ref=ref, weight=weight,
                   fn=_load(ref), builtin=":" not in ref)
        for (weight, ref), name in zip(parsed, short, strict=True))
    return Reward(_canonical(parsed), terms, _import_roots(ref for _, ref in parsed))


def _import_roots(refs) -> tuple[str, ...]:
    """The directories the user modules of ``refs`` were imported from: for ``a.b:fn``
    loaded from ``/x/a/b.py``, ``/x`` (what ``sys.path`` needed to hold)."""
    roots = []
    for ref in refs:
        module_name = ref.partition(":")[0] if ":" in ref else None
        module = sys.modules.get(module_name) if module_name else None
        path = getattr(module, "__file__", None)
        if not path:
            continue
        root = os.path.dirname(os.path.abspath(path))
        for _ in range(module_name.count(".") + (os.path.basename(path) == "__init__.py")):
            root = os.path.dirname(root)
        if root not in roots:
            roots.append(root)
    return tuple(roots)


def _rebuild(spec: str, paths: tuple[str, ...]) -> Reward:
    """Unpickling a ``Reward`` (in a verifier worker): its import roots on ``sys.path``,
    then ``resolve_reward`` again."""
    sys.path[:0] = [p for p in paths if p not in sys.path]
    return resolve_reward(spec)


def _canonical(parsed: list[tuple[float, str]]) -> str:
    out = ""
    for i, (weight, ref) in enumerate(parsed):
        sign = ("-" if i == 0 else " - ") if weight < 0 else ("" if i == 0 else " + ")
        w = abs(weight)
        out += sign + (ref if w == 1.0 else f"{w!r}*{ref}")
    return out
