"""Training checkpoints with orbax: save, keep the last K, resume from the latest.

A checkpoint holds the parameters and optimizer state (sharded arrays, written
collectively by every process, restored onto whatever mesh the restoring run uses) and a
JSON record of everything else a run needs to continue bit-for-bit: the step, the data
iterator state, the RNG seed/counters and free-form metadata. A LoRA run (``config.lora.rank
> 0``) saves only what it trains, the adapters and their optimizer state: the frozen base is
rebuilt exactly from the config (``model.path``, or the random preset from ``model.seed``;
``models.build``), and ``restore_policy`` puts the saved adapters on it.

HF export of any step of a finished (or running) run, from the shell::

    python -m jaxalign.checkpoint export runs/grpo-20261201-120000 --step 40 --out /tmp/hf40

(``restore_policy`` rebuilds the model from the run's ``config.json`` and reads only the
parameters of that step; ``jaxalign.models.save_pretrained`` writes the HF directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath  # local paths and gs:// alike
from flax import nnx

from jaxalign import storage
from jaxalign.models import lora as lora_lib
from jaxalign.models import save_pretrained
from jaxalign.models.build import build_model_and_tokenizer

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, lost storage): the run stops cleanly.

    The message names the step, the directory, the free space there and the last good
    checkpoint, which a failed save never touches (orbax writes a step into a temporary
    directory and renames it only when complete; older steps are deleted only after that).
    """


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _free_space(directory: str) -> str:
    if "://" in directory:
        return "unknown (remote storage)"
    path = directory
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        usage = shutil.disk_usage(path or ".")
    except OSError:
        return "unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's own error reports of a failed background save.

    When a write fails (a full disk), every orbax thread involved logs the same exception
    with its traceback (hundreds of lines for one failure), and the error surfaces again at
    the next save. ``Checkpointer`` reports the failure itself, once, as a
    ``CheckpointError``; nothing is lost by dropping these duplicates.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "orbax" in record.pathname:
            return False
        # asyncio's "Task exception was never retrieved" for a write of that failed save,
        # logged whenever the garbage collector reaches the task: the same error again.
        return not (record.name == "asyncio" and "orbax" in record.getMessage())


_QUIET = _QuietOrbaxErrors()



