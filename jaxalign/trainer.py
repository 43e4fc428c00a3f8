"""The jitted train step every algorithm shares: loss -> grads -> optax update, on a mesh.

The model is split once (``nnx.split``) into a static graph and a pytree of parameters;
the step is one ``jax.jit`` over ``(params, opt_state, batch)`` with explicit shardings
(parameters and optimizer state by the logical-axis rules in ``jaxalign.sharding``, the
batch over the data axes) and donated state buffers, so an update happens in place.

Algorithms supply only ``loss_fn(model, batch) -> (loss, metrics)``.

LoRA (a model from ``jaxalign.models.lora.apply_lora``): the step differentiates only the
adapters. The model splits three ways: ``params`` (the adapters, ``lora_filter``: what the
optimizer updates, its state and the checkpoints hold), ``frozen`` (the base parameters,
``frozen_filter``, and the adapter-dropout RNG state: an argument of the step, never
donated, never differentiated) and the graph. Gradient clipping and accumulation are the
optimizer's, so they act on the adapters' gradients unchanged. Adapter dropout is on in
the step's loss only (``lora.train_view``), keyed by ``fold_in(key(dropout_seed), step)``:
a resumed run (``step`` restored) drops exactly the units the uninterrupted run dropped.
Without adapters the step is the full fine-tuning step, ``(params, opt_state, batch)``.

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
from jaxalign.models import lora as lora_lib

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
        params: the trained parameters (an ``nnx.State``), sharded on ``mesh``: all of them,
            or under LoRA the adapters only.
        opt_state: optax state, sharded like the parameters.
        step: optimizer-update calls so far (micro-steps when accumulating).
        frozen: under LoRA, ``(base parameters, other state)``: ``nnx.State``s the step
            reads but neither differentiates nor donates; None in full fine-tuning.
        dropout_seed: adapter dropout's key is ``fold_in(key(dropout_seed), step)``.
    """

    graphdef: Any
    params: nnx.State
    opt_state: Any
    tx: optax.GradientTransformation
    loss_fn: LossFn
    mesh: Any = None
    step: int = 0
    frozen: tuple[nnx.State, nnx.State] | None = None
    dropout_seed: int = 0

    @classmethod
    def create(
        cls, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, mesh=None,
        *, dropout_seed: int = 0,
    ) -> Trainer:
        """Splits ``model`` (LoRA: adapters trained, the rest frozen), places it on ``mesh``
        by the logical-axis rules, initialises the optimizer and compiles the step."""
        frozen = None
        if lora_lib.has_lora(model):
            graphdef, params, base, other = nnx.split(model, lora_lib.lora_filter,
                                                      lora_lib.frozen_filter, ...)
            if mesh is not None:  # e.g. the dropout RNG: replicated
                replicated = NamedSharding(mesh, PartitionSpec())
                other = jax.tree.map(lambda x: jax.device_put(x, replicated), other)
            frozen = (sharding_lib.shard_params(base, mesh), other)
        else:
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
        trainer = cls(graphdef, params, opt_state, tx, loss_fn, mesh, frozen=frozen,
                      dropout_seed=dropout_seed)
        trainer._compile()
        return trainer

    @property
    def is_lora(self) -> bool:
        return self.frozen is not None

    def _compile(self):
        if self.is_lora:
            return self._compile_lora()
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

    def _compile_lora(self):
        """The LoRA step: ``(adapters, opt_state, batch, frozen, step)``; the adapters and
        their optimizer state donated, the frozen base only read, adapter dropout keyed by
        ``fold_in(key(dropout_seed), step)`` (a host int: the same on every process)."""
        graphdef, tx, loss_fn, seed = self.graphdef, self.tx, self.loss_fn, self.dropout_seed

        def train_step(params, opt_state, batch, frozen, step):
            dropout_key = jax.random.fold_in(jax.random.key(seed), step)

            def objective(p):
                # copy=True: fresh Variables owned by this (grad) trace. The frozen ones
                # would otherwise be the jit level's, and nnx.remat (model.remat != none)
                # refuses to update a Variable of an outer trace (TraceContextError).
                model = nnx.merge(graphdef, p, *frozen, copy=True)
                return loss_fn(lora_lib.train_view(model, dropout_key), batch)

            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
            return params, opt_state, metrics

        def eval_step(params, batch, frozen):
            loss, metrics = loss_fn(nnx.merge(graphdef, params, *frozen), batch)
            return dict(metrics, loss=loss)

        train_step = sharding_lib.traced_on(self.mesh, train_step)
        eval_step = sharding_lib.traced_on(self.mesh, eval_step)
        if self.mesh is None:
            self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
            self._eval_step = jax.jit(eval_step)
            return
        param_sh = jax.tree.map(lambda x: x.sharding, self.params)
        opt_sh = jax.tree.map(lambda x: x.sharding, self.opt_state)
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._train_step = jax.jit(
            train_step,
            in_shardings=(param_sh, opt_sh, None, frozen_sh, replicated),
            out_shardings=(param_sh, opt_sh, replicated),
            donate_argnums=(0, 1),
        )
        self._eval_step = jax.jit(eval_step, in_shardings=(param_sh, None, frozen_sh),
                                  out_shardings=replicated)

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
        placed = self.place_batch(batch, global_batch=global_batch)
        if self.is_lora:
            self.params, self.opt_state, metrics = self._train_step(
                self.params, self.opt_state, placed, self.frozen, np.int32(self.step))
        else:
            self.params, self.opt_state, metrics = self._train_step(
                self.params, self.opt_state, placed)
        self.step += 1
        return metrics

    def eval_step(self, batch: dict, *, global_batch: bool = False) -> dict:
        placed = self.place_batch(batch, global_batch=global_batch)
        if self.is_lora:
            return self._eval_step(self.params, placed, self.frozen)
        return self._eval_step(self.params, placed)

    def states(self) -> tuple[nnx.State, ...]:
        """The states ``nnx.merge(graphdef, *states)`` makes the current model from: what a
        jitted forward over the policy takes (``(params,)``, or the adapters then the
        frozen rest)."""
        return (self.params,) if self.frozen is None else (self.params, *self.frozen)

    def model(self) -> nnx.Module:
        """A model view of the current parameters (shares the arrays; no copy); under LoRA
        the adapted model (adapters unmerged)."""
        return nnx.merge(self.graphdef, *self.states())

    def sampling_model(self) -> nnx.Module:
        """The current policy as a plain model, for a rollout engine or export: under LoRA
        the adapters folded in (``lora.merge_lora``: new arrays only for the adapted
        kernels), else ``model()``."""
        model = self.model()
        return lora_lib.merge_lora(model) if self.is_lora else model

    def reference(self) -> tuple[nnx.State, ...]:
        """The starting policy frozen, for a KL term or DPO: states for
        ``nnx.merge(graphdef, *states)`` (like ``states()``). Full fine-tuning: a copy of
        the parameters (the step donates, i.e. overwrites, the trainer's). LoRA: a copy of
        the adapters only (rank-R matrices; zero B at the start, so the policy is the
        frozen base, or the demo's warm-started adapters) over the trainer's own frozen
        base, which no step changes: the base is never copied. Call it before the first
        update (and before a resume restores later parameters)."""
        copy = jax.tree.map(jnp.copy, self.params)
        return (copy,) if self.frozen is None else (copy, *self.frozen)
