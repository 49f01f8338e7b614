"""Several processes, one program: `jax.distributed.initialize()` when needed, results to process 0.

A Cloud TPU slice with more than one host (v4-16 and up, v5e-16 and up), a SLURM or Open MPI
job of several tasks, or processes started by hand all run the same entry point; every process
must call `jax.distributed.initialize()` before anything touches a device, and then
`jax.devices()` lists the devices of every process, so the one global mesh of
`infra.sharding.make_mesh` spans all hosts and the same jitted code runs unchanged. One process
(a single TPU VM such as v4-8 or v5e-8, one GPU machine, a CPU) needs nothing of the kind.

How a run is recognised as multi-process, first match wins:
  * MEG_DISTRIBUTED=0 (or off/false): never initialise, whatever else is set;
  * MEG_COORDINATOR=host:port, MEG_NUM_PROCESSES=n, MEG_PROCESS_ID=i: explicit (any cluster,
    and the local CPU test of two processes);
  * MEG_DISTRIBUTED=1 (or auto/on): initialise with JAX's own cluster detection (what
    `launch/tpu_vm.sh` sets on a slice of several workers, where JAX reads the TPU metadata);
  * SLURM_NTASKS, OMPI_COMM_WORLD_SIZE or a comma-separated TPU_WORKER_HOSTNAMES (GKE) saying
    more than one process: JAX's cluster detection as well.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_TRUE, _FALSE = ("1", "auto", "on", "true", "yes"), ("0", "off", "false", "no")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: `kind` is "single", "explicit" or "auto"."""

    kind: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _count(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value) if value else 0
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Reads the environment (module docstring) into a `Launch`; raises on half-set MEG_*."""
    env = os.environ if env is None else env
    switch = env.get("MEG_DISTRIBUTED", "").strip().lower()
    if switch and switch not in _TRUE + _FALSE:
        raise ValueError(f"MEG_DISTRIBUTED={switch!r}: expected one of {_TRUE + _FALSE}")
    if switch in _FALSE:
        return Launch("single")
    explicit = {
        k: env.get(k, "") for k in ("MEG_COORDINATOR", "MEG_NUM_PROCESSES", "MEG_PROCESS_ID")
    }
    if any(explicit.values()):
        missing = [k for k, v in explicit.items() if not v]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} unset: MEG_COORDINATOR (host:port), MEG_NUM_PROCESSES and "
                "MEG_PROCESS_ID go together"
            )
        n, i = _count(env, "MEG_NUM_PROCESSES"), _count(env, "MEG_PROCESS_ID")
        if not 0 <= i < n:
            raise ValueError(f"MEG_PROCESS_ID={i} is outside [0, MEG_NUM_PROCESSES={n})")
        if n == 1:
            return Launch("single")
        return Launch("explicit", explicit["MEG_COORDINATOR"], n, i)
    if switch in _TRUE:
        return Launch("auto")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if _count(env, "SLURM_NTASKS") > 1 or _count(env, "OMPI_COMM_WORLD_SIZE") > 1 or len(hosts) > 1:
        return Launch("auto")
    return Launch("single")


def initialize_if_multiprocess(env: Mapping[str, str] | None = None) -> Launch:
    """Calls `jax.distributed.initialize()` when this is one of several processes; else nothing.

    Call it first thing in an entry point, before any JAX computation. Safe to call twice.
    On the CPU backend the cross-process collectives use gloo.
    """
    launch = detect_launch(env)
    if launch.kind == "single" or jax.distributed.is_initialized():
        return launch
    if jax.config.jax_platforms in ("cpu",) or (env or os.environ).get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.kind == "explicit":
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return launch


def is_main_process() -> bool:
    """True on process 0, the one that writes files and prints reports.

    Without `jax.distributed` this is the only process: True without starting a JAX backend
    (so writing a file before `initialize_if_multiprocess` does not spoil the initialisation).
    """
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def device_put_global(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works when a mesh spans several processes.

    JAX cannot move an array that lives on this process's devices alone onto a sharding that
    spans other processes' devices (a cross-host transfer, unsupported on CPU and GPU): such an
    array goes through host memory instead, where every process holds the same value (the
    program is the same everywhere), and each process places its own shards from it. On one
    process this is `jax.device_put` unchanged.
    """

    def one(x, sharding):
        if (
            isinstance(x, jax.Array)
            and x.is_fully_addressable
            and not sharding.is_fully_addressable
        ):
            x = np.asarray(x)
        return jax.device_put(x, sharding)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def gather_to_host(tree):
    """Every array of `tree` as one numpy array holding the whole global value, on every process.

    A global `jax.Array` (e.g. a batch sharded over a mesh that spans hosts) is fetched from the
    processes that hold its shards; numpy arrays and other host values pass through unchanged.
    Collective: every process must call it, with the same tree structure.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(one, tree)


def gather_to_main(tree):
    """`gather_to_host(tree)` on process 0, None on the others (collective: all must call)."""
    gathered = gather_to_host(tree)
    return gathered if is_main_process() else None


def broadcast_from_main(tree):
    """Process 0's value of `tree` (numpy or scalars) on every process (collective)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op on one process).

    Raises when another process reached a barrier of another name at the same point: their
    programs diverged (e.g. a file written by one process and not the other).
    """
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
