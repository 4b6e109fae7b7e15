"""The long-share sweep (experiments/r1_thinking_sweep.py): configs/r1_thinking.py's parity run
for each rl.long_shares value and each seed, with its NTP-only control.

  python -m experiments.run --config=configs/r1_thinking_sweep.py --workdir=/tmp/think_sweep
  python -m experiments.run --config=configs/r1_thinking_sweep.py:runlocal --workdir=/tmp/s
"""
import importlib.util
import pathlib


def _thinking(arg):
  path = pathlib.Path(__file__).with_name("r1_thinking.py")
  spec = importlib.util.spec_from_file_location("r1_thinking_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  """arg: nothing (the study) or "runlocal" (two tiny runs)."""
  if arg not in (None, "runlocal"):
    raise ValueError(f"config arg {arg!r}: expected nothing or 'runlocal'")
  config = _thinking("parity,runlocal" if arg else "parity")
  config.experiment = "r1_thinking_sweep"
  config.seeds = [0, 1]                          # each point of the sweep once per seed
  config.rl.long_shares = [0.005, 0.02, 0.1, 0.33]  # rl.long_share of each point
  # 8 runs in about 2 hours (an estimate from per-step timings, not yet a measured run): ~16
  # min each (base 800 steps ~8, RL ~3.5, NTP-only as long, evaluations ~1.5), against ~40 for
  # configs/r1_thinking.py:parity (its long_share=0 control: :parity,no_long)
  if arg == "runlocal":
    config.seeds, config.rl.long_shares = [0], [0.0, 0.5]
  else:
    config.train.steps = 800
    r = config.rl
    r.steps, r.eval_problems, r.eval_k, r.eval_every = 30, 12, 16, 0
  return config
