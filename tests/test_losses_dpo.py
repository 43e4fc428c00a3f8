"""DPO losses (jaxalign.losses): hand-computed values, the batch metrics, stability, gradients.

Expected numbers are computed here with plain ``math`` from the formula of CS336 assignment
5's supplement, ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses


def _dpo(pi_c, pi_r, ref_c, ref_r, beta):
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -math.log(1.0 / (1.0 + math.exp(-z)))


def test_per_instance_dpo_loss_hand_computed():
    # margin = (-5 - -6) - (-7 - -6.5) = 1 + 0.5 = 1.5; beta * margin = 0.15
    got = losses.per_instance_dpo_loss(-5.0, -7.0, -6.0, -6.5, 0.1)
    assert got.shape == ()
    assert float(got) == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    assert float(got) == pytest.approx(_dpo(-5.0, -7.0, -6.0, -6.5, 0.1), rel=1e-6)
    # policy == reference: every pair is a coin flip, log 2
    assert float(losses.per_instance_dpo_loss(-3.0, -9.0, -3.0, -9.0, 0.5)) == pytest.approx(
        math.log(2), rel=1e-6)
    # a policy that prefers the rejected response pays more than log 2
    assert float(losses.per_instance_dpo_loss(-8.0, -2.0, -5.0, -5.0, 0.2)) == pytest.approx(
        _dpo(-8.0, -2.0, -5.0, -5.0, 0.2), rel=1e-6)
    assert _dpo(-8.0, -2.0, -5.0, -5.0, 0.2) > math.log(2)


def test_per_instance_dpo_loss_elementwise_and_stable_for_large_margins():
    pi_c = np.array([-5.0, 0.0, -2000.0, 0.0], np.float32)
    pi_r = np.array([-7.0, -2000.0, 0.0, 0.0], np.float32)
    ref = np.zeros(4, np.float32)
    got = np.asarray(jax.jit(losses.per_instance_dpo_loss)(pi_c, pi_r, ref, ref, 1.0))
    assert got.shape == (4,)
    assert got[0] == pytest.approx(_dpo(-5.0, -7.0, 0.0, 0.0, 1.0), rel=1e-6)
    assert got[1] == pytest.approx(0.0, abs=1e-6)  # exp(-2000): nothing left to learn
    assert got[2] == pytest.approx(2000.0, rel=1e-6)  # log(sigmoid(-2000)) is not -inf
    assert got[3] == pytest.approx(math.log(2), rel=1e-6)
    assert np.all(np.isfinite(got))


def test_dpo_loss_batch_metrics_hand_computed():
    beta = 0.1
    pi_c = [-5.0, -4.0, -6.0, -3.0]
    pi_r = [-7.0, -3.0, -6.0, -8.0]
    ref_c = [-6.0, -4.0, -6.0, -2.0]
    ref_r = [-6.5, -4.0, -6.0, -8.0]
    loss, meta = jax.jit(losses.dpo_loss, static_argnums=4)(
        *(np.asarray(x, np.float32) for x in (pi_c, pi_r, ref_c, ref_r)), beta)
    per_pair = [_dpo(*args, beta) for args in zip(pi_c, pi_r, ref_c, ref_r, strict=True)]
    assert float(loss) == pytest.approx(sum(per_pair) / 4, rel=1e-6)
    r_c = [beta * (a - b) for a, b in zip(pi_c, ref_c, strict=True)]  # 0.1, 0, 0, -0.1
    r_r = [beta * (a - b) for a, b in zip(pi_r, ref_r, strict=True)]  # -0.05, 0.1, 0, 0
    assert float(meta["chosen_reward"]) == pytest.approx(sum(r_c) / 4, abs=1e-7)
    assert float(meta["rejected_reward"]) == pytest.approx(sum(r_r) / 4, abs=1e-7)
    assert float(meta["reward_margin"]) == pytest.approx((sum(r_c) - sum(r_r)) / 4, abs=1e-7)
    # margins 0.15 (win), -0.1 (loss), 0 (tie: 1/2), -0.1 (loss)
    assert float(meta["reward_accuracy"]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    # policy log-probs: -5 > -7 win, -4 < -3 loss, tie, -3 > -8 win
    assert float(meta["logp_accuracy"]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert float(meta["chosen_log_prob"]) == pytest.approx(np.mean(pi_c))
    assert float(meta["rejected_log_prob"]) == pytest.approx(np.mean(pi_r))


def test_dpo_loss_gradient_direction():
    """Descent raises the chosen log-prob and lowers the rejected one, by beta * sigmoid(-z)
    per pair / B; the reference is a constant the caller passes without gradients."""
    beta = 0.5
    pi_c = jnp.asarray([-5.0, -2.0], jnp.float32)
    pi_r = jnp.asarray([-6.0, -1.0], jnp.float32)
    ref_c = jnp.asarray([-5.5, -2.0], jnp.float32)
    ref_r = jnp.asarray([-6.0, -2.0], jnp.float32)

    def loss(c, r):
        return losses.dpo_loss(c, r, ref_c, ref_r, beta)[0]

    g_c, g_r = jax.jit(jax.grad(loss, argnums=(0, 1)))(pi_c, pi_r)
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
    for i in range(2):
        z = beta * ((float(pi_c[i]) - float(ref_c[i])) - (float(pi_r[i]) - float(ref_r[i])))
        want = beta / (1 + math.exp(z)) / 2  # d/dz -log sigmoid(z) = -sigmoid(-z); mean over 2
        assert float(g_c[i]) == pytest.approx(-want, rel=1e-5)
        assert float(g_r[i]) == pytest.approx(want, rel=1e-5)
    # a step against the gradient lowers the loss
    before = float(loss(pi_c, pi_r))
    assert float(loss(pi_c - 0.5 * g_c, pi_r - 0.5 * g_r)) < before
    # the metrics carry no gradient
    meta_grad = jax.grad(lambda c: losses.dpo_loss(c, pi_r, ref_c, ref_r, beta)[1]
                         ["reward_margin"])(pi_c)
    assert np.all(np.asarray(meta_grad) == 0)


def test_sequence_log_probs_sums_the_response_tokens_only():
    logp = np.array([[-1.0, -2.0, -3.0, -np.inf], [-0.5, -0.25, np.nan, -4.0]], np.float32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], bool)
    got = np.asarray(jax.jit(losses.sequence_log_probs)(logp, mask))
    np.testing.assert_allclose(got, [-5.0, -0.75], rtol=1e-6)
    # the gradient reaches the masked-in tokens only (and is finite)
    g = jax.grad(lambda x: losses.sequence_log_probs(x, mask).sum())(jnp.asarray(logp))
    np.testing.assert_array_equal(np.asarray(g), mask.astype(np.float32))


def test_dpo_loss_rejects_mismatched_shapes():
    a = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        losses.dpo_loss(a, np.zeros(2, np.float32), a, a, 0.1)
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        losses.dpo_loss(a[None], a[None], a[None], a[None], 0.1)


def test_dpo_loss_bf16_inputs_computed_in_float32():
    x = np.array([-5.0, -7.0], np.float32)
    loss, _ = losses.dpo_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(x[::-1], jnp.bfloat16),
                              jnp.zeros(2, jnp.bfloat16), jnp.zeros(2, jnp.bfloat16), 0.1)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx((_dpo(-5, -7, 0, 0, 0.1) + _dpo(-7, -5, 0, 0, 0.1)) / 2,
                                        rel=1e-6)
