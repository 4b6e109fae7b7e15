"""The device side of the paged cache: one preallocated pool per layer and the model step over it.

pool = {"layer_<i>": {leaf: [num_blocks, block_size, *slot]}} with the leaves of
`attention.init_cache`: MLA's slot is the normalised latent [kv_lora_rank] and the RoPE key
[qk_rope_head_dim], nothing else; MHA's the keys and values [kv_heads, head_dim] each. With
fp8=True a leaf is stored as float8_e4m3fn with one float32 scale per token (`<leaf>_scale`
[num_blocks, block_size]): amax/448, so every token keeps its own range.

A step gathers each sequence's blocks into a contiguous view [B, W * block_size, *slot] (W
block-table columns), runs the model's cached forward on it (positions per sequence; slots past a
sequence's end are masked by causality), and scatters the T new slots back into the pool; rows
beyond a sequence's `n` new tokens (padding) are written into the null block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moe_jax import attention, generate
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.serve.pages import NULL_BLOCK

FP8 = jnp.float8_e4m3fn
_FP8_MAX = float(jnp.finfo(FP8).max)


def slot_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{leaf: per-token shape} of one layer's cache, from the model's own cache definition."""
  shapes = jax.eval_shape(lambda: attention.init_cache(cfg, 1, 1))
  return {name: tuple(leaf.shape[2:]) for name, leaf in shapes.items()}


def values_per_token(cfg: ModelConfig) -> int:
  """Cached values per token per layer (MLA: kv_lora_rank + qk_rope_head_dim)."""
  return sum(int(np.prod(shape)) for shape in slot_shapes(cfg).values())


def init_pool(cfg: ModelConfig, num_blocks: int, block_size: int, fp8: bool = False) -> dict:
  dtype = FP8 if fp8 else jnp.dtype(cfg.dtype)

  def layer():  # fresh arrays per layer: the step donates the pool, and a buffer only once
    leaves = {}
    for name, shape in slot_shapes(cfg).items():
      leaves[name] = jnp.zeros((num_blocks, block_size) + shape, dtype)
      if fp8:
        leaves[name + "_scale"] = jnp.ones((num_blocks, block_size), jnp.float32)
    return leaves
  return {f"layer_{i}": layer() for i in range(cfg.num_layers)}


def bytes_per_token(pool: dict) -> int:
  """Bytes one token's slot takes over all layers (scales included)."""
  total = 0
  for layer in pool.values():
    for leaf in layer.values():
      total += leaf.dtype.itemsize * int(np.prod(leaf.shape[2:]))
  return total


def _quantize(x_NxF: jax.Array) -> tuple[jax.Array, jax.Array]:
  axes = tuple(range(2, x_NxF.ndim))
  amax = jnp.max(jnp.abs(x_NxF.astype(jnp.float32)), axis=axes)
  scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
  expand = scale.reshape(scale.shape + (1,) * len(axes))
  return (x_NxF.astype(jnp.float32) / expand).astype(FP8), scale


def _gather(layer: dict, tables_BxW: jax.Array, dtype) -> dict:
  view = {}
  for name, leaf in layer.items():
    if name.endswith("_scale"):
      continue
    blocks = leaf[tables_BxW]  # [B, W, bs, *slot]
    if name + "_scale" in layer:
      scale = layer[name + "_scale"][tables_BxW]
      blocks = blocks.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * (blocks.ndim - 3))
    B, W, bs = blocks.shape[:3]
    view[name] = blocks.reshape((B, W * bs) + blocks.shape[3:]).astype(dtype)
  return view


