"""Tests for jaxalign.losses against hand-computed values and float64 NumPy references.

Values are float32 in JAX against float64 NumPy (rtol 1e-5 unless stated); gradients
w.r.t. the log-probs are compared with gradients derived by hand. bf16 inputs must give
finite results within bf16's resolution of the fp32 result (bf16 keeps 8 significand
bits: a relative error of 2**-8 ~= 0.4% per input rounding).

Calls go through ``jax.jit``: eager JAX compiles every primitive separately, which would make
this file several times slower. Eager == jit is checked once per kind of function.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

RTOL = 1e-5
ATOL = 1e-6
BF16_TOL = 2e-2  # a few bf16 roundings of O(1) inputs (2**-8 each), summed over a row


_TRACED = object()  # marks where an array argument goes in a cached signature


@functools.cache
def _compiled(fn, treedef, static):
    def run(*arrays):
        it = iter(arrays)
        leaves = [next(it) if leaf is _TRACED else leaf for leaf in static]
        args, kwargs = jax.tree.unflatten(treedef, leaves)
        return fn(*args, **kwargs)

    return jax.jit(run)


def jit(fn):
    """``fn`` compiled once per signature: arrays are traced, every other argument is static.

    So ``jit(losses.masked_mean)(x, m, -1)`` or ``jit(losses.grpo_microbatch_loss)(...,
    "grpo_clip", cliprange=0.2)`` read like the eager calls they stand for.
    """

    def call(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        traced = [isinstance(x, np.ndarray | jax.Array) for x in leaves]
        static = tuple(_TRACED if t else x for x, t in zip(leaves, traced, strict=True))
        return _compiled(fn, treedef, static)(
            *[x for x, t in zip(leaves, traced, strict=True) if t]
        )

    return call


def value_and_grad(fn, **kwargs):
    """``jax.value_and_grad(fn, **kwargs)``, compiled."""
    return jax.jit(jax.value_and_grad(fn, **kwargs))


def _rng(seed=0):
    return np.random.default_rng(seed)


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def np_entropy(logits):
    lp = np_log_softmax(logits)
    return -(np.exp(lp) * lp).sum(-1)


def np_masked_mean(x, mask, axis=None):
    x = np.asarray(x, np.float64)
    mask = np.asarray(mask, bool)
    return np.where(mask, x, 0.0).sum(axis) / np.maximum(mask.sum(axis), 1)


# --- entropy and log-probs ----------------------------------------------------------------


def test_compute_entropy_matches_numpy_and_is_stable():
    logits = _rng().normal(size=(2, 3, 7)) * 3
    logits[0, 0] += 1e4  # a large offset overflows a naive exp in float32
    logits = logits.astype(np.float32)  # the reference sees the same rounded inputs
    got = jit(losses.compute_entropy)(logits)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_entropy(logits), rtol=RTOL, atol=1e-5)


def test_compute_entropy_hand_values():
    # Uniform over 3; -inf logits (masked vocabulary) contribute 0, so one-hot has entropy
    # 0 and two equal logits next to a -inf have entropy log 2, all finite with finite grads.
    logits = np.array([[[0.0, 0.0, 0.0], [0.0, -np.inf, -np.inf], [1.0, 1.0, -np.inf]]])
    got = jit(losses.compute_entropy)(logits)
    np.testing.assert_allclose(got, [[np.log(3), 0.0, np.log(2)]], rtol=RTOL, atol=0)
    _, grad = value_and_grad(lambda x: losses.compute_entropy(x).sum())(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(losses.compute_entropy(logits), got, rtol=1e-6)  # eager == jit


def test_log_probs_from_logits_matches_numpy():
    rng = _rng(1)
    logits = (rng.normal(size=(2, 5, 11)) * 4).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 5))
    got = jit(losses.log_probs_from_logits)(logits, labels)
    want = np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]
    assert got.shape == (2, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


def test_log_probs_from_logits_bf16_and_out_of_range_labels():
    rng = _rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 4, 9)), jnp.float32)
    labels = rng.integers(0, 9, size=(2, 4))
    fp32 = jit(losses.log_probs_from_logits)(logits, labels)
    bf16 = jit(losses.log_probs_from_logits)(logits.astype(jnp.bfloat16), labels)
    assert bf16.dtype == jnp.float32  # computed in float32 whatever the logits dtype
    # N(0, 1) logits rounded to bf16 move by <= 2**-9 * |logit|; log-probs by about as much.
    np.testing.assert_allclose(bf16, fp32, atol=BF16_TOL)
    # An ignore index (-100) is clamped into range: finite, to be masked by the caller.
    ignored = jit(losses.log_probs_from_logits)(logits, np.full((2, 4), -100))
    assert np.all(np.isfinite(ignored))


# --- get_response_log_probs with a tiny fake model ----------------------------------------

V, D = 13, 6


def _fake_model_params(seed=0):
    rng = _rng(seed)
    return rng.normal(size=(V, D)).astype(np.float32), rng.normal(size=(D, V)).astype(np.float32)


def _fake_hidden(embed, input_ids, xp=jnp):
    # A causal running mean of token embeddings, so positions depend on their prefix.
    x = embed[input_ids]  # [B, T, D]
    return xp.cumsum(x, axis=1) / xp.arange(1, x.shape[1] + 1)[None, :, None]


def test_get_response_log_probs_fake_model():
    embed, head = _fake_model_params()
    rng = _rng(3)
    input_ids = rng.integers(0, V, size=(2, 6))
    labels = np.roll(input_ids, -1, axis=1)
    calls = []

    def model(ids, attention_mask=None):  # any callable returning [B, T, V] logits
        calls.append(attention_mask is not None)
        return _fake_hidden(jnp.asarray(embed), ids) @ head

    logits = _fake_hidden(embed.astype(np.float64), input_ids, np) @ head.astype(np.float64)
    want_lp = np.take_along_axis(np_log_softmax(logits / 0.7), labels[..., None], -1)[..., 0]

    out = jit(losses.get_response_log_probs)(model, input_ids, labels, temperature=0.7)
    assert set(out) == {"log_probs"}
    np.testing.assert_allclose(out["log_probs"], want_lp, rtol=RTOL, atol=1e-5)

    out = jit(losses.get_response_log_probs)(
        model,
        input_ids,
        labels,
        attention_mask=np.ones_like(input_ids),
        return_token_entropy=True,
    )
    assert calls == [False, True]  # the mask is passed only when given
    assert out["log_probs"].shape == out["token_entropy"].shape == (2, 6)
    np.testing.assert_allclose(out["token_entropy"], np_entropy(logits), rtol=RTOL, atol=1e-5)


# --- chunked log-probs ----------------------------------------------------------------------


def _objective(out, cot_lp, cot_ent):
    # A generic scalar: every output element gets its own weight in the gradient.
    return jnp.sum(out["log_probs"] * cot_lp) + jnp.sum(out["token_entropy"] * cot_ent)


@jax.jit
@functools.partial(jax.value_and_grad, argnums=(0, 1))
def _plain_objective(h, w, labels, cot_lp, cot_ent):
    logits = h @ w
    out = {
        "log_probs": losses.log_probs_from_logits(logits, labels),
        "token_entropy": losses.compute_entropy(logits),
    }
    return _objective(out, cot_lp, cot_ent)


@pytest.mark.parametrize("chunk_size", [3, 7])  # 7 % 3 != 0: padding; 7: one chunk
def test_chunked_log_probs_equals_plain_values_and_gradients(chunk_size):
    b, t = 2, 7
    rng = _rng(4)
    hidden = rng.normal(size=(b, t, D)).astype(np.float32)
    _, head = _fake_model_params()
    labels = rng.integers(0, V, size=(b, t))
    cot_lp, cot_ent = rng.normal(size=(2, b, t)).astype(np.float32)

    def chunked(h, w):
        out = losses.chunked_log_probs(
            h, w, labels, chunk_size=chunk_size, return_token_entropy=True
        )
        assert out["log_probs"].shape == out["token_entropy"].shape == (b, t)
        return _objective(out, cot_lp, cot_ent)

    want, want_grads = _plain_objective(hidden, head, labels, cot_lp, cot_ent)
    got, got_grads = value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_chunked_log_probs_callable_head_and_temperature():
    b, t = 2, 5
    rng = _rng(5)
    hidden = rng.normal(size=(b, t, D)).astype(np.float32)
    _, head = _fake_model_params()
    labels = rng.integers(0, V, size=(b, t))

    def chunked(w):  # the callable closes over w: its gradient must still flow
        out = losses.chunked_log_probs(
            hidden, lambda h: h @ w, labels, chunk_size=2, temperature=0.5
        )
        return out["log_probs"].sum(), out

    def plain(w):
        lp = losses.log_probs_from_logits((hidden @ w) / 0.5, labels)
        return lp.sum(), {"log_probs": lp}

    (_, got), g_got = value_and_grad(chunked, has_aux=True)(head)
    (_, want), g_want = value_and_grad(plain, has_aux=True)(head)
    assert set(got) == {"log_probs"}
    np.testing.assert_allclose(got["log_probs"], want["log_probs"], rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_chunked_log_probs_never_materialises_full_logits():
    b, t, v = 2, 12, 50
    hidden = jnp.ones((b, t, D))
    head = jnp.ones((D, v))
    labels = jnp.zeros((b, t), jnp.int32)

    def loss(h, w):
        return losses.chunked_log_probs(h, w, labels, chunk_size=4)["log_probs"].sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head))
    assert f"[{b},4,{v}]" in jaxpr  # one chunk's logits ...
    assert f"[{b},{t},{v}]" not in jaxpr and f"[3,{b},4,{v}]" not in jaxpr  # ... never all


def test_chunked_log_probs_bf16_close_to_fp32():
    rng = _rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
    head = jnp.asarray(_fake_model_params()[1])
    labels = rng.integers(0, V, size=(2, 5))
    fn = jit(losses.chunked_log_probs)
    fp32 = fn(hidden, head, labels, chunk_size=2)["log_probs"]
    bf16 = fn(hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16), labels, chunk_size=2)
    bf16 = bf16["log_probs"]
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
    # Logits are sums of D=6 products of N(0,1) values, |logit| up to ~10: bf16 rounding of
    # both factors moves each by up to ~10 * 2 * 2**-9 ~= 0.04, and log-probs about twice that.
    np.testing.assert_allclose(bf16, fp32, atol=0.1)


def test_chunked_log_probs_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_log_probs(
            jnp.ones((1, 2, D)), jnp.ones((D, V)), jnp.zeros((1, 2), int), chunk_size=0
        )


# --- masked reductions ------------------------------------------------------------------


X = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]], np.float32)
M = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)  # row 1 is all masked


def test_masked_mean_hand_values():
    mean = jit(losses.masked_mean)
    np.testing.assert_allclose(mean(X, M), (1 + 2 + 9 + 11 + 12) / 5, rtol=RTOL)
    # The all-masked row has mean 0, not NaN.
    np.testing.assert_allclose(mean(X, M, -1), [1.5, 0.0, 32 / 3], rtol=RTOL)
    np.testing.assert_allclose(mean(X, M, 0), [5.0, 2.0, 11.0, 12.0], rtol=RTOL)
    np.testing.assert_allclose(  # a 0/1 float mask works like a boolean one
        mean(X, M.astype(np.float32), 1), np_masked_mean(X, M, 1), rtol=RTOL
    )
    np.testing.assert_array_equal(mean(X, np.zeros_like(M)), 0.0)
    np.testing.assert_allclose(losses.masked_mean(X, M, -1), mean(X, M, -1), rtol=1e-6)


def test_masked_mean_gradient_finite_and_ignores_garbage():
    x = X.copy()
    x[1, 0], x[0, 3] = np.nan, -np.inf  # under the mask: must not leak into value or grad
    value, grad = value_and_grad(lambda x: losses.masked_mean(x, M, -1).sum())(x)
    np.testing.assert_allclose(value, 1.5 + 32 / 3, rtol=RTOL)
    # d/dx[b, t] = mask[b, t] / max(count_b, 1): zero for the all-masked row.
    want = M / np.maximum(M.sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(grad, want, rtol=RTOL)


def test_masked_mean_bf16():
    got = jit(losses.masked_mean)(jnp.asarray(X / 7, jnp.bfloat16), M, -1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_masked_mean(X / 7, M, -1), rtol=BF16_TOL)


def test_masked_normalize_hand_values():
    normalize = jit(losses.masked_normalize)
    np.testing.assert_allclose(normalize(X, M, 2.0), (1 + 2 + 9 + 11 + 12) / 2, rtol=RTOL)
    np.testing.assert_allclose(normalize(X, M, 4.0, -1), [0.75, 0.0, 8.0], rtol=RTOL)
    np.testing.assert_allclose(normalize(X, M, 1.0, 0), [10.0, 2.0, 11.0, 12.0], rtol=RTOL)
    _, grad = value_and_grad(lambda x: losses.masked_normalize(x, M, 4.0))(X)
    np.testing.assert_allclose(grad, M / 4.0)
    np.testing.assert_allclose(losses.masked_normalize(X, M, 4.0, -1), [0.75, 0.0, 8.0])


# --- group-normalised rewards ---------------------------------------------------------------


def np_group_normalize(r, g, eps, by_std):
    r = np.asarray(r, np.float64).reshape(-1, g)
    a = r - r.mean(1, keepdims=True)
    if by_std:
        a = a / (r.std(1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1)


def test_group_normalize_hand_values():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3); group [1, 1, 1, 1]: 0 / (0 + eps).
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    got = jit(losses.group_normalize)(r, 4, 1e-3, True)
    s = 0.5 / (np.sqrt(1 / 3) + 1e-3)
    np.testing.assert_allclose(got, [s, -s, -s, s, 0, 0, 0, 0], rtol=RTOL)
    got = jit(losses.group_normalize)(r, 4, 0.0, False)
    np.testing.assert_allclose(got, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


@pytest.mark.parametrize("by_std", [True, False])
def test_group_normalize_matches_numpy(by_std):
    r = _rng(7).normal(size=12)
    got = jit(losses.group_normalize)(r, 3, 1e-6, by_std)
    want = np_group_normalize(r, 3, 1e-6, by_std)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_group_normalize_errors():
    with pytest.raises(ValueError, match="not divisible by group_size"):
        losses.group_normalize(np.zeros(7), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        losses.group_normalize(np.zeros(4), 1, normalize_by_std=True)
    # group_size 1 without std is defined: every advantage is 0.
    np.testing.assert_array_equal(jit(losses.group_normalize)(np.ones(3), 1, 0.0, False), 0.0)


def _fake_reward_fn(response, ground_truth):
    correct = float(response == ground_truth)
    formatted = float(response.startswith("<"))
    return {"reward": correct, "format_reward": formatted, "answer_reward": correct}


def test_compute_group_normalized_rewards():
    responses = ["<a", "b", "<a", "<a", "x", "y", "<z", "w"]
    truths = ["<a"] * 4 + ["q"] * 4
    adv, raw, meta = losses.compute_group_normalized_rewards(
        _fake_reward_fn,
        responses,
        truths,
        group_size=4,
        advantage_eps=1e-6,
        normalize_by_std=True,
    )
    np.testing.assert_array_equal(raw, [1, 0, 1, 1, 0, 0, 0, 0])
    assert isinstance(adv, np.ndarray) and adv.dtype == raw.dtype == np.float32
    np.testing.assert_allclose(adv, np_group_normalize(raw, 4, 1e-6, True), rtol=RTOL)
    assert meta["reward_mean"] == pytest.approx(3 / 8)
    assert meta["reward_std"] == pytest.approx(np.std(raw))
    assert (meta["reward_max"], meta["reward_min"]) == (1.0, 0.0)
    assert meta["format_reward_mean"] == pytest.approx(4 / 8)
    assert meta["answer_reward_mean"] == pytest.approx(3 / 8)
    assert meta["frac_reward_zero_std"] == 0.5  # the second group is all 0
    assert all(isinstance(v, float) for v in meta.values())


def test_compute_group_normalized_rewards_errors():
    with pytest.raises(ValueError, match="not divisible"):
        losses.compute_group_normalized_rewards(
            _fake_reward_fn, ["a"] * 6, ["a"] * 6, 4, 1e-6, True
        )
    with pytest.raises(ValueError, match="ground truths"):
        losses.compute_group_normalized_rewards(
            _fake_reward_fn, ["a"] * 4, ["a"] * 3, 2, 1e-6, True
        )
    with pytest.raises(ValueError, match="no rollouts"):
        losses.compute_group_normalized_rewards(_fake_reward_fn, [], [], 2, 1e-6, True)
    with pytest.raises(ValueError, match="'reward'"):
        losses.compute_group_normalized_rewards(
            lambda r, g: {"score": 1.0}, ["a"] * 2, ["a"] * 2, 2, 1e-6, True
        )


# --- per-token policy-gradient losses --------------------------------------------------------

B, T = 3, 5


def _pg_inputs(seed=8):
    """float32 log-probs, old log-probs and [B, 1] advantages (the float64 refs use these)."""
    rng = _rng(seed)
    logp = -rng.uniform(0.1, 3.0, size=(B, T))
    old = logp + rng.normal(scale=0.3, size=(B, T))  # ratios roughly in [0.4, 2.5]
    adv = np.array([[1.5], [-0.7], [0.4]])
    return tuple(a.astype(np.float32) for a in (logp, old, adv))


def np_grpo_clip(adv, logp, old, lo, hi):
    """float64 loss, d loss / d logp and is_clipped, derived by hand."""
    adv, logp, old = (np.asarray(a, np.float64) for a in (adv, logp, old))
    ratio = np.exp(logp - old)
    unclipped = ratio * adv
    clipped = np.clip(ratio, 1 - lo, 1 + hi) * adv
    loss = -np.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    # Where the unclipped term is the min its gradient is -A * ratio; the clipped term is
    # constant in logp once the ratio is outside the range.
    grad = np.where(is_clipped, 0.0, -adv * ratio)
    return loss, grad, is_clipped


def test_naive_policy_gradient_loss():
    logp, _, adv = _pg_inputs()
    fn = jit(losses.compute_naive_policy_gradient_loss)
    np.testing.assert_allclose(fn(adv, logp), -adv * logp, rtol=RTOL)
    np.testing.assert_allclose(fn(adv[:, 0], logp), -adv * logp, rtol=RTOL)  # [B] is [B, 1]
    _, grad = value_and_grad(lambda lp: losses.compute_naive_policy_gradient_loss(adv, lp).sum())(
        logp
    )
    np.testing.assert_allclose(grad, np.broadcast_to(-adv, (B, T)), rtol=RTOL)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        losses.compute_naive_policy_gradient_loss(np.ones((B, 2)), logp)


@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_clip_loss_values_and_gradient(lo, hi):
    logp, old, adv = _pg_inputs()
    want, want_grad, want_clipped = np_grpo_clip(adv, logp, old, lo, hi)
    assert 0 < want_clipped.sum() < want_clipped.size  # the case covers both branches

    def f(lp):
        loss, meta = losses.compute_grpo_clip_loss(adv, lp, old, lo, cliprange_high=hi)
        return loss.sum(), (loss, meta)

    (_, (loss, meta)), grad = value_and_grad(f, has_aux=True)(logp)
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(meta["is_clipped"], want_clipped)
    np.testing.assert_allclose(meta["ratio"], np.exp(logp - old), rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)


def test_grpo_clip_hand_values():
    # ratio 2 with A = 1 is clipped to 1.2; ratio 0.5 with A = 1 keeps 0.5 (min);
    # ratio 0.5 with A = -1 is clipped to 0.8 (-0.8 < -0.5); ratio 1 is never clipped.
    old = np.zeros((2, 3), np.float32)
    logp = np.log(np.array([[2.0, 0.5, 1.0], [2.0, 0.5, 1.0]], np.float32))
    adv = np.array([[1.0], [-1.0]], np.float32)
    loss, meta = jit(losses.compute_grpo_clip_loss)(adv, logp, old, 0.2)
    np.testing.assert_allclose(loss, [[-1.2, -0.5, -1.0], [2.0, 0.8, 1.0]], rtol=RTOL)
    np.testing.assert_array_equal(meta["is_clipped"], [[True, False, False], [False, True, False]])


def test_policy_gradient_loss_dispatch():
    logp, old, adv = _pg_inputs()
    raw = adv + 1.0
    fn = jit(losses.compute_policy_gradient_loss)
    kw = dict(raw_rewards=raw, advantages=adv, old_log_probs=old, cliprange=0.2)
    loss, meta = fn(logp, "no_baseline", **kw)
    np.testing.assert_allclose(loss, -raw * logp, rtol=RTOL)
    assert meta == {}
    loss, _ = fn(logp, "reinforce_with_baseline", **kw)
    np.testing.assert_allclose(loss, -adv * logp, rtol=RTOL)
    loss, meta = fn(logp, "grpo_clip", **kw)
    np.testing.assert_allclose(loss, np_grpo_clip(adv, logp, old, 0.2, 0.2)[0], rtol=RTOL)
    assert set(meta) == {"ratio", "is_clipped"}
    loss, meta = fn(logp, "grpo_no_clip", **kw)
    np.testing.assert_allclose(loss, -np.exp(logp - old) * adv, rtol=RTOL)
    assert set(meta) == {"ratio"}
    # DAPO clip-higher through the dispatcher, without a symmetric cliprange.
    loss, _ = fn(
        logp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange_low=0.1, cliprange_high=0.3
    )
    np.testing.assert_allclose(loss, np_grpo_clip(adv, logp, old, 0.1, 0.3)[0], rtol=RTOL)


def test_policy_gradient_loss_errors():
    logp, old, adv = _pg_inputs()
    fn = losses.compute_policy_gradient_loss
    with pytest.raises(ValueError, match="choose one of.*grpo_clip"):
        fn(logp, "ppo", advantages=adv)
    with pytest.raises(ValueError, match="needs raw_rewards"):
        fn(logp, "no_baseline", advantages=adv)
    with pytest.raises(ValueError, match="needs advantages"):
        fn(logp, "reinforce_with_baseline", raw_rewards=adv)
    with pytest.raises(ValueError, match="needs old_log_probs"):
        fn(logp, "grpo_clip", advantages=adv, cliprange=0.2)
    with pytest.raises(ValueError, match="cliprange"):
        fn(logp, "grpo_clip", advantages=adv, old_log_probs=old)
    with pytest.raises(ValueError, match="cliprange"):
        fn(logp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange_high=0.3)


def test_kl_k3():
    logp, old, _ = _pg_inputs()
    d = old.astype(np.float64) - logp
    got = jit(losses.kl_k3)(logp, old)
    np.testing.assert_allclose(got, np.exp(d) - d - 1, rtol=1e-4, atol=ATOL)
    assert np.all(np.asarray(got) >= 0)
    np.testing.assert_array_equal(jit(losses.kl_k3)(logp, logp), 0.0)


# --- microbatch losses -----------------------------------------------------------------------

MASK = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 1]], bool)  # row 1: empty


def test_sft_microbatch_loss_value_and_gradient():
    logp, _, _ = _pg_inputs()
    gas, c = 4, 2.5

    def f(lp):
        return losses.sft_microbatch_loss(lp, MASK, gas, c)

    (loss, meta), grad = value_and_grad(f, has_aux=True)(logp)
    want = -np.mean(np.where(MASK, logp.astype(np.float64), 0).sum(-1) / c) / gas
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(grad, -(MASK / (B * c * gas)), rtol=RTOL)
    assert float(meta["num_response_tokens"]) == MASK.sum()
    np.testing.assert_allclose(meta["nll_per_token"], -logp[MASK].mean(), rtol=RTOL)
    np.testing.assert_allclose(f(logp)[0], loss, rtol=1e-6)  # eager == jit
    # bf16 log-probs give a float32 loss within bf16 resolution of the fp32 one.
    loss16, _ = jax.jit(f)(jnp.asarray(logp, jnp.bfloat16))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss, rtol=BF16_TOL)


def np_grpo_microbatch(logp, old, adv, mask, gas, agg, c=None, ref=None, beta=0.0):
    """float64 loss and d loss / d logp for grpo_clip (eps 0.2), derived by hand."""
    per_token, g_tok, _ = np_grpo_clip(adv, logp, old, 0.2, 0.2)
    if ref is not None:
        d = np.asarray(ref, np.float64) - logp
        per_token = per_token + beta * (np.exp(d) - d - 1)
        g_tok = g_tok + beta * (1 - np.exp(d))  # d/dlogp of exp(ref-logp) - (ref-logp) - 1
    count = np.maximum(mask.sum(-1, keepdims=True), 1)
    rows = mask.shape[0]
    if agg == "masked_mean":
        loss = np.mean(np.where(mask, per_token, 0).sum(-1) / count[:, 0])
        weight = mask / (count * rows)
    elif agg == "token_mean":
        loss = np.where(mask, per_token, 0).sum() / mask.sum()
        weight = mask / mask.sum()
    else:
        loss = np.mean(np.where(mask, per_token, 0).sum(-1) / c)
        weight = mask / (c * rows)
    return loss / gas, g_tok * weight / gas


@pytest.mark.parametrize("agg", ["masked_mean", "token_mean", "masked_normalize"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_microbatch_loss_value_and_gradient(agg, beta):
    logp, old, adv = _pg_inputs()
    ref = (old + _rng(9).normal(scale=0.2, size=old.shape)).astype(np.float32)
    gas, c = 2, 8.0
    ref_arg = ref if beta else None

    def f(lp):
        return losses.grpo_microbatch_loss(
            lp,
            MASK,
            gas,
            "grpo_clip",
            advantages=adv,
            old_log_probs=old,
            cliprange=0.2,
            length_normalization=agg,
            normalize_constant=c,
            ref_log_probs=ref_arg,
            beta=beta,
        )

    (loss, meta), grad = value_and_grad(f, has_aux=True)(logp)
    want, want_grad = np_grpo_microbatch(logp, old, adv, MASK, gas, agg, c, ref_arg, beta)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=1e-7)
    assert np.all(grad[1] == 0)  # the all-masked row gets no gradient

    _, _, is_clipped = np_grpo_clip(adv, logp, old, 0.2, 0.2)
    np.testing.assert_allclose(meta["clip_fraction"], is_clipped[MASK].mean(), rtol=RTOL)
    ratio = np.exp(logp.astype(np.float64) - old)
    np.testing.assert_allclose(meta["ratio_mean"], ratio[MASK].mean(), rtol=RTOL)
    assert float(meta["num_response_tokens"]) == MASK.sum()
    assert ("kl" in meta) == bool(beta)
    if beta:
        d = ref.astype(np.float64) - logp
        np.testing.assert_allclose(meta["kl"], (np.exp(d) - d - 1)[MASK].mean(), rtol=1e-4)
    assert all(value.shape == () for value in meta.values())  # scalars only

    if agg == "masked_mean" and beta:  # eager == jit, once (eager compiles op by op)
        eager_loss, eager_meta = f(logp)
        np.testing.assert_allclose(eager_loss, loss, rtol=1e-6)
        for k in meta:
            np.testing.assert_allclose(eager_meta[k], meta[k], rtol=1e-6)


def test_grpo_microbatch_loss_other_loss_types():
    logp, old, adv = _pg_inputs()
    raw = adv + 1.0
    fn = jit(losses.grpo_microbatch_loss)
    for loss_type, coef in [("no_baseline", -raw), ("reinforce_with_baseline", -adv)]:
        loss, meta = fn(logp, MASK, 1, loss_type, raw_rewards=raw, advantages=adv)
        want = np_masked_mean(coef * logp, MASK, -1).mean()
        np.testing.assert_allclose(loss, want, rtol=RTOL)
        assert "clip_fraction" not in meta and "ratio_mean" not in meta
    loss, meta = fn(logp, MASK, 1, "grpo_no_clip", advantages=adv, old_log_probs=old)
    want = np_masked_mean(-np.exp(logp - old) * adv, MASK, -1).mean()
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    assert "ratio_mean" in meta and "clip_fraction" not in meta


@pytest.mark.parametrize("agg", ["masked_mean", "token_mean", "masked_normalize"])
def test_grpo_microbatch_loss_all_masked_batch_is_zero_with_finite_gradient(agg):
    logp, old, adv = _pg_inputs()
    logp[0, 0] = -np.inf  # garbage under the mask
    mask = np.zeros((B, T), bool)

    def f(lp):
        return losses.grpo_microbatch_loss(
            lp,
            mask,
            1,
            "grpo_clip",
            advantages=adv,
            old_log_probs=old,
            cliprange=0.2,
            length_normalization=agg,
            normalize_constant=4.0,
        )

    (loss, meta), grad = value_and_grad(f, has_aux=True)(logp)
    assert float(loss) == 0.0 and float(meta["clip_fraction"]) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_grpo_microbatch_loss_tis_weights():
    logp, old, adv = _pg_inputs()
    sampler = old + np.array([[0.0, 0.1, -0.1, 2.0, -2.0]], np.float32)  # last two: extreme
    cap = 1.5

    def f(lp):
        return losses.grpo_microbatch_loss(
            lp,
            MASK,
            1,
            "grpo_clip",
            advantages=adv,
            old_log_probs=old,
            cliprange=0.2,
            tis_log_probs=sampler,
            tis_cap=cap,
        )

    (loss, meta), grad = value_and_grad(f, has_aux=True)(logp)
    w = np.minimum(np.exp(old.astype(np.float64) - sampler), cap)
    per_token, g_tok, _ = np_grpo_clip(adv, logp, old, 0.2, 0.2)
    np.testing.assert_allclose(loss, np_masked_mean(w * per_token, MASK, -1).mean(), rtol=RTOL)
    count = np.maximum(MASK.sum(-1, keepdims=True), 1)
    # The weight is a constant (stop_gradient): it only scales the per-token gradient.
    np.testing.assert_allclose(grad, w * g_tok * MASK / (count * B), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(meta["tis_weight_mean"], w[MASK].mean(), rtol=RTOL)

    # On-policy without old_log_probs: the trainer's own (detached) log-probs are the base.
    loss, _ = jit(losses.grpo_microbatch_loss)(
        logp,
        MASK,
        1,
        "reinforce_with_baseline",
        advantages=adv,
        tis_log_probs=sampler,
        tis_cap=cap,
    )
    w = np.minimum(np.exp(logp.astype(np.float64) - sampler), cap)
    want = np_masked_mean(-w * adv * logp, MASK, -1).mean()
    np.testing.assert_allclose(loss, want, rtol=RTOL)


def test_grpo_microbatch_loss_bf16_close_to_fp32():
    logp, old, adv = _pg_inputs()
    ref = old - 0.1

    def f(lp, o, r):
        return losses.grpo_microbatch_loss(
            lp,
            MASK,
            2,
            "grpo_clip",
            advantages=adv,
            old_log_probs=o,
            cliprange=0.2,
            ref_log_probs=r,
            beta=0.05,
        )[0]

    step = value_and_grad(f)
    loss32, grad32 = step(logp, old, ref)
    loss16, grad16 = step(*(jnp.asarray(a, jnp.bfloat16) for a in (logp, old, ref)))
    assert loss16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
    grad16 = np.asarray(grad16, np.float32)
    assert np.isfinite(float(loss16)) and np.all(np.isfinite(grad16))
    # Log-probs down to -3 in bf16 move by up to 3 * 2**-9 ~= 0.006, so ratios by ~1%.
    np.testing.assert_allclose(loss16, loss32, rtol=BF16_TOL, atol=BF16_TOL)
    np.testing.assert_allclose(grad16, grad32, atol=BF16_TOL)


def test_grpo_microbatch_loss_errors():
    logp, old, adv = _pg_inputs()
    fn = losses.grpo_microbatch_loss
    kw = dict(advantages=adv, old_log_probs=old, cliprange=0.2)
    with pytest.raises(ValueError, match="choose one of"):
        fn(logp, MASK, 1, "grpo_clip", length_normalization="sum", **kw)
    with pytest.raises(ValueError, match="needs normalize_constant"):
        fn(logp, MASK, 1, "grpo_clip", length_normalization="masked_normalize", **kw)
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        fn(logp, MASK, 1, "grpo_clip", beta=0.1, **kw)
    with pytest.raises(ValueError, match="needs old_log_probs"):
        fn(logp, MASK, 1, "grpo_clip", advantages=adv, cliprange=0.2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        fn(logp, MASK, 1, "dpo", **kw)
