"""Multi-process (multi-host) runs: starting JAX's distributed runtime and feeding each process its share of data.

A run on several hosts is one Python process per host (or per GPU), all executing the same program. Call
`initialize` first thing, before any other JAX call; it works out from the environment whether this process is
one of several and, if so, connects it to the others through `jax.distributed.initialize`. A single process is
left alone, so the same entry point runs on a laptop, one GPU node, a GPU cluster or a TPU pod.

How a multi-process launch is recognised (first match wins):

1. explicit arguments ``coordinator_address``, ``num_processes``, ``process_id``;
2. ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself) together with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
3. SLURM (``srun`` with ``SLURM_NTASKS`` > 1) or Open MPI (``mpirun``, ``OMPI_COMM_WORLD_SIZE`` > 1): JAX's own
   cluster detection fills in the coordinator, the process count and the rank;
4. Cloud TPU pods on GKE (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` listing several hosts) or
   multislice (``MEGASCALE_COORDINATOR_ADDRESS``);
5. ``DEEPSEEKMOE_DISTRIBUTED=1`` (or ``initialize(force=True)``): call ``jax.distributed.initialize()`` and let JAX
   detect everything (Cloud TPU VM pod slices, whose worker list comes from the TPU metadata server).

Data: every process reads only the rows of the global batch that live on its own devices
(`process_batch_slice`), and `global_batch_from_local` assembles those local rows into one global `jax.Array`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseekmoe_jax.sharding import batch_sharding

logger = logging.getLogger(__name__)

FORCE_ENV = "DEEPSEEKMOE_DISTRIBUTED"


class DistributedError(RuntimeError):
    """A multi-process launch that cannot be set up; the message names the variable or argument."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started as one of several.

    ``coordinator_address``, ``num_processes`` and ``process_id`` are None where JAX's own cluster detection
    fills them in. ``source`` says what was recognised ("arguments", "JAX environment", "SLURM", "Open MPI",
    "TPU pod", "forced").
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r}: expected an integer") from None


def detect_launch(environ: Mapping[str, str] | None = None, *, force: bool = False) -> Launch | None:
    """The multi-process launch described by ``environ`` (default ``os.environ``), or None for a single process.

    See the module docstring for the variables recognised. Reads only the environment: safe to call before JAX
    is initialised.
    """
    env = os.environ if environ is None else environ
    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    num = _int_env(env, "JAX_NUM_PROCESSES")
    pid = _int_env(env, "JAX_PROCESS_ID")
    if address is not None or num is not None or pid is not None:
        if num == 1:
            return None
        return Launch("JAX environment", address, num, pid)
    slurm_tasks = _int_env(env, "SLURM_NTASKS")
    if slurm_tasks is not None and slurm_tasks > 1 and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        return Launch("SLURM")
    ompi_size = _int_env(env, "OMPI_COMM_WORLD_SIZE")
    if ompi_size is not None and ompi_size > 1:
        return Launch("Open MPI")
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("TPU pod")
    if force or env.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return Launch("forced")
    return None


