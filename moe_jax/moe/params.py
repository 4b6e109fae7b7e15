"""The one table of the MoE layer's parameters, and what is built from it.

`param_specs(cfg)` gives, for every parameter, its shape, logical axes (sharding.py's names)
and initialiser. `init` (the functional layer), `model.MoE` (the Flax block) and the
expert-parallel layer's shard_map specs (parallel.py) all read it, so the layout is written
once (E routed experts, D = embed_dim, F = expert_ffn_dim, S = num_shared_experts):

    {"router":  {"kernel": [D, E]},                       # float32 always, never FP8
     "experts": {"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]},
     "shared":  {"gate": [D, S*F], "up": [D, S*F], "down": [S*F, D]}}   # absent when S = 0

With `std=None` (the standalone layer) every matrix starts at variance 1 / fan-in, where fan-in
is the dim one product contracts: D for router, gate and up, F for a routed expert's down, S*F
for the shared down. The expert dim is a batch of separate matrices, not part of any fan-in, so
routed and shared experts start at the same scale. The model passes its `init_std` instead, the
one scale of all its matrices (as V3 initialises every weight at std 0.006): the tiny default run
reaches held-out 1.4797 at step 400 from the fan-in scales and 1.3685 from init_std 0.02.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moe_jax import fp8
from moe_jax.config import FP8Config, MoEConfig

# Groups whose matrices multiply through FP8 under a recipe (the router stays float32).
FP8_GROUPS = ("experts", "shared")
# Expert weights have their own width names so that sharding.py can split them unlike dense ones.
EXPERT_IN_AXES = ("experts", "expert_embed", "expert_mlp")
EXPERT_OUT_AXES = ("experts", "expert_mlp", "expert_embed")


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]
  init: Callable  # a jax.nn.initializers function: init(key, shape, dtype)


def fan_in_init(batch_dims: int = 0) -> Callable:
  """Truncated normal of variance 1 / shape[-2]; the first `batch_dims` dims are separate
  matrices (experts), not inputs."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                              out_axis=-1, batch_axis=tuple(range(batch_dims)))


def swiglu_specs(d: int, f: int, in_axes, out_axes, init: Callable,
                 lead: tuple[int, ...] = ()) -> dict[str, ParamSpec]:
  """gate and up [..., d, f], down [..., f, d]: a SwiGLU's three matrices."""
  return {"gate": ParamSpec(lead + (d, f), in_axes, init),
          "up": ParamSpec(lead + (d, f), in_axes, init),
          "down": ParamSpec(lead + (f, d), out_axes, init)}


def param_specs(cfg: MoEConfig,
                std: Optional[float] = None) -> dict[str, dict[str, ParamSpec]]:
  """Group -> name -> (shape, logical axes, initialiser) of every MoE parameter; std: None for
  variance 1 / fan-in, else N(0, std) for every matrix."""
  d, e, f, s = cfg.embed_dim, cfg.num_experts, cfg.expert_ffn_dim, cfg.num_shared_experts
  init_for = lambda batch_dims: (fan_in_init(batch_dims) if std is None
                                 else jax.nn.initializers.normal(std))
  specs = {
      # Every token scores every expert, so the router's expert dim is never split.
      "router": {"kernel": ParamSpec((d, e), ("embed", None), init_for(0))},
      "experts": swiglu_specs(d, f, EXPERT_IN_AXES, EXPERT_OUT_AXES, init_for(1), (e,)),
  }
  if s:
    specs["shared"] = swiglu_specs(d, s * f, ("embed", "mlp"), ("mlp", "embed"), init_for(0))
  return specs


def init(key: jax.Array, cfg: MoEConfig, std: Optional[float] = None) -> tuple[dict, dict]:
  """Fresh parameters (float32 master copies) and zero router bias; std as in param_specs."""
  specs = param_specs(cfg, std)
  keys = iter(jax.random.split(key, 7))  # one per matrix of the largest layout
  params = {group: {name: spec.init(next(keys), spec.shape, jnp.float32)
                    for name, spec in table.items()} for group, table in specs.items()}
  return params, {"router_bias": jnp.zeros((cfg.num_experts,), jnp.float32)}


def init_fp8_state(cfg: MoEConfig, fp8_cfg: FP8Config) -> Optional[dict]:
  """Zero "delayed" amax histories of every FP8 matrix: [E, L] for an expert matrix, [L] for a
  shared one (None for the other recipes)."""
  if fp8_cfg.recipe != "delayed":
    return None
  length = fp8_cfg.amax_history_len
  return {group: {name: fp8.init_delayed_state(length, spec.shape[0] if len(spec.shape) == 3
                                               else None)
                  for name, spec in table.items()}
          for group, table in param_specs(cfg).items() if group in FP8_GROUPS}


def check_fp8_state(cfg: MoEConfig, fp8_cfg: FP8Config, fp8_state: Optional[dict]):
  want = init_fp8_state(cfg, fp8_cfg)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if (want is None) != (fp8_state is None) or shapes(want) != shapes(fp8_state):
    kind = "None" if want is None else "its histories"
    raise ValueError(f"fp8 recipe={fp8_cfg.recipe!r}: fp8_state must be "
                     f"moe.init_fp8_state(cfg, fp8_cfg) ({kind})")
