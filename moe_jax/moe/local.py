"""The MoE computation on one device's tokens: route, dispatch, grouped experts, statistics.

`layer.apply` runs it on all tokens; `parallel.py` reuses its pieces inside the sharded layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig
from moe_jax.moe import dispatch, grouped, routing


def swiglu(x: jax.Array, w: dict) -> jax.Array:
  """Dense SwiGLU `down(silu(x @ gate) * (x @ up))` in x's dtype (shared experts, dense blocks)."""
  gate, up, down = (w[k].astype(x.dtype) for k in ("gate", "up", "down"))
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def route(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig):
  """Router forward: (logits [T, E] f32, scores [T, E] f32, idx [T, K], gates [T, K] f32)."""
  logits_TxE = x_TxD.astype(jnp.float32) @ params["router"]["kernel"].astype(jnp.float32)
  scores_TxE = routing.scores(logits_TxE, cfg.score_fn)
  idx_TxK = routing.select(scores_TxE, state["router_bias"], cfg)
  return logits_TxE, scores_TxE, idx_TxK, routing.gates(scores_TxE, idx_TxK, cfg)


def routed_experts(x_TxD: jax.Array, experts: dict, idx_TxK: jax.Array, gates_TxK: jax.Array,
                   cfg: MoEConfig) -> tuple[jax.Array, jax.Array]:
  """Dispatch, grouped SwiGLU, combine. Returns (y [T, D], kept assignments)."""
  backend = grouped.resolve_backend(cfg.grouped_backend)
  num_assignments = idx_TxK.size
  block = grouped.block_size(num_assignments, cfg.num_experts, backend)
  plan = dispatch.make_plan(idx_TxK, cfg.num_experts, block=block,
                            capacity_factor=cfg.capacity_factor)
  x_RxD = dispatch.permute(x_TxD, plan, cfg.top_k)
  y_RxD = grouped.swiglu(x_RxD, experts, plan, backend)
  return dispatch.combine(y_RxD, gates_TxK, plan), plan.kept


def statistics(logits_TxE, scores_TxE, idx_TxK, kept, seq_shape, cfg: MoEConfig,
               total=lambda v: v) -> dict:
  """Load, balance losses and their weighted sum (`balance_loss`, to add to the training loss).

  `total` sums a per-shard value over every token shard: the identity on one device, a psum in
  the expert-parallel layer, so that every shard sees the global statistics (and so updates the
  router bias identically).
  """
  e, k = cfg.num_experts, cfg.top_k
  tokens = total(jnp.float32(idx_TxK.shape[0]))
  load_E = total(routing.load(idx_TxK, e))
  prob_sum_E = total(routing.probabilities(scores_TxE, cfg.score_fn).sum(0))
  seq_losses = routing.sequence_balance_losses(
      scores_TxE.reshape(*seq_shape, e), idx_TxK.reshape(*seq_shape, k), cfg)
  aux = {
      "load": load_E,
      "aux_loss": routing.switch_loss(load_E, prob_sum_E, tokens, cfg),
      "seq_aux_loss": total(seq_losses.sum()) / total(jnp.float32(seq_losses.shape[0])),
      "z_loss": total(routing.z_loss_sum(logits_TxE)) / tokens,
      "dropped_fraction": (tokens * k - total(kept.astype(jnp.float32))) / (tokens * k),
      "max_vio": routing.max_violation(load_E),
  }
  aux["balance_loss"] = (cfg.aux_loss_coef * aux["aux_loss"] +
                         cfg.seq_aux_loss_coef * aux["seq_aux_loss"] +
                         cfg.z_loss_coef * aux["z_loss"])
  return aux


def sequence_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """(sequences, length) for x of shape [..., S, D]; a 2-D x is one sequence."""
  length = shape[-2] if len(shape) >= 2 else 1
  sequences = 1
  for n in shape[:-2]:
    sequences *= n
  return sequences, length
