"""A synthetic verifiable task, generated in code: multi-step arithmetic word problems.

The embedded demo (``configs/grpo.py`` with no flags) needs a task a few-million-parameter
model can learn on a laptop CPU in minutes, with integer answers the shared verifier
checks exactly, and no download. Each problem is a short story of 2-3 operations on small
numbers::

    Question: Mia has 7 shells. She finds 5 more. Then she loses 3. How many shells does
              Mia have now?
    Steps:    7 + 5 = 12. 12 - 3 = 9.
    Answer:   9

``arithmetic_problems(n, seed)`` returns ``MathExample`` rows (``solution`` holds the
steps), deterministic in ``seed``; disjoint seeds give the train and held-out splits, and
``split_problems`` removes from training any question that also occurs held out.

``sft_trace`` turns a problem into an r1_zero SFT pair (steps inside ``<think>``, the
number inside ``<answer>``). With ``slip_rate > 0`` a fraction of traces carry a slip: the
steps are right but the number written in ``<answer>`` is off by 1-3, the kind of
transcription error human- or model-written SFT data has. A model that imitates such
traces makes the same slips when it samples; only the verifier's reward tells it which
answers were wrong, which is what RL after SFT is for.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from jaxalign.data.datasets import MathExample
from jaxalign.data.prompts import format_prompt

# The demo's prompt: r1_zero's format (the answer in <answer> tags after </think>) with a
# short preamble, because the demo's byte-level tokenizer spends one token per character.
DEMO_TEMPLATE = "Q: {question}\nA: <think>"


def _problem(rng: random.Random, max_steps: int, max_value: int,
             max_operand: int) -> tuple[str, list[str], int]:
    value = rng.randint(1, 9)
    terms, steps = [str(value)], []
    for _ in range(rng.randint(2, max_steps)):
        ops = (["+"] if value < max_value else []) + (["-"] if value >= 1 else [])
        op = rng.choice(ops)
        k = rng.randint(1, min(max_operand, max_value - value)) if op == "+" else rng.randint(
            1, min(max_operand, value))
        new = value + k if op == "+" else value - k
        steps.append(f"{value} {op} {k} = {new}.")
        terms.append(f"{op} {k}")
        value = new
    return " ".join(terms), steps, value


def arithmetic_problems(
    n: int, seed: int, *, max_steps: int = 3, max_value: int = 20, max_operand: int = 9,
    source: str = "synthetic"
) -> list[MathExample]:
    """``n`` problems, deterministic in ``seed``.

    Args:
        n: number of problems.
        seed: the generator's seed.
        max_steps: operations per problem (2 to ``max_steps``).
        max_value: bound on every intermediate value (all values stay in [0, max_value]).
        max_operand: the largest number added or subtracted in a step (1-9).
        source: prefix of each example's ``source`` tag.

    Returns:
        ``MathExample`` rows: ``question``, ``answer`` (the integer as a string) and
        ``solution`` (the steps, e.g. ``"7 + 5 = 12. 12 - 3 = 9."``).
    """
    if n < 0 or max_steps < 2 or max_value < 9 or not 1 <= max_operand <= 9:
        raise ValueError(f"need n >= 0, max_steps >= 2, max_value >= 9, 1 <= max_operand <= 9;"
                         f" got {n}, {max_steps}, {max_value}, {max_operand}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question, steps, answer = _problem(rng, max_steps, max_value, max_operand)
        out.append(MathExample(question=question, answer=str(answer), solution=" ".join(steps),
                               source=f"{source}:{seed}:{i}"))
    return out


def split_problems(
    n_train: int, n_eval: int, seed: int, **kwargs
) -> tuple[list[MathExample], list[MathExample]]:
    """Train and held-out problems; no held-out question occurs in the train split."""
    held_out = arithmetic_problems(n_eval, seed=2 * seed + 1, source="synthetic-eval", **kwargs)
    seen = {e.question for e in held_out}
    train = [e for e in arithmetic_problems(n_train, seed=2 * seed, source="synthetic-train",
                                            **kwargs) if e.question not in seen]
    return train, held_out


def sft_trace(example: MathExample, template: str = DEMO_TEMPLATE, *, slip: int = 0) -> tuple[
        str, str]:
    """``(prompt, response)``: the steps think, the number answers (r1_zero format).

    ``slip`` (0 for none) is added to the number in ``<answer>`` only; the steps stay right.
    """
    answer = int(example.answer) + slip
    prompt = format_prompt(template, example.question)
    opening = "" if prompt.endswith("<think>") else "<think>"
    return prompt, f"{opening} {example.solution} </think> <answer> {answer} </answer>"


def sft_traces(
    examples: Sequence[MathExample], template: str = DEMO_TEMPLATE, *, slip_rate: float = 0.0,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """SFT pairs for ``examples``; a ``slip_rate`` fraction carry a slip of +-1..3."""
    if not 0 <= slip_rate < 1:
        raise ValueError(f"slip_rate={slip_rate} must be in [0, 1)")
    rng = random.Random(seed)
    pairs = []
    for e in examples:
        slip = 0
        if rng.random() < slip_rate:
            slip = rng.choice([-3, -2, -1, 1, 2, 3])
            if int(e.answer) + slip < 0:
                slip = -slip
        pairs.append(sft_trace(e, template, slip=slip))
    return pairs
