"""Causal self-attention: MHA/GQA ("mha") and DeepSeek-V2/V3 Multi-head Latent Attention ("mla").

Pure functions on plain parameter dicts, then a thin Flax `Attention` module that creates the
same parameters with logical axis names. One table, `param_specs(cfg)`, gives every parameter's
shape and logical axes; both `init_params` and the module read it.

Shapes: B batch, T new tokens, S key slots (T without a cache, max_len with one), D embed,
H heads, G kv heads ("mha"), K head dim, Q q_lora_rank, C kv_lora_rank, N qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim.

MLA (V3 layout). Query: x -> wq [D,H,N+R] or, with q_lora_rank > 0, x -> wq_a [D,Q] -> q_norm
-> wq_b [Q,H,N+R]; RoPE on its last R dims. Keys/values: x -> wkv_a [D,C+R] -> (latent c, k_rope);
c -> kv_norm; RoPE on k_rope, a single key shared by all heads; wkv_b [C,H,N+V] expands c into
per-head nope keys and values. Scores scaled by 1/sqrt(N+R) (times YaRN's mscale^2, if set).

Two equivalent MLA forms: "naive" expands the latent into per-head keys and values (cheapest
when every query meets every key once, as in training); "absorbed" folds wkv_b into the query
and output instead, so attention runs in the latent space and the cache is never expanded:
  q_lat = q_nope @ W_UK, scores = q_lat . c + q_rope . k_rope, out = (probs @ c) @ W_UV.

FP8: every projection (wq, wk, wv, wo; wq_a, wq_b, wkv_a, wkv_b) multiplies through
`matmuls` (fp8.Matmuls; default NO_FP8, plain einsums in the compute dtype); scores, softmax and
the attention-weighted sums stay in the compute dtype with float32 scores, as V3 keeps them.
The absorbed form (decoding) always multiplies in the compute dtype.

KV cache: a fixed-size dict per layer, written at `pos` with `dynamic_update_slice`.
  "mla": {"ckv": [B,S,C] normalised latent, "k_rope": [B,S,R] rotated key}: C + R per token.
  "mha": {"k": [B,S,G,K], "v": [B,S,G,K]}.
Slots beyond the last written position are masked by the causal mask over absolute positions,
so prefill (T tokens at pos) and decode (T=1) are the same call. `pos` is one start shared by the
batch (an int or scalar) or one per sequence ([B] int32: the serving engine's batches mix
sequences of different lengths).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import FP8Config, ModelConfig
from moe_jax.fp8 import NO_FP8, Matmuls
from moe_jax.layers import (ROPE_HALF, apply_rope, fp8_matmuls, logical_param, rms_norm,
                            yarn_inv_freq, yarn_mscale)

Params = dict[str, jax.Array]
Cache = dict[str, jax.Array]


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  ones: bool = False  # norm scales start at 1; matrices at N(0, init_std)


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
  """Name -> (shape, logical axes) of every attention parameter of `cfg.attention`."""
  D, H = cfg.embed_dim, cfg.num_heads
  if cfg.attention == "mha":
    G, K = cfg.num_kv_heads, cfg.head_dim
    return {
        "wq": ParamSpec((D, H, K), ("embed", "heads", "head_dim")),
        "wk": ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((H, K, D), ("heads", "head_dim", "embed")),
    }
  Q, C = cfg.q_lora_rank, cfg.kv_lora_rank
  N, R, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  if Q > 0:
    specs = {
        "wq_a": ParamSpec((D, Q), ("embed", "q_lora")),
        "q_norm": ParamSpec((Q,), ("q_lora",), ones=True),
        "wq_b": ParamSpec((Q, H, N + R), ("q_lora", "heads", "head_dim")),
    }
  else:
    specs = {"wq": ParamSpec((D, H, N + R), ("embed", "heads", "head_dim"))}
  specs.update({
      "wkv_a": ParamSpec((D, C + R), ("embed", "kv_lora")),
      "kv_norm": ParamSpec((C,), ("kv_lora",), ones=True),
      "wkv_b": ParamSpec((C, H, N + V), ("kv_lora", "heads", "head_dim")),
      "wo": ParamSpec((H, V, D), ("heads", "head_dim", "embed")),
  })
  return specs


def _initializer(spec: ParamSpec, cfg: ModelConfig):
  if spec.ones:
    return nn.initializers.ones
  return nn.initializers.normal(stddev=cfg.init_std)


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
  """Float32 parameters for the pure functions (same shapes as the Flax module's)."""
  specs = param_specs(cfg)
  keys = jax.random.split(key, len(specs))
  return {name: _initializer(spec, cfg)(k, spec.shape, jnp.float32)
          for k, (name, spec) in zip(keys, specs.items())}


def init_cache(cfg: ModelConfig, batch: int, max_len: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty (zero) KV cache for one layer; dtype defaults to the compute dtype."""
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  if cfg.attention == "mha":
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return {"ckv": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
          "k_rope": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype)}


def cache_logical_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Logical axes of `init_cache`'s leaves, for sharding a cache like the activations."""
  if cfg.attention == "mha":
    axes = ("batch", "seq", "kv_heads", "head_dim")
    return {"k": axes, "v": axes}
  return {"ckv": ("batch", "seq", "kv_lora"), "k_rope": ("batch", "seq", "head_dim")}


# ----------------------------------------------------------------------------- shared pieces


def _rope(cfg: ModelConfig, x_BxTxHxK: jax.Array, pos_BxT: jax.Array, layout: str) -> jax.Array:
  """RoPE of cfg: plain, or YaRN when cfg.rope_factor > 1 (frequencies and cos/sin scale as in
  Hugging Face's DeepSeek-V3, so that published checkpoints compute the same)."""
  f = cfg.rope_factor
  if f == 1:
    return apply_rope(x_BxTxHxK, pos_BxT, cfg.rope_theta, layout)
  inv_freq_F = yarn_inv_freq(x_BxTxHxK.shape[-1], cfg.rope_theta, f, cfg.rope_original_max_len,
                             cfg.rope_beta_fast, cfg.rope_beta_slow)
  m, m_all = cfg.rope_mscale, cfg.rope_mscale_all_dim
  scale = yarn_mscale(f, m) / yarn_mscale(f, m_all) if m and m_all else yarn_mscale(f)
  return apply_rope(x_BxTxHxK, pos_BxT, cfg.rope_theta, layout, inv_freq_F=inv_freq_F,
                    scale=scale)


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
  """MLA's 1/sqrt(head_dim), times YaRN's mscale(mscale_all_dim)^2 (in the reference's order)."""
  scale = 1.0 / math.sqrt(head_dim)
  if cfg.rope_factor > 1 and cfg.rope_mscale_all_dim:
    mscale = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    scale = scale * mscale * mscale
  return scale


def _positions(pos, T: int) -> jax.Array:
  """Absolute positions of the T new tokens: [1, T] for a shared start, [B, T] per sequence."""
  pos = jnp.asarray(pos, jnp.int32)
  return pos.reshape(-1, 1) + jnp.arange(T, dtype=jnp.int32)[None, :]


def _write(cache_BxSxF: jax.Array, new_BxTxF: jax.Array, pos) -> jax.Array:
  """Writes T new rows at slot `pos` (shared, or [B] per sequence) of the length axis."""
  def write(cache, new, start):
    zero = jnp.zeros((), jnp.int32)
    index = (start,) + (zero,) * (cache.ndim - 1)
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), index)
  pos = jnp.asarray(pos, jnp.int32)
  if pos.ndim == 0:
    return jax.vmap(write, (0, 0, None))(cache_BxSxF, new_BxTxF, pos)
  return jax.vmap(write)(cache_BxSxF, new_BxTxF, pos)


