"""Small shared building blocks: RMSNorm and rotary position embeddings (RoPE).

Pure functions first, then a thin Flax `RMSNorm` that owns its scale with a logical axis name.
Normalisation and the rotation run in float32 and cast back to the input dtype, so bfloat16
activations lose nothing to them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import fp8
from moe_jax.config import FP8Config

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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature term 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_len: int,
                  beta_fast: float, beta_slow: float) -> np.ndarray:
  """YaRN frequencies [head_dim/2] float32, computed step by step in float32 as the reference
  (Hugging Face's DeepSeek-V3) does, so loaded checkpoints rotate by the very same angles.

  Dims turning more than beta_fast times over the original context keep their frequency, those
  turning less than beta_slow times are divided by `factor`, with a linear ramp in between.
  """
  def correction_dim(rotations):
    return (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))) / (
        2 * math.log(theta))
  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
  f32 = np.float32
  pos_freqs = f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
  ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) /
                 f32(high - low if high != low else 0.001), 0, 1).astype(f32)
  keep = f32(1) - ramp  # share of the original frequency
  return (f32(1) / (f32(factor) * pos_freqs) * (f32(1) - keep) +
          f32(1) / pos_freqs * keep).astype(f32)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float,
               layout: str = ROPE_HALF, *, inv_freq_F: Optional[np.ndarray] = None,
               scale: float = 1.0) -> jax.Array:
  """Rotates each pair of x's last axis by position * frequency.

  positions_BxT may have a leading 1 (shared by the batch). Heads share the rotation. The
  rotation runs in float32 (angles of long positions need it) and returns x's dtype.
  inv_freq_F replaces the plain frequencies of `theta` (YaRN), and `scale` multiplies cos and sin.
  """
  if layout not in ROPE_LAYOUTS:
    raise ValueError(f"rope layout={layout!r}: must be one of {ROPE_LAYOUTS}")
  K = x_BxTxHxK.shape[-1]
  inv_freq_F = rope_inv_freq(K, theta) if inv_freq_F is None else jnp.asarray(inv_freq_F)
  angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
  cos_BxTx1xF = jnp.cos(angle_BxTxF)[:, :, None, :]
  sin_BxTx1xF = jnp.sin(angle_BxTxF)[:, :, None, :]
  if scale != 1.0:
    cos_BxTx1xF, sin_BxTx1xF = cos_BxTx1xF * scale, sin_BxTx1xF * scale
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


def fp8_matmuls(module: nn.Module, names: Sequence[str], cfg: FP8Config,
                groups: Optional[int] = None) -> fp8.Matmuls:
  """The FP8 matmuls of `module`'s matrices `names`. For "delayed", each has an amax-history
  state in the "fp8" collection under the parameter's own name (so the state tree mirrors the
  parameter tree), [L] or, for stacked expert matrices, [groups, L]; the caller differentiates
  the loss w.r.t. it and takes that as the update."""
  if cfg.recipe != "delayed":
    return fp8.Matmuls(cfg)
  return fp8.Matmuls(cfg, {n: module.variable("fp8", n, fp8.init_delayed_state,
                                              cfg.amax_history_len, groups).value
                           for n in names})


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
