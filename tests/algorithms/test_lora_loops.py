"""LoRA in the training loops (``config.lora.rank > 0``): only the adapters train, the
engine samples the adapted weights, a resumed run is exact, the exports load, and bad
``config.lora`` values are one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cfg_helpers import synthetic_sft
from flax import nnx

from jaxalign import checkpoint, train
from jaxalign.algorithms import grpo, sft
from jaxalign.algorithms.driver import drive
from jaxalign.config import ConfigError
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
