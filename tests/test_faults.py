"""Nothing lost, ever: ordinary faults, each reproduced as a user meets it (`experiments.run` in a
subprocess), must end in one line on stderr and a documented exit status, keep every good
checkpoint restorable and, where the run goes on, give the losses of an uninterrupted run.

The workdirs start as copies of the session's uninterrupted 12-step reference run (checkpoints
at steps 4, 8 and 12).
"""
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import multihost
from moe_jax import checkpoint, data, metrics
from runs import ENDLESS, REPO, assert_same_checkpoints, run, signal_endless_run, train_records

KEYS = ("loss", "ce", "grad_norm", "learning_rate", "load", "max_vio", "eval_loss")


def error_line(result) -> str:
  """The one non-empty stderr line (no traceback, no warnings) of a run or of its stderr."""
  stderr = result if isinstance(result, str) else result.stderr
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


def copy_of(reference, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  return workdir


def checkpoint_dirs(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def assert_same_run(workdir, reference):
  """Every logged figure and the final checkpoint equal the uninterrupted run's."""
  ours = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  theirs = metrics.read_jsonl(os.path.join(reference, metrics.METRICS_FILE))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  assert [{k: r.get(k) for k in KEYS} for r in ours] == [{k: r.get(k) for k in KEYS}
                                                          for r in theirs]
  assert_same_checkpoints(workdir, reference, 12)


def _empty_folder(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _truncate_arrays(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "default")):
    for name in files:
      if os.sep + "d" in root:  # the array data files, not the metadata
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
    f.write("\x00garbage{")


def _flip(path, offset, size=4096):
  with open(path, "r+b") as f:
    f.seek(offset)
    block = f.read(size)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in block))


