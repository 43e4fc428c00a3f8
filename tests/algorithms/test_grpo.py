"""GRPO: batch construction, advantages bookkeeping, config checks, end-to-end runs, resume.

The end-to-end runs score with a user reward a random tiny model can earn, named in the
config as a user names theirs (``data.reward="my_rewards:even_e"``, the module
``tests/verify/my_rewards.py`` on the path), where the real verifier gives 0 everywhere.
"""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from cfg_helpers import REPO_ROOT, load_config, shrink

from jaxalign import train
from jaxalign.algorithms import grpo
from jaxalign.config import ConfigError
from jaxalign.logging import read_metrics
from jaxalign.models import build
from jaxalign.rollout import Completion
from jaxalign.verify import resolve_reward

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


@pytest.fixture
def user_reward(grpo_config, monkeypatch):
    """Puts ``tests/verify/my_rewards.py`` on the path and scores with ``my_rewards:even_e``
    (an even number of 'e's: a reward a random tiny model can earn)."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "verify"))
    grpo_config.data.reward = "my_rewards:even_e"
    return grpo_config


@pytest.mark.parametrize("spec, message", [
    ("r1", r"config.data.reward='r1': unknown reward 'r1': name a registered reward "
           r"\(question_only, r1_zero, s1\)"),
    ("r1_zero + 0.1*no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("r1_zero +", "cannot read reward spec"),
])
def test_bad_reward_specs_are_config_errors(grpo_config, spec, message):
    grpo_config.data.reward = spec
    with pytest.raises(ConfigError, match=message):
        train.validate(grpo_config)


def test_cli_resolves_a_user_reward_from_the_run_folder(tmp_path):
    """``--config.data.reward="r1_zero + 0.1*<module in the current folder>:fn"`` passes the
    checks; a missing function is one ``config error:`` line."""
    (tmp_path / "folder_rewards.py").write_text(
        "def length_penalty(response, ground_truth, *, timeout):\n"
        "    return -len(response) / 100\n")
    base = [sys.executable, "-m", "jaxalign.train", "--config", str(REPO_ROOT / "configs/grpo.py"),
            "--print_config"]
    ok = subprocess.run(base + ["--config.data.reward=r1_zero + 0.1*folder_rewards:length_penalty"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["data"]["reward"] == "r1_zero + 0.1*folder_rewards:length_penalty"
    bad = subprocess.run(base + ["--config.data.reward=r1_zero + 0.1*folder_rewards:nope"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("config error:")]
    assert "has no attribute 'nope'; the functions it defines: length_penalty" in line


# --- end to end -----------------------------------------------------------------------------


def test_two_grpo_steps_run_and_write_the_run_dir(user_reward):
    grpo_config = user_reward
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


def test_a_weighted_user_reward_scored_in_workers_logs_each_term(user_reward):
    """``data.reward`` a weighted sum of user functions, scored in a verifier worker process
    (which imports ``my_rewards`` by the parent's sys.path): the reward is the weighted sum
    and each term is logged, in training and in validation."""
    grpo_config = user_reward
    grpo_config.data.reward = "my_rewards:even_e - 0.1*my_rewards:length_penalty"
    grpo_config.eval.num_workers = 1
    grpo_config.grpo.n_grpo_steps = 1
    train.run(grpo_config)
    rows = read_metrics(f"{grpo_config.workdir}/metrics.jsonl")
    (r,) = [r for r in rows if "train/loss" in r]
    assert r["train/reward/length_penalty"] < 0 <= r["train/reward/even_e"] <= 1
    assert r["train/reward"] == pytest.approx(r["train/reward/even_e"]
                                              - 0.1 * r["train/reward/length_penalty"])
    evals = [r for r in rows if "eval/reward" in r]
    assert evals and all({"eval/reward/even_e", "eval/reward/length_penalty"} <= set(e)
                         for e in evals)
    generations = [json.loads(line) for line in
                   open(f"{grpo_config.workdir}/generations.jsonl")]
    assert all("reward/even_e" in g for g in generations)


def test_old_log_probs_are_computed_once_and_equal_the_sampler(user_reward):
    """Old log-probs come from one forward before any update; epochs reuse them."""
    grpo_config = user_reward
    grpo_config.grpo.loss_type = "grpo_clip"
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    batch, _ = g.make_batch(g.rollout(1, grpo_config.grpo.group_size))
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


def test_engine_old_log_probs_turn_on_tis_for_reinforce(user_reward):
    grpo_config = user_reward
    grpo_config.grpo.old_log_probs = "engine"
    # One update per rollout batch: the policy still equals the sampler, so every weight is 1
    # (after an update the on-policy weight exp(policy - sampler) moves off 1, as documented).
    grpo_config.grpo.train_batch_size = grpo_config.grpo.rollout_batch_size
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    assert g.use_tis and not g.use_old
    metrics = g.step(1)
    assert metrics["train/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    g.run.close()


def test_filters_mask_zero_std_groups_and_truncated(user_reward):
    grpo_config = user_reward
    grpo_config.data.reward = "my_rewards:solved"  # every response right: no signal
    grpo_config.grpo.filter_zero_std_groups = True
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    batch, metrics = g.make_batch(g.rollout(1, grpo_config.grpo.group_size))
    assert metrics["train/frac_reward_zero_std"] == 1.0
    assert metrics["train/rows_with_gradient"] == 0.0 and not batch["response_mask"].any()
    g.run.close()


def test_killed_grpo_run_resumes_with_the_same_data_and_rng(user_reward, tmp_path, monkeypatch):
    grpo_config = user_reward
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


def test_sharded_grpo_matches_single_device(user_reward, tmp_path, monkeypatch):
    """2 GRPO steps on 8 devices (fsdp 2 x tensor 4) equal a run on one device."""
    grpo_config = user_reward
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


def test_warm_start_runs_once_and_a_resume_skips_it(user_reward, tmp_path):
    """The demo's SFT warm start: logged to warmstart.jsonl, reported in the summary, and not
    repeated when the run resumes (the checkpoint already holds the warm-started policy)."""
    grpo_config = user_reward
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


def test_grpo_through_a_jax_sidecar_matches_the_in_process_engine(user_reward, tmp_path):
    """``engine.backend='sidecar'``: weights exported to ``engine.export_dir`` and reloaded
    by a real sidecar process every step; one sidecar samples what the in-process engine
    samples, so the two runs agree step by step."""
    import urllib.request

    from jaxalign.models import save_pretrained
    from jaxalign.rollout.server import LISTENING

    grpo_config = user_reward
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


def test_several_validation_sets_are_each_logged_under_their_name(user_reward, tmp_path):
    """``eval.sets``: each set evaluated with the data source's held-out set at every
    evaluation, logged as ``eval/<name>/*``, in the summary and in generations.jsonl."""
    grpo_config = user_reward
    for name, n in (("arith_a", 5), ("arith_b", 3)):
        rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo_config.eval.sets = f"{tmp_path / 'arith_a.jsonl'}:2, {tmp_path / 'arith_b.jsonl'}"
    grpo_config.grpo.n_grpo_steps = 1
    summary = train.run(grpo_config)
    evals = [r for r in read_metrics(f"{grpo_config.workdir}/metrics.jsonl")
             if "eval/answer_reward" in r]
    assert [r["step"] for r in evals] == [0, 1]  # before training and at the last step
    for r in evals:
        assert {"eval/arith_a/answer_reward", "eval/arith_b/answer_reward",
                "eval/arith_a/reward/even_e"} <= set(r)
    assert set(summary["eval_after_sets"]) == {"arith_a", "arith_b"}
    assert summary["eval_after_sets"]["arith_a"] == evals[-1]["eval/arith_a/answer_reward"]
    generations = [json.loads(line) for line in open(f"{grpo_config.workdir}/generations.jsonl")]
    assert {g.get("set") for g in generations} == {None, "arith_a", "arith_b"}
    assert len([g for g in generations if g.get("set") == "arith_a"]) == 2 * 2  # :2, twice


@pytest.mark.parametrize("sets, message", [
    ("gsm8k:0", "the limit :0 must be >= 1"),
    ("gsm8k,gsm8k:4", "a second set named 'gsm8k'"),
    ("mmlu", "a benchmark (gsm8k, math500"),
    ("/nowhere/val.jsonl", "config.eval.sets: /nowhere/val.jsonl"),
])
def test_bad_validation_sets_are_config_errors(grpo_config, sets, message):
    grpo_config.eval.sets = sets
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.validate(grpo_config)


def test_dynamic_sampling_refills_the_batch_with_informative_groups(user_reward):
    """DAPO's published dynamic sampling (``max_resample_rounds``): zero-std groups are
    replaced by further prompts' groups until the batch is full of informative ones; the
    batch keeps its static size, and when the rounds run out zero-std groups fill in, masked."""
    grpo_config = user_reward
    grpo_config.data.reward = "my_rewards:even_answer_or_even_e"
    grpo_config.grpo.filter_zero_std_groups = True
    grpo_config.grpo.max_resample_rounds = 6
    n = grpo_config.grpo.group_size
    g = grpo.GRPO(grpo_config, train.prepare_run_dir(grpo_config))
    calls = []
    original = g.rollout
    g.rollout = lambda step, k, attempt=0: calls.append(attempt) or original(step, k, attempt)
    rollouts, metrics = g.rollout_informative(1)
    assert len(rollouts.completions) == grpo_config.grpo.rollout_batch_size
    assert metrics["train/resample_rounds"] >= 1 and calls == list(range(len(calls)))
    assert metrics["train/informative_groups"] == 1.0
    rewards = np.array([sc["reward"] for sc in rollouts.scores]).reshape(-1, n)
    assert (rewards.max(axis=1) > rewards.min(axis=1)).all()  # every group carries signal
    batch, batch_metrics = g.make_batch(rollouts)
    assert batch_metrics["train/rows_with_gradient"] == 1.0
    # No signal anywhere: every round is spent, the batch is all masked zero-std groups.
    g.reward = resolve_reward("my_rewards:solved")
    calls.clear()
    rollouts, metrics = g.rollout_informative(2)
    assert calls == list(range(7)) and metrics["train/resample_rounds"] == 6
    assert metrics["train/informative_groups"] == 0.0
    assert len(rollouts.completions) == grpo_config.grpo.rollout_batch_size
    g.run.close()
    grpo_config.grpo.filter_zero_std_groups = False
    with pytest.raises(ConfigError, match="only with grpo.filter_zero_std_groups=True"):
        train.validate(grpo_config)
