"""Grouped SwiGLU experts over expert-major rows: one function, two backends.

`swiglu(x_RxD, weights, plan, backend)` computes, for every row r owned by expert e,
`down_e(silu(x_r @ gate_e) * (x_r @ up_e))`.

- `padded`: one loop kernel over the plan's rows: each expert's bucket ([bucket] rows at
  e*bucket), then each used overflow block ([block] rows of one expert), one 2-D product per
  step, all reading and writing the whole row buffer in place. On XLA:CPU a loop of
  [bucket, D] x [D, 2F] products is faster than one batched [E, bucket, D] einsum (whose
  forward ran at ~2/3 of a dense matmul's rate), and slicing the buffer into regions and
  concatenating them back costs a full pass each. Overflow blocks after the last used one cost
  nothing. The backward is written by hand: the weight gradients accumulate in place per
  expert. (Letting autodiff differentiate a per-block weight gather costs a full [E, D, F]
  scatter per block.)
- `ragged`: `jax.lax.ragged_dot` over packed rows. The right call on GPU/TPU; on XLA:CPU it lowers
  to a masked dense product over all experts (E times the FLOPs), so `auto` avoids it there.

With an FP8 recipe the bucket region and the overflow blocks run FP8 products instead
(grouped_fp8.py), gate and up as two matrices, since each is quantized on its own.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from moe_jax.config import FP8Config
from moe_jax import shard_util
from moe_jax.moe import dispatch, grouped_fp8
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


def _expert(w, e):
  return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _rows(x, start, size):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


class _Segments(NamedTuple):
  """Where the padded kernel's products are: `bucket` rows per expert from row 0 (expert n owns
  rows n*bucket ...), then `block`-row overflow blocks from row `dense`, `used_blocks` of them
  in use, owned by `block_expert_N`."""
  bucket: int
  experts: int
  block: int


def _loops(seg: _Segments, block_expert_N, used_blocks, body, carry):
  """Runs body(start, size, expert, carry) over every bucket, then every used overflow block.

  Both loops read and write whole row buffers in place: no region is sliced out or
  concatenated back (each such copy costs a pass over the buffer).
  """
  dense = seg.bucket * seg.experts
  if seg.bucket:
    carry = jax.lax.fori_loop(
        0, seg.experts, lambda n, c: body(n * seg.bucket, seg.bucket, n, c), carry)
  if block_expert_N.shape[0]:
    carry = jax.lax.fori_loop(
        0, used_blocks,
        lambda n, c: body(dense + n * seg.block, seg.block, block_expert_N[n], c), carry)
  return carry


def _hidden(ab_Bx2F):
  a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
  return jax.nn.silu(a_BxF) * b_BxF


def routed_padded(x_TxD: jax.Array, experts: dict, gates_TxK: jax.Array, plan: Plan) -> jax.Array:
  """y[t] = sum_k gates[t, k] * expert_{e(t,k)}(x[t]) on the padded layout, from token rows.

  Equal to `combine(swiglu(permute(x)))`, but the kernel gathers each bucket's or block's token
  rows itself (and, backward, the gate-weighted output gradients and each row's gate gradient),
  so neither the permuted input nor the permuted gradient is ever written out: every pass over
  the [R, D] row buffer costs about 4% of a dense layer of equal FLOPs here.
  """
  t, k = gates_TxK.shape
  gate, up, down = (experts[n].astype(x_TxD.dtype) for n in ("gate", "up", "down"))
  seg = _Segments(bucket=plan.bucket, experts=gate.shape[0], block=plan.block)
  return _routed(x_TxD, gate, up, down, gates_TxK.astype(x_TxD.dtype), plan.src_R,
                 plan.row_A.reshape(t, k), plan.block_expert_N, plan.used_blocks, seg)


def _take_rows(x_NxD, idx_B):
  return jnp.take(x_NxD, idx_B, axis=0, mode="fill", fill_value=0)


def _gate_up(gate_ExDxF, up_ExDxF, e):
  # Side by side per expert: one wide product instead of two narrow ones, and no [E, D, 2F]
  # copy of the weights (nor a split of its gradient) per step.
  return jnp.concatenate([_expert(gate_ExDxF, e), _expert(up_ExDxF, e)], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _routed(x_TxD, gate_ExDxF, up_ExDxF, down_ExFxD, gates_TxK, src_R, row_TxK, block_expert_N,
            used_blocks, seg):
  return _routed_fwd(x_TxD, gate_ExDxF, up_ExDxF, down_ExFxD, gates_TxK, src_R, row_TxK,
                     block_expert_N, used_blocks, seg)[0]


def _routed_fwd(x_TxD, gate_ExDxF, up_ExDxF, down_ExFxD, gates_TxK, src_R, row_TxK,
                block_expert_N, used_blocks, seg):
  k = gates_TxK.shape[1]
  r, d, f = src_R.shape[0], x_TxD.shape[1], gate_ExDxF.shape[-1]
  # Row -> token; padding rows hold the sentinel A, whose token T is out of range: a zero row.
  tok_R = src_R // k

  def body(start, size, e, carry):
    y_RxD, ab_Rx2F = carry
    ab_Bx2F = _take_rows(x_TxD, _rows(tok_R, start, size)) @ _gate_up(gate_ExDxF, up_ExDxF, e)
    y_BxD = _hidden(ab_Bx2F) @ _expert(down_ExFxD, e)
    return (jax.lax.dynamic_update_slice_in_dim(y_RxD, y_BxD, start, axis=0),
            jax.lax.dynamic_update_slice_in_dim(ab_Rx2F, ab_Bx2F, start, axis=0))

  operands = (x_TxD, gate_ExDxF, up_ExDxF, down_ExFxD, block_expert_N)
  zeros = tuple(shard_util.zeros(shape, x_TxD.dtype, *operands) for shape in ((r, d), (r, 2 * f)))
  y_RxD, ab_Rx2F = _loops(seg, block_expert_N, used_blocks, body, zeros)
  y_TxD = jnp.einsum("tkd,tk->td", _take_rows(y_RxD, row_TxK), gates_TxK)
  return y_TxD, (x_TxD, y_RxD, ab_Rx2F, gate_ExDxF, up_ExDxF, down_ExFxD, gates_TxK, src_R,
                 row_TxK, block_expert_N, used_blocks)


def _routed_bwd(seg, residuals, dy_TxD):
  (x_TxD, y_RxD, ab_Rx2F, gate_ExDxF, up_ExDxF, down_ExFxD, gates_TxK, src_R, row_TxK,
   block_expert_N, used_blocks) = residuals
  k = gates_TxK.shape[1]
  f32 = jnp.float32
  tok_R = src_R // k
  gate_R = jnp.take(gates_TxK.reshape(-1), src_R, mode="fill", fill_value=0)

  def accumulate(w, e, delta):
    return jax.lax.dynamic_update_index_in_dim(w, _expert(w, e) + delta, e, axis=0)

  def body(start, size, e, carry):
    dx_RxD, dgate_R, dgate, dup, ddown = carry
    tok_B = _rows(tok_R, start, size)
    x_BxD, dy_BxD = _take_rows(x_TxD, tok_B), _take_rows(dy_TxD, tok_B)
    # d gate of each row: its expert output against its token's output gradient.
    dgate_R = jax.lax.dynamic_update_slice_in_dim(
        dgate_R, jnp.sum(_rows(y_RxD, start, size) * dy_BxD, -1), start, axis=0)
    dy_BxD = dy_BxD * _rows(gate_R, start, size)[:, None]
    a_BxF, b_BxF = jnp.split(_rows(ab_Rx2F, start, size), 2, axis=-1)
    silu_BxF = jax.nn.silu(a_BxF)
    ddown = accumulate(ddown, e, jnp.dot((silu_BxF * b_BxF).T, dy_BxD,
                                         preferred_element_type=f32))
    dh_BxF = dy_BxD @ _expert(down_ExFxD, e).T
    da_BxF = dh_BxF * b_BxF * grouped_fp8.silu_grad(a_BxF)
    dab_Bx2F = jnp.concatenate([da_BxF, dh_BxF * silu_BxF], -1)
    dgate_up_Dx2F = jnp.dot(x_BxD.T, dab_Bx2F, preferred_element_type=f32)
    dgate_DxF, dup_DxF = jnp.split(dgate_up_Dx2F, 2, axis=-1)
    dgate, dup = accumulate(dgate, e, dgate_DxF), accumulate(dup, e, dup_DxF)
    dx_BxD = dab_Bx2F @ _gate_up(gate_ExDxF, up_ExDxF, e).T
    dx_RxD = jax.lax.dynamic_update_slice_in_dim(dx_RxD, dx_BxD, start, axis=0)
    return dx_RxD, dgate_R, dgate, dup, ddown

  weights = (gate_ExDxF, up_ExDxF, down_ExFxD)
  operands = (x_TxD, y_RxD, ab_Rx2F, *weights, block_expert_N, dy_TxD)
  init = (shard_util.zeros(y_RxD.shape, x_TxD.dtype, *operands),
          shard_util.zeros(src_R.shape, x_TxD.dtype, *operands),
          *(shard_util.zeros(w.shape, f32, *operands) for w in weights))
  dx_RxD, dgate_R, *dweights = _loops(seg, block_expert_N, used_blocks, body, init)
  # Each token's rows summed back: gathers through the row map, not scatter-adds.
  dx_TxD = _take_rows(dx_RxD, row_TxK).sum(1)
  dgates_TxK = jnp.take(dgate_R, row_TxK, mode="fill", fill_value=0)
  cts = (dx_TxD, *(dw.astype(w.dtype) for dw, w in zip(dweights, weights)), dgates_TxK)
  primals = (x_TxD, *weights, gates_TxK)
  return (*(shard_util.cotangent_like(c, p) for c, p in zip(cts, primals)), None, None, None, None)


_routed.defvjp(_routed_fwd, _routed_bwd)


def routed(x_TxD: jax.Array, experts: dict, gates_TxK: jax.Array, plan: Plan, backend: str,
           fp8_cfg: FP8Config = FP8Config(), fp8_states: Optional[dict] = None) -> jax.Array:
  """y[t] = sum_k gates[t, k] * expert_{e(t,k)}(x[t]): dispatch, experts and combine.

  The padded backend without FP8 runs `routed_padded`, which never writes the permuted rows;
  the others permute, run `swiglu` and combine.
  """
  if backend == "padded" and fp8_cfg.recipe == "none":
    return routed_padded(x_TxD, experts, gates_TxK, plan)
  x_RxD = dispatch.permute(x_TxD, plan, gates_TxK.shape[1])
  return dispatch.combine(swiglu(x_RxD, experts, plan, backend, fp8_cfg, fp8_states), gates_TxK,
                          plan)


def _swiglu_ragged(x_RxD, gate_ExDxF, up_ExDxF, down_ExFxD, group_sizes_E):
  a_RxF = jax.lax.ragged_dot(x_RxD, gate_ExDxF, group_sizes_E)
  b_RxF = jax.lax.ragged_dot(x_RxD, up_ExDxF, group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(a_RxF) * b_RxF, down_ExFxD, group_sizes_E)


def swiglu(x_RxD: jax.Array, experts: dict, plan: Plan, backend: str,
           fp8_cfg: FP8Config = FP8Config(), fp8_states: Optional[dict] = None) -> jax.Array:
  """Runs every row through its expert's SwiGLU; rows no expert owns come back zero.

  With fp8_cfg.recipe != "none" every product is FP8 (grouped_fp8.py; "delayed" takes
  fp8_states {"gate", "up", "down"} of [E, L] histories).
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
    if not fp8:
      # Rows are their own tokens here (one slot each, gate 1).
      r = x_RxD.shape[0]
      rows_R = jnp.arange(r, dtype=jnp.int32)
      identity = plan._replace(src_R=rows_R, row_A=rows_R)
      return routed_padded(x_RxD, experts, jnp.ones((r, 1), dtype), identity)
    # FP8 (a simulation on CPU, not tuned for speed): the bucket region as one grouped product,
    # the overflow blocks in grouped_fp8's loop.
    e, d = gate.shape[0], x_RxD.shape[-1]
    dense = e * plan.bucket
    states = grouped_fp8.split_states(fp8_states, 2)
    parts = []
    if dense:
      x_ExCxD = x_RxD[:dense].reshape(e, plan.bucket, d)
      parts.append(grouped_fp8.swiglu_grouped(x_ExCxD, experts, fp8_cfg, states[0]).reshape(
          dense, d))
    if x_RxD.shape[0] > dense:
      parts.append(grouped_fp8.swiglu_blocks(x_RxD[dense:], experts, plan.block_expert_N,
                                             plan.used_blocks, plan.block, fp8_cfg, states[1]))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  raise ValueError(f"grouped_backend={backend!r}: must be 'ragged' or 'padded'")
