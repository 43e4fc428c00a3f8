"""LoRA: low-rank adapters on the Qwen2 projections, their merge, and the ``config.lora`` checks.

``apply_lora(model, LoraConfig(rank=16, alpha=32))`` swaps each targeted ``Linear`` (PEFT's
names: ``q_proj k_proj v_proj o_proj`` in ``self_attn``, ``gate_proj up_proj down_proj`` in
``mlp``) for a ``LoraLinear`` that keeps the very same ``weight``/``bias`` variables and adds

    y = x W (+ b) + scale * (dropout(x) A) B,    scale = alpha / rank (rsLoRA: alpha / sqrt(rank))

with A [*in, R] (kaiming-uniform, PEFT's ``init_lora_weights=True``) and B [R, *out] (zeros),
so a fresh adapter changes nothing. Base paths are unchanged (``...q_proj.weight``) and the
adapters sit beside them (``...q_proj.lora_A``, ``...q_proj.lora_B``): hf_io, orbax
checkpoints and the PEFT key names (``lora_io.py``) all read the same paths.

Adapters are ``LoraParam`` (a ``nnx.LoRAParam``, itself an ``nnx.Param``), so
``nnx.state(model, lora_filter)`` holds only them and ``frozen_filter`` the rest; freezing
is the trainer differentiating ``lora_filter`` only. Like every parameter they carry
``logical_axes``: A follows its base kernel's input axes, B its output axes, the rank axis
(``lora_rank``, in no rule table) stays replicated, so ``sharding.shard_params`` places
them by the same ``PARAM_RULES``.

Why our own module rather than ``nnx.LoRA``/``nnx.LoRALinear`` (flax 0.12) or qwix:
``nnx.LoRA`` is 2-D (``x @ a @ b``, a [in, R], b [R, out]) while our kernels keep head
structure (q_proj [D, N, H], o_proj [N, H, D]); using it would mean flattening activations
and losing the ``heads`` axis that tensor parallelism shards. ``nnx.LoRALinear`` replaces
the module with an ``nnx.Linear`` (a ``kernel``, not ``weight``), breaking the
state-path == HF-key invariant, has no dropout, and initialises A with he-uniform, not
PEFT's kaiming-uniform(a=sqrt(5)). qwix (not a dependency) applies LoRA by intercepting the
model's ops at trace time and names the adapters itself: a second naming scheme to map to
PEFT, for what is here one small subclass. We do reuse flax's variable type
(``nnx.LoRAParam``), so flax's own LoRA filters select our adapters too.

Dropout (``LoraConfig.dropout`` > 0) is an ``nnx.Dropout`` on the adapter input, built
*off* (``deterministic=True``): evaluation, log-probs and sampling never drop. The train
step's loss turns it on with ``train_view(model, key)`` (one key per step, so a resumed run
drops the same units). ``merge_lora`` folds the adapters in (export, the sampler);
``strip_lora`` gives the frozen base model (the reference policy) without copying it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.errors import check
from jaxalign.models.qwen2 import Linear, Qwen2ForCausalLM, abstract_model

# PEFT's module names, and which block of a decoder layer holds each.
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
BASE_DTYPES = ("float32", "bfloat16", "float16")
RANK_AXIS = "lora_rank"  # logical name of the rank axis; in no rule table, so replicated
DROPOUT_STREAM = "lora_dropout"  # the nnx.Rngs stream adapter dropout draws from


# --- config ------------------------------------------------------------------------------


def _check_fields(prefix: str, rank, alpha, dropout, targets, base_dtype) -> None:
    """Shared checks of ``LoraConfig`` and the ``config.lora`` block (rank > 0 here)."""
    check(isinstance(rank, int | np.integer) and rank > 0,
          f"{prefix}rank={rank!r}: the adapter rank must be a positive integer (e.g. 16)")
    check(alpha > 0, f"{prefix}alpha={alpha!r}: must be > 0 (PEFT's lora_alpha, e.g. 2 * rank)")
    check(0.0 <= dropout < 1.0, f"{prefix}dropout={dropout!r}: must be in [0, 1)")
    check(len(targets) > 0,
          f"{prefix}target_modules is empty; name some of {', '.join(TARGET_MODULES)}")
    unknown = [t for t in targets if t not in TARGET_MODULES]
    check(not unknown,
          f"{prefix}target_modules: unknown module(s) {unknown}; choose from "
          f"{', '.join(TARGET_MODULES)}")
    check(len(set(targets)) == len(targets),
          f"{prefix}target_modules={list(targets)} names a module twice")
    try:
        known = base_dtype is None or jnp.dtype(base_dtype).name in BASE_DTYPES
    except TypeError:
        known = False
    check(known, f"{prefix}base_dtype={base_dtype!r}: choose one of {BASE_DTYPES} (or keep "
                 "the model's param_dtype)")


def _split_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        return tuple(t.strip() for t in targets.split(",") if t.strip())
    return tuple(targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
        rank: R, the adapter rank (> 0).
        alpha: PEFT's ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: dropout rate on the adapter input while training (0 = none).
        target_modules: PEFT module names (a tuple, or a comma-separated string).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        base_dtype: storage dtype of the frozen base weights (e.g. ``"bfloat16"``: half the
            memory); None keeps the model's ``param_dtype``. Adapters keep ``param_dtype``.

    Raises:
        ConfigError: naming the field, for a bad value.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)
    use_rslora: bool = False
    base_dtype: Any = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _split_targets(self.target_modules))
        if self.base_dtype is not None:
            check(str(self.base_dtype) != "",
                  "LoraConfig.base_dtype='': use None to keep the model's param_dtype")
        _check_fields("LoraConfig.", self.rank, self.alpha, self.dropout, self.target_modules,
                      self.base_dtype)
        # One canonical order, so equal configs compare equal however they were spelled.
        order = tuple(t for t in TARGET_MODULES if t in self.target_modules)
        object.__setattr__(self, "target_modules", order)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def validate_lora(block) -> None:
    """Checks ``config.lora`` before anything is built (nothing to check when rank is 0).

    Raises:
        ConfigError: naming the field and what to change.
    """
    check(isinstance(block.rank, int) and block.rank >= 0,
          f"config.lora.rank={block.rank!r}: must be an integer >= 0 (0 turns LoRA off)")
    if block.rank == 0:
        return
    _check_fields("config.lora.", block.rank, block.alpha, block.dropout,
                  _split_targets(block.target_modules), block.base_dtype or None)


def lora_config_from_block(block) -> LoraConfig | None:
    """``config.lora`` -> a validated ``LoraConfig``, or None when LoRA is off (rank 0)."""
    validate_lora(block)
    if block.rank == 0:
        return None
    return LoraConfig(
        rank=block.rank,
        alpha=float(block.alpha),
        dropout=float(block.dropout),
        target_modules=block.target_modules,
        use_rslora=bool(block.use_rslora),
        base_dtype=block.base_dtype or None,
    )


# --- the adapted layer ---------------------------------------------------------------------


class LoraParam(nnx.LoRAParam):
    """An adapter matrix; metadata ``logical_axes`` as for every jaxalign parameter."""


# Filters: what the optimizer differentiates, and everything else that is a parameter.
lora_filter = LoraParam
frozen_filter = nnx.All(nnx.Param, nnx.Not(LoraParam))


def _kaiming_uniform_a_sqrt5(in_ndim: int):
    # PEFT: nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5)) on [R, in]: a uniform bound
    # of gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in).
    return jax.nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(in_ndim)), out_axis=-1
    )


def _named_sharding(value) -> NamedSharding | None:
    """A concrete array's ``NamedSharding``; None for host, single-device or traced values."""
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return None
    return value.sharding if isinstance(value.sharding, NamedSharding) else None


