"""The device mesh, and the one table that maps logical axis names to mesh axes.

Layers name the dimensions of their parameters and activations with logical names ("embed",
"mlp", "experts", ...). This file alone turns those names into mesh axes; no other file in the
library spells a mesh axis (shard_map bodies use the constants below).

Notation (scaling-book): `A[B_X, D_Y]` is an array with dims B and D where B is split over mesh
axis X and D over mesh axis Y; a dim without subscript is replicated. `B_XY` is split over the
product of X and Y. With the mesh axes data (D), stage (P), fsdp (F), expert (E), tensor (T):

  tokens      x[B_DPFE, S, M]          every non-tensor axis splits the batch: the expert axis is
                                       extra data parallelism outside the MoE layer, which is what
                                       lets the MoE layer all-to-all tokens over it.
  dense       w_in[M_PF, H_T]          FSDP: parameters' embed dim is split over stage and fsdp
              w_out[H_T, M_PF]         and gathered (all-gather forward, reduce-scatter backward)
                                       where used; a pipeline stage gathers only its own blocks.
  experts     w[X_E, M_PF, H_T]        expert-parallel over expert, FSDP over stage and fsdp,
                                       Megatron over tensor.
  exchange    y[X_E, B_DF, M]          after the all-to-all each expert shard holds tokens from its
                                       whole expert group ("expert_tokens").
  logits      z[B_DPFE, S, V_T]
  pipeline    w[P_P, L, ...]           the MoE blocks' weights stacked by stage ("stages") and
              x[P_P, b_DFE, S, M]      layer within it ("layers"); a stage's micro-batch buffer.
                                       Inside a stage (`stage_local`) no name maps to stage: the
                                       stage dim is the vmapped one (pipeline.py).

A mesh axis splits at most one dim of an array. When two names of one array want the same mesh
axis, the rule listed first in `RULES` wins and the other dim gets no mesh axis at all (flax's
rule, and flax does the conversion). That is how one name serves both parameters and
activations: w[M_F, H_T] shards embed over fsdp, while x[B_DFE, S, M] keeps embed replicated
because batch, listed first, already holds fsdp.

A shard_map body that needs a weight gathered over fsdp asks for its spec with None in place of
the FSDP-sharded name; with Auto axes (below) the partitioner inserts the all-gather at entry.

Axis types: the mesh uses `AxisType.Auto` on every axis, not `jax.make_mesh`'s default
`Explicit`. Explicit axes put shardings into types: shard_map inputs must already carry their
in_specs exactly (no implicit FSDP gather), and contractions over sharded dims raise
`ShardingTypeError` unless every call passes `out_sharding`, which Flax layers do not. Auto axes
keep the GSPMD contract this codebase relies on: jit in/out shardings, `constrain` at block
boundaries, shard_map only where collectives are explicit.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moe_jax.config import MESH_AXES, MeshConfig

# Mesh axes, outermost first: data parallelism crosses the slowest links (between hosts), tensor
# parallelism the fastest (within a host).
DATA_AXIS, STAGE_AXIS, FSDP_AXIS, EXPERT_AXIS, TENSOR_AXIS = MESH_AXES
# The axes that split tokens; a psum over them reduces over the whole batch (outside a stage).
TOKEN_AXES = (DATA_AXIS, STAGE_AXIS, FSDP_AXIS, EXPERT_AXIS)

MeshAxes = Union[None, str, tuple[str, ...]]
LogicalNames = Union[Sequence[Optional[str]], PartitionSpec]

# Logical name -> mesh axes. Order is priority when two names of one array want the same axis.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", TOKEN_AXES),                      # sequences, or flattened tokens
    ("expert_tokens", (DATA_AXIS, STAGE_AXIS, FSDP_AXIS)),  # tokens after the all-to-all
    ("stages", STAGE_AXIS),                     # pipeline stages of stacked MoE blocks
    ("layers", None),                           # MoE blocks within one stage
    ("seq", None),                              # sequence length (no sequence parallelism)
    ("vocab", TENSOR_AXIS),
    ("embed", (STAGE_AXIS, FSDP_AXIS)),         # model width: FSDP on parameters (and ZeRO
                                                # over stage: pipeline.py gathers each stage's)
    ("mlp", TENSOR_AXIS),                       # dense SwiGLU hidden width
    ("heads", TENSOR_AXIS),
    ("kv_heads", TENSOR_AXIS),                  # GQA key/value heads
    ("head_dim", None),
    ("q_lora", None),                           # MLA latents: small, replicated
    ("kv_lora", None),
    ("experts", EXPERT_AXIS),
    ("expert_embed", (STAGE_AXIS, FSDP_AXIS)),  # model width of expert weights
    ("expert_mlp", TENSOR_AXIS),                # expert SwiGLU hidden width
)


def check_rules(rules: Sequence[tuple[str, MeshAxes]]) -> dict[str, MeshAxes]:
  """Returns the rules as a dict; a repeated name or an unknown mesh axis is an error."""
  table: dict[str, MeshAxes] = {}
  for name, axes in rules:
    if name in table:
      raise ValueError(f"logical axis {name!r} appears twice in the sharding rules")
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      if axis not in MESH_AXES:
        raise ValueError(f"logical axis {name!r} maps to unknown mesh axis {axis!r}")
    table[name] = axes
  return table


_TABLE = check_rules(RULES)
# True while tracing one pipeline stage's body (vmapped over the stage axis): no logical name
# may then map to the stage axis, which the vmap already holds.
_IN_STAGE = contextvars.ContextVar("in_stage", default=False)


@contextlib.contextmanager
def stage_local():
  """Traces the body of one pipeline stage: logical names stop mapping to the stage axis."""
  token = _IN_STAGE.set(True)
  try:
    yield
  finally:
    _IN_STAGE.reset(token)


def _rules() -> tuple[tuple[str, MeshAxes], ...]:
  if not _IN_STAGE.get():
    return RULES
  return tuple((name, _without(axes, {STAGE_AXIS})) for name, axes in RULES)


def in_stage() -> bool:
  """Whether a pipeline stage's body is being traced (see `stage_local`)."""
  return _IN_STAGE.get()


