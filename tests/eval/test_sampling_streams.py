"""Sampling streams of an evaluation (issue #19): every problem draws from its own seed.

Engines seed a generate call with one number and tell its rows apart by position, so
seeding by batch gave problem ``i`` of every benchmark the same noise, and made a problem's
samples depend on which problems shared its batch. ``PositionalEngine`` below is that
engine with the model taken out: its "response" is the random stream a row would draw
from (``JaxEngine``'s ``(seed, i * n + j)``), whatever the prompt says, the way a tiny
random model all but ignores its prompt. Equal responses are then equal streams.
"""

import json

import pytest

from jaxalign import evaluation
from jaxalign.data.datasets import MathExample
from jaxalign.rollout import Completion, SamplingParams

QUESTIONS = ["What is 1 + 1?", "What is 2 + 3?", "Name a prime above 10.", "What is 7 * 6?",
             "What is 10 - 4?"]
OTHER_QUESTIONS = ["How many sides has a square?", "What is 9 / 3?", "What is 2 ** 5?",
                   "What is 8 - 8?", "What is 11 + 12?"]


class PositionalEngine:
    """Answers row ``j`` of prompt ``i`` with the stream ``JaxEngine`` would give it.

    Records every call as ``(number of prompts, seed)``.
    """

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.seed))
        return [[self._completion(f" stream {params.seed}:{i * params.n + j}")
                 for j in range(params.n)] for i in range(len(prompts))]

    @staticmethod
    def _completion(text):
        return Completion(text=text, token_ids=[1, 2, 3], logprobs=None,
                          finish_reason="length", prompt_token_ids=[0])


class SeedsEngine(PositionalEngine):
    """An engine that takes per-prompt seeds, with the contract of ``generate_seeded``."""

    def generate(self, prompts, params, *, seeds=None):
        if seeds is None:
            return super().generate(prompts, params)
        self.calls.append((len(prompts), tuple(seeds)))
        return [[self._completion(f" stream {s}:{j}") for j in range(params.n)] for s in seeds]


def _examples(questions, ids=None):
    ids = ids or [None] * len(questions)
    return [MathExample(q, "2", id=i, source=f"file:{k + 1}")
            for k, (q, i) in enumerate(zip(questions, ids, strict=True))]


# --- jaxalign.evaluation ------------------------------------------------------------------


def test_problem_seeds_come_from_the_problem_not_its_place():
    a = _examples(QUESTIONS)
    seeds = evaluation.problem_seeds(0, "gsm8k", a)
    assert seeds == evaluation.problem_seeds(0, "gsm8k", a)  # stable
    assert len(set(seeds)) == len(a) and all(0 <= s < 2**31 for s in seeds)
    # Reordered (and re-numbered: ``source`` is the file position): each keeps its seed.
    moved = [MathExample(e.question, e.answer, id=e.id, source=f"file:{9 - k}")
             for k, e in enumerate(reversed(a))]
    assert evaluation.problem_seeds(0, "gsm8k", moved) == seeds[::-1]
    # Another benchmark, run seed, question or id: unrelated seeds.
    assert not set(seeds) & set(evaluation.problem_seeds(0, "amc23", a))
    assert not set(seeds) & set(evaluation.problem_seeds(1, "gsm8k", a))
    assert evaluation.problem_seeds(0, "gsm8k", _examples(["What is 1 + 1 ?"])) != seeds[:1]
    assert (evaluation.problem_seeds(0, "gsm8k", _examples(QUESTIONS[:1], ["x"]))
            != seeds[:1])


def test_generate_seeded_draws_each_prompt_from_its_own_seed():
    """Per prompt (engines without ``seeds=``) and batched (engines with it), the same:
    what the prompt would get alone with its seed."""
    params = SamplingParams(n=2, temperature=1.0, seed=123)
    prompts, seeds = ["p0", "p1", "p2"], [11, 22, 33]
    plain = PositionalEngine()
    out = evaluation.generate_seeded(plain, prompts, params, seeds)
    assert plain.calls == [(1, 11), (1, 22), (1, 33)]
    alone = [PositionalEngine().generate([p], SamplingParams(n=2, seed=s))[0]
             for p, s in zip(prompts, seeds, strict=True)]
    assert [[c.text for c in row] for row in out] == [[c.text for c in row] for row in alone]
    batched = SeedsEngine()
    out2 = evaluation.generate_seeded(batched, prompts, params, seeds)
    assert batched.calls == [(3, (11, 22, 33))]
    assert [[c.text for c in row] for row in out2] == [[c.text for c in row] for row in out]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        evaluation.generate_seeded(plain, prompts, params, seeds[:2])


