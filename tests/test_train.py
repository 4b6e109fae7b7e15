"""The train step (numerics guard, router bias, shardings), schedule, batches and metrics output.

The whole runner (resume, SIGTERM, bad configs, two processes) is tested in test_run.py.
"""
import dataclasses
import io
import json
import os
import signal

import jax
import numpy as np
import pytest

from moe_jax import config, data, metrics, model, train, workdir
from moe_jax.config import ConfigError


def tiny(**train_overrides) -> config.ExperimentConfig:
  values = {
      "model": dict(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=32),
      "moe": dict(num_experts=8, top_k=2, expert_ffn_dim=16, bias_update_rate=0.01,
                  parallelism="alltoall"),  # expert-parallel: shard_map over the expert axis
      "mesh": dict(data=2, expert=4),
      "train": dict(dict(steps=10, batch_size=8, seq_len=16, warmup_steps=2, eval_batches=1),
                    **train_overrides),
      "data": dict(source="synthetic"),
  }
  return config.from_config_dict(values)


@pytest.fixture(scope="module")
def setup():
  return train.Setup(tiny(inject_nan_at_steps=(1,)))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_learning_rate_warms_up_then_decays_to_the_floor():
  cfg = tiny().train
  lrs = [float(train.learning_rate(s, cfg)) for s in range(cfg.steps)]
  peak = cfg.learning_rate
  np.testing.assert_allclose(lrs[:3], [peak / 2, peak, peak], rtol=1e-6)
  assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
  np.testing.assert_allclose(lrs[-1], peak * cfg.min_lr_ratio, rtol=1e-6)


def test_parameters_and_moments_are_sharded_by_logical_axes(setup):
  state = setup.init(jax.random.key(0))
  experts = state["params"]["layer_1"]["ffn"]["experts"]["gate"]
  assert experts.sharding.spec[0] == "expert"
  assert experts.addressable_shards[0].data.shape[0] == 2  # 8 experts over expert=4
  adam = state["opt_state"][1]  # chain: (clip, adam, decay)
  assert adam.mu["layer_1"]["ffn"]["experts"]["gate"].sharding == experts.sharding
  assert state["step"].sharding.is_fully_replicated


def test_bad_step_is_skipped_and_training_goes_on(setup):
  state = setup.init(jax.random.key(0))
  state, out = setup.step(state, setup.batches.train(0))
  assert int(out["applied"]) == 1 and int(out["bad_steps"]) == 0
  bias = state["moe_state"]["layer_1"]["router_bias"]
  assert np.any(np.asarray(bias) != 0)  # updated from the step's loads
  before = _host(state)
  state, out = setup.step(state, setup.batches.train(1))  # step 1: injected NaN gradients
  assert int(out["applied"]) == 0 and int(out["bad_steps"]) == 1
  assert not np.isfinite(float(out["grad_norm"]))
  after = _host(state)
  assert int(after["step"]) == 2
  for key in ("params", "opt_state", "moe_state"):
    _assert_trees_equal(after[key], before[key])
  state, out = setup.step(state, setup.batches.train(2))
  assert int(out["applied"]) == 1 and int(out["bad_steps"]) == 0
  assert np.isfinite(float(out["loss"]))
  assert not np.array_equal(np.asarray(state["params"]["head"]["kernel"]),
                            after["params"]["head"]["kernel"])


def test_non_finite_update_from_finite_gradients_is_not_applied(setup):
  """A corrupted Adam second moment (negative) gives a NaN update from finite gradients: the
  guard must look at the update itself, or the NaN is applied and saved."""
  state = setup.init(jax.random.key(0))
  for i in range(2):  # step 1 is the fixture's injected NaN gradient
    state, _ = setup.step(state, setup.batches.train(i))
  adam = state["opt_state"][1]
  corrupted = adam._replace(nu=jax.tree.map(lambda v: v - 1.0, adam.nu))
  state = dict(state, opt_state=(state["opt_state"][0], corrupted, *state["opt_state"][2:]))
  before = _host(state)
  state, out = setup.step(state, setup.batches.train(2))  # step 2: no injected fault
  assert np.isfinite(float(out["loss"])) and np.isfinite(float(out["grad_norm"]))
  assert int(out["applied"]) == 0 and int(out["bad_steps"]) == 2  # step 1's, then this one
  after = _host(state)
  for key in ("params", "opt_state", "moe_state"):
    _assert_trees_equal(after[key], before[key])


