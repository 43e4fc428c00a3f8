"""benchmarks/train_packing.py --tiny: both ways train on the same sequences and report."""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_packing.py"
_spec = importlib.util.spec_from_file_location("benchmarks_train_packing", _PATH)
train_packing = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = train_packing
_spec.loader.exec_module(train_packing)


@pytest.mark.parametrize("workload", ["gsm8k", "longtail"])
def test_tiny_run_reports_both_ways_on_the_same_tokens(workload, capsys):
    out = train_packing.main(["--tiny", "--tokenizer", "qwen", "--workload", workload])
    assert out["sequences"] > 0 and out["repeats"] == 2
    assert out["packed_steps"] < out["bucketed_steps"]  # several sequences per packed row
    assert out["packed_padding_fraction"] < out["bucketed_padding_fraction"]
    assert out["speedup_min"] <= out["speedup_median"] <= out["speedup_max"]
    assert out["packed_tokens_per_s"] > 0 and out["bucketed_tokens_per_s"] > 0
    assert '"speedup_median"' in capsys.readouterr().out


def test_tiny_grpo_step_run_packs_the_rollout_batch():
    out = train_packing.main(["--tiny", "--tokenizer", "qwen", "--workload", "longtail",
                              "--step", "grpo"])
    assert out["step"] == "grpo" and out["packed_steps"] == out["bucketed_steps"]
    assert out["packed_padding_fraction"] < out["bucketed_padding_fraction"]
    assert out["packed_tokens_per_s"] > 0
