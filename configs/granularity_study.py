"""Expert granularity at equal active compute: 8 experts top-1, 32 top-4, 64 top-6 plus a
shared expert, and a dense model (experiments/design_study.py).

  python -m experiments.run --config=configs/granularity_study.py --workdir=/tmp/granularity_study

Arms x two seeds of 200 steps (batch 16 x 128) on the tiny MoE; "runlocal" is a smoke test.
"""
import importlib.util
import pathlib


def get_config(arg=None):
  path = pathlib.Path(__file__).with_name("balance_study.py")  # its study_config, by path
  spec = importlib.util.spec_from_file_location("balance_study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.study_config("granularity_study", arg)
