"""Metrics JSONL (+ offline wandb): records survive, NaNs stay visible, torn lines are skipped."""

import jax.numpy as jnp
import numpy as np

from jaxalign.logging import MetricsLogger, read_metrics


def test_jsonl_records_and_offline_wandb(tmp_path):
    log = MetricsLogger(tmp_path, wandb_mode="offline", run_name="t", config={"lr": 1e-5})
    log.log(1, {"loss": jnp.float32(2.5), "lr": 1e-5, "lengths": np.array([1, 2])})
    log.log(2, {"loss": float("nan")})
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.5 and records[0]["lengths"] == [1, 2]
    assert records[1]["loss"] == "nan"
    assert any((tmp_path / "wandb").iterdir())  # the offline run directory exists


def test_torn_last_line_is_skipped(tmp_path):
    log = MetricsLogger(tmp_path, wandb_mode="disabled")
    log.log(1, {"loss": 1.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
