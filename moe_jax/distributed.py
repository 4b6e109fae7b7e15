"""Multi-process start-up: call `initialize` once, before any JAX computation.

Each process then sees every device of the job in `jax.devices()` (its own in
`jax.local_devices()`), so the mesh from `sharding.make_mesh` and jitted code are the same as in a
single process; only host data differs (`sharding.global_array`).

Where the job description comes from, first match wins:
  1. explicit arguments;
  2. our environment variables MOE_JAX_COORDINATOR ("host:port"), MOE_JAX_NUM_PROCESSES,
     MOE_JAX_PROCESS_ID (what the tests' loopback launcher sets);
  3. a SLURM step or an Open MPI launch with more than one task, which
     `jax.distributed.initialize` detects by itself.
Anything else is one process, and `initialize` does nothing.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import jax

from moe_jax.config import ConfigError

ENV_COORDINATOR = "MOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"

# The variables JAX's own cluster detection requires, and the one holding the task count.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r}: must be an integer") from None


def _cluster_process_count() -> Optional[int]:
  """Processes launched by SLURM or Open MPI, or None when neither launched this one."""
  if all(var in os.environ for var in _SLURM_VARS):
    return _env_int("SLURM_NTASKS")
  if _OMPI_URI in os.environ:
    return _env_int("OMPI_COMM_WORLD_SIZE")
  return None


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Union[int, Sequence[int]]] = None) -> bool:
  """Joins this process to a multi-process job; returns False (doing nothing) for one process."""
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  given = (coordinator_address, num_processes, process_id)
  count = num_processes if any(v is not None for v in given) else _cluster_process_count()
  if count is None or count == 1:
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id={process_id}: must be in [0, num_processes={num_processes})")
  # Cross-process collectives between CPU devices need an implementation chosen before the CPU
  # backend starts; gloo runs over TCP, so loopback tests take the path a GPU cluster takes with
  # NCCL. It only concerns the CPU client, so it is harmless on GPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Arguments left None are filled in by JAX's SLURM / Open MPI detection.
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """True on the one process that writes logs and plots."""
  return jax.process_index() == 0