def _check_fits(pos, T: int, cache: Cache):
  # dynamic_update_slice clamps an out-of-range start and would silently overwrite earlier
  # slots; catch it whenever pos is a Python int (a traced pos is the caller's contract).
  S = next(iter(cache.values())).shape[1]
  if isinstance(pos, int) and not 0 <= pos <= S - T:
    raise ValueError(f"pos={pos}: {T} tokens do not fit a cache of max_len={S}")


def _masked_probs(scores: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Softmax over the last axis in float32 where `mask` holds; cast to the compute dtype."""
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
  """[B or 1, T, S]: key slot s is visible to query t iff its position is <= the query's."""
  return k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]


# ----------------------------------------------------------------------------- MHA / GQA


def mha_apply(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array, pos=0,
              cache: Optional[Cache] = None, *, rope_layout: str = ROPE_HALF,
              matmuls: Matmuls = NO_FP8):
  """Causal MHA with RoPE; GQA when num_kv_heads < num_heads. Returns (y_BxTxD, cache)."""
  dtype = jnp.dtype(cfg.dtype)
  B, T, _ = x_BxTxD.shape
  H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x_BxTxD = x_BxTxD.astype(dtype)
  q_pos_BxT = _positions(pos, T)
  # Projections take the float32 masters: FP8 quantizes them directly, no bfloat16 detour.
  proj = lambda spec, x, name: matmuls.einsum(spec, x, name, params[name])
  q_BxTxHxK = _rope(cfg, proj("btd,dhk->bthk", x_BxTxD, "wq"), q_pos_BxT, rope_layout)
  k_BxTxGxK = _rope(cfg, proj("btd,dgk->btgk", x_BxTxD, "wk"), q_pos_BxT, rope_layout)
  v_BxTxGxK = proj("btd,dgk->btgk", x_BxTxD, "wv")
  if cache is None:
    k_BxSxGxK, v_BxSxGxK, k_pos_BxS = k_BxTxGxK, v_BxTxGxK, q_pos_BxT
  else:
    _check_fits(pos, T, cache)
    cache = {"k": _write(cache["k"], k_BxTxGxK, pos), "v": _write(cache["v"], v_BxTxGxK, pos)}
    k_BxSxGxK, v_BxSxGxK = cache["k"].astype(dtype), cache["v"].astype(dtype)
    k_pos_BxS = jnp.arange(k_BxSxGxK.shape[1], dtype=jnp.int32)[None]

  # Query heads g*H/G .. (g+1)*H/G - 1 share kv head g (HF's repeat_kv order).
  q_BxTxGxMxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
  scores_BxGxMxTxS = jnp.einsum("btgmk,bsgk->bgmts", q_BxTxGxMxK, k_BxSxGxK,
                                preferred_element_type=jnp.float32) / math.sqrt(K)
  if cfg.rope_factor > 1 and cfg.rope_mscale_all_dim:  # YaRN's temperature
    scores_BxGxMxTxS = scores_BxGxMxTxS * yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)**2
  mask_Bx1x1xTxS = _causal_mask(q_pos_BxT, k_pos_BxS)[:, None, None]
  probs_BxGxMxTxS = _masked_probs(scores_BxGxMxTxS, mask_Bx1x1xTxS, dtype)
  out_BxTxGxMxK = jnp.einsum("bgmts,bsgk->btgmk", probs_BxGxMxTxS, v_BxSxGxK)
  y_BxTxD = proj("bthk,hkd->btd", out_BxTxGxMxK.reshape(B, T, H, K), "wo")
  return y_BxTxD, cache


