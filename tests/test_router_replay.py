"""Router replay: the MoE layer dispatches to given experts while its statistics (and so the
bias update) keep the router's own choice; on one device and on the 8-device mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference
from moe_jax import model, moe, sharding
from moe_jax.config import MeshConfig, ModelConfig, MoEConfig
from moe_jax.rl import objective
from moe_jax.serve import Engine, Request
from test_moe_layer import dense_rewrite

CFG = MoEConfig(embed_dim=16, num_experts=8, top_k=2, expert_ffn_dim=8, num_shared_experts=1,
                n_groups=2, topk_groups=2, routed_scaling=2.5)


def setup(cfg=CFG, seed=0):
  params, _ = moe.init(jax.random.PRNGKey(seed), cfg)
  kb, kx = jax.random.split(jax.random.PRNGKey(seed + 1))
  state = {"router_bias": 0.1 * jax.random.normal(kb, (cfg.num_experts,))}
  x = jax.random.normal(kx, (8, 5, cfg.embed_dim))
  return params, state, x


def other_experts(shape, cfg, seed=0):
  """Distinct random experts per token, [*shape, K] int32: mostly not the router's choice."""
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(cfg.num_experts)[:cfg.top_k] for _ in range(int(np.prod(shape)))]
  return jnp.asarray(np.stack(rows).reshape(shape + (cfg.top_k,)), jnp.int32)


def test_replaying_the_own_choice_changes_nothing():
  params, state, x = setup()
  y, aux = jax.jit(lambda p, x: moe.apply(p, state, x, CFG))(params, x)
  assert aux["experts"].shape == (8, 5, CFG.top_k) and aux["experts"].dtype == jnp.int32
  y2, aux2 = jax.jit(lambda p, x, r: moe.apply(p, state, x, CFG, replay=r))(params, x,
                                                                            aux["experts"])
  # The same experts and gates in two programs compiled apart, whose float sums may round in
  # another order: each a sum of at most D + F + K + T terms (the matmuls, the top-k sum, the
  # statistics over the tokens), within that many ulps of its terms' size (y's own scale here).
  n = CFG.embed_dim + CFG.expert_ffn_dim + CFG.top_k + x.size // x.shape[-1]
  eps = float(np.finfo(np.float32).eps)
  np.testing.assert_allclose(y2, y, rtol=0, atol=n * eps * float(jnp.abs(y).max()))
  for key in aux:
    if jnp.issubdtype(aux[key].dtype, jnp.integer) or key == "load":  # ids and counts: exact
      np.testing.assert_array_equal(aux2[key], aux[key], err_msg=key)
    else:
      np.testing.assert_allclose(aux2[key], aux[key], rtol=n * eps, atol=0, err_msg=key)


