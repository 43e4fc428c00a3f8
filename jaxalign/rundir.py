"""The rules of a run directory: when a restart may resume it, and what each restart records.

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
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def resume_conflicts(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """The changes among ``config_changes`` that a resume may not make (``RESUME_FIXED``)."""
    return {k: v for k, v in config_changes(old, new).items()
            if _under(k, RESUME_FIXED) and not _under(k, RESUME_FREE)}


def check_resume(run_dir: str | os.PathLike, new: Mapping[str, Any]) -> str | None:
    """Why ``new`` may not resume ``run_dir`` (a message naming every conflict), or None.

    Reads only ``run_dir/config.json`` (the config the run was started with).
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return None  # checkpoints without a config: nothing to compare against
    except (OSError, json.JSONDecodeError) as e:
        return f"{path} cannot be read ({e}); the run directory is left as it is"
    conflicts = resume_conflicts(old, new)
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
