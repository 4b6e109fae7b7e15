"""Studies run by `python -m experiments.run`, chosen by the config's `experiment` field.

EXPERIMENTS maps each name to "module:function" (function defaults to `run`), a function
`run(config: ExperimentConfig, workdir: str)`. Modules are imported only when chosen, so a study
with heavy imports costs nothing to the others. A new study adds one line here.
"""
from __future__ import annotations

import importlib
from typing import Callable

EXPERIMENTS = {
    "train": "experiments.train:run",
    "eval": "experiments.train:run_eval",
    "count": "experiments.count:run",
    "plot": "experiments.plot:run",
    "sample": "experiments.sample:run",
    "sharding_study": "experiments.sharding_study:run",
    "fp8_study": "experiments.fp8_study:run",
    "hf_eval": "experiments.hf_eval:run",
    "balance_study": "experiments.design_study:run",
    "granularity_study": "experiments.design_study:run",
    "mtp_study": "experiments.design_study:run",
    "serve": "experiments.serve:run",
    "r1_zero": "experiments.r1_zero:run",
    "r1_thinking": "experiments.r1_thinking:run",
    "r1_thinking_sweep": "experiments.r1_thinking_sweep:run",
}


def resolve(name: str) -> Callable:
  """The run function of experiment `name`; KeyError with the known names if there is none."""
  if name not in EXPERIMENTS:
    raise KeyError(name)
  module, _, function = EXPERIMENTS[name].partition(":")
  return getattr(importlib.import_module(module), function or "run")
