"""Pipeline parallelism over the `stage` mesh axis: the decoder's MoE blocks split into stages,
micro-batches flowing through them, all under one jit.

Form (MaxText's "circular pipeline", rebuilt here): the blocks' weights are stacked
w[P_stage, R, C, ...] (P stages, R repeats, C blocks per chunk; block l = (r * P + s) * C + c
sits on stage s), and one tick runs every stage at once, `jax.vmap` over the stage dim with
`spmd_axis_name=stage` so that each stage's devices run their own chunk. Between ticks the stage
buffer x[P_stage, b, S, D] shifts by one (`jnp.roll`: the partitioner lowers it to one
collective-permute), the last stage's output wrapping around to stage 0. Inside a stage
everything else is as without a pipeline: the expert-parallel layer's all-to-all over `expert`,
FSDP over `fsdp`, the router-bias statistics over the stage's tokens.

Schedule: work item k = r * M + m (repeat r of micro-batch m) runs on stage s at tick k + s, so
there are R * M + P - 1 ticks and the bubble (idle stage-ticks / all stage-ticks) is
(P - 1) / (R * M + P - 1). R = 1 is GPipe; R > 1 is the interleaved (circular) schedule, which
needs M >= P: micro-batch m re-enters stage 0 for repeat r at tick r * M + m, after the last
stage finished its repeat r - 1 (at tick (r - 1) * M + m + P - 1). Autodiff runs the same
schedule backwards, so the backward pass has the same bubble; each stage-tick is rematerialised
(`jax.checkpoint`), so a stage keeps only its inputs per tick (GPipe's memory, not 1F1B's: a
reverse-mode scan cannot interleave one micro-batch's backward with another's forward).

Statistics per block are gathered per micro-batch and combined as the whole batch would give
them: loads summed, MaxVio recomputed from the summed load, the other means averaged (exact for
equal micro-batches; the Switch loss, a product of two batch means, becomes the mean of the
micro-batches' products, as in any micro-batched trainer).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import sharding
from moe_jax.moe import routing

# Per-block statistics that are means over tokens or sequences (averaged over micro-batches).
_MEANS = ("aux_loss", "seq_aux_loss", "z_loss", "dropped_fraction", "balance_loss")


def schedule(stages: int, microbatches: int, repeats: int = 1) -> np.ndarray:
  """[ticks, stages]: the work item r * M + m each stage runs at each tick, -1 when idle."""
  items = repeats * microbatches
  k = np.arange(items + stages - 1)[:, None] - np.arange(stages)[None, :]
  return np.where((k >= 0) & (k < items), k, -1)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """The schedule's idle share of stage-ticks, (P - 1) / (R * M + P - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def check(blocks: int, stages: int, microbatches: int, repeats: int, batch: int):
  """One line naming what does not fit the pipeline."""
  if blocks % (stages * repeats):
    raise ValueError(f"{blocks} MoE blocks do not split into {stages} stages x {repeats} "
                     "repeats")
  if batch % microbatches:
    raise ValueError(f"batch of {batch} sequences does not split into {microbatches} "
                     "micro-batches")
  if repeats > 1 and microbatches < stages:
    raise ValueError(f"the interleaved schedule ({repeats} repeats) needs micro-batches "
                     f"({microbatches}) >= stages ({stages})")


def _stack(trees: list, stages: int, repeats: int) -> Any:
  """Per-block trees in block order -> leaves [P, R, C, ...] (block (r * P + s) * C + c)."""
  def stack(*leaves):
    a = jnp.stack(leaves)
    a = a.reshape((repeats, stages, -1) + a.shape[1:]).swapaxes(0, 1)
    return sharding.constrain_stages(a)
  return jax.tree.map(stack, *trees)


def _stage_body(layer_fn: Callable, chunks: int):
  """One stage at one tick: its chunk of repeat r on x -> (x, statistics [C, ...])."""
  def body(params_RxC, states_RxC, r, x):
    auxes = []
    for c in range(chunks):
      pick = lambda a, c=c: a[r, c]
      x, aux = layer_fn(jax.tree.map(pick, params_RxC), jax.tree.map(pick, states_RxC), x)
      auxes.append(aux)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)
  return body


