"""Type plumbing for hand-written VJPs and loops that also run inside `shard_map`.

Below fp8.py and moe/ in the floors: both write custom VJPs that must hold inside shard_map.

Inside shard_map every value records the mesh axes over which it varies between devices. Loop
carries must vary like the values written into them, and a custom VJP must return each cotangent
varying exactly like its primal: where the primal was invariant over an axis (e.g. tokens are
the same on every tensor shard) the per-device cotangents are partial sums, and the implicit
broadcast they came through transposes to a psum over that axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def varying(a) -> frozenset:
  # jax 0.10 records the varying axes in `manual_axis_type` (earlier versions: `vma`).
  return getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", frozenset())


def zeros(shape, dtype, *like) -> jax.Array:
  """Zeros that vary over the union of the axes `like` vary over."""
  z = jnp.zeros(shape, dtype)
  axes = tuple(sorted(set().union(*(varying(a) for a in like))))
  return jax.lax.pcast(z, axes, to="varying") if axes else z


def cotangent_like(ct: jax.Array, primal: jax.Array, reduce=jax.lax.psum) -> jax.Array:
  """Sums a cotangent over the axes it varies over but its primal does not (or reduces it so
  by `reduce`, e.g. pmax for FP8 amax histories)."""
  extra = tuple(sorted(varying(ct) - varying(primal)))
  return reduce(ct, extra) if extra else ct
