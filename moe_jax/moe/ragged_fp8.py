"""FP8 products over packed rows for the ragged backend: `dot`, one `lax.ragged_dot` per
tile-long chunk of the contraction (scaled in float32, as fp8.py's chunked matmul) forward and
for dx, and dw one ragged-contraction dot per token tile, token tiles restarting at each
expert's first row. Per-tensor scales ("tensor", "delayed") are per expert over all its rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax import fp8
from moe_jax.config import FP8Config

f32 = jnp.float32


def _rdot(a_RxC, b_ExCxN, group_sizes_E):
  return lax.ragged_dot(a_RxC, b_ExCxN, group_sizes_E, preferred_element_type=f32)


def _row_expert(group_sizes_E, rows: int):
  """Expert of each packed row; E past the last group."""
  return jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(rows), side="right")


def _per_row(v_Ex, e_R):
  return jnp.take(v_Ex, e_R, axis=0, mode="fill", fill_value=0)


def _expert_amax(x_RxC, e_R, num_experts):
  row_R = jnp.max(jnp.abs(x_RxC.astype(f32)), axis=1, initial=0.0)
  return jnp.maximum(jax.ops.segment_max(row_R, e_R, num_experts), 0.0)


def _per_row_quantize(x_RxC, scale_R, dtype):
  return fp8.quantize_with_scale(x_RxC, scale_R[:, None], dtype=dtype,
                                 block_shape=(1, x_RxC.shape[1]))


def _chunked(qa_RxC, sa_RxCb, qb_ExCxN, sb_ExCbxN, group_sizes_E, e_R, tile):
  out = 0.0
  for c in range(sa_RxCb.shape[1]):
    chunk = slice(c * tile, (c + 1) * tile)
    p_RxN = _rdot(qa_RxC[:, chunk], qb_ExCxN[:, chunk, :], group_sizes_E)
    out = out + p_RxN * sa_RxCb[:, c:c + 1] * _per_row(sb_ExCbxN[:, c, :], e_R)
  return out


def _ragged_scales(cfg, x_RxK, w_ExKxN, g_RxN, e_R, state):
  e = w_ExKxN.shape[0]
  current = [_expert_amax(x_RxK, e_R, e), fp8.tensor_amax(w_ExKxN),
             None if g_RxN is None else _expert_amax(g_RxN, e_R, e)]
  return fp8.scales_from_amax(cfg, current, state)


def _ragged_forward(cfg, x_RxK, w_ExKxN, group_sizes_E, state):
  fwd, t, p2 = fp8.FP8_DTYPES[cfg.fwd_dtype], cfg.tile, cfg.power_of_two_scale
  e_R = _row_expert(group_sizes_E, x_RxK.shape[0])
  if cfg.recipe == "blockwise":
    qx, sx = fp8.quantize(x_RxK, dtype=fwd, block_shape=(1, t), power_of_two=p2)
    qw, sw = fp8.weight_blocks(cfg, w_ExKxN)
    return _chunked(qx, sx, qw, sw, group_sizes_E, e_R, t)
  sx, sw, _ = _ragged_scales(cfg, x_RxK, w_ExKxN, None, e_R, state)
  qx = _per_row_quantize(x_RxK, _per_row(sx, e_R), fwd)
  y = _rdot(qx, fp8.tensor_quantize(w_ExKxN, sw, fwd), group_sizes_E)
  return y * _per_row(sx * sw, e_R)[:, None]


def _token_tiles(group_sizes_E, e_R, tile: int):
  """Tile index of each row (tiles of `tile` rows, restarting at every expert's first row),
  the rows per tile and the expert per tile (E for unused tiles), at a static tile count."""
  rows, e = e_R.shape[0], group_sizes_E.shape[0]
  count = -(-rows // tile) + e
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  valid_R = e_R < e
  local_R = jnp.arange(rows) - _per_row(start_E, e_R)
  tile_R = jnp.cumsum(valid_R & (local_R % tile == 0)) - 1
  tile_R = jnp.where(valid_R, tile_R, count)  # out of range: dropped below
  sizes = jnp.bincount(tile_R, length=count + 1)[:count].astype(jnp.int32)
  tile_expert = jax.ops.segment_max(jnp.where(valid_R, e_R, -1), tile_R, count)
  return tile_R, sizes, jnp.where(tile_expert >= 0, tile_expert, e), count


def _contract(a_RxK, b_RxN, sizes):
  """Per group of rows: a^T @ b, [groups, K, N] in float32."""
  dims = lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), [0], [])
  return lax.ragged_dot_general(a_RxK, b_RxN, sizes, dims, preferred_element_type=f32)


def _ragged_backward(cfg, x_RxK, w_ExKxN, g_RxN, group_sizes_E, state):
  fwd, grad = fp8.FP8_DTYPES[cfg.fwd_dtype], fp8.FP8_DTYPES[cfg.grad_dtype]
  t, p2, e = cfg.tile, cfg.power_of_two_scale, w_ExKxN.shape[0]
  e_R = _row_expert(group_sizes_E, x_RxK.shape[0])
  if cfg.recipe == "blockwise":
    qg, sg = fp8.quantize(g_RxN, dtype=grad, block_shape=(1, t), power_of_two=p2)
    qwT, swT = fp8.weight_blocks(cfg, w_ExKxN, transpose=True)
    dx = _chunked(qg, sg, qwT, swT, group_sizes_E, e_R, t)
    tile_R, sizes, tile_expert, count = _token_tiles(group_sizes_E, e_R, t)

    def tile_quantize(v_RxC, dtype):
      amax = jnp.maximum(jax.ops.segment_max(jnp.abs(v_RxC.astype(f32)), tile_R, count), 0.0)
      s_TxC = fp8.compute_scale(amax, dtype, p2)
      s_RxC = jnp.take(s_TxC, tile_R, axis=0, mode="fill", fill_value=1.0)
      return fp8.quantize_with_scale(v_RxC, s_RxC, dtype=dtype, block_shape=(1, 1)), s_TxC

    qx, sx = tile_quantize(x_RxK, fwd)
    qg2, sg2 = tile_quantize(g_RxN, grad)
    p_TxKxN = _contract(qx, qg2, sizes) * sx[:, :, None] * sg2[:, None, :]
    return dx, jax.ops.segment_sum(p_TxKxN, tile_expert, e)
  sx, sw, sg = _ragged_scales(cfg, x_RxK, w_ExKxN, g_RxN, e_R, state)
  qg = _per_row_quantize(g_RxN, _per_row(sg, e_R), grad)
  qwT = jnp.swapaxes(fp8.tensor_quantize(w_ExKxN, sw, fwd), 1, 2)
  dx = _rdot(qg, qwT, group_sizes_E) * _per_row(sg * sw, e_R)[:, None]
  qx = _per_row_quantize(x_RxK, _per_row(sx, e_R), fwd)
  dw = _contract(qx, qg, group_sizes_E) * (sx * sg)[:, None, None]
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dot(cfg: FP8Config, x_RxK, w_ExKxN, group_sizes_E, state: dict):
  """x @ w of each expert's packed rows ([R, K] @ [E, K, N] -> [R, N] in x's dtype), FP8 per
  cfg; "delayed" takes state {"x", "w", "g"} of [E, L] histories ({} otherwise), whose
  cotangent is the update."""
  return _ragged_forward(cfg, x_RxK, w_ExKxN, group_sizes_E, state).astype(x_RxK.dtype)


def _ragged_fwd(cfg, x_RxK, w_ExKxN, group_sizes_E, state):
  y = dot(cfg, x_RxK, w_ExKxN, group_sizes_E, state)
  return y, (x_RxK, w_ExKxN, group_sizes_E, state)


def _ragged_bwd(cfg, residuals, g_RxN):
  x, w, group_sizes_E, state = residuals
  dx, dw = _ragged_backward(cfg, x, w, g_RxN, group_sizes_E, state)
  new_state = {}
  if state:
    e_R = _row_expert(group_sizes_E, x.shape[0])
    e = w.shape[0]
    now = {"x": _expert_amax(x, e_R, e), "w": fp8.tensor_amax(w),
           "g": _expert_amax(g_RxN, e_R, e)}
    new_state = fp8.state_cotangent(
        {k: fp8.roll_history(state[k], now[k]) for k in state}, state)
  dx, dw = fp8.cotangents_like((dx.astype(x.dtype), dw.astype(w.dtype)), (x, w))
  return dx, dw, None, new_state


dot.defvjp(_ragged_fwd, _ragged_bwd)