def _max_vio_after_skew(rate: float, steps: int = 40) -> list[float]:
  """MaxVio of each train step from a router bias that sends every token to expert 0.

  1024 tokens a batch keep the loads' sampling noise (~0.1 of MaxVio) below what is tested. The
  bias step is a tenth of the spread of the sigmoid scores across tokens at init (~0.03: logit
  std 0.02 * sqrt(32), times the sigmoid's slope 1/4): a step near the spread flips every
  token's ranking together and oscillates (BUILD_NOTES "Load balancing"). The learning rate is
  low enough that the router's own drift (collapse) stays slower than the bias.
  """
  cfg = tiny(steps=steps, batch_size=64, learning_rate=3e-4)
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_update_rate=rate))
  setup = train.Setup(cfg)
  state = setup.init(jax.random.key(0))
  skewed = jax.tree.map(lambda b: b.at[0].add(0.1), state["moe_state"])
  state = dict(state, moe_state=jax.device_put(skewed, setup.shardings["moe_state"]))
  vio = []
  for s in range(steps):
    state, out = setup.step(state, setup.batches.train(s))
    vio.append(float(np.max(out["max_vio"])))
  return vio


def test_bias_balancing_undoes_a_skewed_router():
  balanced, control = _max_vio_after_skew(3e-3), _max_vio_after_skew(0.0)
  assert balanced[0] > 2.5 and control[0] > 2.5  # expert 0 takes nearly all of 2 per token
  assert np.mean(balanced[-10:]) < 0.5, balanced
  assert np.mean(control[-10:]) > 2.0, control  # without the bias step it stays skewed


def test_batches_are_the_global_batch_on_the_mesh(setup):
  batch = setup.batches.train(3)
  cfg = setup.cfg.train
  expected = data.get_batch(setup.dataset, "train", 3, batch_size=cfg.batch_size,
                            seq_len=cfg.seq_len, seed=cfg.seed)
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
    assert batch[key].sharding.spec[0] == ("data", "stage", "fsdp", "expert")


def test_evaluate_is_deterministic(setup):
  state = setup.init(jax.random.key(0))
  first, second = setup.evaluate(state), setup.evaluate(state)
  assert first == second and np.isfinite(first["eval_loss"])
  np.testing.assert_allclose(first["eval_perplexity"], np.exp(first["eval_loss"]), rtol=1e-6)


def test_flops_count_activated_matmul_parameters():
  cfg = tiny()
  counts = model.count_params(cfg.model, cfg.moe)
  main = counts["main"]["activated"]
  assert metrics.matmul_parameters(counts) == main["all"] - cfg.model.embed_dim
  attention = 6 * 16 * 2 * (8 + 8 + 8) * 2
  assert metrics.train_flops_per_token(counts, cfg.model, 16) == (
      6 * metrics.matmul_parameters(counts) + attention)


def test_metrics_log_drops_lines_after_the_resumed_step(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  for step in range(1, 7):
    log.write({"step": step, "loss": float(step), "load": np.ones((1, 2)) / 2})
  log.close()
  log = metrics.MetricsLog(str(tmp_path), resume_step=4)
  log.write({"step": 5, "loss": 50.0})
  log.close()
  records = metrics.read_jsonl(os.path.join(tmp_path, metrics.METRICS_FILE))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert records[-1]["loss"] == 50.0 and records[0]["load"] == [[0.5, 0.5]]
  assert metrics.MetricsLog(str(tmp_path / "other"), enabled=False).enabled is False
  assert not os.path.exists(tmp_path / "other")


def test_plots_are_written(tmp_path):
  with open(tmp_path / metrics.METRICS_FILE, "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "loss": 5.0 - step / 2, "load": [[0.1, 0.2, 0.3, 0.4],
                                                                           [0.25] * 4],
                          "max_vio": [0.6, 0.0]}) + "\n")
    f.write(json.dumps({"step": 5, "eval_loss": 3.0}) + "\n")
  paths = metrics.plot(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["expert_load.png", "loss.png",
                                                         "max_vio.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_is_plain_lines_off_a_terminal():
  stream = io.StringIO()
  progress = metrics.Progress(100, stream)
  progress.update(10, 2.5, 1234.0, 90.0)
  progress.message("step 10: held-out loss 2.4")
  assert stream.getvalue().splitlines() == [
      "step 10/100  loss 2.5000  1,234 tok/s  ETA 0:01:30", "step 10: held-out loss 2.4"]


def test_workdir_of_another_model_is_refused(tmp_path):
  cfg = tiny()
  with open(tmp_path / train.CONFIG_FILE, "w") as f:
    json.dump(cfg.to_dict(), f)
  workdir.check_config(tiny(steps=20), str(tmp_path))  # train settings may change
  other = config.from_config_dict(dict(cfg.to_dict(), moe=dict(cfg.to_dict()["moe"], top_k=1)))
  with pytest.raises(ConfigError, match=r"^moe\.top_k=1: the run in .* used 2; use another"):
    workdir.check_config(other, str(tmp_path))


def test_sigterm_saves_the_step_then_raises_preempted(tmp_path):
  cfg = tiny(checkpoint_every=100)
  sigterm_after_3 = lambda done, state: done == 3 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(train.Preempted, match=r"^SIGTERM: stopped after saving step 3 in "):
    train.train(cfg, str(tmp_path), step_hooks=[sigterm_after_3])
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
  assert train.train(cfg, str(tmp_path))["step"] == 10  # the rerun resumes and finishes
