"""GRPO: batch construction, advantages bookkeeping, config checks, end-to-end runs, resume."""

import json

import jax
import numpy as np
import pytest
from cfg_helpers import fake_score, load_config, shrink

from jaxalign import evaluation, train
from jaxalign.algorithms import grpo
from jaxalign.config import ConfigError
from jaxalign.logging import read_metrics
from jaxalign.models import build
from jaxalign.rollout import Completion

# --- pure pieces --------------------------------------------------------------------------


def _completion(ids, logprobs=None, finish="stop"):
    return Completion(text="", token_ids=ids, logprobs=logprobs, finish_reason=finish)


def test_build_rollout_batch_places_tokens_mask_and_sampler_log_probs():
    prompts = [[5, 6, 7], [8]]
    comps = [_completion([9, 10], [-0.5, -1.5]), _completion([11, 12, 13], [-1.0, -2.0, -3.0])]
    b = grpo.build_rollout_batch(prompts, comps, np.array([1.0, -1.0]), np.array([1.0, 0.0]),
                                 pad_id=0, width=5)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]])
    np.testing.assert_array_equal(b["labels"], [[6, 7, 9, 10, 0], [11, 12, 13, 0, 0]])
    np.testing.assert_array_equal(b["response_mask"], [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]])
    # the sampler's log-prob of a token sits where that token is the label
    np.testing.assert_allclose(b["sampler_log_probs"],
                               [[0, 0, -0.5, -1.5, 0], [-1.0, -2.0, -3.0, 0, 0]])
    assert b["advantages"].shape == (2, 1) and b["raw_rewards"].shape == (2, 1)


def test_build_rollout_batch_row_mask_and_width_error():
    prompts, comps = [[1, 2], [3, 4]], [_completion([5]), _completion([6])]
    b = grpo.build_rollout_batch(prompts, comps, np.zeros(2), np.zeros(2), pad_id=0, width=4,
                                 row_mask=np.array([True, False]))
    assert b["response_mask"][0].sum() == 1 and b["response_mask"][1].sum() == 0
    np.testing.assert_array_equal(b["input_ids"][1, :3], [3, 4, 6])  # tokens kept
    with pytest.raises(ValueError, match="exceed width"):
        grpo.build_rollout_batch([[1, 2, 3]], [_completion([4, 5])], np.zeros(1), np.zeros(1),
                                 pad_id=0, width=3)


def test_overlong_penalty_is_linear_over_the_buffer():
    p = grpo.overlong_penalty(np.array([10, 16, 18, 20]), max_tokens=20, buffer=4, coef=1.0)
    np.testing.assert_allclose(p, [0.0, 0.0, -0.5, -1.0])
    assert not grpo.overlong_penalty(np.array([20]), 20, 0, 1.0).any()


def test_zero_std_groups_and_bucket_width():
    raw = np.array([1, 1, 1, 1, 0, 1, 0, 0], np.float32)
    np.testing.assert_array_equal(grpo.zero_std_groups(raw, 4), [True] * 4 + [False] * 4)
    assert grpo.bucket_width(40, 32) == 64
    assert grpo.bucket_width(65, 32) == 64
    assert grpo.bucket_width(300, 32) == 320  # a multiple, whatever the step's rows


def test_micro_batches_keep_order():
    batch = {"x": np.arange(8)}
    assert [list(m["x"]) for m in grpo.micro_batches(batch, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]


# --- config checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rollout_batch_size", 18, "divisible by config.grpo.group_size"),
        ("train_batch_size", 2, r"must be >= config.grpo.group_size"),
        ("loss_type", "ppo", "choose one of"),
        ("old_log_probs", "cache", "choose 'trainer' or 'engine'"),
    ],
)
def test_cs336_constraints_are_checked_up_front(grpo_config, field, value, message):
    setattr(grpo_config.grpo, field, value)
    with pytest.raises(ConfigError, match=message):
        train.validate(grpo_config)


def test_train_batch_must_divide_by_accumulation(grpo_config):
    grpo_config.optim.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="divisible by config.optim.grad_accum_steps=3"):
        train.validate(grpo_config)


def test_mesh_that_does_not_match_devices_is_a_config_error(grpo_config):
    grpo_config.mesh.fsdp, grpo_config.mesh.tensor = 3, 1
    with pytest.raises(ConfigError, match=f"but {jax.device_count()} are available"):
        train.validate(grpo_config)


def test_missing_model_path_is_a_config_error(grpo_config):
    grpo_config.model.preset = ""
    grpo_config.model.path = "/nonexistent/qwen"
    with pytest.raises(ConfigError, match="no such directory"):
        train.validate(grpo_config)


# --- end to end -----------------------------------------------------------------------------


