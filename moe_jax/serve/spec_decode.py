"""Speculative decoding with the model's own MTP modules as the drafter (engine.speculative_tokens
= k > 0; speculative.py has the acceptance rule and why it is exact).

A sequence whose last token t_n was sampled from the main model's hidden state h_{n-1} drafts
d_1 = MTP_0(h_{n-1}, t_n), d_2 = MTP_1(h', d_1), ... (module min(j, depth - 1): past the MTP
depth the last module is reused on its own output), each drawn from the drafter's distribution
q_j after the request's temperature, top-k and top-p. One forward of the main model over the
paged cache feeds [t_n, d_1..d_k] at positions n..n+k (`kv.verify`), giving p_1..p_{k+1}; the
rule keeps a prefix of the drafts and one more token. Slots written for rejected drafts lie past
the sequence's `computed` and are overwritten by its next step (causality hides them until then);
block hashes cover accepted tokens only. A sequence without a hidden state yet (just prefilled)
drafts nothing that step. Log-probs, top log-probs and routes are the main model's.

Limitation: the MTP block attends to the current draft position only (it keeps no KV cache of
its own), so its drafts are weaker than V3's; the output's distribution does not depend on it.
"""
from __future__ import annotations

# pylint: disable=protected-access  (this module is the engine's decode step, on its helpers)

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import decoder
from moe_jax.serve import kv, speculative
from moe_jax.serve.sampling import probabilities, top_logprobs


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def mtp_draft(params, moe_state, h_BxD, tokens_B, model_cfg, moe_cfg, depth: int):
  """MTP module `depth` on (hidden state, next token) -> (logits [B, V] float32, its hidden)."""
  name = f"mtp_{depth}"
  emb_VxD = params["embed"]["embedding"]
  e_Bx1xD = jnp.take(emb_VxD, tokens_B, axis=0)[:, None].astype(model_cfg.dtype)
  ffn = moe_cfg if decoder.is_moe_layer(model_cfg, model_cfg.num_layers + depth) else None
  variables = {"params": params[name]}
  state = decoder.to_flax_state(moe_state, model_cfg).get(name)
  if state:
    variables["moe_state"] = state
  h_Bx1xD, logits_Bx1xV, _ = decoder.MTPModule(model_cfg, ffn).apply(
      variables, h_BxD[:, None].astype(model_cfg.dtype), e_Bx1xD, params["head"]["kernel"])
  return logits_Bx1xV[:, 0], h_Bx1xD[:, 0]


def _settings(live, B):
  def pad(values, dtype, fill=0):
    values = list(values)
    return np.asarray(values + [fill] * (B - len(values)), dtype)
  reqs = [job.request for job, _ in live]
  return (pad((r.temperature for r in reqs), np.float32), pad((r.top_p for r in reqs),
          np.float32, 1.0), pad((r.top_k for r in reqs), np.int32))


def _rng(job, seq):
  return np.random.default_rng([job.seed & 0xFFFFFFFF, seq.choice,
                                len(seq.tokens) - len(job.prompt)])


def _draft(engine, live, rngs, B):
  """-> per sequence (its drafts, their q rows [k_i, V])."""
  k, depth = engine.speculative_tokens, engine.model_cfg.mtp_depth
  limits = [0 if s.hidden is None else
            min(k, job.request.max_tokens - (len(s.tokens) - len(job.prompt)) - 1)
            for job, s in live]
  drafts, qs = [[] for _ in live], [[] for _ in live]
  if max(limits) <= 0:
    return drafts, qs
  D = engine.model_cfg.embed_dim
  h = np.zeros((B, D), np.float32)
  tok = np.zeros((B,), np.int32)
  for i, (_, s) in enumerate(live):
    if s.hidden is not None:
      h[i], tok[i] = s.hidden, s.tokens[-1]
  settings = _settings(live, B)
  for j in range(max(limits)):
    with engine._on_mesh():
      logits, h = mtp_draft(engine.params, engine.moe_state, h, tok, engine.model_cfg,
                            engine.moe_cfg, min(j, depth - 1))
      q = kv.host(probabilities(logits, *settings))
    tok = np.array(tok)
    for i in range(len(live)):
      if j < limits[i]:
        drafts[i].append(speculative.draw(q[i], rngs[i].random()))
        qs[i].append(q[i])
        tok[i] = drafts[i][-1]
  return drafts, qs


