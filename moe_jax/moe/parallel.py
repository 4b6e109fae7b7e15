"""The MoE layer sharded over a device mesh: experts split over the `experts` logical axis.

Two implementations, chosen by `MoEConfig.parallelism`; both give the single-device layer's
outputs and gradients (dropless), and both reduce the load statistics over every token shard, so
each device updates the router bias identically.

- `alltoall` (`shard_map`): tokens x[T_B, D] split over every token axis. Each shard routes its
  own tokens, packs them into fixed-size buckets per destination expert shard
  (send[ep, C, D]), exchanges them with one all-to-all over the expert axis, runs its local
  experts on what arrived, and sends the results back the same way. Expert weights may also be
  split over `expert_mlp` (tensor): each tensor shard then holds partial sums, and one psum at
  the end adds routed and shared experts together.
  Bucket size C: with a capacity factor, `cf * T_local * K / ep` (drops counted per destination);
  dropless, `T_local * K`, the only static size that can never overflow: up to `ep` times the
  bytes actually needed. `moe.exchange="ragged"` (the GPU/TPU default) sends only the rows that
  exist with `lax.ragged_all_to_all` into the same bucket layout, so everything around it is
  unchanged; XLA:CPU has no ragged all-to-all, so CPU keeps the padded exchange. With
  `fp8.dispatch` the rows go out in FP8 (`fp8.dispatch_rows`) through the padded exchange.
- `gshard` (SPMD einsum): tokens in groups of one shard each, one-hot dispatch into
  [experts, groups, capacity] buckets, expert einsums on expert-sharded weights, one-hot combine;
  the sharding constraints make the SPMD partitioner insert the all-to-alls. The baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import fp8, sharding
from moe_jax.config import FP8Config, MoEConfig
from moe_jax.moe import dispatch, grouped, products, routing
from moe_jax.moe.local import add_shared
from moe_jax.moe.params import param_specs

# The ragged collective; tests put an emulation here to run the ragged path on XLA:CPU.
RAGGED_ALL_TO_ALL = jax.lax.ragged_all_to_all


def resolve_exchange(exchange: str) -> str:
  if exchange != "auto":
    return exchange
  return "padded" if jax.default_backend() == "cpu" else "ragged"


def _ragged(v_RxF, fill, send_sizes_P, bucket: int):
  """Block j of `bucket` rows goes to peer j, only its first send_sizes[j] rows; this device's
  rows land in block `my index` of the peer's result, whose other rows hold `fill`."""
  ep = send_sizes_P.shape[0]
  recv_sizes_P = jax.lax.all_to_all(send_sizes_P, sharding.EXPERT_AXIS, 0, 0, tiled=True)
  offsets_P = jnp.arange(ep, dtype=jnp.int32) * bucket
  mine_P = jnp.full((ep,), jax.lax.axis_index(sharding.EXPERT_AXIS) * bucket, jnp.int32)
  return RAGGED_ALL_TO_ALL(v_RxF, jnp.full_like(v_RxF, fill), offsets_P, send_sizes_P, mine_P,
                           recv_sizes_P, axis_name=sharding.EXPERT_AXIS)


@jax.custom_vjp
def ragged_exchange(v_RxF, send_sizes_P, bucket_like_B):
  """The ragged all-to-all of bucketed rows (see `_ragged`; the bucket size is the length of
  bucket_like_B, so that it stays static), empty rows zero; its gradient is the exchange back."""
  return _ragged(v_RxF, 0, send_sizes_P, bucket_like_B.shape[0])


def _ragged_fwd(v, sizes, bucket_like):
  return ragged_exchange(v, sizes, bucket_like), (sizes, bucket_like)


def _ragged_bwd(res, g):
  sizes, bucket_like = res
  back = jax.lax.all_to_all(sizes, sharding.EXPERT_AXIS, 0, 0, tiled=True)
  return _ragged(g, 0, back, bucket_like.shape[0]), None, None


ragged_exchange.defvjp(_ragged_fwd, _ragged_bwd)