def _flip_quarter_of_the_biggest_file(step_dir):
  """Bit rot: 4 KB flipped a quarter of the way into the biggest data file (values of the right
  shapes, read without an error: only the checksums tell)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  _flip(biggest, os.path.getsize(biggest) // 4)


DAMAGE = {
    "4 KB flipped a quarter into the biggest file": _flip_quarter_of_the_biggest_file,
    "bytes flipped in a file restore never reads": lambda d: _flip(
        os.path.join(d, "_CHECKPOINT_METADATA"), 100, 8),
    "empty step folder": _empty_folder,
    "missing item folder": lambda d: shutil.rmtree(os.path.join(d, "default")),
    "truncated array files": _truncate_arrays,
    "garbage metadata": _garbage_metadata,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(env, config_file, reference,
                                                                      tmp_path, damage):
  workdir = copy_of(reference, tmp_path)
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "12"))
  result = run(env, config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  reports = [l for l in (result.stdout + result.stderr).splitlines() if "unreadable" in l]
  assert len(reports) == 1 and reports[0].startswith("checkpoint step 12 in "), reports
  assert "0x" not in reports[0] and "Event loop" not in reports[0]
  assert "resumed from step 8" in result.stdout
  assert checkpoint_dirs(workdir) == ["12", "12.unreadable", "4", "8"]
  assert_same_run(workdir, reference)


def test_stray_step_folder_newer_than_the_run_keeps_every_good_checkpoint(env, config_file,
                                                                          reference, tmp_path):
  """Item 1: an interrupted copy leaves an empty step folder past the newest checkpoint."""
  workdir = copy_of(reference, tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "16"))
  result = run(env, config_file, workdir, "--config.train.steps=16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step 12" in result.stdout
  assert checkpoint_dirs(workdir) == ["12", "16", "16.unreadable", "8"]
  assert [r["step"] for r in train_records(workdir)] == list(range(1, 17))
  assert int(checkpoint.read_numpy(os.path.join(workdir, "checkpoints"), 16)["step"]) == 16
  assert_same_checkpoints(workdir, reference, 12)


def test_model_changed_without_config_json_is_a_mismatch_that_renames_nothing(
    env, config_file, reference, tmp_path):
  workdir = copy_of(reference, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  result = run(env, config_file, workdir, "--config.model.embed_dim=64")
  assert result.returncode == 2
  line = error_line(result)
  assert "checkpoint step 12" in line and "does not fit this config" in line, line
  assert "params['embed']['embedding'] has shape (259, 32), the config needs (259, 64)" in line
  assert checkpoint_dirs(workdir) == ["12", "4", "8"]
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  assert_same_checkpoints(workdir, reference, 12)


def test_eval_reads_without_renaming(env, config_file, reference, tmp_path):
  workdir = copy_of(reference, tmp_path)
  other = run(env, config_file, workdir, "--config.experiment=eval",
              "--config.moe.num_experts=4")
  assert other.returncode == 2
  assert "moe.num_experts=4: the run in " in error_line(other)
  os.remove(os.path.join(workdir, "config.json"))  # now only the checkpoint can tell
  other = run(env, config_file, workdir, "--config.experiment=eval",
              "--config.moe.num_experts=4")
  assert other.returncode == 2 and "does not fit this config" in error_line(other)
  _truncate_arrays(os.path.join(workdir, "checkpoints", "12"))
  damaged = run(env, config_file, workdir, "--config.experiment=eval")
  assert damaged.returncode == 0, damaged.stderr[-3000:]
  assert "left as it is" in damaged.stdout + damaged.stderr
  assert json.loads(damaged.stdout.strip().splitlines()[-1])["step"] == 8
  assert checkpoint_dirs(workdir) == ["12", "4", "8"]  # nothing renamed


def test_second_run_on_a_workdir_is_refused_while_the_first_goes_on(env, config_file, tmp_path):
  workdir = str(tmp_path / "run")

  def second_run(first):
    second = run(env, f"{config_file}:{ENDLESS}", workdir)
    assert second.returncode == 2
    line = error_line(second)
    assert "in use by another run (pid " in line and str(first.pid) in line, line
    assert first.poll() is None  # the first run goes on

  returncode, _, stderr = signal_endless_run(env, config_file, workdir, signal.SIGTERM,
                                             records=2, meanwhile=second_run)
  assert returncode == 0, stderr[-3000:]
  last = train_records(workdir)[-1]["step"]
  assert checkpoint_dirs(workdir) == [str(last)]


def test_resume_refuses_meaning_changes_and_records_harmless_ones(env, config_file, reference,
                                                                  tmp_path):
  workdir = copy_of(reference, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", "12", "default", "_METADATA"))
  with open(os.path.join(workdir, "config.json")) as f:
    stored = f.read()
  for arg, key in (("train.seed=1", "train.seed=1"),
                   ("data.heldout_fraction=0.5", "data.heldout_fraction=0.5"),
                   ("train.learning_rate=0.1", "train.learning_rate=0.1")):
    refused = run(env, f"{config_file}:{arg}", workdir)
    assert refused.returncode == 2
    assert error_line(refused).startswith(f"error: {key}: the run in ")
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == stored  # not written over
  assert checkpoint_dirs(workdir) == ["12", "4", "8"]  # the damaged 12 is not even looked at
  harmless = run(env, f"{config_file}:moe.grouped_backend='padded';train.log_every=2", workdir)
  assert harmless.returncode == 0, harmless.stderr[-3000:]
  assert "resuming with moe.grouped_backend 'auto' -> 'padded', train.log_every 1 -> 2" in (
      harmless.stdout)
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(l) for l in f]
  assert history == [{"time": history[0]["time"], "step": 8, "changes": {
      "moe.grouped_backend": ["auto", "padded"], "train.log_every": [1, 2]}}]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["log_every"] == 2
  assert_same_checkpoints(workdir, reference, 12)  # the same computation


def test_values_that_could_only_fail_later_are_refused_up_front(env, config_file, tmp_path):
  tokens = str(tmp_path / "wide.tok")
  data.write_tokens(tokens, [np.array([1, 2, 3, 300] * 100, np.uint16)])
  cases = [  # config variants (the test config file lists only some keys)
      ("train.learning_rate=float('nan')", "train.learning_rate=nan: must be a finite number"),
      ("train.learning_rate=float('inf')", "train.learning_rate=inf: must be a finite number"),
      ("model.rope_theta=0.0", "model.rope_theta=0.0: must be a number > 0"),
      ("model.pad_id=259", "model.pad_id=259: must be an integer in [-1, vocab_size=259)"),
      ("model.vocab_size=200;model.pad_id=-1",
       "data.source='synthetic': holds token id 257, outside model.vocab_size=200"),
      (f"data.source='tokens';data.path={tokens!r}",
       f"data.path={tokens!r}: holds token id 300, outside model.vocab_size=259"),
  ]
  for arg, message in cases:
    workdir = tmp_path / "run"
    result = run(env, f"{config_file}:{arg}", str(workdir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in error_line(result)
    assert not workdir.exists()


def test_torn_metrics_line_and_config_json_are_reported_and_dropped(env, config_file, reference,
                                                                    tmp_path):
  workdir = copy_of(reference, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  path = os.path.join(workdir, metrics.METRICS_FILE)
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 40)  # a kill in the middle of the last line
  config_json = os.path.join(workdir, "config.json")
  with open(config_json, "rb+") as f:
    f.truncate(os.path.getsize(config_json) // 2)
  plot = run(env, config_file, workdir, "--config.experiment=plot")
  assert plot.returncode == 0, plot.stderr[-3000:]
  result = run(env, config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "metrics.jsonl: line 14 is not a whole record (torn by a crash?); dropped" in (
      result.stdout)
  assert "config.json is damaged" in result.stdout
  with open(config_json) as f:
    assert json.load(f)["train"]["steps"] == 12  # written whole again
  assert_same_run(workdir, reference)


def test_workdir_that_is_a_file_or_read_only(env, config_file, reference, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("not a directory")
  result = run(env, config_file, str(a_file))
  assert result.returncode == 2 and "is a file, not a directory" in error_line(result)
  workdirs = {"new": str(tmp_path / "new"), "resumed": copy_of(reference, tmp_path)}
  os.makedirs(workdirs["new"])
  frozen = []
  try:
    for path in workdirs.values():
      if subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("chattr +i (an immutable folder, read-only even for root) is not "
                    "supported on this filesystem")
      frozen.append(path)
    for name, flags in (("new", ()), ("resumed", ()), ("resumed", ("--config.experiment=eval",))):
      result = run(env, config_file, workdirs[name], *flags)
      assert result.returncode == 2, (name, flags, result.stderr[-3000:])
      assert "cannot be written (Operation not permitted)" in error_line(result)
      assert "eval_loss" not in result.stdout  # refused before the work, not after it
  finally:
    for path in frozen:
      subprocess.run(["chattr", "-i", path], check=True)
  assert checkpoint_dirs(workdirs["resumed"]) == ["12", "4", "8"]


@contextlib.contextmanager
def small_disk(path, size):
  os.makedirs(path)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN) to fill a disk")
  try:
    yield
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_during_a_save_is_one_line_and_recovers_exactly(env, config_file, reference,
                                                                 tmp_path):
  disk = tmp_path / "disk"
  with small_disk(disk, "900k"):  # one checkpoint (~570 KB) fits, the second does not
    result = run(env, config_file, str(disk / "run"))
    saved = tmp_path / "saved"
    shutil.copytree(disk / "run", saved, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
  assert result.returncode == 4, result.stderr[-3000:]
  line = error_line(result)
  assert "No space left on device" in line and "step 4 is the newest complete one" in line, line
  assert checkpoint_dirs(str(saved)) == ["4"]
  resumed = run(env, config_file, str(saved))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stdout
  assert_same_run(str(saved), reference)


def test_environment_and_config_file_problems_are_one_line(env, config_file, tmp_path):
  a_file = tmp_path / "cache"
  a_file.write_text("")
  result = run(dict(env, JAX_COMPILATION_CACHE_DIR=str(a_file)), config_file,
               str(tmp_path / "run"))
  assert result.returncode == 2
  assert "JAX_COMPILATION_CACHE_DIR=" in error_line(result)
  none = tmp_path / "none.py"
  none.write_text("def get_config(arg=None):\n  return None\n")
  result = run(env, str(none), str(tmp_path / "run"))
  assert result.returncode == 2
  assert "get_config() returned None; it must return a ConfigDict" in error_line(result)
  result = run(env, config_file, str(tmp_path / "run"), "--no_such_flag=1")
  assert result.returncode == 2
  assert error_line(result).startswith("error: --no_such_flag: unknown flag; experiments.run "
                                       "takes --config, --workdir")
  assert not (tmp_path / "run").exists()


def test_lock_that_is_a_folder_and_a_token_cache_that_is_a_file_are_one_line(env, config_file,
                                                                           tmp_path):
  workdir = tmp_path / "run"
  os.makedirs(workdir / ".lock")
  result = run(env, config_file, str(workdir))
  assert result.returncode == 2
  assert error_line(result) == (f"error: {workdir / '.lock'}: is a directory, not a lock file; "
                                "remove it (the run makes its own) and rerun")
  text = tmp_path / "text.txt"
  text.write_text("some text to tokenize " * 200)
  a_file = tmp_path / "cache"
  a_file.write_text("")
  result = run(dict(env, MOE_JAX_CACHE=str(a_file)),
               f"{config_file}:data.source='text';data.path={str(text)!r}",
               str(tmp_path / "other"))
  assert result.returncode == 2
  assert error_line(result).startswith(f"error: MOE_JAX_CACHE={str(a_file)!r}: {a_file} is a "
                                       "file; the cache must be a directory")
  assert not (tmp_path / "other").exists()


def test_ctrl_c_saves_the_step_like_sigterm(env, config_file, tmp_path):
  workdir = str(tmp_path / "run")
  returncode, stdout, stderr = signal_endless_run(env, config_file, workdir, signal.SIGINT,
                                                  records=2)
  assert returncode == 130
  last = train_records(workdir)[-1]["step"]
  assert error_line(stderr).startswith(f"error: SIGINT: stopped after saving step {last} in ")
  assert f"SIGINT: saved step {last}" in stdout
  assert checkpoint_dirs(workdir) == [str(last)]
  assert int(checkpoint.read_numpy(os.path.join(workdir, "checkpoints"), last)["step"]) == last


def test_a_swallowed_ctrl_c_during_start_up_still_stops_the_run(monkeypatch):
  # Where it is swallowed for real: raised inside a garbage-collector callback (jax has one),
  # Python prints "Exception ignored in" and goes on.
  from moe_jax import ctrl_c
  monkeypatch.setattr(ctrl_c, "_pressed", [])
  monkeypatch.setattr(ctrl_c, "_armed", [])
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  reported = []

  def press(phase, info):
    del info
    if phase == "start":
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)  # the handler runs here, inside the callback

  sys.unraisablehook = lambda u: reported.append(u.exc_type)
  old = signal.getsignal(signal.SIGINT)
  try:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c.catch()
    os.kill(os.getpid(), signal.SIGINT)  # while the entry point imports: only remembered
    time.sleep(0.1)
    with pytest.raises(KeyboardInterrupt):
      ctrl_c.arm()  # where the entry point reports it in one line
    ctrl_c._pressed.clear()  # pylint: disable=protected-access
    gc.callbacks.append(press)
    gc.collect()
    with pytest.raises(KeyboardInterrupt):
      ctrl_c.raise_if_pressed()
    assert reported == []  # no "Exception ignored" traceback for the remembered one
  finally:
    signal.signal(signal.SIGINT, old)
    if press in gc.callbacks:
      gc.callbacks.remove(press)


# preexec_fn makes subprocess fork rather than spawn; Python 3.12 warns about forking a process
# with threads (JAX's). The child only resets a signal before exec, which takes no lock.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_ctrl_c_before_training_is_one_line(env, config_file, tmp_path):
  # The endless variant: with a warm compilation cache the 12-step run could end within the 3 s
  # (exit 0) before the signal came.
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--config={config_file}:{ENDLESS}",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      # As from a terminal. Under `/usr/bin/time pytest` (GNU time ignores SIGINT and SIGQUIT)
      # the run inherits the ignoring and rightly keeps it: this test then timed out.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  time.sleep(3)  # importing JAX and building the setup
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130
  line = error_line(stderr)
  assert "Ctrl-C" in line or "SIGINT" in line, line


def test_train_steps_below_the_checkpoint_and_extra_checkpoints(env, config_file, reference,
                                                                tmp_path):
  workdir = copy_of(reference, tmp_path)
  result = run(env, config_file, workdir, "--config.train.steps=8")
  assert result.returncode == 2
  assert error_line(result).startswith("error: train.steps=8: the run in ")
  assert "already at step 12" in error_line(result)
  # A kill between the final save and orbax's clean-up leaves one checkpoint too many.
  shutil.copytree(os.path.join(workdir, "checkpoints", "4"),
                  os.path.join(workdir, "checkpoints", "0"))
  result = run(env, config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "is complete at step 12" in result.stdout
  assert checkpoint_dirs(workdir) == ["12", "4", "8"]
  assert_same_run(workdir, reference)


def test_run_that_diverges_before_its_first_checkpoint_says_there_is_none(env, config_file,
                                                                          tmp_path):
  workdir = str(tmp_path / "run")
  result = run(env, f"{config_file}:train.inject_nan_at_steps=(0,1,2)", workdir)
  assert result.returncode == 3
  line = error_line(result)
  assert line.startswith("error: stopped at step 3: loss, gradient or update not finite"), line
  assert "no checkpoint was saved before it (train.checkpoint_every=4)" in line
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_a_killed_process_ends_its_peer_in_one_line_and_the_rerun_resumes(env, config_file,
                                                                         tmp_path):
  """kill -9 of one process of a two-process run: the other exits within a minute, with one
  line naming the dead process and the last good checkpoint (not JAX's C++ abort); both rerun
  and resume from that checkpoint."""
  workdir = str(tmp_path / "run")

  def start(i, port, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--config={config_file}:{ENDLESS}",
         "--config.mesh.data=8", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", *flags], cwd=REPO,
        env=dict(env, XLA_FLAGS=multihost.xla_flags(4)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)

  port = multihost.free_port()
  procs = [start(i, port, "--config.train.checkpoint_every=2") for i in (0, 1)]
  try:
    deadline = time.monotonic() + 300
    while len(train_records(workdir)) < 5:
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
      time.sleep(0.2)
    procs[1].kill()
    killed = time.monotonic()
    _, stderr = procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  assert procs[0].returncode == 5 and waited < 60, (waited, stderr[-3000:])
  line = error_line(stderr)
  good = re.search(r"the last good checkpoint is step (\d+) in ", line)
  assert line.startswith("error: process 1 of 2 stopped (no heartbeat for 30 s") and good, line
  port = multihost.free_port()
  steps = int(good.group(1)) + 2
  procs = [start(i, port, f"--config.train.steps={steps}") for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
  assert f"resumed from step {good.group(1)}" in outs[0][0]
  assert train_records(workdir)[-1]["step"] == steps


def test_readme_two_process_example_runs_as_written(env, tmp_path):
  """The README's example, with a short run and its own workdir and port appended."""
  readme = (REPO / "README.md").read_text().splitlines()
  start = next(i for i, l in enumerate(readme) if l.strip().startswith("export JAX_PLATFORMS="))
  end = next(i for i in range(start, len(readme)) if readme[i].strip() == "done; wait")
  block = "\n".join(l[4:] for l in readme[start:end + 1])
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  short = (f"--config.train.steps=2 --config.train.eval_every=2 --config.train.eval_batches=1 "
           f"--workdir={tmp_path / 'run'}")
  block = block.replace("--config.moe.parallelism=alltoall",
                        f"--config.moe.parallelism=alltoall {short}").replace("12355", str(port))
  assert short in block, block
  result = subprocess.run(["bash", "-c", block], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = train_records(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [2]  # log_every 10: the last step only
  assert "2 process(es), 8 devices (cpu)" in result.stdout
