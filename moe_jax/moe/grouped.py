"""Grouped SwiGLU experts over expert-major rows: two kernels, each over a per-expert product.

`routed(x_TxD, experts, gates_TxK, plan, backend, fp8_cfg, fp8_states)` computes
y[t] = sum_k gates[t, k] * expert_{e(t,k)}(x[t]), and `swiglu(x_RxD, ...)` each row's expert
on rows already in the plan's layout. The product (products.py) is plain, or FP8 per fp8_cfg
(every expert matrix quantized on its own, "delayed" histories [E, L] per matrix in
fp8_states); the kernels do not know which.

- `padded` (padded.py): one loop over the plan's buckets and overflow blocks that gathers its
  token rows itself. The fast one on CPU.
- `ragged`: `jax.lax.ragged_dot` (or ragged_fp8.dot) over packed rows. The right call on
  GPU/TPU; on XLA:CPU it lowers to a masked dense product over all experts (E times the
  FLOPs), so `auto` avoids it there.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.config import FP8Config
from moe_jax.moe import dispatch, padded, products
from moe_jax.moe.dispatch import Plan


def resolve_backend(backend: str) -> str:
  if backend != "auto":
    return backend
  return "padded" if jax.default_backend() == "cpu" else "ragged"


def layout(num_assignments: int, num_experts: int, backend: str) -> tuple[int, int]:
  """(block, bucket) of the plan for this backend.

  ragged: packed rows, no buckets. padded: buckets two standard deviations of a random
  (Poisson) load below the mean load, so that with balanced routing nearly every bucket is full
  (the fast batched region does little padding) and only the busier experts' excess overflows,
  into blocks small enough (within [8, 64]) that their padding stays near 2% of the rows.
  """
  if backend == "ragged":
    return 1, 0
  per_expert = num_assignments / num_experts
  block = 8
  while block < 64 and block * 2 <= per_expert / 24:
    block *= 2
  bucket = max(0, int(per_expert) // 8 * 8)
  return block, bucket


def _check(backend: str):
  if backend not in ("padded", "ragged"):
    raise ValueError(f"grouped_backend={backend!r}: must be 'ragged' or 'padded'")


def routed(x_TxD: jax.Array, experts: dict, gates_TxK: jax.Array, plan: Plan, backend: str,
           fp8_cfg: FP8Config = FP8Config(), fp8_states: Optional[dict] = None) -> jax.Array:
  """Dispatch, experts and combine; the padded kernel never writes the permuted rows."""
  _check(backend)
  product = products.of(fp8_cfg)
  if backend == "padded":
    return padded.routed(x_TxD, experts, gates_TxK, plan, product, fp8_states)
  x_RxD = dispatch.permute(x_TxD, plan, gates_TxK.shape[1])
  y_RxD = swiglu_ragged(x_RxD, experts, plan.group_sizes_E, product, fp8_states)
  return dispatch.combine(y_RxD, gates_TxK, plan)


def swiglu_ragged(x_RxD: jax.Array, experts: dict, group_sizes_E: jax.Array, product,
                  states: Optional[dict] = None) -> jax.Array:
  """Every packed row through its expert's SwiGLU, each product a ragged dot."""
  states = states or {}
  return products.swiglu(x_RxD, lambda v, name: product.ragged_dot(
      v, experts[name], group_sizes_E, states.get(name)))


def swiglu(x_RxD: jax.Array, experts: dict, plan: Plan, backend: str,
           fp8_cfg: FP8Config = FP8Config(), fp8_states: Optional[dict] = None) -> jax.Array:
  """Runs every row through its expert's SwiGLU; rows no expert owns come back zero."""
  _check(backend)
  if backend == "ragged":
    return swiglu_ragged(x_RxD, experts, plan.group_sizes_E, products.of(fp8_cfg), fp8_states)
  # Rows are their own tokens here (one slot each, gate 1).
  rows_R = jnp.arange(x_RxD.shape[0], dtype=jnp.int32)
  identity = plan._replace(src_R=rows_R, row_A=rows_R)
  ones = jnp.ones((x_RxD.shape[0], 1), x_RxD.dtype)
  return routed(x_RxD, experts, ones, identity, backend, fp8_cfg, fp8_states)
