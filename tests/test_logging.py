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


def test_generations_table_and_run_identity_reach_wandb(tmp_path):
    """Sample generations as a wandb table (written to the offline run's media), and the
    entity, tags and run name from the config."""
    import json

    from jaxalign import rundir

    log = MetricsLogger(tmp_path, wandb_mode="offline", run_name="grpo-math-1",
                        wandb_entity="my-team", wandb_tags=("grpo", "math"))
    assert log._wandb.name == "grpo-math-1" and set(log._wandb.tags) == {"grpo", "math"}
    assert log._wandb.entity == "my-team"
    records = [{"prompt": f"Q{i}", "response": f"A{i}", "ground_truth": "5", "extracted": "5",
                "reward": 1.0, "answer_reward": 1.0, "format_reward": 1.0, "length": 3 + i,
                "finish_reason": "stop", "sample": 0} for i in range(5)]
    rundir.write_generations(tmp_path, 10, records, limit=3, logger=log)
    log.close()
    [table] = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/eval/"
                                            "generations_*.table.json"))
    data = json.loads(table.read_text())
    assert data["columns"] == list(rundir.GENERATION_COLUMNS)
    assert [row[0] for row in data["data"]] == ["Q0", "Q1", "Q2"]  # the first `limit`
    assert [row[7] for row in data["data"]] == [3, 4, 5]
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 10, 10]
