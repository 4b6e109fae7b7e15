"""Expert granularity at equal active compute: 8 experts top-1, 32 top-4, 64 top-6 plus a
shared expert, and a dense model (experiments/design_study.py).

  python -m experiments.run --config=configs/granularity_study.py --workdir=/tmp/granularity_study

Arms x two seeds of 200 steps (batch 16 x 128) on the tiny MoE; "runlocal" is a smoke test.
"""

import pathlib
import runpy


def get_config(arg=None):
  shared = runpy.run_path(str(pathlib.Path(__file__).with_name("balance_study.py")))
  return shared["study_config"]("granularity_study", arg)
