"""Per-sequence sampling in one compiled call: each row has its own temperature, top-p, top-k and
random stream, so sequences of different requests share a decode step.

A row's key is fold_in(fold_in(PRNGKey(seed), choice), index of the token): a completion's tokens
depend on its request alone, never on which other sequences were in the batch or on whether its
prompt came from the cache.

Two log-probabilities come back per token: the model's own, log_softmax of the raw logits
(temperature 1, no top-p/top-k: what the OpenAI API reports), and the sampling distribution's,
log_softmax of the logits after temperature, top-k and top-p (0 when greedy: that choice is
certain). An RL learner's importance ratio needs the second (rl/objective.sampling_logprobs
recomputes it under the same processing).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.generate import top_p_filter


def _top_k_filter(logits_BxV: jax.Array, top_k_B: jax.Array) -> jax.Array:
  """Keeps each row's top_k largest logits (ties at the edge kept); top_k 0 keeps all."""
  V = logits_BxV.shape[-1]
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


def _scaled(logits_BxV, temperature_B, top_p_B, top_k_B):
  """The sampling distribution's logits: temperature, then top-k, then top-p."""
  hot_B = temperature_B > 0
  scaled_BxV = logits_BxV / jnp.where(hot_B, temperature_B, 1.0)[:, None]
  return top_p_filter(_top_k_filter(scaled_BxV, top_k_B), top_p_B[:, None])


@jax.jit
def probabilities(logits_BxV, temperature_B, top_p_B, top_k_B):
  """The distribution `sample` draws from, [B, V] float32: a one-hot argmax when greedy.
  Speculative decoding applies it to both the main model's and the drafter's logits."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  hot_B = temperature_B > 0
  soft_BxV = jax.nn.softmax(_scaled(logits_BxV, temperature_B, top_p_B, top_k_B), axis=-1)
  hard_BxV = jax.nn.one_hot(jnp.argmax(logits_BxV, axis=-1), logits_BxV.shape[-1])
  return jnp.where(hot_B[:, None], soft_BxV, hard_BxV)


@jax.jit
def sample(logits_BxV, temperature_B, top_p_B, top_k_B, seed_B, choice_B, index_B):
  """-> (tokens [B] int32, their log-probabilities [B] float32 under the model, and under the
  sampling distribution [B] float32). temperature 0 is greedy."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  hot_B = temperature_B > 0
  scaled_BxV = _scaled(logits_BxV, temperature_B, top_p_B, top_k_B)

  def draw(seed, choice, index, row_V):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), choice), index)
    return jax.random.categorical(key, row_V)

  sampled_B = jax.vmap(draw)(seed_B, choice_B, index_B, scaled_BxV).astype(jnp.int32)
  tokens_B = jnp.where(hot_B, sampled_B, jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))
  pick = lambda x_BxV: jnp.take_along_axis(x_BxV, tokens_B[:, None], axis=-1)[:, 0]
  sampled_logp_B = jnp.where(hot_B, pick(jax.nn.log_softmax(scaled_BxV, axis=-1)), 0.0)
  return tokens_B, pick(logprobs_BxV), sampled_logp_B


@functools.partial(jax.jit, static_argnums=1)
def top_logprobs(logits_BxV, k: int):
  """The k most likely tokens of each row and their log-probs under the model (temperature 1, as
  the sampled tokens' own): -> (ids [B, k] int32, log-probs [B, k] float32)."""
  logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  values_BxK, ids_BxK = jax.lax.top_k(logprobs_BxV, k)
  return ids_BxK.astype(jnp.int32), values_BxK
