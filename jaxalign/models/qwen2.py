"""Qwen2 causal language model in Flax NNX.

Attribute names follow Hugging Face (``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.norm``, ``lm_head``) and every parameter is
called ``weight`` or ``bias``, so an NNX state path *is* the safetensors key and conversion
(``hf_io.py``) is a table of per-key transposes and reshapes.

Every parameter carries logical axis names (``Param.logical_axes``); ``jaxalign.sharding``
maps them to mesh axes, so the model never mentions a mesh.

Dimension legend (used in einsum strings, shape comments and logical axis names):
    B batch, T query length, S key length, D model (``embed``), N query heads (``heads``),
    K key/value heads (``kv_heads``), G query heads per kv head (N // K), H head dim
    (``head_dim``), F MLP hidden (``mlp``), V vocabulary (``vocab``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import sharding
from jaxalign.models import rope

ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "save_dots")

# HF config keys that Qwen2Config mirrors as fields; everything else in config.json is kept
# verbatim in ``Qwen2Config.hf_extra`` so export writes back what it read.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "hidden_act",
)


def _to_dtype(x: Any) -> jnp.dtype:
    return jnp.dtype(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture (mirrors ``transformers.Qwen2Config``) plus jaxalign runtime settings.

    Runtime settings (not written to config.json): ``dtype`` is the compute dtype,
    ``param_dtype`` the storage dtype of parameters (bf16 compute with fp32 parameters is
    the training default), ``attention_impl`` one of ``ATTENTION_IMPLS`` and ``remat`` one
    of ``REMAT_POLICIES`` (activation checkpointing per decoder layer).
    """

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = dataclasses.field(default=None, hash=False)
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # Runtime settings.
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    # Everything else from config.json (token ids, torch_dtype, ...), written back on export.
    hf_extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        rope.rope_type_of(self.rope_scaling)  # raises for unsupported types

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    def layer_uses_sliding_window(self, i: int) -> bool:
        # transformers: layers with index >= max_window_layers use the window.
        return bool(self.use_sliding_window and self.sliding_window and i >= self.max_window_layers)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * n * h + n * h + 2 * (d * k * h + k * h) + n * h * d
        layer = attn + 3 * d * f + 2 * d
        return (
            v * d + self.num_hidden_layers * layer + d + (0 if self.tie_word_embeddings else d * v)
        )

    def flops_per_token(self, seq_len: int, backward: bool = True) -> float:
        """Model FLOPs per token, PaLM convention (used for MFU).

        Forward: 2 FLOPs per weight in a matmul (every parameter but the embedding lookup;
        the LM head counts even when tied) plus 4 * T * D per layer for attention scores and
        values over the full (not causally halved) sequence. Backward doubles it (x3 total).
        """
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size
        matmul_params += self.vocab_size * self.hidden_size  # the LM head, tied or not
        matmul_params -= self.num_hidden_layers * 2 * self.hidden_size + self.hidden_size  # norms
        forward = 2 * matmul_params + 4 * self.num_hidden_layers * seq_len * self.hidden_size
        return float(forward * (3 if backward else 1))

    # --- Hugging Face config.json <-> Qwen2Config -------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **runtime: Any) -> Qwen2Config:
        """Builds a config from a parsed HF ``config.json``.

        Raises:
            ValueError: naming ``source`` when the architecture is not Qwen2 or a field is
                missing.
        """
        model_type = d.get("model_type")
        if model_type != "qwen2":
            archs = d.get("architectures")
            raise ValueError(
                f"{source}: model_type={model_type!r} (architectures={archs}); jaxalign loads "
                "Qwen2-family checkpoints only (model_type 'qwen2', e.g. Qwen2.5, Qwen2.5-Math)"
            )
        d = dict(d)
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
        rope_params = d.pop("rope_parameters", None) or {}
        rope_scaling = d.pop("rope_scaling", None)
        theta = d.pop("rope_theta", None) or rope_params.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        kwargs: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": rope_scaling}
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required fields {missing}")
        for key in _HF_FIELDS:
            if key in d and key != "rope_theta":
                kwargs[key] = d.pop(key)
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "initializer_range" in d:
            kwargs["initializer_range"] = d.pop("initializer_range")
        for key in ("dtype", "param_dtype"):
            if key in runtime and runtime[key] is not None:
                runtime[key] = _to_dtype(runtime[key])
            else:
                runtime.pop(key, None)
        return cls(**kwargs, **runtime, hf_extra=d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime: Any) -> Qwen2Config:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path), **runtime)

    def to_hf_dict(self) -> dict:
        """The config.json dictionary (architecture fields plus everything read with it)."""
        d = dict(self.hf_extra)
        for key in _HF_FIELDS:
            d[key] = getattr(self, key)
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = self.rope_scaling
        d["initializer_range"] = self.initializer_range
        d["model_type"] = "qwen2"
        d.setdefault("architectures", ["Qwen2ForCausalLM"])
        return d

    def to_hf(self):
        """A ``transformers.Qwen2Config`` with the same architecture."""
        import transformers

        d = self.to_hf_dict()
        d.pop("model_type", None)
        return transformers.Qwen2Config(**d)


