"""Reward functions: ``(response, ground_truth) -> {"format_reward", "answer_reward", "reward"}``.

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
"""

from __future__ import annotations

from jaxalign.verify.extract import answer_from_r1_zero, extract_boxed
from jaxalign.verify.grader import DEFAULT_TIMEOUT, grade_with_status

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
