"""Routing and its statistics: the router's forward (`route`), scores, group-limited top-k
selection, gates, router replay (`replay`), balance losses, load statistics (`statistics`), the
bias update.

All functions take flat tokens (`T` = tokens, `E` = experts, `K` = experts per token) and work in
float32 whatever the compute dtype, because routing decisions flip on tiny score differences.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig


class Route(NamedTuple):
  logits_TxE: jax.Array  # float32
  scores_TxE: jax.Array  # float32
  idx_TxK: jax.Array     # chosen experts
  gates_TxK: jax.Array   # float32 combine weights


def route(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig) -> Route:
  """The router forward, in float32 whatever x's dtype."""
  logits_TxE = x_TxD.astype(jnp.float32) @ params["router"]["kernel"].astype(jnp.float32)
  scores_TxE = scores(logits_TxE, cfg.score_fn)
  idx_TxK = select(scores_TxE, state["router_bias"], cfg)
  return Route(logits_TxE, scores_TxE, idx_TxK, gates(scores_TxE, idx_TxK, cfg))


def replay(r: Route, replay_TxK: jax.Array, cfg: MoEConfig) -> Route:
  """The route with the experts of replay_TxK (e.g. those a rollout chose) instead of the
  router's own top-k, gates from this router's scores at those experts (RL router replay).

  A token whose row holds any negative id keeps its own choice (-1: nothing recorded). Ids must
  be < num_experts; that is not checked (they may be traced)."""
  recorded_Tx1 = (replay_TxK >= 0).all(-1, keepdims=True)
  idx_TxK = jnp.where(recorded_Tx1, replay_TxK.astype(jnp.int32), r.idx_TxK)
  return r._replace(idx_TxK=idx_TxK, gates_TxK=gates(r.scores_TxE, idx_TxK, cfg))


