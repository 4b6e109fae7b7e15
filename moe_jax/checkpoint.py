"""Checkpoints of the train state: orbax, asynchronous, sharded, resumable, never lost to a fault.

A checkpoint is the whole train state pytree (params, moe_state, optimizer state, step, RNG, the
bad-step counter) in `<directory>/<step>/default`. Each process writes its own shards;
`restore_latest` reads them back with the shardings of a target tree, so a checkpoint written on
one mesh shape restores onto another.

Every step carries checksums (moe_jax.checkpoint_manifest: each array's digest taken from memory
at save time, each file's once orbax finished it), verified when it is restored. Each checkpoint
is judged on its own files, newest first, never from a neighbour:
  * a save cut short (killed process) leaves only a temporary directory, never a step folder;
  * a step folder that is damaged (empty, no item folder, unreadable metadata, truncated or
    missing array data, an array or file that fails its checksum) is reported in one line and
    skipped; a writing run renames it
    `<step>.unreadable` (kept for inspection, and the step number is free for the next save),
    a reading one (eval, sample) leaves it where it is;
  * a readable checkpoint whose arrays do not fit the target (another model) is a
    `CheckpointMismatch`: nothing is renamed and no older checkpoint is tried.
A save that fails (a full disk) raises `SaveFailed`; the checkpoints before it are untouched.
Retention keeps the newest `keep` steps and, whatever their number, the newest verified one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any, Callable, Optional, TextIO

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_jax import checkpoint_manifest as manifest, distributed
from moe_jax.config import ConfigError

UNREADABLE_SUFFIX = ".unreadable"
ITEM = "default"  # orbax's item folder of a single-item checkpoint


class CheckpointMismatch(ConfigError):
  """A readable checkpoint holds another model than the config describes (one line)."""


class SaveFailed(OSError):
  """A checkpoint could not be written; the message is one line naming the newest good one."""


def reason(error: BaseException) -> str:
  """One short line for an exception from orbax or tensorstore: the operating system's error
  where there is one (tensorstore buries it after two file paths), else the first line without
  the object reprs (`<... at 0x...>`) that mean nothing to a user."""
  text = str(error)
  os_error = re.search(r"\[os_error_code='(\d+)'\]", text)
  if os_error:
    code = int(os_error.group(1))
    return f"OSError: [Errno {code}] {os.strerror(code)}"
  text = re.sub(r"<[^<>]*? at 0x[0-9a-fA-F]+>", "", text)
  line = next((l.strip() for l in text.splitlines() if l.strip()), "")
  return f"{type(error).__name__}: {line}"[:240].rstrip(": ")


@contextlib.contextmanager
def _quiet_absl():
  """orbax logs a WARNING for each metadata file it looks for and misses; our report says it."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class _NoOrbaxLogs(logging.Filter):
  """Drops orbax's own log records: a failed asynchronous save logs its traceback from a
  background thread, and the one-line SaveFailed already says what happened."""

  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