def test_rollout_and_score_with_and_without_problem_seeds():
    examples = _examples(QUESTIONS[:3])
    params = SamplingParams(n=1, temperature=1.0, seed=7)
    kwargs = dict(template="r1_zero", reward="r1_zero", sampling=params, num_workers=0)
    # Without seeds (training's validation): one call, rows by position, as before.
    engine = PositionalEngine()
    records = evaluation.rollout_and_score(engine, examples, **kwargs)
    assert engine.calls == [(3, 7)]
    assert [r["response"] for r in records] == [f" stream 7:{i}" for i in range(3)]
    # With seeds: each example from its own.
    seeds = evaluation.problem_seeds(7, "held_out", examples)
    records = evaluation.rollout_and_score(PositionalEngine(), examples, seeds=seeds, **kwargs)
    assert [r["response"] for r in records] == [f" stream {s}:0" for s in seeds]
    with pytest.raises(ValueError, match="1 seeds for 3 examples"):
        evaluation.rollout_and_score(engine, examples, seeds=seeds[:1], **kwargs)


def test_evaluate_sets_keeps_the_sets_apart():
    sets = {"a": _examples(QUESTIONS[:2]), "b": _examples(OTHER_QUESTIONS[:2])}
    params = SamplingParams(n=1, temperature=1.0, seed=0)
    _, records = evaluation.evaluate_sets(PositionalEngine(), sets, template="r1_zero",
                                          reward="r1_zero", sampling=params, num_workers=0)
    a = [r["response"] for r in records["a"]]
    b = [r["response"] for r in records["b"]]
    assert not set(a) & set(b)


# --- eval/evaluate.py ---------------------------------------------------------------------


def _write_benchmark(path, questions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n"
                            for q in questions))
    return str(path)


def _evaluate(ev, monkeypatch, out, benchmarks, *args):
    """``ev.run`` with a ``PositionalEngine``; returns {benchmark: {question: [responses]}}."""
    engine = PositionalEngine()
    monkeypatch.setattr(ev, "build_engine", lambda cfg, source, out: (engine, None))
    argv = ["--engine", "sidecar:http://127.0.0.1:9", "--benchmarks", ",".join(benchmarks),
            "--fields", "question=question,answer=answer", "--temperature", "1", "--n", "2",
            "--num-workers", "0", "--no-progress", "--no-plots", *args, "--out", str(out)]
    summary = ev.run(ev.parse_args(argv))
    got = {}
    for name in summary["results"]:
        rows = [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text()
                .splitlines()]
        for r in sorted(rows, key=lambda r: (r["index"], r["sample"])):
            question = r["prompt"].split("User: ", 1)[1].split("\nAssistant:", 1)[0]
            got.setdefault(name, {}).setdefault(question, []).append(r["response"])
    return got


def test_benchmarks_do_not_share_sampling_noise(ev, monkeypatch, tmp_path):
    """Problem i of two benchmarks (different problems) used to get the same stream."""
    a = _write_benchmark(tmp_path / "data" / "bench_a.jsonl", QUESTIONS)
    b = _write_benchmark(tmp_path / "data" / "bench_b.jsonl", OTHER_QUESTIONS)
    got = _evaluate(ev, monkeypatch, tmp_path / "out", [a, b])
    streams_a = [s for responses in got["bench_a"].values() for s in responses]
    streams_b = [s for responses in got["bench_b"].values() for s in responses]
    assert len(set(streams_a)) == len(streams_a) == 10  # 5 problems x 2 samples
    assert not set(streams_a) & set(streams_b)


def test_reordered_problems_keep_their_samples(ev, monkeypatch, tmp_path):
    """The same benchmark, its file shuffled: each problem gets the same samples."""
    order = [3, 0, 4, 1, 2]
    in_order = _write_benchmark(tmp_path / "in_order" / "bench.jsonl", QUESTIONS)
    shuffled = _write_benchmark(tmp_path / "shuffled" / "bench.jsonl",
                                [QUESTIONS[k] for k in order])
    want = _evaluate(ev, monkeypatch, tmp_path / "a", [in_order], "--batch-size", "2")
    got = _evaluate(ev, monkeypatch, tmp_path / "b", [shuffled], "--batch-size", "3")
    assert got == want and len(want["bench"]) == 5


