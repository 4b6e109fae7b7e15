"""FP8 versions of `grouped.swiglu`'s expert products (fp8 recipe != "none"; see fp8.py).

Each of an expert's three matrices (gate, up, down) is quantized on its own, as fp8.fp8_dot
does: forward from x in 1 x tile tiles along D (or F) and w in tile x tile blocks per expert;
dx from g (grad_dtype) tiles and w's blocks; dw from x and g tiled along the tokens, float32
accumulation everywhere. The weights are quantized from their float32 master copies and the
weight gradients come back in float32.

A product is one call over a set of rows of each expert, and the recipes' row-dependent parts
are per call: "tensor" takes each expert's amax over the call's rows, and dw's token tiles
start at each expert's first row in the call. The padded backend makes one call of the bucket
region ([E, bucket, D], `fp8_grouped_dot`) and one per overflow block (`swiglu_blocks`, a
block's rows are one tile or less); the ragged backend one call over all rows (`swiglu_ragged`).
Forward and dx of "blockwise", and everything of "delayed" once its histories are non-zero,
depend on no layout. "delayed" keeps one state per matrix, histories [E, L], shared by the
calls through `fp8.share_state`, so the update holds each expert's amax over all its rows.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax import fp8
from moe_jax.config import FP8Config
from moe_jax import shard_util

NAMES = ("gate", "up", "down")
f32 = jnp.float32


def split_states(states: Optional[dict], n: int) -> list[dict]:
  """n per-call copies of {"gate", "up", "down"} delayed states ({} for stateless recipes)."""
  if not states:
    return [{}] * n
  copies = {k: fp8.share_state(states[k], n) for k in NAMES}
  return [{k: copies[k][i] for k in NAMES} for i in range(n)]


def swiglu_grouped(x_ExCxD, w: dict, cfg: FP8Config, states: dict):
  """The bucket region: one grouped FP8 product per matrix, per-expert scales."""
  st = lambda k: states.get(k)
  a = fp8.fp8_grouped_dot(x_ExCxD, w["gate"], cfg, st("gate"))
  b = fp8.fp8_grouped_dot(x_ExCxD, w["up"], cfg, st("up"))
  return fp8.fp8_grouped_dot(jax.nn.silu(a) * b, w["down"], cfg, st("down"))


# ----------------------------------------------------------------------------------------------
# Overflow blocks: grouped.py's block loop with each product through fp8.forward/backward
# (G = 1), and the same hand-written backward that accumulates weight gradients in place.

def _expert(w, e):
  return lax.dynamic_index_in_dim(w, e, axis=0, keepdims=True)


def _block(x, n, block):
  return lax.dynamic_slice_in_dim(x, n * block, block, axis=0)


def _state(states, name, e):
  return {k: _expert(h, e) for k, h in states[name].items()} if states else {}


def _weight_blocks(cfg, weights: dict, transpose: bool) -> Optional[dict]:
  """"blockwise": every expert's FP8 weight blocks, quantized once for the whole block loop
  rather than once per block (the loop runs ~90 blocks per layer at tiny_moe's size)."""
  if cfg.recipe != "blockwise":
    return None
  return {k: fp8.weight_blocks(cfg, w, transpose) for k, w in weights.items()}


def _expert_blocks(blocks: Optional[dict], name: str, e):
  return None if blocks is None else tuple(_expert(b, e) for b in blocks[name])


def silu_grad(a):
  """d silu(a) / da; the hand-written backward passes of both grouped backends use it."""
  sig = jax.nn.sigmoid(a)
  return sig * (1 + a * (1 - sig))


def swiglu_blocks(x_RxD, w: dict, block_expert_N, used_blocks, block: int, cfg: FP8Config,
                  states: dict):
  """SwiGLU of each overflow block through its expert, every product in FP8."""
  return _blocks(x_RxD, w["gate"], w["up"], w["down"], block_expert_N, used_blocks, states,
                 block, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blocks(x_RxD, gate, up, down, block_expert_N, used_blocks, states, block, cfg):
  return _blocks_fwd(x_RxD, gate, up, down, block_expert_N, used_blocks, states, block, cfg)[0]


def _blocks_fwd(x_RxD, gate, up, down, block_expert_N, used_blocks, states, block, cfg):
  r, d = x_RxD.shape
  dtype = x_RxD.dtype
  blocks = _weight_blocks(cfg, {"gate": gate, "up": up, "down": down}, transpose=False)
  dot = lambda x, name, wt, e: fp8.forward(cfg, x[None], _expert(wt, e), _state(states, name, e),
                                            _expert_blocks(blocks, name, e))[0].astype(dtype)

  def body(n, carry):
    y_RxD, ab_Rx2F = carry
    e, x_BxD = block_expert_N[n], _block(x_RxD, n, block)
    ab_Bx2F = jnp.concatenate([dot(x_BxD, "gate", gate, e), dot(x_BxD, "up", up, e)], -1)
    a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
    y_BxD = dot(jax.nn.silu(a_BxF) * b_BxF, "down", down, e)
    return (lax.dynamic_update_slice_in_dim(y_RxD, y_BxD, n * block, axis=0),
            lax.dynamic_update_slice_in_dim(ab_Rx2F, ab_Bx2F, n * block, axis=0))

  operands = (x_RxD, gate, up, down, block_expert_N, *jax.tree.leaves(states))
  zeros = tuple(shard_util.zeros(s, dtype, *operands) for s in ((r, d), (r, 2 * gate.shape[-1])))
  y_RxD, ab_Rx2F = lax.fori_loop(0, used_blocks, body, zeros)
  return y_RxD, (x_RxD, ab_Rx2F, gate, up, down, block_expert_N, used_blocks, states)


def _blocks_bwd(block, cfg, residuals, dy_RxD):
  x_RxD, ab_Rx2F, gate, up, down, block_expert_N, used_blocks, states = residuals
  dtype, e_count = x_RxD.dtype, gate.shape[0]
  weights = {"gate": gate, "up": up, "down": down}
  blocks = _weight_blocks(cfg, weights, transpose=True)

  def grads(x, name, g, e):
    dx, dw = fp8.backward(cfg, x[None], _expert(weights[name], e), g[None],
                           _state(states, name, e), _expert_blocks(blocks, name, e))
    return dx[0].astype(dtype), dw

  def add(w, e, delta):  # in place on the loop carry, not a scatter
    return lax.dynamic_update_slice_in_dim(w, _expert(w, e) + delta, e, axis=0)

  def peak(amax_E, e, v):
    return amax_E.at[e].max(jnp.max(jnp.abs(v.astype(f32)), initial=0.0))

  def body(n, carry):
    dx_RxD, dw, amax = carry
    e = block_expert_N[n]
    x_BxD, ab_Bx2F, dy_BxD = (_block(t, n, block) for t in (x_RxD, ab_Rx2F, dy_RxD))
    a_BxF, b_BxF = jnp.split(ab_Bx2F, 2, axis=-1)
    silu_BxF = jax.nn.silu(a_BxF)
    h_BxF = silu_BxF * b_BxF
    dh_BxF, ddown = grads(h_BxF, "down", dy_BxD, e)
    da_BxF, db_BxF = dh_BxF * b_BxF * silu_grad(a_BxF), dh_BxF * silu_BxF
    dxa_BxD, dgate = grads(x_BxD, "gate", da_BxF, e)
    dxb_BxD, dup = grads(x_BxD, "up", db_BxF, e)
    dx_RxD = lax.dynamic_update_slice_in_dim(dx_RxD, dxa_BxD + dxb_BxD, n * block, axis=0)
    dw = {k: add(dw[k], e, v) for k, v in (("gate", dgate), ("up", dup), ("down", ddown))}
    seen = {"x": x_BxD, "h": h_BxF, "ga": da_BxF, "gb": db_BxF, "gd": dy_BxD}
    amax = {k: peak(amax[k], e, v) for k, v in seen.items()}
    return dx_RxD, dw, amax

  operands = (x_RxD, ab_Rx2F, gate, up, down, block_expert_N, dy_RxD, *jax.tree.leaves(states))
  init = (shard_util.zeros(x_RxD.shape, dtype, *operands),
          {k: shard_util.zeros(v.shape, f32, *operands) for k, v in weights.items()},
          {k: shard_util.zeros((e_count,), f32, *operands) for k in ("x", "h", "ga", "gb", "gd")})
  dx_RxD, dw, amax = lax.fori_loop(0, used_blocks, body, init)
  new_states = {}
  if states:
    seen = {"gate": (amax["x"], amax["ga"]), "up": (amax["x"], amax["gb"]),
            "down": (amax["h"], amax["gd"])}
    for k in NAMES:
      now = {"x": seen[k][0], "w": fp8.tensor_amax(weights[k]), "g": seen[k][1]}
      rolled = {h: fp8.roll_history(states[k][h], now[h]) for h in states[k]}
      new_states[k] = fp8.state_cotangent(rolled, states[k])
  cts = fp8.cotangents_like(
      (dx_RxD, *(dw[k].astype(weights[k].dtype) for k in NAMES)), (x_RxD, gate, up, down))
  return (*cts, None, None, new_states)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


# ----------------------------------------------------------------------------------------------
# Ragged: packed rows, `group_sizes_E` rows per expert; each product one lax.ragged_dot per
# tile-long chunk of the contraction (scaled in float32, as fp8._chunked_matmul) and dw one
# ragged-contraction dot per token tile, token tiles restarting at each expert's first row.

def swiglu_ragged(x_RxD, w: dict, group_sizes_E, cfg: FP8Config, states: dict):
  st = lambda k: states.get(k, {})
  a = _ragged(cfg, x_RxD, w["gate"], group_sizes_E, st("gate"))
  b = _ragged(cfg, x_RxD, w["up"], group_sizes_E, st("up"))
  return _ragged(cfg, jax.nn.silu(a) * b, w["down"], group_sizes_E, st("down"))


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
def _ragged(cfg, x_RxK, w_ExKxN, group_sizes_E, state):
  return _ragged_forward(cfg, x_RxK, w_ExKxN, group_sizes_E, state).astype(x_RxK.dtype)


def _ragged_fwd(cfg, x_RxK, w_ExKxN, group_sizes_E, state):
  y = _ragged(cfg, x_RxK, w_ExKxN, group_sizes_E, state)
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


_ragged.defvjp(_ragged_fwd, _ragged_bwd)