def _is_closed_loop_echo(exc: BaseException | None) -> bool:
    """When an asynchronous save fails, the writes still in flight finish into the event
    loop of that save, which orbax has already closed, and each prints "RuntimeError: Event
    loop is closed" with a traceback (dozens on a loaded machine), before the next save
    raises the failure. They say nothing the ``CheckpointError`` does not; nothing else in a
    run touches a closed event loop. The hooks below drop exactly these."""
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _install_quiet_hooks() -> None:
    if getattr(sys.excepthook, "_jaxalign_quiet", False):
        return
    excepthook, unraisablehook, thread_hook = (sys.excepthook, sys.unraisablehook,
                                               threading.excepthook)

    def quiet_excepthook(kind, value, tb):
        if not _is_closed_loop_echo(value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(unraisable):
        if not _is_closed_loop_echo(unraisable.exc_value):
            unraisablehook(unraisable)

    def quiet_thread_hook(args):
        if not _is_closed_loop_echo(args.exc_value):
            thread_hook(args)

    quiet_excepthook._jaxalign_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
    threading.excepthook = quiet_thread_hook


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
        self._pending: int | None = None  # the step of an asynchronous save in flight
        self._failed = False
        # (absl routes orbax's absl.logging calls to "absl"; asyncio logs orphaned tasks)
        for name in ("absl", "orbax", "asyncio"):
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)
        _install_quiet_hooks()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
                # A save that failed half-way (a full disk) leaves a temporary directory;
                # the next run removes it instead of tripping over it.
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self, step: int, params, opt_state, extra: dict[str, Any] | None = None, force: bool = True
    ) -> bool:
        """Writes checkpoint ``step`` (``extra`` must be JSON-serialisable).

        Raises:
            CheckpointError: this save, or the asynchronous save before it, failed.
        """
        self._check_pending()
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                    extra=ocp.args.JsonSave(dict(extra or {}, step=step)),
                ),
                force=force,
            )
        except Exception as e:
            # orbax raises a failed asynchronous save at the next save: blame the right step
            pending = self._pending
            finished = self._finished_steps()
            raise self._failure(pending if pending is not None and pending not in finished
                                else step, e, finished) from None
        self._pending = step
        return saved

    def _check_pending(self) -> None:
        """Raises the failure of the asynchronous save in flight, if it failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failure(self._pending, e) from None

    def _failure(self, step: int | None, error: BaseException,
                 finished: list[int] | None = None) -> CheckpointError:
        """The error to raise; also stops orbax's threads, so the process can exit quietly."""
        self._failed = True
        finished = self._finished_steps() if finished is None else finished
        good = [s for s in finished if s != step]
        try:
            self.manager.close()
        except Exception:  # it re-raises the same failure: already being reported
            pass
        last = (f"the last good checkpoint is step {good[-1]}, intact: a restart with the same "
                "workdir resumes from it" if good else "there is no earlier checkpoint")
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed: {_first_line(error)} "
            f"(free space there: {_free_space(self.directory)}); {last}. Free some space "
            "(or fix the storage) and rerun the same command.")

    def _finished_steps(self) -> list[int]:
        try:
            self.manager.reload()
            return sorted(self.manager.all_steps())
        except Exception:  # the storage itself is failing: report what we can
            return []

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
        """Blocks until pending asynchronous saves are on disk.

        Raises:
            CheckpointError: the save in flight failed.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failure(self._pending, e) from None
        self._check_pending()

    def close(self):
        """Waits for the save in flight, then releases orbax's threads.

        Raises:
            CheckpointError: the save in flight failed (not again once already raised).
        """
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # a failed save was already reported
                if not self._failed:
                    raise


def checkpoint_steps(run_dir: str | os.PathLike, name: str = "checkpoints") -> list[int]:
    """The steps saved under ``run_dir/<name>`` (ascending; empty if none)."""
    directory = epath.Path(run_dir) / name
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def restore_policy(run_dir: str | os.PathLike, step: int | None = None, dtype: str | None = None,
                   *, merged: bool = True):
    """The policy of a training run at checkpoint ``step`` (default: the latest).

    The model is rebuilt from the run's ``config.json`` (its ``model`` block: a checkpoint
    path or a random preset with the byte tokenizer; its ``lora`` block, if any); only the
    parameters of ``step`` are read (a LoRA run's: the adapters), not the optimizer state.

    Args:
        run_dir: a run directory (``config.json`` and ``checkpoints/``).
        step: the checkpoint step; None picks the latest.
        dtype: compute dtype to build the model with (default: the run's); parameters keep
            the dtype they were saved in.
        merged: a LoRA run's policy with its adapters folded in (``lora.merge_lora``: a
            plain model, what samplers and exports take); False keeps the adapters apart
            (``lora_io.save_adapter``).

    Returns:
        ``(model, tokenizer, step)``.

    Raises:
        ValueError: not a run directory, no checkpoint, or no checkpoint at ``step``.
    """

    run_dir = str(run_dir) if storage.is_remote(str(run_dir)) else os.path.abspath(run_dir)
    config_path = epath.Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no config.json (not a jaxalign run directory)")
    run_cfg = json.loads(config_path.read_text())
    if "model" not in run_cfg:
        raise ValueError(f"{config_path} has no model block (not a jaxalign run)")
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir}/checkpoints holds no checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run_dir}/checkpoints has no step {step}; saved steps: {steps}")
    model_cfg = ml_collections.ConfigDict(run_cfg["model"])
    if dtype is not None:
        model_cfg.dtype = dtype
    lora_block = ml_collections.ConfigDict(run_cfg["lora"]) if "lora" in run_cfg else None
    model, tokenizer = build_model_and_tokenizer(model_cfg, lora=lora_block)
    params = nnx.state(model, lora_lib.lora_filter if lora_lib.has_lora(model) else nnx.Param)
    target = {"params": _abstract(params)}
    manager = ocp.CheckpointManager(epath.Path(run_dir) / "checkpoints")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    finally:
        manager.close()
    nnx.update(model, restored["state"]["params"])
    if merged and lora_lib.has_lora(model):
        model = lora_lib.merge_lora(model)
    return model, tokenizer, step


def main(argv=None) -> None:
    """``python -m jaxalign.checkpoint export RUN_DIR [--step N] --out DIR [--dtype bfloat16]``."""
    ap = argparse.ArgumentParser(prog="python -m jaxalign.checkpoint",
                                 description="Export a training run's checkpoint as a HF "
                                 "directory (transformers and vLLM load it).")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write checkpoint STEP of RUN_DIR as a HF directory")
    ex.add_argument("run_dir")
    ex.add_argument("--step", type=int, default=None, help="default: the latest")
    ex.add_argument("--out", required=True)
    ex.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="dtype of the written weights (default: as trained)")
    args = ap.parse_args(argv)
    try:
        model, tokenizer, step = restore_policy(args.run_dir, args.step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    save_pretrained(model, args.out, tokenizer=tokenizer,
                    dtype=None if args.dtype is None else jnp.dtype(args.dtype))
    print(f"wrote step {step} of {args.run_dir} to {args.out}")


if __name__ == "__main__":
    main()
