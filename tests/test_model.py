"""The decoder: causality, MTP loss and its gradients, axis names, MoE state, dtypes, configs."""
import dataclasses
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import model, sharding
from moe_jax.config import ConfigError, MeshConfig, MoEConfig, ModelConfig, from_config_dict

# One dense block, two MoE blocks, and an MTP module whose block is MoE too (layer 3).
MODEL = ModelConfig(embed_dim=32, num_layers=3, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, max_seq_len=16, mtp_depth=1, init_std=0.1)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16, seq_aux_loss_coef=0.01)
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def setup():
  params, state = model.init(jax.random.key(0), MODEL, MOE)
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 256)
  return params, state, tokens


def _batch(tokens):
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _leaves_with_paths(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_changing_a_future_token_never_changes_earlier_logits(setup):
  params, state, tokens = setup
  inputs = _batch(tokens)["inputs"]
  changed = inputs.at[:, 5].set((inputs[:, 5] + 1) % 256)
  logits, aux = model.apply(params, state, inputs, MODEL, MOE)
  logits2, aux2 = model.apply(params, state, changed, MODEL, MOE)
  np.testing.assert_allclose(logits[:, :5], logits2[:, :5], atol=1e-6)
  assert np.abs(logits[:, 5:] - logits2[:, 5:]).max(axis=-1).min() > 1e-4
  # MTP depth 1 at position i reads token i+1: positions before 4 must not see token 5.
  mtp, mtp2 = aux["mtp_logits"][0], aux2["mtp_logits"][0]
  np.testing.assert_allclose(mtp[:, :4], mtp2[:, :4], atol=1e-6)
  assert np.abs(mtp[:, 4] - mtp2[:, 4]).max() > 1e-4


def test_aux_shapes_and_loss_terms(setup):
  params, state, tokens = setup
  batch = _batch(tokens)
  logits, aux = model.apply(params, state, batch["inputs"], MODEL, MOE)
  assert logits.shape == (2, 10, MODEL.vocab_size) and logits.dtype == jnp.float32
  assert aux["load"].shape == (3, MOE.num_experts)  # layers 1, 2 and the MTP block
  np.testing.assert_allclose(aux["load"].sum(-1), 2 * 10 * MOE.top_k)
  assert aux["max_vio"].shape == aux["dropped_fraction"].shape == (3,)
  assert aux["mtp_logits"].shape == (1, 2, 10, MODEL.vocab_size)
  total, metrics = model.loss(params, state, batch, MODEL, MOE)
  expected = metrics["ce"] + MODEL.mtp_loss_weight * metrics["mtp_ce"] + metrics["balance_loss"]
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert float(metrics["balance_loss"]) > 0


def test_mtp_loss_predicts_the_token_two_ahead(setup):
  params, state, tokens = setup
  batch = _batch(tokens)
  _, aux = model.apply(params, state, batch["inputs"], MODEL, MOE)
  _, metrics = model.loss(params, state, batch, MODEL, MOE)
  S = batch["inputs"].shape[1]
  logp = jax.nn.log_softmax(aux["mtp_logits"][0][:, :S - 1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 2:S + 1, None], axis=-1)
  assert np.isfinite(metrics["mtp_ce"])
  np.testing.assert_allclose(metrics["mtp_ce"], nll.mean(), rtol=1e-5)


def test_mtp_gradient_reaches_mtp_module_and_shared_embedding(setup):
  params, state, tokens = setup
  grads = jax.grad(lambda p: model.loss(p, state, _batch(tokens), MODEL, MOE)[1]["mtp_ce"])(
      params)
  norms = {k: float(jnp.abs(g).sum()) for k, g in _leaves_with_paths(grads).items()}
  for name in ("['embed']['embedding']", "['head']['kernel']", "['mtp_0']['proj']['kernel']",
               "['mtp_0']['embed_norm']['scale']", "['mtp_0']['block']['attn']['wkv_b']",
               "['mtp_0']['block']['ffn']['router']['kernel']", "['mtp_0']['final_norm']['scale']"):
    assert norms[name] > 0, name
  # The main model's own final norm is not on the MTP path.
  assert norms["['final_norm']['scale']"] == 0


def test_remat_keeps_parameters_loss_and_gradients(setup):
  params, state, tokens = setup
  remat = dataclasses.replace(MODEL, remat=True)
  remat_params, _ = model.init(jax.random.key(0), remat, MOE)
  assert jax.tree.structure(remat_params) == jax.tree.structure(params)
  grad = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p: model.loss(p, state, _batch(tokens), cfg, MOE)[0]))(params)
  (loss, grads), (loss_r, grads_r) = grad(MODEL), grad(remat)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r,
               grads)
  # The backward recomputes each block: its program holds the blocks' forward twice.
  hlo = lambda cfg: jax.jit(jax.grad(lambda p: model.loss(p, state, _batch(tokens), cfg,
                                                          MOE)[0])).lower(params).as_text()
  assert hlo(remat).count("rsqrt") > hlo(MODEL).count("rsqrt")


