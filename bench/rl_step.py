"""The RL step's figures (issue #18), one JSON object per line, side by side in one process.

  rollout  completion tokens/s of G completions per prompt with the prompt shared across the
           group (one request with n=G: one prefill) against recomputing it per completion (G
           requests with n=1); the prefix cache is off on both sides, so only the group's own
           sharing differs. Also the shared side with the routes recorded (router replay).
  learner  seconds per learner update (learner.rl_step, jitted) on the rollout batch
           [prompts x G, T], with and without replayed routes.

configs/r1_zero.py's model with RANDOM weights (timings do not depend on them; ignore_eos keeps
every completion at max_tokens). Ratios are medians over --rounds rounds after a warm-up, each
timing both sides back to back; absolute times count only on a GPU.

    python bench/rl_step.py --rounds=5
"""
import argparse
import functools
import importlib.util
import json
import os
import statistics
import time

import jax

from moe_jax import config, train
from moe_jax.rl import batch as rl_batch
from moe_jax.rl import learner, rollout, tasks
from moe_jax.rl.config import RLConfig
from moe_jax.serve import Engine, Request

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def r1_config():
  spec = importlib.util.spec_from_file_location(
      "_r1", os.path.join(_REPO, "configs", "r1_zero.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config.from_config_dict(module.get_config())


def _line(name: str, **fields):
  print(json.dumps({"bench": f"rl_step.{name}", **fields, "platform": jax.default_backend(),
                    "jax": jax.__version__}), flush=True)


def _engine(state, cfg, rows, T, record_routes=False):
  return Engine(state["params"], state["moe_state"], cfg.model, cfg.moe,
                num_blocks=rows * (-(-T // 16) + 1) + 2, max_batch=rows, prefix_cache=False,
                record_routes=record_routes)


def _rollout_s(engine, prompts, G, max_tokens, shared: bool) -> float:
  kw = dict(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
  if shared:
    requests = [Request(p, n=G, seed=i, **kw) for i, p in enumerate(prompts)]
  else:
    requests = [Request(p, n=1, seed=i * G + j, **kw) for i, p in enumerate(prompts)
                for j in range(G)]
  start = time.perf_counter()
  engine.generate(requests)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--max_tokens", type=int, default=48)
  args = parser.parse_args()
  cfg = r1_config()
  P, G, n = args.prompts, args.group_size, args.max_tokens
  T, rows = cfg.model.max_seq_len, args.prompts * args.group_size
  state = train.init_state(jax.random.key(0), cfg)
  problems = tasks.problems(tasks.TaskSpec(), "train", P, seed=0)
  prompts = [tasks.prompt(p) for p in problems]
  shapes = dict(prompts=P, group_size=G, max_tokens=n, prompt_tokens=len(prompts[0]) + 1)

  sides = {"shared": (False, True), "per_completion": (False, False),
           "shared_routes": (True, True)}
  engines = {k: _engine(state, cfg, rows, T, routes) for k, (routes, _) in sides.items()}
  times = {k: [] for k in sides}
  for r in range(args.rounds + 1):
    for k, (_, shared) in sides.items():
      s = _rollout_s(engines[k], prompts, G, n, shared)
      if r:  # round 0 compiles
        times[k].append(s)
  med = {k: statistics.median(v) for k, v in times.items()}
  _line("rollout", **shapes, **{f"{k}_tokens_per_s": rows * n / med[k] for k in sides},
        shared_speedup=med["per_completion"] / med["shared"],
        routes_cost=med["shared_routes"] / med["shared"], rounds=args.rounds)

  groups = rollout.sample_groups(_engine(state, cfg, rows, T, True), problems, G,
                                 max_tokens=n, temperature=1.0)
  for replay in (True, False):
    rl = RLConfig(prompts_per_step=P, group_size=G, max_tokens=n, router_replay=replay)
    batch = jax.device_put(rl_batch.make_batch(groups, rl, T, pad_id=cfg.model.pad_id))
    step = jax.jit(functools.partial(learner.rl_step, cfg=cfg, rl=rl))
    jax.block_until_ready(step(state, batch, None))
    runs = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      jax.block_until_ready(step(state, batch, None))
      runs.append(time.perf_counter() - start)
    s = statistics.median(runs)
    _line("learner", rows=rows, seq_len=T, router_replay=replay, step_s=s,
          tokens_per_s=rows * T / s, rounds=args.rounds)


if __name__ == "__main__":
  main()
