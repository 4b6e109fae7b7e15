"""What the entry point says when something is wrong: one line on stderr and an exit status.

  2    a bad flag, config value, data path, workdir (a file, read-only, in use by another run),
       a config that does not fit the workdir's checkpoints, or the environment (a compilation
       cache path that is a file); nothing was written
  3    numbers that cannot be trusted: a diverged run (its last good checkpoint is kept), an
       evaluation of non-finite weights
  4    the disk refused a write (full, read-only, quota); the checkpoints before it are intact
  5    multi-process: another process of the job died (its line names it and the last good
       checkpoint); rerun every process to resume
  130  Ctrl-C: the current step was saved if training had started (as SIGTERM, which exits 0)
"""
import contextlib
import errno
import importlib.util
import logging as std_logging
import os
import sys
from typing import Callable

from absl import logging
from ml_collections import config_flags

_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM)


class _ErrorsOnly(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.ERROR


@contextlib.contextmanager
def quiet_absl():
  """No absl warnings (config_flags' own, before the flags are parsed): our line says it."""
  absl_logger = logging.get_absl_logger()
  errors_only = _ErrorsOnly()  # a filter, not a level: parsing --verbosity resets the level
  absl_logger.addFilter(errors_only)
  try:
    yield
  finally:
    absl_logger.removeFilter(errors_only)


def fail_now(message: str, code: int):
  """fail() without the interpreter's teardown: a Ctrl-C during a compile leaves XLA's compiler
  threads running, and tearing the interpreter down under them crashes (SIGSEGV, BUILD_NOTES).
  Only where nothing is left to save or release (the workdir lock is an flock)."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def is_disk_error(error: BaseException) -> bool:
  return isinstance(error, OSError) and error.errno in _DISK_ERRORS


def config_values(flag, read: Callable):
  """(config file path, its ConfigDict with the flags' overrides) of the --config flag; one line
  and exit 2 if the flag is missing, the file does not exist or get_config returns no dict."""
  if not flag.present:
    fail("--config: required (e.g. --config=configs/tiny_moe.py)")
  path = config_flags.get_config_filename(flag)  # may end in ":arg"
  path = path if os.path.isfile(path) else path.split(":", 1)[0]
  if not os.path.isfile(path):
    fail(f"config={path!r}: no such config file")
  with quiet_absl():
    values = read()
  if not hasattr(values, "keys"):
    fail(f"config={path!r}: get_config() returned {values!r}; it must return a ConfigDict")
  return path, values


def check_environment():
  """Environment variables JAX reads later, where a bad value costs a traceback per compile."""
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if cache and os.path.exists(cache) and not os.path.isdir(cache):
    fail(f"JAX_COMPILATION_CACHE_DIR={cache!r}: is a file; it must name a directory")


def load_config_file(spec: str):
  """The config file's ConfigDict before overrides (config_flags keeps no copy of it)."""
  path, *arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def describe_flag_error(argv: list[str], error: Exception, known_flags: list[str]) -> str:
  """One line for a flag error, naming the flag or override key and what it allows."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
  if "Unknown command line flag" in lines[0]:
    name = lines[0].split("'")[1] if "'" in lines[0] else lines[0]
    return f"--{name}: unknown flag; experiments.run takes {', '.join(known_flags)}"
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None or not os.path.isfile(spec.split(":", 1)[0]):
    return f"config={spec!r}: no such config file" if spec else f"config: {lines[-1]}"
  try:
    base = load_config_file(spec)
  except Exception:  # pylint: disable=broad-except
    return f"config={spec!r}: {lines[-1]}"  # get_config failed: its own last line says why
  if not hasattr(base, "keys"):
    return f"config={spec!r}: get_config() returned {base!r}; it must return a ConfigDict"
  for flag in (a for a in argv if a.startswith("--config.")):
    key, _, value = flag[len("--config."):].partition("=")
    node, parts = base, key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(["config"] + parts[:i])
        allowed = ", ".join(node.keys()) if hasattr(node, "keys") else "no keys"
        return f"config.{key}={value!r}: unknown key; {where} has {allowed}"
      node = node[part]
    if f"--config.{key}=" in lines[0]:
      kind = "set in the config file" if node is None else f"of type {type(node).__name__}"
      return f"config.{key}={value!r}: must be a value {kind} ({lines[-1]})"
  return f"config={spec!r}: {lines[-1]}"
