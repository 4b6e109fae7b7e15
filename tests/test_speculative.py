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
  # The oracle runs a full forward per draft (slow): six prompts do for its bookkeeping.
  prompts = setup[3] if drafter == "mtp" else setup[3][:6]
  requests = [Request(p, max_tokens=7, ignore_eos=True, top_logprobs=2) for p in prompts]
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


def _exact_four(setup, prompt, temperature, top_p, top_k):
  """{(t1..t4): probability} of the first four tokens under plain sampling, from the full
  forward and the engine's own filters."""
  cfg, params, state, _ = setup
  settings = (np.full(1, temperature, np.float32), np.full(1, top_p, np.float32),
              np.full(1, top_k, np.int32))
  out = {(): 1.0}
  for _ in range(4):
    grown = {}
    for pre, prob in out.items():
      logits, _ = model.apply(params, state, np.asarray([prompt + list(pre)]), cfg, MOE)
      p = np.asarray(probabilities(logits[:, -1], *settings), np.float64)[0]
      grown.update({pre + (t,): prob * p[t] for t in np.flatnonzero(p)})
    out = grown
  return out


def _flat_oracle(setup, greedy=False):
  """A sampling drafter whose q is the main model's own next-token logits at half their scale
  (a full forward), filtered like p: it overlaps p, so drafts are accepted and rejected. With
  greedy, q's argmax is drafted (as vLLM's MTP does at every temperature)."""
  cfg, params, state, _ = setup

  def draft(engine, live, rngs, B):
    del B
    drafts, qs = [], []
    for (job, seq), rng in zip(live, rngs):
      r = job.request
      room = r.max_tokens - (len(seq.tokens) - len(job.prompt)) - 1
      tokens, q_rows = list(seq.tokens), []
      for _ in range(min(engine.speculative_tokens, room) if seq.hidden is not None else 0):
        logits, _ = model.apply(params, state, np.asarray([tokens]), cfg, MOE)
        q = np.asarray(probabilities(0.5 * logits[:, -1], np.full(1, r.temperature, np.float32),
                                     np.full(1, r.top_p, np.float32),
                                     np.full(1, r.top_k, np.int32)), np.float64)[0]
        tokens.append(int(np.argmax(q)) if greedy else speculative.draw(q, rng.random()))
        q_rows.append(q)
      drafts.append(tokens[len(seq.tokens):])
      qs.append(q_rows)
    return drafts, qs
  return draft


@pytest.mark.parametrize("temperature,top_p,drafter", [(1.0, 1.0, "mtp"), (1.0, 1.0, "flat"),
                                                       (0.6, 0.9, "flat")])
def test_engine_sampling_matches_the_exact_distribution(setup, monkeypatch, temperature, top_p,
                                                        drafter):
  """Tokens 3 and 4 come from one draft and its verification (token 2's step has no hidden state
  yet); the joint of all four against the exact one, top_k 2 keeping it to 16 cells. The tiny
  random MTP module's top 2 never meets the main model's (every draft rejected), so a drafter
  that overlaps p checks acceptance too."""
  from moe_jax.serve import spec_decode
  if drafter == "flat":
    monkeypatch.setattr(spec_decode, "_draft", _flat_oracle(setup))
  cfg, params, state, prompts = setup
  if cfg.attention == "mha":
    pytest.skip("sampling does not depend on the attention kind; the greedy test covers MHA")
  prompt, top_k = prompts[0], 2
  exact = _exact_four(setup, prompt, temperature, top_p, top_k)
  cells = sorted(exact)
  engine = Engine(params, state, cfg, MOE, num_blocks=512, block_size=4, max_batch=64,
                  speculative_tokens=1)

  def counts():
    c = np.zeros(len(cells))
    for seed in range(E2E_REQUESTS):
      done = engine.generate([Request(prompt, max_tokens=4, n=64, seed=seed, ignore_eos=True,
                                      temperature=temperature, top_p=top_p, top_k=top_k)])
      for choice in done[0].choices:
        c[cells.index(tuple(choice.token_ids))] += 1
    return c
  probs = np.array([exact[c] for c in cells])
  assert not _rejects(counts(), probs)
  assert engine.stats["drafted_1"] > 0
  if drafter == "mtp":
    return
  assert 0 < engine.stats["accepted_1"] < engine.stats["drafted_1"]
  # The wrong rule: greedy drafts accepted as they are.
  monkeypatch.setattr(spec_decode, "_draft", _flat_oracle(setup, greedy=True))
  monkeypatch.setattr(speculative, "accept", speculative.accept_as_drafted)
  assert _rejects(counts(), probs)


E2E_REQUESTS = 60  # x 64 samples


