"""Collective bytes of one expert-parallel MoE layer forward, read from the compiled HLO.

Compiles (never runs) `moe.apply` on a fake 8-device CPU mesh (expert=8) for each case and prints
one JSON object per line: per-device bytes of every kind of collective, the all-to-all bytes
against the theoretical minimum, and the compile time.

Bytes are per device (what the HLO of one SPMD partition moves); `*_all_devices` multiplies by the
device count. The minimum is the same quantity for an ideal dispatch that sends each (token, slot)
row exactly once each way: 2 directions x tokens x top_k x embed x bytes per element, summed over
devices (so per device: divided by the device count). Rows that stay on their own device count
in both, as they do in the HLO's all-to-all results.

XLA:CPU runs 16-bit collectives in f32 (it converts around them), so a bfloat16 dispatch moves
f32 bytes in the compiled CPU HLO; `a2a_bytes_lowered` reads the pre-optimization HLO, where the
shard_map all-to-all still has the dtype the layer asked for (what a GPU would send).

A fourth field `fp8` runs the experts in FP8 (blockwise) with FP8 dispatch (fp8.dispatch): rows
go out as e4m3 with 1 x 128 float32 scales, results come back in the compute dtype.
`dispatch_bytes_lowered` is the dispatch direction alone (rows, scales, expert ids): the
lowered all-to-all bytes less the combine's, which is the same [rows, D] exchange in every case.

    python bench/comm.py                        # every case at the default shapes
    python bench/comm.py --cases=alltoall:float32:1.25
    python bench/comm.py --cases=alltoall:bfloat16:none,alltoall:bfloat16:none:fp8
"""
import os
import sys

# The fake devices must exist before JAX starts its CPU backend.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if "xla_force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import hlo_stats, moe, sharding  # noqa: E402
from moe_jax.config import FP8Config, MeshConfig, MoEConfig  # noqa: E402

# parallelism:dtype:capacity ("none" = dropless).
DEFAULT_CASES = ("alltoall:float32:1.25,alltoall:float32:none,alltoall:bfloat16:1.25,"
                 "alltoall:bfloat16:none,alltoall:bfloat16:none:fp8,gshard:float32:1.25,"
                 "gshard:float32:none")
# Logical names of the layer's parameters, as the expert-parallel layer shards them.
_PARAM_NAMES = {"router": {"kernel": (None, None)},
                "experts": {"gate": ("experts", None, "expert_mlp"),
                            "up": ("experts", None, "expert_mlp"),
                            "down": ("experts", "expert_mlp", None)}}


def abstract_inputs(cfg: MoEConfig, mesh, batch: int, seq: int):
  """Shape-and-sharding stand-ins for params, state and x: compiling needs no data."""
  params, state = jax.eval_shape(lambda: moe.init(jax.random.PRNGKey(0), cfg))
  shardings = sharding.shard_like(_PARAM_NAMES, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)
  state = {"router_bias": jax.ShapeDtypeStruct(
      state["router_bias"].shape, jnp.float32, sharding=sharding.named_sharding(mesh, (None,)))}
  x = jax.ShapeDtypeStruct((batch, seq, cfg.embed_dim), jnp.float32,
                           sharding=sharding.named_sharding(mesh, ("batch", None, None)))
  return params, state, x


def measure(args, parallelism: str, dtype: str, capacity_factor, fp8_dispatch: bool = False):
  fp8_cfg = FP8Config(recipe="blockwise", dispatch=True) if fp8_dispatch else FP8Config()
  cfg = MoEConfig(embed_dim=args.embed, num_experts=args.experts, top_k=args.top_k,
                  expert_ffn_dim=args.ffn, num_shared_experts=0, dtype=dtype,
                  capacity_factor=capacity_factor, parallelism=parallelism)
  mesh = sharding.make_mesh(MeshConfig(expert=args.ep, data=jax.device_count() // args.ep))
  devices = mesh.size
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda p, s, x: moe.apply(p, s, x, cfg, fp8_cfg=fp8_cfg)).lower(
        *abstract_inputs(cfg, mesh, args.batch, args.seq))
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  per_device = hlo_stats.collective_bytes(compiled)
  tokens = args.batch * args.seq
  itemsize = jnp.dtype(dtype).itemsize
  minimum = 2 * tokens * args.top_k * args.embed * itemsize  # all devices
  a2a = per_device["all-to-all"]
  ops = hlo_stats.collective_ops(compiled)
  a2a_ops = sorted((op.nbytes for op in ops if op.kind == "all-to-all"), reverse=True)
  # One-device collectives (a psum over a mesh axis of size 1) move nothing but are still ops.
  trivial = [op.kind for op in ops if op.trivial]
  line = {"bench": "comm", "parallelism": parallelism, "dtype": dtype, "fp8_dispatch": fp8_dispatch,
          "capacity_factor": capacity_factor, "tokens": tokens,
          "x_shape": [args.batch, args.seq, args.embed], "experts": args.experts,
          "top_k": args.top_k, "expert_ffn": args.ffn, "mesh": dict(mesh.shape),
          "bytes": "per_device", "collective_bytes": per_device,
          "trivial_collectives": trivial, "a2a_bytes": a2a, "a2a_ops": a2a_ops,
          "a2a_min_bytes": minimum // devices,
          "a2a_bytes_all_devices": a2a * devices, "a2a_min_bytes_all_devices": minimum,
          "ratio": round(a2a / (minimum / devices), 4),
          "compile_s": round(compile_s, 2), "platform": jax.default_backend(),
          "jax": jax.__version__}
  if parallelism == "alltoall":
    # shard_map writes its all-to-alls itself, so they are already in the unpartitioned HLO with
    # the dtype the layer sends; the SPMD partitioner adds gshard's only at compile time.
    lowered_ops = [op.nbytes for op in hlo_stats.collective_ops(lowered.as_text(dialect="hlo"))
                   if op.kind == "all-to-all"]
    lowered_a2a = sum(lowered_ops)
    # The combine is the largest exchange: the [rows, D] expert outputs in the compute dtype.
    line.update(a2a_bytes_lowered=lowered_a2a, a2a_ops_lowered=sorted(lowered_ops, reverse=True),
                dispatch_bytes_lowered=lowered_a2a - max(lowered_ops),
                ratio_lowered=round(lowered_a2a / (minimum / devices), 4))
    if a2a > lowered_a2a:
      line["note"] = "the compiler widened the all-to-all dtype (XLA:CPU: 16-bit runs as f32)"
  return line


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--embed", type=int, default=512)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top_k", type=int, default=6)
  parser.add_argument("--ffn", type=int, default=256)
  parser.add_argument("--ep", type=int, default=8, help="expert axis size (rest: data)")
  parser.add_argument("--cases", default=DEFAULT_CASES)
  args = parser.parse_args()
  for case in args.cases.split(","):
    parallelism, dtype, cf, *fp8 = case.split(":")
    capacity_factor = None if cf == "none" else float(cf)
    try:
      line = measure(args, parallelism, dtype, capacity_factor, fp8 == ["fp8"])
    except Exception as e:  # one case failing to compile must not hide the others
      line = {"bench": "comm", "case": case, "error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  sys.exit(main())
