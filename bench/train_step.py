"""A whole train step's tokens/s and model FLOPs utilisation (MFU), against a plain float32
matmul measured in the same process, on all devices of the config's mesh.

Prints one JSON object: the median of `--repeats` timed steps (after warm-up), the step's model
FLOPs (metrics.train_flops_per_token: 6 per activated matmul parameter plus attention), and the
matmul rate, measured before and after the steps so that both see the same machine load.

    python bench/train_step.py                                # configs/tiny_moe.py
    python bench/train_step.py --config=configs/tiny_moe.py:runlocal --repeats=10
"""
import argparse
import importlib.util
import json
import os
import statistics
import time

import jax

from moe_jax import config, metrics, model, train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> config.ExperimentConfig:
  path, *arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return config.from_config_dict(module.get_config(*arg))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(_REPO, "configs", "tiny_moe.py"))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cfg = load_config(args.config)
  setup = train.Setup(cfg)
  state = setup.init(jax.random.key(cfg.train.seed))
  batch = setup.batches.train(0)
  matmul_before = metrics.measure_matmul_flops()
  for _ in range(2):  # compile + warm-up
    state, out = setup.step(state, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, out = setup.step(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  matmul = statistics.median([matmul_before, metrics.measure_matmul_flops()])
  step_s = statistics.median(times)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  counts = model.count_params(cfg.model, cfg.moe)
  flops_per_token = metrics.train_flops_per_token(counts, cfg.model, cfg.train.seq_len)
  achieved = tokens * flops_per_token / step_s
  peak = metrics.peak_flops(jax.devices()[0], cfg.model.dtype)
  print(json.dumps({
      "bench": "train_step", "config": args.config, "tokens_per_s": tokens / step_s,
      "step_s": step_s, "model_flops_per_token": flops_per_token,
      "achieved_flops_per_s": achieved, "matmul_flops_per_s": matmul,
      # MFU only against a published peak; the matmul ratio is labelled as what it is.
      "mfu": (achieved / jax.device_count() / peak) if peak else None,
      "achieved_over_matmul_calibration": achieved / matmul,
      "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
      "params_total": counts["main"]["total"]["all"] + counts["mtp"]["total"]["all"],
      "params_matmul_activated": metrics.matmul_parameters(counts),
      "mesh": cfg.mesh.shape, "backend": jax.default_backend(), "devices": jax.device_count(),
      "jax_version": jax.__version__}))


if __name__ == "__main__":
  main()
