"""The RL learner step (zero signal, masks, router replay, the 8-device mesh) and RLConfig."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, sharding, train
from moe_jax.config import ConfigError
from moe_jax.rl import config as rl_config
from moe_jax.rl import learner
from moe_jax.rl.config import RLConfig

B, T = 8, 16


def experiment(parallelism="none", mesh=None) -> config.ExperimentConfig:
  return config.from_config_dict({
      "model": dict(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=32, init_std=0.1),
      "moe": dict(num_experts=8, top_k=2, expert_ffn_dim=16, bias_update_rate=0.01,
                  parallelism=parallelism),
      "mesh": mesh or {},
      "train": dict(batch_size=B, seq_len=T, weight_decay=0.0),
      "data": dict(source="synthetic"),
  })


CFG = experiment()
RL = RLConfig(learning_rate=1e-3, kl_coef=0.05, clip_low=0.2, clip_high=0.28, max_tokens=12)


def make_batch(state, cfg=CFG, seed=0, routes=True):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (B, T)), jnp.int32)
  prompt = rng.integers(2, 6, B)
  length = prompt + rng.integers(3, T - 5, B)
  mask = (np.arange(T)[None] >= prompt[:, None]) & (np.arange(T)[None] < length[:, None])
  logp, _, _ = learner.logprobs(state["params"], state["moe_state"], tokens, cfg)
  batch = {"tokens": tokens, "mask": jnp.asarray(mask, jnp.float32),
           # the rollout policy a little off the learner's, so some ratios clip
           "behaviour_logp": logp + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32),
           "advantages": jnp.asarray(rng.normal(size=B), jnp.float32)}
  if routes:
    batch["routes"] = jnp.asarray(np.argsort(rng.random((B, T, 1, 8)), -1)[..., :2], jnp.int32)
  return batch


@pytest.fixture(scope="module")
def state():
  return train.init_state(jax.random.key(0), CFG)


def step(state, batch, ref, rl=RL, cfg=CFG):
  return jax.jit(functools.partial(learner.rl_step, cfg=cfg, rl=rl))(state, batch, ref)


def test_no_signal_leaves_the_policy_alone(state):
  batch = dict(make_batch(state), advantages=jnp.zeros((B,), jnp.float32))
  new, metrics = step(state, batch, None, dataclasses.replace(RL, kl_coef=0.0))
  assert float(metrics["grad_norm"]) == 0.0 and float(metrics["applied"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, new["params"], state["params"])
  assert int(new["step"]) == int(state["step"]) + 1
  # The bias still moves, from the learner's own loads.
  assert not np.array_equal(new["moe_state"]["layer_1"]["router_bias"],
                            state["moe_state"]["layer_1"]["router_bias"])


def test_masked_positions_carry_no_loss(state):
  batch = make_batch(state, seed=1)
  off = batch["mask"] == 0
  garbage = dict(batch, behaviour_logp=jnp.where(off, jnp.nan, batch["behaviour_logp"]))
  ref = jax.tree.map(lambda p: p * 1.01, state["params"])
  new, metrics = step(state, batch, ref)
  new2, metrics2 = step(state, garbage, ref)
  assert float(metrics["grad_norm"]) > 0 and 0 < float(metrics["clip_fraction"]) < 1
  assert float(metrics["kl"]) > 0 and float(metrics["entropy"]) > 0
  assert 0 <= float(metrics["route_agreement"]) < 1
  jax.tree.map(np.testing.assert_array_equal, new2["params"], new["params"])
  for key in ("loss", "kl", "clip_fraction", "ratio_mean", "entropy"):
    np.testing.assert_array_equal(metrics2[key], metrics[key], err_msg=key)


def test_the_kl_without_replay_is_measured_against_the_learners_own_routing(state):
  batch = make_batch(state, seed=3)  # random routes: far from the learner's own choice
  own, _, _ = learner.logprobs(state["params"], state["moe_state"], batch["tokens"], CFG)
  replayed, _, _ = learner.logprobs(state["params"], state["moe_state"], batch["tokens"], CFG,
                                    batch["routes"])
  _, metrics = step(state, dict(batch, behaviour_logp=own), None,
                    dataclasses.replace(RL, kl_coef=0.0))
  assert abs(float(metrics["behaviour_kl_without_replay"])) < 1e-6
  assert float(metrics["behaviour_kl"]) > 1e-4
  _, metrics = step(state, dict(batch, behaviour_logp=replayed), None,
                    dataclasses.replace(RL, kl_coef=0.0))
  assert abs(float(metrics["behaviour_kl"])) < 1e-6
  assert float(metrics["behaviour_kl_without_replay"]) > 1e-4
  # not asked for (a traced flag: the same program): NaN, and the update itself unchanged
  fn = jax.jit(functools.partial(learner.rl_step, cfg=CFG,
                                 rl=dataclasses.replace(RL, kl_coef=0.0)))
  measured = fn(state, dict(batch, behaviour_logp=replayed), None, measure_own_routing=True)
  skipped = fn(state, dict(batch, behaviour_logp=replayed), None, measure_own_routing=False)
  for key in ("behaviour_kl_without_replay", "behaviour_gap_without_replay"):
    assert np.isnan(float(skipped[1][key])), key
  assert float(skipped[1]["loss"]) == float(measured[1]["loss"])
  jax.tree.map(np.testing.assert_array_equal, skipped[0]["params"], measured[0]["params"])
  _, metrics = step(state, {k: v for k, v in batch.items() if k != "routes"}, None,
                    dataclasses.replace(RL, kl_coef=0.0))
  assert "behaviour_kl_without_replay" not in metrics


GRAD_TOL = 1e-5  # gradients of two programs summing in different orders (rtol and atol)


def first_update_bounds(grads, params, lr, train_cfg):
  """How far two first RL steps may move each parameter apart, when their gradients agree to
  GRAD_TOL. Adam's first update is lr * x / (|x| + eps) with x = c * g, c = min(1, clip / |g|):
  the sign of g, scaled down only where |g| is near eps / c. Two gradients within n of each
  other move f(x) = x / (|x| + eps) by at most n / (max(|g| - n, 0) + eps / c), and never by
  more than 2 (opposite signs): so lr * 2 where g is within noise of 0, lr * n / |g| elsewhere.
  Plus float32 rounding of the update (a few ulps of lr) and of p - update (an ulp of p).
  weight_decay is 0 in these configs, so the update is Adam's alone."""
  norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
  c = min(1.0, train_cfg.grad_clip / norm) if train_cfg.grad_clip > 0 else 1.0
  eps, ulp = 1e-8, float(np.finfo(np.float32).eps)

  def bound(g, p):
    g = np.abs(np.asarray(g, np.float64))
    noise = GRAD_TOL * (1 + g) + 4 * ulp * g  # the gradient's tolerance, and c's own rounding
    moved = np.minimum(2.0, noise / (np.maximum(g - noise, 0) + eps / c))
    return lr * (moved + 8 * ulp) + 2 * ulp * (np.abs(np.asarray(p)) + lr)
  return jax.tree.map(bound, grads, params)