class _NoOrbaxOrphanTasks(logging.Filter):
  """Drops asyncio's "Task (or _GatheringFuture) exception was never retrieved" for orbax's
  writes: when one write of a save fails (a full disk), its sibling writes fail too and are
  garbage-collected unread, at a moment that depends on the collector (during the save, or at
  exit). The save's first error is the one-line SaveFailed; these repeat it with a traceback
  each. A task names its orbax coroutine in the message; a gathering future only in its
  traceback, so both are read."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name != "asyncio":
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[2] is not None:
      text += "".join(traceback.format_tb(record.exc_info[2]))
    return f"{os.sep}orbax{os.sep}" not in text


# On the asyncio logger for good, not per Checkpointer: the orphaned tasks may be collected after
# the run's Checkpointer is closed.
logging.getLogger("asyncio").addFilter(_NoOrbaxOrphanTasks())

# A traceback's last line: "ValueError: ...", "zipfile.BadZipFile: ...", "KeyboardInterrupt".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: |$)")


class _QuietClosedLoop:
  """Wraps sys.stderr to drop the `RuntimeError: Event loop is closed` tracebacks that
  tensorstore prints when reads or writes still in flight finish after a failed restore or save
  has closed orbax's event loop: harmless, and they would bury the one-line report. They come
  from another thread, so a line of ours may land inside one: it passes at once. Other text
  passes unchanged."""

  def __init__(self, stream: TextIO):
    self._stream, self._partial, self._block = stream, "", []

  def write(self, text: str) -> int:
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      if line.startswith("Traceback (most recent call last)") or (
          self._block and line.startswith(" ")):
        self._block.append(line + "\n")
      elif self._block and not _EXCEPTION_LINE.match(line):
        self._stream.write(line + "\n")
      else:
        block, self._block = self._block, []
        if not (block and line.strip() == "RuntimeError: Event loop is closed"):
          self._stream.write("".join(block) + line + "\n")
    return len(text)

  def flush(self):
    if self._partial and not self._block:
      self._stream.write(self._partial)
      self._partial = ""
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _key(entry) -> str:
  """One path entry as orbax's metadata spells it: named-tuple fields become dict keys."""
  name = getattr(entry, "name", None)
  return f"[{name!r}]" if name is not None else jax.tree_util.keystr((entry,))