def token_axes() -> tuple[str, ...]:
  """The axes splitting this program's tokens: TOKEN_AXES, less stage inside a stage."""
  return tuple(a for a in TOKEN_AXES if not (_IN_STAGE.get() and a == STAGE_AXIS))


def stage_count() -> int:
  """Pipeline stages of the current mesh (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(STAGE_AXIS, 1)


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The (data, stage, fsdp, expert, tensor) mesh over all (global) devices, every axis Auto."""
  devices = jax.devices() if devices is None else list(devices)
  # jax.make_mesh silently drops devices beyond the product; a short mesh is a config error.
  config.check_devices(len(devices))
  return jax.make_mesh(tuple(config.shape.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
  """Devices along each mesh axis, e.g. {"data": 2, "stage": 1, "fsdp": 1, "expert": 4, ...}."""
  return dict(mesh.shape)


def logical_to_spec(names: LogicalNames) -> PartitionSpec:
  """The PartitionSpec for an array whose dims have these logical names (None: replicated)."""
  names = tuple(names)
  seen = set()
  for name in names:
    if name is None:
      continue
    if name not in _TABLE:
      raise ValueError(f"unknown logical axis {name!r} in {names}; known: {', '.join(_TABLE)}")
    if name in seen:
      raise ValueError(f"logical axis {name!r} names two dims of {names}")
    seen.add(name)
  return nn.logical_to_mesh_axes(names, _rules())


def shard_count(mesh: Mesh, name: str) -> int:
  """Into how many pieces the mesh splits a dim with this logical name (when alone)."""
  axes = logical_to_spec((name,))[0]
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def named_sharding(mesh: Mesh, names: LogicalNames) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names))


def _is_names(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or (
      isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))


def shard_like(tree: Any, mesh: Mesh) -> Any:
  """Maps a tree whose leaves are logical names (tuples or PartitionSpecs) to NamedShardings."""
  return jax.tree.map(lambda names: named_sharding(mesh, names), tree, is_leaf=_is_names)


def logical_axes(boxed: Any) -> Any:
  """Logical names of Flax params boxed by `nn.with_logical_partitioning` (plain leaves: ())."""
  return nn.get_partition_spec(boxed)


def param_shardings(boxed: Any, mesh: Mesh) -> Any:
  """NamedShardings for boxed Flax params, e.g. the `jax.eval_shape` of `model.init`.

  The result is a prefix of the boxed tree, so it serves as `out_shardings` of a jitted init
  that returns boxed params, and of its unboxed tree.
  """
  return shard_like(logical_axes(boxed), mesh)


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Sharding constraint on an activation; a no-op without a mesh set by `jax.set_mesh`.

  Inside shard_map the manual axes are already fixed by the in_specs, so they are dropped from
  the constraint; what remains constrains the axes the body left to the partitioner.
  """
  spec = logical_to_spec(names)  # checks the names even when there is nothing to constrain
  if len(spec) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not fit an array of shape {x.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  manual = set(mesh.manual_axes)
  if manual:
    if manual >= set(mesh.axis_names):
      return x
    spec = PartitionSpec(*(_without(axes, manual) for axes in spec))
  return jax.lax.with_sharding_constraint(x, spec)


def constrain_stages(x: jax.Array) -> jax.Array:
  """Splits dim 0 (pipeline stages) over the stage axis, other dims left to the partitioner."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or STAGE_AXIS in mesh.manual_axes:
    return x
  rest = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(STAGE_AXIS, *rest))


def _without(axes: MeshAxes, drop: set[str]) -> MeshAxes:
  if axes is None:
    return None
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a not in drop)
  return kept or None


def global_array(local_data: np.ndarray, mesh: Mesh, names: LogicalNames) -> jax.Array:
  """One global array from each process's rows (see `process_rows`); works for one process too."""
  return jax.make_array_from_process_local_data(named_sharding(mesh, names), local_data)


def process_rows(mesh: Mesh, names: LogicalNames, global_shape: Sequence[int]) -> slice:
  """The slice of dim 0 whose data this process must provide to `global_array`."""
  sharding = named_sharding(mesh, names)
  index = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
  starts = [idx[0].indices(global_shape[0])[0] for idx in index]
  stops = [idx[0].indices(global_shape[0])[1] for idx in index]
  lo, hi = min(starts), max(stops)
  # Blocks of a mesh axis that crosses processes would interleave; make_mesh orders devices so
  # that each process owns one contiguous run.
  covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
  if covered != hi - lo:
    raise ValueError(f"this process's rows of {names} are not contiguous in {global_shape}")
  return slice(lo, hi)
