"""Where each moe_jax array lives in a Hugging Face DeepseekV3 checkpoint, and in what layout.

`specs(model_cfg, moe_cfg, tie_embeddings)` maps every leaf of `model.init`'s params and
moe_state (a path tuple, e.g. ("params", "layer_3", "ffn", "router", "kernel")) to its tensor(s):

  embed/embedding [V,D]            model.embed_tokens.weight [V,D]
  head/kernel [D,V]                lm_head.weight [V,D] (embed_tokens when tied)
  final_norm/scale                 model.norm.weight
  layer_i/attn_norm, ffn_norm      model.layers.i.input_layernorm, post_attention_layernorm
  layer_i/attn/wq_a [D,Q]          .self_attn.q_a_proj [Q,D]; q_norm: .q_a_layernorm
  layer_i/attn/wq_b [Q,H,N+R]      .self_attn.q_b_proj [H*(N+R),Q]   (wq [D,H,N+R]: .q_proj)
  layer_i/attn/wkv_a [D,C+R]       .self_attn.kv_a_proj_with_mqa [C+R,D]; kv_norm: .kv_a_layernorm
  layer_i/attn/wkv_b [C,H,N+V]     .self_attn.kv_b_proj [H*(N+V),C]
  layer_i/attn/wo [H,V,D]          .self_attn.o_proj [D,H*V]
  layer_i/ffn/{gate,up,down}       .mlp.{gate,up,down}_proj (dense blocks)
  layer_i/ffn/router/kernel [D,E]  .mlp.gate.weight [E,D]; moe_state router_bias:
                                   .mlp.gate.e_score_correction_bias [E]
  layer_i/ffn/experts/gate [E,D,F] .mlp.experts.{e}.gate_proj.weight [F,D] per expert, or
                                   .mlp.experts.gate_up_proj [E,2F,D] (gate rows first) fused
  layer_i/ffn/experts/down [E,F,D] .mlp.experts.{e}.down_proj.weight [D,F], or .down_proj [E,D,F]
  layer_i/ffn/shared/...           .mlp.shared_experts.{gate,up,down}_proj
  mtp_k/{embed_norm,hidden_norm,   model.layers.{L+k}.{enorm,hnorm,eh_proj [D,2D],
         proj [2D,D],final_norm,     shared_head.norm} and the block's tensors under the same
         block}                      prefix (V3 stores MTP module k as layer L+k)

Linear weights are torch's [out, in]; moe_jax's kernels are [in, out], with heads split out.
RoPE: V3 stores the rope output dims of q_b_proj (q_proj) and kv_a_proj_with_mqa as interleaved
pairs (2i, 2i+1), which transformers rotates when `rope_interleave` is true; moe_jax rotates
(i, i + R/2). Reading permutes those R columns to [0, 2, ..., R-2, 1, 3, ..., R-1], which makes
every score, and so every output, equal; writing permutes back. Both are exact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np

from moe_jax.config import ModelConfig, MoEConfig

Path = tuple[str, ...]


def _rope_order(width: int, rope: int) -> np.ndarray:
  """Column order taking an interleaved-rope last dim to moe_jax's rotate-half layout."""
  nope = np.arange(width - rope)
  return np.concatenate([nope, width - rope + np.arange(0, rope, 2),
                         width - rope + np.arange(1, rope, 2)])


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A moe_jax array of `shape` stored as one tensor: as is (split=0), or as a torch Linear
  weight [prod(shape[split:]), prod(shape[:split])] (the first `split` dims are inputs)."""
  name: str
  shape: tuple[int, ...]
  split: int = 0
  rope: int = 0          # trailing RoPE columns of the last dim (interleaved when stored so)
  fp8: bool = False      # an FP8 export stores it in float8_e4m3fn blocks (V3's choice)

  def hf_shapes(self) -> dict[str, tuple[int, ...]]:
    if not self.split:
      return {self.name: self.shape}
    return {self.name: (math.prod(self.shape[self.split:]), math.prod(self.shape[:self.split]))}

  def to_jax(self, w: np.ndarray, interleaved: bool) -> np.ndarray:
    if not self.split:
      return w
    x = w.T.reshape(self.shape)
    if self.rope and interleaved:
      x = x[..., _rope_order(self.shape[-1], self.rope)]
    return x

  def to_hf(self, x: np.ndarray, interleaved: bool) -> np.ndarray:
    if not self.split:
      return x
    if self.rope and interleaved:
      x = x[..., np.argsort(_rope_order(self.shape[-1], self.rope))]
    return x.reshape(math.prod(self.shape[:self.split]), -1).T


@dataclasses.dataclass(frozen=True)
class Experts:
  """moe_jax expert weights [E, in, out], stored per expert ([out, in] each) or fused."""
  prefix: str            # "model.layers.3.mlp.experts"
  proj: str              # "gate", "up" or "down"
  shape: tuple[int, int, int]
  fp8: bool = True

  @property
  def fused_name(self) -> str:
    return f"{self.prefix}.{'down_proj' if self.proj == 'down' else 'gate_up_proj'}"

  def expert_name(self, e: int) -> str:
    return f"{self.prefix}.{e}.{self.proj}_proj.weight"

  def hf_shapes(self, fused: bool) -> dict[str, tuple[int, ...]]:
    E, n_in, n_out = self.shape
    if not fused:
      return {self.expert_name(e): (n_out, n_in) for e in range(E)}
    return {self.fused_name: (E, n_out, n_in) if self.proj == "down" else (E, 2 * n_out, n_in)}

  def fused_rows(self) -> Optional[slice]:
    """The rows of the fused tensor's second dim that hold this projection."""
    F = self.shape[2]
    return {"gate": slice(0, F), "up": slice(F, 2 * F)}.get(self.proj)


