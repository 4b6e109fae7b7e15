"""The runner as a user runs it, `python -m experiments.run`, in subprocesses: the shared tiny
config, the command line, and comparisons of runs (tests/conftest.py holds the fixtures)."""
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from moe_jax import checkpoint, metrics

REPO = pathlib.Path(__file__).resolve().parent.parent

# A 2-layer MLA model (one dense, one MoE block with 8 experts) on the synthetic task.
CONFIG = """
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = "train"
  c.model = ml_collections.ConfigDict(dict(
      embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
      num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
      max_seq_len=32))
  c.moe = ml_collections.ConfigDict(dict(
      num_experts=8, top_k=2, expert_ffn_dim=16, score_fn="sigmoid",
      capacity_factor=ml_collections.config_dict.placeholder(float)))
  c.fp8 = ml_collections.ConfigDict(dict(recipe="none"))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=12, batch_size=8, seq_len=32, learning_rate=3e-3, warmup_steps=2, b2=0.95,
      log_every=1, eval_every=6, eval_batches=1, checkpoint_every=4, keep_checkpoints=3,
      max_bad_steps=3, inject_nan_at_steps=()))
  c.data = ml_collections.ConfigDict(dict(source="synthetic", path=""))
  for override in (arg or "").split(";"):  # "section.key=value;..." for the tests' variants
    if override:
      key, value = override.split("=", 1)
      section, name = key.split(".")
      c[section][name] = eval(value)
  return c
"""

# The runner with a step hook that SIGKILLs the process: a crash at a known step.
KILLER = """
import os, signal, sys
from moe_jax import train
_train = train.train

def train_then_die(cfg, workdir, step_hooks=()):
  def kill(step, state):
    if step == int(os.environ["KILL_AT_STEP"]):
      os.kill(os.getpid(), signal.SIGKILL)
  return _train(cfg, workdir, step_hooks=[kill])

train.train = train_then_die
from experiments import run
run.entry()
"""


def run(env, config, workdir, *flags, script=None, extra_env=None, timeout=300):
  command = [sys.executable] + (["-c", script] if script else ["-m", "experiments.run"])
  command += [f"--config={config}", f"--workdir={workdir}", *flags]
  return subprocess.run(command, cwd=REPO, env=dict(env, **(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout)


def train_records(workdir):
  return [r for r in metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
          if "loss" in r]


def assert_same_checkpoints(a, b, step):
  ta = checkpoint.read_numpy(os.path.join(a, "checkpoints"), step)
  tb = checkpoint.read_numpy(os.path.join(b, "checkpoints"), step)
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.tree.structure(ta) == jax.tree.structure(tb)
  for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
    np.testing.assert_array_equal(x, y)  # bitwise


# A run far longer than any test: it ends only when signalled.
ENDLESS = "train.steps=100000;train.checkpoint_every=1000;train.eval_every=100000"


def signal_endless_run(env, config_file, workdir, signum, *, records=3, meanwhile=None):
  """Starts an endless run, waits until it has logged `records` steps, calls meanwhile(process)
  if given, then sends `signum`; returns (returncode, stdout, stderr)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--config={config_file}:{ENDLESS}",
       f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while len(train_records(workdir)) < records:
      assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
      time.sleep(0.2)
    if meanwhile is not None:
      meanwhile(process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  return process.returncode, stdout, stderr
