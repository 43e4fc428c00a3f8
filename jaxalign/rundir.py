"""The run directory: what a training run writes, and when a restart may resume it.

``RunState`` is a loop's view of its run directory: the metrics log, the checkpointer and
resume (``resume`` restores the latest checkpoint; ``save``, ``log``). ``write_summary``,
``write_generations``, ``plot_metrics`` and ``export_hf`` write what a person reads after a
run. The rules of resuming:

A run directory (``config.workdir``) belongs to one run. Restarting the same command with
the same workdir resumes it from its latest checkpoint; restarting with another config is
checked here first, *before anything in the directory changes*:

* ``resume_conflicts``: the fields that a resume may not change (``RESUME_FIXED``: the
  model's architecture and storage dtype, the algorithm, the seeds, the data and the batch
  shapes: what the checkpoint's arrays and the data iterator's state depend on). A
  restart that changes one is refused with a ``ConfigError`` that names each field with
  its old and new value; ``config.json`` and every other file stay as they were.
* Other fields (step counts, learning rate, evaluation, logging, the mesh, engine URLs)
  may change on a resume: ``record_resume`` appends the new config, its changes and the
  restored step to ``resumes.jsonl``. ``config.json`` always stays the config the run was
  started with.
* ``truncate_log``: a restart drops the records a killed attempt logged after its last
  checkpoint (``metrics.jsonl``, ``generations.jsonl``, ``warmstart.jsonl``), so every step
  appears once and the resumed steps are logged again exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxalign import storage
from jaxalign.checkpoint import Checkpointer
from jaxalign.config import ConfigError
from jaxalign.logging import MetricsLogger, read_metrics
from jaxalign.models import save_adapter, save_pretrained

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"

# Config fields (and blocks: a prefix covers everything under it) that a resume may not
# change: the checkpoint's arrays (model architecture, parameter dtype, optimizer
# structure), the data iterator's state (data, seeds, rows per step) and the warm start's
# checkpoint would no longer fit. The compute dtype, attention kernel and remat only
# change how the same parameters are used, so they stay free.
RESUME_FIXED = (
    "algorithm",
    "seed",
    "model.path",
    "model.preset",
    "model.arch",
    "model.seed",
    "model.param_dtype",
    "lora",  # adapters or not, their shapes, scale and the base's dtype
    "data",
    "optim.grad_accum_steps",
    "train.batch_size",
    "train.seq_buckets",
    "grpo.rollout_batch_size",
    "grpo.group_size",
    "grpo.train_batch_size",
    "ei.questions_per_step",
    "ei.group_size",
    "ei.batch_size",
    "warmstart",
)
# Exceptions inside the fixed blocks: where the data lives, how much is held out, how often
# the warm start saves.
RESUME_FREE = ("data.data_dir", "data.num_eval", "warmstart.save_every")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples compare as lists."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """``{field: (old, new)}`` for every dotted field that differs (missing: None)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if _normal(a.get(k)) != _normal(b.get(k))}


def _normal(value: Any) -> Any:
    # config.json stores what to_json_best_effort wrote: tuples as lists, {} for empty dicts.
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping) and not value:
        return None
    return value


def resume_conflicts(old: Mapping[str, Any], new: Mapping[str, Any],
                     overridden: Iterable[str] = ()) -> dict[str, tuple]:
    """The changes among ``config_changes`` that a resume may not make (``RESUME_FIXED``).

    A field the run's config does not have at all (nor any block above it) was added to
    jaxalign after the run started. At its default it is not a conflict (else an upgrade
    would leave a run no config could resume); set on the command line (``overridden``:
    the dotted fields the user set) it is, like any other change. ``record_resume``
    records its value either way.
    """
    known = flatten(old)
    overridden = tuple(overridden)

    def added_at_default(key: str) -> bool:
        parts = key.split(".")
        added = not any(".".join(parts[:i]) in known for i in range(1, len(parts) + 1))
        return added and not _under(key, overridden)

    return {k: v for k, v in config_changes(old, new).items()
            if _under(k, RESUME_FIXED) and not _under(k, RESUME_FREE)
            and not added_at_default(k)}


