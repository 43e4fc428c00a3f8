"""The one entry point: ``python -m jaxalign.train --config configs/<algo>.py``.

    python -m jaxalign.train --config configs/grpo.py                    # the CPU demo
    python -m jaxalign.train --config configs/sft.py --config.optim.lr=3e-4
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b \\
        --config.model.path=/models/Qwen2.5-Math-1.5B

The config file's ``algorithm`` field picks the loop (``ALGORITHMS``, next to each other
below); ``--config.<field>=value`` overrides any field and unknown fields are errors. The
config is validated before anything is built or compiled: every mistake found up front is
a one-line ``ConfigError`` saying what to change.

Multi-process (one process per host; ``launch/`` starts them): the environment names the
coordinator (``jaxalign.distributed.initialize_from_env``) and every process runs this
same command. They agree on one run directory (process 0's choice). A ``gs://`` workdir
takes the checkpoints directly (orbax, written collectively); the other files of the run
are staged in a local directory on process 0 and copied up when the run ends (or fails),
after copying down what an earlier attempt left there, so a resumed run appends to them.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxalign import cli, distributed, rundir, storage
from jaxalign.checkpoint import CheckpointError, checkpoint_steps
from jaxalign.config import ConfigError, validate_common
from jaxalign.data.datasets import DataError

# The loops a config can name (each module has ``validate(cfg)`` and ``run(cfg, run_dir)``).
ALGORITHMS = {
    "sft": "jaxalign.algorithms.sft",
    "expert_iteration": "jaxalign.algorithms.expert_iteration",
    "grpo": "jaxalign.algorithms.grpo",
    "dpo": "jaxalign.algorithms.dpo",
}


def validate(cfg: ml_collections.ConfigDict):
    """All config checks (shared, then the algorithm's); returns the algorithm's module."""
    validate_common(cfg, ALGORITHMS)
    module = importlib.import_module(ALGORITHMS[cfg.algorithm])
    module.validate(cfg)
    return module


def prepare_run_dir(cfg: ml_collections.ConfigDict, overridden: tuple[str, ...] = ()) -> Path:
    """``cfg.workdir`` (default ``runs/<name>-<timestamp>``), checked and ready for the run.

    A ``workdir`` that already holds checkpoints is resumed by the algorithm, but only with a
    config that fits them: ``jaxalign.rundir.check_resume`` runs first and a refusal is a
    ``ConfigError`` with the run directory untouched. ``config.json`` is written only for a
    fresh run (a resumed run keeps the config it was started with; each resume is recorded
    in ``resumes.jsonl`` once its checkpoint is restored). Every process gets process 0's
    directory (each would stamp its own time). For a remote ``workdir`` this is the local
    staging directory (``storage.staging_dir``); process 0 first copies down what an earlier
    attempt left in the workdir (``storage.copy_tree``'s ``keep_larger``), and copies the
    staged files up after every checkpoint save (``storage.sync_up``) and at the end.
    """
    workdir = distributed.broadcast_object(
        cfg.workdir or os.path.join("runs", f"{cfg.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    )
    run_dir = storage.staging_dir(workdir) if storage.is_remote(workdir) else Path(workdir)
    error = None
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".jaxalign-write-test"  # a read-only mount fails here, not later
            probe.write_text("")
            probe.unlink()
            if storage.is_remote(workdir):  # what an earlier attempt left: logs, not its HF export
                storage.copy_tree(workdir, run_dir, skip=storage.SYNC_SKIP, keep_larger=True)
            if checkpoint_steps(workdir) or checkpoint_steps(workdir, "warmstart_checkpoints"):
                error = rundir.check_resume(run_dir, cfg.to_dict(), overridden)
            else:  # a fresh run (or one killed before its first checkpoint)
                (run_dir / rundir.CONFIG_FILE).write_text(
                    cfg.to_json_best_effort(indent=2, sort_keys=True))
        except OSError as e:
            error = (f"config.workdir={workdir!r}: cannot write the run directory "
                     f"{run_dir} ({e.strerror or e}); choose a writable directory")
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)
    if not storage.is_remote(workdir):  # (a remote workdir's staging directory is local by design)
        try:
            distributed.check_shared_directory(run_dir)
        except ValueError as e:
            raise ConfigError(f"config.workdir={workdir!r}: {e}") from None
    return run_dir


def run(cfg: ml_collections.ConfigDict, overridden: tuple[str, ...] = ()) -> dict:
    """Validates ``cfg`` and runs its algorithm; returns the run's summary.

    ``overridden``: the dotted fields set on the command line (a resume refuses those among
    fields added to jaxalign after the run started; at their defaults such fields pass).
    """
    module = validate(cfg)
    run_dir = prepare_run_dir(cfg, overridden)
    try:
        return module.run(cfg, run_dir)
    finally:
        if storage.is_remote(cfg.workdir) and distributed.is_main():
            storage.copy_tree(run_dir, cfg.workdir)


def main(argv):
    del argv
    cfg = flags.FLAGS.config
    # orbax and grain narrate every save at INFO; keep the console for progress and results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Multi-process runs describe themselves in the environment (see launch/); initialise
    # before anything asks jax about devices.
    try:
        distributed.initialize_from_env()
    except ValueError as e:
        print(f"distributed set-up error: {e}", file=sys.stderr)
        sys.exit(2)
    if flags.FLAGS.print_config:
        sys.exit(print_config(cfg))
    overridden = tuple(config_flags.get_override_values(flags.FLAGS["config"]))
    try:
        summary = run(cfg, overridden)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0 and summary is not None:
        print(json.dumps(summary, indent=2, default=str))


def print_config(cfg: ml_collections.ConfigDict) -> int:
    """``--print_config``: the resolved config (every field, after overrides), then every
    check the run would make before loading a model (config fields, data files' rows,
    the platform); nothing is written. Returns the exit status: 0 when the run would start,
    2 with the error on stderr when it would not."""
    if jax.process_index() == 0:
        print(cfg.to_json_best_effort(indent=2, sort_keys=True))
    try:
        validate(cfg)
    except (ConfigError, DataError) as e:
        kind = "config" if isinstance(e, ConfigError) else "data"
        print(f"{kind} error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(f"config OK: {cfg.algorithm} on {jax.device_count()} {jax.default_backend()} "
              f"device(s); run it without --print_config", file=sys.stderr)
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake in the command line reported in one line.

    ``--config.train.foo=1`` would otherwise end a long traceback with
    ``AttributeError: "'foo'"``: unknown fields are named with the closest real ones.
    """
    try:
        return flags.FLAGS(argv)
    except SystemExit:
        raise
    except Exception as e:  # flags.Error, and what ml_collections raises for a bad field
        print(f"config error: {cli.explain_flag_error(argv, e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "a configs/<algo>.py file (':preset' selects a preset); override any "
        "field with --config.<block>.<field>=value (--print_config lists them)", lock_config=True
    )
    flags.DEFINE_bool("print_config", False, "print the resolved config (every field, with the "
                      "overrides), run every check the run makes before loading a model, and "
                      "exit (0: the run would start, 2: it would not, with the reason)")
    app.run(main, flags_parser=parse_flags)
