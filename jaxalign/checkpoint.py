"""Training checkpoints with orbax: save, keep the last K, resume from the latest.

A checkpoint holds the parameters and optimizer state (sharded arrays, written
collectively by every process, restored onto whatever mesh the restoring run uses) and a
JSON record of everything else a run needs to continue bit-for-bit: the step, the data
iterator state, the RNG seed/counters and free-form metadata.

HF export of any step is ``jaxalign.models.save_pretrained`` on ``trainer.model()``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree):
    """Shapes, dtypes and shardings of ``tree``: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


class Checkpointer:
    """Saves and restores ``(params, opt_state, extra)`` under ``directory``.

    Args:
        directory: the run's checkpoint folder (local path or ``gs://``).
        max_to_keep: older checkpoints beyond this are deleted.
        save_every: ``maybe_save`` saves when ``step % save_every == 0``.
        async_save: write in a background thread (``wait()`` before exiting).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_every: int = 100,
        async_save: bool = True,
    ):
        self.directory = (
            os.path.abspath(os.fspath(directory)) if "://" not in str(directory) else str(directory)
        )
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, params, opt_state, extra: dict[str, Any] | None = None, force: bool = True
    ) -> bool:
        """Writes checkpoint ``step`` (``extra`` must be JSON-serialisable)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                extra=ocp.args.JsonSave(dict(extra or {}, step=step)),
            ),
            force=force,
        )

    def maybe_save(self, step: int, params, opt_state, extra=None) -> bool:
        if step % self.save_every:
            return False
        return self.save(step, params, opt_state, extra)

    def restore(self, params_like, opt_state_like, step: int | None = None):
        """Restores a checkpoint into the shapes and shardings of the given trees.

        Args:
            params_like, opt_state_like: current (e.g. freshly initialised) trees whose
                structure, dtypes and shardings the restored arrays take.
            step: which checkpoint (default: the latest).

        Returns:
            ``(params, opt_state, extra)``.

        Raises:
            FileNotFoundError: when there is no checkpoint to restore.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        target = {"params": _abstract(params_like), "opt_state": _abstract(opt_state_like)}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                extra=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        return state["params"], state["opt_state"], dict(restored["extra"])

    def wait(self):
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
