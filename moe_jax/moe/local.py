"""The MoE computation on one device's tokens: route, dispatch, grouped experts, statistics.

`layer.apply` runs it on all tokens; `parallel.py` reuses its pieces inside the sharded layers.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import fp8
from moe_jax.config import FP8Config, MoEConfig
from moe_jax import shard_util
from moe_jax.moe import dispatch, grouped, grouped_fp8, routing


def swiglu(x: jax.Array, w: dict, matmuls: fp8.Matmuls = fp8.NO_FP8) -> jax.Array:
  """Dense SwiGLU `down(silu(x @ gate) * (x @ up))` in x's dtype (shared experts, dense blocks),
  each product through `matmuls` when it quantizes (from the float32 weights)."""
  if matmuls.cfg.recipe != "none":
    h = jax.nn.silu(matmuls.dot(x, "gate", w["gate"])) * matmuls.dot(x, "up", w["up"])
    return matmuls.dot(h, "down", w["down"])
  gate, up, down = (w[k].astype(x.dtype) for k in ("gate", "up", "down"))
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def route(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig):
  """Router forward: (logits [T, E] f32, scores [T, E] f32, idx [T, K], gates [T, K] f32)."""
  logits_TxE = x_TxD.astype(jnp.float32) @ params["router"]["kernel"].astype(jnp.float32)
  scores_TxE = routing.scores(logits_TxE, cfg.score_fn)
  idx_TxK = routing.select(scores_TxE, state["router_bias"], cfg)
  return logits_TxE, scores_TxE, idx_TxK, routing.gates(scores_TxE, idx_TxK, cfg)


def routed_experts(x_TxD: jax.Array, experts: dict, idx_TxK: jax.Array, gates_TxK: jax.Array,
                   cfg: MoEConfig, fp8_cfg: FP8Config = FP8Config(),
                   fp8_states: Optional[dict] = None) -> tuple[jax.Array, jax.Array]:
  """Dispatch, grouped SwiGLU (FP8 per fp8_cfg), combine. Returns (y [T, D], kept
  assignments)."""
  backend = grouped.resolve_backend(cfg.grouped_backend)
  num_assignments = idx_TxK.size
  block, bucket = grouped.layout(num_assignments, cfg.num_experts, backend)
  q = (fp8_cfg, fp8_states)
  if not bucket:
    return _run(x_TxD, experts, gates_TxK, idx_TxK, None, cfg, backend, block, 0, None, q=q)
  if fp8_states:  # the spill pass is another call of the same matrices
    first, second = grouped_fp8.split_states(fp8_states, 2)
    q, q_spill = (fp8_cfg, first), second
  else:
    q_spill = {}
  # The dropless overflow bound (a routing that sends everything to one expert) is ~A rows, but
  # balanced routings overflow a few percent, and every pass over the row buffer pays for its
  # size. So the buffer holds A/16; what does not fit (rare) runs in a second pass.
  y_TxD, kept, spilled_TxK = _run(x_TxD, experts, gates_TxK, idx_TxK, None, cfg, backend, block,
                                  bucket, num_assignments // 16, spilled=True, q=q)
  y_spill = _spill(x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, q_spill, cfg, backend, block,
                   fp8_cfg)
  return y_TxD + y_spill, kept + spilled_TxK.sum()


def _run(x_TxD, experts, gates_TxK, idx_TxK, valid_TxK, cfg, backend, block, bucket,
         overflow_budget, spilled=False, q=(FP8Config(), None)):
  plan = dispatch.make_plan(idx_TxK, cfg.num_experts, block=block, bucket=bucket,
                            capacity_factor=cfg.capacity_factor, valid_TxK=valid_TxK,
                            overflow_budget=overflow_budget)
  y_TxD = grouped.routed(x_TxD, experts, gates_TxK, plan, backend, *q)
  if spilled:
    return y_TxD, plan.kept, plan.spilled_A.reshape(idx_TxK.shape)
  return y_TxD, plan.kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _spill(x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, fp8_states, cfg, backend, block,
           fp8_cfg):
  """The assignments the first pass had no room for, on a dropless buffer; zero when none.

  A custom VJP that recomputes in the backward pass: under plain autodiff, the branch not
  taken would still have to produce (zero) residuals the size of the dropless buffer. FP8
  "delayed" states get zero cotangents when nothing spilled (fp8.share_state takes the max).
  """
  return _spill_fwd(x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, fp8_states, cfg, backend,
                    block, fp8_cfg)[0]


def _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg):
  return lambda x, w, g, s: _run(x, w, g, idx_TxK, spilled_TxK, cfg, backend, block, 0, None,
                                 q=(fp8_cfg, s))[0]


def _spill_fwd(x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, fp8_states, cfg, backend, block,
               fp8_cfg):
  f = _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg)
  y_TxD = jax.lax.cond(
      spilled_TxK.any(), f,
      lambda x, w, g, s: shard_util.zeros(x.shape, x.dtype, x, *jax.tree.leaves((w, s)), g),
      x_TxD, experts, gates_TxK, fp8_states)
  return y_TxD, (x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, fp8_states)


def _spill_bwd(cfg, backend, block, fp8_cfg, residuals, dy_TxD):
  x_TxD, experts, gates_TxK, idx_TxK, spilled_TxK, fp8_states = residuals
  f = _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg)
  zeros = lambda *args: tuple(jax.tree.map(jnp.zeros_like, a) for a in args)
  cts = jax.lax.cond(spilled_TxK.any(), lambda *a: jax.vjp(f, *a[:4])[1](a[4]),
                     lambda *a: zeros(*a[:4]), x_TxD, experts, gates_TxK, fp8_states, dy_TxD)
  return (*cts[:3], None, None, cts[3])


_spill.defvjp(_spill_fwd, _spill_bwd)


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
