"""Evaluation: prompts -> rollouts -> verifier -> metrics, one code path for eval and training.

``eval/evaluate.py`` (the benchmark report) and the training loops' held-out validation
(``validate``, below) both call ``rollout_and_score`` and
``reward_metrics``, so a checkpoint's numbers in ``metrics.jsonl`` and in an eval report
agree when the prompts, sampling and examples are the same.

    records = rollout_and_score(engine, examples, template="r1_zero", reward="r1_zero",
                                sampling=SamplingParams(temperature=0, max_tokens=1024,
                                                        stop=("</answer>",),
                                                        include_stop_str_in_output=True),
                                num_workers=8)
    summarize(records)   # accuracy + 95% CI, format rate, outcome counts, pass@k, maj@k, ...

Pieces:

* rewards: ``reward=`` takes a reward spec string (``"r1_zero"``, ``"question_only"``,
  ``"my_rewards:fn"``, ``"r1_zero + 0.1*my_rewards:length_penalty"``; grammar and result
  keys in ``jaxalign.verify.rewards``) or a ``Reward`` already resolved from one
  (``resolve_reward``, once per run: the training loops pass theirs). A composite or user
  reward adds each term's value to the records as ``reward/<term>``, and ``reward_metrics``
  reports their means.
* records: one dict per sample (``index``, ``sample``, ``prompt``, ``response``,
  ``ground_truth``, ``extracted``, rewards, ``length`` in tokens, ``finish_reason``, ...).
  ``score_responses`` builds them from any text (saved generations included);
  ``rollout_and_score`` generates first, optionally with budget forcing.
* sampling streams: ``problem_seeds`` gives each problem a seed derived from the problem
  itself (the run's seed, the benchmark's name, the problem's id and text), and
  ``generate_seeded`` samples every problem from its own seed. So two benchmarks never
  share noise at the same position, and a resumed, reordered or re-limited evaluation
  draws for each problem exactly what an uninterrupted in-order run draws.
* metrics: pure functions of counts or records: ``pass_at_k`` (the unbiased estimator of
  Chen et al. 2021), ``majority_correct`` / ``maj_at_k``, ``wilson_interval``,
  ``outcome_counts`` (the three CS336 categories),
  ``reward_metrics`` (the keys training logs) and ``summarize`` (all of them).
* ``SampleStore``: a per-run JSONL of records, appended a batch at a time, so an
  interrupted evaluation resumes where it stopped.

Imports stay light (no jax): scoring saved responses needs only the verifier.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.data import prompts as prompt_templates
from jaxalign.data.prompts import CHAT, CHAT_SYSTEM, CHAT_TEMPLATES  # noqa: F401 (API)
from jaxalign.verify import (
    DEFAULT_TIMEOUT,
    REWARDS,
    Reward,
    answer_from_r1_zero,
    answer_from_s1,
    extract_boxed,
    normalize,
    parse_reward_spec,
    resolve_reward,
    score_batch,
)

logger = logging.getLogger(__name__)

# ``REWARDS`` (imported above, defined in ``jaxalign.verify.rewards``): the rewards a spec
# may name by themselves, one per prompt format.

# ``template="chat"``: the tokenizer's chat template with the Qwen2.5-Math CoT system prompt
# (the prompt of the Qwen2.5-Math evaluation suite); the answer is the last \boxed{}.
# ``"s1"``: s1's chat turn, thinking opened (``jaxalign.data.prompts``).

Z_95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...


# --- prompts and answers -----------------------------------------------------------------


def default_reward(template: str) -> str:
    """The reward that reads ``template``'s answers: ``"r1_zero"`` and ``"s1"`` for their
    templates, else ``"question_only"`` (the last boxed answer)."""
    return template if template in ("r1_zero", "s1") else "question_only"


def answer_format(reward: str | Reward) -> str:
    """The registered reward whose answer format ``reward`` reads (``"r1_zero"``,
    ``"question_only"`` or ``"s1"``): a registered name itself; for a composite spec its first
    registered term; for user functions alone ``"question_only"`` (the last ``\\boxed{}``,
    the answer format that needs no template)."""
    if isinstance(reward, Reward):
        return reward.base or "question_only"
    refs = [ref for _, ref in parse_reward_spec(reward) if ref in REWARDS]
    return refs[0] if refs else "question_only"


def default_stop(template: str, reward: str | Reward) -> tuple[str, ...]:
    """Stop strings that end a response: ``</answer>`` when the r1_zero reward scores it
    (nothing after the answer block counts; also when it is a spec's first registered
    term), ``<|im_end|>`` for the chat template."""
    return (("</answer>",) if answer_format(reward) == "r1_zero" else ()) + (
        ("<|im_end|>",) if template in CHAT_TEMPLATES else ())


def build_prompt(template: str, question: str, tokenizer=None, *,
                 system_prompt: str | None = None) -> str:
    """The prompt text for ``question``: ``jaxalign.data.prompts.build_prompt`` (the one
    function for it; ``chat`` and ``s1`` need the tokenizer, ``system_prompt`` None: the
    template's default system message)."""
    return prompt_templates.build_prompt(template, question, tokenizer,
                                         system_prompt=system_prompt)


def extract_answer(response: str, reward: str | Reward) -> str | None:
    """The answer the verifier grades in ``response`` (None: the format is wrong), read in
    ``answer_format(reward)``: a composite or user reward's records (and majority votes)
    use its first registered term's format, else the last ``\\boxed{}``."""
    if answer_format(reward) == "r1_zero":
        return answer_from_r1_zero(response)
    if answer_format(reward) == "s1":
        return answer_from_s1(response)
    boxed = extract_boxed(response)
    return boxed.strip() if boxed is not None and boxed.strip() else None


# --- records -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Response:
    """One response to score.

    Attributes:
        text: the model's continuation of the prompt.
        length: its length in tokens (None: unknown, left out of length metrics).
        finish_reason: ``"stop"``, ``"length"`` (cut at ``max_tokens``) or None (unknown).
        prompt_length: the prompt's length in tokens, when known.
    """

    text: str
    length: int | None = None
    finish_reason: str | None = None
    prompt_length: int | None = None

    @classmethod
    def from_completion(cls, c) -> Response:
        """From a ``jaxalign.rollout.Completion``."""
        prompt_ids = getattr(c, "prompt_token_ids", None)
        return cls(c.text, len(c.token_ids), c.finish_reason,
                   None if prompt_ids is None else len(prompt_ids))


def score_responses(
    examples: Sequence,
    prompts: Sequence[str | None],
    responses: Sequence[Sequence[Response]],
    *,
    reward: str | Reward,
    num_workers: int,
    timeout: float = DEFAULT_TIMEOUT,
    indices: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Scores every response with the shared verifier and returns one record per response.

    Args:
        examples: ``MathExample``s (question, gold answer, id, source).
        prompts: the prompt each example was given (None when unknown).
        responses: per example, its responses (``[E][n_e]``); sample ``j`` of example ``e``
            becomes the record with ``sample=j``.
        reward: a reward spec (``"r1_zero"``, ``"question_only"``, ``"module:function"``,
            weighted sums: ``jaxalign.verify.rewards``) or a resolved ``Reward``.
        num_workers: verifier processes (0: score in this process).
        timeout: seconds per grading call; a call past it scores 0 with ``timed_out``.
        indices: each example's index in its benchmark (default ``0..E-1``).

    Returns:
        Records in example-major order: ``index``, ``id``, ``sample``, ``source``,
        ``prompt``, ``response``, ``ground_truth``, ``extracted``, ``reward``,
        ``format_reward``, ``answer_reward``, ``timed_out``, ``length``, ``prompt_length``,
        ``finish_reason``, ``reward/<term>`` for each term of a composite or user reward,
        and ``error`` when grading raised.

    Raises:
        RewardSpecError: (a ``ValueError``) a spec that cannot be resolved.
    """
    reward = resolve_reward(reward)
    if not len(examples) == len(prompts) == len(responses):
        raise ValueError(f"{len(examples)} examples, {len(prompts)} prompts and "
                         f"{len(responses)} response lists: they must match")
    indices = list(range(len(examples))) if indices is None else list(indices)
    flat = [(e, i, p, j, r)
            for e, i, p, rs in zip(examples, indices, prompts, responses, strict=True)
            for j, r in enumerate(rs)]
    scores = score_batch([r.text for *_, r in flat], [e.answer for e, *_ in flat], reward,
                         num_workers=num_workers, timeout=timeout)
    records = []
    for (e, i, p, j, r), s in zip(flat, scores, strict=True):
        record = {
            "index": int(i), "id": e.id, "sample": j, "source": e.source, "prompt": p,
            "response": r.text, "ground_truth": e.answer,
            "extracted": extract_answer(r.text, reward),
            "reward": s["reward"], "format_reward": s["format_reward"],
            "answer_reward": s["answer_reward"], "timed_out": bool(s.get("timed_out", False)),
            "length": r.length, "prompt_length": r.prompt_length,
            "finish_reason": r.finish_reason,
            # a worker killed at the deadline scores the whole response 0, terms included
            **{k: s.get(k, 0.0) for k in reward.components},
        }  # fmt: skip
        if "error" in s:
            record["error"] = s["error"]
        records.append(record)
    return records


def problem_seeds(seed: int, benchmark: str, examples: Sequence) -> list[int]:
    """One sampling seed per problem, derived from the problem rather than its position.

    The first 31 bits of ``sha256(json([seed, benchmark, id, question]))``. Engines seed a
    generate call with one number and tell its rows apart by position (``JaxEngine``: row
    ``i * n + j`` of the call), so seeding by batch made problem ``i`` of every benchmark
    draw the same noise, and made a problem's samples depend on which problems shared its
    batch: a resumed run or a larger ``--limit`` sampled the rest differently. Hashing
    what identifies the problem fixes both; the row's ``source`` (file and line) is left
    out, so a reordered file keeps each problem's seed. Problems with the same id and
    question in one benchmark are the same problem and get the same seed. 31 bits is a
    valid seed for every engine (``jax.random.key`` keeps 32; the sidecar takes
    ``[0, 2**32)``).

    Args:
        seed: the run's seed (``--seed``).
        benchmark: the benchmark's name; different names give unrelated seeds.
        examples: ``MathExample``s (their ``id`` and ``question`` are used).

    Returns:
        ``[E]`` seeds in ``[0, 2**31)``.
    """
    out = []
    for e in examples:
        key = json.dumps([int(seed), benchmark, e.id, e.question], ensure_ascii=False)
        digest = hashlib.sha256(key.encode()).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out


_UNBATCHED_WARNED: set[type] = set()  # engine types already reported as unbatched


def _takes_seeds(engine) -> bool:
    """Whether ``engine.generate`` accepts per-prompt seeds (a ``seeds=`` keyword)."""
    try:
        return "seeds" in inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def generate_seeded(
    engine,
    prompts: Sequence,
    sampling,
    seeds: Sequence[int],
    *,
    budget=None,
    tokenizer=None,
) -> list[list]:
    """``engine.generate`` where prompt ``i`` draws from its own seed ``seeds[i]``.

    Prompt ``i`` gets exactly what ``engine.generate([prompts[i]],
    replace(sampling, seed=seeds[i]))`` gives: its samples depend on its seed and sample
    number alone, not on the other prompts of the call or their order.

    An engine whose ``generate`` takes ``seeds=`` (one per prompt, with that contract:
    ``JaxEngine``, ``VllmEngine``) gets one batched call. Engines without it (the sidecar
    client) seed a whole call with one number, so each prompt is generated in a call of its
    own: the samples are right, but prompts are not batched together (a warning says so,
    once per engine type). Budget
    forcing is a loop of calls per prompt, so it always runs prompt by prompt.

    Args:
        engine: a ``jaxalign.rollout.RolloutEngine``.
        prompts: ``[P]`` prompt texts or token-id lists.
        sampling: ``jaxalign.rollout.SamplingParams``; its ``seed`` is replaced.
        seeds: ``[P]`` seeds (``problem_seeds``).
        budget: optional ``jaxalign.rollout.budget.BudgetForcing``.
        tokenizer: the model's tokenizer (needed for budget forcing).

    Returns:
        ``[P][sampling.n]`` completions, in the order of ``prompts``.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: one per prompt")
    if budget is None and _takes_seeds(engine):
        return engine.generate(list(prompts), sampling, seeds=[int(s) for s in seeds])
    if budget is None and type(engine) not in _UNBATCHED_WARNED:
        _UNBATCHED_WARNED.add(type(engine))
        logger.warning("%s.generate takes no per-prompt seeds: each problem is generated in "
                       "a call of its own (the samples are right, but problems are not "
                       "batched together, which is slower)", type(engine).__name__)
    if budget is not None:
        # lazy: this module never imports jax (module docstring)
        from jaxalign.rollout.budget import generate_with_budget

        if tokenizer is None:
            raise ValueError("budget forcing needs the model's tokenizer")
    out = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        params = dataclasses.replace(sampling, seed=int(seed))
        if budget is None:
            out.extend(engine.generate([prompt], params))
        else:
            out.extend(generate_with_budget(engine, tokenizer, [prompt], params, budget))
    return out


def rollout_and_score(
    engine,
    examples: Sequence,
    *,
    template: str,
    reward: str | Reward,
    sampling,
    num_workers: int,
    budget=None,
    tokenizer=None,
    timeout: float = DEFAULT_TIMEOUT,
    indices: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Generates ``sampling.n`` responses per example with ``engine`` and scores them.

    Args:
        engine: a ``jaxalign.rollout.RolloutEngine`` (JAX, sidecar or vLLM).
        examples: ``MathExample``s.
        template: prompt template (see ``build_prompt``).
        reward: a reward spec or a resolved ``Reward`` (``score_responses``).
        sampling: ``jaxalign.rollout.SamplingParams``; under budget forcing its
            ``max_tokens`` bounds the answer phase.
        num_workers: verifier processes (0: score in this process).
        budget: optional ``jaxalign.rollout.budget.BudgetForcing``.
        tokenizer: for ``"chat"`` prompts and budget forcing (default: ``engine.tokenizer``).
        timeout: seconds per grading call.
        indices: each example's index in its benchmark (default ``0..E-1``).
        seeds: one seed per example (``problem_seeds``): each example is then sampled from
            its own seed, whatever else is in the call (``generate_seeded``). None: one
            call seeded with ``sampling.seed``, rows told apart by position (what the
            training loops' validation does: a fixed set, always sampled in one order).

    Returns:
        The records of ``score_responses``, example-major.
    """
    reward = resolve_reward(reward)  # a bad spec fails before anything is generated
    tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
    prompts = [build_prompt(template, e.question, tokenizer, system_prompt=system_prompt)
               for e in examples]
    if seeds is not None and len(seeds) != len(examples):
        raise ValueError(f"{len(seeds)} seeds for {len(examples)} examples: one per example")
    if not prompts:
        return []
    if seeds is not None:
        outs = generate_seeded(engine, prompts, sampling, seeds, budget=budget,
                               tokenizer=tokenizer)
    elif budget is None:
        outs = engine.generate(prompts, sampling)
    else:
        from jaxalign.rollout.budget import generate_with_budget  # lazy, as above

        if tokenizer is None:
            raise ValueError("budget forcing needs the model's tokenizer")
        outs = generate_with_budget(engine, tokenizer, prompts, sampling, budget)
    responses = [[Response.from_completion(c) for c in group] for group in outs]
    return score_responses(examples, prompts, responses, reward=reward,
                           num_workers=num_workers, timeout=timeout, indices=indices)


def evaluate_sets(engine, sets: Mapping[str, Sequence], *, sampling, **kwargs: Any):
    """``rollout_and_score`` + ``reward_metrics`` on several held-out sets.

    Each set is sampled with ``problem_seeds(sampling.seed, <set name>, ...)``, so the sets
    are statistically independent (one seed for all would give problem ``i`` of every set
    the same noise).

    Returns:
        ``(metrics, records)``: metrics keyed ``"<set>/<metric>"`` (e.g.
        ``"gsm8k/answer_reward"``) and each set's records.
    """
    metrics, records = {}, {}
    for name, examples in sets.items():
        seeds = problem_seeds(sampling.seed, name, examples)
        records[name] = rollout_and_score(engine, examples, sampling=sampling, seeds=seeds,
                                          **kwargs)
        metrics.update({f"{name}/{k}": v for k, v in reward_metrics(records[name]).items()})
    return metrics, records


# --- metrics: pure functions -------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)``: the chance that ``k`` of the ``n`` samples drawn without
    replacement include a correct one (Chen et al. 2021), computed as a product so large
    ``n`` does not overflow.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer among samples is correct.

    Answers are compared after ``jaxalign.verify.normalize`` (so ``\\dfrac12`` and
    ``\\frac12`` vote together, but ``0.5`` and ``\\frac12`` do not); None (no answer in the
    right format) does not vote. Ties go to the answer seen first; a vote group is correct
    if any of its samples was graded correct. No answers at all: False.
    """
    votes: collections.Counter[str] = collections.Counter()
    group_correct: dict[str, bool] = {}
    for a, ok in zip(answers, correct, strict=True):
        if a is None:
            continue
        key = normalize(a)
        votes[key] += 1
        group_correct[key] = group_correct.get(key, False) or bool(ok)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in votes if votes[k] == top)  # Counter keeps first-seen order
    return group_correct[winner]


def sample_ks(n: int) -> list[int]:
    """The k of pass@k / maj@k reported for ``n`` samples: powers of two below ``n``, and ``n``."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if (1 << i) < n]
    return ks + [n]


def wilson_interval(successes: float, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes/total``;
    unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n.
    ``successes`` may be fractional (a sum of per-problem accuracies, see ``summarize``).
    ``total == 0`` gives ``(nan, nan)``.
    """
    if total == 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= total * (1 + 1e-12):
        raise ValueError(f"successes={successes} must be in [0, total={total}]")
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # At 0 and n the bounds are exactly 0 and 1; only rounding would say otherwise.
    lo = 0.0 if successes <= 0 else max(0.0, center - half)
    hi = 1.0 if successes >= total else min(1.0, center + half)
    return lo, hi


def outcome_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The three CS336 categories: format 1 & answer 1, format 1 & answer 0, format 0.

    Every record falls in exactly one, so the counts add up to the number of records
    (an unformatted response never has answer reward 1: the verifier requires the format).
    """
    counts = {"format1_answer1": 0, "format1_answer0": 0, "format0": 0}
    for r in records:
        if r["format_reward"] <= 0:
            counts["format0"] += 1
        elif r["answer_reward"] > 0:
            counts["format1_answer1"] += 1
        else:
            counts["format1_answer0"] += 1
    return counts


def reward_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """What training logs for a held-out set (``eval/*``) and eval reports, same names.

    Returns:
        Means of ``answer_reward``, ``format_reward`` and ``reward``; ``response_length`` in
        tokens over all responses, ``response_length_correct`` (answer reward > 0) and
        ``response_length_incorrect``; ``truncated_fraction`` (finish reason ``"length"``);
        and the ``component_means`` of a composite or user reward (``reward/<term>``).
        Unknown lengths and finish reasons (None) are left out of their metrics; an empty
        selection gives NaN.
    """
    lengths = [(r["length"], r["answer_reward"] > 0) for r in records
               if r.get("length") is not None]
    known_finish = [r["finish_reason"] for r in records if r.get("finish_reason") is not None]
    return {
        "answer_reward": _mean([r["answer_reward"] for r in records]),
        "format_reward": _mean([r["format_reward"] for r in records]),
        "reward": _mean([r["reward"] for r in records]),
        "response_length": _mean([n for n, _ in lengths]),
        "response_length_correct": _mean([n for n, ok in lengths if ok]),
        "response_length_incorrect": _mean([n for n, ok in lengths if not ok]),
        "truncated_fraction": _mean([f == "length" for f in known_finish]),
        **component_means(records),
    }


def component_means(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each ``reward/<term>`` value (the terms of a composite or user reward,
    ``jaxalign.verify.rewards``) over reward dicts or records, in the spec's order; a
    dict without a key (its worker was killed at the deadline) counts 0. ``{}`` for a
    plain registered reward."""
    keys = dict.fromkeys(k for s in scores for k in s if k.startswith("reward/"))
    return {k: _mean([float(s.get(k, 0.0)) for s in scores]) for k in keys}


def group_by_example(records: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping]]:
    """Records grouped by ``index``, each group ordered by ``sample``; indices ascending."""
    groups: dict[int, list[Mapping]] = collections.defaultdict(list)
    for r in records:
        groups[int(r["index"])].append(r)
    return {i: sorted(groups[i], key=lambda r: r["sample"]) for i in sorted(groups)}


def maj_at_k(groups: Iterable[Sequence[Mapping[str, Any]]], k: int) -> float:
    """Mean over examples of ``majority_correct`` on each example's first ``k`` samples.

    The first ``k`` of ``n`` i.i.d. samples are one unbiased draw of ``k`` samples.
    """
    hits = []
    for g in groups:
        first = g[:k]
        hits.append(majority_correct([r["extracted"] for r in first],
                                     [r["answer_reward"] > 0 for r in first]))
    return _mean(hits)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every reported metric of one benchmark run.

    Confidence intervals are Wilson intervals over problems. With one sample per problem
    that is the textbook interval on (correct, samples). With several, the samples of a
    problem are not independent trials, so the interval is taken over the problems, with
    the sum of per-problem accuracies as successes: conservative, since a per-problem mean
    in [0, 1] varies at most as much as one Bernoulli trial (a bootstrap over problems
    would be tighter, but claims no uncertainty at all when every problem scores the same).

    Args:
        records: the run's records (any number of samples per example).

    Returns:
        ``examples``, ``samples``, ``n`` (fewest samples of an example), ``accuracy`` (mean
        answer reward) and ``accuracy_ci95``, ``format_rate`` and ``format_rate_ci95``,
        ``counts`` (``outcome_counts``), ``pass@k`` and ``maj@k`` (dicts keyed by k, only
        when ``n > 1``), the ``reward_metrics`` keys, ``truncated``, ``timeouts`` and
        ``grading_errors`` (counts).
    """
    groups = list(group_by_example(records).values())
    counts = outcome_counts(records)
    samples = len(records)
    n = min((len(g) for g in groups), default=0)
    out: dict[str, Any] = {"examples": len(groups), "samples": samples, "n": n}
    correct = counts["format1_answer1"]
    formatted = correct + counts["format1_answer0"]
    out["accuracy"] = correct / samples if samples else float("nan")
    out["format_rate"] = formatted / samples if samples else float("nan")
    # Per problem: the fraction of its samples in the right format / with the right answer.
    acc = sum(_mean([r["answer_reward"] > 0 for r in g]) for g in groups)
    fmt = sum(_mean([r["format_reward"] > 0 for r in g]) for g in groups)
    out["accuracy_ci95"] = list(wilson_interval(acc, len(groups)))
    out["format_rate_ci95"] = list(wilson_interval(fmt, len(groups)))
    out["counts"] = counts
    if n > 1:
        ks = sample_ks(n)
        out["pass@k"] = {
            str(k): _mean([pass_at_k(len(g), sum(r["answer_reward"] > 0 for r in g), k)
                           for g in groups])
            for k in ks
        }
        out["maj@k"] = {str(k): maj_at_k(groups, k) for k in ks}
    out.update(reward_metrics(records))
    out["truncated"] = sum(r.get("finish_reason") == "length" for r in records)
    out["timeouts"] = sum(bool(r.get("timed_out")) for r in records)
    out["grading_errors"] = sum("error" in r for r in records)
    return out


# --- the resumable store -----------------------------------------------------------------


class SampleStore:
    """The records of one evaluation run in a JSONL file, appended a batch at a time.

    Records are keyed by ``(index, sample)``. Each ``append`` writes whole lines, then
    flushes and fsyncs, so a killed run loses at most the batch it was writing. A torn last
    line (the kill landed mid-write) is cut off when the file is opened; a bad line anywhere
    else is an error. Appending a key that is already stored (a problem redone because the
    kill left only some of its samples) rewrites the file without the old line, atomically,
    so the file never holds a key twice.

    Args:
        path: the JSONL file (created with its folder on the first append).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[int, int], dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                           self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (int(record["index"]), int(record["sample"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{self.path}:{number}: not a sample record ({type(e).__name__}: {e}); "
                    "fix or delete the file, or evaluate into another --out"
                ) from None
            self.records[key] = record

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.records

    def done(self, n: int) -> set[int]:
        """Indices whose samples ``0..n-1`` are all stored."""
        have = collections.Counter(i for i, j in self.records if j < n)
        return {i for i, c in have.items() if c == n}

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Writes ``records`` (each with ``index`` and ``sample``) and makes them durable."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = {(int(r["index"]), int(r["sample"])): dict(r) for r in records}
        replacing = any(k in self.records for k in new)
        self.records.update(new)
        if replacing:  # rare: rewrite everything to a temporary file, then rename over
            tmp = self.path.with_name(self.path.name + ".tmp")
            self._write(tmp, self.records.values(), "w")
            os.replace(tmp, self.path)
        else:
            self._write(self.path, new.values(), "a")

    @staticmethod
    def _write(path: Path, records: Iterable[Mapping[str, Any]], mode: str) -> None:
        lines = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
        with open(path, mode, encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def rows(self, indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Stored records (only those of ``indices`` when given), ordered by (index, sample)."""
        keep = None if indices is None else set(indices)
        return [self.records[k] for k in sorted(self.records) if keep is None or k[0] in keep]


# --- in-training validation ---------------------------------------------------------


def score(responses: Sequence[str], answers: Sequence[Any], reward: str | Reward,
          num_workers: int, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Verifier rewards of training rollouts, in input order.

    Args:
        responses: ``[N]`` response texts.
        answers: ``[N]`` gold answers.
        reward: the run's ``Reward`` (resolved once, by the loop) or a spec.
        num_workers: verifier processes (0: score in this process).
        timeout: seconds per response; past it the response scores 0 with ``timed_out``.

    Returns:
        ``[N]`` dicts with ``reward``, ``format_reward``, ``answer_reward``, every
        ``reward/<term>`` of a composite or user reward, and ``timed_out`` / ``error``
        where grading ran out of time or raised.
    """
    reward = resolve_reward(reward)
    scores = score_batch(list(responses), list(answers), reward, num_workers=num_workers,
                         timeout=timeout)
    for s in scores:  # a worker killed at the deadline scores the whole response 0
        for k in reward.components:
            s.setdefault(k, 0.0)
    return scores


def validate(
    engine,
    examples: Sequence,
    *,
    template: str,
    reward: str | Reward,
    sampling,
    num_workers: int,
    system_prompt: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out rewards of ``engine`` on ``examples`` (``MathExample``), ``sampling.n`` each.

    ``reward`` is the run's ``Reward`` (resolved once) or a spec.

    The same code as ``eval/evaluate.py`` (``rollout_and_score`` and ``reward_metrics``),
    so a checkpoint scores the same here and in an eval report.

    Returns:
        ``(metrics, records)``: mean ``answer_reward`` / ``format_reward`` / ``reward``,
        response lengths in tokens (all, correct, incorrect), ``truncated_fraction`` and
        the means of a composite or user reward's ``reward/<term>``; one record per sample
        with prompt, response, gold answer, extracted answer, rewards, length and finish
        reason (for ``write_generations``).
    """
    records = rollout_and_score(engine, examples, template=template, reward=reward,
                                sampling=sampling, num_workers=num_workers,
                                system_prompt=system_prompt)
    return summarize_rewards(records), records


def validate_all(
    engine,
    held_out: Sequence,
    sets: Mapping[str, Sequence],
    **kwargs: Any,
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """What a training loop's evaluation logs: ``validate`` on the data source's held-out
    set as ``eval/*``, and ``evaluate_sets`` on ``config.eval.sets`` as ``eval/<name>/*``
    (each set seeded apart). ``kwargs``: ``validate``'s (template, reward, sampling,
    num_workers, system_prompt).

    Returns:
        ``(metrics, records)``: the prefixed metrics; records by set name (``""``: the
        held-out set), each record of a named set tagged ``"set": name``.
    """
    metrics: dict[str, float] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    if held_out:
        result, records[""] = validate(engine, held_out, **kwargs)
        metrics.update({"eval/" + k: v for k, v in result.items()})
    sets = {name: examples for name, examples in sets.items() if examples}
    if sets:
        result, by_set = evaluate_sets(engine, sets, **kwargs)
        metrics.update({"eval/" + k: v for k, v in result.items()})
        for name, rows in by_set.items():
            records[name] = [{"set": name, **r} for r in rows]
    return metrics, records


def summarize_rewards(records: Sequence[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Mean rewards, lengths (all / correct / incorrect) and truncation of scored responses.

    ``reward_metrics`` with ``prefix`` on every key.
    """
    return {prefix + k: v for k, v in reward_metrics(records).items()}
