"""Packed rollout rows (``train.packing``) in GRPO and Expert Iteration: several rollouts
per row, the same loss.

The parity tests build one set of rollouts two ways (``build_rollout_batch`` and
``build_packed_rollout_batch``) and check that the step's loss and gradients agree for
every loss type and length normalisation, with filtered rollouts and several micro-batches.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cfg_helpers import load_config, shrink
from flax import nnx

from jaxalign import losses, train
from jaxalign.algorithms import expert_iteration, grpo
from jaxalign.logging import read_metrics
from jaxalign.models.qwen2 import init_model, tiny
from jaxalign.rollout import Completion


def _rollouts(n, seed=0, vocab=250):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, vocab, rng.integers(2, 9))) for _ in range(n)]
    comps = []
    for _ in range(n):
        ids = list(rng.integers(1, vocab, int(rng.integers(1, 14))))
        comps.append(Completion(text="", token_ids=ids, finish_reason="stop",
                                logprobs=list(-rng.uniform(0.5, 4.0, len(ids)))))
    advantages = rng.normal(size=n).astype(np.float32)
    raw = rng.uniform(size=n).astype(np.float32)
    return prompts, comps, advantages, raw


def _g(loss_type, normalization):
    return ml_collections.ConfigDict(dict(
        loss_type=loss_type, length_normalization=normalization, cliprange=0.2,
        cliprange_low=0.0, cliprange_high=0.0, beta=0.05, tis_cap=2.0))


def _step_loss_and_grads(model, loss_fn, micro_batches):
    """optax.MultiSteps' view of one optimizer step: the mean of the micro-batch losses and
    gradients."""
    graphdef, params = nnx.split(model, nnx.Param)

    def objective(p, batch):
        return loss_fn(nnx.merge(graphdef, p), batch)[0]

    results = [jax.value_and_grad(objective)(params, mb) for mb in micro_batches]
    loss = sum(float(r[0]) for r in results) / len(results)
    grads = jax.tree.map(lambda *g: sum(g) / len(g), *[r[1] for r in results])
    return loss, grads


def _with_old_and_ref(batch):
    """Old and reference log-probs as layout-independent functions of the sampler's."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["old_log_probs"] = batch["sampler_log_probs"] * 0.9
    batch["ref_log_probs"] = batch["sampler_log_probs"] * 1.1
    return batch


@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "no_baseline", "grpo_clip"])
@pytest.mark.parametrize("normalization, accum", [
    ("masked_mean", 1), ("masked_mean", 2), ("masked_normalize", 2), ("token_mean", 1)])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(loss_type, normalization, accum):
    model = init_model(tiny(vocab_size=256), seed=2)
    n = 8
    prompts, comps, adv, raw = _rollouts(n, seed=3)
    keep = np.ones(n, bool)
    keep[[2, 5]] = False  # filtered rollouts: no gradient, still counted
    width = 24
    constant = 16.0
    unpacked = grpo.build_rollout_batch(prompts, comps, adv, raw, pad_id=0, width=width,
                                        row_mask=keep)
    packed = grpo.build_packed_rollout_batch(
        prompts, comps, adv, raw, pad_id=0, width=width, row_mask=keep, optimizer_steps=1,
        micro_batches=accum, row_multiple=1, length_normalization=normalization,
        normalize_constant=constant)
    assert (packed["segment_ids"].max(axis=1) >= 2).any()  # rows hold several rollouts
    loss_fn = grpo.grpo_loss_fn(_g(loss_type, normalization), use_old=loss_type == "grpo_clip",
                                use_tis=True, normalize_constant=constant)
    size_u, size_p = n // accum, len(packed["input_ids"]) // accum
    loss_u, grad_u = _step_loss_and_grads(model, loss_fn, [
        _with_old_and_ref(mb) for mb in grpo.micro_batches(unpacked, size_u)])
    loss_p, grad_p = _step_loss_and_grads(model, loss_fn, [
        _with_old_and_ref(mb) for mb in grpo.micro_batches(packed, size_p)])
    assert loss_p == pytest.approx(loss_u, rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-4)


