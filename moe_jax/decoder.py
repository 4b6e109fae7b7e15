"""The decoder's Flax modules: embeddings, first_k_dense dense blocks, MoE blocks, MTP modules.

Thin modules that create every parameter with logical axis names and call the pure functions
(`attention.attention_apply`, `moe.apply`, `moe.swiglu`, `project`); model.py is the
functional API over them, and callers use that, never the modules.

Parameters (float32, plain nested dicts):
  embed/embedding [V, D]; layer_<i>/{attn_norm, attn, ffn_norm, ffn}; final_norm; head/kernel
  [D, V] (untied, as V3); mtp_<k>/{embed_norm, hidden_norm, proj [2D, D], block, final_norm}.
  A dense ffn is {gate, up, down}; an MoE ffn has moe.init's layout {router, experts, shared}.

MoE state: {"layer_<i>": {"router_bias": [E]}} for every MoE block, numbered as in V3's
checkpoint: main blocks first_k_dense..L-1, then MTP module k's block as layer L+k. Every
per-layer aux array (`load` [L_moe, E], ...) has one row per entry, in ascending layer number.
The bias is a Flax variable collection ("moe_state"), never a parameter, so it gets no gradient.

Multi-token prediction (V3 section 2.2): module k (0-based) at position i combines the previous
depth's hidden state h_i (the main model's last block output for k = 0) with the embedding of
token i+k+1, projects [2D -> D], runs one block and the shared output head, and so predicts
token i+k+2. The module reads the input tokens shifted left by k+1 (wrapping around); its last
k+1 positions have no target and are left out of the MTP loss. Concatenation order is
[norm(embedding); norm(hidden)], the order of the released V3 weights' eh_proj.

FP8 (fp8_cfg.recipe != "none"; see fp8.py): every dense projection multiplies through `fp8_dot`:
attention's wq/wq_a/wq_b/wkv_a/wkv_b/wo (MHA: wq/wk/wv/wo), the dense blocks' gate/up/down and
the MTP projection; so do the MoE layers' routed experts (per-expert scales,
moe/products.py) and shared experts, and with fp8_cfg.dispatch the expert all-to-all carries
FP8 activations (fp8.dispatch_rows). The router, embeddings, output head, norms and attention
scores/softmax stay in the compute dtype or float32, as in V3. Not yet: generation
(`forward_cached` has no fp8_cfg).
"delayed" keeps one amax-history state per quantized matrix, fp8_state, a tree mirroring the
parameters' paths ({"layer_0": {"attn": {"wq": {"x", "w", "g"}}}, ...}; an expert matrix's
histories are [E, L], under "ffn"/"experts"; the modules' "fp8" collection). Its gradient from
`loss` is the updated state (fp8.py's docstring): a trainer replaces the state with it and never
feeds it to the optimizer.

Dtypes: parameters float32; the residual stream, attention and dense blocks compute in
model_cfg.dtype, the MoE layers in moe_cfg.dtype (routing always float32); logits float32.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import attention, moe, pipeline, sharding
from moe_jax.config import FP8Config, ModelConfig, MoEConfig
from moe_jax.fp8 import Matmuls
from moe_jax.layers import RMSNorm, fp8_matmuls, logical_param
from moe_jax.moe.params import ParamSpec

Params = dict

ACTIVATION_AXES = ("batch", "seq", "embed")
LOGIT_AXES = ("batch", "seq", "vocab")


def project(x: jax.Array, w_KxN: jax.Array, out_dtype=None) -> jax.Array:
  """x [..., K] @ w [K, N] in x's dtype, never FP8: the output head. The FP8 seam of the
  dense projections is `fp8.Matmuls` (`Dense` modules), of attention its `matmuls` argument."""
  return jnp.matmul(x, w_KxN.astype(x.dtype), preferred_element_type=out_dtype)


def _normal_specs(std: float, specs) -> tuple:
  """((name, shape, axes), ...) -> a parameter table of N(0, std) matrices."""
  init = nn.initializers.normal(stddev=std)
  return tuple((name, ParamSpec(tuple(shape), tuple(axes), init)) for name, shape, axes in specs)


def _dense_ffn_specs(cfg: ModelConfig) -> tuple:
  d, f = cfg.embed_dim, cfg.dense_ffn_dim
  return _normal_specs(cfg.init_std, (("gate", (d, f), ("embed", "mlp")),
                                      ("up", (d, f), ("embed", "mlp")),
                                      ("down", (f, d), ("mlp", "embed"))))


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
  """Block `index` (MTP blocks numbered from num_layers) is MoE; MTP blocks follow the model."""
  return cfg.first_k_dense < cfg.num_layers and index >= cfg.first_k_dense


def main_moe_blocks(cfg: ModelConfig) -> int:
  """How many MoE blocks the main model has (the L of router replay's routes)."""
  return sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))


