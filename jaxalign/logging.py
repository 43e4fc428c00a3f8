"""Metrics to a local JSONL file and to wandb (offline unless the user says otherwise).

Only process 0 writes (multi-host runs call this on every process; the others are no-ops).
The JSONL file is the source of truth: one object per line, flushed every write, so a
killed run keeps everything logged before it died. wandb is optional and lazy-imported.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _to_python(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricsLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``<run_dir>/metrics.jsonl`` (and wandb).

    Args:
        run_dir: the run's directory.
        wandb_mode: "offline" (default), "online" or "disabled".
        wandb_project, wandb_entity, wandb_tags, run_name, config: passed to ``wandb.init``
            (an empty entity: wandb's default for the logged-in user).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        wandb_mode: str = "offline",
        wandb_project: str = "jaxalign",
        wandb_entity: str = "",
        wandb_tags: tuple[str, ...] | list[str] = (),
        run_name: str | None = None,
        config: dict | None = None,
        filename: str = "metrics.jsonl",
    ):
        self.active = jax.process_index() == 0
        self.path = Path(run_dir) / filename
        self._wandb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(
            self.path
        )
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())
        if torn:  # a killed run left half a line: end it so the next record stays readable
            self._file.write("\n")
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                entity=wandb_entity or None,
                tags=list(wandb_tags) or None,
                name=run_name,
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
                reinit="finish_previous",
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            v = _to_python(v)
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf; keep them visible rather than dropping
            record[k] = v
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in record.items() if k not in ("step", "time")}, step=int(step)
            )

    def log_table(self, step: int, key: str, rows: list[dict[str, Any]],
                  columns: tuple[str, ...]) -> None:
        """``rows`` (their ``columns``) as one wandb table under ``key`` at ``step``; a no-op
        without wandb (the JSONL files hold the same records)."""
        if not self.active or self._wandb is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=list(columns),
                            data=[[_to_python(r.get(c)) for c in columns] for r in rows])
        self._wandb.log({key: table}, step=int(step))

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (a torn last line from a kill is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