# ----------------------------------------------------------------------------- MLA


def mla_query(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array, pos_BxT: jax.Array,
              rope_layout: str = ROPE_HALF, matmuls: Matmuls = NO_FP8
              ) -> tuple[jax.Array, jax.Array]:
  """(q_nope_BxTxHxN, q_rope_BxTxHxR) in the compute dtype; q_rope is rotated."""
  if cfg.q_lora_rank > 0:
    cq_BxTxQ = matmuls.einsum("btd,dq->btq", x_BxTxD, "wq_a", params["wq_a"])
    cq_BxTxQ = rms_norm(cq_BxTxQ, params["q_norm"], cfg.norm_eps)
    q_BxTxHxE = matmuls.einsum("btq,qhe->bthe", cq_BxTxQ, "wq_b", params["wq_b"])
  else:
    q_BxTxHxE = matmuls.einsum("btd,dhe->bthe", x_BxTxD, "wq", params["wq"])
  N = cfg.qk_nope_head_dim
  q_rope_BxTxHxR = _rope(cfg, q_BxTxHxE[..., N:], pos_BxT, rope_layout)
  return q_BxTxHxE[..., :N], q_rope_BxTxHxR


def mla_latent(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array, pos_BxT: jax.Array,
               rope_layout: str = ROPE_HALF, matmuls: Matmuls = NO_FP8
               ) -> tuple[jax.Array, jax.Array]:
  """(ckv_BxTxC normalised latent, k_rope_BxTxR rotated shared key): what the cache holds."""
  kv_BxTxE = matmuls.einsum("btd,de->bte", x_BxTxD, "wkv_a", params["wkv_a"])
  C = cfg.kv_lora_rank
  ckv_BxTxC = rms_norm(kv_BxTxE[..., :C], params["kv_norm"], cfg.norm_eps)
  k_rope_BxTxR = _rope(cfg, kv_BxTxE[..., C:][:, :, None, :], pos_BxT, rope_layout)[:, :, 0, :]
  return ckv_BxTxC, k_rope_BxTxR


