"""The padded backend's one loop kernel: y[t] = sum_k gates[t, k] * expert_{e(t,k)}(x[t]).

One loop over the plan's rows: each expert's bucket ([bucket] rows at e*bucket), then each used
overflow block ([block] rows of one expert), one product per step (`product`, products.py:
plain or FP8), all reading and writing whole row buffers in place. On XLA:CPU a loop of
[bucket, D] x [D, 2F] products is faster than one batched [E, bucket, D] einsum (whose forward
ran at ~2/3 of a dense matmul's rate), and slicing the buffer into regions and concatenating
them back costs a full pass each. Overflow blocks after the last used one cost nothing.

The kernel gathers each bucket's or block's token rows itself (and, backward, the
gate-weighted output gradients and each row's gate gradient), so neither the permuted input
nor the permuted gradient is ever written out: every pass over the [R, D] row buffer costs
about 4% of a dense layer of equal FLOPs here. The backward is written by hand: the weight
gradients accumulate in place per expert. (Letting autodiff differentiate a per-block weight
gather costs a full [E, D, F] scatter per block.)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from moe_jax import shard_util
from moe_jax.moe.dispatch import Plan
from moe_jax.moe.products import expert, silu_grad

f32 = jnp.float32


class Segments(NamedTuple):
  """Where the products are: `bucket` rows per expert from row 0 (expert n owns rows
  n*bucket ...), then `block`-row overflow blocks after the `experts` buckets."""
  bucket: int
  experts: int
  block: int


def _loops(seg: Segments, block_expert_N, used_blocks, body, carry):
  """Runs body(start, size, expert, carry) over every bucket, then every used overflow block."""
  dense = seg.bucket * seg.experts
  if seg.bucket:
    carry = jax.lax.fori_loop(
        0, seg.experts, lambda n, c: body(n * seg.bucket, seg.bucket, n, c), carry)
  if block_expert_N.shape[0]:
    carry = jax.lax.fori_loop(
        0, used_blocks,
        lambda n, c: body(dense + n * seg.block, seg.block, block_expert_N[n], c), carry)
  return carry


def _rows(x, start, size):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _put(x, rows, start):
  return jax.lax.dynamic_update_slice_in_dim(x, rows, start, axis=0)


def _take_rows(x_NxD, idx_B):
  return jnp.take(x_NxD, idx_B, axis=0, mode="fill", fill_value=0)


def _hidden(ab_Bx2F):
  a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
  return jax.nn.silu(a_BxF) * b_BxF


def routed(x_TxD: jax.Array, experts: dict, gates_TxK: jax.Array, plan: Plan, product,
           states: Optional[dict] = None) -> jax.Array:
  """The kernel from token rows and a padded plan; `states` the FP8 "delayed" histories
  {"gate", "up", "down"} ([E, L] each) when `product` keeps them."""
  t, k = gates_TxK.shape
  w = product.weights(experts, x_TxD.dtype)
  seg = Segments(bucket=plan.bucket, experts=w["gate"].shape[0], block=plan.block)
  return _routed(x_TxD, w, gates_TxK.astype(x_TxD.dtype), states or {}, plan.src_R,
                 plan.row_A.reshape(t, k), plan.block_expert_N, plan.used_blocks, seg, product)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _routed(x_TxD, w, gates_TxK, states, src_R, row_TxK, block_expert_N, used_blocks, seg,
            product):
  return _routed_fwd(x_TxD, w, gates_TxK, states, src_R, row_TxK, block_expert_N, used_blocks,
                     seg, product)[0]


def _routed_fwd(x_TxD, w, gates_TxK, states, src_R, row_TxK, block_expert_N, used_blocks, seg,
                product):
  k = gates_TxK.shape[1]
  r, d, f = src_R.shape[0], x_TxD.shape[1], w["gate"].shape[-1]
  # Row -> token; padding rows hold the sentinel A, whose token T is out of range: a zero row.
  tok_R = src_R // k
  ctx = product.prepare(w, transpose=False)

  def body(start, size, e, carry):
    y_RxD, ab_Rx2F = carry
    x_BxD = _take_rows(x_TxD, _rows(tok_R, start, size))
    ab_Bx2F = product.gate_up(x_BxD, w, e, ctx, states)
    y_BxD = product.down(_hidden(ab_Bx2F), w, e, ctx, states)
    return _put(y_RxD, y_BxD, start), _put(ab_Rx2F, ab_Bx2F, start)

  operands = (x_TxD, *w.values(), block_expert_N, *jax.tree.leaves(states))
  zeros = tuple(shard_util.zeros(shape, x_TxD.dtype, *operands) for shape in ((r, d), (r, 2 * f)))
  y_RxD, ab_Rx2F = _loops(seg, block_expert_N, used_blocks, body, zeros)
  y_TxD = jnp.einsum("tkd,tk->td", _take_rows(y_RxD, row_TxK), gates_TxK)
  return y_TxD, (x_TxD, y_RxD, ab_Rx2F, w, gates_TxK, states, src_R, row_TxK, block_expert_N,
                 used_blocks)


def _routed_bwd(seg, product, residuals, dy_TxD):
  (x_TxD, y_RxD, ab_Rx2F, w, gates_TxK, states, src_R, row_TxK, block_expert_N,
   used_blocks) = residuals
  k = gates_TxK.shape[1]
  tok_R = src_R // k
  gate_R = jnp.take(gates_TxK.reshape(-1), src_R, mode="fill", fill_value=0)
  ctx = product.prepare(w, transpose=True)

  def accumulate(dw, e, delta):
    return jax.lax.dynamic_update_index_in_dim(dw, expert(dw, e) + delta, e, axis=0)

  def body(start, size, e, carry):
    dx_RxD, dgate_R, dw, stats = carry
    tok_B = _rows(tok_R, start, size)
    x_BxD, dy_BxD = _take_rows(x_TxD, tok_B), _take_rows(dy_TxD, tok_B)
    # d gate of each row: its expert output against its token's output gradient.
    dgate_R = _put(dgate_R, jnp.sum(_rows(y_RxD, start, size) * dy_BxD, -1), start)
    dy_BxD = dy_BxD * _rows(gate_R, start, size)[:, None]
    a_BxF, b_BxF = jnp.split(_rows(ab_Rx2F, start, size), 2, axis=-1)
    silu_BxF = jax.nn.silu(a_BxF)
    h_BxF = silu_BxF * b_BxF
    dh_BxF, ddown = product.down_grad(h_BxF, dy_BxD, w, e, ctx, states)
    da_BxF, db_BxF = dh_BxF * b_BxF * silu_grad(a_BxF), dh_BxF * silu_BxF
    dx_BxD, dgate, dup = product.gate_up_grad(x_BxD, da_BxF, db_BxF, w, e, ctx, states)
    dw = {n: accumulate(dw[n], e, v) for n, v in (("gate", dgate), ("up", dup), ("down", ddown))}
    stats = product.observe(stats, e, {"x": x_BxD, "h": h_BxF, "ga": da_BxF, "gb": db_BxF,
                                       "gd": dy_BxD})
    return _put(dx_RxD, dx_BxD, start), dgate_R, dw, stats

  operands = (x_TxD, y_RxD, ab_Rx2F, *w.values(), block_expert_N, dy_TxD,
              *jax.tree.leaves(states))
  zeros = lambda shape, dtype=f32: shard_util.zeros(shape, dtype, *operands)
  init = (zeros(y_RxD.shape, x_TxD.dtype), zeros(src_R.shape, x_TxD.dtype),
          {n: zeros(v.shape) for n, v in w.items()}, product.init_stats(states, seg.experts, zeros))
  dx_RxD, dgate_R, dw, stats = _loops(seg, block_expert_N, used_blocks, body, init)
  # Each token's rows summed back: gathers through the row map, not scatter-adds.
  dx_TxD = _take_rows(dx_RxD, row_TxK).sum(1)
  dgates_TxK = jnp.take(dgate_R, row_TxK, mode="fill", fill_value=0)
  like = shard_util.cotangent_like
  dw = {n: like(dw[n].astype(v.dtype), v) for n, v in w.items()}
  return (like(dx_TxD, x_TxD), dw, like(dgates_TxK, gates_TxK),
          product.new_states(stats, w, states), None, None, None, None)


_routed.defvjp(_routed_fwd, _routed_bwd)
