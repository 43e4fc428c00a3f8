"""SFT: the loss, an end-to-end run whose loss falls, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from cfg_helpers import REPO_ROOT, load_config, shrink

from jaxalign import train
from jaxalign.algorithms import sft
from jaxalign.config import ConfigError
from jaxalign.logging import read_metrics


def test_sft_loss_is_mean_nll_of_response_tokens():
    """Against a hand computation on a fixed 'model' (a lookup of logits)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
    batch = {
        "input_ids": jnp.zeros((2, 4), jnp.int32),
        "labels": jnp.asarray([[1, 2, 3, 4], [5, 6, 0, 0]], jnp.int32),
        "response_mask": jnp.asarray([[0, 1, 1, 1], [1, 1, 0, 0]], bool),
    }
    model = lambda ids: jnp.asarray(logits)  # noqa: E731
    loss, meta = sft.sft_loss_fn()(model, batch)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(batch["labels"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["response_mask"])
    assert float(loss) == pytest.approx(-picked[mask].mean(), rel=1e-6)
    assert float(meta["num_response_tokens"]) == 5
    loss_c, _ = sft.sft_loss_fn(normalize_constant=2.0)(model, batch)  # CS336's form
    want = -np.mean([(picked[0] * mask[0]).sum() / 2, (picked[1] * mask[1]).sum() / 2])
    assert float(loss_c) == pytest.approx(want, rel=1e-6)


def _sft_config(tmp_path):
    cfg = shrink(load_config("sft"), tmp_path)
    cfg.data.source = "synthetic"
    from jaxalign.data.synthetic import DEMO_TEMPLATE

    cfg.data.template = DEMO_TEMPLATE
    cfg.data.num_train, cfg.data.num_eval = 400, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = 30, 16, (96,)
    cfg.eval.every, cfg.eval.num_examples, cfg.eval.max_tokens = 0, 4, 16
    cfg.eval.num_workers = 0
    cfg.optim.lr = 3e-3
    return cfg


def test_sft_run_loss_falls_and_writes_the_run_dir(tmp_path):
    cfg = _sft_config(tmp_path)
    cfg.checkpoint.export_hf = True
    summary = train.run(cfg)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["train/loss"], records[-1]["train/loss"]
    assert last < 0.6 * first, (first, last)
    assert summary["eval_after"] is not None
    for name in ("summary.json", "config.json", "curves.png", "generations.jsonl", "hf"):
        assert (tmp_path / "run" / name).exists(), name
    from jaxalign.models import from_pretrained

    assert from_pretrained(str(tmp_path / "run" / "hf")).config.num_hidden_layers == 2


def test_sft_config_errors(tmp_path):
    cfg = _sft_config(tmp_path)
    cfg.optim.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="not divisible by config.optim.grad_accum_steps=3"):
        train.validate(cfg)
    cfg = _sft_config(tmp_path)
    cfg.data.source = "gsm8k"
    cfg.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="gsm8k/train.jsonl not found"):
        train.validate(cfg)


def test_sft_tiny_preset_trains_on_gsm8k_traces(tmp_path, shared_data):
    cfg = shrink(load_config("sft"), tmp_path)
    cfg.model.arch = dict(max_position_embeddings=2048)  # the preset's: rows reach 1024 tokens
    cfg.data.data_dir = str(shared_data)
    cfg.data.num_train, cfg.data.num_eval = 64, 2
    cfg.train.steps, cfg.train.batch_size = 4, 8
    cfg.eval.num_examples, cfg.eval.max_tokens, cfg.eval.num_workers = 2, 8, 0
    summary = train.run(cfg)
    assert summary["steps"] == 4 and np.isfinite(summary["final_train_loss"])


def _cli(workdir, steps, env):
    return [sys.executable, "-m", "jaxalign.train", "--config", str(REPO_ROOT / "configs/sft.py"),
            "--config.data.source=synthetic", "--config.data.num_train=400",
            "--config.data.template=User: What is {question}?\nAssistant: <think>",
            f"--config.train.steps={steps}", "--config.train.batch_size=16",
            "--config.train.seq_buckets=(96,)", "--config.eval.every=0",
            "--config.eval.num_examples=2", "--config.eval.max_tokens=8",
            "--config.eval.num_workers=0", "--config.checkpoint.save_every=5",
            "--config.checkpoint.async_save=False", "--config.checkpoint.export_hf=False",
            "--config.log.wandb_mode=disabled", "--config.log.progress=False",
            f"--config.workdir={workdir}"]


