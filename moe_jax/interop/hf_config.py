"""config.json of a Hugging Face DeepseekV3ForCausalLM checkpoint <-> ModelConfig and MoEConfig.

`from_hf` reads the architecture (and refuses what moe_jax cannot compute exactly); `to_hf` writes
the config.json that transformers, vLLM and DeepSeek's tools read. Storage facts that are not part
of the model (rope layout of the weights, tied embeddings, FP8 blocks) come back as `Storage`.

Field names follow transformers' DeepseekV3Config (`n_routed_experts`, `first_k_dense_replace`,
...); keys a config.json leaves out take that class's defaults, as transformers would.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from moe_jax.config import ConfigError, ModelConfig, MoEConfig

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
CONFIG_FILE = "config.json"
FP8_BLOCK = (128, 128)

# transformers' DeepseekV3Config defaults, for the keys this file reads.
_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
    "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "pad_token_id": None, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_interleave": True, "attention_bias": False, "num_nextn_predict_layers": 1,
}


class CheckpointError(ValueError):
  """A checkpoint is unusable; the message is one line naming the file or tensor and why."""


@dataclasses.dataclass(frozen=True)
class Storage:
  """How the checkpoint stores what the model computes (not part of ModelConfig)."""
  rope_interleave: bool = True       # RoPE dims stored as interleaved pairs (V3's own layout)
  tie_embeddings: bool = False       # lm_head is embed_tokens (no lm_head.weight)
  mtp_layers: int = 0                # MTP modules the config announces (num_nextn_predict_layers)
  fp8_block: tuple[int, int] = FP8_BLOCK  # weight_block_size of FP8-stored weights


def read_json(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file (a Hugging Face checkpoint directory has one)")
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(values, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return values


def _rope(hf: dict, get) -> dict:
  """ModelConfig's rope_* fields from `rope_parameters` (transformers 5) or `rope_scaling` and
  `rope_theta` (the published checkpoints)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", get("rope_theta"))
  kind = params.get("rope_type", params.get("type", "default"))
  out = {"rope_theta": float(theta)}
  if kind == "default":
    return out
  if kind != "yarn":
    raise CheckpointError(f"{CONFIG_FILE}: rope type {kind!r} is not supported (default or yarn)")
  if params.get("truncate", True) is not True:
    raise CheckpointError(f"{CONFIG_FILE}: yarn truncate=false is not supported")
  original = params.get("original_max_position_embeddings") or get("max_position_embeddings")
  factor = params.get("factor") or get("max_position_embeddings") / original
  out.update(rope_factor=float(factor), rope_original_max_len=int(original),
             rope_beta_fast=float(params.get("beta_fast") or 32),
             rope_beta_slow=float(params.get("beta_slow") or 1),
             rope_mscale=float(params.get("mscale") or 0),
             rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0))
  if params.get("attention_factor") is not None:
    # moe_jax derives the cos/sin scale from mscale and mscale_all_dim, as the reference does
    # when the key is absent; an explicit one must agree with that.
    derived = _yarn_attention_factor(out)
    if not math.isclose(params["attention_factor"], derived, rel_tol=1e-12):
      raise CheckpointError(f"{CONFIG_FILE}: yarn attention_factor={params['attention_factor']} "
                            f"differs from the one mscale/mscale_all_dim give ({derived})")
  return out


def _yarn_attention_factor(rope: dict) -> float:
  m = lambda s: 1.0 if rope["rope_factor"] <= 1 else 0.1 * s * math.log(rope["rope_factor"]) + 1
  if rope["rope_mscale"] and rope["rope_mscale_all_dim"]:
    return m(rope["rope_mscale"]) / m(rope["rope_mscale_all_dim"])
  return m(1.0)