def test_packed_rows_hold_each_rollout_with_gradient_once_in_its_optimizer_step():
    n = 16
    prompts, comps, adv, raw = _rollouts(n, seed=5)
    keep = np.ones(n, bool)
    keep[3] = False
    b = grpo.build_packed_rollout_batch(
        prompts, comps, adv, raw, pad_id=0, width=32, row_mask=keep, optimizer_steps=2,
        micro_batches=2, row_multiple=2, length_normalization="masked_mean")
    rows = len(b["input_ids"])
    per_micro = rows // 4
    assert per_micro % 2 == 0 and per_micro <= 4  # a multiple of the devices, <= unpacked
    for k in ("labels", "segment_ids", "response_mask", "sampler_log_probs", "advantages",
              "raw_rewards", "token_weights"):
        assert b[k].shape == b["input_ids"].shape
    # each kept rollout's response tokens (and its sampler log-probs) appear exactly once, in
    # the half of the batch of its optimizer step
    for half, idx in ((slice(0, rows // 2), range(0, 8)), (slice(rows // 2, rows), range(8, 16))):
        got = sorted(np.round(b["sampler_log_probs"][half][b["response_mask"][half]], 6))
        want = sorted(np.round(np.concatenate(
            [comps[i].logprobs for i in idx if keep[i]]).astype(np.float32), 6))
        np.testing.assert_array_equal(got, want)
    # masked_mean weights: micro_batches / (S * L_i) on each response token
    lengths = np.array([len(c.token_ids) for c in comps[:8]]) * keep[:8]
    first = b["token_weights"][: rows // 2]
    assert first.sum() == pytest.approx(2.0 * keep[:8].sum() / 8, rel=1e-5)
    np.testing.assert_allclose(
        losses.sequence_token_weights(lengths, "masked_mean", 2)[[0, 3]],
        [2 / (8 * lengths[0]), 0.0])
    with pytest.raises(ValueError, match="normalize_constant"):
        losses.sequence_token_weights(lengths, "masked_normalize", 2)


def test_a_packed_grpo_run_matches_the_unpacked_run(grpo_config, tmp_path, monkeypatch):
    """Same seeds, same rollouts: the first step's loss and gradient norm agree, with the
    packed run sharded over two data-parallel devices."""
    from jaxalign import sharding

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "verify"))
    grpo_config.data.reward = "my_rewards:even_e"
    grpo_config.grpo.n_grpo_steps = 1
    grpo_config.train.width_multiple = 64  # rows of ~31 tokens in 64 positions: room to pack
    results = {}
    for name, (pack, devices) in {"unpacked": (False, 1), "packed": (True, 2)}.items():
        monkeypatch.setattr(sharding, "mesh_from_config", lambda cfg, d=devices:
                            sharding.make_mesh(1, d, 1, devices=jax.devices()[:d]))
        grpo_config.train.packing = pack
        grpo_config.workdir = str(tmp_path / name)
        train.run(grpo_config)
        results[name] = next(r for r in read_metrics(tmp_path / name / "metrics.jsonl")
                             if "train/loss" in r)
    u, p = results["unpacked"], results["packed"]
    assert p["train/rows"] < u["train/rows"] and p["train/fill"] > u["train/fill"]
    for key in ("train/loss", "train/grad_norm", "train/reward", "train/entropy"):
        assert p[key] == pytest.approx(u[key], rel=1e-4, abs=1e-6), key


def test_packed_expert_iteration_batches_hold_every_kept_rollout_once_per_epoch():
    prompts, comps, _, _ = _rollouts(12, seed=7)
    responses = [c.token_ids for c in comps]
    batches = list(expert_iteration.sft_micro_batches(
        prompts, responses, micro_batch=2, pad_id=0, width_multiple=32, epochs=2, seed=0,
        packed=True))
    plain = list(expert_iteration.sft_micro_batches(
        prompts, responses, micro_batch=2, pad_id=0, width_multiple=32, epochs=2, seed=0))
    assert len(batches) < len(plain)  # fewer rows to train on
    assert {b["input_ids"].shape for b in batches} == {(2, 32)}
    per_epoch = len(batches) // 2
    tokens = sum(int(b["response_mask"].sum()) for b in batches[:per_epoch])
    assert tokens == sum(map(len, responses))
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches[:per_epoch]) == 12


def test_a_packed_expert_iteration_step_trains_on_fewer_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "verify"))
    steps = {}
    for pack in (False, True):
        cfg = shrink(load_config("ei"), tmp_path / str(pack))
        cfg.data.reward = "my_rewards:even_length"
        cfg.ei.n_ei_steps, cfg.ei.questions_per_step, cfg.ei.group_size = 1, 8, 4
        cfg.ei.batch_size, cfg.train.width_multiple, cfg.train.packing = 8, 64, pack
        train.run(cfg)
        (record,) = [r for r in read_metrics(tmp_path / str(pack) / "run" / "metrics.jsonl")
                     if "train/kept_fraction" in r]
        assert np.isfinite(record["train/loss"])
        steps[pack] = record["train/sft_micro_steps"]
    assert steps[True] < steps[False]