# --- presets -------------------------------------------------------------------------


def qwen2p5_math_1p5b(**runtime: Any) -> Qwen2Config:
    """Qwen2.5-Math-1.5B (1.54B parameters, tied embeddings)."""
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_window_layers=21,
        **runtime,
    )


def qwen2p5_0p5b(**runtime: Any) -> Qwen2Config:
    """Qwen2.5-0.5B (0.49B parameters, tied embeddings)."""
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_window_layers=21,
        **runtime,
    )


def qwen2p5_7b(**runtime: Any) -> Qwen2Config:
    """Qwen2.5-7B's shape (7.62B parameters, untied head): for memory planning from shapes."""
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        max_window_layers=28,
        **runtime,
    )


def small(**overrides: Any) -> Qwen2Config:
    """A few-million-parameter config: the CPU demo's policy (with the byte tokenizer)."""
    base = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype=jnp.float32,
    )
    base.update(overrides)
    return Qwen2Config(**base)


def tiny(**overrides: Any) -> Qwen2Config:
    """A few-hundred-thousand-parameter config for tests and the CPU demo."""
    base = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        dtype=jnp.float32,
    )
    base.update(overrides)
    return Qwen2Config(**base)


# --- modules ---------------------------------------------------------------------------


class Param(nnx.Param):
    """An ``nnx.Param`` whose metadata ``logical_axes`` names each dimension."""


def _param(rngs: nnx.Rngs | None, init, shape, dtype, logical_axes) -> Param:
    assert len(shape) == len(logical_axes), (shape, logical_axes)
    value = init(rngs.params(), shape, dtype) if rngs is not None else jnp.zeros(shape, dtype)
    return Param(value, logical_axes=tuple(logical_axes))


