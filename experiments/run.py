"""The entry point: `python -m experiments.run --config=configs/tiny_moe.py[:arg] [--workdir=DIR]
[--config.train.steps=100 ...]`. Runs the study named by the config's `experiment` field.

Any config problem (a bad flag, key, type, range, mesh or data path) exits with status 2 and one
line naming the key, before anything is written; a diverged run exits with status 3. SIGTERM
saves the current step and exits with status 0, a study of several runs included (a rerun
resumes where it stopped).
"""
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import experiments
from moe_jax import config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py), optionally with :arg", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory; default workdir/<config stem>")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def _exit(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _load(spec: str):
  """The config file's ConfigDict before overrides (config_flags keeps no copy of it)."""
  path, *arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def _describe(argv: list[str], error: Exception) -> str:
  """One line for a flag error, naming the override key and what it allows where possible."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None or not os.path.isfile(spec.split(":", 1)[0]):
    return f"config={spec!r}: no such config file" if spec else f"config: {lines[-1]}"
  try:
    base = _load(spec)
  except Exception:  # pylint: disable=broad-except
    return f"config={spec!r}: {lines[-1]}"  # get_config failed: its own last line says why
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


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _exit(_describe(argv, e))


def main(argv):
  if len(argv) > 1:
    _exit(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["config"].present:
    _exit("--config: required (e.g. --config=configs/tiny_moe.py)")
  path = config_flags.get_config_filename(flags.FLAGS["config"])  # may end in ":arg"
  path = path if os.path.isfile(path) else path.split(":", 1)[0]
  if not os.path.isfile(path):
    _exit(f"config={path!r}: no such config file")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    cfg = config.from_config_dict(_CONFIG.value)
    if cfg.experiment not in experiments.EXPERIMENTS:
      _exit(f"experiment={cfg.experiment!r}: must be one of {', '.join(experiments.EXPERIMENTS)}")
    from moe_jax import distributed  # pylint: disable=import-outside-toplevel  (JAX: after the checks)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value or os.path.join("workdir", os.path.splitext(os.path.basename(path))[0])
    experiments.resolve(cfg.experiment)(cfg, workdir)
  except config.ConfigError as e:
    _exit(str(e))
  except Exception as e:  # pylint: disable=broad-except
    from moe_jax.train import Diverged, Preempted  # pylint: disable=import-outside-toplevel
    if isinstance(e, Preempted):
      return  # saved; a rerun resumes (status 0, as a scheduler expects after SIGTERM)
    if not isinstance(e, Diverged):
      raise
    _exit(str(e), code=3)


def entry():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  entry()