def _record(acc: dict, aux: dict, valid_P, r_P, m_P, repeats: int, microbatches: int) -> dict:
  """Adds this tick's per-stage statistics to acc [P, R, C, ...]; experts go to their slot."""
  hit_PxR = jax.nn.one_hot(r_P, repeats) * valid_P[:, None]
  out = {}
  for key, value in aux.items():
    if key == "experts":  # [P, C, b, S, K] -> slot (r, m) of [P, R, C, M, b, S, K]
      slot = hit_PxR[:, :, None, None] * jax.nn.one_hot(m_P, microbatches)[:, None, None, :]
      slot = slot.reshape(slot.shape + (1,) * (value.ndim - 2)) > 0
      out[key] = jnp.where(slot, value[:, None, :, None], acc[key])
    else:
      w = hit_PxR.reshape(hit_PxR.shape + (1,) * (value.ndim - 1))
      out[key] = acc[key] + w * value[:, None].astype(jnp.float32)
  return out


def run(layer_fn: Callable, params: list, states: list, x_BxSxD: jax.Array,
        microbatches: int, repeats: int = 1) -> tuple[jax.Array, list[dict], dict]:
  """The blocks `params`/`states` (block order) applied to x through the pipeline.

  layer_fn(params, state, x_bxSxD) -> (x, moe.apply's aux of that block).
  Returns (y_BxSxD, one statistics dict per block in block order, {"busy" [P]: stage-ticks
  each stage worked, "ticks"}). Micro-batch m is rows m, m + M, m + 2M, ... of x, so that each
  device's rows hold a part of every micro-batch and the split moves nothing.
  """
  P, M, R = sharding.stage_count(), microbatches, repeats
  B, S, D = x_BxSxD.shape
  check(len(params), P, M, R, B)
  C = len(params) // (P * R)
  w, st = _stack(params, P, R), _stack(states, P, R)
  xs_MxbxSxD = x_BxSxD.reshape(B // M, M, S, D).swapaxes(0, 1)
  with sharding.stage_local():
    step = jax.vmap(jax.checkpoint(_stage_body(layer_fn, C)),
                    spmd_axis_name=sharding.STAGE_AXIS)
    aux_shapes = jax.eval_shape(step, w, st, jnp.zeros((P,), jnp.int32),
                                jnp.zeros((P,) + xs_MxbxSxD.shape[1:], x_BxSxD.dtype))[1]
  acc = {k: jnp.zeros((P, R) + v.shape[1:2] + ((M,) if k == "experts" else ()) + v.shape[2:],
                      v.dtype if k == "experts" else jnp.float32)
         for k, v in aux_shapes.items()}
  stage_P = jnp.arange(P)
  buf = jnp.zeros((P,) + xs_MxbxSxD.shape[1:], x_BxSxD.dtype)

  def tick(carry, t):
    buf, out, acc, busy = carry
    k_P = t - stage_P
    valid_P = (k_P >= 0) & (k_P < R * M)
    k_P = jnp.clip(k_P, 0, R * M - 1)
    r_P, m_P = k_P // M, k_P % M
    # Stage 0 takes a new micro-batch in repeat 0, else the last stage's previous output.
    first = jnp.where(r_P[0] == 0, xs_MxbxSxD[m_P[0]], out[m_P[0]])
    inputs = jnp.where((stage_P == 0)[:, None, None, None], first[None], buf)
    with sharding.stage_local():
      y, aux = step(w, st, r_P, sharding.constrain_stages(inputs))
    out = out.at[m_P[-1]].set(jnp.where(valid_P[-1], y[-1], out[m_P[-1]]))
    acc = _record(acc, aux, valid_P, r_P, m_P, R, M)
    return (jnp.roll(y, 1, axis=0), out, acc, busy + valid_P.astype(jnp.int32)), None

  ticks = R * M + P - 1
  carry = (buf, jnp.zeros_like(xs_MxbxSxD), acc, jnp.zeros((P,), jnp.int32))
  (_, out, acc, busy), _ = jax.lax.scan(tick, carry, jnp.arange(ticks))
  y_BxSxD = out.swapaxes(0, 1).reshape(B, S, D)
  return y_BxSxD, _per_block(acc, P, R, C, M), {"busy": busy, "ticks": ticks}


def _per_block(acc: dict, stages: int, repeats: int, chunks: int, microbatches: int
               ) -> list[dict]:
  """acc [P, R, C, ...] -> one statistics dict per block, combined over micro-batches."""
  blocks = []
  for r in range(repeats):
    for s in range(stages):
      for c in range(chunks):
        aux = {k: v[s, r, c] for k, v in acc.items()}
        for key in _MEANS:
          if key in aux:
            aux[key] = aux[key] / microbatches
        if "load" in aux:
          aux["max_vio"] = routing.max_violation(aux["load"])
        if "experts" in aux:  # [M, b, S, K] -> rows in batch order
          e = aux["experts"].swapaxes(0, 1)
          aux["experts"] = e.reshape((-1,) + e.shape[2:])
        blocks.append(aux)
  return blocks