def _arrays(tree: Any) -> dict[str, tuple[tuple, str]]:
  """{path: (shape, dtype name)} of a nested dict of arrays or array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"".join(_key(e) for e in p): (tuple(x.shape), np.dtype(x.dtype).name)
          for p, x in leaves if hasattr(x, "shape")}


def mismatch(stored: Any, target: Any) -> Optional[str]:
  """How the checkpoint's arrays differ from the target's (shape or dtype), or None. A path in
  only one tree counts for the model's own trees (params, moe_state, fp8); elsewhere (the
  optimizer state, stored by orbax as lists) only the paths both hold are compared."""
  problems = []
  if set(stored) != set(target):
    problems.append(f"holds {sorted(stored)}, the config needs {sorted(target)}")
  model = ("params", "moe_state", "fp8")  # first: the differences a user recognises
  for section in sorted(set(stored) & set(target), key=lambda k: (k not in model, k)):
    have, want = _arrays(stored[section]), _arrays(target[section])
    strict = section in model
    for path in sorted(have.keys() | want.keys()):
      if path not in want:
        if strict:
          problems.append(f"{section}{path} is only in the checkpoint")
      elif path not in have:
        if strict:
          problems.append(f"{section}{path} is not in the checkpoint")
      elif have[path][0] != want[path][0]:
        problems.append(f"{section}{path} has shape {have[path][0]}, the config needs "
                        f"{want[path][0]}")
      elif have[path][1] != want[path][1]:
        problems.append(f"{section}{path} has dtype {have[path][1]}, the config needs "
                        f"{want[path][1]}")
  if not problems:
    return None
  more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
  return "; ".join(problems[:2]) + more


class Checkpointer:
  """The checkpoints of one run under `directory` (one subdirectory per step).

  read_only=True (eval, sample): restores only; renames, saves and deletes nothing.
  Otherwise keeps the last `keep` checkpoints (and the newest verified one) and sets damaged
  ones aside.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self._keep, self._async, self.read_only = keep, async_save, read_only
    self._manager: Optional[ocp.CheckpointManager] = None
    self._pending: dict[int, dict] = {}  # step -> array digests, until orbax has finished it
    self._quiet = _NoOrbaxLogs()
    logging.getLogger("absl").addFilter(self._quiet)
    if not read_only:  # what a peer's death leaves behind (distributed's watchdog says it)
      distributed.leaving(self.describe)

  def steps(self) -> list[int]:
    """Step folders, ascending (a save in progress is a temporary folder, not listed)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory)
                  if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)))

  def _item(self, step: int) -> str:
    return os.path.join(self.directory, str(step), ITEM)

  def _manager_for_saving(self) -> ocp.CheckpointManager:
    if self.read_only:
      raise RuntimeError(f"{self.directory}: opened read-only")
    if self._manager is None:
      # Retention is ours (prune): orbax would count unverified steps too.
      options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                             enable_async_checkpointing=self._async)
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    return self._manager

  def save(self, step: int, state: Any, *, wait: bool = False) -> bool:
    """Starts saving `state` as `step` (returns once device buffers are copied out); False if that
    step is already saved. wait=True blocks until it is on disk. SaveFailed if it cannot be
    written (this save's or an earlier asynchronous one's error)."""
    try:
      manager = self._manager_for_saving()
      self._finish()  # orbax waits for the previous save here anyway
      if step in self.steps() or step in manager.all_steps():
        return False
      # Taken now: the caller may donate the state's buffers to its next step.
      arrays = manifest.array_digests(state)
      saved = manager.save(step, args=ocp.args.StandardSave(state), force=True)
      if saved:
        self._pending[step] = arrays
      if wait:
        self._finish()
    except SaveFailed:
      raise
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's and orbax's types)
      raise self._save_failed(step, e) from None
    return saved

  def _finish(self):
    """Waits for the save in flight, writes the manifests of the steps it finished (every
    process its own), then applies the retention policy."""
    if self._manager is None:
      return
    self._manager.wait_until_finished()
    pending, self._pending = self._pending, {}
    for step, arrays in sorted(pending.items()):
      step_dir = os.path.join(self.directory, str(step))
      if os.path.isdir(step_dir):
        manifest.write(step_dir, arrays, jax.process_index(), jax.process_count())
    if pending and jax.process_count() > 1:
      multihost_utils.sync_global_devices("moe_jax_checkpoint_manifests")
    if pending:
      self.prune()

  def poll(self):
    """Writes the manifests of saves finished since the last call (cheap: call between steps);
    processes agree, since a manifest write ends in a barrier."""
    if not self._pending or self._manager is None:
      return
    done = not self._manager.is_saving_in_progress()
    if jax.process_count() > 1:
      done = bool(np.min(multihost_utils.process_allgather(np.int32(done))))
    if done:
      self.wait()

  def wait(self):
    try:
      self._finish()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(None, e) from None

  def verified(self, step: int) -> bool:
    """Whether the step's checksums are all there (written after orbax finished it)."""
    return manifest.complete(os.path.join(self.directory, str(step)))

  def describe(self) -> str:
    good, newest = self.last_good(), max(self.steps(), default=0)
    text = (f"the last good checkpoint is step {good} in {self.directory}" if good else
            f"no verified checkpoint in {self.directory}")
    return text + (f" (step {newest} is newer, without checksums)" if newest > (good or 0) else "")

  def last_good(self) -> Optional[int]:
    """The newest verified step, or None."""
    return next((s for s in reversed(self.steps()) if self.verified(s)), None)

  def _save_failed(self, step: Optional[int], error: Exception) -> SaveFailed:
    good = [s for s in self.steps() if os.path.isfile(os.path.join(self._item(s), "_METADATA"))]
    which = f"step {step}" if step is not None else "the last checkpoint"
    newest = f"step {good[-1]} is the newest complete one" if good else "none was completed"
    return SaveFailed(f"could not save {which} in {self.directory} ({reason(error)}); {newest}")

  def prune(self):
    """Deletes the oldest step folders beyond `keep`, never the newest verified one (newer
    steps may lack their checksums: killed before the manifest, or written before checksums)."""
    steps = self.steps()
    if self.read_only or len(steps) <= self._keep:
      return
    good = self.last_good()
    if jax.process_index() == 0:
      for step in steps[:len(steps) - self._keep]:
        if step != good:
          shutil.rmtree(os.path.join(self.directory, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moe_jax_checkpoint_prune")

  def damage(self, step: int) -> Optional[str]:
    """What is missing from the step folder's layout, or None (the data is checked by reading)."""
    item = self._item(step)
    if not os.path.isdir(item):
      return f"no item folder '{ITEM}' (an interrupted copy or save?)"
    if not os.path.isfile(os.path.join(item, "_METADATA")):
      return f"no {ITEM}/_METADATA"
    return None

  def restore_latest(self, abstract_state: Any,
                     report: Callable[[str], None] = print) -> tuple[Optional[Any], int]:
    """(state, step) from the newest readable checkpoint, or (None, 0) if there is none.

    abstract_state: jax.ShapeDtypeStruct leaves carrying the target shardings.
    Raises CheckpointMismatch if the newest readable checkpoint holds another model.
    """
    if not isinstance(sys.stderr, _QuietClosedLoop):  # before any restore: tracebacks can start
      sys.stderr = _QuietClosedLoop(sys.stderr)       # while the failing read still propagates
    checkpointer = ocp.StandardCheckpointer()
    for step in reversed(self.steps()):
      problem = self.damage(step)
      if problem is None:
        try:
          with _quiet_absl():
            stored = checkpointer.metadata(self._item(step)).item_metadata
          if not hasattr(stored, "keys"):
            raise ValueError("no tree metadata")
        except Exception as e:  # pylint: disable=broad-except
          problem = f"its metadata cannot be read ({reason(e)})"
      if problem is None:
        differs = mismatch(stored, abstract_state)
        if differs:
          raise CheckpointMismatch(
              f"checkpoint step {step} in {self.directory} does not fit this config: {differs}; "
              "use the config that wrote it, or another --workdir")
        try:
          with _quiet_absl():
            state = checkpointer.restore(self._item(step), abstract_state)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"its data cannot be read ({reason(e)})"
      if problem is None:
        problem = self._verify(step, state, report)
        if problem is None:
          return state, step
      self._set_aside(step, problem, report)
    return None, 0

  def _verify(self, step: int, state: Any, report: Callable[[str], None]) -> Optional[str]:
    """The step's checksum problem, or None; every process checks its own shards and files,
    and all agree (one damaged shard anywhere sets the step aside everywhere)."""
    verified, problem = manifest.verify(os.path.join(self.directory, str(step)), state,
                                        jax.process_index(), jax.process_count())
    if jax.process_count() > 1:
      bad = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
      if problem is None and bad.any():
        problem = f"process {int(np.argmax(bad))} found a shard failing its checksum"
    if problem is None and not verified:
      report(f"checkpoint step {step} in {self.directory} has no checksums (written before "
             "they were, or stopped before its manifest): restored unverified")
    return problem

  def _set_aside(self, step: int, problem: str, report: Callable[[str], None]):
    where = f"checkpoint step {step} in {self.directory} is unreadable: {problem}"
    if self.read_only:
      report(f"{where}; left as it is, trying the previous one")
      return
    src = os.path.join(self.directory, str(step))
    dst, n = src + UNREADABLE_SUFFIX, 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}{UNREADABLE_SUFFIX}{n}"
    report(f"{where}; moved to {os.path.basename(dst)}, trying the previous one")
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moe_jax_checkpoint_set_aside")

  def close(self):
    """Waits for a save in flight; SaveFailed if it failed."""
    logging.getLogger("absl").removeFilter(self._quiet)
    if self._manager is not None:
      try:
        self._finish()
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_failed(None, e) from None
      finally:
        manager, self._manager = self._manager, None
        with contextlib.suppress(Exception):
          manager.close()


def read_numpy(directory: str, step: int) -> Any:
  """The checkpoint of `step` as host numpy arrays (containers as saved: optax states come back
  as lists), with no mesh or target needed: for tests and offline analysis."""
  path = os.path.join(os.path.abspath(directory), str(step), ITEM)
  checkpointer = ocp.PyTreeCheckpointer()
  with _quiet_absl():
    tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)
