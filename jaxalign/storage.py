"""Run directories on local disk or remote storage (``gs://``): staging and copies.

A remote workdir takes the checkpoints directly (orbax writes there); the other files of a
run are staged in a local directory (``staging_dir``) and copied up (``sync_up``) after
every checkpoint and at the end. A leaf module: ``checkpoint`` and ``rundir`` both use it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
from etils import epath  # local paths and gs:// alike (orbax depends on it)

# Where the files of a run with a remote (gs://) workdir live until they are copied up.
STAGING_ENV = "JAXALIGN_STAGING_DIR"


def is_remote(path: str) -> bool:
    """A URL such as ``gs://bucket/run`` (orbax writes there; plain ``open`` cannot)."""
    return "://" in path


def staging_dir(workdir: str) -> Path:
    """The local directory that holds a remote workdir's files during the run."""
    root = Path(os.environ.get(STAGING_ENV) or "/tmp/jaxalign-staging")
    tag = hashlib.sha1(workdir.encode()).hexdigest()[:8]
    return root / f"{workdir.rstrip('/').rsplit('/', 1)[-1]}-{tag}"


# Top-level entries of a run directory that copies leave out: orbax writes the checkpoints
# to the remote workdir itself; the HF export (GBs) goes up once, at the end.
SYNC_SKIP = ("checkpoints", "warmstart_checkpoints", "hf")


def copy_tree(src, dst, skip: tuple[str, ...] = ("checkpoints",), *,
              keep_larger: bool = False) -> int:
    """Copies the files under ``src`` to ``dst`` (local paths or URLs), except ``skip``.

    Args:
        keep_larger: leave a file alone where ``dst`` already holds one at least as large.
            A run's logs only grow, so when both sides have one the larger is the newer
            (a resumed run on the machine that staged it keeps its own, newer files).

    Returns:
        The number of files copied.
    """
    src, dst = epath.Path(src), epath.Path(dst)
    if not src.exists():
        return 0
    copied = 0
    for path in src.iterdir():  # (no rglob: epath refuses "**" for GCS)
        if path.name in skip:
            continue
        if path.is_dir():
            copied += copy_tree(path, dst / path.name, skip=(), keep_larger=keep_larger)
            continue
        target = dst / path.name
        if keep_larger and target.exists() and target.stat().length >= path.stat().length:
            continue
        dst.mkdir(parents=True, exist_ok=True)
        path.copy(target, overwrite=True)
        copied += 1
    return copied


def sync_up(run_dir, workdir: str) -> int:
    """Process 0 copies a remote workdir's staged files (logs, plots) up; the checkpoints
    and the HF export stay out. Called after every checkpoint save, so a preempted or
    killed run loses no logs that its checkpoint already covers."""
    if not (is_remote(workdir) and jax.process_index() == 0):
        return 0
    return copy_tree(run_dir, workdir, skip=SYNC_SKIP)