def test_param_axes_match_params_and_sharding_rules(setup):
  params, state, _ = setup
  rule_names = {name for name, _ in sharding.RULES}
  for values, axes in ((params, model.param_axes(MODEL, MOE)),
                       (state, model.moe_state_axes(MODEL, MOE))):
    is_names = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(values) == jax.tree.structure(axes, is_leaf=is_names)
    for v, names in zip(jax.tree.leaves(values), jax.tree.leaves(axes, is_leaf=is_names)):
      assert len(names) == v.ndim and v.dtype == jnp.float32
      assert set(names) - {None} <= rule_names
      sharding.logical_to_spec(names)  # a name used twice in one array would raise
  assert model.param_axes(MODEL, MOE)["layer_1"]["ffn"]["experts"]["up"] == (
      "experts", "expert_embed", "expert_mlp")


def test_first_k_dense_blocks_have_no_router(setup):
  params, state, _ = setup
  assert set(params["layer_0"]["ffn"]) == {"gate", "up", "down"}
  assert set(params["layer_1"]["ffn"]) == {"router", "experts", "shared"}
  assert set(state) == {"layer_1", "layer_2", "layer_3"}


def test_router_bias_is_state_without_gradient_and_update_changes_it(setup):
  params, state, tokens = setup
  assert "router_bias" not in str(jax.tree.structure(params))
  batch = _batch(tokens)
  grad_state = jax.grad(lambda s: model.loss(params, s, batch, MODEL, MOE)[0])(state)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_state))
  _, metrics = model.loss(params, state, batch, MODEL, MOE)
  new_state = model.update_moe_state(state, metrics["load"], MOE)
  load = np.asarray(metrics["load"])
  for i, name in enumerate(("layer_1", "layer_2", "layer_3")):
    expected = MOE.bias_update_rate * np.sign(load[i].mean() - load[i])
    np.testing.assert_allclose(new_state[name]["router_bias"], expected, atol=1e-9)
  # A different bias changes routing, so the forward must read the state.
  skewed = jax.tree.map(lambda b: b.at[0].set(10.0), state)
  _, aux = model.apply(params, skewed, batch["inputs"], MODEL, MOE)
  np.testing.assert_allclose(aux["load"][:, 0], batch["inputs"].size)


