"""Speculative decoding: the acceptance rule's output is distributed exactly as the main model's
(a chi-square test able to see a 1% shift, which a wrong rule fails), and the engine's greedy
speculative output equals its plain decoding token for token."""
import dataclasses
import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from moe_jax import model
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.serve import Engine, Request
from moe_jax.serve import speculative
from moe_jax.serve.sampling import probabilities

V, K, SAMPLES, ALPHA = 6, 2, 60_000, 1e-4  # the test rejects at p-value < ALPHA


def _tables(temperature, top_p, seed):
  """p and q (after temperature and top-p) for every prefix of up to K tokens of a toy model;
  q is p's logits plus noise, so drafts are often but not always accepted."""
  rng = np.random.default_rng(seed)
  prefixes = [pre for n in range(K + 1) for pre in itertools.product(range(V), repeat=n)]
  p_logits = rng.normal(size=(len(prefixes), V)) * 1.5
  q_logits = p_logits + rng.normal(size=p_logits.shape)
  n = len(prefixes)
  args = (np.full(n, temperature, np.float32), np.full(n, top_p, np.float32),
          np.zeros(n, np.int32))
  p = np.asarray(probabilities(p_logits.astype(np.float32), *args), np.float64)
  q = np.asarray(probabilities(q_logits.astype(np.float32), *args), np.float64)
  return ({pre: p[i] for i, pre in enumerate(prefixes)}, {pre: q[i] for i, pre in
                                                          enumerate(prefixes)})


def _first_two(rule, p, q, rng):
  """Drafts K tokens from q, verifies with p by `rule`, repeated until two tokens are out."""
  out = ()
  while len(out) < 2:
    drafts = []
    for _ in range(K - len(out)):  # the tables stop at K tokens: draft no further
      drafts.append(speculative.draw(q[out + tuple(drafts)], rng.random()))
    rows = [p[out + tuple(drafts[:j])] for j in range(len(drafts) + 1)]
    qs = [q[out + tuple(drafts[:j])] for j in range(len(drafts))]
    tokens, _ = rule(np.stack(rows), np.stack(qs) if qs else np.zeros((0, V)), drafts, rng)
    out += tuple(tokens)
  return out[:2]


def _exact(p):
  return np.array([p[()][a] * p[(a,)][b] for a in range(V) for b in range(V)])


def _rejects(counts, exact):
  """True when the counts are unlikely under `exact` (chi-square over its possible cells; a
  count in an impossible cell rejects at once)."""
  if counts[exact == 0].sum() > 0:
    return True
  keep = exact > 0
  expected = exact[keep] / exact[keep].sum() * counts.sum()
  return stats.chisquare(counts[keep], expected).pvalue < ALPHA


def _counts(rule, p, q, seed):
  rng, counts = np.random.default_rng(seed), np.zeros(V * V)
  for _ in range(SAMPLES):
    a, b = _first_two(rule, p, q, rng)
    counts[a * V + b] += 1
  return counts


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_acceptance_rule_is_exact_and_the_test_sees_a_one_percent_shift(temperature, top_p):
  p, q = _tables(temperature, top_p, seed=1)
  exact = _exact(p)
  assert not _rejects(_counts(speculative.accept, p, q, seed=2), exact)
  # Power: the same number of samples from a distribution 1% away (0.01 of mass moved between
  # the two likeliest cells, where a shift is hardest to see) is rejected.
  shifted = exact.copy()
  top2 = np.argsort(exact)[-2:]
  shifted[top2[0]] += 0.01
  shifted[top2[1]] -= 0.01
  sample = np.random.default_rng(3).multinomial(SAMPLES, shifted).astype(float)
  assert _rejects(sample, exact)
  # Accepting greedy-or-sampled drafts as they are gives q's distribution, not p's.
  assert _rejects(_counts(speculative.accept_as_drafted, p, q, seed=4), exact)


def test_greedy_one_hot_rule_accepts_exactly_the_argmax():
  rng = np.random.default_rng(0)
  p = np.eye(V)[[2, 4, 1]]
  assert speculative.accept(p, np.eye(V)[[2, 4]], [2, 4], rng) == ([2, 4, 1], 2)
  assert speculative.accept(p, np.eye(V)[[2, 5]], [2, 5], rng) == ([2, 4], 1)
  assert speculative.accept(p, np.eye(V)[[3, 4]], [3, 4], rng) == ([2], 0)
