"""Typed, frozen configuration, validated once at the boundary.

Every dataclass checks its own fields in `__post_init__` and raises `ConfigError` with one line
naming the field, the value and what is allowed. `from_config_dict` converts an ml_collections
`ConfigDict` (the config files under `configs/`) section by section and prefixes the section name,
so a user sees `moe.top_k=9: must be <= moe.num_experts=8`.

This module imports no JAX: configs can be validated before any backend starts.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import types
import typing
from typing import Any, Mapping, Optional

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A configuration value is invalid; the message is one line naming the key."""


def _fail(key: str, value: Any, allowed: str):
  raise ConfigError(f"{key}={value!r}: {allowed}")


def _finite(obj):
  """NaN or inf in a float field would pass every range check below and fail steps later."""
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      _fail(field.name, value, "must be a finite number")


def _positive(obj, *names):
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      _fail(name, value, "must be a positive integer")


def _non_negative(obj, *names):
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      _fail(name, value, "must be a number >= 0")


def _one_of(obj, name, choices):
  value = getattr(obj, name)
  if value not in choices:
    _fail(name, value, f"must be one of {', '.join(map(repr, choices))}")


def _is_bool(obj, *names):
  for name in names:
    if not isinstance(getattr(obj, name), bool):
      _fail(name, getattr(obj, name), "must be True or False")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """One DeepSeek-V3 MoE layer: routed experts, shared experts, router and balancing."""
  embed_dim: int = 64
  num_experts: int = 8
  top_k: int = 2
  expert_ffn_dim: int = 64
  num_shared_experts: int = 1
  score_fn: str = "sigmoid"          # "sigmoid" (V3) or "softmax" (Switch/Mixtral)
  n_groups: int = 1                  # expert groups for group-limited routing
  topk_groups: int = 1               # groups whose experts may be selected
  routed_scaling: float = 1.0        # multiplies the routed gates (V3: 2.5)
  norm_topk: bool = True             # divide selected gates by their sum
  capacity_factor: Optional[float] = None  # None: dropless; else rows per expert = cf*T*k/E
  grouped_backend: str = "auto"      # "auto", "ragged" (lax.ragged_dot) or "padded" (buckets)
  # The alltoall layer's exchange: "ragged" (lax.ragged_all_to_all: only routed rows travel;
  # GPU/TPU), "padded" (every bucket whole; XLA:CPU has no ragged one), "auto" per backend.
  exchange: str = "auto"
  aux_loss_coef: float = 0.0         # GShard/Switch load-balancing loss weight
  seq_aux_loss_coef: float = 0.0     # V3 sequence-wise balance loss weight
  z_loss_coef: float = 0.0           # router z-loss weight
  bias_update_rate: float = 1e-3     # aux-loss-free bias step (gamma); 0 disables
  dtype: str = "float32"             # compute dtype of the experts
  parallelism: str = "none"          # "none", "alltoall" (shard_map) or "gshard" (SPMD einsum)

  def __post_init__(self):
    _finite(self)
    _positive(self, "embed_dim", "num_experts", "top_k", "expert_ffn_dim", "n_groups",
              "topk_groups")
    _non_negative(self, "num_shared_experts", "aux_loss_coef", "seq_aux_loss_coef",
                  "z_loss_coef", "bias_update_rate", "routed_scaling")
    if isinstance(self.num_shared_experts, float):
      _fail("num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
    _one_of(self, "score_fn", ("sigmoid", "softmax"))
    _one_of(self, "grouped_backend", ("auto", "ragged", "padded"))
    _one_of(self, "exchange", ("auto", "ragged", "padded"))
    _one_of(self, "dtype", DTYPES)
    _one_of(self, "parallelism", ("none", "alltoall", "gshard"))
    _is_bool(self, "norm_topk")
    if self.top_k > self.num_experts:
      _fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
    if self.num_experts % self.n_groups:
      _fail("n_groups", self.n_groups, f"must divide num_experts={self.num_experts}")
    if self.topk_groups > self.n_groups:
      _fail("topk_groups", self.topk_groups, f"must be <= n_groups={self.n_groups}")
    per_group = self.num_experts // self.n_groups
    if self.top_k > self.topk_groups * per_group:
      _fail("top_k", self.top_k,
            f"must be <= topk_groups*experts_per_group={self.topk_groups * per_group}")
    if self.n_groups > 1 and per_group < 2:
      _fail("n_groups", self.n_groups, "needs >= 2 experts per group (group score = top-2 sum)")
    if self.capacity_factor is not None and (
        isinstance(self.capacity_factor, bool) or
        not isinstance(self.capacity_factor, (int, float)) or self.capacity_factor <= 0):
      _fail("capacity_factor", self.capacity_factor, "must be None (dropless) or a number > 0")

  @property
  def experts_per_group(self) -> int:
    return self.num_experts // self.n_groups


@dataclasses.dataclass(frozen=True)
class FP8Config:
  """FP8 mixed precision: which scaling recipe the dense and expert matmuls use."""
  recipe: str = "none"               # "none", "tensor", "delayed" or "blockwise" (DeepSeek-V3)
  fwd_dtype: str = "e4m3"            # FP8 type of activations and weights
  grad_dtype: str = "e4m3"           # FP8 type of gradients: "e4m3" (V3) or "e5m2" (hybrid)
  tile: int = 128                    # activation tile 1 x tile, weight block tile x tile
  amax_history_len: int = 16         # "delayed": amax history length
  power_of_two_scale: bool = False   # round scales up to 2^k
  dispatch: bool = False             # FP8 activations through the expert all-to-all

  def __post_init__(self):
    _finite(self)
    _one_of(self, "recipe", ("none", "tensor", "delayed", "blockwise"))
    _one_of(self, "fwd_dtype", ("e4m3", "e5m2"))
    _one_of(self, "grad_dtype", ("e4m3", "e5m2"))
    _positive(self, "tile", "amax_history_len")
    _is_bool(self, "power_of_two_scale", "dispatch")
    if self.dispatch and self.recipe == "none":
      _fail("dispatch", self.dispatch, "needs an FP8 recipe (recipe='none' has no FP8 experts "
            "to feed)")


# Outermost first. `stage` splits the decoder's MoE blocks into pipeline stages (pipeline.py).
MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; their product must equal the device count (checked in sharding.py)."""
  data: int = 1
  stage: int = 1                     # pipeline stages (the MoE blocks split evenly among them)
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    _finite(self)
    _positive(self, *MESH_AXES)

  @property
  def shape(self) -> dict[str, int]:
    return {axis: getattr(self, axis) for axis in MESH_AXES}

  @property
  def size(self) -> int:
    n = 1
    for axis in MESH_AXES:
      n *= getattr(self, axis)
    return n

  def check_devices(self, num_devices: int):
    if self.size != num_devices:
      shape = "x".join(f"{a}={s}" for a, s in self.shape.items())
      _fail("mesh", shape, f"product {self.size} must equal the device count {num_devices}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder: embeddings, attention (MLA or MHA/GQA), first_k_dense dense blocks, then MoE."""
  vocab_size: int = 259              # byte tokenizer: 256 bytes + BOS, EOS, PAD
  embed_dim: int = 64
  num_layers: int = 2
  first_k_dense: int = 1             # the first k blocks use a dense SwiGLU instead of MoE
  dense_ffn_dim: int = 256
  attention: str = "mla"             # "mla" (DeepSeek-V2/V3) or "mha" (MHA/GQA baseline)
  num_heads: int = 4
  num_kv_heads: int = 4              # "mha" only: GQA when < num_heads
  head_dim: int = 16                 # "mha" only
  q_lora_rank: int = 0               # "mla": 0 = no query compression
  kv_lora_rank: int = 32             # "mla": joint key/value latent width
  qk_nope_head_dim: int = 16         # "mla": per-head key/query part without RoPE
  qk_rope_head_dim: int = 8          # "mla": decoupled RoPE key, shared across heads
  v_head_dim: int = 16               # "mla"
  rope_theta: float = 10000.0
  # YaRN context extension, as published DeepSeek-V3 checkpoints use it (factor 40 over 4096
  # positions); rope_factor 1 is plain RoPE and leaves the other rope_* fields unused.
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096  # YaRN: the context length of pre-training
  rope_beta_fast: float = 32.0       # YaRN: dims turning more often than this keep their frequency
  rope_beta_slow: float = 1.0        # YaRN: dims turning less often than this are interpolated
  rope_mscale: float = 0.0           # YaRN: cos/sin scale m(mscale)/m(mscale_all_dim) if both > 0
  rope_mscale_all_dim: float = 0.0   # YaRN: softmax scale times m(mscale_all_dim)^2 (0: unchanged)
  max_seq_len: int = 256
  mtp_depth: int = 0                 # multi-token prediction modules (V3: 1)
  mtp_loss_weight: float = 0.3
  # V3's schedule: mtp_loss_weight (0.3) for the first 10T of 14.8T tokens, then 0.1. The late
  # weight applies from this fraction of train.steps on; 1.0 keeps mtp_loss_weight throughout.
  mtp_late_from: float = 1.0
  mtp_loss_weight_late: float = 0.1
  norm_eps: float = 1e-6
  init_std: float = 0.02
  pad_id: int = 258                  # targets equal to it are left out of the loss; -1: none
  dtype: str = "float32"             # compute dtype; parameters stay float32
  # Training: keep only each block's input and recompute the rest in the backward pass
  # (jax.checkpoint): activation memory of one block instead of all, for ~1/3 more compute.
  remat: bool = False

  def __post_init__(self):
    _finite(self)
    _positive(self, "vocab_size", "embed_dim", "num_layers", "dense_ffn_dim", "num_heads",
              "num_kv_heads", "head_dim", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "max_seq_len")
    _non_negative(self, "first_k_dense", "q_lora_rank", "mtp_depth", "mtp_loss_weight",
                  "mtp_loss_weight_late",
                  "norm_eps", "init_std", "rope_beta_fast", "rope_beta_slow",
                  "rope_mscale", "rope_mscale_all_dim")
    _positive(self, "rope_original_max_len")
    if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or (
        self.rope_theta <= 0):
      _fail("rope_theta", self.rope_theta, "must be a number > 0 (RoPE's base wavelength)")
    if isinstance(self.rope_factor, bool) or not isinstance(self.rope_factor, (int, float)) or (
        self.rope_factor < 1):
      _fail("rope_factor", self.rope_factor, "must be a number >= 1 (1: plain RoPE, no YaRN)")
    _one_of(self, "attention", ("mla", "mha"))
    _one_of(self, "dtype", DTYPES)
    if not 0 <= self.mtp_late_from <= 1:
      _fail("mtp_late_from", self.mtp_late_from, "must be a fraction of train.steps in [0, 1]")
    _is_bool(self, "remat")
    if (isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or
        not -1 <= self.pad_id < self.vocab_size):
      _fail("pad_id", self.pad_id, f"must be an integer in [-1, vocab_size={self.vocab_size})")
    if self.first_k_dense > self.num_layers:
      _fail("first_k_dense", self.first_k_dense, f"must be <= num_layers={self.num_layers}")
    if self.num_heads % self.num_kv_heads:
      _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
    if self.qk_rope_head_dim % 2:
      _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
    if self.attention == "mha" and self.head_dim % 2:
      _fail("head_dim", self.head_dim, "must be even (RoPE rotates pairs)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from. Batches are a pure function of (seed, step, process index)."""
  source: str = "stdlib"             # "stdlib" (Python's own source), "text", "tokens", "synthetic"
  path: str = ""                     # "text": directory or glob; "tokens": prepared token file
  heldout_fraction: float = 0.02     # share of files (or tokens) held out for evaluation

  def __post_init__(self):
    _finite(self)
    _one_of(self, "source", ("stdlib", "text", "tokens", "synthetic"))
    if self.source in ("text", "tokens") and not self.path:
      _fail("path", self.path, f"must name a file, directory or glob when source={self.source!r}")
    if not isinstance(self.heldout_fraction, (int, float)) or not 0 < self.heldout_fraction < 1:
      _fail("heldout_fraction", self.heldout_fraction, "must be a number in (0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging, evaluation and checkpointing of a training run."""
  steps: int = 300
  batch_size: int = 16               # global sequences per step
  seq_len: int = 128
  learning_rate: float = 3e-3        # peak, after linear warmup, then cosine decay
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1          # final learning rate / peak
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0             # global-norm clipping; 0 disables
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_bad_steps: int = 5             # non-finite steps in a row before the run stops
  seed: int = 0
  optimizer_state_dtype: str = "float32"  # AdamW moments: "float32" or "bfloat16"
  microbatches: int = 1              # pipeline micro-batches per step (pipeline.py)
  pipeline_repeats: int = 1          # chunks per stage: 1 GPipe, > 1 interleaved (circular)
  # Fault injection for tests of the numerics guard: these steps (0-based) get NaN gradients.
  inject_nan_at_steps: tuple[int, ...] = ()

  def __post_init__(self):
    _finite(self)
    _positive(self, "steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches",
              "checkpoint_every", "keep_checkpoints", "max_bad_steps", "microbatches", "pipeline_repeats")
    _non_negative(self, "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                  "grad_clip", "seed")
    _one_of(self, "optimizer_state_dtype", DTYPES)
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0 <= value < 1:
        _fail(name, value, "must be a number in [0, 1)")
    for step in self.inject_nan_at_steps:
      if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        _fail("inject_nan_at_steps", self.inject_nan_at_steps, "must be integers >= 0")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """experiment=serve: the inference engine (moe_jax/serve) and its front door."""
  input: str = ""                    # requests, one JSON object per line (batch mode)
  output: str = ""                   # completions JSONL; "" = <workdir>/completions.jsonl
  port: int = 0                      # > 0: an OpenAI-compatible HTTP server on 127.0.0.1:port
  model_name: str = ""               # the name /v1/models reports; "" = the checkpoint's folder
  num_blocks: int = 256              # KV pool blocks (block 0 is reserved)
  block_size: int = 16               # token slots per block; also the prefix cache's unit
  max_batch: int = 16                # sequences decoded together
  prefill_chunk: int = 512           # prompt tokens per prefill call
  prefix_cache: bool = True          # reuse cached blocks of earlier prompts
  disk_dir: str = ""                 # the prefix cache's disk tier; "" = <workdir>/prefix_cache
  fp8_cache: bool = False            # store the cache as float8_e4m3fn with per-token scales
  speculative_tokens: int = 0        # tokens the MTP module drafts per step (0: off; needs MTP)
  price_hit: float = 0.5             # cost report, per million tokens (V3's list prices)
  price_miss: float = 2.0
  price_output: float = 8.0
  chat_template: str = ""            # /v1/chat/completions: "" (the checkpoint's), plain, r1_zero
  max_body_mb: float = 8.0           # the HTTP server refuses larger request bodies (413)

  def __post_init__(self):
    _finite(self)
    _positive(self, "block_size", "max_batch", "prefill_chunk")
    if isinstance(self.max_body_mb, bool) or not isinstance(self.max_body_mb, (int, float)) or \
        self.max_body_mb <= 0:
      _fail("max_body_mb", self.max_body_mb, "must be a positive number of megabytes (2**20)")
    if self.chat_template not in ("", "plain", "r1_zero"):
      _fail("chat_template", self.chat_template, "must be '' (the checkpoint's own), 'plain' or "
            "'r1_zero' (moe_jax/serve/chat.py)")
    _non_negative(self, "price_hit", "price_miss", "price_output")
    _is_bool(self, "prefix_cache", "fp8_cache")
    if isinstance(self.speculative_tokens, bool) or not isinstance(self.speculative_tokens, int) \
        or self.speculative_tokens < 0:
      _fail("speculative_tokens", self.speculative_tokens, "must be an integer >= 0 (0: off)")
    if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or \
        self.num_blocks < 2:
      _fail("num_blocks", self.num_blocks, "must be an integer >= 2 (block 0 is reserved)")
    if isinstance(self.port, bool) or not isinstance(self.port, int) or \
        not 0 <= self.port < 65536:
      _fail("port", self.port, "must be an integer in [0, 65535] (0: batch mode, no server)")


# ----------------------------------------------------------------------------- the whole config

TOP_LEVEL = ("experiment", "hf_path", "seeds", "rl")
SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "fp8": FP8Config, "mesh": MeshConfig,
            "train": TrainConfig, "data": DataConfig, "serve": ServeConfig}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one run needs; built by `from_config_dict`, which checks how sections agree."""
  experiment: str = "train"          # what experiments/run.py dispatches to
  hf_path: str = ""                  # experiment=hf_eval: a Hugging Face checkpoint directory
  seeds: tuple[int, ...] = ()        # experiment=fp8_study: one set of runs per seed; () = train.seed
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  fp8: FP8Config = dataclasses.field(default_factory=FP8Config)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
  # experiment=r1_zero: the `rl` section as plain values; moe_jax/rl/config.py validates it (this
  # file imports nothing of rl/). Left out of the hash: a dict has none.
  rl: dict = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    _finite(self)
    if not isinstance(self.experiment, str) or not self.experiment:
      _fail("experiment", self.experiment, "must be a non-empty string")
    model, moe, mesh, train = self.model, self.moe, self.mesh, self.train
    if moe.embed_dim != model.embed_dim:
      _fail("moe.embed_dim", moe.embed_dim,
            f"must equal model.embed_dim={model.embed_dim} (leave it out to inherit it)")
    if train.seq_len > model.max_seq_len:
      _fail("train.seq_len", train.seq_len, f"must be <= model.max_seq_len={model.max_seq_len}")
    tokens = mesh.data * mesh.fsdp * mesh.expert
    # Each mesh axis must split the dims it shards evenly (see the rules in sharding.py).
    splits = [("moe.num_experts", moe.num_experts, "mesh.expert", mesh.expert),
              ("train.batch_size", train.batch_size, "mesh.data*stage*fsdp*expert",
               tokens * mesh.stage),
              ("train.batch_size", train.batch_size, "train.microbatches", train.microbatches),
              ("model.embed_dim", model.embed_dim, "mesh.stage*fsdp", mesh.stage * mesh.fsdp),
              ("model.num_heads", model.num_heads, "mesh.tensor", mesh.tensor),
              ("model.dense_ffn_dim", model.dense_ffn_dim, "mesh.tensor", mesh.tensor),
              ("moe.expert_ffn_dim", moe.expert_ffn_dim, "mesh.tensor", mesh.tensor),
              ("model.vocab_size", model.vocab_size, "mesh.tensor", mesh.tensor)]
    if model.attention == "mha":
      splits.append(("model.num_kv_heads", model.num_kv_heads, "mesh.tensor", mesh.tensor))
    for key, value, axis, size in splits:
      if value % size:
        _fail(key, value, f"must be divisible by {axis}={size}")
    _check_pipeline(model, mesh, train)
    _check_data_path(self.data)

  def check_devices(self, num_devices: int, num_processes: int = 1):
    """The parts that depend on the machine: the mesh must cover exactly the devices."""
    self.mesh.check_devices(num_devices)
    if self.train.batch_size % num_processes:
      _fail("train.batch_size", self.train.batch_size,
            f"must be divisible by the process count {num_processes}")

  def to_dict(self) -> dict:
    """Plain JSON-able values; `from_config_dict` of it gives this config back."""
    return dataclasses.asdict(self)


def _check_pipeline(model: ModelConfig, mesh: MeshConfig, train: TrainConfig):
  """The pipeline (pipeline.py) splits the MoE blocks evenly over mesh.stage, and each
  micro-batch over the token axes inside a stage."""
  blocks = model.num_layers - model.first_k_dense if model.first_k_dense < model.num_layers else 0
  chunks = mesh.stage * train.pipeline_repeats
  if chunks > 1 and (blocks == 0 or blocks % chunks):
    _fail("mesh.stage", mesh.stage, f"times train.pipeline_repeats={train.pipeline_repeats} "
          f"must divide the {blocks} MoE blocks (model.num_layers={model.num_layers} minus "
          f"model.first_k_dense={model.first_k_dense})")
  if train.pipeline_repeats > 1 and train.microbatches < mesh.stage:
    _fail("train.microbatches", train.microbatches, f"must be >= mesh.stage={mesh.stage} for "
          f"the interleaved schedule (train.pipeline_repeats={train.pipeline_repeats})")
  rows, inner = train.batch_size // train.microbatches, mesh.data * mesh.fsdp * mesh.expert
  if train.microbatches > 1 and rows % inner:
    _fail("train.microbatches", train.microbatches, f"leaves micro-batches of {rows} sequences "
          f"(train.batch_size={train.batch_size}); they must split over mesh.data*fsdp*expert="
          f"{inner}")


def _check_data_path(data: DataConfig):
  """A missing corpus is a config error found before any work, not a crash after start-up."""
  if data.source == "tokens" and not os.path.isfile(data.path):
    _fail("data.path", data.path, "no such file; give a token file written by prepare_tokens")
  if data.source == "text" and not (os.path.exists(data.path) or glob.glob(data.path,
                                                                           recursive=True)):
    _fail("data.path", data.path, "matches nothing; give a file, a directory or a glob")


def _optional(hint):
  """X for Optional[X], else None."""
  if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", None)):
    return next(a for a in typing.get_args(hint) if a is not type(None))
  return None


def _type_name(hint) -> str:
  if _optional(hint) is not None:
    return f"None or {_type_name(_optional(hint))}"
  if typing.get_origin(hint) is tuple:
    return "a tuple of integers"
  return {int: "an integer", float: "a number", bool: "True or False", str: "a string"}[hint]


def _ok(value: Any, hint) -> bool:
  if _optional(hint) is not None:
    return value is None or _ok(value, _optional(hint))
  if hint is bool or isinstance(value, bool):
    return hint is bool and isinstance(value, bool)
  if hint is int:
    return isinstance(value, int)
  if hint is float:
    return isinstance(value, (int, float))
  if hint is str:
    return isinstance(value, str)
  if typing.get_origin(hint) is tuple:
    return isinstance(value, (list, tuple)) and all(_ok(v, int) for v in value)
  raise TypeError(f"unsupported config field type {hint}")


def _convert(key: str, value: Any, hint) -> Any:
  """value as the field's type; ints widen to floats, nothing else is coerced."""
  if not _ok(value, hint):
    _fail(key, value, f"must be {_type_name(hint)}")
  hint = _optional(hint) or hint
  if value is not None and hint is float:
    return float(value)
  return tuple(value) if typing.get_origin(hint) is tuple else value


def _section(name: str, cls, values: Any, extra: Optional[dict] = None):
  if not isinstance(values, Mapping):
    _fail(name, values, "must be a section (a ConfigDict)")
  hints = typing.get_type_hints(cls)
  known = [f.name for f in dataclasses.fields(cls)]
  kwargs = dict(extra or {})
  for key, value in values.items():
    if key not in hints:
      _fail(f"{name}.{key}", value, f"unknown key; {name} has {', '.join(known)}")
    kwargs[key] = _convert(f"{name}.{key}", value, hints[key])
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise ConfigError(f"{name}.{e}") from None


def from_config_dict(config: Any) -> ExperimentConfig:
  """The typed, validated config of a ConfigDict (or a plain nested dict, e.g. config.json).

  Raises ConfigError with one line naming the first bad key, its value and what is allowed.
  Sections left out take their defaults; moe.embed_dim defaults to model.embed_dim.
  """
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  for key, value in values.items():
    if key not in TOP_LEVEL and key not in SECTIONS:
      keys = ("experiment", *SECTIONS, *TOP_LEVEL[1:])
      _fail(key, value, f"unknown key; a config has {', '.join(keys)}")
  experiment = values.get("experiment", "train")
  if not isinstance(experiment, str):
    _fail("experiment", experiment, "must be a string")
  hf_path = values.get("hf_path", "")
  if not isinstance(hf_path, str):
    _fail("hf_path", hf_path, "must be a string (a checkpoint directory)")
  seeds = values.get("seeds", ())
  if (not isinstance(seeds, (list, tuple)) or len(set(seeds)) != len(seeds) or
      not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
    _fail("seeds", seeds, "must be a list of distinct integers >= 0 (empty: train.seed)")
  rl = values.get("rl", {})
  if not isinstance(rl, Mapping) or not all(isinstance(k, str) for k in rl):
    _fail("rl", rl, "must be a section (a ConfigDict of rl.* keys)")
  sections = {}
  model = sections["model"] = _section("model", ModelConfig, values.get("model", {}))
  for name, cls in SECTIONS.items():
    if name != "model":
      extra = {"embed_dim": model.embed_dim} if name == "moe" else None
      sections[name] = _section(name, cls, values.get(name, {}), extra)
  return ExperimentConfig(experiment=experiment, hf_path=hf_path, seeds=tuple(seeds),
                          rl=dict(rl), **sections)
