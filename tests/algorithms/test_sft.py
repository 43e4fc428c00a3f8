"""SFT: the loss, an end-to-end run whose loss falls, and resume after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
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


def test_packed_sft_learns_and_spans_its_epochs_in_packed_rows(tmp_path, capsys):
    """train.packing: rows of max(seq_buckets) filled with whole sequences; the loss falls
    as unpacked, and train.epochs counts packed rows (fewer steps than unpacked)."""
    cfg = _sft_config(tmp_path)
    cfg.train.packing, cfg.train.seq_buckets, cfg.train.batch_size = True, (192,), 8
    cfg.train.steps, cfg.train.epochs = 0, 1.0
    summary = train.run(cfg)
    out = capsys.readouterr().out
    assert re.search(r"SFT packing: 39\d sequences in \d+ rows of 192 positions", out), out
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert summary["steps"] == len(records) < 400 / 8 / 2  # each row holds several
    assert records[-1]["train/loss"] < 0.6 * records[0]["train/loss"]
    assert summary["epochs"] == pytest.approx(1.0, abs=0.05)


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
            "--config.eval.at_start=True",
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
    # the validation before training came back with the checkpoint (not run again, not lost)
    straight_summary = json.loads((straight / "summary.json").read_text())
    assert summary["eval_before"] is not None
    assert summary["eval_before"] == straight_summary["eval_before"]
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")
            if "eval/answer_reward" in r] == [0, steps]

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


# --- training length in epochs, chat templates, the s1 recipe ----------------------------


def test_epochs_set_the_steps_and_conflicts_are_refused(tmp_path):
    import ml_collections

    t = ml_collections.ConfigDict(dict(steps=0, epochs=5.0, batch_size=16))
    assert sft.train_steps(t, 1000) == 313  # ceil(5 * 1000 / 16): s1K at s1's batch
    t.epochs = 0.5
    assert sft.train_steps(t, 10) == 1
    t.steps, t.epochs = 7, 0.0
    assert sft.train_steps(t, 1000) == 7
    cfg = _sft_config(tmp_path)
    cfg.train.epochs = 2.0  # steps=30 still set: which one is meant?
    with pytest.raises(ConfigError, match=r"config.train.epochs=2.0 and config.train.steps=30 "
                       r"both set the run's length: set config.train.steps=0"):
        train.validate(cfg)
    cfg.train.steps = 0
    train.validate(cfg)
    cfg.train.epochs = -1.0
    with pytest.raises(ConfigError, match="config.train.epochs=-1.0 must be >= 0"):
        train.validate(cfg)
    cfg.train.epochs = 0.0
    with pytest.raises(ConfigError, match="or set config.train.epochs > 0"):
        train.validate(cfg)


def test_chat_template_config_errors(tmp_path, shared_data):
    cfg = shrink(load_config("sft"), tmp_path)
    cfg.data.data_dir = str(shared_data)
    cfg.data.template, cfg.data.reward = "chat", "question_only"
    # the tiny preset's byte tokenizer has no chat template: refused before anything loads
    with pytest.raises(ConfigError, match="needs the model tokenizer's chat template, and the "
                       "random preset model.preset='tiny' uses the byte tokenizer"):
        train.validate(cfg)
    cfg.model.preset, cfg.model.path = "", "Qwen/Qwen2.5-32B-Instruct"
    train.validate(cfg)
    cfg.data.reward = "r1_zero"
    with pytest.raises(ConfigError, match="set config.data.reward=question_only"):
        train.validate(cfg)
    # any system prompt: validation builds its prompts with the same one
    cfg.data.reward, cfg.data.system_prompt = "question_only", ""
    train.validate(cfg)
    cfg.data.template = "s1"
    with pytest.raises(ConfigError, match="set config.data.template=chat and config.data.fields"):
        train.validate(cfg)
    cfg.data.template = "r1_zero"
    with pytest.raises(ConfigError, match="config.data.system_prompt='' applies to "
                       "config.data.template='chat' only"):
        train.validate(cfg)


S1_ROWS = [
    {"question": f"What is {a} + {b}?",
     "thinking_trajectories": [f"We add {a} and {b}. " * 3 + f"That makes {a + b}."],
     "attempt": f"The answer is $\\boxed{{{a + b}}}$."}
    for a, b in [(2, 3), (4, 4), (10, 7), (6, 1), (9, 9), (3, 8)]
]


def _s1_dataset(tmp_path):
    """Six s1K-shaped rows as a ``Dataset.save_to_disk`` folder (s1K is a Hub dataset)."""
    hf = pytest.importorskip("datasets")
    folder = tmp_path / "s1k"
    hf.Dataset.from_list(S1_ROWS).save_to_disk(str(folder))
    return f"hf:{folder}"


def test_s1_preset_holds_the_papers_settings_and_validates(tmp_path, monkeypatch):
    cfg = load_config("sft", "s1")
    assert cfg.model.path == "Qwen/Qwen2.5-32B-Instruct" and cfg.model.preset == ""
    assert (cfg.optim.lr, cfg.optim.lr_min, cfg.optim.warmup_ratio, cfg.optim.schedule) == (
        1e-5, 0.0, 0.05, "cosine")
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (0.9, 0.95, 1e-4)
    assert (cfg.train.epochs, cfg.train.steps, cfg.train.batch_size) == (5.0, 0, 16)
    assert cfg.train.truncate == "error" and max(cfg.train.seq_buckets) == 32768
    assert (cfg.data.template, cfg.data.system_prompt) == ("chat", "")
    assert cfg.data.fields == "prompt=question,thinking=thinking_trajectories,response=attempt"
    # s1K is on the Hub; here a local folder of s1K-shaped rows stands in. The preset targets
    # GPUs (cuDNN attention): validate it as on one.
    cfg.data.source = _s1_dataset(tmp_path)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    train.validate(cfg)
    cfg.data.fields = "prompt=question,thinking=thinking,response=attempt"
    with pytest.raises(ConfigError, match="missing field 'thinking'"):
        train.validate(cfg)


@pytest.mark.slow
def test_s1_preset_trains_for_its_epochs_on_the_qwen_stand_in(
        tmp_path, qwen2p5_math_2layer_dir, capsys):
    """The s1 preset end to end on the cut-down Qwen2.5 model, its tokenizer given Qwen2.5's
    chat template: s1-shaped rows, chat template, steps from epochs, no row cut."""
    from chat_tokenizer import with_chat_template

    model_dir = with_chat_template(qwen2p5_math_2layer_dir, tmp_path / "model")
    cfg = load_config("sft", "s1")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.source = _s1_dataset(tmp_path)
    cfg.model.path = str(model_dir)
    cfg.model.dtype = cfg.model.param_dtype = "float32"
    cfg.model.attention_impl, cfg.model.remat = "xla", "none"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg.train.loss_chunk_size = 128
    cfg.train.batch_size, cfg.train.epochs = 4, 1.0  # 6 rows: ceil(1 * 6 / 4) = 2 steps
    cfg.train.seq_buckets = (64,)  # rows are ~110 tokens: truncate='error' names the cuts
    cfg.log.wandb_mode, cfg.log.progress = "disabled", False
    cfg.checkpoint.async_save, cfg.checkpoint.export_hf = False, False
    train.validate(cfg)
    with pytest.raises(ConfigError, match=r"config.train.truncate='error' cuts no row, .*6 rows, "
                       r"longest \d+ tokens .*rows longer than each width: \{64: 6\}"):
        train.run(cfg)
    cfg.train.seq_buckets = (128, 256)
    summary = train.run(cfg)
    assert summary["steps"] == 2 and summary["epochs"] == pytest.approx(8 / 6)
    out = capsys.readouterr().out
    assert "train.epochs=1 over 6 rows at batch 4: 2 optimizer steps" in out
    assert "rows longer than each width: {128: 0, 256: 0}" in out
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    # The schedule spans the 2 steps: warm-up (5% of 2 rounds to 0 steps), cosine to 0.
    assert records[0]["train/lr"] == pytest.approx(1e-5) and records[1]["train/lr"] < 1e-5
    assert np.isfinite(summary["final_train_loss"])
