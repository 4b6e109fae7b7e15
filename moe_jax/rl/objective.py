"""The group-relative clipped objective: advantages, the k3 KL estimate, the per-token loss and
its three aggregations, on plain arrays (`B` = sequences, `T` = token positions, `V` = vocabulary,
`N` = groups, `G` = completions per group).

Token masks mark the completion tokens whose log-probs are trained: prompt and padding positions
are 0. Masked positions may hold anything (even NaN or -inf): they are replaced before any
arithmetic, so they carry neither loss nor gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import generate
from moe_jax.rl.config import LOSS_AGGS


def _bad(name, value, allowed):
  raise ValueError(f"{name}={value!r}: {allowed}")


def _number(name, value, lo, hi=math.inf, hi_open=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi or \
      (hi_open and value == hi):
    _bad(name, value, f"must be a number in [{lo}, {hi}{')' if hi_open else ']'}")


def group_advantages(rewards_NxG: jax.Array, *, scale: bool = True,
                     eps: float = 1e-6) -> jax.Array:
  """(r - mean of its group), divided by (the group's std + eps) when `scale`.

  The std is the population one (ddof=0): defined for any G, and it makes a group's advantages
  unit-variance. A group whose rewards are all equal gets exactly 0 (its mean can differ from
  its rewards by a rounding error, which would otherwise leave a tiny, meaningless gradient)."""
  r = jnp.asarray(rewards_NxG, jnp.float32)
  if r.ndim != 2:
    _bad("rewards_NxG.shape", r.shape, "must be [groups, completions per group]")
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + eps)
  uniform = (r.max(axis=1) == r.min(axis=1))[:, None]
  return jnp.where(uniform, 0.0, adv)


def uniform_groups(rewards_NxG) -> np.ndarray:
  """bool [N]: the groups whose rewards are all equal. They carry no signal (all advantages 0);
  dynamic sampling drops them and fills the batch with fresh prompts."""
  r = np.asarray(rewards_NxG)
  if r.ndim != 2:
    _bad("rewards_NxG.shape", r.shape, "must be [groups, completions per group]")
  return r.max(axis=1) == r.min(axis=1)


def completion_mask(prompt_lens_B, lengths_B, seq_len: int) -> jax.Array:
  """float32 [B, seq_len]: 1 at positions prompt_len <= t < length (the completion tokens)."""
  t_T = jnp.arange(seq_len)
  p_B, n_B = jnp.asarray(prompt_lens_B), jnp.asarray(lengths_B)
  return ((t_T[None, :] >= p_B[:, None]) & (t_T[None, :] < n_B[:, None])).astype(jnp.float32)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """float32 [B, T]: log p(tokens[b, t]) under logits[b, t] (already aligned: the caller shifts
  the model's next-token logits by one)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]


# A token outside the sampling nucleus gets this log-prob instead of -inf: its ratio is exp of
# about -1e30, i.e. 0, and no inf or NaN reaches a gradient.
OUTSIDE_LOGP = -1e30


def sampling_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float,
                      top_p: float) -> jax.Array:
  """float32 [B, T]: log-probs of tokens under the distribution the engine samples from
  (serve/sampling.py): logits / temperature, then the top-p nucleus (generate.top_p_filter),
  renormalised. A token outside the nucleus gets OUTSIDE_LOGP. temperature > 0."""
  _number("temperature", temperature, 0.0)
  if not temperature > 0:
    _bad("temperature", temperature, "must be > 0 (greedy decoding has no ratio)")
  _number("top_p", top_p, 0.0, 1.0)
  B, T, V = logits_BxTxV.shape
  scaled = logits_BxTxV.astype(jnp.float32).reshape(B * T, V) / temperature
  kept = generate.top_p_filter(scaled, jnp.float32(top_p))
  kept = jnp.where(jnp.isfinite(kept), kept, OUTSIDE_LOGP)
  return token_logprobs(kept.reshape(B, T, V), tokens_BxT)


def masked_mean(x_BxT, mask_BxT):
  return jnp.where(mask_BxT, x_BxT, 0.0).sum() / jnp.maximum(mask_BxT.sum(), 1)


def max_gap(a_BxT, b_BxT, mask_BxT):
  """max |a - b| over the masked positions."""
  return jnp.where(mask_BxT > 0, jnp.abs(a_BxT - b_BxT), 0.0).max()


def behaviour_mismatch(behaviour_BxT, logp_BxT, mask_BxT) -> dict:
  """How far log-probs are from the behaviour's on its own samples, over the masked positions:
  `behaviour_kl` (mean k3 of KL(behaviour || policy)) and `behaviour_gap` (max |difference|)."""
  return {"behaviour_kl": masked_mean(k3_kl(behaviour_BxT, logp_BxT), mask_BxT),
          "behaviour_gap": max_gap(behaviour_BxT, logp_BxT, mask_BxT)}


def entropy(logits_BxTxV: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean over masked-in tokens of the policy's entropy (nats), in float32."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  h_BxT = -(jnp.exp(logp_BxTxV) * logp_BxTxV).sum(-1)
  return masked_mean(h_BxT, jnp.asarray(mask_BxT) > 0)


def k3_kl(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(policy || reference) from samples of the policy:
  exp(ref - logp) - (ref - logp) - 1, which is >= 0 and unbiased. Written with expm1: in float32
  exp(d) - 1 cancels to 0 (or below) for |d| < ~1e-4, where KL ~ d^2 / 2 is what a rollout/learner
  mismatch measures."""
  d = ref_logp_BxT - logp_BxT
  return jnp.expm1(d) - d


def aggregate(loss_BxT: jax.Array, mask_BxT: jax.Array, loss_agg: str,
              max_len: Optional[int] = None) -> jax.Array:
  """One scalar from per-token losses over the masked-in tokens:
    seq_mean_token_mean      (GRPO) mean over each sequence's tokens, then over sequences
    token_mean               (DAPO) sum over all tokens / their number
    seq_mean_token_sum_norm  (Dr. GRPO) each sequence's token sum / max_len (a constant: the
                             generation budget; default T), then mean over sequences
  'Sequences' are the rows with at least one token, so all-padding rows that fill a batch
  change nothing."""
  if loss_agg not in LOSS_AGGS:
    _bad("loss_agg", loss_agg, f"must be one of {', '.join(map(repr, LOSS_AGGS))}")
  mask_BxT = jnp.asarray(mask_BxT) > 0
  loss_BxT = jnp.where(mask_BxT, loss_BxT, 0.0)
  if loss_agg == "token_mean":
    return loss_BxT.sum() / jnp.maximum(mask_BxT.sum(), 1)
  count_B = mask_BxT.sum(axis=1)
  if loss_agg == "seq_mean_token_mean":
    seq_B = loss_BxT.sum(axis=1) / jnp.maximum(count_B, 1)
  else:
    max_len = loss_BxT.shape[1] if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
      _bad("max_len", max_len, "must be an integer >= 1")
    seq_B = loss_BxT.sum(axis=1) / max_len
  return seq_B.sum() / jnp.maximum((count_B > 0).sum(), 1)


def policy_loss(logp_BxT: jax.Array, behaviour_logp_BxT: jax.Array, advantages_B: jax.Array,
                mask_BxT: jax.Array, *, clip_low: float = 0.2, clip_high: float = 0.2,
                kl_coef: float = 0.0, ref_logp_BxT: Optional[jax.Array] = None,
                loss_agg: str = "seq_mean_token_mean", max_len: Optional[int] = None,
                ratio_logp_BxT: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """(loss, metrics) of the clipped objective with a k3 KL penalty, per token

      ratio = exp(ratio_logp - behaviour_logp)   (ratio_logp: logp unless given; the policy's
                                                  log-probs under the sampling distribution's
                                                  processing, sampling_logprobs, when the
                                                  behaviour's are)
      loss  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3

  aggregated by `loss_agg` (see `aggregate`). Metrics, means over masked-in tokens, no
  gradient: `pg_loss` (the clipped term, aggregated alike), `kl` (mean k3; 0 without a
  reference), `ratio_mean`, `behaviour_kl` and `behaviour_gap` (`behaviour_mismatch`),
  `clip_fraction` = `clip_low_fraction` (A < 0, ratio < 1 - clip_low) + `clip_high_fraction`
  (A > 0, ratio > 1 + clip_high): the tokens whose gradient the clip removed. `tokens`: their
  number."""
  _number("clip_low", clip_low, 0.0)  # >= 1: no lower clip (a ratio is > 0; R1-Zero: 10)
  _number("clip_high", clip_high, 0.0)
  _number("kl_coef", kl_coef, 0.0)
  shape = jnp.shape(logp_BxT)
  if len(shape) != 2:
    _bad("logp_BxT.shape", shape, "must be [sequences, tokens]")
  named = [("behaviour_logp_BxT", behaviour_logp_BxT), ("mask_BxT", mask_BxT)]
  if ratio_logp_BxT is not None:
    named.append(("ratio_logp_BxT", ratio_logp_BxT))
  for name, x in named + ([("ref_logp_BxT", ref_logp_BxT)] if ref_logp_BxT is not None else []):
    if jnp.shape(x) != shape:
      _bad(f"{name}.shape", jnp.shape(x), f"must equal logp_BxT.shape={shape}")
  if jnp.shape(advantages_B) != shape[:1]:
    _bad("advantages_B.shape", jnp.shape(advantages_B), f"must be ({shape[0]},), one per sequence")

  mask_BxT = jnp.asarray(mask_BxT) > 0
  # Masked positions are replaced by 0 first, so their NaN/-inf never reach a gradient.
  clean = lambda x: jnp.where(mask_BxT, jnp.asarray(x, jnp.float32), 0.0)
  logp_BxT, old_BxT = clean(logp_BxT), clean(behaviour_logp_BxT)
  new_BxT = logp_BxT if ratio_logp_BxT is None else clean(ratio_logp_BxT)
  a_Bx1 = jnp.asarray(advantages_B, jnp.float32)[:, None]
  ratio_BxT = jnp.exp(new_BxT - old_BxT)
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  pg_BxT = -jnp.minimum(ratio_BxT * a_Bx1, clipped_BxT * a_Bx1)
  kl_BxT = k3_kl(logp_BxT, clean(ref_logp_BxT)) if ref_logp_BxT is not None else \
      jnp.zeros_like(logp_BxT)
  loss = aggregate(pg_BxT + kl_coef * kl_BxT if kl_coef else pg_BxT, mask_BxT, loss_agg,
                   max_len)

  sg = jax.lax.stop_gradient
  low = masked_mean(((a_Bx1 < 0) & (ratio_BxT < 1.0 - clip_low)).astype(jnp.float32), mask_BxT)
  high = masked_mean(((a_Bx1 > 0) & (ratio_BxT > 1.0 + clip_high)).astype(jnp.float32),
                     mask_BxT)
  # before any update: the rollout/learner mismatch that router replay removes
  mismatch = {k: sg(v) for k, v in behaviour_mismatch(old_BxT, new_BxT, mask_BxT).items()}
  metrics = {
      "pg_loss": sg(aggregate(pg_BxT, mask_BxT, loss_agg, max_len)),
      "kl": sg(masked_mean(kl_BxT, mask_BxT)),
      "ratio_mean": sg(masked_mean(ratio_BxT, mask_BxT)),
      **mismatch,
      "clip_low_fraction": sg(low),
      "clip_high_fraction": sg(high),
      "clip_fraction": sg(low + high),
      "tokens": mask_BxT.sum(),
  }
  return loss, metrics
