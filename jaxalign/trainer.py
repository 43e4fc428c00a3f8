"""The jitted train step every algorithm shares: loss -> grads -> optax update, on a mesh.

The model is split once (``nnx.split``) into a static graph and a pytree of parameters;
the step is one ``jax.jit`` over ``(params, opt_state, batch)`` with explicit shardings
(parameters and optimizer state by the logical-axis rules in ``jaxalign.sharding``, the
batch over the data axes) and donated state buffers, so an update happens in place.

Algorithms supply only ``loss_fn(model, batch) -> (loss, metrics)``.

Multi-process: the mesh spans every process's devices and the step is one collective.
A batch arrives on each process either as that process's own rows (``global_batch=False``,
what the per-process data pipeline yields; placed with
``jax.make_array_from_process_local_data``) or as the whole batch, identical everywhere
(``global_batch=True``, e.g. GRPO's gathered rollouts; each device takes its slice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import sharding as sharding_lib

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding | None:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    if mesh is None:
        return None
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def place_rows(x, mesh, *, global_batch: bool = False) -> jax.Array:
    """One host array -> a device array whose leading (batch) dimension is split.

    ``global_batch=False``: ``x`` holds this process's rows; the global array has
    ``process_count`` times as many. Raises ``ValueError`` when the mesh does not give each
    process an equal, distinct block of the batch (e.g. a tensor axis spanning processes
    while the batch axes do not): then per-process data cannot fill it.
    """
    if mesh is None:
        return jnp.asarray(x)
    sh = batch_sharding(mesh, np.ndim(x))
    if global_batch:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    global_shape = (np.shape(x)[0] * jax.process_count(), *np.shape(x)[1:])
    return jax.make_array_from_process_local_data(sh, np.asarray(x), global_shape)


@dataclasses.dataclass
class Trainer:
    """Holds the split model, the optimizer and the compiled step.

    Attributes:
        graphdef: the static part of the model.
        params: parameters (an ``nnx.State``), sharded on ``mesh``.
        opt_state: optax state, sharded like the parameters.
        step: optimizer-update calls so far (micro-steps when accumulating).
    """

    graphdef: Any
    params: nnx.State
    opt_state: Any
    tx: optax.GradientTransformation
    loss_fn: LossFn
    mesh: Any = None
    step: int = 0

    @classmethod
    def create(
        cls, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, mesh=None
    ) -> Trainer:
        graphdef, params = nnx.split(model, nnx.Param)
        params = sharding_lib.shard_params(params, mesh)
        if mesh is None:
            opt_state = jax.jit(tx.init)(params)
        else:
            # Optimizer moments are sharded exactly like the parameters they track (a plain
            # jit of tx.init would leave the zeros replicated: 8x the memory on 8 devices);
            # scalars such as step counts are replicated.
            replicated = NamedSharding(mesh, PartitionSpec())
            param_sh = jax.tree.map(lambda x: x.sharding, params)
            opt_sh = optax.tree_map_params(
                tx,
                lambda _, sh: sh,
                jax.eval_shape(tx.init, params),
                param_sh,
                transform_non_params=lambda _: replicated,
            )
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        trainer = cls(graphdef, params, opt_state, tx, loss_fn, mesh)
        trainer._compile()
        return trainer

    def _compile(self):
        graphdef, tx, loss_fn = self.graphdef, self.tx, self.loss_fn

        def train_step(params, opt_state, batch):
            def objective(p):
                return loss_fn(nnx.merge(graphdef, p), batch)

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
            return params, opt_state, metrics

        def eval_step(params, batch):
            loss, metrics = loss_fn(nnx.merge(graphdef, params), batch)
            return dict(metrics, loss=loss)

        # Traced on the mesh, so the model's activations follow ACTIVATION_RULES.
        train_step = sharding_lib.traced_on(self.mesh, train_step)
        eval_step = sharding_lib.traced_on(self.mesh, eval_step)
        param_sh = jax.tree.map(lambda x: x.sharding, self.params)
        opt_sh = jax.tree.map(lambda x: x.sharding, self.opt_state)
        if self.mesh is None:
            self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
            self._eval_step = jax.jit(eval_step)
        else:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._train_step = jax.jit(
                train_step,
                in_shardings=(param_sh, opt_sh, None),
                out_shardings=(param_sh, opt_sh, replicated),
                donate_argnums=(0, 1),
            )
            self._eval_step = jax.jit(
                eval_step, in_shardings=(param_sh, None), out_shardings=replicated
            )

    def place_batch(self, batch: dict, *, global_batch: bool = False) -> dict:
        """Host arrays -> device arrays split over the data axes.

        Args:
            batch: ``[B_local, ...]`` arrays, this process's rows (the processes' rows in
                process order make the global batch), or with ``global_batch`` the
                whole ``[B, ...]`` batch, the same on every process.
        """
        return {k: place_rows(v, self.mesh, global_batch=global_batch) for k, v in batch.items()}

    def train_step(self, batch: dict, *, global_batch: bool = False) -> dict:
        """One optimizer update (one micro-step when accumulating); returns scalar metrics."""
        self.params, self.opt_state, metrics = self._train_step(
            self.params, self.opt_state, self.place_batch(batch, global_batch=global_batch)
        )
        self.step += 1
        return metrics

    def eval_step(self, batch: dict, *, global_batch: bool = False) -> dict:
        return self._eval_step(self.params, self.place_batch(batch, global_batch=global_batch))

    def model(self) -> nnx.Module:
        """A model view of the current parameters (shares the arrays; no copy)."""
        return nnx.merge(self.graphdef, self.params)
