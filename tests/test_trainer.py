"""The shared train step: sharded == unsharded, donation, per-device memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.models import init_model, tiny
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainer import Trainer


def nll_loss(model, batch):
    """Mean next-token NLL over masked positions (a stand-in SFT loss)."""
    logits = model(batch["input_ids"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    mask = batch["mask"]
    loss = -jnp.sum(tok * mask) / jnp.maximum(mask.sum(), 1)
    return loss, {"tokens": mask.sum()}


def make_batch(seed=0, b=8, t=16, vocab=1024):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "mask": mask}


CFG = tiny(
    num_attention_heads=8,
    num_key_value_heads=4,
    hidden_size=64,
    intermediate_size=128,
    tie_word_embeddings=False,
)


def run(mesh, steps=3):
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0, weight_decay=0.1))
    trainer = Trainer.create(init_model(CFG, seed=0), tx, nll_loss, mesh)
    losses = [float(trainer.train_step(make_batch(s))["loss"]) for s in range(steps)]
    params = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(trainer.params)[0]}
    return losses, params, trainer


def test_sharded_steps_match_single_device():
    ref_losses, ref_params, _ = run(None)
    for shape in [dict(fsdp=2, tensor=4), dict(fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)]:
        losses, params, trainer = run(sharding.make_mesh(**shape))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
        for k in ref_params:
            np.testing.assert_allclose(
                params[k], ref_params[k], rtol=1e-5, atol=1e-5, err_msg=str(k)
            )


def test_each_device_holds_its_share():
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    _, _, trainer = run(mesh, steps=1)
    up = trainer.params["model"]["layers"][0]["mlp"]["up_proj"]["weight"][...]  # [64, 128]
    assert {s.data.shape for s in up.addressable_shards} == {(32, 32)}
    total = sum(x.size for x in jax.tree.leaves(trainer.params))
    per_device = sum(
        s.data.size
        for x in jax.tree.leaves(trainer.params)
        for s in x.addressable_shards
        if s.device == jax.devices()[0]
    )
    # Norm scales are replicated, everything else is split 8 ways.
    assert per_device < total / 8 * 1.1
    mu = jax.tree.leaves(trainer.opt_state)
    assert any(
        getattr(x, "sharding", None) is not None and x.sharding.spec == up.sharding.spec
        for x in mu
        if x.shape == up.shape
    )


def test_state_buffers_are_donated():
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, total_steps=10))
    trainer = Trainer.create(init_model(CFG, seed=0), tx, nll_loss)
    trainer.train_step(make_batch(8))
    old = jax.tree.leaves(trainer.params)[0]
    trainer.train_step(make_batch(9))
    assert old.is_deleted()


@pytest.mark.parametrize("shape", [dict(fsdp=8, tensor=1)])
def test_eval_step_matches_model_call(shape):
    mesh = sharding.make_mesh(**shape)
    _, _, trainer = run(mesh, steps=1)
    batch = make_batch(5)
    want, _ = nll_loss(trainer.model(), {k: jnp.asarray(v) for k, v in batch.items()})
    got = trainer.eval_step(batch)["loss"]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert isinstance(trainer.model(), nnx.Module)
