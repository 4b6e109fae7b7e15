"""The per-expert products the grouped kernels are written over: plain, or FP8.

A kernel (padded.py's loop, grouped.py's ragged SwiGLU) fixes where rows go; a product fixes
how one expert's rows multiply one of its matrices. `Plain` multiplies in the compute dtype
(gate and up side by side, one [D, 2F] product); `FP8(cfg)` quantizes each matrix on its own
(fp8.forward / fp8.backward per call, one call per bucket or block: "tensor" takes each
expert's amax over a call's rows, blockwise dw tiles its tokens from a call's first row) and,
for "delayed", keeps each expert's amax over all its rows for the state update, so the
history rolls once per step whatever the layout.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax import fp8
from moe_jax.config import FP8Config
from moe_jax.moe import ragged_fp8

NAMES = ("gate", "up", "down")
f32 = jnp.float32


def swiglu(x: jax.Array, dot: Callable[[jax.Array, str], jax.Array]) -> jax.Array:
  """down(silu(x @ gate) * (x @ up)), each product `dot(v, name)`: the SwiGLU formula, once."""
  return dot(jax.nn.silu(dot(x, "gate")) * dot(x, "up"), "down")


def silu_grad(a):
  """d silu(a) / da."""
  sig = jax.nn.sigmoid(a)
  return sig * (1 + a * (1 - sig))


def expert(w, e):
  return lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _gate_up(w: dict, e):
  # Side by side per expert: one wide product instead of two narrow ones, and no [E, D, 2F]
  # copy of the weights (nor a split of its gradient) per step.
  return jnp.concatenate([expert(w["gate"], e), expert(w["up"], e)], -1)


class Plain(NamedTuple):
  """Products in the compute dtype, float32 weight-gradient accumulation."""

  def weights(self, w: dict, dtype) -> dict:
    return {k: v.astype(dtype) for k, v in w.items()}

  def prepare(self, w, transpose):
    return None

  def gate_up(self, x_BxD, w, e, ctx, states):
    return x_BxD @ _gate_up(w, e)

  def down(self, h_BxF, w, e, ctx, states):
    return h_BxF @ expert(w["down"], e)

  def down_grad(self, h_BxF, dy_BxD, w, e, ctx, states):
    return dy_BxD @ expert(w["down"], e).T, jnp.dot(h_BxF.T, dy_BxD, preferred_element_type=f32)

  def gate_up_grad(self, x_BxD, da_BxF, db_BxF, w, e, ctx, states):
    dab_Bx2F = jnp.concatenate([da_BxF, db_BxF], -1)
    dgate_DxF, dup_DxF = jnp.split(jnp.dot(x_BxD.T, dab_Bx2F, preferred_element_type=f32), 2, -1)
    return dab_Bx2F @ _gate_up(w, e).T, dgate_DxF, dup_DxF

  def init_stats(self, states, experts, zeros):
    return {}

  def observe(self, stats, e, seen):
    return stats

  def new_states(self, stats, w, states):
    return {}

  def ragged_dot(self, x_RxK, w_ExKxN, group_sizes_E, state):
    return lax.ragged_dot(x_RxK, w_ExKxN.astype(x_RxK.dtype), group_sizes_E)


PLAIN = Plain()


class FP8(NamedTuple):
  """Every product FP8 per `cfg` (fp8.py), from the float32 master weights."""
  cfg: FP8Config

  def weights(self, w: dict, dtype) -> dict:
    return w

  def prepare(self, w, transpose):
    """"blockwise": every expert's FP8 weight blocks, quantized once for the whole loop rather
    than once per step (the loop runs ~90 blocks per layer at tiny_moe's size)."""
    if self.cfg.recipe != "blockwise":
      return None
    return {k: fp8.weight_blocks(self.cfg, v, transpose) for k, v in w.items()}

  def _args(self, w, name, e, ctx, states):
    """Expert e's matrix, its "delayed" state and "blockwise" blocks, as groups of one."""
    one = lambda v: lax.dynamic_index_in_dim(v, e, axis=0, keepdims=True)
    state = {k: one(h) for k, h in states[name].items()} if states else {}
    return one(w[name]), state, None if ctx is None else tuple(one(b) for b in ctx[name])

  def _forward(self, x, w, name, e, ctx, states):
    w_e, state, blocks = self._args(w, name, e, ctx, states)
    return fp8.forward(self.cfg, x[None], w_e, state, blocks)[0].astype(x.dtype)

  def _backward(self, x, g, w, name, e, ctx, states):
    w_e, state, blocks = self._args(w, name, e, ctx, states)
    dx, dw = fp8.backward(self.cfg, x[None], w_e, g[None], state, blocks)
    return dx[0].astype(x.dtype), dw[0]

  def gate_up(self, x_BxD, w, e, ctx, states):
    return jnp.concatenate([self._forward(x_BxD, w, "gate", e, ctx, states),
                            self._forward(x_BxD, w, "up", e, ctx, states)], -1)

  def down(self, h_BxF, w, e, ctx, states):
    return self._forward(h_BxF, w, "down", e, ctx, states)

  def down_grad(self, h_BxF, dy_BxD, w, e, ctx, states):
    return self._backward(h_BxF, dy_BxD, w, "down", e, ctx, states)

  def gate_up_grad(self, x_BxD, da_BxF, db_BxF, w, e, ctx, states):
    dxa_BxD, dgate = self._backward(x_BxD, da_BxF, w, "gate", e, ctx, states)
    dxb_BxD, dup = self._backward(x_BxD, db_BxF, w, "up", e, ctx, states)
    return dxa_BxD + dxb_BxD, dgate, dup

  # "delayed" bookkeeping: each expert's amax of what its products saw, over every call.
  def init_stats(self, states, experts, zeros):
    return {k: zeros((experts,)) for k in ("x", "h", "ga", "gb", "gd")} if states else {}

  def observe(self, stats, e, seen):
    peak = lambda amax_E, v: amax_E.at[e].max(jnp.max(jnp.abs(v.astype(f32)), initial=0.0))
    return {k: peak(stats[k], seen[k]) for k in stats}

  def new_states(self, stats, w, states):
    if not states:
      return {}
    seen = {"gate": (stats["x"], stats["ga"]), "up": (stats["x"], stats["gb"]),
            "down": (stats["h"], stats["gd"])}
    new = {}
    for k in NAMES:
      now = {"x": seen[k][0], "w": fp8.tensor_amax(w[k]), "g": seen[k][1]}
      rolled = {h: fp8.roll_history(states[k][h], now[h]) for h in states[k]}
      new[k] = fp8.state_cotangent(rolled, states[k])
    return new

  def ragged_dot(self, x_RxK, w_ExKxN, group_sizes_E, state):
    return ragged_fp8.dot(self.cfg, x_RxK, w_ExKxN, group_sizes_E, state or {})


def of(cfg: FP8Config):
  """The product for a recipe ("none": plain)."""
  return PLAIN if cfg.recipe == "none" else FP8(cfg)