class Linear(nnx.Module):
    """``y = einsum(x, weight) (+ bias)`` with a multi-dimensional kernel.

    Kernels keep head structure (e.g. q_proj is [D, N, H]) so heads can be sharded without
    reshapes; ``hf_io`` reshapes/transposes to and from HF's [out, in] layout.
    """

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias, cfg, rngs):
        init = nnx.initializers.normal(cfg.initializer_range)
        self.in_ndim = len(in_shape)
        self.dtype = cfg.dtype
        self.weight = _param(
            rngs, init, (*in_shape, *out_shape), cfg.param_dtype, (*in_axes, *out_axes)
        )
        self.bias = (
            _param(rngs, nnx.initializers.zeros, out_shape, cfg.param_dtype, out_axes)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
        y = jax.lax.dot_general(x.astype(self.dtype), w, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        self.eps = cfg.rms_norm_eps
        self.dtype = cfg.dtype
        self.weight = _param(
            rngs, nnx.initializers.ones, (cfg.hidden_size,), cfg.param_dtype, ("norm",)
        )

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        # Normalise in fp32 (as transformers does), then scale in the compute dtype.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        init = nnx.initializers.normal(cfg.initializer_range)
        self.dtype = cfg.dtype
        self.weight = _param(
            rngs, init, (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype, ("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V] (tied head)
        return jnp.einsum("btd,vd->btv", x, self.weight[...].astype(self.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Linear(
            (d,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=True, cfg=cfg, rngs=rngs
        )
        self.k_proj = Linear(
            (d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=True, cfg=cfg, rngs=rngs
        )
        self.v_proj = Linear(
            (d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=True, cfg=cfg, rngs=rngs
        )
        self.o_proj = Linear(
            (n, h), (d,), ("heads", "head_dim"), ("embed",), use_bias=False, cfg=cfg, rngs=rngs
        )

    def __call__(self, x, cos, sin, mask, kv=None, index=None, fresh=False):
        """x [B, T, D], cos/sin [B, T, H], mask [B, 1, T, S] bool -> ([B, T, D], kv).

        Without ``kv`` the keys are this call's own tokens (S == T). With ``kv`` (the
        layer's ``KVCache`` arrays: keys [B, K, H, S], values [B, K, S, H]) this call's keys
        and values are written at slots ``[index, index + T)`` and the queries attend over
        the whole cache; with ``fresh`` (an empty cache, ``index`` 0) they attend over this
        call's tokens only and ``mask`` is [B, 1, T, T].
        """
        q = rope.apply_rope(self.q_proj(x), cos, sin)  # [B, T, N, H]
        k = rope.apply_rope(self.k_proj(x), cos, sin)  # [B, T, K, H]
        v = self.v_proj(x)  # [B, T, K, H]
        impl = self.cfg.attention_impl
        if kv is not None:
            impl = "xla" if impl == "splash" else impl  # splash trains; caches are masked
            # Only the new T slots are transposed into the cache layout, never the cache.
            k_cache, v_cache = kv
            k_new = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)  # [B, K, H, T]
            v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)  # [B, K, T, H]
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, 0, 0, index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, 0, index, 0))
            kv = (k_cache, v_cache)
            if fresh:
                out = attend(q, k, v, mask, impl=impl)
            elif impl == "xla":
                out = attend_cached(q, k_cache, v_cache, mask)
            else:
                k, v = jnp.transpose(k_cache, (0, 3, 1, 2)), jnp.swapaxes(v_cache, 1, 2)
                out = attend(q, k, v, mask, impl=impl)
        else:
            out = attend(q, k, v, mask, impl=impl)  # [B, T, N, H]
        return self.o_proj(out), kv


def attend(q, k, v, mask, *, impl: str = "xla"):
    """Scaled dot-product attention with grouped KV heads.

    Args:
        q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K.
        mask: [B, 1, T, S] bool, True where a query may attend to a key. Every query row
            must allow at least one key (the model lets padding tokens see themselves).
        impl: ``xla`` (plain einsums, the reference, runs everywhere), ``dot_product``
            (``jax.nn.dot_product_attention``, lets XLA pick a fused kernel), ``cudnn``
            (cuDNN flash attention; GPU only, bf16/fp16 inputs) or ``splash`` (TPU's
            splash attention, ``splash_attend``: ``mask`` is then [B, T] segment ids).

    Returns:
        [B, T, N, H] in the dtype of ``q``.
    """
    if impl == "splash":
        return splash_attend(q, k, v, mask)
    if impl != "xla":
        implementation = "cudnn" if impl == "cudnn" else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h) * jnp.asarray(h**-0.5, q.dtype)  # [B, T, K, G, H]
    # Scores accumulate in fp32 whatever the compute dtype.
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


SPLASH_BLOCK = 128  # the kernel's default tile along the sequence: lengths are padded to it


def splash_attend(q, k, v, segment_ids, *, interpret: bool | None = None):
    """Causal attention within segments by TPU's splash attention kernel (Pallas), which
    takes segment ids: packed rows cost no ``[B, 1, T, T]`` mask, and the blocks above the
    causal diagonal are skipped.

    Args:
        q: [B, T, N, H]; k, v: [B, T, K, H] (kv heads repeated to N for the kernel).
        segment_ids: [B, T] int32: a token attends to earlier tokens of its own id (a
            padded row's padding, id 0, only to padding).
        interpret: run the kernel in Pallas' interpreter (default: off a TPU; the tests'
            CPU path, far too slow for training).

    Returns:
        [B, T, N, H] in the dtype of ``q``. Under a mesh (``sharding.traced_on``) the
        kernel runs per shard (``shard_map``): batch over the activations' batch axes,
        heads over ``tensor`` when they divide.
    """
    # Imported here: Pallas' TPU ops load Mosaic, which nothing else needs.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, t, n, h = q.shape
    pad = -t % SPLASH_BLOCK  # padded tokens get segment -1: they attend among themselves
    segment_ids = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, pad)),
                          constant_values=-1)

    def heads_first(x):  # [B, T, K, H] -> [B, N, T', H]
        x = jnp.repeat(x, n // x.shape[2], axis=2)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qh = heads_first(q * jnp.asarray(h**-0.5, q.dtype))
    kh, vh = heads_first(k).astype(q.dtype), heads_first(v).astype(q.dtype)

    def local(qh, kh, vh, seg):  # one shard: [b, n, T', H] x 3, [b, T']
        size = qh.shape[2]
        mask = splash_mask.MultiHeadMask(
            [splash_mask.CausalMask((size, size)) for _ in range(qh.shape[1])])
        kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)  # 128-token blocks
        ids = splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(
            qh, kh, vh, ids)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch = sharding.logical_to_spec(("batch",), sharding.ACTIVATION_RULES, mesh, (b,))[0]
        heads = "tensor" if "tensor" in mesh.shape and n % mesh.shape["tensor"] == 0 and (
            mesh.shape["tensor"] > 1) else None
        spec = jax.sharding.PartitionSpec(batch, heads)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec,
                                                          jax.sharding.PartitionSpec(batch)),
                              out_specs=spec, check_vma=False)
    out = local(qh, kh, vh, segment_ids)  # [B, N, T', H]
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def attend_cached(q, k, v, mask):
    """The plain XLA attention over a ``KVCache`` layer (keys [B, K, H, S], values [B, K, S, H]).

    Args:
        q: [B, T, N, H]; k: [B, K, H, S]; v: [B, K, S, H]; mask: [B, 1, T, S] bool.

    Returns:
        [B, T, N, H] in the dtype of ``q``.
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h) * jnp.asarray(h**-0.5, q.dtype)  # [B, T, K, G, H]
    if t == 1:
        # One query (decoding): broadcast multiply-and-reduce in fp32, which reads the
        # cache once. The score reduction runs over H with the slots S contiguous (the
        # reason keys are stored [B, K, H, S]); on XLA's CPU backend that beats reducing
        # over a contiguous H (benchmarks/decode_ops.py).
        q1 = q[:, 0].astype(jnp.float32)  # [B, K, G, H]
        scores = jnp.sum(q1[..., None] * k[:, :, None].astype(jnp.float32), axis=-2)
        scores = jnp.where(mask[:, :, 0, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, S]
        out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=-2)
        return out.astype(v.dtype).reshape(b, 1, n, h)
    scores = jnp.einsum("btkgh,bkhs->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(
            (d,), (f,), ("embed",), ("mlp",), use_bias=False, cfg=cfg, rngs=rngs
        )
        self.up_proj = Linear((d,), (f,), ("embed",), ("mlp",), use_bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(
            (f,), (d,), ("mlp",), ("embed",), use_bias=False, cfg=cfg, rngs=rngs
        )

    def __call__(self, x):  # [B, T, D]
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        self.self_attn = Attention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, fresh=False):  # [B, T, D]
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, fresh)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Model(nnx.Module):
    """The decoder stack: embeddings -> layers -> final norm (no LM head)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg, rngs=rngs)
        inv_freq, self.attention_scaling = rope.rope_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, not a parameter

    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, fresh_cache=False,
        segment_ids=None,
    ):
        """input_ids [B, T] -> hidden states [B, T, D] (after the final norm).

        With a ``KVCache`` returns ``(hidden, new_cache)``: the tokens are appended at the
        cache's next slot, attend to everything valid before them, and positions continue
        from each row's ``next_pos``. ``fresh_cache=True`` promises an empty cache (a
        prefill): the tokens go to slots ``[0, T)`` and attend among themselves only, not
        over all S slots.

        ``segment_ids`` [B, T] (packed rows, no cache): several sequences per row, numbered
        1, 2, ... (0: padding); a token attends only within its own segment and positions
        restart at 0 in each (``positions_from_segments``), so each sequence computes
        exactly what it would alone in a row of its own.
        """
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training, not with a cache")
            segment_ids = jnp.asarray(segment_ids)
            attention_mask = segment_ids > 0
            if positions is None:
                positions = positions_from_segments(segment_ids)
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
        if positions is None:
            positions = positions_from_mask(attention_mask)
            if cache is not None:
                positions = positions + cache.next_pos[:, None] * attention_mask
        positions = jnp.asarray(positions)

        cos, sin = self._rope(positions)  # [B, T, H]
        key_mask, index, full_mask, window_mask = self._masks(attention_mask, cache, fresh_cache)
        if cfg.attention_impl == "splash" and cache is None:
            if window_mask is not None:
                raise ValueError("attention_impl='splash' has no sliding-window layers here: "
                                 "use attention_impl='xla'")
            # The kernel masks causally within segments itself: [B, T] ids, not [B, 1, T, T].
            full_mask = (attention_mask.astype(jnp.int32) if segment_ids is None
                         else segment_ids.astype(jnp.int32))
        elif segment_ids is not None:  # [B, 1, T, T]: no attention across packed sequences
            same = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            full_mask &= same
            window_mask = None if window_mask is None else window_mask & same

        # The lookup's output would follow the embedding's layout ([V, D over fsdp]); pin it
        # to the batch sharding so each device keeps its own rows through every layer and the
        # vocabulary projection (without it, fsdp gathers the batch: 2x the step's memory at
        # a 152k vocabulary, tests/test_real_recipe.py).
        x = sharding.shard(self.embed_tokens(input_ids), "batch", "length", "embed")  # [B, T, D]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            mask = window_mask if cfg.layer_uses_sliding_window(i) else full_mask
            if cache is None:
                x = _run_layer(layer, x, cos, sin, mask, cfg.remat)
            else:
                kv = (cache.k[i], cache.v[i])
                x, (k, v) = layer(x, cos, sin, mask, kv, index, fresh_cache)
                new_k.append(k)
                new_v.append(v)
        x = sharding.shard(self.norm(x), "batch", "length", "embed")
        if cache is None:
            return x
        return x, KVCache(
            k=tuple(new_k),
            v=tuple(new_v),
            mask=(
                jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, 0))
                if fresh_cache
                else key_mask
            ),
            index=cache.index + t,
            next_pos=cache.next_pos + attention_mask.sum(-1, dtype=jnp.int32),
        )

    def _rope(self, positions):
        """Rotary ``(cos, sin)`` tables for ``positions`` [B, T] (dynamic NTK rescales the
        frequencies by the positions themselves)."""
        cfg = self.cfg
        if rope.rope_type_of(cfg.rope_scaling) == "dynamic":
            inv_freq = rope.dynamic_ntk_inv_freq(
                positions,
                cfg.head_dim,
                cfg.rope_theta,
                cfg.rope_scaling["factor"],
                cfg.max_position_embeddings,
            )
        else:
            inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        return rope.rope_cos_sin(positions, inv_freq, self.attention_scaling)

    def _masks(self, attention_mask, cache, fresh_cache: bool):
        """``(key_mask [B, S], index, full_mask, window_mask)`` for queries ``attention_mask``
        [B, T] written at the cache's next slot (slot 0 without a cache or when fresh);
        ``window_mask`` is None unless some layer uses a sliding window."""
        cfg = self.cfg
        t = attention_mask.shape[1]
        window = cfg.sliding_window if cfg.use_sliding_window and cfg.sliding_window else None
        if cache is None or fresh_cache:
            key_mask, index = attention_mask, 0
        else:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
        full_mask = causal_padding_mask(key_mask, query_offset=index, num_queries=t)
        window_mask = (
            causal_padding_mask(key_mask, window, query_offset=index, num_queries=t)
            if window
            else None
        )
        return key_mask, index, full_mask, window_mask


