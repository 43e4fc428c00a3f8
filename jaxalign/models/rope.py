"""Rotary position embeddings (RoPE) as pure functions.

Two halves:
  * ``rope_frequencies`` turns a Hugging Face ``rope_parameters`` / ``rope_scaling`` dict
    into inverse frequencies and an attention scaling factor. It is plain NumPy, run once
    at trace time, except for dynamic NTK whose frequencies depend on the sequence length
    and are therefore computed in-graph by ``dynamic_ntk_inv_freq``.
  * ``apply_rope`` rotates query/key vectors, in float32 whatever the compute dtype (the
    angle of a position in the thousands loses its low bits in bf16).

The formulas follow ``transformers.modeling_rope_utils`` so that logits match the
reference model; the parity tests in ``tests/models`` check each supported type.

Shapes: B batch, T sequence, N heads, H head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    # Same op order as transformers: int arange -> float32 -> divide -> power.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None,
    max_position_embeddings: int,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention scaling for a rope configuration.

    Args:
        head_dim: H, the per-head dimension (the rotary dimension; Qwen2 rotates all of it).
        theta: the RoPE base (``rope_theta``).
        scaling: ``None`` or a dict with ``rope_type`` (``type`` also accepted) and its
            parameters as in Hugging Face configs. For ``dynamic`` the returned frequencies
            are the unscaled ones; use ``dynamic_ntk_inv_freq`` at run time.
        max_position_embeddings: the config's ``max_position_embeddings``.

    Returns:
        ``(inv_freq[H // 2] float32, attention_scaling)``; cos and sin are multiplied by
        ``attention_scaling`` (1.0 except for YaRN).
    """
    rope_type = rope_type_of(scaling)
    inv_freq = _base_inv_freq(theta, head_dim)
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, max_position_embeddings)
    raise AssertionError(rope_type)  # rope_type_of validated it


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
    """The rope type named by a scaling dict, validated against what we implement."""
    if not scaling:
        return "default"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    return rope_type


def _llama3_inv_freq(inv_freq: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(
    dim: int, theta: float, s: Mapping[str, Any], max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    original_max = s.get("original_max_position_embeddings") or max_position_embeddings
    factor = s.get("factor") or max_position_embeddings / original_max

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def dynamic_ntk_inv_freq(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    factor: float,
    max_position_embeddings: int,
) -> jax.Array:
    """Dynamic-NTK inverse frequencies for the longest sequence in ``positions``.

    The base grows with the sequence length once it exceeds ``max_position_embeddings``;
    below that the frequencies are the plain ones. Computed in-graph so a jitted model
    needs no recompilation when sequences grow.

    Args:
        positions: [B, T] integer position ids.

    Returns:
        inv_freq [H // 2] float32.
    """
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base**exponent)


def rope_cos_sin(
    positions: jax.Array, inv_freq: jax.Array, attention_scaling: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for the given positions.

    Args:
        positions: [B, T] integer position ids.
        inv_freq: [H // 2] float32.

    Returns:
        ``(cos, sin)``, each [B, T, H] float32 (the half-dim table repeated twice, the
        ``rotate_half`` layout Qwen2 checkpoints use).
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` by position.

    Args:
        x: [B, T, N, H] queries or keys, any float dtype.
        cos, sin: [B, T, H] float32 from ``rope_cos_sin``.

    Returns:
        [B, T, N, H] in the dtype of ``x``.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