def test_bfloat16_compute_runs(setup):
  params, state, tokens = setup
  cfg = dataclasses.replace(MODEL, dtype="bfloat16")
  moe_cfg = dataclasses.replace(MOE, dtype="bfloat16")
  (total, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(
      params, state, _batch(tokens), cfg, moe_cfg)
  _, metrics32 = model.loss(params, state, _batch(tokens), MODEL, MOE)
  logits, _ = model.apply(params, state, tokens, cfg, moe_cfg)
  assert logits.dtype == jnp.float32 and np.isfinite(total)
  np.testing.assert_allclose(metrics["ce"], metrics32["ce"], rtol=0.02)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_dense_model_has_empty_moe_statistics():
  cfg = dataclasses.replace(MODEL, first_k_dense=MODEL.num_layers, mtp_depth=0)
  params, state = model.init(jax.random.key(0), cfg, MOE)
  assert state == {} and all(set(params[f"layer_{i}"]["ffn"]) == {"gate", "up", "down"}
                             for i in range(cfg.num_layers))
  tokens = jnp.zeros((1, 4), jnp.int32)
  _, metrics = model.loss(params, state, {"inputs": tokens, "targets": tokens}, cfg, MOE)
  assert metrics["load"].shape == (0, MOE.num_experts) and float(metrics["balance_loss"]) == 0
  assert model.update_moe_state(state, metrics["load"], MOE) == {}


def test_pad_targets_are_left_out(setup):
  params, state, tokens = setup
  batch = _batch(tokens)
  batch["targets"] = batch["targets"].at[:, 3:].set(MODEL.pad_id)
  _, metrics = model.loss(params, state, batch, MODEL, MOE)
  logits, aux = model.apply(params, state, batch["inputs"], MODEL, MOE)
  logp = jax.nn.log_softmax(logits[:, :3], axis=-1)
  expected = -jnp.take_along_axis(logp, tokens[:, 1:4, None], axis=-1).mean()
  np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-5)
  # MTP depth 1 at position i predicts targets[i + 1]: only positions 0 and 1 have one.
  logp = jax.nn.log_softmax(aux["mtp_logits"][0][:, :2], axis=-1)
  expected = -jnp.take_along_axis(logp, tokens[:, 2:4, None], axis=-1).mean()
  np.testing.assert_allclose(metrics["mtp_ce"], expected, rtol=1e-5)


def test_mismatched_moe_width_fails_loudly():
  with pytest.raises(ValueError, match="moe.embed_dim=64"):
    model.param_axes(MODEL, dataclasses.replace(MOE, embed_dim=64))
  with pytest.raises(ConfigError, match="pad_id"):
    ModelConfig(vocab_size=100)


def load_config(name, arg=None):
  return runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"](arg)


def dataclasses_of(config_dict):
  cfg = from_config_dict(config_dict)
  return cfg.model, cfg.moe


@pytest.mark.parametrize("name,arg", [("tiny_moe", None), ("tiny_moe", "runlocal"),
                                      ("dense_baseline", None), ("deepseek_v3_mini", None),
                                      ("deepseek_v3_mini", "runlocal")])
def test_config_files_build_valid_models(name, arg):
  model_cfg, moe_cfg = dataclasses_of(load_config(name, arg))
  counts = model.count_params(model_cfg, moe_cfg)
  assert counts["main"]["total"]["all"] > 0
  if name == "dense_baseline":
    tiny_model, tiny_moe = dataclasses_of(load_config("tiny_moe"))
    assert model_cfg.first_k_dense == model_cfg.num_layers
    # Same work per token in the FFN: dense width = (top_k + shared) * expert width.
    assert model_cfg.dense_ffn_dim == (tiny_moe.top_k + 1) * tiny_moe.expert_ffn_dim
  if name == "deepseek_v3_mini":
    assert model_cfg.mtp_depth == 1 and model_cfg.q_lora_rank > 0 and moe_cfg.n_groups > 1
    assert counts["mtp"]["total"]["all"] > 0


def test_sharded_expert_parallel_forward_matches_single_device(setup):
  """Parameters placed by param_axes on an fsdp x expert mesh, experts exchanged all-to-all."""
  params, state, tokens = setup
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  moe_cfg = dataclasses.replace(MOE, parallelism="alltoall")
  put = lambda tree, axes: jax.device_put(tree, sharding.shard_like(axes, mesh))
  sharded_params = put(params, model.param_axes(MODEL, moe_cfg))
  sharded_state = put(state, model.moe_state_axes(MODEL, moe_cfg))
  assert sharded_params["layer_1"]["ffn"]["experts"]["up"].sharding.spec[0] == "expert"
  inputs = jax.device_put(_batch(tokens)["inputs"].repeat(4, axis=0),
                          sharding.named_sharding(mesh, ("batch", None)))
  with jax.set_mesh(mesh):
    logits, aux = model.apply(sharded_params, sharded_state, inputs, MODEL, moe_cfg)
  expected, expected_aux = model.apply(params, state, inputs, MODEL, MOE)
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  np.testing.assert_allclose(aux["load"], expected_aux["load"])