def statistics(r: Route, kept, seq_len: int, cfg: MoEConfig, total=lambda v: v) -> dict:
  """Load, balance losses and their weighted sum (`balance_loss`, to add to the training loss),
  for tokens in whole sequences of seq_len; `kept` counts the assignments that got a row. Under
  replay, r is the router's own route: the statistics (and so the bias update) see its choice.

  `total` sums a per-shard value over every token shard: the identity on one device, a psum in
  the expert-parallel layer, so that every shard sees the global statistics (and so updates the
  router bias identically).
  """
  e, k = cfg.num_experts, cfg.top_k
  t = r.idx_TxK.shape[0]
  tokens = total(jnp.float32(t))
  load_E = total(load(r.idx_TxK, e))
  prob_sum_E = total(probabilities(r.scores_TxE, cfg.score_fn).sum(0))
  seq_losses = sequence_balance_losses(r.scores_TxE.reshape(t // seq_len, seq_len, e),
                                       r.idx_TxK.reshape(t // seq_len, seq_len, k), cfg)
  aux = {
      "load": load_E,
      "aux_loss": switch_loss(load_E, prob_sum_E, tokens, cfg),
      "seq_aux_loss": total(seq_losses.sum()) / total(jnp.float32(seq_losses.shape[0])),
      "z_loss": total(z_loss_sum(r.logits_TxE)) / tokens,
      "dropped_fraction": (tokens * k - total(kept.astype(jnp.float32))) / (tokens * k),
      "max_vio": max_violation(load_E),
  }
  aux["balance_loss"] = (cfg.aux_loss_coef * aux["aux_loss"] +
                         cfg.seq_aux_loss_coef * aux["seq_aux_loss"] +
                         cfg.z_loss_coef * aux["z_loss"])
  return aux


def scores(logits_TxE: jax.Array, score_fn: str) -> jax.Array:
  """Affinity of each token for each expert: sigmoid (DeepSeek-V3) or softmax (Switch)."""
  logits_TxE = logits_TxE.astype(jnp.float32)
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits_TxE)
  return jax.nn.softmax(logits_TxE, axis=-1)


def select(scores_TxE: jax.Array, bias_E: jax.Array, cfg: MoEConfig) -> jax.Array:
  """Indices [T, K] of the chosen experts.

  The bias only steers selection (aux-loss-free balancing); with `n_groups > 1` a group's score is
  the sum of its two best biased scores, and only the best `topk_groups` groups compete. Ties go
  to the lower index (`lax.top_k`'s rule), which the NumPy reference in the tests mirrors.
  """
  biased_TxE = jax.lax.stop_gradient(scores_TxE) + bias_E.astype(jnp.float32)[None, :]
  if cfg.n_groups > 1:
    t = biased_TxE.shape[0]
    grouped_TxGxM = biased_TxE.reshape(t, cfg.n_groups, cfg.experts_per_group)
    group_score_TxG = jax.lax.top_k(grouped_TxGxM, 2)[0].sum(-1)
    _, best_groups_TxJ = jax.lax.top_k(group_score_TxG, cfg.topk_groups)
    keep_TxG = jax.nn.one_hot(best_groups_TxJ, cfg.n_groups, dtype=jnp.int32).sum(1) > 0
    keep_TxE = jnp.repeat(keep_TxG, cfg.experts_per_group, axis=1)
    biased_TxE = jnp.where(keep_TxE, biased_TxE, -jnp.inf)
  _, idx_TxK = jax.lax.top_k(biased_TxE, cfg.top_k)
  return idx_TxK.astype(jnp.int32)


def gates(scores_TxE: jax.Array, idx_TxK: jax.Array, cfg: MoEConfig) -> jax.Array:
  """Combine weights from the unbiased scores of the selected experts."""
  gates_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
  if cfg.norm_topk:
    # The epsilon matches the reference implementations, so loaded checkpoints agree exactly.
    gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
  return gates_TxK * cfg.routed_scaling


def load(idx_TxK: jax.Array, num_experts: int) -> jax.Array:
  """Assignments per expert, [E] float32."""
  one_hot = jax.nn.one_hot(idx_TxK.reshape(-1), num_experts, dtype=jnp.float32)
  return one_hot.sum(0)


def max_violation(load_E: jax.Array) -> jax.Array:
  """MaxVio of the aux-loss-free balancing paper: max load / mean load - 1."""
  return load_E.max() / jnp.maximum(load_E.mean(), 1e-9) - 1.0


def probabilities(scores_TxE: jax.Array, score_fn: str) -> jax.Array:
  """Scores as a distribution over experts (sigmoid scores are normalised per token)."""
  if score_fn == "sigmoid":
    return scores_TxE / (scores_TxE.sum(-1, keepdims=True) + 1e-20)
  return scores_TxE


def switch_loss(load_E: jax.Array, prob_sum_E: jax.Array, tokens, cfg: MoEConfig) -> jax.Array:
  """Switch/GShard loss E * sum_e f_e * P_e from sums; 1.0 when perfectly balanced.

  f_e is the share of assignments that went to expert e, P_e its mean routing probability.
  Taking sums (not means) lets the expert-parallel layer reduce them over shards first.
  """
  f_E = load_E / (tokens * cfg.top_k)
  return cfg.num_experts * jnp.sum(f_E * prob_sum_E / tokens)


def balance_loss(scores_TxE: jax.Array, idx_TxK: jax.Array, cfg: MoEConfig) -> jax.Array:
  """The Switch loss of one group of tokens."""
  prob_sum_E = probabilities(scores_TxE, cfg.score_fn).sum(0)
  return switch_loss(load(idx_TxK, cfg.num_experts), prob_sum_E, idx_TxK.shape[0], cfg)


def sequence_balance_losses(scores_BxSxE: jax.Array, idx_BxSxK: jax.Array,
                            cfg: MoEConfig) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss: the Switch loss of each sequence, [B]."""
  return jax.vmap(lambda s, i: balance_loss(s, i, cfg))(scores_BxSxE, idx_BxSxK)


def z_loss_sum(logits_TxE: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE) summed over tokens: squared log-partition, keeps logits small."""
  return jnp.sum(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1) ** 2)


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded."""
  load_E = jax.lax.stop_gradient(load_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(load_E.mean() - load_E)
