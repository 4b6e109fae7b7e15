"""A run's workdir: one writer at a time, files written whole, and a record of config changes.

  lock     `lock(workdir)`: an exclusive flock on <workdir>/.lock held while a run writes. The
           kernel drops it when the process ends however it ends, so a lock is never stale.
  files    `write_json` replaces a file atomically (a crash leaves the old or the new one) and
           writes strict JSON (non-finite floats become null); `read_json` treats a torn or
           missing file as absent and says so.
  changes  `config_changes` sorts the differences between the config a workdir's checkpoints
           were written with and the one resuming them: keys that change what the checkpoint
           means are refused, the rest (how the same computation runs, what is logged, how long
           the run is) are accepted and appended to config_history.jsonl.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

from moe_jax.config import ConfigError

LOCK_FILE = ".lock"
HISTORY_FILE = "config_history.jsonl"

# Keys a resume may change. Everything else (model and MoE shape, FP8 numerics, optimiser and
# schedule, seed, batch, data) is part of what the checkpoint is: changing it is a new run.
RESUMABLE = ("experiment", "hf_path", "seeds", "mesh.", "model.dtype", "moe.dtype",
             "moe.grouped_backend", "moe.parallelism", "train.steps", "train.log_every",
             "train.eval_every", "train.eval_batches", "train.checkpoint_every",
             "train.keep_checkpoints", "train.max_bad_steps", "train.inject_nan_at_steps")


def prepare(workdir: str):
  """Creates workdir if needed; ConfigError (one line) if it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir={workdir!r}: is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):  # a read-only mount or an immutable folder
      pass
  except OSError as e:
    raise ConfigError(f"workdir={workdir!r}: cannot be written ({e.strerror or e})") from None


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock; ConfigError naming the holder if another run has it."""
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+")  # pylint: disable=consider-using-with  (held for the run)
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise ConfigError(f"workdir={workdir!r}: in use by another run ({holder}); wait for it "
                        "to end or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    yield
  finally:
    f.close()  # releases the flock


def _finite(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def write_json(path: str, value: Any, **dump_args):
  """Writes value as strict JSON (NaN and inf as null) through a temporary file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(_finite(value), f, allow_nan=False, **dump_args)
      f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def read_json(path: str, report: Callable[[str], None] = print) -> Optional[Any]:
  """The JSON value in path; None if it is missing, or torn (then reported in one line)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError) as e:
    report(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); ignored")
    return None


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def config_changes(old: dict, new: dict) -> tuple[dict, dict]:
  """(refused, accepted): {dotted key: (old value, new value)} of the keys that differ."""
  before, after = _flat(old), _flat(new)
  refused, accepted = {}, {}
  for key in sorted(before.keys() | after.keys()):
    if key in before and key in after and before[key] != after[key]:
      kind = accepted if key.startswith(RESUMABLE) else refused
      kind[key] = (before[key], after[key])
  return refused, accepted


def record_changes(workdir: str, step: int, accepted: dict):
  """Appends one line {time, step, changes: {key: [old, new]}} to config_history.jsonl."""
  line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
          "changes": {k: list(v) for k, v in accepted.items()}}
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(_finite(line)) + "\n")
