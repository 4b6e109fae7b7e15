"""Load and export Hugging Face DeepseekV3ForCausalLM checkpoints (DeepSeek-V3/V3.1/R1 layout).

  model_cfg, moe_cfg = read_config(directory)
  ckpt = load(directory, model_cfg, moe_cfg, mesh=mesh)    # -> Loaded(model, moe, params, state)
  export(directory, params, moe_state, model_cfg, moe_cfg, dtype=..., fp8=..., expert_layout=...)

`load` checks everything it can before reading data (config.json, every file's header, every
tensor's presence, shape and dtype, FP8 scale shapes, mesh divisibility) and raises
`CheckpointError` with one line naming the file or tensor. Then it reads tensor by tensor: with a
mesh, each array is built with `jax.make_array_from_callback` in its target sharding, and an
expert tensor is read only for the experts a device holds, so host memory holds about one tensor
at a time. FP8 tensors (float8_e4m3fn + 128x128 `weight_scale_inv`) become float32 master
weights through `fp8.dequantize`. Quantizing those again in 128x128 blocks (the blockwise
recipe's weight blocks, or `export(fp8=True)`) gives back the stored FP8 values and scales bit for
bit when the stored scales are amax/448 (V3's quantizer; power-of-two scales need the recipe's
`power_of_two_scale`) and the RoPE column permutation stays inside blocks (so with V3's dims), so
FP8 computation sees the checkpoint's own FP8 weights.

The caller may change a config before `load` (compute dtype, `moe.parallelism`, fewer MTP
modules, ...); shapes must still match the checkpoint's tensors.

`export` writes config.json and safetensors shards (with model.safetensors.index.json when more
than one). Every process must call it when arrays span processes (they are all-gathered); only
process 0 writes. See hf_layout.py for the name mapping and hf_config.py for config.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from moe_jax import model, sharding
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.interop import hf_config, hf_layout
from moe_jax.interop.hf_config import CheckpointError
from moe_jax.interop.hf_layout import Experts, Tensor
from moe_jax.interop.safetensors_io import INDEX_FILE, Reader, Writer, quantize_blockwise

EXPERT_LAYOUTS = ("per_expert", "fused")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Kept in float32 whatever the export dtype, as transformers keeps them.
_FP32_SUFFIXES = (".mlp.gate.weight", ".e_score_correction_bias")


class Loaded(NamedTuple):
  model: ModelConfig
  moe: MoEConfig
  params: dict
  moe_state: dict


def _mtp_present(reader: Reader, model_cfg: ModelConfig, depth: int) -> int:
  """How many of the announced MTP modules the checkpoint actually holds (transformers' own
  save_pretrained drops them)."""
  L = model_cfg.num_layers
  return next((k for k in range(depth) if not reader.has(f"model.layers.{L + k}.eh_proj.weight")),
              depth)


def read_config(directory: str) -> tuple[ModelConfig, MoEConfig]:
  """The checkpoint's model and MoE configs (MTP depth: the modules present in its files)."""
  model_cfg, moe_cfg, storage = hf_config.from_hf(hf_config.read_json(directory))
  if storage.mtp_layers:
    depth = _mtp_present(Reader(directory, storage.fp8_block), model_cfg, storage.mtp_layers)
    model_cfg = dataclasses.replace(model_cfg, mtp_depth=depth)
  return model_cfg, moe_cfg