@pytest.mark.slow
def test_sigkilled_sft_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    steps = 60
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, steps, env), env=env, check=True, cwd=REPO_ROOT,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, steps, env), env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= 12 for r in read_metrics(metrics)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"

    subprocess.run(_cli(killed, steps, env), env=env, check=True, cwd=REPO_ROOT,
                   capture_output=True)
    summary = json.loads((killed / "summary.json").read_text())
    assert 10 <= summary["resumed_from"] < steps and summary["resumed_from"] % 5 == 0

    def losses(d):
        return {r["step"]: r["train/loss"] for r in read_metrics(d / "metrics.jsonl")
                if "train/loss" in r}

    # the steps the killed attempt logged after its checkpoint were dropped and logged again
    logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "train/loss" in r]
    assert logged == list(range(1, steps + 1))
    want, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_any_checkpoint_step_exports_to_a_hf_directory(tmp_path, capsys):
    """``python -m jaxalign.checkpoint export RUN --step N``: the last step equals the run's
    own ``hf/`` export, an earlier step differs, a missing step is refused by name."""
    from jaxalign import checkpoint
    from jaxalign.models import from_pretrained

    cfg = _sft_config(tmp_path)
    cfg.train.steps, cfg.checkpoint.save_every, cfg.checkpoint.max_to_keep = 6, 3, 3
    cfg.checkpoint.export_hf = True
    train.run(cfg)
    run_dir = tmp_path / "run"
    assert checkpoint.checkpoint_steps(run_dir) == [3, 6]
    for step in (3, 6):
        checkpoint.main(["export", str(run_dir), "--step", str(step),
                         "--out", str(tmp_path / f"hf{step}")])

    def weights(d):
        import jax
        from flax import nnx

        return jax.tree.leaves(nnx.state(from_pretrained(str(d)), nnx.Param))

    final = weights(run_dir / "hf")
    six, three = weights(tmp_path / "hf6"), weights(tmp_path / "hf3")
    assert all(np.array_equal(a, b) for a, b in zip(final, six, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(final, three, strict=True))
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", str(run_dir), "--step", "4", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "no step 4; saved steps: [3, 6]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_remote_workdir_gets_the_logs_at_every_checkpoint(tmp_path, monkeypatch):
    """A run killed between checkpoints (SIGKILL and preemption run no ``finally``) already
    has its logs up to the last checkpoint in the remote workdir; a rerun on a fresh
    machine copies them down and appends."""
    from jaxalign import rundir, storage

    bucket = tmp_path / "bucket"  # stands in for gs://: epath copies local paths alike
    monkeypatch.setattr(storage, "is_remote", lambda path: str(path).startswith(str(bucket)))
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    cfg = _sft_config(tmp_path)
    cfg.workdir = str(bucket / "run")
    cfg.train.steps, cfg.checkpoint.save_every = 4, 2
    seen = {}
    real_save = rundir.RunState.save

    def save_and_look(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        if step % 2:
            return  # not a checkpoint step
        remote = bucket / "run" / "metrics.jsonl"
        seen[step] = [r["step"] for r in read_metrics(remote) if "train/loss" in r]
        assert not (bucket / "run" / "hf").exists()  # the export goes up at the end only

    monkeypatch.setattr(rundir.RunState, "save", save_and_look)
    train.run(cfg)
    assert seen[2] == [1, 2] and seen[4] == [1, 2, 3, 4]
    staged = storage.staging_dir(cfg.workdir)
    remote_log = (bucket / "run" / "metrics.jsonl").read_bytes()
    assert (staged / "metrics.jsonl").read_bytes() == remote_log

    # A fresh machine resumes: it copies the logs down (not the HF export) and goes on.
    import shutil

    shutil.rmtree(staged)
    cfg.train.steps = 6
    train.run(cfg)
    steps = [r["step"] for r in read_metrics(bucket / "run" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
