"""Meshes and logical-axis rules: the one place that maps model axes to devices.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``norm``); activations use ``batch``, ``length`` and the same model
names. A rule table maps each logical name to a mesh axis (or several, or none). Keeping
parameter and activation rules separate lets a sampler drop FSDP without touching the model.

Mesh axes: ``data`` (pure data parallel, parameters replicated), ``fsdp`` (data parallel
with parameters, gradients and optimizer state sharded), ``tensor`` (Megatron-style heads
and MLP sharding).

Multi-process: the training mesh spans the devices of all processes (``jax.devices()``);
``process_local_mesh`` is the slice of it one process owns, for work each process does on
its own (sampling its share of the prompts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the large (embedding) dimension of every weight; tensor parallelism shards
# heads, kv heads, the MLP hidden dimension and the vocabulary.
PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}

ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes).

    One of the sizes may be -1: it takes whatever the others leave.

    Raises:
        ValueError: when the sizes do not multiply to the device count, with the count.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if known <= 0 or n % known:
            raise ValueError(f"mesh sizes {sizes} do not divide the {n} available devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs "
            f"{int(np.prod(sizes))} devices but {n} are available; change the mesh sizes so "
            "their product equals the device count (or set one to -1)"
        )
    # Auto axes: shardings of intermediates are left to XLA's propagation (GSPMD); the
    # model and steps pin only inputs, outputs and a few activations.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def process_local_mesh(mesh: Mesh) -> Mesh:
    """This process's devices of ``mesh`` as a mesh of their own (``mesh`` itself when local).

    Keeps as much of the tensor axis as fits on the local devices (so a sampler shards heads
    as the trainer does when tensor parallelism stays within a host); the rest is fsdp.
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(local) == mesh.devices.size:
        return mesh
    tensor = math.gcd(mesh.shape["tensor"], len(local))
    return make_mesh(data=1, fsdp=-1, tensor=tensor, devices=local)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Mapping[str, str | tuple[str, ...] | None],
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``.

    With ``mesh`` and ``shape``, a dimension whose size is not divisible by its mesh axes
    is replicated instead (e.g. 2 kv heads on 4-way tensor parallelism), and a mesh axis is
    used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = int(np.prod([mesh.shape[a] for a in axes]))
                if shape[i] % size:
                    axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def shard(x: jax.Array, *logical_axes: str | None,
          rules: Mapping[str, str | tuple[str, ...] | None] = ACTIVATION_RULES) -> jax.Array:
    """Constrains an activation to the sharding of its logical axes (``ACTIVATION_RULES``:
    batch over data x fsdp) on the mesh in context (``traced_on``: the trainer's steps); a
    no-op without one (single device, the sampler). Axes that do not divide stay
    replicated, as for parameters."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, mesh,
                                                                x.shape))


def traced_on(mesh: Mesh | None, fn):
    """``fn``, traced with ``mesh`` as the mesh in context, so the ``shard`` constraints in
    the model apply whoever calls or lowers the jitted function; ``fn`` itself for None."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def named_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    rules: Mapping[str, str | tuple[str, ...] | None] = PARAM_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def shard_params(state: nnx.State, mesh, rules=PARAM_RULES) -> nnx.State:
    """Places every parameter of ``state`` by its logical axes (no-op sharding for mesh=None)."""
    if mesh is None:
        return state

    def put(var):
        axes = var.get_metadata()["logical_axes"]
        sh = named_sharding(mesh, axes, var.shape, rules)
        return var.replace(jax.device_put(var[...], sh))

    return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_from_config(cfg) -> Mesh | None:
    """The (data, fsdp, tensor) mesh; None on a single device (plain jit, no shardings)."""
    if jax.device_count() == 1:
        return None
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