def test_replayed_experts_run_while_statistics_keep_the_own_choice():
  params, state, x = setup()
  replay = other_experts(x.shape[:-1], CFG)
  replay = replay.at[0].set(-1)  # the first sequence has nothing recorded: its own choice
  y, aux = jax.jit(lambda p, x, r: moe.apply(p, state, x, CFG, replay=r))(params, x, replay)
  _, own_aux = moe.apply(params, state, x, CFG)
  np_params = jax.tree.map(np.asarray, params)
  _, _, chosen, _ = moe_reference.apply(np_params, np.asarray(state["router_bias"]),
                                        np.asarray(x), CFG)
  used = np.asarray(replay).reshape(-1, CFG.top_k).copy()
  used[:5] = chosen[:5]
  assert (used != chosen).any(axis=1).mean() > 0.5
  y_ref, aux_ref, _, _ = moe_reference.apply(np_params, np.asarray(state["router_bias"]),
                                             np.asarray(x), CFG, replay=used)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  # Both programs take the statistics from the router's own choice, but compile their float sums
  # apart: a sum of n non-negative terms in any order agrees to (n - 1) float32 ulps of itself
  # (n = the tokens, then the experts), each term's few roundings add a few more. The loads are
  # counts, exact either way; a replayed choice leaking in would move them by whole tokens.
  ulps = x.size // x.shape[-1] + CFG.num_experts + 8
  for key, value in aux_ref.items():
    np.testing.assert_allclose(aux[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    if key == "load":
      np.testing.assert_array_equal(aux[key], own_aux[key], err_msg=key)
    else:
      np.testing.assert_allclose(aux[key], own_aux[key], err_msg=key,
                                 rtol=ulps * np.finfo(np.float32).eps, atol=0)
  np.testing.assert_array_equal(aux["experts"].reshape(-1, CFG.top_k), chosen)


def test_gradients_reach_the_router_through_the_replayed_gates():
  params, state, x = setup()
  replay = other_experts(x.shape[:-1], CFG, seed=1)
  loss = lambda p, x: jnp.sum(jnp.sin(moe.apply(p, state, x, CFG, replay=replay)[0]))
  ones = jnp.ones((replay.size // CFG.top_k, CFG.top_k), jnp.float32)
  ref_loss = lambda p, x: jnp.sum(jnp.sin(dense_rewrite(p, state, x, CFG,
                                                        replay.reshape(-1, CFG.top_k), ones)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  ref_grads = jax.grad(ref_loss, argnums=(0, 1))(params, x)
  assert float(jnp.abs(grads[0]["router"]["kernel"]).max()) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads,
               ref_grads)


def test_replay_of_the_wrong_shape_fails():
  params, state, x = setup()
  with pytest.raises(ValueError, match=r"replay: int32\[8, 5, 3\] must be integer expert ids"):
    moe.apply(params, state, x, CFG, replay=jnp.zeros((8, 5, 3), jnp.int32))


def _run(cfg, params, state, x, replay):
  fn = lambda p, x: moe.apply(p, state, x, cfg, replay=replay)
  loss = lambda p, x: jnp.sum(jnp.sin(fn(p, x)[0]))
  return jax.jit(fn)(params, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("parallelism", ["alltoall", "gshard"])
def test_sharded_replay_equals_single_device(parallelism):
  params, state, x = setup()
  replay = other_experts(x.shape[:-1], CFG, seed=2)
  (y_ref, aux_ref), grads_ref = _run(CFG, params, state, x, replay)
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    (y, aux), grads = _run(dataclasses.replace(CFG, parallelism=parallelism), params, state, x,
                           replay)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for key in aux_ref:
    np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               grads_ref)


# ----------------------------------------------------------------------------- the whole model

MODEL = ModelConfig(embed_dim=32, num_layers=3, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, max_seq_len=32, mtp_depth=1, init_std=0.2)
MOE = MoEConfig(embed_dim=32, num_experts=8, top_k=2, expert_ffn_dim=16)


@pytest.fixture(scope="module")
def tiny():
  params, state = model.init(jax.random.key(0), MODEL, MOE)
  state = jax.tree.map(lambda b: 0.1 * jax.random.normal(jax.random.key(3), b.shape), state)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, MODEL.vocab_size)
  return params, state, tokens


def test_model_replay_of_its_own_choice_and_of_other_experts(tiny):
  params, state, tokens = tiny
  logits, aux = model.apply(params, state, tokens, MODEL, MOE)
  assert aux["experts"].shape == (2, 12, 2, MOE.top_k)  # two MoE blocks; MTP's is not replayed
  same, aux_same = model.apply(params, state, tokens, MODEL, MOE, routes=aux["experts"])
  np.testing.assert_array_equal(same, logits)
  np.testing.assert_array_equal(aux_same["load"], aux["load"])
  other = other_experts(tokens.shape + (2,), MOE)
  replayed, aux_other = model.apply(params, state, tokens, MODEL, MOE, routes=other)
  assert float(jnp.abs(replayed - logits).max()) > 1e-2
  # The first MoE block sees the same input; later ones see what replayed experts computed.
  np.testing.assert_array_equal(aux_other["load"][0], aux["load"][0])
  for l in range(2):  # each block's load counts its own choice, not the replayed experts
    own = np.bincount(np.asarray(aux_other["experts"][:, :, l]).ravel(), minlength=8)
    np.testing.assert_array_equal(aux_other["load"][l], own)
    assert (own != np.bincount(np.asarray(other[:, :, l]).ravel(), minlength=8)).any()
  with pytest.raises(ValueError, match=r"routes: int32\[2, 12, 1, 2\] must be integer experts"):
    model.apply(params, state, tokens, MODEL, MOE, routes=other[:, :, :1])


def test_cached_forward_records_the_routes_the_full_forward_takes(tiny):
  params, state, tokens = tiny
  _, aux = model.apply(params, state, tokens, MODEL, MOE)
  caches = model.init_caches(MODEL, 2, 12)
  logits, caches, first = model.forward_cached_routes(params, state, tokens[:, :7], 0, caches,
                                                      MODEL, MOE)
  _, _, rest = model.forward_cached_routes(params, state, tokens[:, 7:], 7, caches, MODEL, MOE)
  np.testing.assert_array_equal(jnp.concatenate([first, rest], axis=1), aux["experts"])
  only_logits, _ = model.forward_cached(params, state, tokens[:, :7], 0,
                                        model.init_caches(MODEL, 2, 12), MODEL, MOE)
  np.testing.assert_array_equal(only_logits, logits)


# ----------------------------------------------------------------------------- rollouts

def near_tied(params, eps):
  """Router columns in near-copies of three (0-2, 3-5, 6-7): the top-2 of a tied triple turns on
  rounding noise, as a trained router's close calls do, so the engine's cached forward and the
  learner's full forward pick different experts for some tokens."""
  params = jax.tree.map(lambda a: a, params)
  for name in ("layer_1", "layer_2"):
    k = params[name]["ffn"]["router"]["kernel"]
    noise = jax.random.normal(jax.random.key(5), k.shape)
    params[name]["ffn"]["router"]["kernel"] = k[:, jnp.array([0, 0, 0, 3, 3, 3, 6, 6])] + \
        eps * noise
  return params


def learner_logprobs(params, state, prompt, choice, routes):
  tokens = jnp.asarray([prompt + choice.token_ids])
  logits, aux = model.apply(params, state, tokens, ROLLOUT_MODEL, MOE,
                            routes=None if routes is None else jnp.asarray(routes[None]))
  return np.asarray(objective.token_logprobs(logits[:, :-1], tokens[:, 1:])[0, len(prompt) - 1:])


ROLLOUT_MODEL = dataclasses.replace(MODEL, max_seq_len=64, mtp_depth=0)


def test_replayed_learner_logprobs_equal_the_engines():
  params, state = model.init(jax.random.key(0), ROLLOUT_MODEL, MOE)
  params = near_tied(params, 1e-7)
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(0, 256, size=n)] for n in (5, 11, 7)]
  engine = Engine(params, state, ROLLOUT_MODEL, MOE, num_blocks=64, block_size=4, max_batch=8,
                  record_routes=True)
  assert not engine.prefix_cache  # cached blocks would come without their routes
  done = engine.generate([Request(p, max_tokens=20, n=2, temperature=1.0, ignore_eos=True,
                                  seed=1) for p in prompts])
  gap = {"replay": 0.0, "own routing": 0.0}
  for prompt, completion in zip(prompts, done):
    for choice in completion.choices:
      assert choice.routes.shape == (len(prompt) + 20, 2, MOE.top_k)
      assert (choice.routes[-1] == -1).all() and (choice.routes[:-1] >= 0).all()
      for name, routes in (("replay", choice.routes), ("own routing", None)):
        diff = learner_logprobs(params, state, prompt, choice, routes) - choice.logprobs
        gap[name] = max(gap[name], float(np.abs(diff).max()))
    np.testing.assert_array_equal(completion.choices[0].routes[:len(prompt)],
                                  completion.choices[1].routes[:len(prompt)])
  print(f"max |learner - engine| log-prob: {gap}")
  assert gap["replay"] < 1e-5
  assert gap["own routing"] > 1e-3  # some near-tied token went to other experts


def test_expert_parallel_engine_records_the_single_device_routes():
  params, state = model.init(jax.random.key(0), ROLLOUT_MODEL, MOE)
  requests = [Request([1, 5, 9, 2, 7], max_tokens=6, n=2, temperature=0.7, seed=0,
                      ignore_eos=True),  # a seed: two engines draw the same tokens
              Request([3, 8, 4], max_tokens=6, ignore_eos=True)]
  kw = dict(num_blocks=64, block_size=4, max_batch=8, record_routes=True)
  single = Engine(params, state, ROLLOUT_MODEL, MOE, **kw).generate(requests)
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  moe_cfg = dataclasses.replace(MOE, parallelism="alltoall")
  put = lambda tree, axes: jax.device_put(tree, sharding.shard_like(axes, mesh))
  engine = Engine(put(params, model.param_axes(ROLLOUT_MODEL, moe_cfg)),
                  put(state, model.moe_state_axes(ROLLOUT_MODEL, moe_cfg)), ROLLOUT_MODEL,
                  moe_cfg, mesh=mesh, **kw)
  for a, b in zip(engine.generate(requests), single):
    for x, y in zip(a.choices, b.choices):
      assert x.token_ids == y.token_ids
      np.testing.assert_array_equal(x.routes, y.routes)


def test_a_stop_token_leaves_every_kept_position_recorded():
  params, state = model.init(jax.random.key(0), ROLLOUT_MODEL, MOE)
  engine = Engine(params, state, ROLLOUT_MODEL, MOE, num_blocks=64, block_size=4, max_batch=8,
                  record_routes=True)
  prompt = [1, 5, 9, 2, 7]
  full = engine.generate([Request(prompt, max_tokens=6, ignore_eos=True)])[0].choices[0]
  stop = full.token_ids[3]
  cut = full.token_ids.index(stop)
  choice = engine.generate([Request(prompt, max_tokens=6, ignore_eos=True,
                                    stop_token_ids=[stop])])[0].choices[0]
  assert choice.token_ids == full.token_ids[:cut] and choice.finish_reason == "stop"
  # The last kept token was fed (its logits chose the stop token): no -1 row.
  np.testing.assert_array_equal(choice.routes, full.routes[:len(prompt) + cut])
  assert (full.routes[-1] == -1).all() and (choice.routes >= 0).all()


def test_replay_under_remat_gives_the_same_gradients(tiny):
  params, state, tokens = tiny
  routes = other_experts(tokens.shape + (2,), MOE, seed=3)
  def grads(cfg):
    loss = lambda p: jnp.sum(jnp.sin(model.apply(p, state, tokens, cfg, MOE, routes=routes)[0]))
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(dataclasses.replace(MODEL, remat=True)), grads(MODEL))
