"""The DeepSeek-V3 MoE layer as two pure functions, `init` and `apply`, on plain dict pytrees.

Parameters (E routed experts, D = embed_dim, F = expert_ffn_dim, S = num_shared_experts):

    {"router":  {"kernel": [D, E]},                       # float32 always
     "experts": {"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]},
     "shared":  {"gate": [D, S*F], "up": [D, S*F], "down": [S*F, D]}}   # absent when S = 0

State (not a parameter: no gradient, updated by `update_bias` after each step):

    {"router_bias": [E] float32}

Data flow: router logits (float32) -> scores -> group-limited top-k on score + bias -> gates from
the unbiased scores -> sort assignments by expert (dispatch.Plan) -> grouped SwiGLU -> unpermute,
weight by gates, sum over k -> + shared experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig
from moe_jax.moe import dispatch, grouped, routing

_fan_in = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                               in_axis=-2, out_axis=-1)


def init(key: jax.Array, cfg: MoEConfig) -> tuple[dict, dict]:
  """Fresh parameters (float32 master copies) and zero router bias."""
  d, e, f, s = cfg.embed_dim, cfg.num_experts, cfg.expert_ffn_dim, cfg.num_shared_experts
  keys = jax.random.split(key, 7)
  params = {
      "router": {"kernel": _fan_in(keys[0], (d, e), jnp.float32)},
      "experts": {
          "gate": _fan_in(keys[1], (e, d, f), jnp.float32),
          "up": _fan_in(keys[2], (e, d, f), jnp.float32),
          "down": _fan_in(keys[3], (e, f, d), jnp.float32),
      },
  }
  if s:
    params["shared"] = {
        "gate": _fan_in(keys[4], (d, s * f), jnp.float32),
        "up": _fan_in(keys[5], (d, s * f), jnp.float32),
        "down": _fan_in(keys[6], (s * f, d), jnp.float32),
    }
  return params, {"router_bias": jnp.zeros((e,), jnp.float32)}


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
  y_TxKxD = dispatch.unpermute(y_RxD, plan, cfg.top_k)
  y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))
  return y_TxD, plan.kept


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


def check_input(x: jax.Array, cfg: MoEConfig):
  if x.ndim < 1 or x.shape[-1] != cfg.embed_dim:
    raise ValueError(f"x.shape={tuple(x.shape)}: last dimension must equal "
                     f"moe.embed_dim={cfg.embed_dim}")


def apply(params: dict, state: dict, x: jax.Array, cfg: MoEConfig) -> tuple[jax.Array, dict]:
  """y = sum_k gate_k * expert_k(x) + shared(x), for x of shape [..., D]; aux per module doc."""
  check_input(x, cfg)
  dtype = jnp.dtype(cfg.dtype)
  x_TxD = x.reshape(-1, cfg.embed_dim)
  logits_TxE, scores_TxE, idx_TxK, gates_TxK = route(params, state, x_TxD, cfg)
  y_TxD, kept = routed_experts(x_TxD.astype(dtype), params["experts"], idx_TxK, gates_TxK, cfg)
  if "shared" in params:
    y_TxD = y_TxD + swiglu(x_TxD.astype(dtype), params["shared"])
  aux = statistics(logits_TxE, scores_TxE, idx_TxK, kept, sequence_shape(x.shape), cfg)
  return y_TxD.reshape(x.shape).astype(x.dtype), aux


def update_bias(state: dict, load_E: jax.Array, cfg: MoEConfig) -> dict:
  """Aux-loss-free balancing: `bias += rate * sign(mean(load) - load)`, outside the gradient."""
  return {**state, "router_bias": routing.update_bias(state["router_bias"], load_E,
                                                      cfg.bias_update_rate)}
