"""Multi-token prediction on (depth 1, V3's weight schedule) and off: held-out loss of the main
model at equal steps (experiments/design_study.py).

  python -m experiments.run --config=configs/mtp_study.py --workdir=/tmp/mtp_study

Arms x two seeds of 200 steps (batch 16 x 128) on the tiny MoE; "runlocal" is a smoke test.
"""

import pathlib
import runpy


def get_config(arg=None):
  shared = runpy.run_path(str(pathlib.Path(__file__).with_name("balance_study.py")))
  return shared["study_config"]("mtp_study", arg)
