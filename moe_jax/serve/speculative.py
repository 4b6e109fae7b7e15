"""Speculative sampling's acceptance rule, a pure function on host arrays (Leviathan et al. 2023;
Chen et al. 2023): the tokens it emits are distributed exactly as sampling the main model one
token at a time, whatever the drafter.

Given the drafts d_1..d_k, drawn from the drafter's distributions q_1..q_k, and the main model's
distributions p_1..p_{k+1} (p_j after the prefix and d_1..d_{j-1}; both after the same
temperature, top-k and top-p: sampling.probabilities), d_j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from the normalised
max(0, p_j - q_j) and the step ends; when all k are accepted a bonus token comes from p_{k+1}.
Greedy needs no special case: p and q are one-hot, so a draft is accepted exactly when it is the
main model's argmax, and the residual is that argmax.
"""
from __future__ import annotations

import numpy as np


def draw(probs_V: np.ndarray, u: float) -> int:
  """The token whose cumulative-probability interval holds u * total (u in [0, 1)): never a
  token of probability 0."""
  cdf = np.cumsum(np.asarray(probs_V, np.float64))
  return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))


def accept(p_KplusxV: np.ndarray, q_KxV: np.ndarray, drafts: list[int],
           rng: np.random.Generator) -> tuple[list[int], int]:
  """-> (the emitted tokens: the accepted drafts then one more token, the number accepted)."""
  p = np.asarray(p_KplusxV, np.float64)
  q = np.asarray(q_KxV, np.float64)
  for j, token in enumerate(drafts):
    if rng.random() * q[j, token] < p[j, token]:  # u < p/q without dividing
      continue
    residual = np.maximum(p[j] - q[j], 0.0)
    if residual.sum() <= 0:  # p <= q everywhere only by rounding: p itself is then the answer
      residual = p[j]
    return list(drafts[:j]) + [draw(residual, rng.random())], j
  return list(drafts) + [draw(p[len(drafts)], rng.random())], len(drafts)


def accept_as_drafted(p_KplusxV: np.ndarray, q_KxV: np.ndarray, drafts: list[int],
                      rng: np.random.Generator) -> tuple[list[int], int]:
  """A wrong rule, kept for the exactness test to show it fails: every draft accepted as is."""
  del q_KxV
  return list(drafts) + [draw(np.asarray(p_KplusxV, np.float64)[len(drafts)], rng.random())], \
      len(drafts)
