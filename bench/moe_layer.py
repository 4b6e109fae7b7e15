"""MoE layer vs. a dense SwiGLU of equal active FLOPs, fwd+bwd, side by side in one process.

Prints one JSON object per line: for the dense layer and the MoE layer with each backend, the
median over `--rounds` of the median of `--repeats` timed runs (after warm-up), and their ratio:
the median of the rounds' ratios (dense and MoE alternate, round by round). Backends other than the one
`auto` picks run in a child process, so one that exhausts memory (ragged_dot on CPU) reports an
error line instead of killing the benchmark.

    python bench/moe_layer.py                      # the issue's shape, every backend
    python bench/moe_layer.py --backends=padded --tokens=4096
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from moe_jax import moe
from moe_jax.config import MoEConfig
from moe_jax.moe import grouped


def median_time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(args, backend):
  cfg = MoEConfig(embed_dim=args.embed, num_experts=args.experts, top_k=args.top_k,
                  expert_ffn_dim=args.ffn, num_shared_experts=0, grouped_backend=backend,
                  dtype=args.dtype)
  key_p, key_x, key_d = jax.random.split(jax.random.PRNGKey(0), 3)
  params, state = moe.init(key_p, cfg)
  x = jax.random.normal(key_x, (args.tokens, args.embed), jnp.dtype(args.dtype))
  dense = {k: v for k, v in zip(("gate", "up", "down"), (
      jax.random.normal(k, s) * s[0] ** -0.5 for k, s in zip(
          jax.random.split(key_d, 3), ((args.embed, args.top_k * args.ffn),
                                       (args.embed, args.top_k * args.ffn),
                                       (args.top_k * args.ffn, args.embed)))))}

  dense_step = jax.jit(jax.grad(lambda w, x: moe.swiglu(x, w).sum(), argnums=(0, 1)))
  moe_step = jax.jit(jax.grad(lambda p, x: moe.apply(p, state, x, cfg)[0].sum(), argnums=(0, 1)))
  # Interleave so that both see the same machine load (the machine is shared and noisy).
  dense_s, moe_s = [], []
  for _ in range(args.rounds):
    dense_s.append(median_time(dense_step, (dense, x), args.repeats))
    moe_s.append(median_time(moe_step, (params, x), args.repeats))
  dense_t, moe_t = statistics.median(dense_s), statistics.median(moe_s)
  # The headline is the median of each round's ratio: a round's two timings share the load of
  # that moment, which the medians of the two columns taken apart do not.
  ratios = [m / d for m, d in zip(moe_s, dense_s)]
  flops = 2 * 3 * 3 * args.tokens * args.embed * args.top_k * args.ffn  # fwd + 2x bwd
  return {"bench": "moe_layer", "backend": backend,
          "resolved_backend": grouped.resolve_backend(backend), "tokens": args.tokens,
          "embed": args.embed, "expert_ffn": args.ffn, "experts": args.experts,
          "top_k": args.top_k, "dtype": args.dtype, "dense_s": round(dense_t, 4),
          "moe_s": round(moe_t, 4), "ratio": round(statistics.median(ratios), 3),
          "round_ratios": [round(r, 3) for r in ratios],
          "dense_gflops": round(flops / dense_t / 1e9, 1),
          "platform": jax.default_backend(), "jax": jax.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--embed", type=int, default=512)
  parser.add_argument("--ffn", type=int, default=256)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top_k", type=int, default=6)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--backends", default="auto,padded,ragged")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  backends = args.backends.split(",")
  if args.child or len(backends) == 1:
    print(json.dumps(measure(args, backends[0])), flush=True)
    return
  for backend in backends:
    if backend == "auto":
      print(json.dumps(measure(args, backend)), flush=True)
      continue
    cmd = [sys.executable, __file__, "--child", f"--backends={backend}"] + [
        f"--{k}={getattr(args, k)}" for k in ("tokens", "embed", "ffn", "experts", "top_k",
                                              "dtype", "repeats", "rounds")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
      print(done.stdout.strip(), flush=True)
    else:
      reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
      print(json.dumps({"bench": "moe_layer", "backend": backend, "error": reason[-300:],
                        "returncode": done.returncode}), flush=True)


if __name__ == "__main__":
  main()