def _scatter(layer: dict, view: dict, tables_BxW, pos_B, n_B, T: int) -> dict:
  bs = next(iter(layer.values())).shape[1]
  t_BxT = jnp.arange(T, dtype=jnp.int32)[None, :]
  p_BxT = pos_B[:, None] + t_BxT
  column_BxT = jnp.minimum(p_BxT // bs, tables_BxW.shape[1] - 1)
  block_BxT = jnp.take_along_axis(tables_BxW, column_BxT, axis=1)
  block_BxT = jnp.where(t_BxT < n_B[:, None], block_BxT, NULL_BLOCK)
  offset_BxT = p_BxT % bs
  out = dict(layer)
  for name, full in view.items():
    # Padding rows may lie past the view; clipping reads finite data for the null block (a NaN
    # there would reach every sequence: masked slots still multiply their values by zero).
    index = p_BxT.reshape(p_BxT.shape + (1,) * (full.ndim - 2))
    rows = jnp.take_along_axis(full, index, axis=1, mode="clip")
    if name + "_scale" in layer:
      rows, scale = _quantize(rows)
      out[name + "_scale"] = layer[name + "_scale"].at[block_BxT, offset_BxT].set(scale)
    out[name] = layer[name].at[block_BxT, offset_BxT].set(rows.astype(layer[name].dtype))
  return out


@functools.partial(jax.jit, static_argnums=(7, 8, 9), donate_argnums=(2,))
def step(params, moe_state, pool, tokens_BxT, pos_B, n_B, tables_BxW, model_cfg: ModelConfig,
         moe_cfg: MoEConfig, record_routes: bool = False):
  """Feeds T tokens per sequence (the first n_B real) at positions pos_B.. -> (logits of each
  sequence's last real token [B, V] float32, pool), and with record_routes the experts every
  new token chose in each MoE block of the main model, [B, T, L, K] int32 (rows past n_B are
  padding)."""
  logits_BxTxV, pool, routes_BxTxLxK, _ = _forward(params, moe_state, pool, tokens_BxT, pos_B,
                                                   n_B, tables_BxW, model_cfg, moe_cfg)
  last_B = jnp.maximum(n_B - 1, 0)
  logits_BxV = jnp.take_along_axis(logits_BxTxV, last_B[:, None, None], axis=1)[:, 0]
  return (logits_BxV, pool, routes_BxTxLxK) if record_routes else (logits_BxV, pool)


@functools.partial(jax.jit, static_argnums=(7, 8), donate_argnums=(2,))
def verify(params, moe_state, pool, tokens_BxT, pos_B, n_B, tables_BxW, model_cfg: ModelConfig,
           moe_cfg: MoEConfig):
  """`step` that keeps every position (speculative decoding's verification): -> (logits
  [B, T, V] float32, the last block's output [B, T, D], pool, routes [B, T, L, K])."""
  logits_BxTxV, pool, routes_BxTxLxK, hidden_BxTxD = _forward(
      params, moe_state, pool, tokens_BxT, pos_B, n_B, tables_BxW, model_cfg, moe_cfg)
  return logits_BxTxV, hidden_BxTxD, pool, routes_BxTxLxK


def _forward(params, moe_state, pool, tokens_BxT, pos_B, n_B, tables_BxW, model_cfg, moe_cfg):
  T = tokens_BxT.shape[1]
  views = {name: _gather(layer, tables_BxW, model_cfg.dtype) for name, layer in pool.items()}
  logits_BxTxV, views, routes_BxTxLxK, hidden_BxTxD = generate.forward_cached_hidden(
      params, moe_state, tokens_BxT, pos_B, views, model_cfg, moe_cfg)
  pool = {name: _scatter(pool[name], views[name], tables_BxW, pos_B, n_B, T) for name in pool}
  return logits_BxTxV, pool, routes_BxTxLxK, hidden_BxTxD


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_block(pool, src, dst):
  return jax.tree.map(lambda leaf: leaf.at[dst].set(leaf[src]), pool)


@functools.partial(jax.jit, donate_argnums=(0,))
def write_block(pool, block, data):
  return jax.tree.map(lambda leaf, new: leaf.at[block].set(new.astype(leaf.dtype)), pool, data)


def _stored_dtype(dtype) -> np.dtype:
  """float8 / bfloat16 (ml_dtypes, numpy kind 'V') as unsigned ints of their width: .npz keeps
  those, while it would read ml_dtypes back as raw void bytes."""
  dtype = np.dtype(dtype)
  return np.dtype(f"u{dtype.itemsize}") if dtype.kind == "V" else dtype


def read_block(pool, block: int) -> dict[str, np.ndarray]:
  """A block's data over all layers as host arrays, {"<layer>/<leaf>": [block_size, *slot]}
  (float8 and bfloat16 leaves as their bits, which .npz can hold)."""
  out = {}
  for layer_name, layer in pool.items():
    for name, leaf in layer.items():
      value = np.asarray(leaf[block])
      out[f"{layer_name}/{name}"] = value.view(_stored_dtype(value.dtype))
  return out


def block_spec(pool) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{name: (dtype, shape)} of read_block's arrays: what a block read back must be."""
  spec = {}
  for layer_name, layer in pool.items():
    for name, leaf in layer.items():
      spec[f"{layer_name}/{name}"] = (_stored_dtype(leaf.dtype), tuple(leaf.shape[1:]))
  return spec


def block_from_host(pool, arrays: dict[str, np.ndarray]) -> dict:
  """read_block's arrays back into the pool's tree and dtypes."""
  data = {}
  for layer_name, layer in pool.items():
    data[layer_name] = {}
    for name, leaf in layer.items():
      value = arrays[f"{layer_name}/{name}"]
      data[layer_name][name] = value.view(leaf.dtype) if value.dtype != leaf.dtype else value
  return data


def host(x) -> np.ndarray:
  """A step's output on this host; with several processes, gathered from all of them (every
  process runs the same loop on the same requests, so all take the same decisions)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
