"""The DeepSeek-V3 MoE layer as pure functions on plain dict pytrees: `apply`, `update_bias`
(`init` and the parameter layout: params.py).

State (not a parameter: no gradient, updated by `update_bias` after each step):

    {"router_bias": [E] float32}

Data flow: router logits (float32) -> scores -> group-limited top-k on score + bias -> gates from
the unbiased scores (routing.py) -> sort assignments by expert (dispatch.Plan) -> grouped SwiGLU
(grouped.py) -> unpermute, weight by gates, sum over k -> + shared experts (local.add_shared).
`cfg.parallelism` picks one of three layers that all compute this: `local.apply_local` (one
device), `parallel.apply_alltoall` (shard_map, explicit all-to-all over the expert axis) and
`parallel.apply_gshard` (SPMD einsums).

Router replay (RL): `apply(..., replay=idx)` dispatches each token to the given experts [..., K]
(e.g. those the rollout engine chose) with gates from this router's scores at them; the
statistics (load, balance losses, hence the bias update) still see the router's own choice,
which aux returns as "experts" [..., K] int32 (what a rollout records).

FP8 (`apply(..., fp8_cfg=FP8Config(recipe=...))`, fp8.py): every product of the routed experts
(products.FP8) and of the shared experts is FP8; the router stays float32. "delayed" takes
`fp8_state` from `init_fp8_state` ({"experts": {"gate", "up", "down"}: [E, L] histories each,
"shared": [L] each}), whose gradient is the updated state. `fp8_cfg.dispatch` sends FP8 rows
through the expert all-to-all (fp8.dispatch_rows); the other layers round the routed experts'
input the same way, so every parallelism computes the same numbers.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.config import FP8Config, MoEConfig
from moe_jax.moe import parallel, routing
from moe_jax.moe.local import apply_local
from moe_jax.moe.params import check_fp8_state

# cfg.parallelism -> the layer; each takes (params, state, x_TxD, cfg, seq_len, fp8_cfg,
# fp8_state, replay_TxK) and returns (y_TxD, aux).
_LAYERS = {"none": apply_local, "alltoall": parallel.apply_alltoall,
           "gshard": parallel.apply_gshard}


def check_input(x: jax.Array, cfg: MoEConfig):
  if x.ndim < 1 or x.shape[-1] != cfg.embed_dim:
    raise ValueError(f"x.shape={tuple(x.shape)}: last dimension must equal "
                     f"moe.embed_dim={cfg.embed_dim}")


def apply(params: dict, state: dict, x: jax.Array, cfg: MoEConfig, *,
          fp8_cfg: FP8Config = FP8Config(), fp8_state: Optional[dict] = None,
          replay: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """y = sum_k gate_k * expert_k(x) + shared(x), for x of shape [..., D]; aux: load per expert,
  balance losses and their weighted sum, dropped fraction, MaxVio (routing.statistics), and the
  router's own choice "experts" [..., K]. Expert products in FP8 per fp8_cfg; `replay` [..., K]
  integer expert ids replace the top-k choice (module doc; rows with a negative id keep it)."""
  check_input(x, cfg)
  check_fp8_state(cfg, fp8_cfg, fp8_state)
  k = cfg.top_k
  if replay is not None:
    if replay.shape != x.shape[:-1] + (k,) or not jnp.issubdtype(replay.dtype, jnp.integer):
      raise ValueError(f"replay: {replay.dtype}{list(replay.shape)} must be integer expert ids "
                       f"of shape {list(x.shape[:-1]) + [k]} (x's tokens by moe.top_k)")
    replay = replay.reshape(-1, k)
  # Statistics per sequence: x [..., S, D] holds sequences of S tokens; a 2-D x is one sequence.
  seq_len = x.shape[-2] if x.ndim >= 2 else 1
  y_TxD, aux = _LAYERS[cfg.parallelism](params, state, x.reshape(-1, cfg.embed_dim), cfg,
                                         seq_len, fp8_cfg, fp8_state or {}, replay)
  aux["experts"] = aux["experts"].reshape(x.shape[:-1] + (k,))
  return y_TxD.reshape(x.shape).astype(x.dtype), aux


def update_bias(state: dict, load_E: jax.Array, cfg: MoEConfig) -> dict:
  """Aux-loss-free balancing: `bias += rate * sign(mean(load) - load)`, outside the gradient."""
  return {**state, "router_bias": routing.update_bias(state["router_bias"], load_E,
                                                      cfg.bias_update_rate)}
