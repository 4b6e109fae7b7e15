"""The permutation plan and the row gathers that move tokens to experts and back.

An *assignment* is one (token, slot) pair; there are `A = T * K`, numbered token-major
(`a = t * K + k`). The plan sorts assignments by expert (stable, so earlier tokens come first and
are the last to be dropped under a capacity) and gives each kept assignment a *row* in an
expert-major buffer of static length `R`, in two regions:

  buckets   [E * bucket rows]  expert e's first `bucket` assignments at rows e*bucket + rank:
            one large dense product per expert.
  overflow  [the rest]         each expert's assignments beyond its bucket, padded to a
            multiple of `block` rows so that every block belongs to one expert; a loop runs one
            product per used block.

With `bucket = 0` everything is overflow (and with `block = 1` rows are packed: the
`ragged_dot` layout). With `slots = C`, experts own exactly C bucket rows and nothing overflows:
the fixed-size buckets of an all-to-all buffer.

Static bound (dropless): the overflow of all experts together is at most A - bucket (the
experts that overflow hold more than `bucket` assignments each), plus at most `block - 1`
padding rows per expert, so no assignment is ever dropped for lack of room.

Both directions are gathers with a custom VJP whose backward is also a gather (through the
inverse map), never a scatter-add: scatters serialise on CPU and are slow on GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from moe_jax import shard_util


class Plan(NamedTuple):
  row_A: jax.Array           # [A] row of each assignment; R (out of range) when dropped
  src_R: jax.Array           # [R] assignment that fills each row; A (out of range) for padding
  group_sizes_E: jax.Array   # [E] overflow rows per expert, block-padded (ragged_dot groups)
  block_expert_N: jax.Array  # [overflow rows / block] expert owning each overflow block
  used_blocks: jax.Array     # scalar: overflow blocks holding at least one row, in order
  kept: jax.Array            # scalar: assignments that got a row
  spilled_A: jax.Array       # [A] bool: within capacity but beyond `overflow_budget`: no row
  block: int                 # static: rows per overflow block
  bucket: int                # static: bucket rows per expert (the first E * bucket rows)


def capacity(num_assignments: int, num_experts: int, capacity_factor: Optional[float]) -> int:
  """Rows per expert allowed under a capacity factor (Switch: cf * A / E, rounded up)."""
  if capacity_factor is None:
    return num_assignments
  return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def overflow_rows(num_assignments: int, num_experts: int, cap: int, block: int,
                  bucket: int) -> int:
  """Static length of the overflow region: the tightest bound that can never overflow."""
  spill = min(max(num_assignments - bucket, 0), num_experts * max(cap - bucket, 0))
  rows = spill + num_experts * (block - 1) if spill else 0
  return -(-rows // block) * block


def make_plan(idx_TxK: jax.Array, num_experts: int, *, block: int, bucket: int = 0,
              capacity_factor: Optional[float] = None,
              valid_TxK: Optional[jax.Array] = None, slots: Optional[int] = None,
              overflow_budget: Optional[int] = None) -> Plan:
  """Sorts assignments by expert and lays them out in expert-major bucket + overflow rows.

  Invalid assignments (`valid_TxK` False: empty slots of an exchange buffer) get no row and do
  not count towards `kept`. `overflow_budget` caps the overflow region below its dropless bound;
  assignments that do not fit are marked `spilled_A` for the caller to run another way.
  """
  e_A = idx_TxK.reshape(-1).astype(jnp.int32)
  a = e_A.shape[0]
  cap = capacity(a, num_experts, capacity_factor)
  if slots is not None:
    cap, bucket, block = min(cap, slots), slots, 1
  bucket = min(bucket, cap)
  dense = num_experts * bucket
  over = overflow_rows(a, num_experts, cap, block, bucket)
  if overflow_budget is not None:
    over = min(over, -(-overflow_budget // block) * block)
  r = dense + over
  if valid_TxK is not None:
    # Invalid slots become a phantom expert E that sorts last and owns no rows.
    e_A = jnp.where(valid_TxK.reshape(-1), e_A, num_experts)

  order_A = jnp.argsort(e_A, stable=True)
  e_sorted_A = e_A[order_A]
  counts_E = jnp.bincount(e_A, length=num_experts + 1).astype(jnp.int32)
  start_E = jnp.cumsum(counts_E) - counts_E
  rank_A = jnp.arange(a, dtype=jnp.int32) - start_E[e_sorted_A]
  kept_sorted_A = (rank_A < cap) & (e_sorted_A < num_experts)
  kept_E = jnp.minimum(counts_E[:num_experts], cap)
  e_sorted_A = jnp.minimum(e_sorted_A, num_experts - 1)

  over_E = jnp.maximum(kept_E - bucket, 0)
  padded_E = -(-over_E // block) * block
  end_E = jnp.cumsum(padded_E)
  over_row_A = dense + end_E[e_sorted_A] - padded_E[e_sorted_A] + rank_A - bucket
  row_sorted_A = jnp.where(rank_A < bucket, e_sorted_A * bucket + rank_A, over_row_A)
  spilled_sorted_A = kept_sorted_A & (row_sorted_A >= r)
  row_sorted_A = jnp.where(kept_sorted_A & ~spilled_sorted_A, row_sorted_A, r)
  # Integer scatters below only build the index maps; no gradient ever flows through them.
  row_A = jnp.zeros(a, jnp.int32).at[order_A].set(row_sorted_A)
  spilled_A = jnp.zeros(a, bool).at[order_A].set(spilled_sorted_A)
  src_R = jnp.full(r, a, jnp.int32).at[row_A].set(jnp.arange(a, dtype=jnp.int32), mode="drop")

  block_start_N = jnp.arange((r - dense) // block, dtype=jnp.int32) * block
  block_expert_N = jnp.minimum(jnp.searchsorted(end_E, block_start_N, side="right"),
                               num_experts - 1).astype(jnp.int32)
  return Plan(row_A=row_A, src_R=src_R, group_sizes_E=padded_E, block_expert_N=block_expert_N,
              used_blocks=jnp.minimum(end_E[-1], r - dense) // block,
              kept=kept_E.sum() - spilled_A.sum(), spilled_A=spilled_A, block=block, bucket=bucket)


@jax.custom_vjp
def gather_rows(src_NxD: jax.Array, idx_M: jax.Array, inverse_NxJ: jax.Array) -> jax.Array:
  """out[m] = src[idx[m]] (zero where idx is out of range).

  `inverse_NxJ` lists, for each source row, the output rows that read it (out-of-range entries
  are ignored); the backward pass sums those rows: a gather, not a scatter-add.
  """
  return jnp.take(src_NxD, idx_M, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(src_NxD, idx_M, inverse_NxJ):
  # A zero-size slice remembers how the source varies over shard_map axes, at no cost.
  return gather_rows(src_NxD, idx_M, inverse_NxJ), (idx_M, inverse_NxJ, src_NxD[:0])


def _gather_rows_bwd(res, dout_MxD):
  idx_M, inverse_NxJ, src_like = res
  dsrc_NxJxD = jnp.take(dout_MxD, inverse_NxJ, axis=0, mode="fill", fill_value=0)
  return shard_util.cotangent_like(dsrc_NxJxD.sum(1), src_like), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def permute(x_TxD: jax.Array, plan: Plan, top_k: int) -> jax.Array:
  """Token rows -> expert-major rows [R, D]; padding and dropped rows are zero."""
  # src // K is the token; the padding sentinel A maps to T, out of range, hence a zero row.
  return gather_rows(x_TxD, plan.src_R // top_k, plan.row_A.reshape(-1, top_k))


def unpermute(y_RxD: jax.Array, plan: Plan, top_k: int) -> jax.Array:
  """Expert-major rows -> [T, K, D] per (token, slot); dropped assignments read zero."""
  y_AxD = gather_rows(y_RxD, plan.row_A, plan.src_R[:, None])
  return y_AxD.reshape(-1, top_k, y_RxD.shape[-1])


def combine(y_RxD: jax.Array, gates_TxK: jax.Array, plan: Plan) -> jax.Array:
  """y[t] = sum_k gates[t, k] * y_rows[row[t, k]]: unpermute and weighted sum in one pass.

  Fusing the two keeps the [T, K, D] intermediate out of memory in both directions.
  """
  t, k = gates_TxK.shape
  return _combine(y_RxD, gates_TxK.astype(y_RxD.dtype), plan.row_A.reshape(t, k), plan.src_R)


@jax.custom_vjp
def _combine(y_RxD, gates_TxK, row_TxK, src_R):
  rows_TxKxD = jnp.take(y_RxD, row_TxK, axis=0, mode="fill", fill_value=0)
  return jnp.einsum("tkd,tk->td", rows_TxKxD, gates_TxK)


def _combine_fwd(y_RxD, gates_TxK, row_TxK, src_R):
  return _combine(y_RxD, gates_TxK, row_TxK, src_R), (y_RxD, gates_TxK, row_TxK, src_R)


def _combine_bwd(res, dy_TxD):
  y_RxD, gates_TxK, row_TxK, src_R = res
  t, k = gates_TxK.shape
  # Row r belongs to assignment src[r] = t * K + k; padding rows (src = T * K) read zero.
  gate_R = jnp.take(gates_TxK.reshape(-1), src_R, mode="fill", fill_value=0)
  dy_RxD = jnp.take(dy_TxD, src_R // k, axis=0, mode="fill", fill_value=0) * gate_R[:, None]
  rows_TxKxD = jnp.take(y_RxD, row_TxK, axis=0, mode="fill", fill_value=0)
  dgates_TxK = jnp.einsum("tkd,td->tk", rows_TxKxD, dy_TxD)
  return (shard_util.cotangent_like(dy_RxD, y_RxD), shard_util.cotangent_like(dgates_TxK, gates_TxK),
          None, None)


_combine.defvjp(_combine_fwd, _combine_bwd)