# Inside the layer weights stay split over experts and ffn width; their embed dims (fsdp) are
# gathered at the shard_map boundary.
_GATHERED = ("embed", "expert_embed")


def _mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("moe.parallelism needs a device mesh: call inside jax.set_mesh(mesh)")
  return mesh


def _check_divisible(cfg: MoEConfig, tokens: int, seq_len: int, mesh):
  ep = sharding.shard_count(mesh, "experts")
  shards = sharding.shard_count(mesh, "batch")
  if cfg.num_experts % ep:
    raise ValueError(f"moe.num_experts={cfg.num_experts}: must be divisible by the expert "
                     f"mesh axis ({ep})")
  if tokens % shards or (tokens // shards) % seq_len:
    raise ValueError(f"x has {tokens} tokens in sequences of {seq_len}: whole sequences must "
                     f"split evenly over the {shards} token shards of the mesh")


def _spec(names, mesh) -> jax.sharding.PartitionSpec:
  """The rules' spec without mesh axes of size 1, so nothing counts as varying over them (a
  psum over a size-1 axis still compiles to an all-reduce on XLA:CPU)."""
  def keep(axes):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return axes or None
  return jax.sharding.PartitionSpec(*(keep(a) for a in sharding.logical_to_spec(names)))


def _param_specs(cfg: MoEConfig, mesh) -> dict:
  """shard_map in_specs of the parameters, from the one table (params.py)."""
  local = lambda axes: tuple(None if a in _GATHERED else a for a in axes)
  return {group: {name: _spec(local(spec.axes), mesh) for name, spec in table.items()}
          for group, table in param_specs(cfg).items()}


def _fp8_state_specs(fp8_state: Optional[dict], mesh):
  """Expert histories [E, L] split like the experts; the shared ones [L] replicated."""
  if not fp8_state:
    return {}
  names = {"experts": ("experts", None), "shared": (None,)}
  return {part: jax.tree.map(lambda _: _spec(names[part], mesh), tree)
          for part, tree in fp8_state.items()}


def _alltoall_body(params, state, x_TxD, fp8_state, replay_TxK, cfg: MoEConfig, seq_len: int,
                   ep: int, tensor: int, fp8_cfg: FP8Config):
  """Runs on one device: x_TxD are its tokens (replay_TxK their replayed experts, or None),
  params["experts"] its experts (and fp8_state["experts"] their "delayed" histories).
  Returns (y, statistics, the router's own choice)."""
  t = x_TxD.shape[0]
  e_local = params["experts"]["gate"].shape[0]
  assert e_local * ep == cfg.num_experts, (e_local, ep)
  token_axes = tuple(a for a in sharding.token_axes() if jax.sharding.get_abstract_mesh().shape[a] > 1)
  total = lambda v: jax.lax.psum(v, token_axes) if token_axes else v

  own = routing.route(params, state, x_TxD, cfg)
  r = own if replay_TxK is None else routing.replay(own, replay_TxK, cfg)
  k = cfg.top_k
  bucket = dispatch.capacity(t * k, ep, cfg.capacity_factor)
  send = dispatch.make_plan(r.idx_TxK // e_local, ep, block=1, slots=bucket)
  xc_TxD = x_TxD.astype(cfg.dtype)
  x_send = dispatch.permute(xc_TxD, send, k)                            # [ep * C, D]
  # Empty slots carry the out-of-range expert id e_local, so no separate validity mask travels.
  local_expert_A = (r.idx_TxK % e_local).reshape(-1)
  expert_send = jnp.take(local_expert_A, send.src_R, mode="fill", fill_value=e_local)

  exchange = lambda v: (jax.lax.all_to_all(v, sharding.EXPERT_AXIS, 0, 0, tiled=True)
                        if ep > 1 else v)
  ragged = ep > 1 and not fp8_cfg.dispatch and resolve_exchange(cfg.exchange) == "ragged"
  if ragged:  # rows per destination shard, within its bucket
    sent_P = jnp.minimum(routing.load(r.idx_TxK // e_local, ep), bucket).astype(jnp.int32)
    bucket_like = jnp.zeros((bucket,), jnp.int8)
    x_recv = ragged_exchange(x_send, sent_P, bucket_like)
    expert_recv = _ragged(expert_send, e_local, sent_P, bucket)
    back = jax.lax.all_to_all(sent_P, sharding.EXPERT_AXIS, 0, 0, tiled=True)
    exchange = lambda v: ragged_exchange(v, back, bucket_like)
  elif fp8_cfg.dispatch:
    x_recv = fp8.dispatch_rows(x_send, fp8_cfg, sharding.EXPERT_AXIS if ep > 1 else None)
    expert_recv = exchange(expert_send)
  else:
    x_recv = exchange(x_send)
    expert_recv = exchange(expert_send)

  backend = grouped.resolve_backend(cfg.grouped_backend)
  block, bucket = grouped.layout(t * k, e_local, backend)
  local = dispatch.make_plan(expert_recv[:, None], e_local, block=block, bucket=bucket,
                             valid_TxK=expert_recv[:, None] < e_local)
  # Each received row is one slot of gate 1.
  ones = jnp.ones((x_recv.shape[0], 1), x_recv.dtype)
  y_recv = grouped.routed(x_recv, params["experts"], ones, local, backend, fp8_cfg,
                          fp8_state.get("experts"))
  y_TxD = dispatch.combine(exchange(y_recv), r.gates_TxK, send)
  y_TxD = add_shared(y_TxD, xc_TxD, params, fp8_cfg, fp8_state)
  # Expert and shared weights split over ffn give partial sums; one reduction adds both.
  if tensor > 1:
    y_TxD = jax.lax.psum(y_TxD, sharding.TENSOR_AXIS)
  return y_TxD, routing.statistics(own, send.kept, seq_len, cfg, total=total), own.idx_TxK


def apply_alltoall(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig, seq_len: int,
                   fp8_cfg: FP8Config, fp8_state: dict,
                   replay_TxK: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The layer in shard_map: each device routes its tokens and runs its experts (module doc)."""
  mesh = _mesh()
  _check_divisible(cfg, x_TxD.shape[0], seq_len, mesh)
  ep = sharding.shard_count(mesh, "experts")
  tensor = sharding.shard_count(mesh, "expert_mlp")
  tokens = _spec(("batch", None), mesh)
  # Replayed experts are split like the tokens they belong to.
  body = lambda p, s, x, f, *rep: _alltoall_body(p, s, x, f, *(rep or (None,)), cfg, seq_len,
                                                 ep, tensor, fp8_cfg)
  replay = () if replay_TxK is None else (replay_TxK,)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(_param_specs(cfg, mesh), {"router_bias": _spec((None,), mesh)},
                               tokens, _fp8_state_specs(fp8_state, mesh)) + (tokens,) * len(replay),
                     out_specs=(tokens, jax.sharding.PartitionSpec(), tokens),
                     # Batched over pipeline stages (pipeline.py), jax 0.10.2's varying-axes
                     # check trips over an iota inside one_hot; tests check the gradients.
                     check_vma=not sharding.in_stage())
  y_TxD, aux, experts_TxK = fn(params, state, x_TxD, fp8_state, *replay)
  return y_TxD, dict(aux, experts=experts_TxK)


def apply_gshard(params: dict, state: dict, x_TxD: jax.Array, cfg: MoEConfig, seq_len: int,
                 fp8_cfg: FP8Config, fp8_state: dict,
                 replay_TxK: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The layer as SPMD einsums over one-hot buckets; the partitioner inserts the exchanges."""
  mesh = _mesh()
  _check_divisible(cfg, x_TxD.shape[0], seq_len, mesh)
  t, d = x_TxD.shape
  g = sharding.shard_count(mesh, "batch")
  s, k, e = t // g, cfg.top_k, cfg.num_experts
  # Dropless: a token picks distinct experts, so no expert gets more than the group's tokens.
  cap = s if cfg.capacity_factor is None else min(s, math.ceil(cfg.capacity_factor * s * k / e))

  x_TxD = sharding.constrain(x_TxD, ("batch", None))
  # Routing is per token; left to the partitioner, top_k would gather every score everywhere.
  tokens = _spec(("batch", None), mesh)
  replicated = jax.sharding.PartitionSpec()
  def route(p, s, x, *replay):  # -> (the router's own route, the route dispatched)
    own = routing.route(p, s, x, cfg)
    return own, routing.replay(own, replay[0], cfg) if replay else own
  replay = () if replay_TxK is None else (replay_TxK,)
  r, used = jax.shard_map(
      route, mesh=mesh,
      in_specs=({"router": {"kernel": replicated}}, {"router_bias": replicated}, tokens) +
      (tokens,) * len(replay),
      out_specs=(routing.Route(*(tokens,) * 4),) * 2)({"router": params["router"]}, state,
                                                      x_TxD, *replay)
  idx_TxK, gates_TxK = used.idx_TxK, used.gates_TxK
  x_TxD = x_TxD.astype(cfg.dtype)
  # The partitioner's all-to-alls carry the compute dtype; fp8.dispatch only rounds as the
  # alltoall layer's FP8 dispatch does, so that both give the same numbers.
  xr_TxD = fp8.dispatch_rows(x_TxD, fp8_cfg) if fp8_cfg.dispatch else x_TxD
  # Position of each assignment in its expert's bucket, first come first served per group.
  onehot_GxSKxE = jax.nn.one_hot(idx_TxK.reshape(g, s * k), e, dtype=jnp.int32)
  position_GxSKxE = jnp.cumsum(onehot_GxSKxE, axis=1) * onehot_GxSKxE - 1
  position_GxSxK = position_GxSKxE.max(-1).reshape(g, s, k)
  kept_GxSxK = position_GxSxK < cap
  slot_GxSxKxC = jax.nn.one_hot(jnp.where(kept_GxSxK, position_GxSxK, cap), cap, dtype=x_TxD.dtype)
  expert_GxSxKxE = jax.nn.one_hot(idx_TxK.reshape(g, s, k), e, dtype=x_TxD.dtype)
  dispatch_GxSxExC = jnp.einsum("gske,gskc->gsec", expert_GxSxKxE, slot_GxSxKxC)
  combine_GxSxExC = jnp.einsum("gske,gskc,gsk->gsec", expert_GxSxKxE, slot_GxSxKxC,
                               gates_TxK.reshape(g, s, k).astype(x_TxD.dtype))

  x_GxSxD = sharding.constrain(xr_TxD.reshape(g, s, d), ("batch", None, None))
  x_ExGxCxD = jnp.einsum("gsec,gsd->egcd", dispatch_GxSxExC, x_GxSxD)
  x_ExGxCxD = sharding.constrain(x_ExGxCxD, ("experts", "expert_tokens", None, None))
  # One product per expert over all its groups' slots (empty slots are zero rows), FP8 or not.
  ew, st = params["experts"], fp8_state.get("experts", {})
  y_ExMxD = products.swiglu(x_ExGxCxD.reshape(e, g * cap, d), lambda v, name: (
      fp8.fp8_grouped_dot(v, ew[name], fp8_cfg, st.get(name))))
  y_ExGxCxD = sharding.constrain(y_ExMxD.reshape(e, g, cap, d),
                                ("experts", "expert_tokens", None, None))
  y_GxSxD = jnp.einsum("gsec,egcd->gsd", combine_GxSxExC, y_ExGxCxD)
  y_TxD = sharding.constrain(y_GxSxD.reshape(t, d), ("batch", None))
  y_TxD = add_shared(y_TxD, x_TxD, params, fp8_cfg, fp8_state)
  return y_TxD, dict(routing.statistics(r, kept_GxSxK.sum(), seq_len, cfg), experts=r.idx_TxK)