def mla_attend_naive(cfg: ModelConfig, params: Params, q_nope_BxTxHxN, q_rope_BxTxHxR,
                     ckv_BxSxC, k_rope_BxSxR, mask_BxTxS, matmuls: Matmuls = NO_FP8) -> jax.Array:
  """Expands the latent into per-head keys and values. Returns out_BxTxHxV."""
  dtype = q_nope_BxTxHxN.dtype
  N = cfg.qk_nope_head_dim
  kv_BxSxHxE = matmuls.einsum("bsc,che->bshe", ckv_BxSxC, "wkv_b", params["wkv_b"])
  k_nope_BxSxHxN, v_BxSxHxV = kv_BxSxHxE[..., :N], kv_BxSxHxE[..., N:]
  scores_BxHxTxS = (
      jnp.einsum("bthn,bshn->bhts", q_nope_BxTxHxN, k_nope_BxSxHxN,
                 preferred_element_type=jnp.float32) +
      jnp.einsum("bthr,bsr->bhts", q_rope_BxTxHxR, k_rope_BxSxR,
                 preferred_element_type=jnp.float32))
  scale = softmax_scale(cfg, N + cfg.qk_rope_head_dim)
  probs_BxHxTxS = _masked_probs(scores_BxHxTxS * scale, mask_BxTxS[:, None], dtype)
  return jnp.einsum("bhts,bshv->bthv", probs_BxHxTxS, v_BxSxHxV)


def mla_attend_absorbed(cfg: ModelConfig, params: Params, q_nope_BxTxHxN, q_rope_BxTxHxR,
                        ckv_BxSxC, k_rope_BxSxR, mask_BxTxS, matmuls: Matmuls = NO_FP8
                        ) -> jax.Array:
  """Attention in the latent space: W_UK folded into q, W_UV applied after. out_BxTxHxV.
  `matmuls` is unused: the split wkv_b products are per head, not one dense projection."""
  del matmuls
  dtype = q_nope_BxTxHxN.dtype
  N = cfg.qk_nope_head_dim
  wkv_b_CxHxE = params["wkv_b"].astype(dtype)
  w_uk_CxHxN, w_uv_CxHxV = wkv_b_CxHxE[..., :N], wkv_b_CxHxE[..., N:]
  q_lat_BxTxHxC = jnp.einsum("bthn,chn->bthc", q_nope_BxTxHxN, w_uk_CxHxN)
  scores_BxHxTxS = (
      jnp.einsum("bthc,bsc->bhts", q_lat_BxTxHxC, ckv_BxSxC,
                 preferred_element_type=jnp.float32) +
      jnp.einsum("bthr,bsr->bhts", q_rope_BxTxHxR, k_rope_BxSxR,
                 preferred_element_type=jnp.float32))
  scale = softmax_scale(cfg, N + cfg.qk_rope_head_dim)
  probs_BxHxTxS = _masked_probs(scores_BxHxTxS * scale, mask_BxTxS[:, None], dtype)
  out_lat_BxTxHxC = jnp.einsum("bhts,bsc->bthc", probs_BxHxTxS, ckv_BxSxC)
  return jnp.einsum("bthc,chv->bthv", out_lat_BxTxHxC, w_uv_CxHxV)


