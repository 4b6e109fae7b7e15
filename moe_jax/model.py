"""The DeepSeek-V3-style decoder as functions on plain pytrees, over decoder.py's Flax modules
(whose docstring gives the parameter layout, MoE state, MTP and FP8). Callers use these, never
the modules:

  init(key, model_cfg, moe_cfg) -> (params, moe_state)
  init_fp8_state(model_cfg, moe_cfg, fp8_cfg) -> fp8_state ({} unless fp8_cfg.recipe="delayed")
  apply(params, moe_state, tokens_BxS, model_cfg, moe_cfg, fp8_cfg=FP8Config(), fp8_state=None,
        routes=None) -> (logits_BxSxV, aux)
  loss(params, moe_state, batch, model_cfg, moe_cfg, fp8_cfg=FP8Config(), fp8_state=None,
       routes=None) -> (loss, metrics)
  update_moe_state(moe_state, load_LxE, moe_cfg) -> moe_state
  generate(params, moe_state, prompt_BxP, model_cfg, moe_cfg, *, max_new_tokens, key, ...)
      (generate.py, as are forward_cached and init_caches)
  param_axes / moe_state_axes(model_cfg, moe_cfg) -> logical names, from the modules' metadata
  count_params(model_cfg, moe_cfg) -> parameter counts (see params_count.py)

Router replay (RL): `routes` [B, S, L, K] int32, the experts each token used in each of the L MoE
blocks of the main model (in layer order; e.g. recorded by `forward_cached_routes` during a
rollout), replaces their top-k choice; gates and gradients come from this model's router, and
the statistics (so the bias update) from its own choice. A row with a negative id (-1: not
recorded) keeps the own choice. MTP blocks are never replayed.

Dtypes: parameters float32; the residual stream, attention and dense blocks compute in
model_cfg.dtype, the MoE layers in moe_cfg.dtype (routing always float32); logits float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_jax import decoder, moe, params_count
from moe_jax.config import FP8Config, ModelConfig, MoEConfig
from moe_jax.decoder import Transformer
# Generation is generate.py's; these stay the model's API (model.generate, ...).
from moe_jax.generate import (forward_cached, forward_cached_routes, generate,  # noqa: F401
                              init_caches)

Params = dict[str, Any]
MoEState = dict[str, dict[str, jax.Array]]

def _layer_number(name: str) -> int:
  return int(name.rsplit("_", 1)[1])


# ----------------------------------------------------------------------------- public API


def _module(model_cfg: ModelConfig, moe_cfg: MoEConfig,
            fp8_cfg: FP8Config = FP8Config(), pipe: tuple[int, int] = (1, 1)) -> Transformer:
  if moe_cfg.embed_dim != model_cfg.embed_dim:
    raise ValueError(f"moe.embed_dim={moe_cfg.embed_dim}: must equal "
                     f"model.embed_dim={model_cfg.embed_dim}")
  return Transformer(model_cfg, moe_cfg, fp8_cfg, tuple(pipe))


def _init_boxed(key: jax.Array, model_cfg: ModelConfig, moe_cfg: MoEConfig,
                fp8_cfg: FP8Config = FP8Config()) -> dict:
  # Flax init runs the forward once. Parameters depend on neither the sequence nor the expert
  # parallelism, so a two-token local forward serves, and init needs no mesh.
  moe_cfg = dataclasses.replace(moe_cfg, parallelism="none")
  return _module(model_cfg, moe_cfg, fp8_cfg).init(key, jnp.zeros((1, 2), jnp.int32))


@functools.lru_cache(maxsize=16)
def abstract_variables(model_cfg: ModelConfig, moe_cfg: MoEConfig,
                       fp8_cfg: FP8Config = FP8Config()) -> dict:
  """Boxed {"params", "moe_state"[, "fp8"]} as ShapeDtypeStructs with axis metadata; allocates
  nothing. Parameters do not depend on fp8_cfg; the "fp8" collection exists for "delayed"."""
  return jax.eval_shape(functools.partial(_init_boxed, model_cfg=model_cfg, moe_cfg=moe_cfg,
                                          fp8_cfg=fp8_cfg), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def init(key: jax.Array, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> tuple[Params, MoEState]:
  """Float32 parameters (plain nested dicts) and the zero router biases of every MoE block."""
  variables = nn.meta.unbox(_init_boxed(key, model_cfg, moe_cfg))
  return variables["params"], decoder.from_flax_state(variables.get("moe_state", {}), model_cfg)


def init_fp8_state(model_cfg: ModelConfig, moe_cfg: MoEConfig, fp8_cfg: FP8Config) -> dict:
  """The delayed-scaling state of every FP8 matrix (zero histories: the first step scales by
  the current amax), a tree mirroring the parameters' paths; {} for the stateless recipes."""
  if fp8_cfg.recipe != "delayed":
    return {}
  shapes = abstract_variables(model_cfg, moe_cfg, fp8_cfg)["fp8"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _names(boxed: Any) -> Any:
  return jax.tree.map(tuple, nn.get_partition_spec(boxed),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_axes(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Any:
  """Logical axis names (a tuple per leaf) of `init`'s params, read from the modules."""
  return _names(abstract_variables(model_cfg, moe_cfg)["params"])


def moe_state_axes(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Any:
  """Logical axis names of `init`'s moe_state."""
  flax_state = abstract_variables(model_cfg, moe_cfg).get("moe_state", {})
  return decoder.from_flax_state(_names(flax_state), model_cfg)


def _variables(params: Params, moe_state: MoEState, model_cfg: ModelConfig,
               fp8_cfg: FP8Config = FP8Config(), fp8_state: Optional[dict] = None) -> dict:
  variables = {"params": params, "moe_state": decoder.to_flax_state(moe_state, model_cfg)}
  if fp8_cfg.recipe == "delayed":
    if not fp8_state:
      raise ValueError("fp8 recipe='delayed' needs fp8_state=model.init_fp8_state(...)")
    variables["fp8"] = fp8_state
  elif fp8_state:
    raise ValueError(f"fp8 recipe={fp8_cfg.recipe!r} keeps no state; got fp8_state")
  return variables


def _stack_aux(auxes: list[dict], mtp_logits: list[jax.Array], moe_cfg: MoEConfig) -> dict:
  keys = ("load", "max_vio", "dropped_fraction", "aux_loss", "seq_aux_loss", "z_loss")
  if auxes:
    aux = {k: jnp.stack([a[k] for a in auxes]).astype(jnp.float32) for k in keys}
    aux["balance_loss"] = sum(a["balance_loss"] for a in auxes)
  else:  # a dense model: empty per-layer statistics keep the output structure fixed
    aux = {k: jnp.zeros((0,), jnp.float32) for k in keys}
    aux["load"] = jnp.zeros((0, moe_cfg.num_experts), jnp.float32)
    aux["balance_loss"] = jnp.zeros((), jnp.float32)
  aux["mtp_logits"] = jnp.stack(mtp_logits) if mtp_logits else None
  return aux


def check_routes(routes, tokens_BxS, model_cfg: ModelConfig, moe_cfg: MoEConfig):
  """routes must be integer experts [B, S, MoE blocks of the main model, top_k]."""
  want = tuple(tokens_BxS.shape) + (decoder.main_moe_blocks(model_cfg), moe_cfg.top_k)
  if routes is not None and (tuple(routes.shape) != want or
                             not jnp.issubdtype(routes.dtype, jnp.integer)):
    raise ValueError(f"routes: {routes.dtype}{list(routes.shape)} must be integer experts of "
                     f"shape {list(want)} (batch, seq, MoE blocks of the main model, top_k)")


@functools.partial(jax.jit, static_argnums=(3, 4, 5), static_argnames=("pipe",))
def apply(params: Params, moe_state: MoEState, tokens_BxS: jax.Array, model_cfg: ModelConfig,
          moe_cfg: MoEConfig, fp8_cfg: FP8Config = FP8Config(),
          fp8_state: Optional[dict] = None, routes=None, *, pipe=(1, 1)) -> tuple[jax.Array, dict]:
  """Training forward, dense projections in FP8 per fp8_cfg, routing replayed from `routes`
  [B, S, L, K] when given (module doc). Returns (logits_BxSxV float32, aux).

  aux: "load" [L_moe, E], "max_vio" / "dropped_fraction" / "aux_loss" / "seq_aux_loss" /
  "z_loss" [L_moe], "balance_loss" (sum of the blocks' weighted balance losses) and
  "mtp_logits" [mtp_depth, B, S, V] (None without MTP), "experts" [B, S, L, K] int32 (the own
  choice of the main model's MoE blocks, replay or not).
  pipe: (micro-batches, repeats) of the pipeline (pipeline.py), used on a mesh with stage > 1
  or with more than one micro-batch.
  """
  check_routes(routes, tokens_BxS, model_cfg, moe_cfg)
  logits_BxSxV, mtp_logits, auxes, _ = _module(model_cfg, moe_cfg, fp8_cfg, pipe).apply(
      _variables(params, moe_state, model_cfg, fp8_cfg, fp8_state), tokens_BxS,
      routes_BxTxLxK=routes)
  aux = _stack_aux(auxes, mtp_logits, moe_cfg)
  main = auxes[:decoder.main_moe_blocks(model_cfg)]
  aux["experts"] = jnp.stack([a["experts"] for a in main], axis=2) if main else \
      jnp.zeros(tokens_BxS.shape + (0, moe_cfg.top_k), jnp.int32)
  return logits_BxSxV, aux


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array,
                  mask_BxS: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of the targets over the positions where mask holds."""
  logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
  nll_BxS = -jnp.take_along_axis(logp_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  mask_BxS = mask_BxS.astype(jnp.float32)
  return jnp.sum(nll_BxS * mask_BxS) / jnp.maximum(jnp.sum(mask_BxS), 1.0)


@functools.partial(jax.jit, static_argnums=(3, 4, 5), static_argnames=("pipe",))
def loss(params: Params, moe_state: MoEState, batch: dict[str, jax.Array],
         model_cfg: ModelConfig, moe_cfg: MoEConfig, fp8_cfg: FP8Config = FP8Config(),
         fp8_state: Optional[dict] = None, mtp_weight=None, routes=None, *,
         pipe=(1, 1)) -> tuple[jax.Array, dict]:
  """ce + mtp_weight * mtp_ce + balance_loss; targets equal to pad_id are ignored. mtp_weight
  (traced or not) defaults to model_cfg.mtp_loss_weight; a trainer passes its schedule's value.
  routes: router replay for the inputs (see `apply`); pipe: the pipeline's (see `apply`).
  For "delayed", the gradient w.r.t. fp8_state is the updated state (see the module docstring)."""
  logits_BxSxV, aux = apply(params, moe_state, batch["inputs"], model_cfg, moe_cfg, fp8_cfg,
                            fp8_state, routes, pipe=pipe)
  targets_BxS = batch["targets"]
  S = targets_BxS.shape[1]
  valid_BxS = targets_BxS != model_cfg.pad_id
  ce = cross_entropy(logits_BxSxV, targets_BxS, valid_BxS)
  mtp_ce = jnp.zeros((), jnp.float32)
  for k in range(model_cfg.mtp_depth):
    # Depth k at position i predicts targets[i + k + 1]; the wrapped tail has no target.
    has_target_1xS = (jnp.arange(S) < S - k - 1)[None, :]
    mtp_ce += cross_entropy(aux["mtp_logits"][k], jnp.roll(targets_BxS, -(k + 1), axis=1),
                            jnp.roll(valid_BxS, -(k + 1), axis=1) & has_target_1xS)
  mtp_ce = mtp_ce / max(model_cfg.mtp_depth, 1)
  if mtp_weight is None:
    mtp_weight = model_cfg.mtp_loss_weight
  total = ce + mtp_weight * mtp_ce + aux["balance_loss"]
  metrics = {"loss": total, "ce": ce, "mtp_ce": mtp_ce}
  metrics.update({k: v for k, v in aux.items() if k not in ("mtp_logits", "experts")})
  return total, metrics


def update_moe_state(moe_state: MoEState, load_LxE: jax.Array, moe_cfg: MoEConfig) -> MoEState:
  """The aux-loss-free bias step for every MoE block; row l of load is the l-th layer in order."""
  names = sorted(moe_state, key=_layer_number)
  if load_LxE.shape[0] != len(names):
    raise ValueError(f"load has {load_LxE.shape[0]} rows for {len(names)} MoE blocks")
  return {name: moe.update_bias(moe_state[name], load_LxE[i], moe_cfg)
          for i, name in enumerate(names)}


def count_params(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict:
  """Total and activated-per-token parameter counts, main model and MTP apart (no allocation)."""
  return params_count.count(abstract_variables(model_cfg, moe_cfg)["params"], moe_cfg)
