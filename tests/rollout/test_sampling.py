"""The sampler's pure functions against NumPy references and hand-built distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rollout.sampling import (
    NEG_INF,
    categorical,
    first_argmax,
    sample_tokens,
    token_logprobs,
)


def _keys(n, seed=0):
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(n))


def test_first_argmax_equals_argmax_and_takes_the_first_tie():
    x = np.random.default_rng(0).normal(size=(64, 300)).astype(np.float32)
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
    ties = np.zeros((2, 7), np.float32)
    ties[0, [2, 5]] = 1.0
    ties[1, :] = -3.0
    np.testing.assert_array_equal(first_argmax(jnp.asarray(ties)), [2, 0])


@pytest.mark.parametrize("vocab", [300, 512])  # 300: the last block is padded
def test_categorical_inverts_the_cdf_exactly(vocab):
    rows = 256
    logits = np.random.default_rng(1).normal(size=(rows, vocab)).astype(np.float32) * 3
    keys = _keys(rows)
    got = np.asarray(categorical(keys, jnp.asarray(logits)))
    # Reference: the same uniform per row, the full-vocabulary CDF in float64.
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float64)
    cdf = np.cumsum(p, axis=-1)
    want = [np.searchsorted(cdf[r], u[r] * cdf[r, -1], side="right") for r in range(rows)]
    np.testing.assert_array_equal(got, want)


def test_categorical_never_draws_a_forbidden_token():
    vocab, rows = 300, 2048
    logits = np.full((rows, vocab), NEG_INF, np.float32)
    allowed = [0, 127, 128, 299]  # block edges and the padded last block
    logits[:, allowed] = np.random.default_rng(2).normal(size=(rows, len(allowed)))
    got = np.asarray(categorical(_keys(rows), jnp.asarray(logits)))
    assert set(got.tolist()) == set(allowed)
    one = np.full((4, vocab), NEG_INF, np.float32)
    one[:, 200] = 0.0
    np.testing.assert_array_equal(categorical(_keys(4), jnp.asarray(one)), [200] * 4)


def test_categorical_frequencies_follow_the_softmax():
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    rows = 40_000
    logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
    logits[-1] = NEG_INF
    got = np.asarray(categorical(_keys(rows, seed=3), jnp.asarray(np.tile(logits, (rows, 1)))))
    freq = np.bincount(got, minlength=len(probs)) / rows
    # 5 standard errors of a binomial proportion at n=40,000 is <= 0.0125.
    np.testing.assert_allclose(freq, probs, atol=0.0125)
    assert freq[-1] == 0


def test_sample_tokens_temperature_and_filters():
    rows = 4096
    logits = jnp.asarray(np.tile(np.array([2.0, 1.0, 0.0, -1.0], np.float32), (rows, 1)))
    keys = _keys(rows, seed=4)
    kw = dict(top_k=jnp.int32(0), top_p=jnp.float32(1.0))
    tok, lp = sample_tokens(
        keys, logits, jnp.float32(1.0), greedy=False, use_top_k=False, use_top_p=False, **kw
    )
    # Log-probs are those of the raw distribution whatever the sampling settings.
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(rows), tok], atol=1e-6)
    cold, _ = sample_tokens(
        keys, logits, jnp.float32(0.05), greedy=False, use_top_k=False, use_top_p=False, **kw
    )
    assert (np.asarray(cold) == 0).mean() > 0.999
    top2, _ = sample_tokens(
        keys,
        logits,
        jnp.float32(1.0),
        jnp.int32(2),
        jnp.float32(1.0),
        greedy=False,
        use_top_k=True,
        use_top_p=False,
    )
    assert set(np.asarray(top2).tolist()) == {0, 1}
    greedy, _ = sample_tokens(
        keys, logits, jnp.float32(1.0), greedy=True, use_top_k=False, use_top_p=False, **kw
    )
    assert (np.asarray(greedy) == 0).all()


def test_token_logprobs_equal_log_softmax():
    logits = np.random.default_rng(5).normal(size=(8, 1000)).astype(np.float32) * 10
    tokens = np.arange(8) * 97
    want = jax.nn.log_softmax(jnp.asarray(logits))[np.arange(8), tokens]
    np.testing.assert_allclose(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)), want,
                               atol=1e-5)