def _run_layer(layer, x, cos, sin, mask, remat: str):
    if remat == "none":
        return layer(x, cos, sin, mask)[0]
    policy = (
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if remat == "save_dots" else None
    )
    return nnx.remat(lambda lyr, *a: lyr(*a)[0], policy=policy)(layer, x, cos, sin, mask)


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 with its language-model head.

    Call: ``model(input_ids[B, T], attention_mask=None[B, T]) -> logits[B, T, V]``.
    ``input_ids`` may be NumPy or JAX integer arrays; ``attention_mask`` is 1 on real
    tokens and 0 on padding (left or right). Positions default to ``cumsum(mask) - 1``, so a
    left-padded row starts at position 0 on its first real token.
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs | None = None):
        """Builds the model; parameters are random from ``rngs`` (zeros when None)."""
        self.config = cfg
        self.model = Qwen2Model(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                (cfg.hidden_size,),
                (cfg.vocab_size,),
                ("embed",),
                ("vocab",),
                use_bias=False,
                cfg=cfg,
                rngs=rngs,
            )
        else:
            self.lm_head = None

    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache=None,
                 segment_ids=None):
        """-> logits [B, T, V]; with ``cache`` -> ``(logits, new_cache)``. ``segment_ids``
        [B, T]: packed rows (``Qwen2Model.__call__``)."""
        if cache is not None:
            hidden, cache = self.model(input_ids, attention_mask, positions, cache)
            return self.logits(hidden), cache
        return self.logits(self.hidden_states(input_ids, attention_mask, positions=positions,
                                              segment_ids=segment_ids))

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None,
                      segment_ids=None):
        """Final-norm hidden states [B, T, D] (for chunked losses that skip full logits)."""
        return self.model(input_ids, attention_mask, positions, segment_ids=segment_ids)

    def init_cache(self, batch: int, size: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows and ``size`` slots (prompt + new tokens)."""
        return KVCache.init(self.config, batch, size, dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] in the compute dtype."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def lm_head_weight(self) -> jax.Array:
        """The output projection as [D, V] (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight[...].T
        return self.lm_head.weight[...]


# --- masks and positions ---------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> [B, T] int32 positions, 0 at each row's first real token.

    Padding positions get 0 (any value works: they are masked out).
    """
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids (1, 2, ... per packed sequence, 0 padding) -> [B, T] int32
    positions restarting at 0 at each segment's first token (padding gets 0)."""
    seg = jnp.asarray(segment_ids)
    index = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], -1)
    # each token's segment start: the running maximum of the start indices seen so far
    start = jax.lax.cummax(jnp.where(starts, index, 0), axis=seg.ndim - 1)
    return jnp.where(seg > 0, index - start, 0)


