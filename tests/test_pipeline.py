"""Pipeline parallelism (moe_jax/pipeline.py): the pipelined train step equals the unpipelined
one, the schedule's bubble as counted in the compiled program, and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, model, pipeline, sharding, train
from moe_jax.config import ConfigError


def tiny(mesh: dict, microbatches: int = 1, repeats: int = 1, parallelism: str = "alltoall",
         **model_overrides) -> config.ExperimentConfig:
  """The tiny MoE with MTP: 1 dense + 4 MoE blocks (+ the MTP block), float32."""
  m = dict(embed_dim=32, num_layers=5, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
           num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8, max_seq_len=32, mtp_depth=1)
  return config.from_config_dict({
      "model": dict(m, **model_overrides),
      "moe": dict(num_experts=8, top_k=2, expert_ffn_dim=16, bias_update_rate=0.01,
                  parallelism=parallelism),
      "mesh": mesh,
      "train": dict(steps=10, batch_size=16, seq_len=16, warmup_steps=2, eval_batches=1,
                    microbatches=microbatches, pipeline_repeats=repeats),
      "data": dict(source="synthetic")})


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {"inputs": rng.integers(0, 256, shape).astype(np.int32),
          "targets": rng.integers(0, 256, shape).astype(np.int32)}


def _on_mesh(cfg):
  setup = train.Setup(cfg)
  state = setup.init(jax.random.key(0))
  names = sharding.named_sharding(setup.mesh, train.BATCH_AXES)
  return setup, state, {k: jax.device_put(v, names) for k, v in _batch(cfg).items()}


def _grads(cfg):
  """(loss, metrics, gradients) of model.loss on cfg's mesh, on the host."""
  setup, state, batch = _on_mesh(cfg)

  def grads(params, moe_state, batch):
    return jax.value_and_grad(model.loss, has_aux=True)(
        params, moe_state, batch, cfg.model, cfg.moe, pipe=train.pipe(cfg.train))
  (loss, metrics), g = setup._on_mesh(jax.jit(grads))(state["params"], state["moe_state"],
                                                       batch)
  return jax.device_get((loss, metrics, g))


def _step(cfg):
  setup, state, batch = _on_mesh(cfg)
  return jax.device_get(setup.step(state, batch))


REFERENCE = dict(data=2, expert=4)


@pytest.fixture(scope="module")
def unpipelined():
  return _grads(tiny(REFERENCE))


def _assert_close(a, b, tol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh, microbatches, repeats", [
    (dict(stage=2, expert=4), 4, 1),
    (dict(stage=4, fsdp=2), 4, 1),
    (dict(stage=2, expert=4), 2, 2),  # interleaved: 2 chunks per stage
])
def test_pipelined_loss_and_gradients_equal_unpipelined(unpipelined, mesh, microbatches,
                                                        repeats):
  loss, metrics, grads = _grads(tiny(mesh, microbatches, repeats))
  ref_loss, ref_metrics, ref_grads = unpipelined
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  for key in ("ce", "mtp_ce", "balance_loss", "load", "max_vio", "seq_aux_loss"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-5,
                               err_msg=key)
  _assert_close(grads, ref_grads)


def test_pipelined_train_step_equals_unpipelined():
  """The whole step: AdamW and the aux-loss-free bias update from the pipelined loads. Adam's
  first step is nearly sign(g), so a gradient of ~1e-9 differing in its last bits moves its
  weight by up to lr: parameters are compared at 1e-4, the router biases exactly."""
  state, out = _step(tiny(dict(stage=2, expert=4), microbatches=4))
  ref_state, ref_out = _step(tiny(REFERENCE))
  np.testing.assert_allclose(out["loss"], ref_out["loss"], rtol=1e-5)
  _assert_close(state["params"], ref_state["params"], tol=1e-4)
  _assert_close(state["moe_state"], ref_state["moe_state"], tol=0)


def test_microbatches_without_stages_equal_one_batch(unpipelined):
  loss, _, grads = _grads(tiny(REFERENCE, microbatches=2))
  np.testing.assert_allclose(loss, unpipelined[0], rtol=1e-5, atol=1e-5)
  _assert_close(grads, unpipelined[2])


def test_schedule_runs_each_work_item_once_per_stage_in_order():
  for stages, m, r in ((2, 4, 1), (4, 8, 1), (4, 4, 2)):
    table = pipeline.schedule(stages, m, r)
    for s in range(stages):
      assert list(table[:, s][table[:, s] >= 0]) == list(range(r * m))
    # micro-batch m of repeat r > 0 re-enters stage 0 after the last stage's repeat r - 1
    for k in range(m, r * m):
      assert np.argmax(table[:, 0] == k) > np.argmax(table[:, -1] == k - m)


