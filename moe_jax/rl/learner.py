"""The RL learner's step: one AdamW update of the policy on a minibatch of scored rollouts.

`rl_step(state, batch, ref_params, cfg, rl)` (its gradient alone: `rl_grads`) takes train.py's
state (params, opt_state, moe_state, step, bad_steps, ...) and returns it updated, with the same
optimizer as training (train.make_optimizer) at the constant rl.learning_rate. A batch is B
rollouts of T positions, arrays aligned with the tokens:

  tokens          int32 [B, T]     prompt + completion (+ padding)
  mask            [B, T]           1 on the completion tokens that are trained
  behaviour_logp  float32 [B, T]   log p(tokens[t]) under the rollout's sampling distribution
                                   (the engine's Choice.sample_logprobs: rl.temperature and
                                   rl.top_p applied); the ratio compares the policy's log-probs
                                   under the same processing (objective.sampling_logprobs), the
                                   KL and entropy use the model's own (temperature 1)
  advantages      float32 [B]
  routes          int32 [B, T, L, K]  optional: the rollout's experts (router replay)

Position t's log-prob comes from the logits at t - 1, so position 0 is never trained. With
routes, the policy and the reference both run the rollout's experts; the bias update and load
statistics still see the learner's own routing (model.py), over every position of the batch
(prompt and padding too, as pre-training counts every token). The loss is the clipped objective
(objective.policy_loss) plus the MoE balance losses, as in pre-training (0 unless configured).
The reference shares the policy's router biases (they only select experts, which replay fixes).
With routes the metrics also hold `behaviour_kl_without_replay` and `behaviour_gap_without_replay`:
the behaviour's k3 KL to, and largest log-prob difference from, the learner's log-probs under
its own routing: the mismatch replay removes. They cost one more forward, run only when
`measure_own_routing` (a traced bool: one program either way) and NaN otherwise: after an update
they would mix that mismatch with the update's change.
Not yet: MTP modules still run (their logits unused); FP8 "delayed" state is read, not updated.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from moe_jax import model, train
from moe_jax.config import ExperimentConfig
from moe_jax.rl import objective
from moe_jax.rl.config import RLConfig

BATCH_KEYS = ("tokens", "mask", "behaviour_logp", "advantages")


def logprobs(params, moe_state, tokens_BxT, cfg: ExperimentConfig, routes=None,
             fp8_state=None) -> tuple[jax.Array, jax.Array, dict]:
  """(log p(tokens[t] | tokens[:t]) [B, T] with 0 at t = 0, next-token logits [B, T-1, V],
  the model's aux)."""
  logits_BxTxV, aux = model.apply(params, moe_state, tokens_BxT, cfg.model, cfg.moe, cfg.fp8,
                                  fp8_state, routes)
  logits_BxT1xV = logits_BxTxV[:, :-1]
  logp_BxT1 = objective.token_logprobs(logits_BxT1xV, tokens_BxT[:, 1:])
  return jnp.pad(logp_BxT1, ((0, 0), (1, 0))), logits_BxT1xV, aux


def sampled_logprobs(logits_BxT1xV, tokens_BxT, rl: RLConfig) -> jax.Array:
  """[B, T] (0 at t = 0): log-probs under rollout sampling's processing (rl.temperature, top_p)."""
  logp_BxT1 = objective.sampling_logprobs(logits_BxT1xV, tokens_BxT[:, 1:], rl.temperature,
                                          rl.top_p)
  return jnp.pad(logp_BxT1, ((0, 0), (1, 0)))


def rl_grads(state: dict, batch: dict, ref_params: Optional[dict], cfg: ExperimentConfig,
             rl: RLConfig, measure_own_routing=True
             ) -> tuple[dict, tuple[jax.Array, dict, jax.Array]]:
  """(gradient of the loss w.r.t. the parameters, (loss, metrics, expert load [L_moe, E]))."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {', '.join(missing)}: an RL batch holds "
                     f"{', '.join(BATCH_KEYS)} (and routes, for router replay)")
  if rl.kl_coef and ref_params is None:
    raise ValueError(f"rl.kl_coef={rl.kl_coef}: needs ref_params (the reference policy)")
  tokens, routes, fp8_state = batch["tokens"], batch.get("routes"), state.get("fp8")
  mask_BxT = jnp.asarray(batch["mask"], jnp.float32).at[:, 0].set(0.0)
  ref_logp, own = None, {}
  if routes is not None:  # the mismatch replay removes: the learner routing on its own
    old_BxT = jnp.asarray(batch["behaviour_logp"], jnp.float32)

    def measure():
      own_logits = logprobs(state["params"], state["moe_state"], tokens, cfg, None, fp8_state)[1]
      own_logp = jax.lax.stop_gradient(sampled_logprobs(own_logits, tokens, rl))
      return objective.behaviour_mismatch(old_BxT, own_logp, mask_BxT)

    skip = lambda: {k: jnp.float32(jnp.nan) for k in ("behaviour_kl", "behaviour_gap")}
    own = {f"{k}_without_replay": v
           for k, v in jax.lax.cond(measure_own_routing, measure, skip).items()}
  if rl.kl_coef:
    ref_logp = jax.lax.stop_gradient(
        logprobs(ref_params, state["moe_state"], tokens, cfg, routes, fp8_state)[0])

  def loss_fn(params):
    logp_BxT, logits, aux = logprobs(params, state["moe_state"], tokens, cfg, routes, fp8_state)
    loss, metrics = objective.policy_loss(
        logp_BxT, batch["behaviour_logp"], batch["advantages"], mask_BxT, clip_low=rl.clip_low,
        clip_high=rl.clip_high, kl_coef=rl.kl_coef, ref_logp_BxT=ref_logp,
        loss_agg=rl.loss_agg, max_len=rl.max_tokens,
        ratio_logp_BxT=sampled_logprobs(logits, tokens, rl))
    metrics["entropy"] = jax.lax.stop_gradient(objective.entropy(logits, mask_BxT[:, 1:]))
    if routes is not None:  # how often the learner alone would have picked the rollout's experts
      same_BxT = (jnp.sort(aux["experts"], -1) == jnp.sort(routes, -1)).all(-1).mean(-1)
      used_BxT1 = mask_BxT[:, 1:]  # the positions whose logits score a trained token
      metrics["route_agreement"] = ((same_BxT[:, :-1] * used_BxT1).sum() /
                                    jnp.maximum(used_BxT1.sum(), 1))
    metrics.update(balance_loss=aux["balance_loss"], max_vio=aux["max_vio"], **own)
    return loss + aux["balance_loss"], (metrics, aux["load"])

  (loss, (metrics, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  return grads, (loss, metrics, load)


def rl_step(state: dict, batch: dict, ref_params: Optional[dict], cfg: ExperimentConfig,
            rl: RLConfig, measure_own_routing=True) -> tuple[dict, dict]:
  """One policy update (module doc); not applied when the loss or the update is not finite.
  ref_params may be None when rl.kl_coef is 0 (no reference forward then)."""
  grads, (loss, metrics, load) = rl_grads(state, batch, ref_params, cfg, rl, measure_own_routing)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = train.make_optimizer(cfg.train).update(grads, state["opt_state"],
                                                              state["params"])
  updates = jax.tree.map(lambda u: -rl.learning_rate * u, updates)
  params = optax.apply_updates(state["params"], updates)
  moe_state = model.update_moe_state(state["moe_state"], load, cfg.moe)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
            jnp.isfinite(optax.tree.norm(updates)) & jnp.isfinite(optax.tree.norm(moe_state)))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  bad_steps = jnp.where(finite, 0, state["bad_steps"] + 1)
  new_state = dict(state, step=state["step"] + 1, bad_steps=bad_steps,
                   params=keep(params, state["params"]),
                   opt_state=keep(opt_state, state["opt_state"]),
                   moe_state=keep(moe_state, state["moe_state"]))
  metrics.update(loss=loss, grad_norm=grad_norm, applied=finite.astype(jnp.float32),
                 load=load / jnp.maximum(load.sum(-1, keepdims=True), 1.0))
  return new_state, metrics
