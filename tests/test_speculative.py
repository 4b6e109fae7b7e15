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


_BASE = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, head_dim=8, num_kv_heads=2, max_seq_len=64, init_std=0.2,
                    mtp_depth=1)
CONFIGS = {"mla": _BASE, "mha": dataclasses.replace(_BASE, attention="mha")}
MOE = MoEConfig(embed_dim=32, num_experts=8, top_k=2, expert_ffn_dim=16)
PROMPTS = 24


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  cfg = CONFIGS[request.param]
  params, state = model.init(jax.random.key(0), cfg, MOE)
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(0, 256, size=rng.integers(2, 14))]
             for _ in range(PROMPTS)]
  return cfg, params, state, prompts


def _run(setup, requests, **kw):
  cfg, params, state, _ = setup
  engine = Engine(params, state, cfg, MOE, num_blocks=128, block_size=4, max_batch=8, **kw)
  return engine, engine.generate(requests)


def _oracle(setup, wrong_every=0):
  """A drafter that knows the main model's greedy continuation (a full forward), every
  `wrong_every`-th draft made wrong: drafts get accepted and rejected at chosen places."""
  cfg, params, state, _ = setup

  def draft(engine, live, rngs, B):
    del rngs, B
    drafts, qs = [], []
    for job, seq in live:
      room = job.request.max_tokens - (len(seq.tokens) - len(job.prompt)) - 1
      tokens = list(seq.tokens)
      for _ in range(min(engine.speculative_tokens, room)):
        logits, _ = model.apply(params, state, np.asarray([tokens]), cfg, MOE)
        tokens.append(int(np.argmax(logits[0, -1])))
      d = tokens[len(seq.tokens):]
      if wrong_every:
        d = [(t + 1) % cfg.vocab_size if (len(tokens) + j) % wrong_every == 0 else t
             for j, t in enumerate(d)]
      drafts.append(d)
      qs.append([np.eye(cfg.vocab_size)[t] for t in d])
    return drafts, qs
  return draft


@pytest.mark.parametrize("k,drafter", [(2, "mtp"), (3, "oracle"), (3, "half-wrong")])
def test_greedy_speculative_equals_plain_decoding(setup, monkeypatch, k, drafter):
  from moe_jax.serve import spec_decode
  if drafter != "mtp":
    monkeypatch.setattr(spec_decode, "_draft", _oracle(setup, 0 if drafter == "oracle" else 2))
  requests = [Request(p, max_tokens=7, ignore_eos=True, top_logprobs=2) for p in setup[3]]
  _, plain = _run(setup, requests)
  engine, fast = _run(setup, requests, speculative_tokens=k)
  for a, b in zip(plain, fast):
    assert a.choices[0].token_ids == b.choices[0].token_ids
    np.testing.assert_allclose(a.choices[0].logprobs, b.choices[0].logprobs, atol=1e-4)
    assert [sorted(t) for t in a.choices[0].top_logprobs] == \
        [sorted(t) for t in b.choices[0].top_logprobs]
    assert a.usage == b.usage
  drafted = sum(v for key, v in engine.stats.items() if key.startswith("drafted_"))
  accepted = sum(v for key, v in engine.stats.items() if key.startswith("accepted_"))
  assert drafted > 0
  if drafter == "oracle":
    assert accepted == drafted
  if drafter == "half-wrong":
    assert 0 < accepted < drafted
