"""FP8 study: the tiny MoE model trained under float32, bfloat16 and the three FP8 recipes.

  python -m experiments.run --config=configs/fp8_study.py --workdir=/tmp/fp8_study
  python -m experiments.run --config=configs/fp8_study.py:quick --workdir=/tmp/fp8_quick

Default: tiny_moe's model and data, 300 steps per run, five runs per seed, seeds 0-5
(experiments/fp8_study.py). With FP8 in the dense projections and the experts, one seed took
23.9 minutes alone on 2 CPU cores (s/step: float32 0.37, bfloat16 0.99, tensor 0.89, delayed
0.80, blockwise 1.19; XLA:CPU has no FP8 matmul, so the tiles are simulated and FP8 is no
faster) and 32.9 minutes sharing them with a test run: about 2.5 hours for the six seeds. On a
slower machine (AMD EPYC, AVX2; seed 3 on 2026-12-02, s/step float32 0.99, bfloat16 1.49, tensor
1.74, delayed 1.57, blockwise 2.12) one seed took 46 minutes alone.
A rerun in the same workdir skips finished runs, so seeds can be added later (--config.seeds).
"quick": one seed, 100 steps at batch 8 (a sixth of the tokens), for a first look only: too
short to judge the 0.5% criterion. "runlocal": a smoke test (tiny model, 3 steps).
"""
import importlib.util
import pathlib


def _tiny_moe():
  # Loaded by path: config files are not a package (config_flags loads them by path too).
  path = pathlib.Path(__file__).with_name("tiny_moe.py")
  spec = importlib.util.spec_from_file_location("tiny_moe_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  """arg: None (300 steps), "quick" (100 steps, batch 8) or "runlocal" (smoke test)."""
  config = _tiny_moe().get_config("runlocal" if arg == "runlocal" else None)
  config.experiment = "fp8_study"
  # One set of five runs per seed; the criterion is judged on the mean over the seeds, because
  # one seed's difference to bfloat16 scatters by about 1% (experiments/fp8_study.py).
  config.seeds = (0, 1, 2, 3, 4, 5)
  # Set per run by the study: model.dtype, moe.dtype and fp8.recipe. The rest of fp8 applies
  # to every FP8 run (e4m3 everywhere, as V3; tile 128; 16-step amax history).
  t = config.train
  t.steps = 300                         # per run; the acceptance criterion asks for >= 300
  t.log_every = 1                       # every step's train loss goes into the curves
  # One held-out evaluation, at the end: the headline figure. 32 batches = 65,536 held-out
  # tokens (45% of the split, no window twice), as many as the train-loss figure averages (the
  # last 30 steps). With tiny_moe's 4 batches (8,192 tokens), the six-seed held-out difference
  # of blockwise to bfloat16 had a standard error of 0.81% against 0.57% for the train loss.
  t.eval_every = 300
  t.eval_batches = 32
  t.checkpoint_every = 100              # a killed study resumes its run from here
  if arg == "quick":
    t.steps, t.batch_size, t.eval_every, t.eval_batches = 100, 8, 100, 8
    config.seeds = (0,)
  elif arg == "runlocal":
    t.steps, t.warmup_steps, t.eval_every, t.checkpoint_every, t.eval_batches = 3, 1, 3, 3, 1
    t.batch_size, t.seq_len = 4, 32
    config.seeds = (0,)
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing, 'quick' or 'runlocal'")
  return config