def mla_apply(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array, pos=0,
              cache: Optional[Cache] = None, *, absorb: Optional[bool] = None,
              rope_layout: str = ROPE_HALF, matmuls: Matmuls = NO_FP8):
  """Causal MLA. Returns (y_BxTxD, cache).

  absorb=None picks the absorbed form with a cache (decoding: per-head keys never exist) and
  the naive form without one (training); True/False forces a form.
  """
  dtype = jnp.dtype(cfg.dtype)
  T = x_BxTxD.shape[1]
  x_BxTxD = x_BxTxD.astype(dtype)
  q_pos_BxT = _positions(pos, T)
  q_nope_BxTxHxN, q_rope_BxTxHxR = mla_query(cfg, params, x_BxTxD, q_pos_BxT, rope_layout,
                                             matmuls)
  ckv_BxSxC, k_rope_BxSxR = mla_latent(cfg, params, x_BxTxD, q_pos_BxT, rope_layout, matmuls)
  k_pos_BxS = q_pos_BxT
  if cache is not None:
    _check_fits(pos, T, cache)
    cache = {"ckv": _write(cache["ckv"], ckv_BxSxC, pos),
             "k_rope": _write(cache["k_rope"], k_rope_BxSxR, pos)}
    ckv_BxSxC, k_rope_BxSxR = cache["ckv"].astype(dtype), cache["k_rope"].astype(dtype)
    k_pos_BxS = jnp.arange(ckv_BxSxC.shape[1], dtype=jnp.int32)[None]
  if absorb is None:
    absorb = cache is not None
  attend = mla_attend_absorbed if absorb else mla_attend_naive
  out_BxTxHxV = attend(cfg, params, q_nope_BxTxHxN, q_rope_BxTxHxR, ckv_BxSxC, k_rope_BxSxR,
                       _causal_mask(q_pos_BxT, k_pos_BxS), matmuls)
  y_BxTxD = matmuls.einsum("bthv,hvd->btd", out_BxTxHxV, "wo", params["wo"])
  return y_BxTxD, cache


def attention_apply(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array, pos=0,
                    cache: Optional[Cache] = None, *, rope_layout: str = ROPE_HALF,
                    matmuls: Matmuls = NO_FP8):
  """Dispatches on cfg.attention to `mla_apply` or `mha_apply`. Returns (y_BxTxD, cache)."""
  if cfg.attention == "mha":
    return mha_apply(cfg, params, x_BxTxD, pos, cache, rope_layout=rope_layout, matmuls=matmuls)
  return mla_apply(cfg, params, x_BxTxD, pos, cache, rope_layout=rope_layout, matmuls=matmuls)


# ----------------------------------------------------------------------------- Flax


class Attention(nn.Module):
  """Causal self-attention of kind `cfg.attention`, parameters from `param_specs(cfg)`.

  `Attention(cfg)(x_BxTxD, pos=0, cache=None) -> (y_BxTxD, cache)`
    training:   `y, _ = Attention(cfg)(x)` (positions 0..T-1, returned cache is None);
    generation: `cache = init_cache(cfg, B, max_len)` per layer, then
                `y, cache = Attention(cfg)(x, pos=pos, cache=cache)` for a prefill of T tokens
                at `pos` and for each 1-token decode step. `pos` may be traced.
  The cache is an explicit input/output (no mutable collection), so a model can carry one per
  layer through `jax.lax.scan` or a Python loop.
  """
  cfg: ModelConfig
  rope_layout: str = ROPE_HALF
  fp8_cfg: FP8Config = FP8Config()  # recipe of the projections (not of scores or softmax)

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, pos=0, cache: Optional[Cache] = None):
    specs = param_specs(self.cfg)
    params = {name: logical_param(self, name, _initializer(spec, self.cfg), spec.shape,
                                  spec.axes)
              for name, spec in specs.items()}
    matmuls = fp8_matmuls(self, [n for n, s in specs.items() if not s.ones], self.fp8_cfg)
    return attention_apply(self.cfg, params, x_BxTxD, pos, cache, rope_layout=self.rope_layout,
                           matmuls=matmuls)
