"""The one entry point: ``python -m jaxalign.train --config configs/<algo>.py``.

    python -m jaxalign.train --config configs/grpo.py                    # the CPU demo
    python -m jaxalign.train --config configs/sft.py --config.optim.lr=3e-4
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b \\
        --config.model.path=/models/Qwen2.5-Math-1.5B

The config file's ``algorithm`` field picks the loop (``ALGORITHMS``, next to each other
below); ``--config.<field>=value`` overrides any field and unknown fields are errors. The
config is validated before anything is built or compiled: every mistake found up front is
a one-line ``ConfigError`` saying what to change.
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

from jaxalign.algorithms.common import ConfigError, validate_common

# The loops a config can name (each module has ``validate(cfg)`` and ``run(cfg, run_dir)``).
ALGORITHMS = {
    "sft": "jaxalign.algorithms.sft",
    "expert_iteration": "jaxalign.algorithms.expert_iteration",
    "grpo": "jaxalign.algorithms.grpo",
}


def validate(cfg: ml_collections.ConfigDict):
    """All config checks (shared, then the algorithm's); returns the algorithm's module."""
    validate_common(cfg, ALGORITHMS)
    module = importlib.import_module(ALGORITHMS[cfg.algorithm])
    module.validate(cfg)
    return module


def prepare_run_dir(cfg: ml_collections.ConfigDict) -> Path:
    """``cfg.workdir`` (default ``runs/<name>-<timestamp>``), with ``config.json`` written.

    A ``workdir`` that already holds checkpoints is resumed by the algorithm.
    """
    workdir = cfg.workdir or os.path.join(
        "runs", f"{cfg.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    run_dir = Path(workdir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return run_dir


def run(cfg: ml_collections.ConfigDict) -> dict:
    """Validates ``cfg`` and runs its algorithm; returns the run's summary."""
    module = validate(cfg)
    run_dir = prepare_run_dir(cfg)
    return module.run(cfg, run_dir)


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging

    cfg = flags.FLAGS.config
    # orbax and grain narrate every save at INFO; keep the console for progress and results.
    absl_logging.set_verbosity(absl_logging.WARNING)
    # Multi-process runs set the coordinator in the environment (see launch/); initialise
    # before anything asks jax about devices.
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0 and summary is not None:
        print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "a configs/<algo>.py file (':preset' selects a preset)", lock_config=True
    )
    app.run(main)