def _follow_sharding(value, in_ndim: int, rank_first: bool, ndim: int):
    """The base kernel's ``NamedSharding`` cut to an adapter's axes (None if unsharded)."""
    sharding = _named_sharding(value)
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec))
    part = spec[in_ndim:] if rank_first else spec[:in_ndim]
    part = (None, *part) if rank_first else (*part, None)
    assert len(part) == ndim
    return NamedSharding(sharding.mesh, PartitionSpec(*part))


class LoraLinear(Linear):
    """A ``Linear`` with a low-rank update: ``x W (+ b) + scale * (dropout(x) A) B``.

    Keeps the base module's attributes (the same ``weight``/``bias`` variables), adds
    ``lora_A`` [*in, R] and ``lora_B`` [R, *out].
    """

    def __init__(self, base: Linear, cfg: LoraConfig, *, rngs: nnx.Rngs, dropout_rngs=None):
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        w = base.weight
        in_shape, out_shape = tuple(w.shape[: self.in_ndim]), tuple(w.shape[self.in_ndim :])
        axes = tuple(w.get_metadata()["logical_axes"])
        in_axes, out_axes = axes[: self.in_ndim], axes[self.in_ndim :]
        dtype = w.dtype  # the model's param_dtype: apply_lora casts the base only afterwards
        a = _kaiming_uniform_a_sqrt5(self.in_ndim)(rngs.params(), (*in_shape, cfg.rank), dtype)
        b = jnp.zeros((cfg.rank, *out_shape), dtype)
        a_sh = _follow_sharding(w[...], self.in_ndim, False, a.ndim)
        b_sh = _follow_sharding(w[...], self.in_ndim, True, b.ndim)
        if a_sh is not None:
            a, b = jax.device_put(a, a_sh), jax.device_put(b, b_sh)
        self.lora_A = LoraParam(a, logical_axes=(*in_axes, RANK_AXIS))
        self.lora_B = LoraParam(b, logical_axes=(RANK_AXIS, *out_axes))
        self.scale = float(cfg.scale)
        self.lora_config = cfg
        self.lora_dropout = (
            nnx.Dropout(cfg.dropout, deterministic=True, rng_collection=DROPOUT_STREAM,
                        rngs=dropout_rngs)
            if cfg.dropout > 0
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        h = x.astype(self.dtype)
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        n = self.in_ndim
        contract = (tuple(range(h.ndim - n, h.ndim)), tuple(range(n)))
        z = jax.lax.dot_general(h, self.lora_A[...].astype(self.dtype), (contract, ((), ())))
        delta = jax.lax.dot_general(  # [..., R] x [R, *out] -> [..., *out]
            z, self.lora_B[...].astype(self.dtype), (((z.ndim - 1,), (0,)), ((), ()))
        )
        return y + jnp.asarray(self.scale, self.dtype) * delta

    def merged_weight(self) -> jax.Array:
        """``W + scale * A B`` in the base weight's dtype (summed in fp32) and sharding."""
        w = self.weight[...]
        merged = _merge(w, self.lora_A[...], self.lora_B[...], self.scale)
        sharding = _named_sharding(w)
        if sharding is not None and merged.sharding != sharding:
            merged = jax.device_put(merged, sharding)
        return merged


@jax.jit
def _merge(w, a, b, scale):
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


# --- applying, merging, stripping ----------------------------------------------------------


def lora_modules(model: nnx.Module) -> dict[str, LoraLinear]:
    """``{"model.layers.0.self_attn.q_proj": LoraLinear, ...}`` in graph order."""
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LoraLinear)
    }


