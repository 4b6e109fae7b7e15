"""Attention: RoPE, MHA/GQA and MLA (naive vs absorbed), KV cache, causality, dtypes, Flax."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import attention
from moe_jax import layers
from moe_jax.config import ModelConfig

# Weights larger than the default 0.02 so outputs are O(1) and tolerances mean something.
_BASE = dict(embed_dim=32, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8, head_dim=8, init_std=0.2)
CONFIGS = {
    "mla": ModelConfig(attention="mla", q_lora_rank=0, **_BASE),
    "mla_qlora": ModelConfig(attention="mla", q_lora_rank=12, **_BASE),
    "mha_gqa": ModelConfig(attention="mha", num_kv_heads=2, **_BASE),
}
MLA_CONFIGS = ("mla", "mla_qlora")

# Jitted once per config and shape: far fewer compilations than running op by op.
apply = jax.jit(attention.attention_apply, static_argnums=0, static_argnames="rope_layout")
mla_apply = jax.jit(attention.mla_apply, static_argnums=0,
                    static_argnames=("absorb", "rope_layout"))


def _setup(name, batch=2, seq=8, seed=0):
  cfg = CONFIGS[name]
  params = attention.init_params(jax.random.key(seed), cfg)
  x_BxTxD = jax.random.normal(jax.random.key(seed + 1), (batch, seq, cfg.embed_dim))
  return cfg, params, x_BxTxD


def _rope_numpy(x_TxK, positions_T, theta, layout):
  """Reference: each pair is a complex number multiplied by exp(i * pos * freq), float64."""
  x = np.asarray(x_TxK, np.float64)
  K = x.shape[-1]
  freq = theta ** (-np.arange(0, K, 2) / K)
  rot = np.exp(1j * np.asarray(positions_T, np.float64)[:, None] * freq[None, :])
  if layout == layers.ROPE_HALF:
    lo, hi = np.arange(K // 2), np.arange(K // 2) + K // 2
  else:
    lo, hi = np.arange(0, K, 2), np.arange(1, K, 2)
  z = (x[:, lo] + 1j * x[:, hi]) * rot
  out = np.empty_like(x)
  out[:, lo], out[:, hi] = z.real, z.imag
  return out


@pytest.mark.parametrize("layout", layers.ROPE_LAYOUTS)
def test_rope_matches_numpy_reference(layout):
  x_1xTx1xK = jax.random.normal(jax.random.key(0), (1, 6, 1, 8))
  positions_1xT = jnp.array([[0, 1, 2, 7, 100, 4095]])
  got = layers.apply_rope(x_1xTx1xK, positions_1xT, 10000.0, layout)
  want = _rope_numpy(x_1xTx1xK[0, :, 0], positions_1xT[0], 10000.0, layout)
  np.testing.assert_allclose(got[0, :, 0], want, atol=1e-5)


@pytest.mark.parametrize("layout", layers.ROPE_LAYOUTS)
def test_rope_score_depends_only_on_offset(layout):
  q_1x1x1xK, k_1x1x1xK = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 8))

  def score(m, n):
    q = layers.apply_rope(q_1x1x1xK, jnp.array([[m]]), 10000.0, layout)
    k = layers.apply_rope(k_1x1x1xK, jnp.array([[n]]), 10000.0, layout)
    return float(jnp.sum(q * k))

  for offset in (0, 3, 17):
    scores = [score(start + offset, start) for start in (0, 5, 64, 1000)]
    np.testing.assert_allclose(scores, scores[0], atol=1e-4)
  assert abs(score(3, 0) - score(0, 0)) > 1e-3  # the offset does matter


@pytest.mark.parametrize("name", MLA_CONFIGS)
def test_mla_absorbed_equals_naive(name):
  cfg, params, x_BxTxD = _setup(name)
  naive, _ = mla_apply(cfg, params, x_BxTxD, absorb=False)
  absorbed, _ = mla_apply(cfg, params, x_BxTxD, absorb=True)
  assert float(jnp.std(naive)) > 0.1
  np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=1e-5)
  # Also over a partly filled cache (unfilled slots must be masked in both forms).
  cache = attention.init_cache(cfg, 2, 12)
  naive_c, _ = mla_apply(cfg, params, x_BxTxD, 2, cache, absorb=False)
  absorbed_c, _ = mla_apply(cfg, params, x_BxTxD, 2, cache, absorb=True)
  np.testing.assert_allclose(absorbed_c, naive_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_per_token_size(name):
  cfg, params, x_BxTxD = _setup(name, batch=3, seq=4)
  B, S = 3, 10
  cache = attention.init_cache(cfg, B, S)
  per_token = sum(leaf.size // (B * S) for leaf in jax.tree.leaves(cache))
  if cfg.attention == "mla":
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
  else:
    assert per_token == 2 * cfg.num_kv_heads * cfg.head_dim
  _, new_cache = apply(cfg, params, x_BxTxD, 0, cache)
  assert jax.tree.map(jnp.shape, new_cache) == jax.tree.map(jnp.shape, cache)
  assert set(attention.cache_logical_axes(cfg)) == set(cache)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
  cfg, params, x_BxTxD = _setup(name)
  T = x_BxTxD.shape[1]
  full, _ = apply(cfg, params, x_BxTxD)
  cache = attention.init_cache(cfg, 2, T + 3)  # slots past T stay empty throughout
  outs = []
  # Two prefill chunks (the second at pos > 0), then one token at a time; pos is traced, so
  # the decode steps share one compilation.
  for start, stop in [(0, 3), (3, 5)] + [(t, t + 1) for t in range(5, T)]:
    y, cache = apply(cfg, params, x_BxTxD[:, start:stop], jnp.int32(start), cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
  cfg, params, x_BxTxD = _setup(name)
  t = 4
  y, _ = apply(cfg, params, x_BxTxD)
  x2 = x_BxTxD.at[:, t].add(1.0)
  y2, _ = apply(cfg, params, x2)
  np.testing.assert_allclose(y2[:, :t], y[:, :t], atol=1e-6)
  assert float(jnp.max(jnp.abs(y2[:, t] - y[:, t]))) > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_close_to_float32(name):
  cfg, params, x_BxTxD = _setup(name)
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  y32, _ = apply(cfg, params, x_BxTxD)
  y16, _ = apply(cfg16, params, x_BxTxD)
  assert y16.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(y32)))
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05 * scale)
  # A bfloat16 cache: prefill then one decode step.
  cache = attention.init_cache(cfg16, 2, 10)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(cache))
  _, cache = apply(cfg16, params, x_BxTxD[:, :7], 0, cache)
  y_last, _ = apply(cfg16, params, x_BxTxD[:, 7:], 7, cache)
  np.testing.assert_allclose(y_last.astype(jnp.float32), y32[:, 7:], atol=0.05 * scale)


def test_interleaved_layout_is_a_permutation_of_half():
  # Checkpoint interop: an interleaved-RoPE model equals a half-RoPE one whose rope output
  # columns (in wq and wkv_a) are permuted evens-then-odds.
  cfg, params, x_BxTxD = _setup("mla")
  N, R, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
  perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])
  permuted = dict(params)
  permuted["wq"] = params["wq"].at[..., N:].set(params["wq"][..., N + perm])
  permuted["wkv_a"] = params["wkv_a"].at[..., C:].set(params["wkv_a"][..., C + perm])
  y_inter, _ = mla_apply(cfg, params, x_BxTxD,
                                   rope_layout=layers.ROPE_INTERLEAVED)
  y_half, _ = mla_apply(cfg, permuted, x_BxTxD, rope_layout=layers.ROPE_HALF)
  np.testing.assert_allclose(y_inter, y_half, atol=1e-5)
  y_plain, _ = mla_apply(cfg, params, x_BxTxD)
  assert float(jnp.max(jnp.abs(y_plain - y_inter))) > 1e-3


@pytest.mark.parametrize("name", ["mla_qlora", "mha_gqa"])
def test_flax_module_params_and_outputs(name):
  cfg, _, x_BxTxD = _setup(name)
  module = attention.Attention(cfg)
  boxed = module.init(jax.random.key(0), x_BxTxD)["params"]
  specs = attention.param_specs(cfg)
  assert set(boxed) == set(specs)
  for pname, spec in specs.items():
    assert boxed[pname].names == spec.axes
    assert boxed[pname].value.shape == spec.shape
    assert boxed[pname].value.dtype == jnp.float32
  params = nn.unbox(boxed)
  module_apply = jax.jit(module.apply)
  y, none = module_apply({"params": params}, x_BxTxD)
  want, _ = apply(cfg, params, x_BxTxD)
  assert none is None
  np.testing.assert_allclose(y, want, atol=1e-6)
  cache = attention.init_cache(cfg, 2, 8)
  y_c, cache = module_apply({"params": params}, x_BxTxD[:, :6], pos=0, cache=cache)
  np.testing.assert_allclose(y_c, want[:, :6], atol=1e-5)


def test_prefill_past_cache_end_raises():
  cfg, params, x_BxTxD = _setup("mla")
  cache = attention.init_cache(cfg, 2, 8)
  with pytest.raises(ValueError, match="max_len=8"):
    attention.mla_apply(cfg, params, x_BxTxD[:, :3], 6, cache)  # a Python int pos is checked