def test_sharded_step_equals_single_device(state):
  batch = make_batch(state, seed=2)
  ref = jax.tree.map(lambda p: p * 0.99, state["params"])
  want, want_metrics = step(state, batch, ref)
  want_grads = jax.jit(functools.partial(learner.rl_grads, cfg=CFG, rl=RL))(state, batch, ref)[0]
  cfg = experiment("alltoall", dict(fsdp=2, expert=4))
  mesh = sharding.make_mesh(cfg.mesh)
  shardings = train.state_shardings(cfg, mesh)
  rows = lambda *rest: sharding.named_sharding(mesh, ("batch",) + rest)
  batch_shardings = {"tokens": rows("seq"), "mask": rows("seq"), "behaviour_logp": rows("seq"),
                     "advantages": rows(), "routes": rows("seq", None, None)}
  fn = jax.jit(functools.partial(learner.rl_step, cfg=cfg, rl=RL),
               in_shardings=(shardings, batch_shardings, shardings["params"]),
               out_shardings=(shardings, sharding.named_sharding(mesh, ())))
  with jax.set_mesh(mesh):
    placed = jax.device_put((state, batch, ref), (shardings, batch_shardings,
                                                  shardings["params"]))
    got, got_metrics = fn(*placed)
    grads = jax.jit(functools.partial(learner.rl_grads, cfg=cfg, rl=RL))(*placed)[0]
  assert got["params"]["layer_1"]["ffn"]["experts"]["gate"].sharding.spec[0] == "expert"
  # The mesh sums the batch's gradient in another order than one device: it agrees to GRAD_TOL.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=GRAD_TOL, atol=GRAD_TOL)
  jax.tree.map(close, grads, want_grads)
  bounds = first_update_bounds(want_grads, state["params"], RL.learning_rate, CFG.train)
  jax.tree.map(lambda a, b, bound: np.testing.assert_array_less(np.abs(a - b), bound),
               got["params"], want["params"], bounds)
  tight = [(b < 0.1 * RL.learning_rate).mean() for b in jax.tree.leaves(bounds)]
  assert np.mean(tight) > 0.5, tight  # most of the update is held to a tenth of lr or better
  jax.tree.map(close, got["moe_state"], want["moe_state"])
  for key, value in want_metrics.items():
    np.testing.assert_allclose(got_metrics[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_batch_and_reference_are_checked(state):
  batch = make_batch(state, routes=False)
  with pytest.raises(ValueError, match="batch lacks advantages"):
    learner.rl_step(state, {k: v for k, v in batch.items() if k != "advantages"}, None, CFG, RL)
  with pytest.raises(ValueError, match=r"rl.kl_coef=0.05: needs ref_params"):
    learner.rl_step(state, batch, None, CFG, RL)


@pytest.mark.parametrize("values, message", [
    ({"clip_low": -0.1}, r"rl.clip_low=-0.1: must be >= 0"),
    ({"group_size": 1}, r"rl.group_size=1: must be >= 2"),
    ({"loss_agg": "mean"}, r"rl.loss_agg='mean': must be one of"),
    ({"kl_coef": -0.1}, r"rl.kl_coef=-0.1: must be >= 0"),
    ({"router_replay": 1}, r"rl.router_replay=1: must be True or False"),
    ({"minibatches": 3}, r"rl.minibatches=3: must divide rl.prompts_per_step\*group_size=64"),
    ({"temperature": 0}, r"rl.temperature=0.0: must be in \(0, 100\]"),
    ({"learning_rate": float("nan")}, r"rl.learning_rate=nan: must be a finite number"),
    ({"clip": 10}, r"rl.clip=10: unknown key; rl has steps, "),
])
def test_rl_config_names_the_bad_key(values, message):
  with pytest.raises(ConfigError, match=message):
    rl_config.from_dict(values)


def test_rl_config_widens_integers_to_floats():
  cfg = rl_config.from_dict({"learning_rate": 1, "clip_high": 10, "group_size": 16})
  assert cfg.learning_rate == 1.0 and isinstance(cfg.clip_high, float) and cfg.group_size == 16