def test_resumed_and_extended_runs_sample_like_an_uninterrupted_one(ev, monkeypatch,
                                                                   tmp_path):
    """Stopping inside a batch (a smaller --limit, then the full one) and a run killed by
    an engine failure both end with the samples of one uninterrupted in-order run."""
    bench = _write_benchmark(tmp_path / "data" / "bench.jsonl", QUESTIONS)
    whole = _evaluate(ev, monkeypatch, tmp_path / "whole", [bench], "--batch-size", "4")
    # --limit 2, then all 5, batches of 4: the second run's first batch is half done.
    _evaluate(ev, monkeypatch, tmp_path / "parts", [bench], "--batch-size", "4", "--limit", "2")
    parts = _evaluate(ev, monkeypatch, tmp_path / "parts", [bench], "--batch-size", "4")
    assert parts == whole
    # Killed: the engine fails on its third call (a sidecar gone); re-run to resume.
    from jaxalign.rollout import SidecarError

    class Dying(PositionalEngine):
        def generate(self, prompts, params):
            if len(self.calls) == 2:
                raise SidecarError("sidecar http://127.0.0.1:9 is unreachable")
            return super().generate(prompts, params)

    monkeypatch.setattr(ev, "build_engine", lambda cfg, source, out: (Dying(), None))
    argv = ["--engine", "sidecar:http://127.0.0.1:9", "--benchmarks", bench, "--fields",
            "question=question,answer=answer", "--temperature", "1", "--n", "2",
            "--num-workers", "0", "--no-progress", "--no-plots", "--batch-size", "2",
            "--out", str(tmp_path / "killed")]
    with pytest.raises(ev.EvalError, match="generation failed"):
        ev.run(ev.parse_args(argv))
    resumed = _evaluate(ev, monkeypatch, tmp_path / "killed", [bench], "--batch-size", "2")
    assert resumed == whole


def test_an_out_dir_seeded_by_batch_is_not_resumed(ev, monkeypatch, tmp_path):
    """Samples of the old scheme and the new must not mix in one file."""
    bench = _write_benchmark(tmp_path / "data" / "bench.jsonl", QUESTIONS)
    _evaluate(ev, monkeypatch, tmp_path / "out", [bench], "--limit", "2")
    run_json = tmp_path / "out" / "run.json"
    record = json.loads(run_json.read_text())
    del record["settings"]["seeding"]  # as written before issue #19
    run_json.write_text(json.dumps(record))
    with pytest.raises(ev.EvalError, match="seeding: None there"):
        _evaluate(ev, monkeypatch, tmp_path / "out", [bench])


def test_tiny_model_gives_different_problems_different_samples(ev, tiny_dir, tmp_path):
    """The real JAX engine at temperature 1: the two benchmarks' problems are sampled
    independently (the tiny random model barely reads its prompt, so the same stream gave
    the same response before), and a shuffled file gives each problem the same samples."""
    def run(out, *benchmarks):
        argv = ["--model", str(tiny_dir), "--engine", "jax", "--benchmarks",
                ",".join(benchmarks), "--fields", "question=question,answer=answer",
                "--prompt", "Q: {question} A:", "--reward", "r1_zero", "--temperature", "1",
                "--max_tokens", "8", "--limit", "3", "--num-workers", "0", "--no-progress",
                "--no-plots", "--out", str(out)]
        ev.run(ev.parse_args(argv))
        rows = {}
        for name in benchmarks:
            stem = name.rsplit("/", 1)[-1].removesuffix(".jsonl")
            for line in (out / "samples" / f"{stem}.jsonl").read_text().splitlines():
                r = json.loads(line)
                rows[(stem, r["prompt"])] = r["response"]
        return rows

    a = _write_benchmark(tmp_path / "data" / "bench_a.jsonl", QUESTIONS[:3])
    b = _write_benchmark(tmp_path / "data" / "bench_b.jsonl", OTHER_QUESTIONS[:3])
    both = run(tmp_path / "both", a, b)
    responses_a = [v for (name, _), v in both.items() if name == "bench_a"]
    responses_b = [v for (name, _), v in both.items() if name == "bench_b"]
    assert len(responses_a) == len(responses_b) == 3
    assert all(x != y for x, y in zip(responses_a, responses_b, strict=True))
    shuffled = _write_benchmark(tmp_path / "shuffled" / "bench_a.jsonl",
                                [QUESTIONS[2], QUESTIONS[0], QUESTIONS[1]])
    again = run(tmp_path / "again", shuffled)
    assert again == {k: v for k, v in both.items() if k[0] == "bench_a"}
