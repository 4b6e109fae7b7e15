"""The entry point: `python -m experiments.run --config=configs/tiny_moe.py[:arg] [--workdir=DIR]
[--config.train.steps=100 ...]`. Runs the study named by the config's `experiment` field.

Anything wrong is one line on stderr and an exit status (experiments/cli.py lists them), before
anything is written where it can be known before. SIGTERM saves the current step and exits 0,
Ctrl-C the same with status 130; a rerun resumes where it stopped.
"""
if __name__ == "__main__":  # before the imports below: a Ctrl-C while they load is kept
  from moe_jax import ctrl_c as _ctrl_c
  _ctrl_c.catch()

import os  # noqa: E402
import signal  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import experiments  # noqa: E402
from experiments import cli  # noqa: E402
from moe_jax import config, ctrl_c  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py), optionally with :arg", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory; default workdir/<config stem>")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_FLAGS = ["--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id"]


def _parse(argv: list[str]) -> list[str]:
  try:
    with cli.quiet_absl():
      return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(cli.describe_flag_error(argv, e, _FLAGS))


def _run(cfg: config.ExperimentConfig, path: str):
  import jax  # pylint: disable=import-outside-toplevel
  from moe_jax import checkpoint, distributed, train  # pylint: disable=import-outside-toplevel  (JAX: after the checks)
  ctrl_c.arm()  # not earlier: raised inside a C extension's import it becomes an ImportError
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value or os.path.join("workdir", os.path.splitext(os.path.basename(path))[0])
  try:
    experiments.resolve(cfg.experiment)(cfg, workdir)
  except train.Preempted as e:  # saved; a rerun resumes (0: what a scheduler expects)
    if e.signum == signal.SIGINT:
      cli.fail(f"{e} (Ctrl-C)", 130)
  except train.NonFinite as e:
    cli.fail(str(e), 3)
  except checkpoint.SaveFailed as e:
    cli.fail(str(e), 4)
  except jax.errors.JaxRuntimeError:
    distributed.await_peer_verdict()  # a dead peer: its one line, in place of this traceback
    raise


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  path, values = cli.config_values(flags.FLAGS["config"], lambda: _CONFIG.value)
  cli.check_environment()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    cfg = config.from_config_dict(values)
    if cfg.experiment not in experiments.EXPERIMENTS:
      cli.fail(f"experiment={cfg.experiment!r}: must be one of {', '.join(experiments.EXPERIMENTS)}")
    _run(cfg, path)
  except config.ConfigError as e:
    cli.fail(str(e))
  except KeyboardInterrupt:
    cli.fail_now("interrupted (Ctrl-C) before training started; nothing was saved", 130)
  except OSError as e:
    if not cli.is_disk_error(e):
      raise
    cli.fail(f"{e.filename or 'a file'}: {e.strerror} (errno {e.errno}); checkpoints written "
             "before are intact", 4)


def entry():
  ctrl_c.catch()
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  entry()
