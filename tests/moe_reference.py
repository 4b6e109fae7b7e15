"""A slow, obviously-correct MoE layer: NumPy loops over tokens, float64.

It mirrors the DeepSeek-V3 definition line by line and shares no code with `moe_jax.moe`.
"""
import math

import numpy as np


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
  return z * _sigmoid(z)


def _swiglu(x, gate, up, down):
  return (_silu(x @ gate) * (x @ up)) @ down


def route(params, bias, x, cfg):
  """Per token: (scores [E], chosen experts [K], gates [K])."""
  x = np.asarray(x, np.float64).reshape(-1, cfg.embed_dim)
  logits = x @ np.asarray(params["router"]["kernel"], np.float64)
  bias = np.asarray(bias, np.float64)
  out = []
  for t in range(x.shape[0]):
    if cfg.score_fn == "sigmoid":
      s = _sigmoid(logits[t])
    else:
      s = np.exp(logits[t] - logits[t].max())
      s = s / s.sum()
    biased = s + bias
    allowed = np.ones(cfg.num_experts, bool)
    if cfg.n_groups > 1:
      m = cfg.num_experts // cfg.n_groups
      group_scores = []
      for g in range(cfg.n_groups):
        members = sorted(biased[g * m:(g + 1) * m], reverse=True)
        group_scores.append(members[0] + members[1])
      best = sorted(range(cfg.n_groups), key=lambda g: (-group_scores[g], g))[:cfg.topk_groups]
      allowed[:] = False
      for g in best:
        allowed[g * m:(g + 1) * m] = True
    candidates = [e for e in range(cfg.num_experts) if allowed[e]]
    chosen = sorted(candidates, key=lambda e: (-biased[e], e))[:cfg.top_k]
    g = np.array([s[e] for e in chosen])
    if cfg.norm_topk:
      g = g / (g.sum() + 1e-20)
    out.append((s, np.array(chosen), g * cfg.routed_scaling))
  return logits, out


def kept_mask(chosen, cfg):
  """[T, K] bool: which assignments fit under the capacity, first come first served."""
  t_count = len(chosen)
  kept = np.ones((t_count, cfg.top_k), bool)
  if cfg.capacity_factor is None:
    return kept
  cap = max(1, math.ceil(cfg.capacity_factor * t_count * cfg.top_k / cfg.num_experts))
  used = np.zeros(cfg.num_experts, int)
  for t in range(t_count):
    for k, e in enumerate(chosen[t]):
      kept[t, k] = used[e] < cap
      used[e] += 1
  return kept


def replayed(routes, replay, cfg):
  """Each token's (scores, replay[t], gates of its own scores at replay[t])."""
  out = []
  for (s, _, _), experts in zip(routes, np.asarray(replay).reshape(len(routes), cfg.top_k)):
    g = np.array([s[e] for e in experts])
    if cfg.norm_topk:
      g = g / (g.sum() + 1e-20)
    out.append((s, experts, g * cfg.routed_scaling))
  return out


def apply(params, bias, x, cfg, replay=None):
  """(y with x's shape, aux dict of NumPy values); with `replay` [..., K], each token runs those
  experts while aux still counts the router's own choice."""
  shape = np.shape(x)
  xs = np.asarray(x, np.float64).reshape(-1, cfg.embed_dim)
  logits, routes = route(params, bias, xs, cfg)
  chosen = [c for _, c, _ in routes]
  used = routes if replay is None else replayed(routes, replay, cfg)
  kept = kept_mask([c for _, c, _ in used], cfg)
  ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
  y = np.zeros_like(xs)
  for t, (_, experts, gates) in enumerate(used):
    for k, e in enumerate(experts):
      if kept[t, k]:
        y[t] += gates[k] * _swiglu(xs[t], ex["gate"][e], ex["up"][e], ex["down"][e])
    if "shared" in params:
      sh = {k: np.asarray(v, np.float64) for k, v in params["shared"].items()}
      y[t] += _swiglu(xs[t], sh["gate"], sh["up"], sh["down"])

  load = np.zeros(cfg.num_experts)
  for c in chosen:
    for e in c:
      load[e] += 1
  scores = np.stack([s for s, _, _ in routes])
  probs = scores / scores.sum(-1, keepdims=True)

  def switch_loss(rows):
    f = np.zeros(cfg.num_experts)
    for t in rows:
      for e in chosen[t]:
        f[e] += 1
    f /= len(rows) * cfg.top_k
    return cfg.num_experts * np.sum(f * probs[rows].mean(0))

  length = shape[-2] if len(shape) >= 3 else xs.shape[0]
  sequences = [list(range(i, i + length)) for i in range(0, xs.shape[0], length)]
  lse = np.log(np.exp(logits).sum(-1))
  aux = {
      "load": load,
      "aux_loss": switch_loss(list(range(xs.shape[0]))),
      "seq_aux_loss": np.mean([switch_loss(rows) for rows in sequences]),
      "z_loss": np.mean(lse ** 2),
      "dropped_fraction": 1.0 - kept.mean(),
      "max_vio": load.max() / load.mean() - 1.0,
  }
  return y.reshape(shape), aux, np.stack(chosen), kept
