"""`experiment=train` trains or resumes the run in the workdir; `experiment=eval` scores its
latest checkpoint on the held-out split."""
from moe_jax import train
from moe_jax.config import ExperimentConfig


def run(config: ExperimentConfig, workdir: str):
  return train.train(config, workdir)


def run_eval(config: ExperimentConfig, workdir: str):
  return train.evaluate(config, workdir)
