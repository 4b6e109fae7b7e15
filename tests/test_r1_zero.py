"""experiment=r1_zero: a trivial reward rises under the RL loop; the :runlocal run end to end, its
outputs, and a rerun after it finished that retrains nothing."""
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import r1_zero as r1_config
from experiments import r1_zero
from moe_jax import config, metrics, sharding, train
from moe_jax.rl import tasks
from moe_jax.rl.config import RLConfig

import runs


def tiny_cfg(num_experts=4, parallelism="none", mesh=None) -> config.ExperimentConfig:
  return config.from_config_dict({
      "model": dict(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=96, init_std=0.1),
      "moe": dict(num_experts=num_experts, top_k=2, expert_ffn_dim=16, parallelism=parallelism),
      "mesh": mesh or {},
      "train": dict(batch_size=8, seq_len=96, weight_decay=0.0, grad_clip=0.0),
      "data": dict(source="synthetic"),
  })

ASCII_FIRST = lambda problem, text: float(text[:1].isascii() and text[:1] != "")


def test_a_trivial_reward_rises():
  """Reward 1 when the completion starts with an ASCII character (about half the bytes at
  initialisation): a few high-learning-rate steps must push the mean reward up."""
  cfg = tiny_cfg()
  rl = RLConfig(steps=8, prompts_per_step=8, group_size=8, learning_rate=3e-2, max_tokens=2,
                loss_agg="token_mean")
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  state = train.init_state(jax.random.key(0), cfg)
  update = r1_zero.Learner(cfg, rl, mesh)
  spec, rewards = tasks.TaskSpec(), []
  for s in range(rl.steps):
    state, record = r1_zero.rl_step(state, None, s, cfg=cfg, rl=rl, spec=spec, T=96,
                                    update=update, mesh=mesh, reward_fn=ASCII_FIRST)
    rewards.append(record["reward"])
    assert record["rollout_ratio"] == pytest.approx(1.0, abs=1e-4)  # router replay: no gap
    assert 0 <= record["rollout_kl"] < 1e-6
  print(f"mean reward per step: {np.round(rewards, 3).tolist()}")
  assert np.mean(rewards[-2:]) > max(0.85, np.mean(rewards[:2]) + 0.25)  # measured: 0.52 -> 0.98


CONFIG = os.path.join(runs.REPO, "configs", "r1_zero.py") + ":runlocal"