def _check_supported(hf: dict, get):
  architectures = hf.get("architectures") or []
  # A config.json without `architectures` still names its model_type.
  known = ARCHITECTURE in architectures if architectures else hf.get("model_type") == MODEL_TYPE
  if not known:
    found = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
    raise CheckpointError(f"{CONFIG_FILE}: architecture {found} is not supported "
                          f"(moe_jax reads {ARCHITECTURE}, model_type {MODEL_TYPE!r})")
  unsupported = {
      "hidden_act": (get("hidden_act") != "silu", "only silu"),
      "attention_bias": (bool(get("attention_bias")), "moe_jax has no projection biases"),
      "scoring_func": (hf.get("scoring_func", "sigmoid") != "sigmoid", "only sigmoid"),
      "topk_method": (hf.get("topk_method", "noaux_tc") != "noaux_tc",
                      "only noaux_tc (group-limited top-k on biased scores)"),
      "moe_layer_freq": (hf.get("moe_layer_freq", 1) != 1, "every layer after the dense ones"),
  }
  for key, (bad, allowed) in unsupported.items():
    if bad:
      raise CheckpointError(f"{CONFIG_FILE}: {key}={hf.get(key)!r} is not supported ({allowed})")
  quant = hf.get("quantization_config")
  if quant and (quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3"):
    raise CheckpointError(f"{CONFIG_FILE}: quantization_config {quant} is not supported "
                          "(blockwise fp8 e4m3 only)")


def from_hf(hf: dict) -> tuple[ModelConfig, MoEConfig, Storage]:
  """(model, moe, storage) of a DeepseekV3 config.json; MTP depth 0 (see `hf.read_config`)."""
  get = lambda key: hf.get(key, _DEFAULTS[key])
  _check_supported(hf, get)
  layers = get("num_hidden_layers")
  pad = get("pad_token_id")
  try:
    model = ModelConfig(
        vocab_size=get("vocab_size"), embed_dim=get("hidden_size"), num_layers=layers,
        first_k_dense=min(get("first_k_dense_replace"), layers),
        dense_ffn_dim=get("intermediate_size"), attention="mla",
        num_heads=get("num_attention_heads"), num_kv_heads=get("num_attention_heads"),
        q_lora_rank=get("q_lora_rank") or 0, kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), max_seq_len=get("max_position_embeddings"),
        mtp_depth=0, norm_eps=float(get("rms_norm_eps")),
        init_std=float(get("initializer_range")),
        pad_id=pad if isinstance(pad, int) and 0 <= pad < get("vocab_size") else -1,
        **_rope(hf, get))
    moe = MoEConfig(
        embed_dim=get("hidden_size"), num_experts=get("n_routed_experts"),
        top_k=get("num_experts_per_tok"), expert_ffn_dim=get("moe_intermediate_size"),
        num_shared_experts=get("n_shared_experts") or 0, score_fn="sigmoid",
        n_groups=get("n_group") or 1, topk_groups=get("topk_group") or 1,
        routed_scaling=float(get("routed_scaling_factor")), norm_topk=bool(get("norm_topk_prob")))
  except ConfigError as e:
    raise CheckpointError(f"{CONFIG_FILE}: {e}") from None
  quant = hf.get("quantization_config") or {}
  storage = Storage(rope_interleave=bool(get("rope_interleave")),
                    tie_embeddings=bool(get("tie_word_embeddings")),
                    mtp_layers=int(get("num_nextn_predict_layers") or 0),
                    fp8_block=tuple(quant.get("weight_block_size", FP8_BLOCK)))
  return model, moe, storage


def to_hf(model: ModelConfig, moe: MoEConfig, *, dtype: str = "float32", fp8: bool = False,
          rope_interleave: bool = True) -> dict[str, Any]:
  """The config.json of `export`: transformers' field names, V3's rope_scaling form."""
  if model.attention != "mla":
    raise CheckpointError(f"model.attention={model.attention!r}: only MLA models export as "
                          f"{ARCHITECTURE}")
  if moe.score_fn != "sigmoid":
    raise CheckpointError(f"moe.score_fn={moe.score_fn!r}: {ARCHITECTURE} routes with sigmoid")
  rope_scaling: Optional[dict] = None
  if model.rope_factor > 1:
    rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": model.rope_factor,
                    "original_max_position_embeddings": model.rope_original_max_len,
                    "beta_fast": model.rope_beta_fast, "beta_slow": model.rope_beta_slow,
                    "mscale": model.rope_mscale, "mscale_all_dim": model.rope_mscale_all_dim}
  out = {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": model.vocab_size, "hidden_size": model.embed_dim,
      "intermediate_size": model.dense_ffn_dim, "moe_intermediate_size": moe.expert_ffn_dim,
      "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
      "num_key_value_heads": model.num_heads, "n_shared_experts": moe.num_shared_experts,
      "n_routed_experts": moe.num_experts, "routed_scaling_factor": moe.routed_scaling,
      "kv_lora_rank": model.kv_lora_rank, "q_lora_rank": model.q_lora_rank or None,
      "qk_rope_head_dim": model.qk_rope_head_dim, "qk_nope_head_dim": model.qk_nope_head_dim,
      "v_head_dim": model.v_head_dim, "n_group": moe.n_groups, "topk_group": moe.topk_groups,
      "num_experts_per_tok": moe.top_k, "first_k_dense_replace": model.first_k_dense,
      "norm_topk_prob": moe.norm_topk, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
      "moe_layer_freq": 1, "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
      "initializer_range": model.init_std, "rms_norm_eps": model.norm_eps,
      "pad_token_id": model.pad_id if model.pad_id >= 0 else None,
      "tie_word_embeddings": False, "rope_theta": model.rope_theta,
      "rope_scaling": rope_scaling, "rope_interleave": rope_interleave,
      "attention_bias": False, "attention_dropout": 0.0,
      "num_nextn_predict_layers": model.mtp_depth, "torch_dtype": dtype,
  }
  if fp8:
    out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic",
                                  "weight_block_size": list(FP8_BLOCK)}
  return out
