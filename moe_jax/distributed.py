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

A peer that dies (killed, its host gone) leaves the others blocked in a collective until JAX's
coordination service notices its missing heartbeats and aborts them with a C++ stack dump. So
every process also runs a watchdog thread: it publishes a counter in the coordination service's
key-value store every HEARTBEAT_S seconds and watches the others'; a peer whose counter stands
still for PEER_TIMEOUT_S (or a coordinator that no longer answers) ends this process at once with
one line on stderr naming the dead process and what the run leaves behind (`leaving`), exit
status 5. JAX's own heartbeat timeout is set later than ours.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Union

import jax

from moe_jax.config import ConfigError

ENV_COORDINATOR = "MOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"

# The variables JAX's own cluster detection requires, and the one holding the task count.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"

HEARTBEAT_S = 2.0
PEER_TIMEOUT_S = 30.0
JAX_HEARTBEAT_TIMEOUT_S = 100  # JAX's default: its abort must come after our line
PEER_DIED = 5  # exit status
_KEY = "moe_jax_alive/"
_STOP = threading.Event()  # set at exit: the watchdog leaves before JAX shuts down
_LEAVING: list[Callable[[], str]] = []  # the newest run's, one at most


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
                             local_device_ids=local_device_ids,
                             heartbeat_timeout_seconds=JAX_HEARTBEAT_TIMEOUT_S)
  if jax.default_backend() == "cpu" and jax.__version_info__ >= (0, 12):
    # jax 0.12.1: two processes whose executables came from a warm persistent compilation
    # cache hung in their first gloo collective, 2 times of 2 (BUILD_NOTES.md, "Sharding and
    # multi-process"). Compiling costs seconds; a hang costs the run.
    jax.config.update("jax_enable_compilation_cache", False)
  watchdog = threading.Thread(target=_watch, name="moe_jax_peer_watchdog", daemon=True)
  watchdog.start()
  # Registered after JAX's own shutdown, so it runs before it (atexit is last in, first out):
  # a watchdog still inside a client call while the service shuts down crashed process 0
  # with SIGSEGV at exit (jax 0.12.1).
  atexit.register(_stop_watchdog, watchdog)
  return True


def _stop_watchdog(watchdog: threading.Thread):
  _STOP.set()
  watchdog.join(timeout=2 * HEARTBEAT_S + 5)


def leaving(describe: Callable[[], str]):
  """A peer's death is reported with describe() (say, the newest checkpoint of the run this
  process works on now), in place of the one given before."""
  _LEAVING[:] = [describe]


def await_peer_verdict():
  """After a collective failed (gloo sees a dead peer's socket at once): gives the watchdog the
  time to name the dead process and end this one; returns if every peer is alive after all."""
  if jax.process_count() > 1:
    time.sleep(PEER_TIMEOUT_S + 3 * HEARTBEAT_S)


def _peer_died(what: str):
  try:
    left = "; ".join(d() for d in _LEAVING) or "no run had started"
  except Exception as e:  # pylint: disable=broad-except  (the line must come out regardless)
    left = f"the run's state is unknown ({type(e).__name__})"
  print(f"error: {what}; {left}; rerun every process to resume", file=sys.stderr, flush=True)
  os._exit(PEER_DIED)  # pylint: disable=protected-access  (the main thread is in a collective)


def _watch():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (the client, publicly)
  try:
    client = ocp.multihost.get_jax_distributed_client()
  except Exception:  # pylint: disable=broad-except  (no client: JAX was not really initialized)
    return
  me, count = jax.process_index(), jax.process_count()
  last = {}  # peer -> (counter, when it last changed)
  beat = 0
  while not _STOP.is_set():
    beat += 1
    try:
      client.key_value_set(f"{_KEY}{me}", str(beat), allow_overwrite=True)
      values = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(_KEY)}
    except Exception as e:  # pylint: disable=broad-except  (gRPC's errors)
      line = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
      _peer_died(f"process 0 of {count} (the coordinator) no longer answers ({line[:160]})")
    now = time.monotonic()
    for peer in (p for p in range(count) if p != me):
      value = values.get(str(peer))
      if peer not in last or last[peer][0] != value:
        last[peer] = (value, now)
      elif now - last[peer][1] > PEER_TIMEOUT_S:
        _peer_died(f"process {peer} of {count} stopped (no heartbeat for "
                   f"{PEER_TIMEOUT_S:.0f} s: killed, crashed or its host is gone)")
    if _STOP.wait(HEARTBEAT_S):
      return


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """True on the one process that writes logs and plots."""
  return jax.process_index() == 0