def test_rl_steps_on_the_expert_parallel_mesh_equal_one_device():
  """Rollouts through the engine and updates on fsdp 2 x expert 4 (all-to-all) give the
  single-device run's records (problems, samples and updates alike)."""
  rl = RLConfig(steps=2, prompts_per_step=4, group_size=4, learning_rate=1e-2, max_tokens=4)
  records = {}
  for name, parallelism, mesh_cfg, devices in (
      ("one", "none", {}, jax.devices()[:1]),
      ("mesh", "alltoall", dict(fsdp=2, expert=4), jax.devices())):
    cfg = tiny_cfg(8, parallelism, mesh_cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
      state = jax.jit(functools.partial(train.init_state, cfg=cfg),
                      out_shardings=train.state_shardings(cfg, mesh))(jax.random.key(0))
    update, records[name] = r1_zero.Learner(cfg, rl, mesh), []
    for s in range(rl.steps):
      state, record = r1_zero.rl_step(state, None, s, cfg=cfg, rl=rl, spec=tasks.TaskSpec(),
                                      T=96, update=update, mesh=mesh, reward_fn=ASCII_FIRST)
      records[name].append(record)
  for one, mesh in zip(records["one"], records["mesh"]):
    assert one["reward"] == mesh["reward"] and mesh["rollout_kl"] < 1e-6
    for key in ("loss", "grad_norm", "entropy"):
      np.testing.assert_allclose(mesh[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def runlocal(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("r1") / "run")
  result = runs.run(env, CONFIG, workdir, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  print(result.stdout[-1500:])
  return env, workdir


def test_runlocal_writes_every_output(runlocal):
  _, workdir = runlocal
  for name in ("corpus.tokens", "eval_base.json", "r1_zero.md", "r1_zero.json", "r1_zero.png",
               "rl/metrics.jsonl", "rl/eval_final.json", "base/metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = metrics.read_jsonl(os.path.join(workdir, "rl", metrics.METRICS_FILE))
  assert [r["step"] for r in records] == [1, 2, 3]
  for key in ("loss", "reward", "pass@1", "cons@k", "kl", "clip_fraction", "entropy",
              "response_length", "route_agreement", "rollout_kl_without_replay"):
    assert all(np.isfinite(r[key]) for r in records), key
  for key in ("rollout_route_agreement", "route_agreement"):
    assert all(0 <= r[key] <= 1 for r in records), key
  # the first update scores the rollout before any change: with the engine's routes replayed
  # the learner's log-probs differ from the engine's by float noise only (~1e-5 in the real run)
  assert all(0 <= r["rollout_gap"] < 1e-3 for r in records)
  assert all(0 <= r["rollout_gap_without_replay"] for r in records)
  out = json.load(open(os.path.join(workdir, "r1_zero.json")))
  for side in ("before", "after"):
    assert {"pass@1", "cons@4", "pass@4", "format_rate", "mean_length"} <= set(out[side])
  assert "| pass@1 |" in open(os.path.join(workdir, "r1_zero.md")).read()


def test_rerun_after_finishing_retrains_nothing(runlocal):
  env, workdir = runlocal
  files = ["base/metrics.jsonl", "rl/metrics.jsonl", "eval_base.json", "rl/eval_final.json"]
  before = {f: open(os.path.join(workdir, f)).read() for f in files}
  ckpts = sorted(os.listdir(os.path.join(workdir, "rl", "checkpoints")))
  result = runs.run(env, CONFIG, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = result.stdout
  assert "nothing to do" in printed and "RL resumed from step 3" in printed
  assert "rl step" not in printed
  assert {f: open(os.path.join(workdir, f)).read() for f in files} == before
  assert sorted(os.listdir(os.path.join(workdir, "rl", "checkpoints"))) == ckpts


def test_paper_variant_builds_and_validates():
  cfg = config.from_config_dict(r1_config.get_config("paper"))
  rl = r1_zero.rl_config.from_dict(cfg.rl)
  assert (rl.group_size, rl.learning_rate, rl.kl_coef, rl.clip_low, rl.clip_high,
          rl.ref_update_every, rl.temperature) == (16, 3e-6, 1e-3, 10.0, 10.0, 400, 1.0)
  bad = r1_config.get_config("runlocal")
  bad.rl.group_size = 1
  with pytest.raises(config.ConfigError, match=r"^rl.group_size=1: must be >= 2"):
    r1_zero.run(config.from_config_dict(bad), "/nonexistent/never_written")


def test_a_changed_rl_setting_is_refused_before_any_work(runlocal):
  _, workdir = runlocal
  changed = r1_config.get_config("runlocal")
  used = changed.rl.learning_rate
  changed.rl.learning_rate = 1e-3
  with pytest.raises(config.ConfigError, match=r"^rl.learning_rate=0.001: the RL run in .* used "
                     + re.escape(repr(used)) + r"; use another --workdir"):
    r1_zero.run(config.from_config_dict(changed), workdir)


def test_a_copied_workdir_resumes_and_a_diverging_rl_run_stops(runlocal, tmp_path):
  """The R1 workdir copied elsewhere resumes (the base's corpus is recorded relative to it);
  RL updates that are all skipped (rl.learning_rate=1e300 overflows) stop the run with exit 3
  and one line naming the cause, and no report is written as if it had trained."""
  env, workdir = runlocal
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  result = runs.run(env, CONFIG, moved)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "nothing to do" in result.stdout and "RL resumed from step 3" in result.stdout
  assert "resuming with data.path" in result.stdout
  for name in ("rl", "r1_zero.md", "r1_zero.json", "r1_zero.png"):
    path = os.path.join(moved, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  result = runs.run(env, CONFIG, moved, "--config.rl.learning_rate=1e300")
  assert result.returncode == 3, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  # numpy warns that 1e300 overflows float32 as the learner casts it; then the one line
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  assert re.match(r"error: stopped at RL step \d: loss, gradient or update not finite for \d+ "
                  r"learner updates in a row \(train.max_bad_steps=\d+\); ", lines[0]), lines
  assert "rl.checkpoint_every=2" in lines[0] or "the last good checkpoint is RL step" in lines[0]
  assert not os.path.exists(os.path.join(moved, "r1_zero.json"))


def test_sigterm_saves_and_the_rerun_continues_the_same_run(runlocal, tmp_path):
  """SIGTERM during RL saves the step and exits 0; the rerun resumes from it and its steps equal
  the uninterrupted run's (problems and sampling are pure functions of (seed, step)). Runs last:
  it sets the finished RL run aside and redoes it on the same base (whose config names the
  corpus by its path, so the base cannot move)."""
  env, workdir = runlocal
  shutil.move(os.path.join(workdir, "rl"), str(tmp_path / "rl_done"))
  reference = metrics.read_jsonl(str(tmp_path / "rl_done" / metrics.METRICS_FILE))
  log = os.path.join(workdir, "rl", metrics.METRICS_FILE)
  command = [sys.executable, "-m", "experiments.run", f"--config={CONFIG}",
             f"--workdir={workdir}", "--config.rl.steps=6"]
  process = subprocess.Popen(command, cwd=runs.REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while not metrics.read_jsonl(log):
      assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
      time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 0, stderr[-3000:]
  assert "SIGTERM: saved RL step" in stdout
  stopped = max(r["step"] for r in metrics.read_jsonl(log))
  assert stopped < 3 and str(stopped) in os.listdir(os.path.join(workdir, "rl", "checkpoints"))
  result = runs.run(env, CONFIG, workdir, "--config.rl.steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"RL resumed from step {stopped}" in result.stdout
  resumed = metrics.read_jsonl(log)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for want, got in zip(reference, resumed):
    for key in ("loss", "reward", "pass@1", "response_length", "entropy", "grad_norm"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
