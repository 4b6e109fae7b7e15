"""`experiment=plot` redraws the PNG plots of the run in the workdir from its metrics.jsonl."""
import os

from moe_jax import metrics
from moe_jax.config import ConfigError, ExperimentConfig


def run(config: ExperimentConfig, workdir: str):
  del config  # the plots depend on the logged metrics only
  if not os.path.exists(os.path.join(workdir, metrics.METRICS_FILE)):
    raise ConfigError(f"workdir={workdir!r}: has no {metrics.METRICS_FILE} to plot")
  for path in metrics.plot(workdir):
    print(path)