def _set_cpu_collectives() -> None:
    # Cross-process collectives of the CPU backend need an implementation; gloo ships with jaxlib. The option only
    # concerns the CPU client and is harmless on GPU/TPU hosts. Some JAX versions default to it already.
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # an older/newer JAX without the option: nothing to configure
        pass


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
    force: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Launch | None:
    """Start JAX's distributed runtime when this process is one of several; a no-op for a single process.

    Call it before any other JAX call (creating arrays or listing devices initialises the backends, after which
    JAX refuses to connect processes). Arguments override the environment (see `detect_launch`). Calling it again
    after a successful initialisation does nothing.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable by every process.
      num_processes: total number of processes.
      process_id: this process's rank, ``0 .. num_processes - 1``.
      local_device_ids: restrict this process to these local accelerators (e.g. one GPU per process).
      timeout_s: how long to wait for the other processes to connect.
      force: initialise even if the environment shows no multi-process launch (JAX then detects the cluster).
      environ: the environment to read (default ``os.environ``), for tests.
    Returns:
      the `Launch` that was acted on, or None when running as a single process.
    """
    if jax.distributed.is_initialized():
        return Launch("already initialized")
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        launch = Launch("arguments", coordinator_address, num_processes, process_id)
        env_launch = detect_launch(environ)
        if env_launch is not None and env_launch.source == "JAX environment":
            launch = Launch(
                "arguments",
                coordinator_address or env_launch.coordinator_address,
                num_processes if num_processes is not None else env_launch.num_processes,
                process_id if process_id is not None else env_launch.process_id,
            )
    else:
        launch = detect_launch(environ, force=force)
    if launch is None:
        return None
    if launch.source in ("arguments", "JAX environment") and (
        launch.coordinator_address is None or launch.num_processes is None or launch.process_id is None
    ):
        missing = [
            name
            for name, value in (
                ("coordinator_address (JAX_COORDINATOR_ADDRESS)", launch.coordinator_address),
                ("num_processes (JAX_NUM_PROCESSES)", launch.num_processes),
                ("process_id (JAX_PROCESS_ID)", launch.process_id),
            )
            if value is None
        ]
        if launch.source == "arguments" or not _cluster_can_fill(environ):
            raise DistributedError(
                f"incomplete multi-process launch ({launch.source}): missing {', '.join(missing)}. Set all three "
                "(e.g. JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0) or none."
            )
    if launch.num_processes is not None and launch.process_id is not None:
        if not 0 <= launch.process_id < launch.num_processes:
            raise DistributedError(
                f"process_id={launch.process_id} is outside 0..{launch.num_processes - 1} (num_processes="
                f"{launch.num_processes})"
            )
    _set_cpu_collectives()
    logger.info(
        "starting the JAX distributed runtime (%s): coordinator %s, %s processes, this is process %s",
        launch.source,
        launch.coordinator_address or "auto",
        launch.num_processes if launch.num_processes is not None else "auto",
        launch.process_id if launch.process_id is not None else "auto",
    )
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
        )
    except (RuntimeError, ValueError, OSError) as e:  # unreachable coordinator, timeout, failed cluster detection
        raise DistributedError(
            f"could not join the multi-process run ({launch.source} launch, coordinator "
            f"{launch.coordinator_address or 'auto-detected'}, process "
            f"{'auto' if launch.process_id is None else launch.process_id} of "
            f"{'auto' if launch.num_processes is None else launch.num_processes}, timeout {timeout_s} s): "
            f"{type(e).__name__}: {e}. Check that process 0 is running and that its address and port are "
            "reachable from this host, and that every process was started with the same process count"
        ) from e
    return launch


def _cluster_can_fill(environ: Mapping[str, str] | None) -> bool:
    env = os.environ if environ is None else environ
    return any(k in env for k in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"))


def process_index() -> int:
    """This process's rank (0 on a single process)."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the run (1 on a single process)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes logs and files shared by all."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (the same name on all); a no-op for one process.

    Use it where one process writes files that the others then read, or reads files that another will replace.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_batch_slice(global_batch_size: int, sharding: jax.sharding.Sharding | None = None) -> slice:
    """The rows ``[start, stop)`` of a global batch that this process must load.

    With ``sharding`` (a batch sharding, e.g. ``sharding.batch_sharding(mesh)``), these are exactly the rows held
    by this process's devices, the layout `global_batch_from_local` expects. Without it, the batch is split into
    equal consecutive parts by process index.
    """
    if global_batch_size < 1:
        raise DistributedError(f"global batch size {global_batch_size}: expected a positive integer")
    if sharding is None:
        n, i = jax.process_count(), jax.process_index()
        if global_batch_size % n:
            raise DistributedError(f"global batch size {global_batch_size} is not divisible by {n} processes")
        per = global_batch_size // n
        return slice(i * per, (i + 1) * per)
    indices = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop) for s in indices.values()})
    start, stop = rows[0][0], rows[0][1]
    for lo, hi in rows[1:]:
        if lo > stop:
            raise DistributedError(
                f"this process's devices hold non-contiguous batch rows {rows}; order the mesh so that each "
                "process's devices are neighbours on the batch axes (the default make_mesh order does this)"
            )
        stop = max(stop, hi)
    return slice(start, stop)


def global_batch_from_local(
    local_batch: Any,
    mesh: jax.sharding.Mesh,
    global_batch_size: int,
    rules: Mapping[str, Any] | None = None,
):
    """Assemble a global batch from the rows each process loaded (`process_batch_slice`).

    Args:
      local_batch: pytree of host arrays ``[rows of this process, ...]``.
      mesh: the device mesh; the batch dimension is sharded as `sharding.batch_sharding` says.
      global_batch_size: B of the assembled arrays ``[B, ...]``.
      rules: the rules table (default `partitioning.DEFAULT_RULES`; pass ``rules_for(config)``).
    Returns:
      the same pytree of `jax.Array` ``[B, ...]``, each device holding its rows; no data crosses hosts.
    """
    layout = batch_sharding(mesh, rules)
    rows = process_batch_slice(global_batch_size, layout)
    expected = rows.stop - rows.start

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != expected:
            raise DistributedError(
                f"process {jax.process_index()}: local batch array of shape {x.shape} should have {expected} rows "
                f"(rows {rows.start}..{rows.stop - 1} of the global batch of {global_batch_size})"
            )
        return jax.make_array_from_process_local_data(layout, x, (global_batch_size, *x.shape[1:]))

    return jax.tree.map(put, local_batch)