def check_resume(run_dir: str | os.PathLike, new: Mapping[str, Any],
                 overridden: Iterable[str] = ()) -> str | None:
    """Why ``new`` may not resume ``run_dir`` (a message naming every conflict), or None.

    Reads only ``run_dir/config.json`` (the config the run was started with);
    ``overridden``: the fields set on the command line (``resume_conflicts``).
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return None  # checkpoints without a config: nothing to compare against
    except (OSError, json.JSONDecodeError) as e:
        return f"{path} cannot be read ({e}); the run directory is left as it is"
    conflicts = resume_conflicts(old, new, overridden)
    if not conflicts:
        return None
    fields = "; ".join(f"config.{k}: {v[0]!r} in the run, {v[1]!r} now"
                       for k, v in conflicts.items())
    return (f"{run_dir} holds checkpoints of a run with another config, so it cannot resume "
            f"with this one ({fields}). Nothing in the run directory was changed: set "
            "config.workdir to a new directory to start a new run, or restore those values "
            "to resume this one")


def record_resume(run_dir: str | os.PathLike, config: Mapping[str, Any], step: int) -> None:
    """Appends this restart's config, its changes from ``config.json`` and ``step`` to
    ``resumes.jsonl`` (process 0; called once the checkpoint has been restored)."""
    run_dir = Path(run_dir)
    try:
        original = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        original = {}
    changed = {k: list(v) for k, v in config_changes(original, config).items()
               if k != "workdir"}
    record = {"step": step, "time": time.time(), "changed": changed, "config": dict(config)}
    with open(run_dir / RESUMES_FILE, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def truncate_log(path: str | os.PathLike, last_step: int) -> int:
    """Drops the records of a JSONL log whose ``step`` is past ``last_step``; returns how many.

    A killed run logged steps after its last checkpoint; the resumed run logs them again.
    Torn lines (a kill in the middle of a write) go too. The file is rewritten through a
    temporary file and an atomic rename, so a kill during the rewrite loses nothing.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                dropped += 1
                continue
            if step > last_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


# --- run state: logging, checkpoints, resume -------------------------------------------