V3_MODEL = ModelConfig(vocab_size=64, embed_dim=32, num_layers=3, first_k_dense=1,
                       dense_ffn_dim=48, num_heads=4, num_kv_heads=4, q_lora_rank=24,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                       max_seq_len=32, mtp_depth=1, pad_id=-1)
V3_MOE = MoEConfig(embed_dim=32, num_experts=16, top_k=4, expert_ffn_dim=16, n_groups=4,
                   topk_groups=2, routed_scaling=2.5)


def test_v3_checkpoint_mtp_layer_drafts(tmp_path):
  """A DeepSeek-V3-format checkpoint's MTP layer is the drafter: its draft at position 0 (where
  the MTP block's attention sees only itself) equals the training forward's MTP logits there,
  and greedy speculative output equals plain decoding."""
  from moe_jax import generate
  from moe_jax.interop import hf
  from moe_jax.serve import spec_decode
  params, state = model.init(jax.random.key(0), V3_MODEL, V3_MOE)
  state = jax.tree.map(lambda b: b + jax.random.normal(jax.random.key(1), b.shape), state)
  hf.export(str(tmp_path), params, state, V3_MODEL, V3_MOE)
  ckpt = hf.load(str(tmp_path))
  tokens = np.asarray([[5, 9, 17, 3]], np.int32)
  _, aux = model.apply(ckpt.params, ckpt.moe_state, tokens, ckpt.model, ckpt.moe)
  caches = generate.init_caches(ckpt.model, 1, 4)
  moe = dataclasses.replace(ckpt.moe, capacity_factor=None)
  *_, hidden = jax.jit(generate.forward_cached_hidden, static_argnums=(5, 6))(
      ckpt.params, ckpt.moe_state, tokens, 0, caches, ckpt.model, moe)
  drafted, _ = spec_decode.mtp_draft(ckpt.params, ckpt.moe_state, hidden[:, 0], tokens[:, 1],
                                     ckpt.model, moe, 0)
  np.testing.assert_allclose(drafted, aux["mtp_logits"][0][:, 0], atol=1e-4, rtol=1e-4)
  rng = np.random.default_rng(5)
  requests = [Request([int(t) for t in rng.integers(0, 64, size=6)], max_tokens=8,
                      ignore_eos=True) for _ in range(8)]
  outputs = []
  for k in (0, 2):
    engine = Engine(ckpt.params, ckpt.moe_state, ckpt.model, ckpt.moe, num_blocks=64,
                    block_size=4, max_batch=8, speculative_tokens=k)
    outputs.append([c.choices[0].token_ids for c in engine.generate(requests)])
  assert outputs[0] == outputs[1] and engine.stats["drafted_1"] > 0


def test_stops_n_streaming_and_usage_as_without_speculation(setup, monkeypatch):
  """A stop token inside a run of accepted drafts ends the sequence there; n = 2, the streamed
  tokens and usage are those of plain decoding."""
  from moe_jax.serve import spec_decode
  monkeypatch.setattr(spec_decode, "_draft", _oracle(setup))
  cfg, params, state, prompts = setup
  _, plain = _run(setup, [Request(p, max_tokens=7, ignore_eos=True) for p in prompts[:6]])
  requests = [Request(p, max_tokens=7, n=2, stop_token_ids=[done.choices[0].token_ids[3]])
              for p, done in zip(prompts[:6], plain)]
  results = []
  for k in (0, 3):
    engine = Engine(params, state, cfg, MOE, num_blocks=128, block_size=4, max_batch=8,
                    speculative_tokens=k)
    streamed = {}
    ids = [engine.submit(r, on_token=lambda c, t, lp, i=i: streamed.setdefault((i, c), [])
                         .append(t)) for i, r in enumerate(requests)]
    done = {}
    while len(done) < len(ids):
      done.update(engine.step())
    results.append(([[(c.token_ids, c.finish_reason, c.stop_token) for c in done[i].choices]
                     for i in ids], [done[i].usage for i in ids], streamed))
  assert results[0] == results[1]
  assert all(c[1] == "stop" for row in results[1][0] for c in row)


def test_speculation_without_an_mtp_module_is_refused():
  cfg = dataclasses.replace(_BASE, mtp_depth=0)
  params, state = model.init(jax.random.key(0), cfg, MOE)
  with pytest.raises(ValueError, match=r"serve.speculative_tokens=2: the model has no MTP"):
    Engine(params, state, cfg, MOE, num_blocks=8, speculative_tokens=2)
  with pytest.raises(ValueError, match=r"serve.speculative_tokens=-1"):
    Engine(params, state, cfg, MOE, num_blocks=8, speculative_tokens=-1)