def _abstract(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[tuple, tuple[int, ...]]:
  """Shapes of `model.init`'s (params, moe_state) leaves, by path; allocates nothing."""
  params, state = jax.eval_shape(lambda key: model.init(key, model_cfg, moe_cfg),
                                 jax.random.key(0))
  flat = traverse_util.flatten_dict({"params": params, "moe_state": state})
  return {path: leaf.shape for path, leaf in flat.items()}


def _specs(model_cfg: ModelConfig, moe_cfg: MoEConfig, tie: bool) -> dict[tuple, Any]:
  specs = hf_layout.specs(model_cfg, moe_cfg, tie)
  abstract = _abstract(model_cfg, moe_cfg)
  if set(specs) != set(abstract) or any(specs[k].shape != abstract[k] for k in specs):
    # Only a change of moe_jax's parameter layout can cause this; hf_layout must follow it.
    bad = sorted(set(specs) ^ set(abstract)) or [
        k for k in specs if specs[k].shape != abstract[k]]
    raise RuntimeError(f"hf_layout does not match model.init's parameters at {'/'.join(bad[0])}")
  return specs


def _check_tensors(reader: Reader, specs: dict, fused: dict[str, bool]):
  for path, spec in specs.items():
    needed_for = "/".join(path)
    shapes = spec.hf_shapes(fused[spec.prefix]) if isinstance(spec, Experts) else (
        spec.hf_shapes())
    for name, shape in shapes.items():
      reader.check(name, shape, needed_for)


def _shardings(mesh, model_cfg: ModelConfig, moe_cfg: MoEConfig, specs: dict) -> dict:
  axes = {"params": model.param_axes(model_cfg, moe_cfg),
          "moe_state": model.moe_state_axes(model_cfg, moe_cfg)}
  flat = traverse_util.flatten_dict(axes, is_leaf=lambda k, v: isinstance(v, tuple))
  out = {}
  for path, names in flat.items():
    out[path] = sharding.named_sharding(mesh, names)
    try:
      out[path].shard_shape(specs[path].shape)
    except ValueError:
      spec = tuple(out[path].spec)
      raise CheckpointError(f"{'/'.join(path)} {list(specs[path].shape)}: does not split evenly "
                            f"over mesh axes {spec} of {dict(mesh.shape)}") from None
  return out


def _full_reader(reader: Reader, spec: Tensor, interleaved: bool):
  """index -> block of the moe_jax array; the tensor is read once, on the first call."""
  cache: list[np.ndarray] = []

  def block(index):
    if not cache:
      cache.append(spec.to_jax(reader.read(spec.name), interleaved))
    return cache[0][index]
  return block


def _expert_reader(reader: Reader, spec: Experts, fused: bool):
  """index -> block of [E, in, out], reading only the experts in the index (once per range, as
  replicas over the other mesh axes ask for the same experts)."""
  cache: dict[tuple[int, int], np.ndarray] = {}

  def read(start: int, stop: int) -> np.ndarray:
    if fused:
      w = reader.read(spec.fused_name, rows=slice(start, stop))
      rows = spec.fused_rows()
      w = w[:, rows] if rows is not None else w
    else:
      w = np.stack([reader.read(spec.expert_name(e)) for e in range(start, stop)])
    return np.swapaxes(w, 1, 2)

  def block(index):
    start, stop, _ = index[0].indices(spec.shape[0])
    if (start, stop) not in cache:
      cache[(start, stop)] = read(start, stop)
    return cache[(start, stop)][(slice(None),) + tuple(index[1:])]
  return block


def load(directory: str, model_cfg: Optional[ModelConfig] = None,
         moe_cfg: Optional[MoEConfig] = None, *, mesh=None) -> Loaded:
  """Parameters and router-bias state of a checkpoint, placed on `mesh` if given (float32).

  model_cfg/moe_cfg default to `read_config(directory)`'s.
  """
  ckpt_model, ckpt_moe, storage = hf_config.from_hf(hf_config.read_json(directory))
  reader = Reader(directory, storage.fp8_block)
  if model_cfg is None:
    depth = _mtp_present(reader, ckpt_model, storage.mtp_layers)
    model_cfg = dataclasses.replace(ckpt_model, mtp_depth=depth)
  moe_cfg = ckpt_moe if moe_cfg is None else moe_cfg
  specs = _specs(model_cfg, moe_cfg, storage.tie_embeddings)
  fused = {s.prefix: reader.has(s.fused_name) for s in specs.values() if isinstance(s, Experts)}
  _check_tensors(reader, specs, fused)
  shardings = _shardings(mesh, model_cfg, moe_cfg, specs) if mesh is not None else {}

  flat = {}
  for path, spec in specs.items():
    block = (_expert_reader(reader, spec, fused[spec.prefix]) if isinstance(spec, Experts) else
             _full_reader(reader, spec, storage.rope_interleave))
    if mesh is None:
      flat[path] = jnp.asarray(block(tuple(slice(None) for _ in spec.shape)))
    else:
      flat[path] = jax.make_array_from_callback(spec.shape, shardings[path], block)
  tree = traverse_util.unflatten_dict(flat)
  return Loaded(model_cfg, moe_cfg, tree["params"], tree.get("moe_state", {}))


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def _check_empty(directory: str):
  for name in (hf_config.CONFIG_FILE, INDEX_FILE, "model.safetensors"):
    if os.path.exists(os.path.join(directory, name)):
      raise CheckpointError(f"{os.path.join(directory, name)}: exists; export into an empty "
                            "directory (never over another checkpoint)")


def export(directory: str, params: dict, moe_state: dict, model_cfg: ModelConfig,
           moe_cfg: MoEConfig, *, dtype: str = "float32", fp8: bool = False,
           expert_layout: str = "per_expert", max_shard_bytes: int = 5 << 30) -> list[str]:
  """Writes config.json and the safetensors files; returns the safetensors file names.

  dtype: "float32" or "bfloat16" for the stored tensors (router weights and biases stay
  float32). fp8: decoder Linear weights as float8_e4m3fn with 128x128 `weight_scale_inv` blocks,
  as V3 is published. expert_layout: "per_expert" (V3's `experts.{e}.gate_proj.weight`) or
  "fused" (`experts.gate_up_proj` / `experts.down_proj`, as recent transformers holds them).
  RoPE columns are written interleaved (`rope_interleave: true`), as V3 and its tools expect.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
  if expert_layout not in EXPERT_LAYOUTS:
    raise ValueError(f"expert_layout={expert_layout!r}: must be one of {EXPERT_LAYOUTS}")
  config = hf_config.to_hf(model_cfg, moe_cfg, dtype=dtype, fp8=fp8)
  specs = _specs(model_cfg, moe_cfg, tie=False)
  flat = traverse_util.flatten_dict({"params": params, "moe_state": moe_state})
  for path, spec in specs.items():
    if path not in flat or tuple(flat[path].shape) != spec.shape:
      found = list(flat[path].shape) if path in flat else "missing"
      raise ValueError(f"{'/'.join(path)}: {found}, the configs imply {list(spec.shape)}")
  write = jax.process_index() == 0
  if write:
    _check_empty(directory)
    os.makedirs(directory, exist_ok=True)
  writer = Writer(directory, max_shard_bytes)
  store = np.dtype(DTYPES[dtype])

  def add(name: str, w: np.ndarray, quantize: bool):
    if not write:
      return
    if fp8 and quantize:
      q, scale = quantize_blockwise(w, hf_config.FP8_BLOCK)
      writer.add(name, q)
      writer.add(name + "_scale_inv", scale)
    else:
      writer.add(name, w if name.endswith(_FP32_SUFFIXES) else w.astype(store))

  hf_arrays = {}
  for path, spec in specs.items():
    x = _host(flat[path])
    if isinstance(spec, Tensor):
      w = spec.to_hf(x, interleaved=True)
      add(spec.name, w, spec.fp8)
      hf_arrays[spec.name] = w if spec.name in ("model.embed_tokens.weight",
                                                "lm_head.weight") else None
      continue
    w_ExOxI = np.swapaxes(x, 1, 2)
    if expert_layout == "per_expert":
      for e in range(spec.shape[0]):
        add(spec.expert_name(e), w_ExOxI[e], spec.fp8)
    elif spec.proj == "down":
      add(spec.fused_name, w_ExOxI, spec.fp8)
    elif spec.proj == "gate":  # gate and up share one fused tensor, gate rows first
      up = np.swapaxes(_host(flat[path[:-1] + ("up",)]), 1, 2)
      add(spec.fused_name, np.concatenate([w_ExOxI, up], axis=1), spec.fp8)
  for name, original in hf_layout.mtp_copies(model_cfg).items():
    add(name, hf_arrays[original], False)
  files = writer.close() if write else []
  if write:
    with open(os.path.join(directory, hf_config.CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)
  return files
