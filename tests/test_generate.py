"""Generation: cached decoding equals the full forward (MLA and MHA), greedy and top-p sampling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import generate as sampling
from moe_jax import model
from moe_jax.config import MoEConfig, ModelConfig

# Weights larger than the default 0.02 so logits are O(1) and 1e-4 means something.
_BASE = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, head_dim=8, num_kv_heads=2, max_seq_len=12, init_std=0.2)
CONFIGS = {"mla": _BASE, "mha": dataclasses.replace(_BASE, attention="mha")}
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  cfg = CONFIGS[request.param]
  params, state = model.init(jax.random.key(0), cfg, MOE)
  # A non-zero bias, so decoding must carry the MoE state like the forward does.
  state = jax.tree.map(lambda b: 0.1 * jax.random.normal(jax.random.key(3), b.shape), state)
  tokens = jax.random.randint(jax.random.key(1), (2, cfg.max_seq_len), 0, 256)
  return cfg, params, state, tokens


def test_cached_decoding_matches_full_forward(setup):
  cfg, params, state, tokens = setup
  full, _ = model.apply(params, state, tokens, cfg, MOE)
  caches = model.init_caches(cfg, tokens.shape[0], cfg.max_seq_len)
  # A prefill of 3 tokens, then one token per step, as generate does.
  step_logits, caches = model.forward_cached(params, state, tokens[:, :3], 0, caches, cfg, MOE)
  pieces = [step_logits]
  for pos in range(3, cfg.max_seq_len):
    step_logits, caches = model.forward_cached(params, state, tokens[:, pos:pos + 1],
                                               jnp.int32(pos), caches, cfg, MOE)
    pieces.append(step_logits)
  cached = jnp.concatenate(pieces, axis=1)
  assert float(jnp.abs(full).max()) > 1.0
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)
  if cfg.attention == "mla":  # the cache holds the latent and the RoPE key, nothing per head
    assert caches["layer_0"]["ckv"].shape == (2, cfg.max_seq_len, cfg.kv_lora_rank)


def test_greedy_generation_is_deterministic_and_follows_the_argmax(setup):
  cfg, params, state, tokens = setup
  prompt = tokens[:, :4]
  out = model.generate(params, state, prompt, cfg, MOE, max_new_tokens=6, key=jax.random.key(0))
  again = model.generate(params, state, prompt, cfg, MOE, max_new_tokens=6,
                         key=jax.random.key(7))
  assert out.shape == (2, 10) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, again)
  np.testing.assert_array_equal(out[:, :4], prompt)
  # Each new token is the argmax of the full forward over what came before it.
  logits, _ = model.apply(params, state, out, cfg, MOE)
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:9], axis=-1))


def test_top_p_sampling(setup):
  cfg, params, state, tokens = setup
  prompt = tokens[:, :4]

  def gen(key, **kw):
    return model.generate(params, state, prompt, cfg, MOE, max_new_tokens=6,
                          key=jax.random.key(key), **kw)

  greedy = gen(0)
  np.testing.assert_array_equal(gen(1, temperature=0.0, top_p=0.5), greedy)
  # A nucleus this small holds only the most likely token: greedy at any temperature.
  np.testing.assert_array_equal(gen(2, temperature=1.0, top_p=1e-6), greedy)
  a, b = gen(3, temperature=1.0, top_p=0.9), gen(4, temperature=1.0, top_p=0.9)
  np.testing.assert_array_equal(a, gen(3, temperature=1.0, top_p=0.9))
  assert ((a >= 0) & (a < cfg.vocab_size)).all()
  assert (a[:, 4:] != b[:, 4:]).any()


def test_top_p_filter_keeps_the_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(sampling.top_p_filter(logits, p)))[0].tolist()
  assert kept(0.4) == [False, True, False, False]
  assert kept(0.7) == [False, True, False, True]
  assert kept(0.9) == [False, True, True, True]
  assert kept(1.0) == [True, True, True, True]


def test_sampling_follows_the_distribution():
  logits = jnp.broadcast_to(jnp.log(jnp.array([0.1, 0.6, 0.3])), (4000, 3))
  tokens = sampling.sample(logits, jax.random.key(0), temperature=1.0)
  np.testing.assert_allclose(np.bincount(tokens, minlength=3) / 4000, [0.1, 0.6, 0.3], atol=0.03)
  # At temperature 0.5 the probabilities are squared and renormalised.
  tokens = sampling.sample(logits, jax.random.key(1), temperature=0.5)
  np.testing.assert_allclose(np.bincount(tokens, minlength=3) / 4000, [0.022, 0.783, 0.196],
                             atol=0.03)


def test_generation_longer_than_max_seq_len_fails():
  cfg = CONFIGS["mla"]
  with pytest.raises(ValueError, match="max_seq_len"):
    model.generate({}, {}, jnp.zeros((1, 8), jnp.int32), cfg, MOE, max_new_tokens=5,
                   key=jax.random.key(0))
  with pytest.raises(ValueError, match="top_p"):
    model.generate({}, {}, jnp.zeros((1, 2), jnp.int32), cfg, MOE, max_new_tokens=2,
                   key=jax.random.key(0), temperature=1.0, top_p=0.0)
