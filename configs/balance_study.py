"""Load-balancing study: no balancing, an auxiliary loss, the aux-loss-free bias, and the bias
plus V3's sequence-wise loss, on the tiny MoE (experiments/design_study.py).

  python -m experiments.run --config=configs/balance_study.py --workdir=/tmp/balance_study

Four arms x two seeds of 200 steps (batch 16 x 128); "runlocal" is a seconds-long smoke test.
"""
import importlib.util
import pathlib


def study_config(name: str, arg=None):
  """tiny_moe's config as a study of `name`: 200 steps, held-out evaluations every 50."""
  path = pathlib.Path(__file__).with_name("tiny_moe.py")
  spec = importlib.util.spec_from_file_location("tiny_moe_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal" if arg == "runlocal" else None)
  config.experiment = name
  config.seeds = (0, 1)
  t = config.train
  t.steps, t.warmup_steps, t.log_every, t.eval_every, t.eval_batches = 200, 20, 5, 50, 8
  t.checkpoint_every = 100
  if arg == "runlocal":
    t.steps, t.warmup_steps, t.log_every, t.eval_every, t.eval_batches = 4, 1, 1, 2, 1
    t.checkpoint_every, t.batch_size, t.seq_len = 4, 4, 32
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or 'runlocal'")
  return config


def get_config(arg=None):
  return study_config("balance_study", arg)
