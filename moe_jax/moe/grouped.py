"""Grouped SwiGLU experts over expert-major rows: one function, two backends.

`swiglu(x_RxD, weights, plan, backend)` computes, for every row r owned by expert e,
`down_e(silu(x_r @ gate_e) * (x_r @ up_e))`.

- `padded`: the plan's bucket region ([E, bucket, D], each expert's first `bucket` rows) in one
  batched matmul, which XLA:CPU runs nearly as fast as a dense one; then the overflow region in
  a loop over its blocks (each `block` rows of one expert), one product per block, stopping after
  the last used block so unused blocks cost nothing. The loop's backward is written by hand: the
  weight gradients accumulate in place per expert. (Letting autodiff differentiate a per-block
  weight gather costs a full [E, D, F] scatter per block.)
- `ragged`: `jax.lax.ragged_dot` over packed rows. The right call on GPU/TPU; on XLA:CPU it lowers
  to a masked dense product over all experts (E times the FLOPs), so `auto` avoids it there.

With an FP8 recipe the same regions run FP8 products instead (grouped_fp8.py), gate and up as two
matrices, since each is quantized on its own.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.config import FP8Config
from moe_jax.moe import grouped_fp8, manual
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
  bucket = max(0, int(per_expert - 2 * math.sqrt(per_expert)) // 8 * 8)
  return block, bucket


def _silu_grad(a):
  sig = jax.nn.sigmoid(a)
  return sig * (1 + a * (1 - sig))


def _expert(w, e):
  return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _block(x, n, block):
  return jax.lax.dynamic_slice_in_dim(x, n * block, block, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu_blocks(x_RxD, gate_up_ExDx2F, down_ExFxD, block_expert_N, used_blocks, block):
  return _swiglu_blocks_fwd(x_RxD, gate_up_ExDx2F, down_ExFxD, block_expert_N, used_blocks,
                            block)[0]


def _swiglu_blocks_fwd(x_RxD, gate_up_ExDx2F, down_ExFxD, block_expert_N, used_blocks, block):
  r, d = x_RxD.shape
  f2 = gate_up_ExDx2F.shape[-1]

  def body(n, carry):
    y_RxD, ab_Rx2F = carry
    e = block_expert_N[n]
    # gate and up side by side: one wide product per block instead of two narrow ones.
    ab_Bx2F = _block(x_RxD, n, block) @ _expert(gate_up_ExDx2F, e)
    y_BxD = _hidden(ab_Bx2F) @ _expert(down_ExFxD, e)
    start = n * block
    return (jax.lax.dynamic_update_slice_in_dim(y_RxD, y_BxD, start, axis=0),
            jax.lax.dynamic_update_slice_in_dim(ab_Rx2F, ab_Bx2F, start, axis=0))

  operands = (x_RxD, gate_up_ExDx2F, down_ExFxD, block_expert_N)
  zeros = tuple(manual.zeros(shape, x_RxD.dtype, *operands) for shape in ((r, d), (r, f2)))
  y_RxD, ab_Rx2F = jax.lax.fori_loop(0, used_blocks, body, zeros)
  return y_RxD, (x_RxD, ab_Rx2F, gate_up_ExDx2F, down_ExFxD, block_expert_N, used_blocks)


def _hidden(ab_Bx2F):
  a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
  return jax.nn.silu(a_BxF) * b_BxF


def _swiglu_blocks_bwd(block, residuals, dy_RxD):
  x_RxD, ab_Rx2F, gate_up_ExDx2F, down_ExFxD, block_expert_N, used_blocks = residuals
  f32 = jnp.float32

  def accumulate(w, e, delta):
    # Slice, add, update: lowers to an in-place update of the loop carry, not a scatter.
    return jax.lax.dynamic_update_index_in_dim(w, _expert(w, e) + delta, e, axis=0)

  def body(n, carry):
    dx_RxD, dgate_up, ddown = carry
    e = block_expert_N[n]
    x_BxD, ab_Bx2F, dy_BxD = (_block(t, n, block) for t in (x_RxD, ab_Rx2F, dy_RxD))
    a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
    silu_BxF = jax.nn.silu(a_BxF)
    ddown = accumulate(ddown, e, jnp.dot((silu_BxF * b_BxF).T, dy_BxD,
                                         preferred_element_type=f32))
    dh_BxF = dy_BxD @ _expert(down_ExFxD, e).T
    dab_Bx2F = jnp.concatenate([dh_BxF * b_BxF * _silu_grad(a_BxF), dh_BxF * silu_BxF], -1)
    dgate_up = accumulate(dgate_up, e, jnp.dot(x_BxD.T, dab_Bx2F, preferred_element_type=f32))
    dx_BxD = dab_Bx2F @ _expert(gate_up_ExDx2F, e).T
    dx_RxD = jax.lax.dynamic_update_slice_in_dim(dx_RxD, dx_BxD, n * block, axis=0)
    return dx_RxD, dgate_up, ddown

  operands = (x_RxD, ab_Rx2F, gate_up_ExDx2F, down_ExFxD, block_expert_N, dy_RxD)
  init = (manual.zeros(x_RxD.shape, x_RxD.dtype, *operands),
          *(manual.zeros(w.shape, f32, *operands) for w in (gate_up_ExDx2F, down_ExFxD)))
  dx_RxD, dgate_up, ddown = jax.lax.fori_loop(0, used_blocks, body, init)
  cts = (dx_RxD, dgate_up.astype(gate_up_ExDx2F.dtype), ddown.astype(down_ExFxD.dtype))
  primals = (x_RxD, gate_up_ExDx2F, down_ExFxD)
  return (*(manual.cotangent_like(c, p) for c, p in zip(cts, primals)), None, None)


_swiglu_blocks.defvjp(_swiglu_blocks_fwd, _swiglu_blocks_bwd)


def _swiglu_ragged(x_RxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E):
  a_RxF = jax.lax.ragged_dot(x_RxD, gate_ExDxF, group_sizes_E)
  b_RxF = jax.lax.ragged_dot(x_RxD, up_ExDxF, group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(a_RxF) * b_RxF, down_ExFxD, group_sizes_E)


def swiglu(x_RxD: jax.Array, experts: dict, plan: Plan, backend: str,
           fp8_cfg: FP8Config = FP8Config(), fp8_states: Optional[dict] = None) -> jax.Array:
  """Runs every row through its expert's SwiGLU; rows no expert owns come back zero.

  With fp8_cfg.recipe != "none" every product is FP8 (grouped_fp8.py; "delayed" takes
  fp8_states {"gate", "up", "down"} of [E, L] histories); "none" is the code below unchanged.
  """
  dtype = x_RxD.dtype
  fp8 = fp8_cfg.recipe != "none"
  gate, up, down = (experts[k].astype(dtype) for k in ("gate", "up", "down"))
  if backend == "ragged":
    if fp8:
      return grouped_fp8.swiglu_ragged(x_RxD, experts, plan.group_sizes_E, fp8_cfg,
                                       fp8_states or {})
    return _swiglu_ragged(x_RxD, gate, up, down, plan.group_sizes_E)
  if backend == "padded":
    gate_up = None if fp8 else jnp.concatenate([gate, up], -1)
    e, d = gate.shape[0], x_RxD.shape[-1]
    dense = e * plan.bucket
    states = grouped_fp8.split_states(fp8_states, 2) if fp8 else None
    parts = []
    if dense:
      x_ExCxD = x_RxD[:dense].reshape(e, plan.bucket, d)
      if fp8:
        y_ExCxD = grouped_fp8.swiglu_grouped(x_ExCxD, experts, fp8_cfg, states[0])
      else:
        ab_ExCx2F = jnp.einsum("ecd,edf->ecf", x_ExCxD, gate_up)
        y_ExCxD = jnp.einsum("ecf,efd->ecd", _hidden(ab_ExCx2F), down)
      parts.append(y_ExCxD.reshape(dense, d))
    if x_RxD.shape[0] > dense:
      if fp8:
        parts.append(grouped_fp8.swiglu_blocks(x_RxD[dense:], experts, plan.block_expert_N,
                                               plan.used_blocks, plan.block, fp8_cfg,
                                               states[1]))
      else:
        parts.append(_swiglu_blocks(x_RxD[dense:], gate_up, down, plan.block_expert_N,
                                    plan.used_blocks, plan.block))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  raise ValueError(f"grouped_backend={backend!r}: must be 'ragged' or 'padded'")