def causal_padding_mask(
    key_mask: jax.Array,
    sliding_window: int | None = None,
    *,
    query_offset: int | jax.Array = 0,
    num_queries: int | None = None,
) -> jax.Array:
    """[B, S] valid-key mask -> [B, 1, T, S] bool attention mask.

    Query t sits at slot ``query_offset + t`` (0 without a cache, so T == S). It attends to
    valid keys at slots <= its own (and within ``sliding_window`` when given, as
    ``q - k < window``). Every query also sees its own slot, which keeps the softmax of a
    padding query finite; its output is ignored.
    """
    s = key_mask.shape[-1]
    t = s if num_queries is None else num_queries
    q_slot = query_offset + jnp.arange(t)[:, None]  # [T, 1]
    k_slot = jnp.arange(s)[None, :]  # [1, S]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed &= (q_slot - k_slot) < sliding_window
    mask = allowed[None] & key_mask[:, None, :].astype(jnp.bool_)  # [B, T, S]
    mask |= (k_slot == q_slot)[None]
    return mask[:, None]


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values for incremental decoding.

    Rows are left-padded so that every row writes its next token at the same slot
    ``index``; ``mask`` says which slots hold real tokens and ``next_pos`` is each row's
    next position id (its count of real tokens so far).

    Attributes:
        k: tuple over layers of [B, K, H, S] key arrays in the compute dtype (slots last:
            decoding reduces scores over H with S contiguous, see ``attend_cached``).
        v: tuple over layers of [B, K, S, H] value arrays.
        mask: [B, S] bool, valid key slots.
        index: int32 scalar, the next slot to write.
        next_pos: [B] int32.
    """

    k: tuple
    v: tuple
    mask: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def init(cls, cfg: Qwen2Config, batch: int, size: int, dtype=None) -> KVCache:
        dtype = cfg.dtype if dtype is None else dtype
        k_shape = (batch, cfg.num_key_value_heads, cfg.head_dim, size)
        v_shape = (batch, cfg.num_key_value_heads, size, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_hidden_layers)),
            v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_hidden_layers)),
            mask=jnp.zeros((batch, size), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )


def init_model(cfg: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norms)."""
    return Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: Qwen2Config) -> Qwen2ForCausalLM:
    """The model with ``jax.ShapeDtypeStruct`` parameters: shapes without memory."""
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))


def param_logical_axes(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{"model.layers.0.self_attn.q_proj.weight": ("embed", "heads", "head_dim"), ...}``."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            out[".".join(str(p) for p in path)] = var.get_metadata()["logical_axes"]
    return out


def count_params(model: nnx.Module) -> int:
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
