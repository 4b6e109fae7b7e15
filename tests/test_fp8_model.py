"""FP8 in the model and the trainer: recipes track the plain loss, which products are quantized
(projections and experts, not router or head), the delayed state (dense [L] and expert [E, L]
histories) rolls through a train step and is checkpointed, bfloat16 moments, and the FP8 study
end to end on a 3-step config."""
import csv
import dataclasses
import functools
import json
import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fp8_study
from moe_jax import checkpoint, config, data, fp8, model, train
from moe_jax.moe import grouped, padded, products
from moe_jax.config import FP8Config, MoEConfig, ModelConfig, TrainConfig

# One dense block, one MoE block, an MTP module (MoE): every kind of dense projection once.
MODEL = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, max_seq_len=16, mtp_depth=1, init_std=0.1)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def fp8_cfg(recipe: str, **overrides) -> FP8Config:
  # tile 16 < the widths here, so blockwise really has several tiles per row.
  return FP8Config(**dict(dict(recipe=recipe, tile=16, amax_history_len=4), **overrides))


@pytest.fixture(scope="module")
def setup():
  params, state = model.init(jax.random.key(0), MODEL, MOE)
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 256)
  return params, state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


# Each recipe compiles the whole model's gradient (~40 s on 2 cores): blockwise in the main
# suite, the per-tensor recipes in the slow step (their numerics are tested on single products
# in test_fp8.py and in the layer in test_fp8_moe.py).
@pytest.mark.parametrize("recipe", [pytest.param("tensor", marks=pytest.mark.slow),
                                    pytest.param("delayed", marks=pytest.mark.slow), "blockwise"])
def test_fp8_loss_and_gradient_track_the_plain_ones(setup, recipe):
  params, state, batch = setup
  cfg = fp8_cfg(recipe)
  f8 = model.init_fp8_state(MODEL, MOE, cfg) or None
  grad = jax.value_and_grad(model.loss, has_aux=True)
  (plain, _), g_plain = grad(params, state, batch, MODEL, MOE)
  (loss, _), g = grad(params, state, batch, MODEL, MOE, cfg, f8)
  assert np.isfinite(float(loss)) and loss != plain  # quantized, and only slightly
  # Measured 0.09% (blockwise) to 0.27% (tensor, delayed), experts in FP8 too.
  np.testing.assert_allclose(float(loss), float(plain), rtol=5e-3)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  rel = jnp.linalg.norm(flat(g) - flat(g_plain)) / jnp.linalg.norm(flat(g_plain))
  # e4m3 keeps 3 mantissa bits, bfloat16 7: bfloat16 compute moves this gradient by ~1%, the
  # recipes by 15% to 17% (measured), 16x as much.
  assert float(rel) < 0.3, float(rel)


