"""Multi-host start-up: one call at the top of a script that every host runs unchanged.

    import llama_jax.distributed
    llama_jax.distributed.initialize()      # before anything else touches JAX
    mesh = llama_jax.sharding.make_mesh(fsdp=-1, tensor=8)   # spans every host's devices

Where the coordinates come from, first match wins (each one separately):
  1. explicit arguments: initialize("10.0.0.1:1234", num_processes=4, process_id=0)
  2. environment variables LLAMA_JAX_COORDINATOR (host:port), LLAMA_JAX_NUM_PROCESSES,
     LLAMA_JAX_PROCESS_ID, and JAX's own JAX_COORDINATOR_ADDRESS / JAX_LOCAL_DEVICE_IDS
  3. JAX's auto-detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes JobSet): nothing to pass.
If none of these applies, the script runs as one process (a laptop, a single GPU box) and
`initialize` says so on the log. It is a thin layer: everything else is `jax.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "LLAMA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLAMA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLAMA_JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    cpu_collectives: str | None = "gloo",
    timeout_s: int = 300,
) -> ProcessInfo:
    """Join this process to the others (see the module docstring for where the coordinates come from)
    and return where it stands. Call it once, before any other JAX call; calling it again is a no-op.

    `cpu_collectives`: the CPU backend's cross-process collectives ("gloo" or "mpi"); without one,
    CPU-only processes cannot exchange data. GPUs and TPUs use their own (NCCL, ICI) regardless."""
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return _info()
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    configured = (coordinator_address, num_processes, process_id)

    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"coordinator address {coordinator_address!r} needs a port: host:port")
    if num_processes == 1:
        log.info("llama_jax.distributed: one process; nothing to join")
        return _info()
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)

    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                   initialization_timeout=timeout_s)
    except ValueError as e:
        # JAX found no cluster and nothing was configured: a single-process run, which is fine.
        if all(c is None for c in configured) and "coordinator_address" in str(e):
            log.info("llama_jax.distributed: no cluster detected and none configured; running as one process")
            return _info()
        raise ValueError(f"jax.distributed.initialize failed: {e} (set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} "
                         f"and {ENV_PROCESS_ID}, or pass them)") from None
    except RuntimeError as e:
        if "before any JAX" in str(e) and all(c is None for c in configured):
            # JAX already runs in this process (a notebook, a test calling the CLI) and nothing asks for a
            # cluster: carry on as the one process it is.
            log.info("llama_jax.distributed: JAX already started and no cluster configured; running as one process")
            return _info()
        if "before any JAX" in str(e):
            raise ValueError("llama_jax.distributed.initialize() must run before any other JAX call "
                             "(something already touched the devices)") from None
        raise
    info = _info()
    log.info("llama_jax.distributed: process %d of %d, %d local devices of %d", info.process_index,
             info.process_count, info.local_device_count, info.device_count)
    return info


def shutdown() -> None:
    """Leave the group (optional: JAX also does this at exit)."""
    jax.distributed.shutdown()