def test_two_grpo_steps_run_and_write_the_run_dir(grpo_config, monkeypatch):
    monkeypatch.setattr(evaluation, "score", fake_score)
    grpo_config.grpo.loss_type = "grpo_clip"
    grpo_config.grpo.epochs_per_rollout_batch = 2
    summary = train.run(grpo_config)
    run_dir = grpo_config.workdir
    assert summary["grpo_steps"] == 2 and summary["eval_before"] is not None
    saved = json.loads(open(f"{run_dir}/summary.json").read())
    assert saved["eval_after"] == summary["eval_after"]
    records = {r["step"]: r for r in read_metrics(f"{run_dir}/metrics.jsonl") if "train/loss" in r}
    assert sorted(records) == [1, 2]
    for r in records.values():
        assert np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        # trainer and engine score the same sampled tokens alike (same weights, fp32)
        assert r["drift/logprob_diff_mean"] < 1e-4
        assert 0 <= r["train/clip_fraction"] <= 1
    import os

    assert os.path.exists(f"{run_dir}/curves.png")


def test_old_log_probs_are_computed_once_and_equal_the_sampler(grpo_config, monkeypatch):
    """Old log-probs come from one forward before any update; epochs reuse them."""
    monkeypatch.setattr(evaluation, "score", fake_score)
    grpo_config.grpo.loss_type = "grpo_clip"
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    prompt_ids, completions, scores, _ = g.rollout(1, grpo_config.grpo.group_size)
    batch, _ = g.make_batch(prompt_ids, completions, scores)
    g.add_old_log_probs(batch)
    old = batch["old_log_probs"].copy()
    m = batch["response_mask"]
    np.testing.assert_allclose(old[m], batch["sampler_log_probs"][m], atol=1e-4)
    calls = []
    orig = g.log_prob_fn
    g.log_prob_fn = lambda *a: calls.append(1) or orig(*a)
    grpo_config.grpo.epochs_per_rollout_batch = 2
    g.train_on(batch)
    assert not calls  # epochs never recompute the old log-probs
    np.testing.assert_array_equal(batch["old_log_probs"], old)
    g.run.close()


def test_engine_old_log_probs_turn_on_tis_for_reinforce(grpo_config, monkeypatch):
    monkeypatch.setattr(evaluation, "score", fake_score)
    grpo_config.grpo.old_log_probs = "engine"
    # One update per rollout batch: the policy still equals the sampler, so every weight is 1
    # (after an update the on-policy weight exp(policy - sampler) moves off 1, as documented).
    grpo_config.grpo.train_batch_size = grpo_config.grpo.rollout_batch_size
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    assert g.use_tis and not g.use_old
    metrics = g.step(1)
    assert metrics["train/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    g.run.close()


def test_filters_mask_zero_std_groups_and_truncated(grpo_config, monkeypatch):
    monkeypatch.setattr(evaluation, "score", lambda r, a, reward, n: [
        {"reward": 1.0, "answer_reward": 1.0, "format_reward": 1.0} for _ in r])
    grpo_config.grpo.filter_zero_std_groups = True
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    prompt_ids, completions, scores, _ = g.rollout(1, grpo_config.grpo.group_size)
    batch, metrics = g.make_batch(prompt_ids, completions, scores)
    assert metrics["train/frac_reward_zero_std"] == 1.0
    assert metrics["train/rows_with_gradient"] == 0.0 and not batch["response_mask"].any()
    g.run.close()


def test_killed_grpo_run_resumes_with_the_same_data_and_rng(grpo_config, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "score", fake_score)
    grpo_config.grpo.n_grpo_steps = 4
    grpo_config.checkpoint.save_every = 2
    grpo_config.workdir = str(tmp_path / "straight")
    train.run(grpo_config)
    straight = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
                if "train/loss" in r}

    grpo_config.workdir = str(tmp_path / "killed")
    original = grpo.GRPO.step

    def dies_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return original(self, step)

    monkeypatch.setattr(grpo.GRPO, "step", dies_at_3)
    with pytest.raises(KeyboardInterrupt):
        train.run(grpo_config)
    monkeypatch.setattr(grpo.GRPO, "step", original)
    summary = train.run(grpo_config)
    assert summary["resumed_from"] == 2
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")
               if "train/loss" in r}
    for step in (3, 4):
        for key in ("train/loss", "train/reward", "train/response_length"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-6)


