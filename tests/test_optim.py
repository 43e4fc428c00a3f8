"""Optimizer assembly: schedule values, decay mask, clipping, exact gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign.models import init_model, tiny
from jaxalign.optim import OptimConfig, decay_mask, make_optimizer, make_schedule


def test_warmup_cosine_schedule_values():
    cfg = OptimConfig(lr=1e-3, lr_min=1e-4, warmup_steps=10, total_steps=110)
    s = make_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    # Halfway through the decay: lr_min + (lr - lr_min) * (1 + cos(pi / 2)) / 2.
    np.testing.assert_allclose(float(s(60)), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-6)
    ratio = OptimConfig(lr=1.0, warmup_ratio=0.05, total_steps=200)
    assert ratio.num_warmup_steps == 10
    const = make_schedule(OptimConfig(lr=2.0, schedule="constant", warmup_steps=4, total_steps=9))
    assert [float(const(i)) for i in (0, 2, 4, 8)] == [0.0, 1.0, 2.0, 2.0]


def test_decay_mask_skips_norms_and_biases():
    state = nnx.state(init_model(tiny(tie_word_embeddings=False)), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(state))
    layer = mask["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["weight"] is True
    assert layer["self_attn"]["q_proj"]["bias"] is False
    assert layer["input_layernorm"]["weight"] is False
    assert mask["model"]["norm"]["weight"] is False
    assert mask["model"]["embed_tokens"]["weight"] is True
    assert mask["lm_head"]["weight"] is True


def test_weight_decay_applies_to_weights_only():
    params = {
        "proj": {"weight": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "norm": {"weight": jnp.ones(2)},
    }
    tx, _ = make_optimizer(
        OptimConfig(lr=0.1, weight_decay=0.5, total_steps=10, grad_clip=None, schedule="constant")
    )
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["proj"]["weight"], 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["proj"]["bias"], 1.0)
    np.testing.assert_array_equal(new["norm"]["weight"], 1.0)


def test_clipping_bounds_the_update_direction():
    params = {"w": jnp.zeros(2)}
    cfg = OptimConfig(
        lr=1.0, total_steps=10, grad_clip=1.0, schedule="constant", b1=0.0, b2=0.0, eps=0.0
    )
    tx, _ = make_optimizer(cfg)
    # With b1 = b2 = 0 Adam's step is sign(g); clipping must not change it, only scale g.
    grads = {"w": jnp.array([30.0, -40.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1.0, 1.0], atol=1e-6)
    clip = optax.clip_by_global_norm(1.0)
    clipped, _ = clip.update(grads, clip.init(params))
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    params = {"weight": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "bias": jnp.zeros(())}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["weight"] + p["bias"] - yb) ** 2)

    base = dict(lr=1e-2, total_steps=5, warmup_steps=1, weight_decay=0.1, grad_clip=0.5)
    big_tx, _ = make_optimizer(OptimConfig(**base))
    acc_tx, _ = make_optimizer(OptimConfig(**base, grad_accum_steps=4))
    big_p, big_s = params, big_tx.init(params)
    acc_p, acc_s = params, acc_tx.init(params)
    for _ in range(3):  # three optimizer steps
        g = jax.grad(loss)(big_p, x, y)
        u, big_s = big_tx.update(g, big_s, big_p)
        big_p = optax.apply_updates(big_p, u)
        for k in range(4):
            sl = slice(2 * k, 2 * k + 2)
            g = jax.grad(loss)(acc_p, x[sl], y[sl])
            u, acc_s = acc_tx.update(g, acc_s, acc_p)
            acc_p = optax.apply_updates(acc_p, u)
            if k < 3:  # no change until the k-th micro-batch
                assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(u))
        for a, b in zip(jax.tree.leaves(big_p), jax.tree.leaves(acc_p), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr=0.0 must be > 0"),
        (dict(lr=1e-5, lr_min=1e-4), "lr_min"),
        (dict(warmup_steps=5, total_steps=3), "warmup_steps=5"),
        (dict(schedule="linear"), "schedule='linear'"),
        (dict(grad_accum_steps=0), "grad_accum_steps=0"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**kwargs)
