"""What names a cached block: the model's fingerprint and the cache's format, hashed into the root
of every block hash (pages.block_hash), so a block is found only by an engine that would compute
exactly its contents.

The format covers everything besides the weights that decides a block's bytes: the attention
kind and position encoding (in the model config), the pool's leaves with their dtypes and slot
shapes (float or float8 storage, MLA latent or MHA keys and values), the block size, and the
tokenizer (ids only mean the same text under the same one).
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import jax
import numpy as np

from moe_jax import data
from moe_jax.config import ModelConfig


class ByteTokenizer:
  """moe_jax's byte tokenizer: a prompt starts with BOS; EOS ends a completion."""
  eos_id = data.EOS
  fingerprint = "moe_jax-bytes-v1"

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in data.encode(text, bos=True)]

  def decode(self, ids: Sequence[int]) -> str:
    return data.decode(ids)


def fingerprint(params, moe_state, model_cfg: ModelConfig) -> str:
  """Names the weights (config, shapes and a sample of every array), so a disk tier never serves
  one model's cache to another."""
  h = hashlib.sha256(repr(model_cfg).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path((params, moe_state)):
    h.update(jax.tree_util.keystr(path).encode() + str(leaf.shape).encode())
    h.update(np.asarray(leaf.reshape(-1)[:64], np.float32).tobytes())
  return h.hexdigest()[:16]


def tokenizer_id(tokenizer) -> str:
  """A tokenizer's `fingerprint` attribute if it has one, else its class's qualified name."""
  named = getattr(tokenizer, "fingerprint", None)
  if isinstance(named, str) and named:
    return named
  kind = type(tokenizer)
  return f"{kind.__module__}.{kind.__qualname__}"


def cache_format(pool: dict, block_size: int, tokenizer) -> dict:
  """The pool's layout (every leaf's dtype and slot shape), block size and tokenizer."""
  leaves = {f"{layer}/{name}": [str(leaf.dtype), list(leaf.shape[2:])]
            for layer, group in pool.items() for name, leaf in group.items()}
  return {"leaves": leaves, "block_size": block_size, "tokenizer": tokenizer_id(tokenizer)}


def format_name(fmt: dict) -> str:
  """A short readable name of a format (the disk tier's folder): dtypes, block size, a hash."""
  dtypes = sorted({dtype for dtype, _ in fmt["leaves"].values()})
  digest = hashlib.sha256(json.dumps(fmt, sort_keys=True).encode()).hexdigest()[:12]
  return f"{'+'.join(dtypes)}-b{fmt['block_size']}-{digest}"


def root(model_fingerprint: str, fmt: dict) -> str:
  """The hash chain's root: the model and the cache format together."""
  text = model_fingerprint + "|" + json.dumps(fmt, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:32]
