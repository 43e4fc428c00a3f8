"""Resuming a run directory: a refused resume changes nothing, logs hold each step once,
the warm start resumes, a bad command line or workdir is one line, a full disk stops once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cfg_helpers import REPO_ROOT, load_config, shrink, synthetic_sft

from jaxalign import checkpoint, train
from jaxalign.algorithms import grpo, sft
from jaxalign.config import ConfigError
from jaxalign.data.synthetic import DEMO_TEMPLATE
from jaxalign.logging import read_metrics


def _sft_config(tmp_path, steps=6):
    cfg = synthetic_sft(tmp_path, steps)
    cfg.checkpoint.save_every = 2
    return cfg


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _steps(path: Path, key: str) -> list[int]:
    return [r["step"] for r in read_metrics(path) if key in r]


def test_a_refused_resume_changes_nothing_in_the_run_directory(tmp_path):
    cfg = _sft_config(tmp_path)
    train.run(cfg)
    run_dir = tmp_path / "run"
    before = _snapshot(run_dir)

    bigger = _sft_config(tmp_path)
    bigger.model.preset = "small"  # another architecture: the checkpoint cannot fit
    with pytest.raises(ConfigError, match=r"config.model.preset: 'tiny' in the run, 'small'"):
        train.run(bigger)
    assert _snapshot(run_dir) == before

    # a change the declarative check allows but the optimizer state cannot take (no gradient
    # clipping changes the optax chain): refused at restore time, still nothing changed
    unclipped = _sft_config(tmp_path, steps=8)
    unclipped.optim.grad_clip = 0.0
    with pytest.raises(ConfigError, match="does not fit this config"):
        train.run(unclipped)
    assert _snapshot(run_dir) == before

    # the run still exports (config.json is the one it was trained with)
    assert checkpoint.main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) is None
    assert (tmp_path / "hf" / "config.json").exists()


def test_a_resume_with_allowed_changes_is_recorded_and_keeps_config_json(tmp_path):
    cfg = _sft_config(tmp_path, steps=4)
    train.run(cfg)
    run_dir = tmp_path / "run"
    original = (run_dir / "config.json").read_text()
    longer = _sft_config(tmp_path, steps=6)
    longer.optim.lr = 3e-4
    summary = train.run(longer)
    assert summary["resumed_from"] == 4
    assert (run_dir / "config.json").read_text() == original
    (record,) = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 4
    assert record["changed"] == {"optim.lr": [1e-3, 3e-4], "train.steps": [4, 6]}
    assert _steps(run_dir / "metrics.jsonl", "train/loss") == [1, 2, 3, 4, 5, 6]


def _even_e(cfg, monkeypatch):
    """Score with ``my_rewards:even_e`` (a reward a random tiny model earns about half the
    time), the module put on the path as a user's would be."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tests" / "verify"))
    cfg.data.reward = "my_rewards:even_e"
    return cfg


