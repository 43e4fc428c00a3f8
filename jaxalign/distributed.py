"""Multi-process JAX: start-up from the environment, and moving host data between processes.

A multi-host run is one Python process per host (per GPU node, per TPU VM worker), all
running the same program (``launch/`` starts them). They share one global mesh: a jitted
step over it is a collective that every process enters with its own part of the inputs.

* ``initialize_from_env``: ``jax.distributed.initialize`` from ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (jax itself reads only the first), or from
  the cluster's own variables (TPU pod, SLURM) with ``JAXALIGN_DISTRIBUTED=auto``.
* ``allgather_objects`` / ``broadcast_object``: picklable host objects (rollouts, a run
  directory name) to every process, through the same collectives as the arrays.
* ``to_host``: a numpy copy of any array, also one whose shards live on other hosts.
* ``local_replica``: parameters laid out on the global mesh -> a full copy on this process's
  devices (what an in-process sampler needs; see ``jaxalign.rollout.jax_engine``).

Every function here is a collective when ``jax.process_count() > 1``: all processes must
call it, in the same order. With one process each is a cheap no-op.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
AUTO_ENV = "JAXALIGN_DISTRIBUTED"  # "auto": let jax detect a TPU pod / SLURM / Open MPI


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Starts the multi-process runtime when the environment describes one.

    ``JAX_COORDINATOR_ADDRESS=host:port`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    (set by ``launch/gpu_nodes.sh``) are passed explicitly: ``jax.distributed.initialize``
    reads the address from the environment but not the count and id, which it otherwise
    takes from a detected cluster. ``JAXALIGN_DISTRIBUTED=auto`` (set by
    ``launch/tpu_pod.sh``) calls it with no arguments, so jax detects the TPU pod slice.
    Nothing set: a single process, nothing to do.

    Must run before anything asks jax about devices.

    Returns:
        Whether ``jax.distributed.initialize`` was called.

    Raises:
        ValueError: when the variables are incomplete or malformed (naming them).
    """
    env = os.environ if environ is None else environ
    address = env.get(COORDINATOR_ENV, "")
    count, index = env.get(NUM_PROCESSES_ENV, ""), env.get(PROCESS_ID_ENV, "")
    if address:
        if not count or not index:
            raise ValueError(
                f"{COORDINATOR_ENV}={address} is set but {NUM_PROCESSES_ENV}={count!r} and "
                f"{PROCESS_ID_ENV}={index!r} are not both set: every process needs the process "
                "count and its own id (launch/gpu_nodes.sh exports all three)"
            )
        try:
            num_processes, process_id = int(count), int(index)
        except ValueError:
            raise ValueError(
                f"{NUM_PROCESSES_ENV}={count!r} and {PROCESS_ID_ENV}={index!r} must be integers"
            ) from None
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"{PROCESS_ID_ENV}={process_id} is not in [0, {NUM_PROCESSES_ENV}={num_processes})"
            )
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
        return True
    if env.get(AUTO_ENV, "") == "auto":
        jax.distributed.initialize()
        return True
    if count or index:
        raise ValueError(
            f"{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV} are set but {COORDINATOR_ENV} is not: set the "
            "coordinator's host:port too (process 0's host)"
        )
    return False


def is_main() -> bool:
    """Process 0: the one that writes logs, plots, summaries and HF exports."""
    return jax.process_index() == 0


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order (a collective; ``[obj]`` on one process).

    Objects travel pickled, as uint8 arrays padded to the longest, through
    ``process_allgather``: host data of a few MB (a step's rollouts) is cheap next to a
    train step, and no second channel (sockets, files) is needed.
    """
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size)))  # [P]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))  # [P, max size]
    return [pickle.loads(row[:n].tobytes()) for row, n in zip(everyone, sizes, strict=True)]


def broadcast_object(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (a collective)."""
    if jax.process_count() == 1:
        return obj
    return allgather_objects(obj if is_main() else None)[0]


def check_shared_directory(path: str | os.PathLike) -> None:
    """Raises ``ValueError`` on every process unless all of them see process 0's ``path``.

    A collective (nothing to check on one process). Orbax writes each checkpoint from every
    process into the run directory; on a directory local to each host no host would hold a
    whole checkpoint. Process 0 writes a marker with a fresh random name, the others look
    for it, and all learn the outcome together, so no process is left waiting.
    """
    if jax.process_count() == 1:
        return
    token = broadcast_object(secrets.token_hex(8) if is_main() else None)
    marker = Path(path) / f".jaxalign-shared-{token}"
    if is_main():
        marker.write_text(token)
    allgather_objects(None)  # process 0 has written it
    seen = marker.is_file() and marker.read_text() == token
    everyone = allgather_objects(seen)
    if is_main():
        marker.unlink(missing_ok=True)
    missing = [i for i, ok in enumerate(everyone) if not ok]
    if missing:
        raise ValueError(
            f"{path}: process(es) {missing} do not see process 0's run directory; on several "
            "hosts the workdir must be on a filesystem they share (NFS, Lustre) or a gs:// URL"
        )


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (a collective for multi-host arrays)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def local_replica(tree: Any) -> Any:
    """``tree`` with every multi-host array replaced by a full copy on a local device.

    One jitted all-gather (replicating each array on the global mesh; peak memory is one
    full copy of the tree per device), then each process keeps its first local shard.
    Fully addressable trees are returned as they are.
    """
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return tree
    def replicated(x):
        return NamedSharding(x.sharding.mesh, PartitionSpec())

    gathered = jax.jit(lambda t: t, out_shardings=jax.tree.map(replicated, tree))(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), gathered)