Spec = Union[Tensor, Experts]


def _block(p: str, d: int, model: ModelConfig, moe: Optional[MoEConfig]) -> dict[Path, Spec]:
  """The specs of one decoder block under HF prefix p (e.g. "model.layers.3")."""
  H, Q, C = model.num_heads, model.q_lora_rank, model.kv_lora_rank
  N, R, V = model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim
  a = f"{p}.self_attn"
  out: dict[Path, Spec] = {
      ("attn_norm", "scale"): Tensor(f"{p}.input_layernorm.weight", (d,)),
      ("ffn_norm", "scale"): Tensor(f"{p}.post_attention_layernorm.weight", (d,)),
      ("attn", "wkv_a"): Tensor(f"{a}.kv_a_proj_with_mqa.weight", (d, C + R), 1, R, True),
      ("attn", "kv_norm"): Tensor(f"{a}.kv_a_layernorm.weight", (C,)),
      ("attn", "wkv_b"): Tensor(f"{a}.kv_b_proj.weight", (C, H, N + V), 1, fp8=True),
      ("attn", "wo"): Tensor(f"{a}.o_proj.weight", (H, V, d), 2, fp8=True),
  }
  if Q:
    out[("attn", "wq_a")] = Tensor(f"{a}.q_a_proj.weight", (d, Q), 1, fp8=True)
    out[("attn", "q_norm")] = Tensor(f"{a}.q_a_layernorm.weight", (Q,))
    out[("attn", "wq_b")] = Tensor(f"{a}.q_b_proj.weight", (Q, H, N + R), 1, R, True)
  else:
    out[("attn", "wq")] = Tensor(f"{a}.q_proj.weight", (d, H, N + R), 1, R, True)

  def swiglu(prefix: str, path: Path, f: int):
    for proj in ("gate", "up"):
      out[path + (proj,)] = Tensor(f"{prefix}.{proj}_proj.weight", (d, f), 1, fp8=True)
    out[path + ("down",)] = Tensor(f"{prefix}.down_proj.weight", (f, d), 1, fp8=True)

  if moe is None:
    swiglu(f"{p}.mlp", ("ffn",), model.dense_ffn_dim)
    return out
  E, F = moe.num_experts, moe.expert_ffn_dim
  out[("ffn", "router", "kernel")] = Tensor(f"{p}.mlp.gate.weight", (d, E), 1)
  for proj, shape in (("gate", (E, d, F)), ("up", (E, d, F)), ("down", (E, F, d))):
    out[("ffn", "experts", proj)] = Experts(f"{p}.mlp.experts", proj, shape)
  if moe.num_shared_experts:
    swiglu(f"{p}.mlp.shared_experts", ("ffn", "shared"), moe.num_shared_experts * F)
  return out


def router_bias_name(layer: int) -> str:
  return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def specs(model: ModelConfig, moe: MoEConfig, tie_embeddings: bool = False) -> dict[Path, Spec]:
  """Every leaf of {"params": ..., "moe_state": ...} (paths as tuples) -> where it is stored."""
  V, D, L = model.vocab_size, model.embed_dim, model.num_layers
  embed = "model.embed_tokens.weight"
  out: dict[Path, Spec] = {
      ("params", "embed", "embedding"): Tensor(embed, (V, D)),
      ("params", "final_norm", "scale"): Tensor("model.norm.weight", (D,)),
      ("params", "head", "kernel"): Tensor(embed if tie_embeddings else "lm_head.weight",
                                           (D, V), 1),
  }
  blocks = [(f"layer_{i}",) for i in range(L)] + [
      (f"mtp_{k}", "block") for k in range(model.mtp_depth)]
  for i, path in enumerate(blocks):
    # MTP blocks are MoE whenever the model has MoE blocks (see decoder.is_moe_layer).
    is_moe = model.first_k_dense < L and i >= model.first_k_dense
    block = _block(f"model.layers.{i}", D, model, moe if is_moe else None)
    out.update({("params",) + path + sub: spec for sub, spec in block.items()})
    if is_moe:
      out[("moe_state", f"layer_{i}", "router_bias")] = Tensor(router_bias_name(i),
                                                               (moe.num_experts,))
  for k in range(model.mtp_depth):
    p = f"model.layers.{L + k}"
    out.update({
        ("params", f"mtp_{k}", "embed_norm", "scale"): Tensor(f"{p}.enorm.weight", (D,)),
        ("params", f"mtp_{k}", "hidden_norm", "scale"): Tensor(f"{p}.hnorm.weight", (D,)),
        ("params", f"mtp_{k}", "proj", "kernel"): Tensor(f"{p}.eh_proj.weight", (2 * D, D), 1),
        ("params", f"mtp_{k}", "final_norm", "scale"): Tensor(f"{p}.shared_head.norm.weight",
                                                              (D,)),
    })
  return out


def mtp_copies(model: ModelConfig) -> dict[str, str]:
  """Tensors V3 repeats in each MTP layer (the shared embedding and head): name -> original."""
  out = {}
  for k in range(model.mtp_depth):
    p = f"model.layers.{model.num_layers + k}"
    out[f"{p}.embed_tokens.weight"] = "model.embed_tokens.weight"
    out[f"{p}.shared_head.head.weight"] = "lm_head.weight"
  return out