def decode(engine, live) -> None:
  """One speculative step for every live sequence (module docstring)."""
  B = max(1 << max(0, (len(live) - 1).bit_length()), engine.min_batch)
  rngs = [_rng(job, s) for job, s in live]
  drafts, qs = _draft(engine, live, rngs, B)
  T = engine.speculative_tokens + 1
  rows = []
  for (job, seq), d in zip(live, drafts):
    n = len(seq.tokens) - 1
    while (n + len(d)) // engine.block_size >= len(seq.blocks):
      seq.blocks.append(engine._allocate(job))
    rows.append(([seq.tokens[-1]] + d, n, seq.blocks))
  logits, hidden, routes = _verify(engine, rows, T, B)
  settings = [np.repeat(x, T) for x in _settings(live, B)]
  p = kv.host(probabilities(logits.reshape(B * T, -1), *settings)).reshape(B, T, -1)
  logp = kv.host(jax.nn.log_softmax(logits, axis=-1))
  engine.stats["decode_steps"] += 1
  for i, (job, seq) in enumerate(live):
    d = drafts[i]
    tokens, accepted = speculative.accept(p[i, :len(d) + 1], np.asarray(qs[i]).reshape(
        len(d), p.shape[-1]), d, rngs[i])
    for j in range(len(d)):
      engine.stats[f"drafted_{j + 1}"] += 1
      engine.stats[f"accepted_{j + 1}"] += int(j < accepted)
    _emit(engine, job, seq, tokens, (logits[i], logp[i], p[i]))
    seq.hidden = hidden[i, accepted]
    fed = min(accepted + 1, len(seq.tokens) - seq.computed)
    if routes is not None:
      seq.routes.append(routes[i, :fed])
    seq.computed += fed
    engine._register_full_blocks(seq)


def _verify(engine, rows, T, B):
  W = 1 << max(0, (max(max(len(t) for _, _, t in rows),
                       max(p + T for _, p, _ in rows) // engine.block_size + 1) - 1).bit_length())
  tokens, pos = np.zeros((B, T), np.int32), np.zeros((B,), np.int32)
  n, tables = np.zeros((B,), np.int32), np.full((B, W), kv.NULL_BLOCK, np.int32)
  for i, (new, start, table) in enumerate(rows):
    tokens[i, :len(new)], pos[i], n[i] = new, start, len(new)
    tables[i, :len(table)] = table
  engine.shapes.add((B, T, W))
  with engine._on_mesh():
    logits, hidden, engine.pool, routes = kv.verify(
        engine.params, engine.moe_state, engine.pool, tokens, pos, n, tables, engine.model_cfg,
        engine.moe_cfg)
  routes = kv.host(routes) if engine.record_routes else None
  return kv.host(logits), kv.host(hidden), routes


def _emit(engine, job, seq, tokens, rows):
  """Appends the step's tokens in order until the sequence finishes; row j's distributions are
  the main model's for the j-th token."""
  logits, logp, p = rows
  want = job.request.top_logprobs
  top = [kv.host(x) for x in top_logprobs(logits[:len(tokens)], want)] if want else None
  hot = job.request.temperature > 0
  for j, token in enumerate(tokens):
    if seq.finish is not None:
      return
    alternatives = None
    if top is not None:
      alternatives = {int(t): float(v) for t, v in zip(top[0][j], top[1][j])}
    sample_logp = float(np.log(p[j, token])) if hot else 0.0
    try:
      engine._append(job, seq, (int(token), float(logp[j, token]), sample_logp), alternatives)
    except Exception as e:  # pylint: disable=broad-except  (its callback or text: its failure)
      engine._fail(job, e)
