"""``eval/evaluate.py`` end to end on CPU: a tiny local model with ``--engine jax``, saved
responses scored by hand, resuming, run directories, and the errors a user can hit."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest
from conftest import REPO_ROOT
from flax import nnx

from jaxalign.config import base_config
from jaxalign.evaluation import wilson_interval

# Small enough to compile and run in seconds: 8 new tokens, 3 problems.
FAST = ["--engine", "jax", "--max_tokens", "8", "--num-workers", "0", "--no-progress"]


def _run(ev, out, *args):
    return ev.run(ev.parse_args([*args, "--out", str(out)]))


@pytest.fixture(scope="session")
def data(shared_data):
    """``--data-dir`` of the real benchmark files (tests that need them skip without)."""
    return ["--data-dir", str(shared_data)]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- generation with the JAX engine --------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(ev, tiny_dir, tmp_path_factory, data):
    """Two benchmarks, 3 problems, 2 samples each at temperature 1."""
    out = tmp_path_factory.mktemp("eval") / "sampled"
    args = ["--model", str(tiny_dir), "--benchmarks", "gsm8k,amc23", "--limit", "3",
            "--n", "2", "--temperature", "1", *FAST, *data]
    return out, args, _run(ev, out, *args)


def test_report_counts_add_up(sampled):
    out, _, summary = sampled
    assert set(summary["results"]) == {"gsm8k", "amc23"}
    for name, r in summary["results"].items():
        rows = _lines(out / "samples" / f"{name}.jsonl")
        assert (r["examples"], r["samples"], r["n"], len(rows)) == (3, 6, 2, 6)
        assert sum(r["counts"].values()) == r["samples"]
        assert r["format_rate"] * 6 == pytest.approx(r["counts"]["format1_answer1"]
                                                     + r["counts"]["format1_answer0"])
        assert r["accuracy"] == r["answer_reward"] == r["counts"]["format1_answer1"] / 6
        assert r["truncated"] == sum(x["finish_reason"] == "length" for x in rows)
        assert r["truncated_fraction"] == pytest.approx(r["truncated"] / 6)
        assert r["response_length"] == pytest.approx(sum(x["length"] for x in rows) / 6)
        assert set(r["pass@k"]) == set(r["maj@k"]) == {"1", "2"}
        assert r["pass@k"]["1"] == pytest.approx(r["accuracy"])
        assert {(x["index"], x["sample"]) for x in rows} == {(i, j) for i in range(3)
                                                             for j in range(2)}
        for x in rows:
            assert 1 <= x["length"] <= 8 and x["finish_reason"] in ("stop", "length")
            assert x["prompt"].endswith("Assistant: <think>") and x["benchmark"] == name
            for key in ("response", "ground_truth", "extracted", "reward", "format_reward",
                        "answer_reward", "timed_out", "prompt_length"):
                assert key in x
    assert summary["results"]["amc23"]["examples"] == 3
    assert _lines(out / "samples" / "amc23.jsonl")[0]["ground_truth"] == "27.0"
    report = (out / "report.md").read_text()
    assert "| gsm8k | 3 | 6 |" in report and "| amc23 | 3 | 6 |" in report
    assert json.loads((out / "summary.json").read_text())["results"]["gsm8k"]["samples"] == 6
    for png in ("accuracy.png", "lengths.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "budget.png").exists()


def test_resume_skips_done_rows_and_redoes_a_torn_one(ev, sampled):
    out, args, first = sampled
    path = out / "samples" / "gsm8k.jsonl"
    before = path.read_bytes()
    again = _run(ev, out, *args)
    assert again["progress"]["gsm8k"] == {"generated": 0, "skipped": 3}
    assert path.read_bytes() == before
    assert json.dumps(again["results"]) == json.dumps(first["results"])  # NaN-safe equality

    more = _run(ev, out, *[a if a != "3" else "5" for a in args])  # --limit 5
    assert more["progress"]["gsm8k"] == {"generated": 2, "skipped": 3}
    assert path.read_bytes().startswith(before)  # done rows untouched
    assert more["results"]["gsm8k"]["samples"] == 10

    # A kill in the middle of writing the last line: that problem alone is redone.
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 40])
    torn = _run(ev, out, *[a if a != "3" else "5" for a in args])
    assert torn["progress"]["gsm8k"] == {"generated": 1, "skipped": 4}
    assert torn["results"]["gsm8k"]["samples"] == 10
    assert len(_lines(path)) == 10  # the torn problem's first sample was replaced, not duplicated


def test_resume_refuses_other_settings(ev, sampled):
    out, args, _ = sampled
    with pytest.raises(ev.EvalError, match="temperature: 1.0 there, 0.5 now"):
        _run(ev, out, *[a if a != "1" else "0.5" for a in args])


def test_resumed_run_samples_like_an_uninterrupted_one(ev, tiny_dir, tmp_path, data):
    """Fixed batches with their own seeds: stopping after a batch changes nothing."""
    args = ["--model", str(tiny_dir), "--benchmarks", "amc23", "--temperature", "1",
            "--batch-size", "2", *FAST, *data]
    _run(ev, tmp_path / "whole", *args, "--limit", "4")
    _run(ev, tmp_path / "parts", *args, "--limit", "2")
    _run(ev, tmp_path / "parts", *args, "--limit", "4")
    whole = _lines(tmp_path / "whole" / "samples" / "amc23.jsonl")
    parts = _lines(tmp_path / "parts" / "samples" / "amc23.jsonl")
    assert [r["response"] for r in parts] == [r["response"] for r in whole]


def test_training_validation_reports_the_same_numbers(ev, tiny_dir, tmp_path, shared_data,
                                                     data):
    """``evaluation.validate`` (the training loops' eval) and the eval report agree."""
    from jaxalign import evaluation
    from jaxalign.data.datasets import load_benchmark
    from jaxalign.models import from_pretrained, load_tokenizer
    from jaxalign.rollout import JaxEngine, SamplingParams

    engine = JaxEngine(from_pretrained(tiny_dir, dtype=jnp.float32), load_tokenizer(tiny_dir))
    sampling = SamplingParams(temperature=0.0, max_tokens=8, stop=("</answer>",),
                              include_stop_str_in_output=True)
    examples = load_benchmark("gsm8k", shared_data)[:3]
    metrics, records = evaluation.validate(engine, examples, template="r1_zero", reward="r1_zero",
                                       sampling=sampling, num_workers=0)
    summary = _run(ev, tmp_path, "--model", str(tiny_dir), "--benchmarks", "gsm8k",
                   "--limit", "3", *FAST, *data)
    report = summary["results"]["gsm8k"]
    # (summary.json writes NaN, "no correct responses", as null)
    assert ev._finite(metrics) == {k: report[k] for k in metrics}
    assert set(metrics) == {"answer_reward", "format_reward", "reward", "response_length",
                            "response_length_correct", "response_length_incorrect",
                            "truncated_fraction"}
    rows = _lines(tmp_path / "samples" / "gsm8k.jsonl")
    assert [r["response"] for r in rows] == [r["response"] for r in records]


def test_budget_forcing_sweep(ev, tiny_dir, tmp_path, data):
    summary = _run(ev, tmp_path, "--model", str(tiny_dir), "--benchmarks", "amc23",
                   "--limit", "2", "--budget-forcing", "max_thinking=2,4", *FAST, *data)
    assert set(summary["results"]) == {"amc23@think2", "amc23@think4"}
    assert summary["results"]["amc23@think4"]["budget"] == {"max_thinking": 4, "wait": 0}
    for name in summary["results"]:
        for r in _lines(tmp_path / "samples" / f"{name}.jsonl"):
            assert " </think> <answer>" in r["response"]  # the forced end of thinking
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sidecar_engine_matches_the_jax_engine(ev, tiny_dir, tmp_path, data):
    """``--engine sidecar:URL`` against a real sidecar subprocess (JAX backend) samples what
    ``--engine jax`` does; the tokenizer for budget forcing is the sidecar's own model's."""
    import os

    from jaxalign.rollout.server import LISTENING

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAXALIGN_SIDECAR_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxalign.rollout.server", "--backend", "jax", "--model",
         str(tiny_dir), "--dtype", "float32", "--port", "0"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # Prompts and answers must fit the tiny model's 512 positions: a short template.
        args = ["--benchmarks", "amc23", "--limit", "2", "--n", "2", "--temperature", "1",
                "--prompt", "Q: {question} <think>", "--reward", "r1_zero",
                "--budget-forcing", "max_thinking=3", *FAST, *data]
        local = _run(ev, tmp_path / "jax", "--model", str(tiny_dir), *args)
        line = proc.stdout.readline()
        assert line.startswith(LISTENING), line
        url = line[len(LISTENING):].strip()
        remote = _run(ev, tmp_path / "sidecar", *args, "--engine", f"sidecar:{url}")
    finally:
        proc.kill()
        proc.wait()
    name = "amc23@think3"
    assert remote["settings"]["model"] == f"(served by sidecar:{url})"
    assert json.dumps(remote["results"]) == json.dumps(local["results"])
    a = [r["response"] for r in _lines(tmp_path / "jax" / "samples" / f"{name}.jsonl")]
    b = [r["response"] for r in _lines(tmp_path / "sidecar" / "samples" / f"{name}.jsonl")]
    assert a == b and len(a) == 4


# --- run directories -----------------------------------------------------------------------


def _run_dir(root, params_seed):
    """A training run directory as ``RunState`` writes it: config.json and an orbax
    checkpoint, whose parameters come from a model of seed ``params_seed`` (the config says
    seed 0, so only a real restore gives those weights)."""
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.models import build

    cfg = base_config("sft", "sft")
    # 2048 positions: r1_zero prompts with AMC questions are ~660 byte tokens
    cfg.model.arch = dict(max_position_embeddings=2048)
    root.mkdir(parents=True)
    (root / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    cfg.model.seed = params_seed
    model, tokenizer = build.build_model_and_tokenizer(cfg.model)
    params = nnx.state(model, nnx.Param)
    ckpt = Checkpointer(root / "checkpoints", async_save=False)
    ckpt.save(7, params, optax.adam(1e-3).init(params), {"trainer_step": 7})
    ckpt.close()
    return model, tokenizer


def test_run_directory_is_restored_from_its_checkpoint(ev, tmp_path, data):
    from jaxalign.models import save_pretrained

    model, tokenizer = _run_dir(tmp_path / "run", params_seed=3)
    source = ev.resolve_model(str(tmp_path / "run"))
    assert (source.kind, source.step) == ("run", 7)
    save_pretrained(model, tmp_path / "same", tokenizer=tokenizer)
    args = ["--benchmarks", "amc23", "--limit", "2", *FAST, *data]
    from_run = _run(ev, tmp_path / "a", "--model", str(tmp_path / "run"), *args)
    _run(ev, tmp_path / "b", "--model", str(tmp_path / "same"), *args)
    assert from_run["settings"]["model"].endswith("(checkpoint step 7)")
    a = [r["response"] for r in _lines(tmp_path / "a" / "samples" / "amc23.jsonl")]
    b = [r["response"] for r in _lines(tmp_path / "b" / "samples" / "amc23.jsonl")]
    assert a == b

    # With an hf/ export the run is evaluated through it.
    save_pretrained(model, tmp_path / "run" / "hf", tokenizer=tokenizer)
    assert ev.resolve_model(str(tmp_path / "run")) == ev.ModelSource(
        "hf", str(tmp_path / "run" / "hf"))


# --- saved responses, scored by hand --------------------------------------------------------

# GSM8K test rows 0-4 have gold answers 18, 3, 70000, 540, 20; AMC23 rows 0-1: 27.0, 36.0.
CANNED = [
    # gsm8k, one sample each: 3 right (plain, boxed inside <answer>, thousands separator),
    # 1 formatted but wrong, 1 right number without the format.
    {"benchmark": "gsm8k", "index": 0, "response": " 16-3-4=9, 9*2=18 </think> <answer> 18 "
     "</answer>", "length": 10, "finish_reason": "stop"},
    {"benchmark": "gsm8k", "index": 1, "response": " 2+1 </think> <answer> \\boxed{3} </answer>",
     "length": 20, "finish_reason": "stop"},
    {"benchmark": "gsm8k", "index": 2, "response": " </think> <answer> 70,000 </answer>",
     "length": 30, "finish_reason": "stop"},
    {"benchmark": "gsm8k", "index": 3, "response": " 3*3*60 </think> <answer> 450 </answer>",
     "length": 40, "finish_reason": "stop"},
    {"benchmark": "gsm8k", "index": 4, "response": " the answer is 20", "length": 50,
     "finish_reason": "length"},
    # amc23, three samples each (by id): problem 0 has 1 right of 3, problem 1 has 2 of 3.
    {"benchmark": "amc23", "id": 0, "response": " </think> <answer> 27 </answer>"},
    {"benchmark": "amc23", "id": 0, "response": " </think> <answer> 30 </answer>"},
    {"benchmark": "amc23", "id": 0, "response": " 27"},
    {"benchmark": "amc23", "id": 1, "response": " </think> <answer> 10 </answer>"},
    {"benchmark": "amc23", "id": 1, "response": " </think> <answer> 36 </answer>"},
    {"benchmark": "amc23", "id": 1, "response": " </think> <answer> $36$ </answer>"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_canned_responses_give_the_hand_computed_numbers(ev, tmp_path, data):
    responses = _write_jsonl(tmp_path / "responses.jsonl", CANNED)
    # Through the real verifier pool (one worker process).
    summary = _run(ev, tmp_path / "out", "--responses", str(responses), "--num-workers", "1",
                   "--no-progress", *data)
    g = summary["results"]["gsm8k"]
    assert (g["examples"], g["samples"], g["accuracy"], g["format_rate"]) == (5, 5, 0.6, 0.8)
    assert g["counts"] == {"format1_answer1": 3, "format1_answer0": 1, "format0": 1}
    assert g["accuracy_ci95"] == list(wilson_interval(3, 5))
    assert (g["response_length"], g["response_length_correct"],
            g["response_length_incorrect"]) == (30.0, 20.0, 45.0)
    assert (g["truncated"], g["truncated_fraction"], g["timeouts"]) == (1, 0.2, 0)
    assert "pass@k" not in g
    a = summary["results"]["amc23"]
    assert (a["examples"], a["samples"], a["n"], a["accuracy"]) == (2, 6, 3, 0.5)
    assert a["counts"] == {"format1_answer1": 3, "format1_answer0": 2, "format0": 1}
    assert a["pass@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(5 / 6), "3": 1.0}
    assert a["maj@k"] == {"1": 0.5, "2": 0.5, "3": 1.0}
    assert a["response_length"] is None  # no lengths in the file: unknown, not zero
    rows = _lines(tmp_path / "out" / "samples" / "gsm8k.jsonl")
    assert [r["extracted"] for r in rows] == ["18", "3", "70,000", "450", None]
    assert rows[0]["prompt"].endswith("User: Janet’s ducks lay 16 eggs per day. She eats "
                                      "three for breakfast every morning and bakes muffins for "
                                      "her friends every day with four. She sells the remainder "
                                      "at the farmers' market daily for $2 per fresh duck egg. "
                                      "How much in dollars does she make every day at the "
                                      "farmers' market?\nAssistant: <think>")

    # Re-scoring the run's own samples file gives the same numbers; new rows alone are scored.
    again = _run(ev, tmp_path / "rescored", "--responses",
                 str(tmp_path / "out" / "samples" / "gsm8k.jsonl"), "--num-workers", "0",
                 "--no-progress", *data)
    assert json.dumps(again["results"]["gsm8k"]) == json.dumps(g)
    _write_jsonl(responses, CANNED + [{"benchmark": "gsm8k", "index": 5, "response": "?"}])
    more = _run(ev, tmp_path / "out", "--responses", str(responses), "--num-workers", "0",
                "--no-progress", *data)
    assert more["progress"]["gsm8k"] == {"generated": 1, "skipped": 5}
    assert more["results"]["gsm8k"]["samples"] == 6


def test_jsonl_and_hf_benchmarks_with_a_field_map(ev, tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    _write_jsonl(data / "test.jsonl", [{"q": "1+1?", "a": "2", "uid": "x"},
                                       {"q": "2+2?", "a": "4", "uid": "y"}])
    responses = _write_jsonl(tmp_path / "r.jsonl", [
        {"benchmark": "test", "id": "y", "response": "so \\boxed{4}"},
        {"benchmark": "test", "index": 0, "response": "so \\boxed{3}"},
    ])
    summary = _run(ev, tmp_path / "a", "--responses", str(responses), "--benchmarks",
                   str(data / "test.jsonl"), "--fields", "question=q,answer=a,id=uid",
                   "--prompt", "question_only", "--num-workers", "0", "--no-progress")
    assert summary["results"]["test"]["accuracy"] == 0.5
    assert summary["settings"]["reward"] == "question_only"
    with pytest.raises(ev.EvalError, match="missing field 'question'"):
        _run(ev, tmp_path / "b", "--responses", str(responses), "--benchmarks",
             str(data / "test.jsonl"), "--no-progress")
    # A local Hugging Face dataset folder (split files inside), the same fields.
    responses = _write_jsonl(tmp_path / "r2.jsonl", [
        {"benchmark": "hf_data", "index": 1, "response": "\\boxed{4}"}])
    (tmp_path / "hf_data").mkdir()
    (data / "test.jsonl").rename(tmp_path / "hf_data" / "test.jsonl")
    summary = _run(ev, tmp_path / "c", "--responses", str(responses), "--benchmarks",
                   f"hf:{tmp_path / 'hf_data'}", "--fields", "question=q,answer=a",
                   "--prompt", "question_only", "--num-workers", "0", "--no-progress")
    (name,) = summary["results"]
    assert summary["results"][name]["accuracy"] == 1.0


# --- errors a user can hit -----------------------------------------------------------------


def _fails(ev, out, match, *args):
    with pytest.raises(ev.EvalError, match=match):
        _run(ev, out, *args)
    assert not out.exists()  # nothing is written before the inputs check out


def test_clear_errors_for_flags(ev, tiny_dir, tmp_path):
    model = ["--model", str(tiny_dir), *FAST]

    def fails(match, *args):
        _fails(ev, tmp_path / "out", match, *args)

    fails("unknown benchmark 'gsm9k'; known: gsm8k, math500, aime24, amc23, minerva_math",
          *model, "--benchmarks", "gsm9k")
    fails("--model /no/such/model: no such directory", "--model", "/no/such/model",
          "--benchmarks", "gsm8k")
    fails("--model .*: neither a HF model directory", "--model", str(tmp_path),
          "--benchmarks", "gsm8k")
    fails("needs --model", "--engine", "jax", "--benchmarks", "gsm8k")
    fails("no \\{question\\} placeholder", *model, "--prompt", "Solve: {problem}")
    template = tmp_path / "bad.prompt"
    template.write_text("Solve it.\n")
    fails("no \\{question\\} placeholder", *model, "--prompt", str(template))
    fails("--engine 'tpu'; choose one of", "--model", str(tiny_dir), "--engine", "tpu")
    fails("--budget-forcing: unknown key 'thinking'", *model, "--budget-forcing", "thinking=5")
    fails("max_thinking=N is required", *model, "--budget-forcing", "wait=1")
    fails("invalid sampling flags: top_p=0.0", *model, "--top_p", "0")
    fails("--dtype 'fp8'; choose", *model, "--dtype", "fp8")
    fails("gsm8k/test.jsonl not found; pass --data-dir", *model, "--benchmarks", "gsm8k",
          "--data-dir", str(tmp_path))
    fails("--responses .*: no such file", "--responses", str(tmp_path / "none.jsonl"))


def test_clear_errors_for_inputs(ev, tiny_dir, tmp_path, data):
    model = ["--model", str(tiny_dir), *FAST, *data]

    def fails(match, *args):
        _fails(ev, tmp_path / "out", match, *args)

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"benchmark": "amc23", "index": 40,
                                                 "response": "x"}])
    fails("bad.jsonl:1: index 40 is not a row of amc23", "--responses", str(bad), *data)
    # These need the model loaded (no generation).
    fails("--engine vllm needs vLLM", *model, "--engine", "vllm", "--benchmarks", "amc23")
    fails("the 'chat' prompt needs a tokenizer with a chat template", *model, "--prompt", "chat",
          "--benchmarks", "amc23")


def test_command_line_exit_code_and_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "eval/evaluate.py", "--model", str(tmp_path / "missing"),
         "--benchmarks", "gsm8k", "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: --model" in proc.stderr and "no such directory" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


def test_a_reward_spec_scores_saved_responses_and_a_bad_one_is_one_line(
    ev, tmp_path, data, monkeypatch
):
    """``--reward`` takes training's reward specs: the weighted sum's total and each term."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "verify"))  # my_rewards
    responses = _write_jsonl(tmp_path / "responses.jsonl", CANNED[:5])
    _run(ev, tmp_path / "out", "--responses", str(responses), "--num-workers", "1",
         "--no-progress", "--reward", "r1_zero - 0.5*my_rewards:length_penalty",
         "--benchmarks", "gsm8k", *data)
    rows = _lines(tmp_path / "out" / "samples" / "gsm8k.jsonl")
    for row, canned in zip(rows, CANNED[:5], strict=True):
        penalty = -len(canned["response"]) / 100
        assert row["reward/length_penalty"] == pytest.approx(penalty)
        assert row["reward"] == pytest.approx(row["reward/r1_zero"] - 0.5 * penalty)
    assert [r["answer_reward"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ev.EvalError, match=r"--reward 'no_such_module:fn': .*PYTHONPATH"):
        _run(ev, tmp_path / "out2", "--responses", str(responses), "--reward",
             "no_such_module:fn", *data)