def has_lora(model: nnx.Module) -> bool:
    return bool(lora_modules(model))


def lora_config_of(model: nnx.Module) -> LoraConfig | None:
    """The ``LoraConfig`` the model's adapters were built with (None without adapters)."""
    mods = lora_modules(model)
    return next(iter(mods.values())).lora_config if mods else None


def apply_lora(model: Qwen2ForCausalLM, cfg: LoraConfig, *, seed: int = 0) -> Qwen2ForCausalLM:
    """Adds adapters to ``model`` in place (and returns it).

    The targeted projections of every decoder layer become ``LoraLinear`` (A random from
    ``seed``, B zero: the model's outputs are unchanged). On a model placed on a mesh the
    adapters are placed to follow their base kernels (A by the kernel's input sharding, B
    by its output sharding). With ``cfg.base_dtype`` every other parameter (the frozen
    base: projections, embeddings, norms) is cast to it. Works under ``nnx.eval_shape``.

    Raises:
        ValueError: when ``model`` already has adapters.
    """
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora or "
                         "strip_lora gives a plain model)")
    rngs = nnx.Rngs(params=seed)
    dropout_rngs = nnx.Rngs(**{DROPOUT_STREAM: seed + 1}) if cfg.dropout > 0 else None
    for layer in model.model.layers:
        for name in cfg.target_modules:
            block = getattr(layer, TARGET_MODULES[name])
            setattr(block, name, LoraLinear(getattr(block, name), cfg, rngs=rngs,
                                            dropout_rngs=dropout_rngs))
    if cfg.base_dtype is not None:
        dtype = jnp.dtype(cfg.base_dtype)
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param) and not isinstance(var, LoraParam):
                var.set_value(var[...].astype(dtype))
    return model