def test_resumed_grpo_logs_every_step_once(grpo_config, tmp_path, monkeypatch):
    """Killed after logging step 3 (last checkpoint: step 2): step 3 is logged again by the
    resumed run, and only once; the validation samples of step 3 likewise."""
    _even_e(grpo_config, monkeypatch)
    grpo_config.grpo.n_grpo_steps = 4
    grpo_config.checkpoint.save_every = 2
    grpo_config.eval.every = 1
    original = grpo.GRPO.step

    def dies_at_4(self, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(grpo.GRPO, "step", dies_at_4)
    with pytest.raises(KeyboardInterrupt):
        train.run(grpo_config)
    run_dir = tmp_path / "run"
    assert _steps(run_dir / "metrics.jsonl", "train/loss") == [1, 2, 3]
    monkeypatch.setattr(grpo.GRPO, "step", original)
    summary = train.run(grpo_config)
    assert summary["resumed_from"] == 2
    assert _steps(run_dir / "metrics.jsonl", "train/loss") == [1, 2, 3, 4]
    assert _steps(run_dir / "metrics.jsonl", "eval/answer_reward") == [0, 1, 2, 3, 4]
    generation_steps = [r["step"] for r in read_metrics(run_dir / "generations.jsonl")]
    assert generation_steps == sorted(generation_steps)
    assert generation_steps.count(3) == generation_steps.count(1) > 0  # step 3 once


def test_a_warm_start_killed_half_way_resumes_from_its_checkpoint(grpo_config, tmp_path,
                                                                   monkeypatch):
    _even_e(grpo_config, monkeypatch)
    w = grpo_config.warmstart
    w.sft_steps, w.batch_size, w.slip_rate, w.save_every = 6, 8, 0.5, 2
    grpo_config.grpo.n_grpo_steps = 1
    grpo_config.workdir = str(tmp_path / "straight")
    straight = train.run(grpo_config)
    want = {r["step"]: r["warmstart/loss"]
            for r in read_metrics(tmp_path / "straight" / "warmstart.jsonl")}

    original = sft.run_sft_steps
    steps_run = []

    def dies_after_step_5(trainer, it, **kw):
        on_step = kw["on_step"]

        def counting(step, iterator):
            steps_run.append(step)
            on_step(step, iterator)
            if step == 5:
                raise KeyboardInterrupt("killed")

        return original(trainer, it, **dict(kw, on_step=counting))

    grpo_config.workdir = str(tmp_path / "killed")
    monkeypatch.setattr(sft, "run_sft_steps", dies_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.run(grpo_config)
    assert _steps(tmp_path / "killed" / "warmstart.jsonl", "warmstart/loss") == [1, 2, 3, 4, 5]
    steps_run.clear()
    monkeypatch.setattr(sft, "run_sft_steps", original)
    resumed = train.run(grpo_config)
    got = {r["step"]: r["warmstart/loss"]
           for r in read_metrics(tmp_path / "killed" / "warmstart.jsonl")}
    assert list(got) == [1, 2, 3, 4, 5, 6]  # steps 5-6 rerun from the step-4 checkpoint, once
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step
    assert resumed["warmstart_loss"] == pytest.approx(straight["warmstart_loss"], rel=1e-6)
    assert resumed["eval_before"] == pytest.approx(straight["eval_before"])


def test_a_resumed_expert_iteration_run_keeps_its_warm_start_in_the_summary(tmp_path,
                                                                          monkeypatch):
    cfg = _even_e(shrink(load_config("ei"), tmp_path), monkeypatch)
    cfg.ei.n_ei_steps, cfg.ei.questions_per_step, cfg.ei.group_size, cfg.ei.batch_size = (
        2, 8, 4, 8)
    cfg.warmstart.sft_steps, cfg.warmstart.batch_size = 2, 8
    cfg.eval.every = 0
    cfg.workdir = str(tmp_path / "straight")
    straight = train.run(cfg)

    cfg.workdir = str(tmp_path / "killed")
    cfg.ei.n_ei_steps = 1
    train.run(cfg)
    cfg.ei.n_ei_steps = 2  # the same run, continued (as after a kill at step 2)
    resumed = train.run(cfg)
    assert resumed["resumed_from"] == 1
    for key in ("warmstart_loss", "eval_before"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key


def test_an_unknown_config_field_is_one_line_with_the_closest_names(tmp_path):
    cmd = [sys.executable, "-m", "jaxalign.train", "--config",
           str(REPO_ROOT / "configs/grpo.py"), "--config.grpo.loss=x"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("config error: unknown field config.grpo.loss")
    assert "did you mean config.grpo.loss_type" in out.stderr
    out = subprocess.run(cmd[:-1] + ["--config.train.steps=abc"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_workdir_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = _sft_config(tmp_path)
    cfg.workdir = str(tmp_path / "a_file" / "run")
    with pytest.raises(ConfigError, match="cannot write the run directory"):
        train.run(cfg)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_once_and_keeps_the_last_good_checkpoint(tmp_path):
    """A real full disk: a 3 MiB tmpfs holds two checkpoints of the tiny model, not three."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "3m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        cmd = [sys.executable, "-m", "jaxalign.train", "--config",
               str(REPO_ROOT / "configs/sft.py"), "--config.data.source=synthetic",
               "--config.data.num_train=200", f"--config.data.template={DEMO_TEMPLATE}",
               "--config.train.steps=40", "--config.train.batch_size=8",
               "--config.train.seq_buckets=(96,)", "--config.eval.every=0",
               "--config.eval.num_examples=2", "--config.eval.max_tokens=8",
               "--config.eval.num_workers=0", "--config.checkpoint.save_every=5",
               "--config.checkpoint.max_to_keep=3", "--config.log.wandb_mode=disabled",
               "--config.log.progress=False", f"--config.workdir={disk / 'run'}"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                             timeout=600)
        assert out.returncode == 1, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 5, out.stderr
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("checkpoint error:")]
        assert f"to {disk / 'run' / 'checkpoints'} failed" in line and "MiB free" in line
        good = int(line.split("the last good checkpoint is step ")[1].split(",")[0])
        failed = int(line.split("saving checkpoint step ")[1].split(" ")[0])
        assert good < failed and good in checkpoint.checkpoint_steps(disk / "run")
        assert not (disk / "run" / "summary.json").exists()

        # with space again, the same command resumes from the last good checkpoint
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads((disk / "run" / "summary.json").read_text())
        assert summary["resumed_from"] == good
        assert _steps(disk / "run" / "metrics.jsonl", "train/loss") == list(range(1, 41))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
