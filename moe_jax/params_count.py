"""Parameter counts by kind, total and activated per token, from abstract shapes only.

`count(abstract_params, moe_cfg)` takes the tree of `model.abstract_variables(...)["params"]`
(ShapeDtypeStructs, boxed or not) and sorts each leaf by its path, using the module names of
model.py: embed, head, layer_<i>/{attn, attn_norm, ffn_norm, ffn/{router, experts, shared}},
final_norm, mtp_<k>/{embed_norm, hidden_norm, proj, block/..., final_norm}.

Activated per token: a routed expert tensor counts top_k / num_experts of its size; the
embedding counts one row (embed_dim: a lookup, not a matmul); everything else counts fully.
The MTP modules share the embedding and output head with the main model, so those count once,
in the main model.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax

from moe_jax.config import MoEConfig

KINDS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router",
         "norms", "mtp_projection", "output_head")
PARTS = ("main", "mtp")


def kind_of(path: tuple[str, ...]) -> str:
  """The kind of the parameter at `path` (module names, then the parameter name)."""
  if path[0] == "embed":
    return "embedding"
  if path[0] == "head":
    return "output_head"
  # Order matters: the latent norms inside attention count as attention.
  for name, kind in (("attn", "attention"), ("experts", "routed_experts"),
                     ("shared", "shared_experts"), ("router", "router"),
                     ("proj", "mtp_projection")):
    if name in path:
      return kind
  if any(p.endswith("norm") for p in path):
    return "norms"
  if "ffn" in path:
    return "dense_ffn"
  raise ValueError(f"parameter {'/'.join(path)} has no kind")


def _key_name(entry) -> str:
  return str(getattr(entry, "key", entry))


def count(abstract_params: Any, moe_cfg: MoEConfig) -> dict:
  """{"main" | "mtp": {"total" | "activated": {kind: n, ..., "all": n}}}."""
  out = {part: {which: dict.fromkeys(KINDS + ("all",), 0) for which in ("total", "activated")}
         for part in PARTS}
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params))[0]
  for key_path, leaf in leaves:
    path = tuple(_key_name(k) for k in key_path)
    kind = kind_of(path)
    part = "mtp" if path[0].startswith("mtp_") else "main"
    size = math.prod(leaf.shape)
    if kind == "routed_experts":
      active = size * moe_cfg.top_k // moe_cfg.num_experts
    elif kind == "embedding":
      active = leaf.shape[-1]
    else:
      active = size
    for which, n in (("total", size), ("activated", active)):
      out[part][which][kind] += n
      out[part][which]["all"] += n
  return out


def format_table(counts: dict) -> str:
  """A fixed-width table: one row per kind, total and activated for main model and MTP."""
  header = f"{'':16s}{'main total':>18s}{'main activated':>18s}{'mtp total':>18s}" \
           f"{'mtp activated':>18s}"
  rows = [header]
  for kind in KINDS + ("all",):
    cells = [counts[p][w][kind] for p in PARTS for w in ("total", "activated")]
    rows.append(f"{kind:16s}" + "".join(f"{n:>18,d}" for n in cells))
  main, mtp = counts["main"], counts["mtp"]
  rows.append(f"main model: {main['total']['all'] / 1e9:.2f}B total, "
              f"{main['activated']['all'] / 1e9:.2f}B activated per token; MTP: "
              f"{mtp['total']['all'] / 1e9:.2f}B total, "
              f"{mtp['activated']['all'] / 1e9:.2f}B activated (embedding and head shared)")
  return "\n".join(rows)
