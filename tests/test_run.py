"""The runner as a user runs it, `python -m experiments.run`, in subprocesses.

Exact resume after SIGKILL, SIGTERM, a damaged checkpoint, a diverging run, bad configs and a
two-process run. Subprocesses share a persistent compilation cache, so only the first run of a
configuration compiles.
"""
import os
import shutil
import signal

import numpy as np
import pytest

import multihost
from moe_jax import checkpoint, metrics

from runs import (KILLER, REPO, assert_same_checkpoints, run, signal_endless_run,
                  train_records)


def test_reference_run_outputs(reference):
  records = metrics.read_jsonl(os.path.join(reference, metrics.METRICS_FILE))
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
  assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
  last = train_records(reference)[-1]
  for key in ("loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s", "mfu",
              "load", "max_vio", "dropped_fraction"):
    assert key in last
  assert np.array(last["load"]).shape == (1, 8) and len(last["max_vio"]) == 1
  assert train_records(reference)[0]["loss"] > last["loss"]
  for name in ("config.json", "loss.png", "expert_load.png", "max_vio.png"):
    assert os.path.exists(os.path.join(reference, name)), name
  assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == ["12", "4", "8"]


def test_resume_after_sigkill_is_exact(env, config_file, reference, tmp_path):
  workdir = str(tmp_path / "run")
  killed = run(env, config_file, workdir, script=KILLER, extra_env={"KILL_AT_STEP": "10"})
  assert killed.returncode == -signal.SIGKILL
  assert max(r["step"] for r in train_records(workdir)) >= 9
  restarted = run(env, config_file, workdir)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  resumed = [l for l in restarted.stdout.splitlines() if l.startswith("resumed from step")]
  assert len(resumed) == 1 and resumed[0].split()[3] in ("4", "8")
  ours, theirs = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE)), \
      metrics.read_jsonl(os.path.join(reference, metrics.METRICS_FILE))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]  # no duplicates, no gaps
  keys = ("loss", "ce", "grad_norm", "learning_rate", "load", "max_vio", "eval_loss")
  assert [{k: r.get(k) for k in keys} for r in ours] == [{k: r.get(k) for k in keys}
                                                         for r in theirs]
  assert_same_checkpoints(workdir, reference, 12)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(env, config_file, reference,
                                                              tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "12")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  result = run(env, config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  output = (result.stdout + result.stderr).splitlines()
  reports = [l for l in output if "unreadable" in l]
  assert len(reports) == 1 and reports[0].startswith("checkpoint step 12 in "), output
  assert "resumed from step 8" in result.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "12.unreadable"))
  assert_same_checkpoints(workdir, reference, 12)


def test_sigterm_saves_the_current_step_and_exits_cleanly(env, config_file, tmp_path):
  workdir = str(tmp_path / "run")
  returncode, stdout, stderr = signal_endless_run(env, config_file, workdir, signal.SIGTERM)
  assert returncode == 0, stderr[-3000:]
  last = train_records(workdir)[-1]["step"]
  assert f"SIGTERM: saved step {last}" in stdout
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(last)]
  state = checkpoint.read_numpy(os.path.join(workdir, "checkpoints"), last)
  assert int(state["step"]) == last


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(env, config_file,
                                                                          tmp_path):
  workdir = str(tmp_path / "run")
  arg = "train.inject_nan_at_steps=tuple(range(5,12));train.checkpoint_every=2"
  result = run(env, f"{config_file}:{arg}", workdir)
  assert result.returncode == 3
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines == [lines[-1]] and lines[-1].startswith("error: stopped at step 8: "), lines
  assert "train.max_bad_steps=3" in lines[-1] and "last good checkpoint is step 4" in lines[-1]
  records = train_records(workdir)
  assert [r["skipped_steps"] for r in records] == [0] * 5 + [1] * 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4"]
  state = checkpoint.read_numpy(os.path.join(workdir, "checkpoints"), 4)
  assert int(state["step"]) == 4 and int(state["bad_steps"]) == 0


BAD = [  # (override flags, key the one-line message must name)
    (["--config.train.stepz=3"], "config.train.stepz"),
    (["--config.nosuch.key=1"], "config.nosuch"),
    (["--config.train.steps=abc"], "config.train.steps"),
    (["--config.train.learning_rate=fast"], "config.train.learning_rate"),
    (["--config.train.batch_size=-8"], "train.batch_size=-8"),
    (["--config.moe.top_k=9"], "moe.top_k=9"),
    (["--config.moe.score_fn=relu"], "moe.score_fn='relu'"),
    (["--config.moe.capacity_factor=0"], "moe.capacity_factor=0.0"),
    (["--config.mesh.expert=3"], "moe.num_experts=8"),
    (["--config.mesh.tensor=2"], "model.vocab_size=259"),
    (["--config.mesh.data=2"], "mesh='data=2xstage=1xfsdp=1xexpert=1xtensor=1'"),
    (["--config.data.source=tokens", "--config.data.path=/no/such.tok"], "data.path"),
    (["--config.data.source=text", "--config.data.path=/no/such/dir"], "data.path"),
    (["--config.experiment=trian"], "experiment='trian'"),
    (["--config.train.seq_len=4096"], "train.seq_len=4096"),
    (["--config.model.first_k_dense=5"], "model.first_k_dense=5"),
    (["--config.train.b2=1.5"], "train.b2=1.5"),
    (["--config.fp8.recipe=fp4"], "fp8.recipe='fp4'"),
    (["--config.train.inject_nan_at_steps=(-1,)"], "train.inject_nan_at_steps"),
    (["--config=/no/such/config.py"], "config='/no/such/config.py'"),
]


@pytest.mark.parametrize("flags, key", BAD, ids=[k for _, k in BAD])
def test_bad_config_exits_with_one_line_and_writes_nothing(env, config_file, tmp_path, flags,
                                                           key):
  workdir = tmp_path / "run"
  result = run(env, config_file, str(workdir), *flags, timeout=120)
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
  assert not workdir.exists()


def test_two_processes_match_one(env, config_file, tmp_path):
  # Expert parallelism across the two processes: the all-to-all crosses the process boundary.
  arg = "mesh.expert=8;moe.parallelism='alltoall';train.steps=4;train.eval_every=4"
  script = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom experiments import run\nrun.entry()\n"
  workdirs = {n: str(tmp_path / f"{n}proc") for n in (1, 2)}
  for n, devices in ((2, 4), (1, 8)):
    multihost.run_processes(script, num_processes=n, devices_per_process=devices, timeout=400,
                            args=[f"--config={config_file}:{arg}", f"--workdir={workdirs[n]}"])
  one, two = train_records(workdirs[1]), train_records(workdirs[2])
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose([r["load"] for r in two], [r["load"] for r in one], atol=1e-6)
  assert sorted(os.listdir(os.path.join(workdirs[2], "checkpoints"))) == ["4"]
