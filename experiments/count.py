"""experiment="count": parameter counts of a config, total and activated per token, by kind.

Built from abstract shapes (`jax.eval_shape` of the model's init), so the 671B config counts in
seconds on a laptop. experiments/run.py calls `run(config, workdir)`; the table alone is
`count_from_dataclasses(model_cfg, moe_cfg)`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from moe_jax import model, params_count
from moe_jax.config import ModelConfig, MoEConfig


def count_from_dataclasses(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> str:
  """The printed table: rows by kind, columns main model / MTP, total / activated."""
  return params_count.format_table(model.count_params(model_cfg, moe_cfg))


def run(config: Any, workdir: Optional[str]) -> dict:
  """Prints the table for config.model / config.moe; writes param_counts.json into workdir."""
  counts = model.count_params(config.model, config.moe)
  print(params_count.format_table(counts), flush=True)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "param_counts.json"), "w") as f:
      json.dump(counts, f, indent=1)
  return counts