@pytest.mark.parametrize("microbatches", [2, 4, 8])
@pytest.mark.parametrize("stages, repeats", [(2, 1), (4, 1), (2, 2)])
def test_measured_bubble_matches_the_schedule(stages, repeats, microbatches):
  """Counts, in the compiled program, the stage-ticks that did work on a real micro-batch: each
  block adds 1 to its micro-batch, so every row must come out +blocks (no work lost or done
  twice), and idle stage-ticks / all stage-ticks is the measured bubble."""
  if repeats > 1 and microbatches < stages:
    pytest.skip("the interleaved schedule needs micro-batches >= stages (config check)")
  blocks = 2 * stages * repeats
  mesh = sharding.make_mesh(config.MeshConfig(stage=stages, data=8 // stages))

  def layer(p, s, x):
    return x + p["w"] + s["b"], {"load": jnp.ones((3,)), "z_loss": jnp.float32(1.0)}
  params = [{"w": jnp.float32(1.0)} for _ in range(blocks)]
  states = [{"b": jnp.float32(0.0)} for _ in range(blocks)]
  x = jnp.arange(8 * microbatches * 2 * 4, dtype=jnp.float32).reshape(8 * microbatches, 2, 4)
  with jax.set_mesh(mesh):
    y, auxes, counts = jax.jit(lambda x: pipeline.run(layer, params, states, x, microbatches,
                                                      repeats))(x)
  np.testing.assert_array_equal(y, x + blocks)
  for aux in auxes:  # every block saw every micro-batch once
    np.testing.assert_array_equal(aux["load"], [microbatches] * 3)
    np.testing.assert_allclose(aux["z_loss"], 1.0)
  measured = 1 - int(np.sum(counts["busy"])) / (stages * counts["ticks"])
  theory = pipeline.bubble_fraction(stages, microbatches, repeats)
  assert abs(measured - theory) <= 0.1 * theory
  print(f"stages {stages} repeats {repeats} micro-batches {microbatches}: bubble measured "
        f"{measured:.4f}, theory {theory:.4f}")


@pytest.mark.parametrize("mesh, train_values, message", [
    (dict(stage=3), dict(batch_size=24), "mesh.stage=3: times train.pipeline_repeats=1 must "
                                         "divide the 4 MoE"),
    (dict(stage=2), dict(microbatches=3), "train.batch_size=16: must be divisible by "
                                          "train.microbatches=3"),
    (dict(stage=2), dict(microbatches=4, pipeline_repeats=2, batch_size=16),
     "train.microbatches=4: must be >= mesh.stage"),
    (dict(stage=2, expert=4), dict(microbatches=8), "train.microbatches=8: leaves micro-batches "
                                                    "of 2 sequences"),
])
def test_bad_pipeline_config_is_one_line(mesh, train_values, message):
  values = tiny(dict(data=2, expert=4)).to_dict()
  values["mesh"] = dict(mesh)
  values["train"].update(train_values)
  if "pipeline_repeats" in train_values:
    values["mesh"]["stage"] = 8
    values["model"]["num_layers"] = 17
  if mesh.get("stage") == 3:  # the width must split over 3 stages, or that error comes first
    values["model"]["embed_dim"] = values["moe"]["embed_dim"] = 48
  with pytest.raises(ConfigError) as err:
    config.from_config_dict(values)
  assert message.split(":")[0] in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_one_layout_resumes_under_another(tmp_path):
  """Saved on data 2 x expert 4 without a pipeline, restored on stage 4 x fsdp 2 with 4
  micro-batches (the parameters arrive split over stage and fsdp), the next step equals the
  one the saving layout takes; and a resume accepts the change of layout."""
  from moe_jax import checkpoint, workdir
  before, after = tiny(REFERENCE), tiny(dict(stage=4, fsdp=2), microbatches=4)
  setup, state, batch = _on_mesh(before)
  state, _ = setup.step(state, batch)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  ckpt.save(1, state, wait=True)
  ckpt.close()
  _, expected = setup.step(state, batch)

  setup = train.Setup(after)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  restored, step = ckpt.restore_latest(setup.abstract_state())
  ckpt.close()
  assert step == 1
  assert restored["params"]["embed"]["embedding"].sharding.spec[1] == ("stage", "fsdp")
  names = sharding.named_sharding(setup.mesh, train.BATCH_AXES)
  _, got = setup.step(restored, {k: jax.device_put(np.asarray(v), names)
                                 for k, v in batch.items()})
  np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["load"], expected["load"], atol=1e-6)
  refused, accepted = workdir.config_changes(before.to_dict(), after.to_dict())
  assert not refused and set(accepted) == {"mesh.data", "mesh.stage", "mesh.fsdp",
                                           "mesh.expert", "train.microbatches"}
