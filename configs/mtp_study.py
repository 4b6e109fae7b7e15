"""Multi-token prediction on (depth 1, V3's weight schedule) and off: held-out loss of the main
model at equal steps (experiments/design_study.py).

  python -m experiments.run --config=configs/mtp_study.py --workdir=/tmp/mtp_study

Arms x two seeds of 200 steps (batch 16 x 128) on the tiny MoE; "runlocal" is a smoke test.
"""
import importlib.util
import pathlib


def get_config(arg=None):
  path = pathlib.Path(__file__).with_name("balance_study.py")  # its study_config, by path
  spec = importlib.util.spec_from_file_location("balance_study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.study_config("mtp_study", arg)