def _table_params(module: nn.Module, specs: tuple) -> Params:
  return {name: logical_param(module, name, spec.init, spec.shape, spec.axes)
          for name, spec in specs}


class Weights(nn.Module):
  """A group of float32 parameters: specs ((name, ParamSpec), ...) -> {name: array}."""
  specs: tuple

  @nn.compact
  def __call__(self) -> Params:
    return _table_params(self, self.specs)


class Dense(nn.Module):
  """Weights of dense projections: -> (params, their fp8.Matmuls under fp8_cfg, whose "delayed"
  states sit in the "fp8" collection under the same path as the parameters)."""
  specs: tuple
  fp8_cfg: FP8Config
  groups: Optional[int] = None  # stacked expert matrices: "delayed" histories [groups, L]

  @nn.compact
  def __call__(self) -> tuple[Params, Matmuls]:
    params = _table_params(self, self.specs)
    return params, fp8_matmuls(self, list(params), self.fp8_cfg, self.groups)


class MoE(nn.Module):
  """moe.apply over the parameters of moe.param_specs (the router a Weights group, experts and
  shared experts Dense groups); the router bias is a "moe_state" variable, the "delayed" FP8
  histories "fp8" variables under the parameters' paths ("experts", "shared")."""
  cfg: MoEConfig
  std: float  # the model's init_std, the scale of all its matrices
  fp8_cfg: FP8Config = FP8Config()

  @nn.compact
  def __call__(self, x_BxSxD: jax.Array, replay_BxSxK: Optional[jax.Array] = None
               ) -> tuple[jax.Array, dict]:
    table = {group: tuple(specs.items())
             for group, specs in moe.param_specs(self.cfg, self.std).items()}
    params, states = {"router": Weights(table.pop("router"), name="router")()}, {}
    for group, specs in table.items():
      groups = self.cfg.num_experts if group == "experts" else None
      params[group], matmuls = Dense(specs, self.fp8_cfg, groups, name=group)()
      states[group] = matmuls.states
    bias = self.variable("moe_state", "router_bias", nn.with_logical_partitioning(jnp.zeros, (None,)),
                         (self.cfg.num_experts,), jnp.float32)
    fp8_state = states if self.fp8_cfg.recipe == "delayed" else None
    return moe.apply(params, {"router_bias": bias.value}, x_BxSxD, self.cfg,
                     fp8_cfg=self.fp8_cfg, fp8_state=fp8_state, replay=replay_BxSxK)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn dense or MoE."""
  cfg: ModelConfig
  moe_cfg: Optional[MoEConfig]  # None: dense SwiGLU of width cfg.dense_ffn_dim
  fp8_cfg: FP8Config = FP8Config()

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, pos=0, cache: Optional[attention.Cache] = None,
               replay_BxTxK: Optional[jax.Array] = None):
    cfg = self.cfg
    h_BxTxD, cache = attention.Attention(cfg, fp8_cfg=self.fp8_cfg, name="attn")(
        RMSNorm(cfg.norm_eps, name="attn_norm")(x_BxTxD), pos, cache)
    x_BxTxD = x_BxTxD + h_BxTxD
    h_BxTxD = RMSNorm(cfg.norm_eps, name="ffn_norm")(x_BxTxD)
    if self.moe_cfg is None:
      w, matmuls = Dense(_dense_ffn_specs(cfg), self.fp8_cfg, name="ffn")()
      h_BxTxD, aux = moe.swiglu(h_BxTxD, w, matmuls), None
    else:
      h_BxTxD, aux = MoE(self.moe_cfg, cfg.init_std, self.fp8_cfg, name="ffn")(h_BxTxD,
                                                                               replay_BxTxK)
    return sharding.constrain(x_BxTxD + h_BxTxD, ACTIVATION_AXES), aux, cache


def block_class(cfg: ModelConfig, training: bool = True) -> type:
  """Block, or under cfg.remat (training only) a Block whose backward recomputes its insides:
  the same parameters, only its input is kept. pos (argument 2, self counted) is static."""
  return nn.remat(Block, static_argnums=(2,)) if cfg.remat and training else Block


class MTPModule(nn.Module):
  """One V3 multi-token prediction depth: proj[norm(emb); norm(h)] -> block -> norm -> head."""
  cfg: ModelConfig
  moe_cfg: Optional[MoEConfig]
  fp8_cfg: FP8Config = FP8Config()

  @nn.compact
  def __call__(self, h_BxSxD: jax.Array, e_BxSxD: jax.Array, head_DxV: jax.Array):
    cfg, d = self.cfg, self.cfg.embed_dim
    he_BxSx2D = jnp.concatenate([RMSNorm(cfg.norm_eps, name="embed_norm")(e_BxSxD),
                                 RMSNorm(cfg.norm_eps, name="hidden_norm")(h_BxSxD)], axis=-1)
    w, matmuls = Dense(_normal_specs(cfg.init_std, (("kernel", (2 * d, d), (None, "embed")),)),
                       self.fp8_cfg, name="proj")()
    h_BxSxD, aux, _ = block_class(cfg)(cfg, self.moe_cfg, self.fp8_cfg, name="block")(
        matmuls.dot(he_BxSx2D, "kernel", w["kernel"]), 0)
    logits_BxSxV = project(RMSNorm(cfg.norm_eps, name="final_norm")(h_BxSxD), head_DxV,
                           jnp.float32)
    return h_BxSxD, logits_BxSxV, aux


class Transformer(nn.Module):
  """tokens_BxT -> (logits_BxTxV f32, [mtp logits per depth], [MoE aux per MoE block], caches).

  Without caches: a training forward over positions 0..T-1, MTP modules included. With caches
  ({"layer_<i>": attention cache}): T new tokens at `pos`, main model only. routes_BxTxLxK:
  router replay for the L MoE blocks of the main model, in order (moe.apply's `replay`); MTP
  blocks route themselves. Each MoE aux holds its router's own choice, "experts" [B, T, K].

  Pipelined (a training forward on a mesh with stage > 1, or pipe[0] > 1 micro-batches): the
  MoE blocks of the main model run through pipeline.run with pipe = (micro-batches, repeats);
  embeddings, dense blocks, head and MTP run outside it, their tokens split over every axis.
  """
  cfg: ModelConfig
  moe_cfg: MoEConfig
  fp8_cfg: FP8Config = FP8Config()
  pipe: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, pos=0, caches: Optional[dict] = None,
               routes_BxTxLxK: Optional[jax.Array] = None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    V, D = cfg.vocab_size, cfg.embed_dim
    emb_VxD = Weights(_normal_specs(cfg.init_std, (("embedding", (V, D), ("vocab", "embed")),)),
                      name="embed")()["embedding"]
    head_DxV = Weights(_normal_specs(cfg.init_std, (("kernel", (D, V), ("embed", "vocab")),)),
                       name="head")()["kernel"]

    def embed(tokens):
      return sharding.constrain(jnp.take(emb_VxD, tokens, axis=0).astype(dtype), ACTIVATION_AXES)

    def ffn_cfg(index):
      return self.moe_cfg if is_moe_layer(cfg, index) else None

    x_BxTxD, auxes, new_caches = embed(tokens_BxT), [], {}
    pipelined = (caches is None and not self.is_initializing() and
                 (sharding.stage_count() > 1 or self.pipe[0] > 1))
    for i in range(cfg.num_layers):
      name = f"layer_{i}"
      if pipelined and is_moe_layer(cfg, i):
        continue
      replay = None if routes_BxTxLxK is None or not is_moe_layer(cfg, i) else \
          routes_BxTxLxK[:, :, len(auxes)]
      x_BxTxD, aux, cache = block_class(cfg, caches is None)(cfg, ffn_cfg(i), self.fp8_cfg,
                                                             name=name)(
          x_BxTxD, pos, None if caches is None else caches[name], replay)
      new_caches[name] = cache
      auxes += [aux] if aux is not None else []
    if pipelined:
      x_BxTxD, pipe_auxes = self._pipeline(x_BxTxD, routes_BxTxLxK)
      auxes += pipe_auxes
    # The last block's output: what an MTP module drafts from (serve/spec_decode.py reads it
    # with mutable=["intermediates"]; without that, sow keeps nothing).
    self.sow("intermediates", "hidden", x_BxTxD)
    logits_BxTxV = project(RMSNorm(cfg.norm_eps, name="final_norm")(x_BxTxD), head_DxV,
                           jnp.float32)
    if caches is not None:
      return sharding.constrain(logits_BxTxV, LOGIT_AXES), [], auxes, new_caches
    mtp_logits, h_BxTxD = [], x_BxTxD
    for k in range(cfg.mtp_depth):
      e_BxTxD = embed(jnp.roll(tokens_BxT, -(k + 1), axis=1))
      h_BxTxD, logits_k, aux = MTPModule(cfg, ffn_cfg(cfg.num_layers + k), self.fp8_cfg,
                                         name=f"mtp_{k}")(h_BxTxD, e_BxTxD, head_DxV)
      mtp_logits.append(sharding.constrain(logits_k, LOGIT_AXES))
      auxes += [aux] if aux is not None else []
    return sharding.constrain(logits_BxTxV, LOGIT_AXES), mtp_logits, auxes, None

  def _pipeline(self, x_BxTxD: jax.Array, routes) -> tuple[jax.Array, list[dict]]:
    """The main model's MoE blocks through pipeline.run, on this module's own variables."""
    cfg = self.cfg
    if routes is not None or self.fp8_cfg.recipe == "delayed":
      raise ValueError("the pipeline (mesh.stage > 1 or train.microbatches > 1) takes neither "
                       "router replay nor fp8.recipe='delayed'")
    names = [f"layer_{i}" for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]
    block = block_class(cfg)(cfg, self.moe_cfg, self.fp8_cfg)

    def layer_fn(params, state, x):
      y, aux, _ = block.apply({"params": params, "moe_state": {"ffn": state}}, x, 0)
      return y, aux
    y_BxTxD, auxes, _ = pipeline.run(
        layer_fn, [self.variables["params"][n] for n in names],
        [self.variables["moe_state"][n]["ffn"] for n in names], x_BxTxD, *self.pipe)
    return sharding.constrain(y_BxTxD, ACTIVATION_AXES), auxes


def moe_paths(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Contract name -> the Flax module path of that block's MoE, in ascending layer order."""
  paths = {f"layer_{i}": (f"layer_{i}", "ffn") for i in range(cfg.num_layers)}
  paths.update({f"layer_{cfg.num_layers + k}": (f"mtp_{k}", "block", "ffn")
                for k in range(cfg.mtp_depth)})
  return {name: path for i, (name, path) in enumerate(paths.items()) if is_moe_layer(cfg, i)}


def from_flax_state(flax_state: dict, cfg: ModelConfig) -> dict:
  """The "moe_state" collection -> {"layer_<i>": that block's state}."""
  def walk(tree, path):
    for key in path:
      tree = tree[key]
    return dict(tree)
  return {name: walk(flax_state, path) for name, path in moe_paths(cfg).items()}


def to_flax_state(moe_state: dict, cfg: ModelConfig) -> dict:
  """{"layer_<i>": state} -> the "moe_state" collection at the blocks' module paths."""
  tree: dict = {}
  for name, path in moe_paths(cfg).items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = moe_state[name]
  return tree
