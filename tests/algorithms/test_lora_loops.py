"""LoRA in the training loops (``config.lora.rank > 0``): only the adapters train, the
engine samples the adapted weights, a resumed run is exact, the exports load, and bad
``config.lora`` values are one-line errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cfg_helpers import load_config, shrink, synthetic_sft
from flax import nnx
from test_dpo import _dpo_config

from jaxalign import checkpoint, train
from jaxalign.algorithms import dpo, expert_iteration, grpo, sft
from jaxalign.algorithms.driver import drive
from jaxalign.config import ConfigError
from jaxalign.data import preferences
from jaxalign.logging import read_metrics
from jaxalign.models import build, from_pretrained, load_adapter, lora
from jaxalign.models.qwen2 import init_model, tiny
from jaxalign.trainer import Trainer


def _sft_config(tmp_path, steps=20, **lora_fields):
    cfg = synthetic_sft(tmp_path, steps)
    cfg.optim.lr = 1e-2  # adapters start at zero and want a larger step than full FT
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    for k, v in lora_fields.items():
        setattr(cfg.lora, k, v)
    return cfg


def _leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


def test_lora_sft_trains_only_the_adapters_and_exports_both_forms(tmp_path):
    cfg = _sft_config(tmp_path)
    cfg.checkpoint.export_hf = True
    algo = sft.SFT(cfg, train.prepare_run_dir(cfg))
    trainer = algo.trainer
    assert trainer.is_lora
    start_adapters = _leaves(trainer.params)
    summary = drive(algo)

    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    first, last = records[0]["train/loss"], records[-1]["train/loss"]
    assert last < 0.9 * first, (first, last)  # (5.68 -> 4.93 when written)
    assert summary["eval_after"] is not None  # validation sampled the merged policy

    # the frozen base is bit-identical to a fresh build (what a resume rebuilds)
    fresh, _ = build.build_model_and_tokenizer(cfg.model, lora=cfg.lora)
    base = nnx.state(fresh, lora.frozen_filter)
    assert jax.tree.structure(base) == jax.tree.structure(trainer.frozen[0])
    for a, b in zip(_leaves(base), _leaves(trainer.frozen[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    # the adapters moved (B from zero), and the optimizer holds state for them only
    assert any(not np.array_equal(a, b)
               for a, b in zip(start_adapters, _leaves(trainer.params), strict=True))
    adapter_shapes = {x.shape for x in _leaves(trainer.params)}
    moments = [x for x in _leaves(trainer.opt_state) if x.ndim > 0]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    n_adapter = lora.count_lora_params(trainer.model())
    assert sum(x.size for x in moments) == 2 * n_adapter  # AdamW's mu and nu

    # exports: hf/ is the merged policy, adapter/ the adapter alone (PEFT format)
    ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
    want = _logits(trainer.model(), ids)
    run_dir = tmp_path / "run"
    exported = from_pretrained(str(run_dir / "hf"), dtype=jnp.float32)
    np.testing.assert_allclose(_logits(exported, ids), want, atol=1e-4, rtol=1e-4)
    plain, _ = build.build_model_and_tokenizer(cfg.model)  # no adapters yet
    adapted = load_adapter(plain, run_dir / "adapter")
    np.testing.assert_allclose(_logits(adapted, ids), want, atol=1e-5, rtol=1e-5)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # and any checkpoint step restores onto the rebuilt base (merged, or adapters apart)
    restored, _, step = checkpoint.restore_policy(run_dir)
    assert step == cfg.train.steps and not lora.has_lora(restored)
    np.testing.assert_allclose(_logits(restored, ids), want, atol=1e-4, rtol=1e-4)
    apart, _, _ = checkpoint.restore_policy(run_dir, merged=False)
    # (unsharded here, on the 8-device mesh in training: summation order differs)
    np.testing.assert_allclose(_logits(apart, ids), want, atol=1e-5, rtol=1e-5)


def test_lora_sft_resume_equals_the_uninterrupted_run(tmp_path):
    """Stopped after step 3 (its checkpoint: adapters + optimizer state only) and resumed to
    6, with adapter dropout on: the same losses and adapters as 6 steps in one go."""
    def config(path, steps):
        cfg = _sft_config(path, steps=steps, dropout=0.1)
        cfg.optim.schedule = "constant"  # the run's length must not move the schedule
        cfg.checkpoint.save_every = 3
        cfg.eval.num_examples = 0
        return cfg

    whole = sft.SFT(config(tmp_path / "a", 6), train.prepare_run_dir(config(tmp_path / "a", 6)))
    drive(whole)
    train.run(config(tmp_path / "b", 3))
    resumed = sft.SFT(config(tmp_path / "b", 6), train.prepare_run_dir(config(tmp_path / "b", 6)))
    summary = drive(resumed)
    assert summary["resumed_from"] == 3

    def losses(path):
        return [r["train/loss"] for r in read_metrics(path / "run" / "metrics.jsonl")
                if "train/loss" in r]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    for a, b in zip(_leaves(whole.trainer.params), _leaves(resumed.trainer.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_without_a_lora_block_in_its_config_json_resumes(tmp_path):
    """Runs started before ``config.lora`` existed resume at its default (rank 0)."""
    cfg = _sft_config(tmp_path, steps=2, rank=0)
    cfg.eval.num_examples = 0
    train.run(cfg)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    del old["lora"]
    path.write_text(json.dumps(old))
    longer = _sft_config(tmp_path, steps=3, rank=0)
    longer.eval.num_examples = 0
    assert train.run(longer)["resumed_from"] == 2
    # turning LoRA on over a full fine-tuning run is refused, naming the field
    with pytest.raises(ConfigError, match="config.lora.rank"):
        train.run(_sft_config(tmp_path, steps=4), overridden=("lora.rank",))


def test_lora_grpo_engine_samples_the_adapted_policy(grpo_config):
    """After an update the engine holds merge_lora of the trainer's model: the next
    rollouts' log-probs are the adapted model's teacher-forced ones (not the base's), and
    the KL reference is the frozen base."""
    cfg = grpo_config
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.optim.lr = 1e-2
    cfg.grpo.loss_type, cfg.grpo.beta = "grpo_clip", 0.04
    g = grpo.GRPO(cfg, train.prepare_run_dir(cfg))
    assert g.trainer.is_lora
    g.step(1)
    engine_state = _leaves(g.engine.state)
    merged = _leaves(nnx.state(lora.merge_lora(g.trainer.model()), nnx.Param))
    for a, b in zip(engine_state, merged, strict=True):
        np.testing.assert_array_equal(a, b)

    batch, _ = g.make_batch(g.rollout(2, cfg.grpo.group_size))
    g.add_old_log_probs(batch)  # the adapted model, teacher-forced on the sampled tokens
    m = batch["response_mask"].astype(bool)
    sampler = batch["sampler_log_probs"][m]
    assert np.abs(batch["old_log_probs"][m] - sampler).max() < 1e-4
    ref = batch["ref_log_probs"]  # the reference: the frozen base
    plain = nnx.split(lora.strip_lora(g.trainer.model()), nnx.Param)
    strip_fn = grpo.make_log_prob_fn(plain[0])
    stripped = np.asarray(strip_fn((plain[1],), jnp.asarray(batch["input_ids"]),
                                   jnp.asarray(batch["labels"])))
    np.testing.assert_allclose(ref[m], stripped[m], atol=1e-4)
    assert np.abs(ref[m] - sampler).max() > 1e-3  # the engine did not sample the base
    metrics = g.step(2)
    assert np.isfinite(metrics["train/loss"])
    g.run.close()


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, "config.lora.rank=-1: must be an integer >= 0"),
    ("alpha", 0.0, "config.lora.alpha=0.0: must be > 0"),
    ("dropout", 1.0, "config.lora.dropout=1.0: must be in [0, 1)"),
    ("target_modules", "q_proj,qkv", "config.lora.target_modules: unknown module"),
    ("base_dtype", "int8", "config.lora.base_dtype='int8'"),
])
def test_bad_lora_config_is_a_one_line_error(tmp_path, field, value, message):
    cfg = _sft_config(tmp_path)
    setattr(cfg.lora, field, value)
    with pytest.raises(ConfigError) as e:
        train.validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_train_step_under_remat_equals_without(dropout):
    """``model.remat`` (the real presets use ``full``) with adapters: the frozen base is
    merged inside the gradient's trace, so nnx.remat can run the layers; same losses."""
    ids = np.random.default_rng(0).integers(0, 1000, (2, 16)).astype(np.int32)
    batch = dict(input_ids=ids, labels=ids, response_mask=np.ones((2, 16), bool))
    runs = {}
    for remat in ("none", "full"):
        model = init_model(tiny(remat=remat), seed=0)
        lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8, dropout=dropout))
        trainer = Trainer.create(model, optax.adamw(1e-2), sft.sft_loss_fn(), dropout_seed=3)
        runs[remat] = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    np.testing.assert_allclose(runs["full"], runs["none"], rtol=1e-5)


