"""Scaled FP8 quantization on ml_dtypes types: `quantize`, `dequantize` and their pieces.

Quantization maps x to `q = saturate(round_to_nearest_even(x / scale))` in an ml_dtypes FP8 type
(`float8_e4m3fn`, max 448, or `float8_e5m2`, max 57344), so `x ~= q * scale`. `scale` is float32
with one entry per block of the last two dims (`block_shape`, ragged edge blocks allowed, leading
dims are batch dims with their own scales) or one for the whole tensor (`block_shape=None`):
`scale = amax(block) / max_finite`, 1 for an all-zero block, optionally rounded up to 2^k.

Platform facts (XLA:CPU, jax 0.10.2): FP8 dot_general upcasts to float32, so the numerics are
exact FP8 rounding at float32 speed; casts to FP8 round to nearest even but do not saturate
(overflow gives nan in e4m3fn, inf in e5m2), hence the explicit clip; float32 subnormals are
flushed to zero, hence scales are kept >= 2^-126; division by a broadcast becomes a multiply by
the reciprocal (1 ulp off), hence `_divide`. The VJP of a cast to FP8 casts the cotangent to
FP8 *unscaled* (small gradients become 0, large ones nan): never differentiate through `quantize`;
wrap FP8 transport (e.g. expert dispatch) in a custom VJP, as fp8.py's products do.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

BlockShape = Optional[tuple[int, int]]

FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
# Smallest normal float32: XLA:CPU flushes subnormals, so a smaller scale would divide by zero.
_MIN_SCALE = 2.0 ** -126


def max_finite(dtype) -> float:
  """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
  return float(jnp.finfo(dtype).max)


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b, correctly rounded. XLA rewrites division by a broadcast into multiplication by its
  reciprocal (up to 1 ulp off, so scales and FP8 values would hinge on pattern matching); the
  barrier hides the broadcast, at the cost of materializing b at a's shape."""
  return a / lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _num_blocks(shape: tuple[int, ...], block_shape: tuple[int, int]) -> tuple[int, int]:
  (M, N), (bm, bn) = shape[-2:], block_shape
  return -(-M // bm), -(-N // bn)


def _check(x: jax.Array, block_shape: BlockShape):
  if block_shape is None:
    return
  if x.ndim < 2:
    raise ValueError(f"block_shape={block_shape} needs an array of rank >= 2, got {x.shape}")
  if len(block_shape) != 2 or min(block_shape) <= 0:
    raise ValueError(f"block_shape={block_shape}: must be None or two positive integers")


def block_amax(x: jax.Array, block_shape: BlockShape) -> jax.Array:
  """max |x| per block of the last two dims ([..., ceil(M/bm), ceil(N/bn)]), or a scalar."""
  _check(x, block_shape)
  x = jnp.abs(x.astype(jnp.float32))
  if block_shape is None:
    return jnp.max(x)
  (Mb, Nb), (bm, bn) = _num_blocks(x.shape, block_shape), block_shape
  M, N = x.shape[-2:]
  # Zero padding cannot raise an amax, so ragged edge blocks need no mask.
  pad = [(0, 0)] * (x.ndim - 2) + [(0, Mb * bm - M), (0, Nb * bn - N)]
  x = jnp.pad(x, pad).reshape(x.shape[:-2] + (Mb, bm, Nb, bn))
  return jnp.max(x, axis=(-3, -1))


def compute_scale(amax: jax.Array, dtype, power_of_two: bool = False) -> jax.Array:
  """float32 scale = amax / max_finite(dtype); 1 where amax is 0; optionally rounded up to 2^k."""
  amax = amax.astype(jnp.float32)
  scale = _divide(amax, jnp.float32(max_finite(dtype)))
  scale = jnp.where(amax > 0, jnp.maximum(scale, _MIN_SCALE), 1.0).astype(jnp.float32)
  if power_of_two:
    # Rounding up the mantissa bits of a positive normal float is an exact ceil to 2^k.
    bits = lax.bitcast_convert_type(scale, jnp.int32)
    bits = (bits + 0x7FFFFF) & jnp.int32(-0x800000)
    scale = lax.bitcast_convert_type(bits, jnp.float32)
  return scale


def expand(scale: jax.Array, block_shape: BlockShape, shape: tuple[int, ...]) -> jax.Array:
  """Repeats per-block scales to the full shape of the quantized array (`shape`)."""
  if block_shape is None:
    return scale
  (M, N), (bm, bn) = shape[-2:], block_shape
  full = jnp.repeat(jnp.repeat(scale, bm, axis=-2), bn, axis=-1)
  return full[..., :M, :N]


def quantize_with_scale(x: jax.Array, scale: jax.Array, *, dtype=jnp.float8_e4m3fn,
                        block_shape: BlockShape = (1, 128)) -> jax.Array:
  """Casts x / scale to dtype, rounding to nearest even and saturating at +-max_finite."""
  _check(x, block_shape)
  fmax = max_finite(dtype)
  y = _divide(x.astype(jnp.float32), expand(scale.astype(jnp.float32), block_shape, x.shape))
  return jnp.clip(y, -fmax, fmax).astype(dtype)


def quantize(x: jax.Array, *, dtype=jnp.float8_e4m3fn, block_shape: BlockShape = (1, 128),
             power_of_two: bool = False) -> tuple[jax.Array, jax.Array]:
  """Returns (q, scale) with x ~= q * scale, scales from each block's current amax.

  block_shape=(1, 128) gives DeepSeek-V3's activation tiles (one scale per row per 128
  columns), (128, 128) its weight blocks, None one scale for the whole tensor. Works for any
  [..., M, N] (e.g. dispatch rows [T, D], D a multiple of 128 or not).
  """
  scale = compute_scale(block_amax(x, block_shape), dtype, power_of_two)
  return quantize_with_scale(x, scale, dtype=dtype, block_shape=block_shape), scale


def dequantize(q: jax.Array, scale: jax.Array, *, block_shape: BlockShape = (1, 128),
               out_dtype=jnp.float32) -> jax.Array:
  """q * scale in float32 (block scales repeated over their blocks), cast to out_dtype."""
  _check(q, block_shape)
  full = expand(scale.astype(jnp.float32), block_shape, q.shape)
  return (q.astype(jnp.float32) * full).astype(out_dtype)


def quantization_error(x: jax.Array, *, block_shape: BlockShape = (1, 128),
                       dtype=jnp.float8_e4m3fn, power_of_two: bool = False,
                       where: Optional[jax.Array] = None) -> jax.Array:
  """Relative error ||dequantize(quantize(x)) - x|| / ||x|| (over `where` only, if given)."""
  q, scale = quantize(x, dtype=dtype, block_shape=block_shape, power_of_two=power_of_two)
  x32 = x.astype(jnp.float32)
  err = dequantize(q, scale, block_shape=block_shape) - x32
  if where is not None:
    err, x32 = jnp.where(where, err, 0.0), jnp.where(where, x32, 0.0)
  return jnp.linalg.norm(err) / jnp.linalg.norm(x32)