def test_delayed_state_mirrors_the_quantized_parameters(setup):
  params = setup[0]
  assert model.init_fp8_state(MODEL, MOE, fp8_cfg("blockwise")) == {}
  f8 = model.init_fp8_state(MODEL, MOE, fp8_cfg("delayed"))
  paths = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(f8)}
  want = {"['layer_0']['ffn']['gate']", "['layer_0']['ffn']['up']", "['layer_0']['ffn']['down']",
          "['mtp_0']['proj']['kernel']"}
  for block in ("['layer_0']", "['layer_1']", "['mtp_0']['block']"):
    want |= {f"{block}['attn']['{w}']" for w in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")}
  experts = set()
  for block in ("['layer_1']", "['mtp_0']['block']"):  # the MoE blocks
    experts |= {f"{block}['ffn']['experts']['{w}']" for w in ("gate", "up", "down")}
    want |= {f"{block}['ffn']['shared']['{w}']" for w in ("gate", "up", "down")}
  assert paths == want | experts
  param_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert paths <= param_paths
  for p, h in jax.tree_util.tree_leaves_with_path(f8):
    shape = (MOE.num_experts, 4) if jax.tree_util.keystr(p[:-1]) in experts else (4,)
    assert h.shape == shape and not h.any()
  with pytest.raises(ValueError, match="init_fp8_state"):
    model.loss(params, setup[1], setup[2], MODEL, MOE, fp8_cfg("delayed"))


@pytest.mark.parametrize("backend", ["padded", "ragged"])
def test_projections_and_experts_go_through_fp8(setup, monkeypatch, backend):
  params, state, batch = setup
  shapes, experts = [], []
  real_dot = fp8.fp8_dot

  def counting_dot(x, w, cfg, state=None):
    shapes.append(tuple(w.shape))
    return real_dot(x, w, cfg, state)

  def counting(name, real):
    def fn(x, w, sizes_or_gates, plan_or_product, *args):
      product = plan_or_product if name == "ragged" else args[0]
      if isinstance(product, products.FP8):  # a kernel over FP8 expert products
        experts.append((name, tuple(w["down"].shape)))
      return real(x, w, sizes_or_gates, plan_or_product, *args)
    return fn
  monkeypatch.setattr(fp8, "fp8_dot", counting_dot)
  monkeypatch.setattr(grouped, "swiglu_ragged", counting("ragged", grouped.swiglu_ragged))
  monkeypatch.setattr(padded, "routed", counting("padded", padded.routed))
  # A config traced nowhere else, so that jit traces (and counts) afresh.
  moe_cfg = dataclasses.replace(MOE, grouped_backend=backend)
  model.loss(params, state, batch, MODEL, moe_cfg, fp8_cfg("tensor", amax_history_len=3))
  D, H, E, F = MODEL.embed_dim, MODEL.num_heads, MOE.num_experts, MOE.expert_ffn_dim
  attn = [(D, 16), (16, H * 12), (D, 16 + 4), (16, H * 16), (H * 8, D)]  # wq_a wq_b wkv_a wkv_b wo
  dense = attn * 3 + [(D, 64), (D, 64), (64, D), (2 * D, D)]  # dense FFN, MTP projection
  shared = [(D, F), (D, F), (F, D)] * 2  # both MoE blocks' shared experts
  # Not the router [D, E], the head [D, V] nor the embedding.
  assert sorted(shapes) == sorted(dense + shared)
  # padded: 20 tokens x 2 slots over 4 experts give buckets of 8 rows (grouped.layout) and
  # overflow blocks in one kernel call, then the spill pass's (traced in its cond even when not
  # taken).
  kernels = ["ragged"] if backend == "ragged" else ["padded", "padded"]
  assert experts == [(k, (E, F, D)) for k in kernels] * 2  # both MoE blocks


@pytest.fixture(scope="module")
def delayed_run():
  """Three train steps under "delayed"; step index 2 has NaN gradients (numerics guard)."""
  cfg = config.from_config_dict({
      "model": dict(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=16),
      "moe": dict(num_experts=4, top_k=2, expert_ffn_dim=16),
      "fp8": dict(recipe="delayed", tile=16, amax_history_len=4),
      "train": dict(steps=3, batch_size=2, seq_len=8, inject_nan_at_steps=(2,)),
      "data": dict(source="synthetic")})
  ds = data.load_dataset(cfg.data)
  step = jax.jit(functools.partial(train.train_step, cfg=cfg))
  states = [train.init_state(jax.random.key(0), cfg)]
  for i in range(3):
    states.append(step(states[-1], data.get_batch(ds, "train", i, seed=0, batch_size=2,
                                                  seq_len=8))[0])
  return cfg, states


def test_train_step_rolls_the_expert_histories(delayed_run):
  _, (s0, s1, s2, _) = delayed_run
  h0, h1, h2 = (s["fp8"]["layer_1"]["ffn"]["experts"]["down"] for s in (s0, s1, s2))
  assert all(h.shape == (4, 4) and not h.any() for h in h0.values())
  w0 = jnp.max(jnp.abs(s0["params"]["layer_1"]["ffn"]["experts"]["down"]), axis=(1, 2))
  np.testing.assert_array_equal(np.asarray(h1["w"][:, 0]), np.asarray(w0))
  # Every expert saw tokens (8 x 2 assignments over 4 experts); one amax per expert.
  assert np.all(np.asarray(h1["x"][:, 0]) > 0) and np.all(np.asarray(h1["g"][:, 0]) > 0)
  assert len(set(np.asarray(h1["x"][:, 0]).tolist())) == 4
  for k in "xwg":
    np.testing.assert_array_equal(np.asarray(h2[k][:, 1:]), np.asarray(h1[k][:, :-1]))


def test_train_step_rolls_the_delayed_histories(delayed_run):
  _, (s0, s1, s2, s3) = delayed_run
  h0, h1, h2 = (s["fp8"]["layer_0"]["attn"]["wkv_a"] for s in (s0, s1, s2))
  assert not any(h.any() for h in h0.values())
  w0 = float(jnp.max(jnp.abs(s0["params"]["layer_0"]["attn"]["wkv_a"])))
  assert float(h1["w"][0]) == w0 and not h1["w"][1:].any()
  assert float(h1["x"][0]) > 0 and float(h1["g"][0]) > 0 and not h1["g"][1:].any()
  for k in "xwg":  # rolled by one, the new amax in front
    np.testing.assert_array_equal(np.asarray(h2[k][1:]), np.asarray(h1[k][:-1]))
  assert float(h2["x"][0]) != float(h1["x"][0])
  # The state is never an optimizer input: the Adam moments hold parameters only.
  mu = s1["opt_state"][1].mu
  assert jax.tree.structure(mu) == jax.tree.structure(s1["params"])
  # A non-finite step keeps the histories, like the parameters.
  assert int(s3["bad_steps"]) == 1
  for a, b in zip(jax.tree.leaves(s3["fp8"]), jax.tree.leaves(s2["fp8"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_delayed_state_is_checkpointed(delayed_run, tmp_path):
  cfg, states = delayed_run
  abstract = jax.eval_shape(functools.partial(train.init_state, cfg=cfg), jax.random.key(0))
  assert "fp8" in abstract
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(2, states[2], wait=True)
  ckpt.close()
  saved = checkpoint.read_numpy(str(tmp_path), 2)["fp8"]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(states[2]["fp8"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_bfloat16_optimizer_state_holds_both_moments_in_bfloat16():
  params = {"w": jnp.full((4, 3), 0.5), "scale": jnp.ones((3,))}
  opt = train.make_optimizer(TrainConfig(optimizer_state_dtype="bfloat16"))
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = opt.update(grads, state, params)
  adam = state[1]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert all(u.dtype == jnp.float32 and bool(jnp.isfinite(u).all())
             for u in jax.tree.leaves(updates))


def test_quantization_rows_show_tiles_isolating_token_outliers():
  rows = fp8_study.quantization_rows(FP8Config(), magnitudes=(1.0, 1e5))
  err = {(r["outliers"], r["magnitude"], r["recipe"]): r for r in rows}
  assert err["token", 1e5, "tensor"]["err_ordinary"] > 5 * err["token", 1.0, "tensor"][
      "err_ordinary"]
  assert err["token", 1e5, "blockwise"]["err_ordinary"] == err["token", 1.0, "blockwise"][
      "err_ordinary"]
  assert err["token", 1e5, "delayed"]["err_outliers"] > 0.9  # unannounced outliers saturate
  assert fp8_study.absorbed_up_to(rows, "token", "blockwise") is None


@pytest.mark.slow  # ten 3-step runs and their evaluations: ~4 minutes on 2 cores
def test_fp8_study_end_to_end(tmp_path):
  cfg = runpy.run_path(str(CONFIGS / "fp8_study.py"))["get_config"]("runlocal")
  cfg.mesh.data = jax.device_count()  # the tests' fake devices
  cfg.train.batch_size = jax.device_count()
  cfg.data.source = "synthetic"
  cfg.model.update(dict(embed_dim=32, dense_ffn_dim=64, num_heads=2, num_kv_heads=2,
                        kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
  cfg.fp8.tile = 16
  cfg.seeds = (3, 5)
  cfg = config.from_config_dict(cfg)
  assert cfg.experiment == "fp8_study" and cfg.train.steps == 3
  means = fp8_study.run(cfg, str(tmp_path))
  assert [r["run"] for r in means] == list(fp8_study.RUNS)
  assert all(r["seeds"] == 2 for r in means)
  with open(tmp_path / "fp8_study.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["seed"]), r["run"]) for r in rows] == [
      (s, n) for s in (3, 5) for n in fp8_study.RUNS]
  for r in rows:
    assert np.isfinite(float(r["final_train_loss"])) and np.isfinite(float(r["final_eval_loss"]))
  # Each run trained its own seed: the two seeds' bfloat16 runs saw other data and init.
  base = [r for r in rows if r["run"] == "bfloat16"]
  assert all(float(r["eval_rel_diff"]) == 0 for r in base)
  assert base[0]["final_eval_loss"] != base[1]["final_eval_loss"]
  base_by_seed = {int(r["seed"]): r for r in base}
  for seed in (3, 5):
    with open(tmp_path / "runs" / f"seed{seed}" / "float32" / "config.json") as f:
      assert json.load(f)["train"]["seed"] == seed
  # The means are the per-seed differences averaged.
  floats = lambda run, key: [float(r[key]) for r in rows if r["run"] == run]
  block = next(r for r in means if r["run"] == "blockwise")
  assert block["eval_rel_diff"] == pytest.approx(np.mean(floats("blockwise", "eval_rel_diff")))
  assert block["eval_rel_diff_se"] == pytest.approx(
      np.std(floats("blockwise", "eval_rel_diff"), ddof=1) / np.sqrt(2))
  # Same weights: the bfloat16 weights under bfloat16 give the bfloat16 run's own final loss.
  with open(tmp_path / "fp8_same_weights.csv") as f:
    same = {(int(r["seed"]), r["run"]): r for r in csv.DictReader(f)}
  assert sorted(same) == sorted((s, n) for s in (3, 5) for n in fp8_study.SAME_WEIGHTS_RUNS)
  for seed, run in base_by_seed.items():
    assert float(same[seed, "bfloat16"]["eval_loss"]) == pytest.approx(
        float(run["final_eval_loss"]), rel=1e-6)
    assert float(same[seed, "bfloat16"]["rel_diff"]) == 0
    assert float(same[seed, "blockwise"]["rel_diff"]) != 0
  for name in ("fp8_study.md", "fp8_study.csv", "fp8_study_mean.csv", "fp8_quantization.csv",
               "fp8_same_weights.csv", "fp8_study.png"):
    assert os.path.getsize(tmp_path / name) > 0
  text = (tmp_path / "fp8_study.md").read_text()
  assert "noise floor" in text and "| 5 | blockwise | blockwise |" in text
  with pytest.raises(config.ConfigError, match="seed3/bfloat16 used another config"):
    fp8_study.train_run(fp8_study.run_config(cfg, "float32", 3),
                        fp8_study.run_dir(str(tmp_path), 3, "bfloat16"))


def test_fp8_study_resumes_runs_written_before_the_seeds_field(tmp_path):
  cfg = runpy.run_path(str(CONFIGS / "fp8_study.py"))["get_config"]("runlocal")
  cfg.data.source = "synthetic"
  cfg = config.from_config_dict(cfg)
  run = fp8_study.run_config(cfg, "float32", 0)
  old = run.to_dict()
  del old["seeds"]  # config.json of a study run before `seeds` existed
  with open(tmp_path / train.CONFIG_FILE, "w") as f:
    json.dump(old, f)
  check = fp8_study._check_run_dir  # pylint: disable=protected-access
  check(run, str(tmp_path))
  with pytest.raises(config.ConfigError, match="used another config"):
    check(fp8_study.run_config(cfg, "float32", 1), str(tmp_path))


def test_fp8_study_stops_when_a_run_is_preempted(tmp_path, monkeypatch):
  """SIGTERM during a run (train.Preempted, raised after the save) ends the study there: no
  later run starts inside the scheduler's grace period, and the run's time is kept."""
  cfg = runpy.run_path(str(CONFIGS / "fp8_study.py"))["get_config"]("runlocal")
  cfg.data.source = "synthetic"
  cfg = config.from_config_dict(cfg)
  started = []

  def preempted_train(run_cfg, workdir):
    started.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    raise train.Preempted(f"SIGTERM: stopped after saving step 1 in {workdir}")

  monkeypatch.setattr(fp8_study.train, "train", preempted_train)
  with pytest.raises(train.Preempted):
    fp8_study.run(cfg, str(tmp_path))
  assert started == [fp8_study.run_dir(str(tmp_path), 0, "float32")]
  with open(os.path.join(started[0], fp8_study.WALL_FILE)) as f:
    assert json.load(f) > 0
  assert not os.path.exists(tmp_path / "fp8_study.csv")