def test_sharded_grpo_matches_single_device(grpo_config, tmp_path, monkeypatch):
    """2 GRPO steps on 8 devices (fsdp 2 x tensor 4) equal a run on one device."""
    monkeypatch.setattr(evaluation, "score", fake_score)
    from jaxalign import sharding

    results = {}
    for name, (fsdp, tensor, devices) in {"one": (1, 1, 1), "eight": (2, 4, 8)}.items():
        monkeypatch.setattr(sharding, "mesh_from_config", lambda cfg, f=fsdp, t=tensor, d=devices:
                            sharding.make_mesh(1, f, t, devices=jax.devices()[:d]))
        grpo_config.workdir = str(tmp_path / name)
        train.run(grpo_config)
        results[name] = {r["step"]: r for r in read_metrics(tmp_path / name / "metrics.jsonl")
                         if "train/loss" in r}
    for step in (1, 2):
        for key in ("train/loss", "train/grad_norm", "train/reward"):
            assert results["eight"][step][key] == pytest.approx(results["one"][step][key],
                                                                rel=1e-4, abs=1e-6)


def test_real_preset_validates_with_cs336_settings():
    cfg = load_config("grpo", "qwen2p5_math_1p5b")
    g = cfg.grpo
    assert (cfg.optim.lr, g.rollout_batch_size, g.group_size, cfg.sampling.max_tokens) == (
        1e-5, 256, 8, 1024)
    assert cfg.sampling.min_tokens == 4 and cfg.sampling.stop == ("</answer>",)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (0.9, 0.95, 0.0)
    qo = load_config("grpo", "qwen2p5_math_1p5b_question_only")
    assert qo.data.reward == "question_only" and qo.data.template == "question_only"


def test_shrunk_config_is_valid(grpo_config, tmp_path):
    train.validate(shrink(grpo_config, tmp_path))


def test_warm_start_runs_once_and_a_resume_skips_it(grpo_config, tmp_path, monkeypatch):
    """The demo's SFT warm start: logged to warmstart.jsonl, reported in the summary, and not
    repeated when the run resumes (the checkpoint already holds the warm-started policy)."""
    monkeypatch.setattr(evaluation, "score", fake_score)
    grpo_config.warmstart.sft_steps, grpo_config.warmstart.batch_size = 4, 8
    grpo_config.warmstart.slip_rate = 0.5
    grpo_config.grpo.n_grpo_steps = 1
    summary = train.run(grpo_config)
    run_dir = tmp_path / "run"
    steps = [r["step"] for r in read_metrics(run_dir / "warmstart.jsonl")]
    assert steps == [1, 2, 3, 4] and np.isfinite(summary["warmstart_loss"])

    grpo_config.grpo.n_grpo_steps = 2
    resumed = train.run(grpo_config)
    assert resumed["resumed_from"] == 1
    assert [r["step"] for r in read_metrics(run_dir / "warmstart.jsonl")] == steps
    assert resumed["warmstart_loss"] == summary["warmstart_loss"]
    assert resumed["eval_before"] == summary["eval_before"]


def test_grpo_through_a_jax_sidecar_matches_the_in_process_engine(grpo_config, tmp_path,
                                                                  monkeypatch):
    """``engine.backend='sidecar'``: weights exported to ``engine.export_dir`` and reloaded
    by a real sidecar process every step; one sidecar samples what the in-process engine
    samples, so the two runs agree step by step."""
    import subprocess
    import sys
    import urllib.request

    from jaxalign.models import save_pretrained
    from jaxalign.rollout.server import LISTENING

    monkeypatch.setattr(evaluation, "score", fake_score)
    model, tokenizer = build.build_model_and_tokenizer(grpo_config.model)
    save_pretrained(model, tmp_path / "start", tokenizer=tokenizer)
    grpo_config.workdir = str(tmp_path / "in_process")
    train.run(grpo_config)

    env = dict(__import__("os").environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAXALIGN_SIDECAR_TOKEN", None)
    cmd = [sys.executable, "-m", "jaxalign.rollout.server", "--backend", "jax", "--model",
           str(tmp_path / "start"), "--port", "0", "--dtype", grpo_config.model.dtype,
           "--weights-root", str(tmp_path / "exports")]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith(LISTENING), line
        url = line[len(LISTENING):].strip()
        grpo_config.engine.backend, grpo_config.engine.urls = "sidecar", url
        grpo_config.engine.export_dir = str(tmp_path / "exports")
        grpo_config.workdir = str(tmp_path / "sidecar")
        train.run(grpo_config)
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())
    finally:
        server.kill()
        server.wait()
    runs = {name: {r["step"]: r for r in read_metrics(tmp_path / name / "metrics.jsonl")
                   if "train/loss" in r} for name in ("in_process", "sidecar")}
    for step in (1, 2):
        for key in ("train/reward", "train/response_length", "train/loss"):
            assert runs["sidecar"][step][key] == pytest.approx(runs["in_process"][step][key],
                                                               rel=1e-4, abs=1e-5), (step, key)
    # start + one sync per step; only the newest export is kept, where the config said
    assert health["weights_version"] == 3
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["v00000003"]
