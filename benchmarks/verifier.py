"""Verifier throughput: responses/s single-process and with the process pool.

    python benchmarks/verifier.py                    # 4,000 responses, pool of os.cpu_count()
    python benchmarks/verifier.py --n 8000 --workers 2 --timeout 3

The corpus is built from ``../shared/data`` (MATH500, GSM8K test, AMC23, AIME24): r1_zero
responses whose thinking part is the dataset's own solution text (realistic lengths) and
whose answer is (proportions chosen to resemble an early GRPO run: many wrong answers,
some broken formats)

- 30% the gold answer as written,
- 20% the gold in another surface form (``\\boxed{}``, ``x = ...``, ``\\dfrac``, ``27.0``,
  thousands separators, ``p/q`` or an unreduced fraction, extra spaces),
- 35% a wrong answer (another problem's gold, or the gold number plus one),
- 15% a broken format (no ``</think>``, two answer blocks, text after ``</answer>``).

The corpus cycles through the 1,865 problems, so with more responses than problems a gold
answer is graded several times (as in GRPO, where each prompt gets a group of samples) and
some identical (answer, gold) pairs recur; the script prints how many are unique. Each
measurement starts from empty grading caches (fresh pool workers; ``cache_clear``
in-process) after the one-time warm-up every pool worker does when it starts;
``--n 1865`` grades every problem once, nothing repeated. Reported: responses/s, the
longest single call (in-process: wall time per call; pool: the longest an item held a
worker, as the parent saw it), timeouts, and how many rewards differ from the corpus's
labels (a check that speed was not bought with wrong answers: it must print 0).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import time

from jaxalign.verify import (
    DEFAULT_TIMEOUT,
    ScoringPool,
    answer_from_r1_zero,
    grader,
    r1_zero_reward_fn,
)

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _read(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def load_problems(data: pathlib.Path) -> list[tuple[str, str]]:
    """(reasoning text, gold answer) pairs from the shared benchmark files."""
    problems = []
    for row in _read(data / "math500" / "test.jsonl"):
        problems.append((row["solution"], row["answer"]))
    for row in _read(data / "gsm8k" / "test.jsonl"):
        steps, gold = row["answer"].split("####")
        problems.append((steps, gold.strip().replace(",", "")))
    for name in ("amc23", "aime24"):
        for row in _read(data / name / "test.jsonl"):
            problems.append(
                (row.get("solution") or row["problem"], grader.gold_text(row["answer"]))
            )
    return problems


def other_form(gold: str, rng: random.Random) -> str:
    """The gold answer in another, equivalent surface form."""
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        return rng.choice([f"{n}.0", f"{n:,}", f"x = {n}", f"\\boxed{{{n}}}", f"{n}.00"])
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        sign, p, q = m.groups()
        return rng.choice(
            [
                f"{sign}{p}/{q}",
                f"{sign}\\dfrac{{{p}}}{{{q}}}",
                f"{sign}\\frac{{{2 * int(p)}}}{{{2 * int(q)}}}",
            ]
        )
    return rng.choice(
        [f"\\boxed{{{gold}}}", f"x = {gold}", gold.replace("\\frac", "\\dfrac") + " ", f" {gold} "]
    )


def wrong_answer(gold: str, golds: list[str], rng: random.Random) -> str:
    if re.fullmatch(r"-?\d+", gold):
        return str(int(gold) + rng.choice([1, -1, 10]))
    other = rng.choice(golds)
    return other if grader.normalize(other) != grader.normalize(gold) else gold + "+1"


def build_corpus(n: int, seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """``n`` responses, their ground truths, and the reward each should get."""
    rng = random.Random(seed)
    problems = load_problems(DATA)
    golds = [g for _, g in problems]
    responses, truths, expected = [], [], []
    for i in range(n):
        thinking, gold = problems[i % len(problems)]
        kind = rng.random()
        if kind < 0.30:
            body, ok = f"</think> <answer>{gold}</answer>", True
        elif kind < 0.50:
            body, ok = f"</think>\n<answer>{other_form(gold, rng)}</answer>", True
        elif kind < 0.85:
            body, ok = f"</think> <answer>{wrong_answer(gold, golds, rng)}</answer>", False
        else:
            body, ok = (
                rng.choice(
                    [
                        f"<answer>{gold}</answer>",
                        f"</think> <answer>{gold}</answer> <answer>{gold}</answer>",
                        f"</think> <answer>{gold}</answer> So the answer is {gold}.",
                    ]
                ),
                False,
            )
        responses.append(f" {thinking.strip()}\n{body}<|endoftext|>")
        truths.append(gold)
        expected.append(float(ok))
    return responses, truths, expected


def bench_single(responses, truths, timeout):
    grader._grade_short.cache_clear()
    grader._parse.cache_clear()
    grader.warm_up()  # what a pool worker does when it starts
    grader._parse.cache_clear()
    worst, results = 0.0, []
    start = time.perf_counter()
    for response, truth in zip(responses, truths, strict=True):
        t = time.perf_counter()
        results.append(r1_zero_reward_fn(response, truth, timeout=timeout))
        worst = max(worst, time.perf_counter() - t)
    return results, time.perf_counter() - start, worst


def bench_pool(responses, truths, timeout, workers):
    with ScoringPool(workers, timeout=timeout) as pool:
        pool.score(["warm </think> <answer>1</answer>"] * workers, ["1"] * workers)  # start up
        pool.stats["max_item_seconds"] = 0.0
        start = time.perf_counter()
        results = pool.score(responses, truths)
        elapsed = time.perf_counter() - start
        return results, elapsed, pool.stats["max_item_seconds"], dict(pool.stats)


def report(name, results, elapsed, worst, expected):
    n = len(results)
    timeouts = sum(1 for r in results if r.get("timed_out"))
    wrong = sum(r["reward"] != e for r, e in zip(results, expected, strict=True))
    print(
        f"{name:<18} {n / elapsed:7,.0f} responses/s ({n} in {elapsed:5.2f} s)   "
        f"max call {1e3 * worst:6.1f} ms   timeouts {timeouts}   "
        f"rewards differing from the corpus labels {wrong}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="responses in the corpus")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="pool processes")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per call")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    responses, truths, expected = build_corpus(args.n, args.seed)
    mb = sum(map(len, responses)) / 1e6
    pairs = {(answer_from_r1_zero(r), t) for r, t in zip(responses, truths, strict=True)}
    print(
        f"corpus: {args.n} r1_zero responses ({mb:.1f} MB) from {DATA}: {len(set(truths))} "
        f"distinct golds, {len(pairs)} distinct (answer, gold) pairs; timeout {args.timeout:g} s; "
        f"{os.cpu_count()} CPUs"
    )
    results, elapsed, worst = bench_single(responses, truths, args.timeout)
    report("single process", results, elapsed, worst, expected)
    single = results
    results, elapsed, worst, stats = bench_pool(responses, truths, args.timeout, args.workers)
    report(f"pool, {args.workers} workers", results, elapsed, worst, expected)
    same = sum(a == b for a, b in zip(single, results, strict=True))
    print(f"pool == single process on {same}/{len(results)} results; pool stats {stats}")


if __name__ == "__main__":
    main()
