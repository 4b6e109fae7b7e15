"""A run's workdir: one writer at a time, files written whole, and a record of config changes.

  lock     `lock(workdir)`: an exclusive flock on <workdir>/.lock held while a run writes. The
           kernel drops it when the process ends however it ends, so a lock is never stale.
  files    `write_json` replaces a file atomically (a crash leaves the old or the new one) and
           writes strict JSON (non-finite floats become null); `read_json` treats a torn or
           missing file as absent and says so.
  claim    `claim(workdir)`: prepare + lock for a writing run, agreed by every process.
  paths    `write_config` records the config and, in config_paths.json, its file paths relative
           to the workdir: a copied or moved workdir whose files moved with it (an R1 run's
           corpus) still matches the config that names them at their new place.
  changes  `check_config` and `config_changes` sort the differences between the config a
           workdir's checkpoints were written with and the one resuming them: keys that change what the checkpoint
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

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_jax.config import ConfigError, ExperimentConfig, from_config_dict

CONFIG_FILE = "config.json"
PATHS_FILE = "config_paths.json"  # the config's file paths relative to the workdir
PATH_KEYS = ("data.path",)
LOCK_FILE = ".lock"
HISTORY_FILE = "config_history.jsonl"

# Keys a resume may change. Everything else (model and MoE shape, FP8 numerics, optimiser and
# schedule, seed, batch, data) is part of what the checkpoint is: changing it is a new run.
RESUMABLE = ("experiment", "hf_path", "seeds", "mesh.", "model.dtype", "model.remat", "moe.dtype",
             "moe.grouped_backend", "moe.parallelism", "train.microbatches",
             "train.pipeline_repeats", "train.steps", "train.log_every",
             "train.eval_every", "train.eval_batches", "train.checkpoint_every",
             "train.keep_checkpoints", "train.max_bad_steps", "train.inject_nan_at_steps",
             "serve.")
# What a reading experiment (eval, sample) needs to match: the model the checkpoint holds.
_MODEL_KEYS = ("model.", "moe.", "fp8.")


def check_not_a_file(workdir: str):
  """ConfigError (one line) if workdir names something other than a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir={workdir!r}: is a file, not a directory")


def prepare(workdir: str):
  """Creates workdir if needed; ConfigError (one line) if it is a file or cannot be written."""
  check_not_a_file(workdir)
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
  try:
    f = open(path, "a+")  # pylint: disable=consider-using-with  (held for the run)
  except OSError as e:
    what = "is a directory, not a lock file" if isinstance(e, IsADirectoryError) else (
        f"cannot be opened ({e.strerror or e})")
    raise ConfigError(f"{path}: {what}; remove it (the run makes its own) and rerun") from None
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


def write_config(workdir: str, cfg: ExperimentConfig):
  """config.json, and config_paths.json beside it (see the module doc)."""
  values = _flat(cfg.to_dict())
  write_json(os.path.join(workdir, CONFIG_FILE), cfg.to_dict(), indent=2)
  write_json(os.path.join(workdir, PATHS_FILE),
             {k: os.path.relpath(os.path.abspath(values[k]), os.path.abspath(workdir))
              for k in PATH_KEYS if values.get(k)}, indent=2)


def _moved(key: str, new: Any, workdir: str, relative: Any) -> bool:
  """Whether `new` names, relative to the workdir, the path recorded for `key`."""
  return (isinstance(relative, dict) and isinstance(new, str) and bool(new) and
          relative.get(key) == os.path.relpath(os.path.abspath(new), os.path.abspath(workdir)))


def check_config(cfg: ExperimentConfig, workdir: str, *, reading: bool = False,
                  report=print) -> dict:
  """Compares cfg with the config the workdir's run was written with (config.json).

  Refuses (ConfigError naming the key, nothing changed) what would change the meaning of its
  checkpoints; returns the accepted changes {key: (old, new)} (see RESUMABLE). A reading
  experiment only needs the model to match. No config.json, or a torn one: {} (the checkpoint's
  own shapes are checked when it is restored).
  """
  old = read_json(os.path.join(workdir, CONFIG_FILE), report=report)
  if not isinstance(old, dict):
    return {}
  with contextlib.suppress(ConfigError, TypeError, ValueError):
    old = from_config_dict(old).to_dict()  # fields added since then take their defaults
  refused, accepted = config_changes(old, cfg.to_dict())
  relative = read_json(os.path.join(workdir, PATHS_FILE), report=report)
  for key in [k for k in refused if _moved(k, refused[k][1], workdir, relative)]:
    accepted[key] = refused.pop(key)  # the workdir moved, its files with it
  if reading:
    refused = {k: v for k, v in refused.items() if k.startswith(_MODEL_KEYS)}
  for key, (before, after) in refused.items():
    raise ConfigError(f"{key}={after!r}: the run in {workdir} used {before!r}; use another "
                      "--workdir to start a new run")
  return accepted


@contextlib.contextmanager
def claim(path: str):
  """The workdir, created, writable and locked for this run (all processes agree)."""
  error = None
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      try:
        prepare(path)
        stack.enter_context(lock(path))
      except ConfigError as e:
        error = e
    if jax.process_count() > 1:
      if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and not error:
        error = ConfigError(f"workdir={path!r}: refused on process 0 (see its error)")
      if not error:
        os.makedirs(path, exist_ok=True)
    if error:
      raise error
    yield
