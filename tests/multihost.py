"""Runs a script as N cooperating JAX processes over loopback: the tests' tiny cluster.

Each process gets `devices_per_process` fake CPU devices and the MOE_JAX_* variables that
`moe_jax.distributed.initialize()` reads, so a script only has to call it. Scripts report by
printing lines `RESULT <json>` (gloo writes its own lines to stdout); `results` parses them.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence, Union

from moe_jax import distributed

RESULT_PREFIX = "RESULT "
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Launcher variables JAX's cluster detection would read in place of ours.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_")


class ProcessesFailed(AssertionError):
  """A process exited non-zero or the group ran out of time; carries every process's output."""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS (conftest.py's compile settings) with `devices` fake devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])


def _child_env(devices: int, port: int, num_processes: int, process_id: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on a timeout prints every thread's stack
  env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
  env[distributed.ENV_PROCESS_ID] = str(process_id)
  env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
  return env


def _tail(path: pathlib.Path, chars: int = 6000) -> str:
  return path.read_text(errors="replace")[-chars:]


def run_processes(script: Union[str, os.PathLike], num_processes: int = 2,
                  devices_per_process: int = 4, timeout: float = 90.0,
                  args: Sequence[str] = ()) -> list[str]:
  """Runs `script` (a .py path or Python source) in `num_processes` processes; their stdouts.

  If one process fails the others are killed at once: they would otherwise block in a
  collective until JAX's own timeouts (minutes). Raises ProcessesFailed with all outputs.
  """
  with tempfile.TemporaryDirectory(prefix="multihost_") as tmp:
    tmp = pathlib.Path(tmp)
    path = pathlib.Path(script) if isinstance(script, os.PathLike) else None
    if path is None and "\n" not in script and str(script).endswith(".py"):
      path = pathlib.Path(script)
    if path is None:
      path = tmp / "script.py"
      path.write_text(script)
    port = free_port()
    procs, outs, errs = [], [], []
    try:
      for i in range(num_processes):
        outs.append(tmp / f"stdout_{i}")
        errs.append(tmp / f"stderr_{i}")
        with open(outs[i], "w") as out, open(errs[i], "w") as err:
          procs.append(subprocess.Popen(
              [sys.executable, str(path), *args], stdout=out, stderr=err, cwd=_REPO_ROOT,
              env=_child_env(devices_per_process, port, num_processes, i)))
      deadline = time.monotonic() + timeout
      problem = None
      while problem is None:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
          problem = f"exit codes {codes}"
        elif all(c == 0 for c in codes):
          break
        elif time.monotonic() > deadline:
          problem = f"timed out after {timeout}s, exit codes {codes}"
        else:
          time.sleep(0.05)
    finally:
      if problem is not None and problem.startswith("timed out"):
        hung = [p for p in procs if p.poll() is None]
        for p in hung:  # where each one hangs, in its stderr, before it goes
          p.send_signal(signal.SIGABRT)
        for p in hung:
          try:
            p.wait(timeout=10)
          except subprocess.TimeoutExpired:
            pass
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
    if problem is not None:
      report = "\n".join(f"--- process {i} stdout:\n{_tail(outs[i])}\n"
                         f"--- process {i} stderr:\n{_tail(errs[i])}"
                         for i in range(num_processes))
      raise ProcessesFailed(f"{num_processes} processes: {problem}\n{report}")
    return [o.read_text() for o in outs]


def results(stdout: str) -> list[Any]:
  """The JSON values a script printed on `RESULT ` lines, in order."""
  return [json.loads(line[len(RESULT_PREFIX):]) for line in stdout.splitlines()
          if line.startswith(RESULT_PREFIX)]
