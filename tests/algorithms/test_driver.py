"""The one driver (jaxalign.algorithms.driver): what it runs when, on a stand-in algorithm.

The stand-in's run state keeps checkpoints in memory, so each test runs in milliseconds and
checks the driver's own decisions exactly: which steps validate and save, what a
checkpoint carries, what a resume restores and what the summary and the table say. The
real loops go through the same driver in test_sft.py, test_grpo.py, test_resume.py, ...
"""

from __future__ import annotations

import json

import ml_collections
import pytest

from jaxalign.algorithms import driver


class MemoryRun:
    """``rundir.RunState``'s interface, checkpoints in a dict (``save_every`` honoured)."""

    def __init__(self, save_every: int, checkpoints: dict):
        self.save_every, self.checkpoints = save_every, checkpoints
        self.logged: list[tuple[int, dict]] = []
        self.closed = False

    def resume(self, trainer, iterators):
        if not self.checkpoints:
            return None
        step = max(self.checkpoints)
        trainer.value = self.checkpoints[step]["value"]
        return dict(self.checkpoints[step])

    def save(self, step, trainer, iterators, *, force=False, **extra):
        if force or (self.save_every and step % self.save_every == 0):
            self.checkpoints[step] = {"step": step, "value": trainer.value, **extra}

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def close(self):
        self.closed = True


class Counter(driver.Algorithm):
    """Adds 1 to a number each step; validation reports the number as its answer reward."""

    name, title = "counter", "Counter"

    def __init__(self, tmp_path, *, steps=6, every=2, save_every=3, checkpoints=None,
                 save_at_start=False, die_at=None):
        self.cfg = ml_collections.ConfigDict(dict(
            eval=dict(every=every), log=dict(progress=False),
            checkpoint=dict(export_hf=False)))
        self.run_dir, self.steps, self.save_at_start, self.die_at = tmp_path, steps, \
            save_at_start, die_at
        self.trainer = type("Trainer", (), {"value": 0})()
        self.tokenizer = None
        self.run = MemoryRun(save_every, {} if checkpoints is None else checkpoints)
        self.evaluated: list[int] = []
        self.restored: dict | None = None
        self.warm = {"warm": 7}

    def iterators(self):
        return {}

    def step(self, step):
        if step == self.die_at:
            raise KeyboardInterrupt("killed")
        self.trainer.value += 1
        return {"train/value": self.trainer.value}

    def evaluate(self, step):
        self.evaluated.append(step)
        metrics = {"eval/answer_reward": self.trainer.value / 10,
                   "eval/format_reward": 1.0}
        self.run.log(step, metrics)
        return metrics

    def saved_state(self):
        return {"warmstart": self.warm}

    def restore(self, extra):
        self.restored = extra

    def summary(self, eval_before, eval_after, last):
        return {"last": last.get("train/value")}


def test_a_fresh_run_validates_before_every_and_at_the_end_and_saves_on_schedule(
        tmp_path, capsys):
    algo = Counter(tmp_path)
    summary = driver.drive(algo)
    assert algo.evaluated == [0, 2, 4, 6]
    assert sorted(algo.run.checkpoints) == [3, 6]  # save_every=3, and the last step
    assert all(c["eval_before"] == {"eval/answer_reward": 0.0, "eval/format_reward": 1.0}
               and c["warmstart"] == {"warm": 7} for c in algo.run.checkpoints.values())
    assert [s for s, m in algo.run.logged if "train/value" in m] == [1, 2, 3, 4, 5, 6]
    assert summary["algorithm"] == "counter" and summary["steps"] == 6
    assert summary["resumed_from"] == 0 and summary["last"] == 6
    assert summary["eval_before"] == 0.0 and summary["eval_after"] == 0.6
    assert json.loads((tmp_path / "summary.json").read_text())["eval_after"] == 0.6
    assert algo.run.closed
    out = capsys.readouterr().out
    assert "held-out answer reward before Counter: 0.000" in out
    assert "| answer reward | 0.000 | 0.600 |" in out
    assert "| format reward | 1.000 | 1.000 |" in out


def test_a_killed_run_resumes_from_its_checkpoint_with_its_validation_before(tmp_path):
    checkpoints: dict = {}
    with pytest.raises(KeyboardInterrupt):
        driver.drive(Counter(tmp_path, checkpoints=checkpoints, die_at=5))
    assert sorted(checkpoints) == [3]
    algo = Counter(tmp_path, checkpoints=checkpoints)
    summary = driver.drive(algo)
    assert algo.restored["step"] == 3 and algo.restored["warmstart"] == {"warm": 7}
    assert algo.evaluated == [4, 6]  # not step 0 again: it came back with the checkpoint
    assert summary["resumed_from"] == 3 and summary["eval_before"] == 0.0
    assert summary["eval_after"] == 0.6 and summary["last"] == 6


def test_a_restart_after_the_end_trains_nothing_and_validates_the_final_weights(tmp_path):
    checkpoints: dict = {}
    driver.drive(Counter(tmp_path, checkpoints=checkpoints))
    algo = Counter(tmp_path, checkpoints=checkpoints)
    summary = driver.drive(algo)
    assert not [m for _, m in algo.run.logged if "train/value" in m]
    assert algo.evaluated == [6] and summary["eval_after"] == 0.6
    assert summary["resumed_from"] == 6 and summary["eval_before"] == 0.0


def test_save_at_start_checkpoints_step_zero_with_what_a_resume_needs(tmp_path):
    checkpoints: dict = {}
    with pytest.raises(KeyboardInterrupt):
        driver.drive(Counter(tmp_path, checkpoints=checkpoints, save_at_start=True, die_at=1))
    assert checkpoints[0]["warmstart"] == {"warm": 7}
    assert checkpoints[0]["eval_before"]["eval/answer_reward"] == 0.0
    algo = Counter(tmp_path, checkpoints=checkpoints, save_at_start=True)
    assert driver.drive(algo)["resumed_from"] == 0 and algo.evaluated == [2, 4, 6]


def test_no_periodic_validation_still_validates_the_last_step(tmp_path):
    algo = Counter(tmp_path, every=0)
    driver.drive(algo)
    assert algo.evaluated == [0, 6]
