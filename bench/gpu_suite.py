"""The figures a machine with one NVIDIA GPU can give (bench/gpu.sh runs this), one JSON object
per line, then one table:

  moe_layer   the MoE layer fwd+bwd with the ragged grouped backend (lax.ragged_dot) against the
              padded one and a dense SwiGLU of equal active FLOPs, side by side (medians)
  train_step  a training step of the tiny MoE in bfloat16: model FLOP/s per device and MFU
              against the chip's published dense bf16 peak (metrics.PEAK_FLOPS; none on CPU)
  fp8_matmul  float8_e4m3fn x float8_e4m3fn -> bfloat16 matmuls (XLA's FP8 GEMMs on Hopper)
              against bfloat16 ones of the same shape
  decode      decode tokens/s of model.generate (the cached forward) at batch 1 and 16

--dry-run: tiny shapes and few repeats, so that every step runs on CPU in seconds (a CI test
runs it); its figures mean nothing.

    python bench/gpu_suite.py            # on the GPU
    python bench/gpu_suite.py --dry-run  # anywhere
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax import config, metrics, model, moe, train  # noqa: E402
from moe_jax.config import MoEConfig  # noqa: E402

ROWS = []


def emit(bench: str, **fields):
  line = {"bench": f"gpu.{bench}", **fields, "platform": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  print(json.dumps(line), flush=True)
  ROWS.append(line)


def median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def moe_layer(dry: bool, repeats: int):
  tokens, d, f, e, k = (64, 32, 16, 8, 2) if dry else (16384, 2048, 1024, 64, 6)
  x = jax.random.normal(jax.random.key(0), (tokens // 128 or 1, min(tokens, 128), d), jnp.bfloat16)
  times = {}
  for backend in ("ragged", "padded"):
    cfg = MoEConfig(embed_dim=d, num_experts=e, top_k=k, expert_ffn_dim=f, num_shared_experts=0,
                    grouped_backend=backend, dtype="bfloat16")
    params, state = moe.init(jax.random.key(1), cfg)
    loss = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.apply(p, state, x, cfg)[0]
                                                 .astype(jnp.float32)), argnums=(0, 1)))
    times[backend] = median_time(loss, params, x, repeats=repeats)
  w = [jax.random.normal(jax.random.key(i), s, jnp.bfloat16) * 0.02
       for i, s in enumerate(((d, k * f), (d, k * f), (k * f, d)))]
  dense = jax.jit(jax.grad(lambda w, x: jnp.sum((jax.nn.silu(x @ w[0]) * (x @ w[1])) @ w[2])
                           .astype(jnp.float32), argnums=(0, 1)))
  times["dense"] = median_time(dense, w, x, repeats=repeats)
  emit("moe_layer", tokens=tokens, embed=d, ffn=f, experts=e, top_k=k,
       ragged_s=times["ragged"], padded_s=times["padded"], dense_s=times["dense"],
       ragged_over_dense=times["ragged"] / times["dense"],
       padded_over_ragged=times["padded"] / times["ragged"])


def train_step(dry: bool, repeats: int):
  values = {"model": dict(embed_dim=32 if dry else 1024, num_layers=2 if dry else 8,
                          dense_ffn_dim=64 if dry else 4096, num_heads=2 if dry else 16,
                          num_kv_heads=2 if dry else 16, kv_lora_rank=16 if dry else 512,
                          qk_nope_head_dim=8 if dry else 64, qk_rope_head_dim=8 if dry else 32,
                          v_head_dim=8 if dry else 64, max_seq_len=32 if dry else 2048,
                          dtype="bfloat16"),
            "moe": dict(num_experts=8 if dry else 32, top_k=2 if dry else 4,
                        expert_ffn_dim=16 if dry else 1024, dtype="bfloat16"),
            "train": dict(batch_size=2 if dry else 16, seq_len=16 if dry else 2048),
            "data": dict(source="synthetic")}
  cfg = config.from_config_dict(values)
  setup = train.Setup(cfg)
  state = setup.init(jax.random.key(0))
  batch = setup.batches.train(0)
  state, out = setup.step(state, batch)  # compile
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, out = setup.step(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  per_token = metrics.train_flops_per_token(model.count_params(cfg.model, cfg.moe), cfg.model,
                                            cfg.train.seq_len)
  achieved = tokens * per_token / step_s / jax.device_count()
  peak = metrics.peak_flops(jax.devices()[0], "bfloat16")
  emit("train_step", tokens=tokens, step_s=step_s, tflops_per_s=achieved / 1e12,
       peak_tflops_per_s=peak and peak / 1e12, mfu=achieved / peak if peak else None)


def fp8_matmul(dry: bool, repeats: int):
  n = 64 if dry else 8192
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (0, 1))
  mm = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.bfloat16))
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.T.astype(jnp.float8_e4m3fn).T
  t8 = median_time(mm, a8, b8, repeats=repeats)
  t16 = median_time(mm, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), repeats=repeats)
  flops = 2.0 * n ** 3
  emit("fp8_matmul", n=n, fp8_tflops_per_s=flops / t8 / 1e12,
       bf16_tflops_per_s=flops / t16 / 1e12, fp8_speedup=t16 / t8)


def decode(dry: bool, repeats: int):
  del repeats
  m = dict(embed_dim=32, num_layers=2, dense_ffn_dim=64, num_heads=2, num_kv_heads=2,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           max_seq_len=64)
  cfg = config.from_config_dict({"model": m if dry else {}, "train": dict(seq_len=32),
                                 "moe": dict(num_experts=8, expert_ffn_dim=16) if dry else {}})
  params, moe_state = model.init(jax.random.key(0), cfg.model, cfg.moe)
  new = 4 if dry else 64
  rates = {}
  for batch in (1, 16):
    prompt = jnp.ones((batch, 16), jnp.int32)
    run = lambda: model.generate(params, moe_state, prompt, cfg.model, cfg.moe,
                                 max_new_tokens=new, key=jax.random.key(1))
    jax.block_until_ready(run())  # compile
    start = time.perf_counter()
    jax.block_until_ready(run())
    rates[batch] = batch * new / (time.perf_counter() - start)
  emit("decode", new_tokens=new, batch1_tokens_per_s=rates[1], batch16_tokens_per_s=rates[16])


STEPS = {"moe_layer": moe_layer, "train_step": train_step, "fp8_matmul": fp8_matmul,
         "decode": decode}


def table() -> str:
  lines = ["| bench | figure | value |", "|---|---|---|"]
  for row in ROWS:
    for key, value in row.items():
      if key in ("bench", "platform", "device", "jax"):
        continue
      text = f"{value:.4g}" if isinstance(value, float) else str(value)
      lines.append(f"| {row['bench']} | {key} | {text} |")
  head = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  return head + "\n" + "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes: checks, no figures")
  parser.add_argument("--only", default=",".join(STEPS))
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  repeats = args.repeats or (1 if args.dry_run else 7)
  for name in args.only.split(","):
    try:
      STEPS[name](args.dry_run, repeats)
    except Exception as e:  # pylint: disable=broad-except
      emit(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  print(table())
  if any("error" in row for row in ROWS):
    sys.exit(1)


if __name__ == "__main__":
  main()
