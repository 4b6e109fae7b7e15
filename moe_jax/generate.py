"""Autoregressive decoding over any cached step function: prefill, then a `lax.scan` of steps.

A step function `step(tokens_BxT, pos, caches) -> (logits_BxTxV, caches)` runs T new tokens at
position `pos` against fixed-size caches (`model.forward_cached` is one). This file knows nothing
of the model; `model.generate` binds it. Everything here is jit-able: `pos` is traced inside the
scan, and so may `temperature` and `top_p` be.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

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
