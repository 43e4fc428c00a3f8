"""Token sampling strategies as pure, jit-able functions.

Shapes: B batch, V vocabulary. Logits are processed in float32. Which filters run is
decided by Python flags (static under jit), so a call compiles at most one variant per
combination actually used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row cannot produce NaNs


def mask_tokens(logits: jax.Array, token_ids: jax.Array, where: jax.Array) -> jax.Array:
    """Forbids ``token_ids`` in the rows where ``where`` is True.

    Args:
        logits: [B, V]; token_ids: [E] int; where: [B] bool.
    """
    forbidden = jnp.zeros(logits.shape[-1], jnp.bool_).at[token_ids].set(True)  # [V]
    return jnp.where(where[:, None] & forbidden[None, :], NEG_INF, logits)


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keeps the ``k`` largest logits of each row (ties at the threshold are kept).

    Args:
        logits: [B, V]; k: int scalar >= 1 (traced: no recompilation per value).
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(k, 1, logits.shape[-1])
    threshold = jnp.take(sorted_desc, k - 1, axis=-1)[:, None]  # [B, 1]
    return jnp.where(logits < threshold, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of top tokens whose probability reaches ``p``.

    The most likely token is always kept.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep_sorted = mass_before < p
    # The smallest kept logit is the threshold.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


_BLOCK = 128  # vocabulary block of the two-level searches below


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """[B, V] -> [B, ceil(V / _BLOCK), _BLOCK], the tail padded with ``fill``."""
    b, v = x.shape
    nb = -(-v // _BLOCK)
    return jnp.pad(x, ((0, 0), (0, nb * _BLOCK - v)), constant_values=fill).reshape(
        b, nb, _BLOCK
    )


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis of [B, V] (first index on ties), in two levels.

    The block holding the first maximum, then the first maximum inside it: the same result
    as ``jnp.argmax``, written out because XLA's CPU backend runs one (value, index)
    reduction over a whole vocabulary row several times slower than a plain max plus a
    short argmax (``benchmarks/decode_ops.py``).

    Args:
        x: [B, V] float. Returns: [B] int32.
    """
    xb = _blocks(x, -jnp.inf)
    blk = jnp.argmax(jnp.max(xb, axis=-1), axis=-1)  # [B]
    in_block = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
    return (blk * _BLOCK + jnp.argmax(in_block, axis=-1)).astype(jnp.int32)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """Draws one token per row from ``softmax(logits)`` by inverting the CDF.

    One uniform number per row, found in two levels: the block of ``_BLOCK`` tokens whose
    cumulative mass passes it, then the token inside that block. Exact in distribution
    (up to float32 rounding of the sums), like ``jax.random.categorical``, which instead
    draws a Gumbel number per vocabulary entry: on CPU those V random numbers per row and
    step cost several times more than the whole search (``benchmarks/decode_ops.py``).

    Tokens whose logit is ``NEG_INF`` (or any token of zero probability) are never drawn.

    Args:
        keys: [B] PRNG keys, one per row. logits: [B, V] float32.

    Returns:
        [B] int32 tokens.
    """
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V] unnormalised
    probs = _blocks(probs, 0.0)  # [B, nb, _BLOCK]
    nb = probs.shape[1]
    block_cdf = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [B, nb]
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)  # [B] in [0, 1)
    target = u * block_cdf[:, -1]  # [B], below the total mass
    # First block whose cumulative mass exceeds the target: a block of zero mass never
    # does (its cdf equals its predecessor's). The clip only guards float rounding.
    blk = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), nb - 1)  # [B]
    before = jnp.where(blk > 0, jnp.take_along_axis(block_cdf, (blk - 1)[:, None], 1)[:, 0], 0.0)
    in_block = jnp.take_along_axis(probs, blk[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
    cdf = jnp.cumsum(in_block, axis=-1)
    idx = jnp.sum(cdf <= (target - before)[:, None], axis=-1)  # [B]
    # Rounding may push the index past the block's last token of nonzero probability.
    iota = jnp.arange(_BLOCK, dtype=jnp.int32)
    last = jnp.max(jnp.where(in_block > 0, iota[None], -1), axis=-1)
    return (blk * _BLOCK + jnp.minimum(idx, last)).astype(jnp.int32)


def sample_tokens(
    keys: jax.Array,
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
        keys: [B] PRNG keys, one stream per row (unused when greedy).
        logits: [B, V] raw model logits (after any min-token masking).
        temperature, top_k, top_p: scalars (traced).
        greedy, use_top_k, use_top_p: static switches.

    Returns:
        ``(tokens [B] int32, logprobs [B] float32)``: the log-prob is under the raw
        (unfiltered, temperature-1) distribution of ``logits``, as vLLM reports it.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens = first_argmax(logits)
    else:
        scaled = logits / temperature
        if use_top_k:
            scaled = top_k_filter(scaled, top_k)
        if use_top_p:
            scaled = top_p_filter(scaled, top_p)
        tokens = categorical(keys, scaled)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, tokens[b]]`` without materialising the log-softmax.

    Args:
        logits: [B, V] float32; tokens: [B] int. Returns: [B] float32.
    """
    best = jnp.max(logits, axis=-1)
    lse = best + jnp.log(jnp.sum(jnp.exp(logits - best[:, None]), axis=-1))
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
