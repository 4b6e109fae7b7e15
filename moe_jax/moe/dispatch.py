"""The permutation plan and the row gathers that move tokens to experts and back.

An *assignment* is one (token, slot) pair; there are `A = T * K`, numbered token-major
(`a = t * K + k`). The plan sorts assignments by expert (stable, so earlier tokens come first and
are the last to be dropped under a capacity) and gives each kept assignment a *row* in an
expert-major buffer of static length `R`. Each expert's rows are padded up to a multiple of
`block` so that every block of `block` rows belongs to one expert; the grouped matmul then runs
one dense product per block. With `block = 1` rows are packed (the `ragged_dot` layout).

Static bound (dropless): sum_e ceil(c_e / block) * block <= A + E * (block - 1), so no
assignment is ever dropped for lack of room; with a capacity C per expert the bound is
E * ceil(C / block) * block.

Both directions are gathers with a custom VJP whose backward is also a gather (through the
inverse map), never a scatter-add: scatters serialise on CPU and are slow on GPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from moe_jax.moe import manual


class Plan(NamedTuple):
  row_A: jax.Array           # [A] row of each assignment; R (out of range) when dropped
  src_R: jax.Array           # [R] assignment that fills each row; A (out of range) for padding
  group_sizes_E: jax.Array   # [E] rows per expert, block-padded (the ragged_dot group sizes)
  block_expert_N: jax.Array  # [R / block] expert owning each block
  used_blocks: jax.Array     # scalar: blocks holding at least one row, in order
  kept: jax.Array            # scalar: assignments that got a row
  block: int                 # static


def capacity(num_assignments: int, num_experts: int, capacity_factor: Optional[float]) -> int:
  """Rows per expert allowed under a capacity factor (Switch: cf * A / E, rounded up)."""
  if capacity_factor is None:
    return num_assignments
  return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def num_rows(num_assignments: int, num_experts: int, cap: int, block: int) -> int:
  """Static length of the row buffer: the tightest bound that can never overflow."""
  dropless = num_assignments + num_experts * (block - 1)
  capped = num_experts * (-(-min(cap, num_assignments) // block) * block)
  rows = min(dropless, capped)
  return -(-rows // block) * block


def make_plan(idx_TxK: jax.Array, num_experts: int, *, block: int,
              capacity_factor: Optional[float] = None,
              valid_TxK: Optional[jax.Array] = None, slots: Optional[int] = None) -> Plan:
  """Sorts assignments by expert and lays them out in block-padded expert-major rows.

  Invalid assignments (`valid_TxK` False: empty slots of an exchange buffer) get no row and do
  not count towards `kept`. With `slots`, every expert owns exactly `slots` rows starting at
  `e * slots` (the fixed-size buckets of an all-to-all buffer); assignments beyond drop.
  """
  e_A = idx_TxK.reshape(-1).astype(jnp.int32)
  a = e_A.shape[0]
  cap = capacity(a, num_experts, capacity_factor)
  if slots is None:
    r = num_rows(a, num_experts, cap, block)
  else:
    cap, r = min(cap, slots), num_experts * slots
  if valid_TxK is not None:
    # Invalid slots become a phantom expert E that sorts last and owns no rows.
    e_A = jnp.where(valid_TxK.reshape(-1), e_A, num_experts)

  order_A = jnp.argsort(e_A, stable=True)
  e_sorted_A = e_A[order_A]
  counts_E = jnp.bincount(e_A, length=num_experts + 1).astype(jnp.int32)
  start_E = jnp.cumsum(counts_E) - counts_E
  rank_A = jnp.arange(a, dtype=jnp.int32) - start_E[e_sorted_A]
  kept_sorted_A = (rank_A < cap) & (e_sorted_A < num_experts)
  counts_E = counts_E[:num_experts]
  e_sorted_A = jnp.minimum(e_sorted_A, num_experts - 1)

  kept_E = jnp.minimum(counts_E, cap)
  if slots is None:
    padded_E = -(-kept_E // block) * block
  else:
    padded_E = jnp.full((num_experts,), slots, jnp.int32)
  end_E = jnp.cumsum(padded_E)
  row_sorted_A = jnp.where(kept_sorted_A, end_E[e_sorted_A] - padded_E[e_sorted_A] + rank_A, r)
  # Integer scatters below only build the index maps; no gradient ever flows through them.
  row_A = jnp.zeros(a, jnp.int32).at[order_A].set(row_sorted_A)
  src_R = jnp.full(r, a, jnp.int32).at[row_A].set(jnp.arange(a, dtype=jnp.int32), mode="drop")

  block_start_N = jnp.arange(r // block, dtype=jnp.int32) * block
  block_expert_N = jnp.minimum(jnp.searchsorted(end_E, block_start_N, side="right"),
                               num_experts - 1).astype(jnp.int32)
  return Plan(row_A=row_A, src_R=src_R, group_sizes_E=padded_E, block_expert_N=block_expert_N,
              used_blocks=end_E[-1] // block, kept=kept_E.sum(), block=block)


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
  return manual.cotangent_like(dsrc_NxJxD.sum(1), src_like), None, None


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
  return (manual.cotangent_like(dy_RxD, y_RxD), manual.cotangent_like(dgates_TxK, gates_TxK),
          None, None)


_combine.defvjp(_combine_fwd, _combine_bwd)
