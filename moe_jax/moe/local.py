"""The MoE layer on one device's tokens: route, dispatch, grouped experts, combine, statistics.

`apply_local` is the single-device layer; `routed_experts` is its dispatch, experts and combine
(with the spill pass that keeps a small overflow buffer dropless), `add_shared` the one place
the shared experts are added, in the sharded layers (parallel.py) too.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import fp8, shard_util
from moe_jax.config import FP8Config, MoEConfig
from moe_jax.moe import dispatch, grouped, products, routing
from moe_jax.moe.routing import route


def swiglu(x: jax.Array, w: dict, matmuls: fp8.Matmuls = fp8.NO_FP8) -> jax.Array:
  """Dense SwiGLU `down(silu(x @ gate) * (x @ up))` in x's dtype (shared experts, dense blocks),
  each product through `matmuls` (plain by default; FP8 from the float32 weights)."""
  return products.swiglu(x, lambda v, name: matmuls.dot(v, name, w[name]))


def add_shared(y_TxD: jax.Array, xc_TxD: jax.Array, params: dict, fp8_cfg: FP8Config,
               fp8_state: dict) -> jax.Array:
  """y plus the shared experts of x (a dense SwiGLU every token passes), if the layer has any."""
  if "shared" not in params:
    return y_TxD
  return y_TxD + swiglu(xc_TxD, params["shared"], fp8.Matmuls(fp8_cfg, fp8_state.get("shared")))


def apply_local(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig, seq_len: int,
                fp8_cfg: FP8Config, fp8_state: dict,
                replay_TxK: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The layer on one device: every token, every expert."""
  xc_TxD = x_TxD.astype(cfg.dtype)
  r = route(params, state, x_TxD, cfg)
  used = r if replay_TxK is None else routing.replay(r, replay_TxK, cfg)
  xr_TxD = fp8.dispatch_rows(xc_TxD, fp8_cfg) if fp8_cfg.dispatch else xc_TxD
  y_TxD, kept = routed_experts(xr_TxD, params["experts"], used.idx_TxK, used.gates_TxK, cfg,
                               fp8_cfg, fp8_state.get("experts"))
  y_TxD = add_shared(y_TxD, xc_TxD, params, fp8_cfg, fp8_state)
  return y_TxD, dict(routing.statistics(r, kept, seq_len, cfg), experts=r.idx_TxK)


def _copies(states: Optional[dict], n: int) -> list[Optional[dict]]:
  """n per-call copies of {"gate", "up", "down"} delayed states (fp8.share_state)."""
  if not states:
    return [states] * n
  copies = {k: fp8.share_state(h, n) for k, h in states.items()}
  return [{k: copies[k][i] for k in states} for i in range(n)]


def routed_experts(x_TxD: jax.Array, experts: dict, idx_TxK: jax.Array, gates_TxK: jax.Array,
                   cfg: MoEConfig, fp8_cfg: FP8Config = FP8Config(),
                   fp8_states: Optional[dict] = None) -> tuple[jax.Array, jax.Array]:
  """Dispatch, grouped SwiGLU (FP8 per fp8_cfg), combine. Returns (y [T, D], kept
  assignments)."""
  backend = grouped.resolve_backend(cfg.grouped_backend)
  num_assignments = idx_TxK.size
  block, bucket = grouped.layout(num_assignments, cfg.num_experts, backend)
  run = functools.partial(_run, cfg=cfg, backend=backend, block=block, fp8_cfg=fp8_cfg)
  if not bucket:
    y_TxD, kept, _ = run(x_TxD, experts, gates_TxK, fp8_states, idx_TxK, None, bucket=0,
                         overflow_budget=None)
    return y_TxD, kept
  # The spill pass is another call of the same matrices.
  states, spill_states = _copies(fp8_states, 2)
  # The dropless overflow bound (a routing that sends everything to one expert) is ~A rows, but
  # balanced routings overflow a few percent, and every pass over the row buffer pays for its
  # size. So the buffer holds A/16; what does not fit (rare) runs in a second pass.
  y_TxD, kept, spilled_TxK = run(x_TxD, experts, gates_TxK, states, idx_TxK, None, bucket=bucket,
                                 overflow_budget=num_assignments // 16)
  y_spill = _spill(x_TxD, experts, gates_TxK, spill_states or {}, idx_TxK, spilled_TxK, cfg,
                   backend, block, fp8_cfg)
  return y_TxD + y_spill, kept + spilled_TxK.sum()


def _run(x_TxD: jax.Array, experts: dict, gates_TxK: jax.Array, fp8_states: Optional[dict],
         idx_TxK: jax.Array, valid_TxK: Optional[jax.Array], *, cfg: MoEConfig, backend: str,
         block: int, bucket: int, overflow_budget: Optional[int], fp8_cfg: FP8Config):
  """One pass: plan, experts, combine. Returns (y [T, D], kept, spilled [T, K])."""
  plan = dispatch.make_plan(idx_TxK, cfg.num_experts, block=block, bucket=bucket,
                            capacity_factor=cfg.capacity_factor, valid_TxK=valid_TxK,
                            overflow_budget=overflow_budget)
  y_TxD = grouped.routed(x_TxD, experts, gates_TxK, plan, backend, fp8_cfg, fp8_states)
  return y_TxD, plan.kept, plan.spilled_A.reshape(idx_TxK.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _spill(x_TxD, experts, gates_TxK, fp8_states, idx_TxK, spilled_TxK, cfg, backend, block,
           fp8_cfg):
  """The assignments the first pass had no room for, on a dropless buffer; zero when none.

  A custom VJP that recomputes in the backward pass: under plain autodiff, the branch not
  taken would still have to produce (zero) residuals the size of the dropless buffer. FP8
  "delayed" states get zero cotangents when nothing spilled (fp8.share_state takes the max).
  """
  return _spill_fwd(x_TxD, experts, gates_TxK, fp8_states, idx_TxK, spilled_TxK, cfg, backend,
                    block, fp8_cfg)[0]


def _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg):
  return lambda x, w, g, s: _run(x, w, g, s, idx_TxK, spilled_TxK, cfg=cfg, backend=backend,
                                 block=block, bucket=0, overflow_budget=None,
                                 fp8_cfg=fp8_cfg)[0]


def _spill_fwd(x_TxD, experts, gates_TxK, fp8_states, idx_TxK, spilled_TxK, cfg, backend, block,
               fp8_cfg):
  f = _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg)
  y_TxD = jax.lax.cond(
      spilled_TxK.any(), f,
      lambda x, w, g, s: shard_util.zeros(x.shape, x.dtype, x, *jax.tree.leaves((w, s)), g),
      x_TxD, experts, gates_TxK, fp8_states)
  return y_TxD, (x_TxD, experts, gates_TxK, fp8_states, idx_TxK, spilled_TxK)


def _spill_bwd(cfg, backend, block, fp8_cfg, residuals, dy_TxD):
  x_TxD, experts, gates_TxK, fp8_states, idx_TxK, spilled_TxK = residuals
  f = _spill_fn(idx_TxK, spilled_TxK, cfg, backend, block, fp8_cfg)
  zeros = lambda *args: tuple(jax.tree.map(jnp.zeros_like, a) for a in args)
  cts = jax.lax.cond(spilled_TxK.any(), lambda *a: jax.vjp(f, *a[:4])[1](a[4]),
                     lambda *a: zeros(*a[:4]), x_TxD, experts, gates_TxK, fp8_states, dy_TxD)
  return (*cts, None, None)


_spill.defvjp(_spill_fwd, _spill_bwd)