# --- DPO and Expert Iteration with adapters ---------------------------------------------


def _dpo_lora_config(tmp_path, steps):
    cfg = _dpo_config(tmp_path, steps=steps)
    cfg.optim.lr = 1e-2  # adapters start at zero (B = 0): a larger step than full FT's
    cfg.dpo.beta = 0.5  # as test_dpo's run: 16 pairs learnt in a few steps
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    return cfg


def _dpo_records(path):
    return [r for r in read_metrics(path / "run" / "metrics.jsonl") if "train/loss" in r]


def test_lora_dpo_trains_the_adapters_against_the_frozen_base(tmp_path):
    """Policy == reference at the start (B = 0: loss log 2); the loss falls and the reward
    accuracy rises; the base never changes and the reference's log-probs stay the base
    model's (the frozen base under the starting adapters, not a copy that drifts)."""
    cfg = _dpo_lora_config(tmp_path, steps=24)
    algo = dpo.DPO(cfg, train.prepare_run_dir(cfg))
    trainer = algo.trainer
    assert trainer.is_lora
    base_before = _leaves(trainer.frozen[0])
    start_adapters = _leaves(trainer.params)
    drive(algo)

    records = _dpo_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert records[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-3)
    # (each step sees 8 of the 16 pairs: single steps are noisy, so means of the last 8;
    # 0.69 -> 0.39 and accuracy 0.47 -> 0.88 when written)
    head, tail = records[:2], records[-8:]
    assert np.mean([r["train/loss"] for r in tail]) < 0.7 * np.log(2), tail
    accuracy = np.mean([r["train/reward_accuracy"] for r in tail])
    assert accuracy >= 0.8 and accuracy > np.mean([r["train/reward_accuracy"]
                                                    for r in head]) + 0.2, (head, tail)

    # only the adapters moved: the base is bit-identical to before the run and to a fresh
    # build (what a resume rebuilds the reference from)
    for a, b in zip(base_before, _leaves(trainer.frozen[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    fresh, _ = build.build_model_and_tokenizer(cfg.model, lora=cfg.lora)
    for a, b in zip(_leaves(nnx.state(fresh, lora.frozen_filter)), base_before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(start_adapters, _leaves(trainer.params), strict=True))

    # after 24 updates the reference still gives the plain base model's log-probs
    it = preferences.make_preference_iterator(algo.train_data, algo.pad_id, batch_size=8,
                                              seq_buckets=cfg.train.seq_buckets, seed=1)
    batch = next(it)
    ref_c, ref_r = algo.reference(batch)
    plain, _ = build.build_model_and_tokenizer(cfg.model)  # no adapters, not sharded
    base_c, base_r = dpo.pair_log_probs(plain, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(ref_c, np.asarray(base_c), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ref_r, np.asarray(base_r), rtol=1e-5, atol=1e-4)
    # while the policy (the adapted model) has moved away from it
    placed = trainer.place_batch(batch)
    pol_c, pol_r = (np.asarray(x) for x in algo.log_probs(trainer.states(), placed))
    assert np.abs(pol_c - ref_c).max() > 0.1 and np.abs(pol_r - ref_r).max() > 0.1


def test_lora_dpo_resume_continues_at_the_right_step(tmp_path):
    """Stopped after step 4 of 6 (checkpoints every 2: adapters and optimizer state) and
    restarted: steps 5-6 equal an uninterrupted run's (same adapters, data order and
    reference, rebuilt from the starting adapters over the rebuilt base)."""
    def config(path, steps):
        cfg = _dpo_lora_config(path, steps=steps)
        cfg.checkpoint.save_every = 2
        return cfg

    train.run(config(tmp_path / "a", 6))
    want = {r["step"]: r["train/loss"] for r in _dpo_records(tmp_path / "a")}
    train.run(config(tmp_path / "b", 4))
    assert train.run(config(tmp_path / "b", 6))["resumed_from"] == 4
    got = _dpo_records(tmp_path / "b")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert want[6] < want[1] - 0.05  # the adapters moved: a comparison that can fail
    for r in got:
        assert r["train/loss"] == pytest.approx(want[r["step"]], rel=1e-5), r["step"]


def test_lora_expert_iteration_step_trains_only_the_adapters(tmp_path, monkeypatch):
    """One EI step under LoRA: rollouts kept, SFT on them moves the adapters only, the
    engine samples the adapted policy (merged), and the adapter is exported."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "verify"))
    cfg = shrink(load_config("ei"), tmp_path)
    cfg.data.reward = "my_rewards:even_length"
    cfg.ei.n_ei_steps, cfg.ei.questions_per_step, cfg.ei.group_size = 1, 8, 4
    cfg.ei.batch_size = 8
    cfg.eval.every = 0
    cfg.optim.lr = 1e-2
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.checkpoint.export_hf = True
    algo = expert_iteration.ExpertIteration(cfg, train.prepare_run_dir(cfg))
    trainer = algo.trainer
    assert trainer.is_lora
    base_before = _leaves(trainer.frozen[0])
    start_adapters = _leaves(trainer.params)
    summary = drive(algo)

    assert summary["ei_steps"] == 1
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                 if "train/kept_fraction" in r]
    assert record["train/sft_micro_steps"] >= 1 and np.isfinite(record["train/loss"])
    for a, b in zip(base_before, _leaves(trainer.frozen[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b)
               for a, b in zip(start_adapters, _leaves(trainer.params), strict=True))
    # the engine holds the adapted weights merged (what the next rollouts sample)
    merged = _leaves(nnx.state(lora.merge_lora(trainer.model()), nnx.Param))
    for a, b in zip(_leaves(algo.engine.state), merged, strict=True):
        np.testing.assert_array_equal(a, b)
    # the adapter alone, exported in PEFT's format, rebuilds the trained policy
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
    plain, _ = build.build_model_and_tokenizer(cfg.model)
    adapted = load_adapter(plain, run_dir / "adapter")
    np.testing.assert_allclose(_logits(adapted, ids), _logits(trainer.model(), ids),
                               atol=1e-5, rtol=1e-5)