def _plain_model(model: Qwen2ForCausalLM, fold: bool) -> Qwen2ForCausalLM:
    """A plain ``Qwen2ForCausalLM`` over ``model``'s base arrays (shared, not copied), with
    each adapted kernel replaced by its merge when ``fold``."""
    adapters = {path: node for path, node in nnx.iter_graph(model)
                if isinstance(node, LoraLinear)}
    source = {path: var for path, var in nnx.iter_graph(model)
              if isinstance(var, nnx.Param) and not isinstance(var, LoraParam)}
    weight_dtype = None
    plain = abstract_model(model.config)
    for path, var in nnx.iter_graph(plain):
        if not isinstance(var, nnx.Param):
            continue
        owner = adapters.get(path[:-1])
        if fold and owner is not None and path[-1] == "weight":
            value = owner.merged_weight()
        else:
            value = source[path][...]
        weight_dtype = weight_dtype or value.dtype
        var.set_value(value)
    # A bf16-stored base stays bf16 in the plain model; say so in its config (export's
    # torch_dtype, from_pretrained of the sampler's copy).
    if weight_dtype is not None and jnp.dtype(weight_dtype) != jnp.dtype(model.config.param_dtype):
        plain.config = model.config.replace(param_dtype=jnp.dtype(weight_dtype))
    if hasattr(model, "source_dir"):
        plain.source_dir = model.source_dir
    return plain


def merge_lora(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """A plain model with every adapter folded in: ``W + scale * A B`` (summed in fp32, kept
    in W's dtype and sharding); other parameters are shared with ``model``, not copied.

    ``model`` is left as it was (training goes on). For export (``hf_io.save_pretrained``
    merges by itself) and for the sampler (``JaxEngine.update_weights(merge_lora(m))``).
    """
    return _plain_model(model, fold=True)


def strip_lora(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The frozen base model without its adapters (shares ``model``'s arrays): the
    reference policy for a KL term or DPO, at no extra memory."""
    return _plain_model(model, fold=False)


def train_view(model: nnx.Module, dropout_key: jax.Array | int | None = None) -> nnx.Module:
    """``model`` with adapter dropout on, sharing its arrays; without dropout (rate 0),
    ``model`` itself.

    Call it inside the loss (inside ``jax.grad``) on the model the step merged, with one
    key per step (e.g. ``jax.random.fold_in(key, step)``), so a resumed run drops exactly
    the same units: ``nnx.reseed`` restarts the dropout stream from ``dropout_key``.
    """
    if not any(m.lora_dropout is not None for m in lora_modules(model).values()):
        return model
    view = nnx.view(model, only=nnx.Dropout, deterministic=False)
    # Fresh Variable objects over the same arrays, owned by the caller's trace: dropout
    # advances its RNG counter, and NNX refuses to mutate a Variable made outside a
    # jax.grad from inside it (TraceContextError).
    view = nnx.merge(*nnx.split(view), copy=True)
    if dropout_key is not None:
        nnx.reseed(view, **{DROPOUT_STREAM: dropout_key})
    return view


def count_lora_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, lora_filter))))
