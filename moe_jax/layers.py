"""Small shared building blocks: RMSNorm and rotary position embeddings (RoPE).

Pure functions first, then a thin Flax `RMSNorm` that owns its scale with a logical axis name.
Normalisation and the rotation run in float32 and cast back to the input dtype, so bfloat16
activations lose nothing to them.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# RoPE layouts. "half" rotates dimension i with i + K/2 (rotate-half, as HF Llama/DeepSeek apply
# after their permute); "interleaved" rotates (2i, 2i+1) as DeepSeek-V3's reference inference
# code does with complex numbers. Converting a checkpoint between them is a fixed permutation of
# the rope output rows of wq/wq_b and wkv_a.
ROPE_HALF = "half"
ROPE_INTERLEAVED = "interleaved"
ROPE_LAYOUTS = (ROPE_HALF, ROPE_INTERLEAVED)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the last axis; computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = jnp.reshape(scale.astype(jnp.float32), (1,) * (x.ndim - 1) + scale.shape)
  return (x32 * inv * scale).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  """Angular frequencies theta^(-2i/head_dim), i < head_dim/2, float32."""
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float,
               layout: str = ROPE_HALF) -> jax.Array:
  """Rotates each pair of x's last axis by position * frequency.

  positions_BxT may have a leading 1 (shared by the batch). Heads share the rotation. The
  rotation runs in float32 (angles of long positions need it) and returns x's dtype.
  """
  if layout not in ROPE_LAYOUTS:
    raise ValueError(f"rope layout={layout!r}: must be one of {ROPE_LAYOUTS}")
  K = x_BxTxHxK.shape[-1]
  inv_freq_F = rope_inv_freq(K, theta)
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
  cos_BxTx1xF = jnp.cos(angle_BxTxF)[:, :, None, :]
  sin_BxTx1xF = jnp.sin(angle_BxTxF)[:, :, None, :]
  x32 = x_BxTxHxK.astype(jnp.float32)
  if layout == ROPE_HALF:
    x1, x2 = x32[..., :K // 2], x32[..., K // 2:]
  else:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
  r1 = x1 * cos_BxTx1xF - x2 * sin_BxTx1xF
  r2 = x2 * cos_BxTx1xF + x1 * sin_BxTx1xF
  if layout == ROPE_HALF:
    out = jnp.concatenate([r1, r2], axis=-1)
  else:
    out = jnp.stack([r1, r2], axis=-1).reshape(x32.shape)
  return out.astype(x_BxTxHxK.dtype)


def logical_param(module: nn.Module, name: str, init_fn, shape: Sequence[int],
                  axes: Sequence[str]) -> jax.Array:
  """A float32 parameter of `module` boxed with logical axis names (unboxed on read)."""
  return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), tuple(shape),
                      jnp.float32)


class RMSNorm(nn.Module):
  """RMSNorm with a float32 `scale` of shape [dim] on logical axis `axis_name`.

  `RMSNorm(eps, axis_name)(x) -> x / rms(x) * scale`, in x's dtype.
  """
  eps: float = 1e-6
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
    return rms_norm(x, scale, self.eps)
