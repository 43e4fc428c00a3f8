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


def sample_tokens(
    rng: jax.Array,
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
        rng: a PRNG key.
        logits: [B, V] raw model logits (after any min-token masking).
        temperature, top_k, top_p: scalars (traced).
        greedy, use_top_k, use_top_p: static switches.

    Returns:
        ``(tokens [B] int32, logprobs [B] float32)``: the log-prob is under the raw
        (unfiltered, temperature-1) distribution of ``logits``, as vLLM reports it.
    """
    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        if use_top_k:
            scaled = top_k_filter(scaled, top_k)
        if use_top_p:
            scaled = top_p_filter(scaled, top_p)
        tokens = jax.random.categorical(rng, scaled, axis=-1)
    tokens = tokens.astype(jnp.int32)
    logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
