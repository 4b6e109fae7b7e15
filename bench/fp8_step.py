"""A whole train step under each FP8 recipe, against the same step without FP8, in one process.

All runs compute in bfloat16 (as the FP8 study's do) on the config's model and batch. The steps
alternate recipe by recipe for `--rounds` rounds; each line gives a recipe's median step time
and the median over the rounds of its ratio to the bfloat16 step of the same round. On XLA:CPU
FP8 is simulated (dots upcast to float32), so the ratio is the cost of the scaling and tiling,
not a speed-up; on a GPU it is what FP8 buys.

    python bench/fp8_step.py                                  # configs/tiny_moe.py
    python bench/fp8_step.py --recipes=blockwise --rounds=3
"""
import argparse
import dataclasses
import json
import os
import statistics
import time

import jax

from moe_jax import train
from train_step import load_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(_REPO, "configs", "tiny_moe.py"))
  parser.add_argument("--recipes", default="tensor,delayed,blockwise")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  base = load_config(args.config)
  setups, states, batches = {}, {}, {}
  for recipe in ["none"] + args.recipes.split(","):
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype="bfloat16"),
                              moe=dataclasses.replace(base.moe, dtype="bfloat16"),
                              fp8=dataclasses.replace(base.fp8, recipe=recipe))
    setup = setups[recipe] = train.Setup(cfg)
    state, batch = setup.init(jax.random.key(cfg.train.seed)), setup.batches.train(0)
    for _ in range(2):  # compile + warm-up
      state, out = setup.step(state, batch)
    jax.block_until_ready(out)
    states[recipe], batches[recipe] = state, batch
  times = {recipe: [] for recipe in setups}
  for _ in range(args.rounds):
    for recipe, setup in setups.items():
      start = time.perf_counter()
      states[recipe], out = setup.step(states[recipe], batches[recipe])
      jax.block_until_ready(out)
      times[recipe].append(time.perf_counter() - start)
  for recipe, recipe_times in times.items():
    print(json.dumps({
        "bench": "fp8_step", "config": args.config, "recipe": recipe, "compute": "bfloat16",
        "step_s": statistics.median(recipe_times),
        "vs_bfloat16": statistics.median(t / p for t, p in zip(recipe_times, times["none"])),
        "rounds": args.rounds, "backend": jax.default_backend(), "jax_version": jax.__version__}))


if __name__ == "__main__":
  main()
