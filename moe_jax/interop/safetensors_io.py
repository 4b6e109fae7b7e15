"""Safetensors checkpoint directories, read and written one tensor at a time.

`Reader` opens every file of a directory (with or without `model.safetensors.index.json`) and
lists every tensor's file, shape and dtype before any data is read, so a missing tensor, a wrong
shape or a truncated file is reported up front; `read` then returns one tensor, or a slice of its
leading dim, as float32 (FP8 weights dequantized per block with `fp8.dequantize`). `Writer`
streams tensors into shards of bounded size and writes the index, as transformers lays them out.

FP8 storage (DeepSeek-V3): a float8_e4m3fn `<name>.weight` with a float32 `<name>.weight_scale_inv`
holding one multiplier per block of the last two dims (ragged edge blocks allowed);
fused tensors without a `.weight` suffix take `<name>_scale_inv`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from moe_jax import fp8
from moe_jax.interop.hf_config import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "BF16", "F16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def scale_name(name: str) -> str:
  """The per-block scale of an FP8 tensor: `x.weight_scale_inv` (V3), `x.gate_up_proj_scale_inv`
  (fused experts, as transformers names them)."""
  return name + "_scale_inv"


def _register_fp8_with_numpy():
  # safetensors 0.8 builds FP8 arrays from `numpy.float8_e4m3fn` (and e5m2), names only
  # ml_dtypes defines; bfloat16 it already finds through numpy's dtype registry.
  for name in ("float8_e4m3fn", "float8_e5m2"):
    if not hasattr(np, name):
      setattr(np, name, getattr(ml_dtypes, name))


@functools.cache
def _cpu() -> jax.Device:
  """Dequantization runs on the host CPU, never on an accelerator that will hold the weights."""
  return jax.local_devices(backend="cpu")[0]


class Reader:
  """Every tensor of a checkpoint directory; nothing is read until `read`."""

  def __init__(self, directory: str, block: tuple[int, int] = (128, 128)):
    _register_fp8_with_numpy()
    self.directory, self.block = directory, tuple(block)
    self._handles: dict[str, object] = {}
    self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> (file, shape, dtype)
    weight_map = self._weight_map()
    files = sorted(set(weight_map.values())) if weight_map else sorted(
        f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise CheckpointError(f"{directory}: no *.safetensors files")
    for file in files:
      self._open(file)
    for name, file in weight_map.items():
      if self.tensors.get(name, (file,))[0] != file:
        raise CheckpointError(f"{os.path.join(directory, file)}: lacks tensor {name!r} that "
                              f"{INDEX_FILE} places there")

  def _weight_map(self) -> dict[str, str]:
    path = os.path.join(self.directory, INDEX_FILE)
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{path}: not a safetensors index ({e!r})") from None
    return dict(weight_map)

  def _open(self, file: str):
    path = os.path.join(self.directory, file)
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such file (named in {INDEX_FILE})")
    try:
      handle = safetensors.safe_open(path, framework="numpy")
      for name in handle.keys():
        view = handle.get_slice(name)
        if name in self.tensors:
          raise CheckpointError(f"{path}: tensor {name!r} is also in {self.tensors[name][0]}")
        self.tensors[name] = (file, tuple(view.get_shape()), view.get_dtype())
    except (safetensors.SafetensorError, OSError) as e:
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({reason})") from None
    self._handles[file] = handle

  def has(self, name: str) -> bool:
    return name in self.tensors

  def _where(self, name: str) -> str:
    return os.path.join(self.directory, self.tensors[name][0])

  def check(self, name: str, shape: tuple[int, ...], needed_for: str):
    """Raises CheckpointError unless `name` exists with `shape` and a dtype `read` handles."""
    if name not in self.tensors:
      raise CheckpointError(f"{self.directory}: tensor {name!r} is missing (needed for "
                            f"{needed_for})")
    _, found, dtype = self.tensors[name]
    if found != tuple(shape):
      raise CheckpointError(f"{self._where(name)}: tensor {name!r} has shape {list(found)}, "
                            f"config.json implies {list(shape)}")
    if dtype in FP8_DTYPES:
      scale = scale_name(name)
      if scale not in self.tensors:
        raise CheckpointError(f"{self._where(name)}: FP8 tensor {name!r} has no {scale!r}")
      blocks = tuple(shape[:-2]) + tuple(-(-n // b) for n, b in zip(shape[-2:], self.block))
      if self.tensors[scale][1] != blocks or self.tensors[scale][2] not in FLOAT_DTYPES:
        raise CheckpointError(f"{self._where(scale)}: tensor {scale!r} is "
                              f"{self.tensors[scale][2]} {list(self.tensors[scale][1])}, expected "
                              f"float {list(blocks)} (blocks {list(self.block)})")
    elif dtype not in FLOAT_DTYPES:
      raise CheckpointError(f"{self._where(name)}: tensor {name!r} has dtype {dtype}; expected "
                            f"one of {', '.join(FLOAT_DTYPES + FP8_DTYPES)}")

  def _raw(self, name: str, rows: Optional[slice]) -> np.ndarray:
    view = self._handles[self.tensors[name][0]].get_slice(name)
    return view[rows] if rows is not None else view[:]

  def read(self, name: str, rows: Optional[slice] = None) -> np.ndarray:
    """The tensor (or rows `rows` of its leading dim) as float32; FP8 dequantized per block."""
    x = self._raw(name, rows)
    if self.tensors[name][2] in FP8_DTYPES:
      scale = self._raw(scale_name(name), rows).astype(np.float32)
      with jax.default_device(_cpu()):
        return np.asarray(fp8.dequantize(x, scale, block_shape=self.block))
    return np.asarray(x, dtype=np.float32)


class Writer:
  """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most max_shard_bytes
  (one `model.safetensors` when all fit) and writes the index; `close` finishes the files."""

  def __init__(self, directory: str, max_shard_bytes: int):
    self.directory, self.max_shard_bytes = directory, max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    self._total = 0

  def add(self, name: str, array: np.ndarray):
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = np.ascontiguousarray(array)
    self._pending_bytes += array.nbytes
    self._total += array.nbytes

  def _part(self, i: int) -> str:
    return os.path.join(self.directory, f".part-{i:05d}.safetensors")

  def _flush(self):
    safetensors.numpy.save_file(self._pending, self._part(len(self._shards)),
                                metadata={"format": "pt"})
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for i, name in enumerate(names):
      os.replace(self._part(i), os.path.join(self.directory, name))
    if n > 1:
      weight_map = {t: name for name, shard in zip(names, self._shards) for t in shard}
      with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f,
                  indent=2, sort_keys=True)
    return names


def quantize_blockwise(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(float8_e4m3fn weights, float32 scales) of w [..., M, N] per block, with `fp8.quantize`."""
  with jax.default_device(_cpu()):
    q, scale = fp8.quantize(w, dtype=ml_dtypes.float8_e4m3fn, block_shape=block)
    return np.asarray(q), np.asarray(scale, np.float32)
