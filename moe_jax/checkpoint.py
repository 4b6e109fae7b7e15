"""Checkpoints of the train state: orbax `CheckpointManager`, asynchronous, sharded, resumable.

A checkpoint is the whole train state pytree (params, moe_state, optimizer state, step, RNG, the
bad-step counter). Each process writes its own shards; `restore_latest` reads them back with the
shardings of a target tree, so a checkpoint written on one mesh shape restores onto another.

Failure handling:
  * a save cut short (killed process) leaves only a temporary directory, which orbax never lists
    as a step: the previous checkpoint is the latest complete one;
  * a listed checkpoint that fails to restore (truncated or damaged files) is reported in one
    line, renamed to `<step>.unreadable` (kept for inspection, never deleted; renaming also frees
    the step number for the next save) and the previous one is tried.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, TextIO

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

UNREADABLE_SUFFIX = ".unreadable"


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class _QuietClosedLoop:
  """Wraps sys.stderr to drop the `RuntimeError: Event loop is closed` tracebacks that
  tensorstore prints when reads still in flight finish after a failed restore has closed
  orbax's event loop: harmless, and they would bury the one-line report. Other text passes."""

  def __init__(self, stream: TextIO):
    self._stream, self._partial, self._block = stream, "", []

  def write(self, text: str) -> int:
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      if line.startswith("Traceback (most recent call last)") or (
          self._block and line.startswith(" ")):
        self._block.append(line + "\n")
        continue
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


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory` (one subdirectory per step)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, wait: bool = False) -> bool:
    """Starts saving `state` as `step` (returns once device buffers are copied out); False if that
    step is already saved. wait=True blocks until it is on disk."""
    if step in self._manager.all_steps():
      saved = False
    else:
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
      self._manager.wait_until_finished()
    return saved

  def wait(self):
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any,
                     report: Callable[[str], None] = print) -> tuple[Optional[Any], int]:
    """(state, step) from the newest readable checkpoint, or (None, 0) if there is none.

    abstract_state: jax.ShapeDtypeStruct leaves carrying the target shardings.
    """
    unreadable, state, step = [], None, 0
    if not isinstance(sys.stderr, _QuietClosedLoop):  # before any restore: tracebacks can start
      sys.stderr = _QuietClosedLoop(sys.stderr)       # while the failing read still propagates
    for candidate in reversed(self.steps()):
      try:
        state = self._manager.restore(candidate,
                                      args=ocp.args.StandardRestore(abstract_state))
        step = candidate
        break
      except Exception as e:  # orbax and tensorstore raise many types for damaged files
        unreadable.append(candidate)
        report(f"checkpoint step {candidate} in {self.directory} is unreadable "
               f"({_first_line(e)}); moved to {candidate}{UNREADABLE_SUFFIX}, "
               f"trying the previous one")
    if unreadable:
      self._set_aside(unreadable)
    return state, step

  def _set_aside(self, steps: list[int]):
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = src + UNREADABLE_SUFFIX, 1
        while os.path.exists(dst):
          n += 1
          dst = f"{src}{UNREADABLE_SUFFIX}{n}"
        os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moe_jax_checkpoint_set_aside")
    self._manager.reload()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def read_numpy(directory: str, step: int) -> Any:
  """The checkpoint of `step` as host numpy arrays (containers as saved: optax states come back
  as lists), with no mesh or target needed: for tests and offline analysis."""
  path = os.path.join(os.path.abspath(directory), str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)