class RunState:
    """The run directory's logger and checkpointer, and the clock of a training loop.

    ``resume(trainer, data_iterators)`` restores the latest checkpoint (if any) into the
    trainer and iterators and returns the ``extra`` dict saved with it (step, RNG, ...). It
    also opens the metrics log, after dropping what a killed attempt logged past that
    checkpoint (``jaxalign.rundir.truncate_log``), so ``log`` works only after ``resume``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = jax.process_index() == 0
        self.logger = None  # opened by resume()
        self.checkpointer = Checkpointer(
            self.checkpoint_dir("checkpoints"),
            max_to_keep=cfg.checkpoint.max_to_keep,
            save_every=cfg.checkpoint.save_every,
            async_save=cfg.checkpoint.async_save,
        )
        self.start_time = time.time()

    def checkpoint_dir(self, name: str):
        """Where checkpoints called ``name`` go: under a remote (gs://) workdir itself (orbax
        writes there, collectively; the other files are staged in run_dir and copied up by
        ``sync_up``), else under the run directory."""
        if storage.is_remote(self.cfg.workdir):
            return self.cfg.workdir.rstrip("/") + "/" + name
        return self.run_dir / name

    def resume(self, trainer, iterators: dict[str, Any]) -> dict[str, Any] | None:
        """Loads the latest checkpoint into ``trainer`` and ``iterators``; None if there is none.

        Raises:
            ConfigError: the checkpoint does not fit this run's model or optimizer (nothing
                in the run directory has been changed).
        """
        step = self.checkpointer.latest_step()
        if step is None:
            self._open_log(last_step=-1)  # a fresh start: nothing logged before counts
            return None
        try:
            params, opt_state, extra = self.checkpointer.restore(trainer.params,
                                                                 trainer.opt_state)
        except Exception as e:  # orbax: a shape, dtype or tree-structure mismatch
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise ConfigError(
                f"checkpoint step {step} in {self.checkpointer.directory} does not fit this "
                f"config ({lines[0][:300]}). Nothing in the run directory was changed: resume "
                "with the config the run was started with (its config.json), or set "
                "config.workdir to a new directory") from None
        trainer.params, trainer.opt_state = params, opt_state
        trainer.step = int(extra["trainer_step"])
        for name, it in iterators.items():
            it.set_state(extra["data"][name])
        logger.info("resumed from %s step %d", self.checkpointer.directory, step)
        self._open_log(last_step=step)
        if self.is_main:
            record_resume(self.run_dir, self.cfg.to_dict(), step)
            print(f"resumed from checkpoint step {step} in {self.checkpointer.directory}")
        return extra

    def _open_log(self, last_step: int) -> None:
        """Drops the records past ``last_step`` (a killed attempt's), then opens the log."""
        if self.is_main:
            for name in ("metrics.jsonl", "generations.jsonl"):
                dropped = truncate_log(self.run_dir / name, last_step)
                if dropped:
                    logger.warning("%s: dropped %d records logged after step %d by the "
                                   "attempt that was stopped; they are logged again", name,
                                   dropped, last_step)
        cfg = self.cfg
        self.logger = MetricsLogger(
            self.run_dir,
            wandb_mode=cfg.log.wandb_mode,
            wandb_project=cfg.log.wandb_project,
            wandb_entity=cfg.log.wandb_entity,
            wandb_tags=tuple(cfg.log.wandb_tags),
            run_name=cfg.log.wandb_name or self.run_dir.name,
            config=cfg.to_dict(),
        )

    def save(self, step: int, trainer, iterators: dict[str, Any], *, force: bool = False,
             **extra: Any) -> None:
        """Saves at ``step`` every ``checkpoint.save_every`` steps (or when ``force``).

        Raises:
            CheckpointError: this save or the one before it failed (the loop stops; the
                last good checkpoint is left as it is).
        """
        every = self.cfg.checkpoint.save_every
        if not force and (every <= 0 or step % every):
            return
        if step in self.checkpointer.all_steps():
            return
        state = {
            "step": step,
            "trainer_step": trainer.step,
            "data": {name: it.get_state() for name, it in iterators.items()},
            **extra,
        }
        self.checkpointer.save(step, trainer.params, trainer.opt_state, state)
        try:  # a remote workdir: the logs go up too
            storage.sync_up(self.run_dir, self.cfg.workdir)
        except Exception as e:  # a storage hiccup must not end the run: retried next save
            logger.warning("copying the logs to %s failed (%s: %s); retried at the next "
                           "checkpoint", self.cfg.workdir, type(e).__name__, e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.logger is None:
            raise RuntimeError("RunState.log before RunState.resume: resume() decides which "
                               "logged steps stand and opens the log")
        self.logger.log(step, {k: _scalar(v) for k, v in metrics.items()})

    def close(self) -> None:
        self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()


def _scalar(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        return float(np.asarray(v))
    return v


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` of a run (process 0)."""
    if jax.process_index() == 0:
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))


def export_hf(model, tokenizer, out_dir: str | os.PathLike, dtype=None) -> Path | None:
    """Writes the model as a HF directory; returns it (on process 0, else None).

    Every process calls this: ``save_pretrained`` gathers sharded parameters from all of
    them (a collective) and only process 0 writes files.
    """
    save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype)
    return Path(out_dir) if jax.process_index() == 0 else None


def export_adapter(model, out_dir: str | os.PathLike, base: str | None = None) -> Path | None:
    """Writes a LoRA model's adapters alone in PEFT's format (``adapter_config.json``,
    ``adapter_model.safetensors``; ``lora_io.save_adapter``), ``base`` recorded as
    ``base_model_name_or_path``; returns the directory (on process 0, else None). Every
    process calls this (the adapters are gathered)."""
    save_adapter(model, out_dir, base_model_name_or_path=base)
    return Path(out_dir) if jax.process_index() == 0 else None


# The columns of the wandb table of sample generations (every record has them).
GENERATION_COLUMNS = ("prompt", "response", "ground_truth", "extracted", "reward",
                      "answer_reward", "format_reward", "length", "finish_reason")


def write_generations(run_dir: Path, step: int, records: Sequence[dict[str, Any]],
                      limit: int, logger: MetricsLogger | None = None,
                      key: str = "eval/generations") -> None:
    """Appends up to ``limit`` records, tagged with ``step``, to ``generations.jsonl``; with a
    ``logger``, also as a wandb table under ``key`` (``GENERATION_COLUMNS``)."""
    if jax.process_index() != 0 or limit <= 0:
        return
    shown = list(records)[:limit]
    with open(Path(run_dir) / "generations.jsonl", "a") as f:
        for r in shown:
            f.write(json.dumps({"step": step, **r}) + "\n")
    if logger is not None:
        logger.log_table(step, key, shown, GENERATION_COLUMNS)


def write_all_generations(run_dir: Path, step: int, records: dict[str, Sequence[dict]],
                          limit: int, logger: MetricsLogger | None = None) -> None:
    """``write_generations`` for each set of ``evaluation.validate_all``'s records (``""``:
    the held-out set, table ``eval/generations``; else ``eval/<name>/generations``)."""
    for name, rows in records.items():
        key = f"eval/{name}/generations" if name else "eval/generations"
        write_generations(run_dir, step, rows, limit, logger, key=key)


def plot_metrics(run_dir: Path, panels: Sequence[tuple[str, Sequence[str]]],
                 filename: str = "curves.png") -> Path | None:
    """One PNG of metric curves from ``metrics.jsonl``: a panel per (title, keys)."""
    if jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (Each step is logged once, a resumed run drops what a killed attempt logged after its
    # checkpoint: truncate_log. The last record of a step wins regardless.)
    records = list({r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl")}.values())
    records.sort(key=lambda r: r["step"])
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), int | float)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
