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

FP8 (`apply(..., fp8_cfg=FP8Config(recipe=...))`, fp8.py): every product of the routed experts
(grouped_fp8.py) and of the shared experts is FP8; the router stays float32. "delayed" takes
`fp8_state` from `init_fp8_state` ({"experts": {"gate", "up", "down"}: [E, L] histories each,
"shared": [L] each}), whose gradient is the updated state. `fp8_cfg.dispatch` sends FP8 rows
through the expert all-to-all (parallel.fp8_all_to_all); the other layouts round the routed
experts' input the same way, so every parallelism computes the same numbers.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import fp8
from moe_jax.config import FP8Config, MoEConfig
from moe_jax.moe import parallel, routing
from moe_jax.moe.params import check_fp8_state, init, init_fp8_state
from moe_jax.moe.local import routed_experts, route, sequence_shape, statistics, swiglu

def check_input(x: jax.Array, cfg: MoEConfig):
  if x.ndim < 1 or x.shape[-1] != cfg.embed_dim:
    raise ValueError(f"x.shape={tuple(x.shape)}: last dimension must equal "
                     f"moe.embed_dim={cfg.embed_dim}")


def apply(params: dict, state: dict, x: jax.Array, cfg: MoEConfig, *,
          fp8_cfg: FP8Config = FP8Config(),
          fp8_state: Optional[dict] = None) -> tuple[jax.Array, dict]:
  """y = sum_k gate_k * expert_k(x) + shared(x), for x of shape [..., D]; aux per module doc.
  Expert products in FP8 per fp8_cfg (module doc)."""
  check_input(x, cfg)
  check_fp8_state(cfg, fp8_cfg, fp8_state)
  x_TxD = x.reshape(-1, cfg.embed_dim)
  seq_shape = sequence_shape(x.shape)
  if cfg.parallelism == "alltoall":
    y_TxD, aux = parallel.apply_alltoall(params, state, x_TxD, cfg, seq_shape[1], fp8_cfg,
                                         fp8_state)
  elif cfg.parallelism == "gshard":
    y_TxD, aux = parallel.apply_gshard(params, state, x_TxD, cfg, seq_shape[1], fp8_cfg,
                                       fp8_state)
  else:
    xc_TxD = x_TxD.astype(cfg.dtype)
    logits_TxE, scores_TxE, idx_TxK, gates_TxK = route(params, state, x_TxD, cfg)
    fp8_state = fp8_state or {}
    xr_TxD = parallel.fp8_all_to_all(xc_TxD, fp8_cfg, None) if fp8_cfg.dispatch else xc_TxD
    y_TxD, kept = routed_experts(xr_TxD, params["experts"], idx_TxK, gates_TxK, cfg, fp8_cfg,
                                 fp8_state.get("experts"))
    if "shared" in params:
      y_TxD = y_TxD + swiglu(xc_TxD, params["shared"],
                             fp8.Matmuls(fp8_cfg, fp8_state.get("shared")))
    aux = statistics(logits_TxE, scores_TxE, idx_TxK, kept, seq_shape, cfg)
  return y_TxD.reshape(x.shape).astype(x.dtype), aux


def update_bias(state: dict, load_E: jax.Array, cfg: MoEConfig) -> dict:
  """Aux-loss-free balancing: `bias += rate * sign(mean(load) - load)`, outside the gradient."""
  return {**state, "router_bias": routing.update_bias(state["router_bias"], load_E,
                                                      cfg.bias_update_rate)}
