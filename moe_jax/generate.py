"""Autoregressive decoding over any cached step function: prefill, then a `lax.scan` of steps.

A step function `step(tokens_BxT, pos, caches) -> (logits_BxTxV, caches)` runs T new tokens at
position `pos` against fixed-size caches. `decode` and the samplers know nothing of the model;
`forward_cached` (the decoder's step, main model only, no FP8; `forward_cached_routes` also
returns the MoE blocks' expert choices) and `generate` bind them to it (model.py re-exports
them). Everything here is jit-able: `pos` is traced inside the scan, and so may `temperature`
and `top_p` be.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from moe_jax import attention, decoder
from moe_jax.config import ModelConfig, MoEConfig

StepFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def top_p_filter(logits_BxV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of tokens whose probability reaches top_p (ties at the edge kept)."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # A token stays if the mass strictly before it is below top_p, so the best one always stays.
  keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample(logits_BxV: jax.Array, key: jax.Array, temperature=0.0, top_p=1.0) -> jax.Array:
  """Next tokens [B] int32: argmax at temperature 0, else nucleus sampling at temperature.

  temperature and top_p may be traced, so one compiled decoder serves every setting.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  hot = jnp.asarray(temperature) > 0
  scaled_BxV = top_p_filter(logits_BxV / jnp.where(hot, temperature, 1.0), top_p)
  sampled_B = jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)
  return jnp.where(hot, sampled_B, greedy_B)


def decode(step: StepFn, caches: Any, prompt_BxP: jax.Array, *, max_new_tokens: int,
           key: jax.Array, temperature=0.0, top_p=1.0) -> jax.Array:
  """Prefills the prompt at position 0, then samples max_new_tokens tokens one step at a time.

  Returns the prompt and the new tokens, [B, P + max_new_tokens] int32. The caches must have
  room for P + max_new_tokens - 1 positions (the last token is sampled, never fed back).
  """
  prompt_BxP = prompt_BxP.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt_BxP
  P = prompt_BxP.shape[1]
  logits_BxPxV, caches = step(prompt_BxP, 0, caches)
  key, subkey = jax.random.split(key)
  first_B = sample(logits_BxPxV[:, -1], subkey, temperature, top_p)

  def one_step(carry, i):
    token_B, caches, key = carry
    logits_Bx1xV, caches = step(token_B[:, None], P + i, caches)
    key, subkey = jax.random.split(key)
    return (sample(logits_Bx1xV[:, 0], subkey, temperature, top_p), caches, key), token_B

  (last_B, _, _), fed_NxB = jax.lax.scan(one_step, (first_B, caches, key),
                                         jnp.arange(max_new_tokens - 1, dtype=jnp.int32))
  return jnp.concatenate([prompt_BxP, fed_NxB.T, last_B[:, None]], axis=1)


# ----------------------------------------------------------------------------- the decoder's step


def init_caches(model_cfg: ModelConfig, batch: int, max_len: int) -> dict[str, attention.Cache]:
  """Empty fixed-size KV caches ({"layer_<i>": ...}); MLA's hold the latent and RoPE key only."""
  return {f"layer_{i}": attention.init_cache(model_cfg, batch, max_len)
          for i in range(model_cfg.num_layers)}


@functools.partial(jax.jit, static_argnums=(5, 6))
def forward_cached(params: dict, moe_state: dict, tokens_BxT: jax.Array, pos,
                   caches: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig):
  """T new tokens at position `pos` (traced or not) -> (logits_BxTxV float32, caches)."""
  return forward_cached_routes(params, moe_state, tokens_BxT, pos, caches, model_cfg,
                               moe_cfg)[:2]


@functools.partial(jax.jit, static_argnums=(5, 6))
def forward_cached_routes(params: dict, moe_state: dict, tokens_BxT: jax.Array, pos,
                          caches: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig):
  """forward_cached, plus the experts each new token chose in each MoE block of the main model:
  -> (logits_BxTxV, caches, routes_BxTxLxK int32), what router replay feeds back to model.apply."""
  return forward_cached_hidden(params, moe_state, tokens_BxT, pos, caches, model_cfg,
                               moe_cfg)[:3]


def forward_cached_hidden(params: dict, moe_state: dict, tokens_BxT: jax.Array, pos,
                          caches: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig):
  """forward_cached_routes, plus the last block's output [B, T, D] (before the final norm: what
  an MTP module takes as its hidden state). Traced inside its callers' jit."""
  variables = {"params": params, "moe_state": decoder.to_flax_state(moe_state, model_cfg)}
  (logits_BxTxV, _, auxes, caches), inter = decoder.Transformer(model_cfg, moe_cfg).apply(
      variables, tokens_BxT, pos, caches, mutable=["intermediates"])
  B, T = tokens_BxT.shape
  routes = jnp.stack([a["experts"] for a in auxes], axis=2) if auxes else \
      jnp.zeros((B, T, 0, moe_cfg.top_k), jnp.int32)
  return logits_BxTxV, caches, routes, inter["intermediates"]["hidden"][0]


def generate(params: dict, moe_state: dict, prompt_BxP: jax.Array, model_cfg: ModelConfig,
             moe_cfg: MoEConfig, *, max_new_tokens: int, key: jax.Array, temperature=0.0,
             top_p=1.0) -> jax.Array:
  """Prompt plus max_new_tokens sampled tokens, [B, P + max_new_tokens] int32.

  temperature 0 is greedy; otherwise nucleus sampling (top_p) at that temperature; both may
  change between calls without recompiling. All sequences share one prompt length; the cache
  holds P + max_new_tokens <= max_seq_len slots. Compiled once per shape and config.
  """
  P = prompt_BxP.shape[1]
  if P + max_new_tokens > model_cfg.max_seq_len:
    raise ValueError(f"prompt {P} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_seq_len={model_cfg.max_seq_len}")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: must be in (0, 1]")
  return _generate(params, moe_state, prompt_BxP, model_cfg, moe_cfg, max_new_tokens, key,
                   temperature, top_p)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _generate(params, moe_state, prompt_BxP, model_cfg, moe_cfg, max_new_tokens, key,
              temperature, top_p):
  def step(tokens_BxT, pos, caches):
    return forward_cached(params, moe_state, tokens_BxT, pos, caches, model_cfg, moe_cfg)

  caches = init_caches(model_cfg, prompt_BxP.shape[0], prompt_BxP.shape[1] + max_new_tokens)
  return decode(step, caches, prompt_BxP, max_new_tokens=max_new_tokens, key=key,
                temperature=temperature, top_p=top_p)
