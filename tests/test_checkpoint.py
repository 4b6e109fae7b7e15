"""Checkpointer: sharded save, restore onto another mesh, damaged and incomplete checkpoints."""
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import checkpoint


def _state(mesh):
  rows = NamedSharding(mesh, P(mesh.axis_names))  # dim 0 split over every device
  params = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), rows),
            "b": jnp.linspace(0.0, 1.0, 3)}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.int32(7), "rng": jax.random.key_data(jax.random.key(3))}


def _abstract(state, mesh, spec_for_rows):
  def leaf(x):
    spec = spec_for_rows if x.ndim == 2 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(leaf, state)


def _truncate_files(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_restore_onto_another_mesh(tmp_path):
  mesh8 = jax.make_mesh((8,), ("data",))
  state = _state(mesh8)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.save(1, state) and ckpt.save(2, state)
  assert not ckpt.save(2, state, wait=True)  # that step is already saved
  ckpt.save(3, state, wait=True)
  assert ckpt.steps() == [2, 3]  # keep=2
  mesh = jax.make_mesh((2, 4), ("x", "y"))
  restored, step = checkpoint.Checkpointer(str(tmp_path), keep=2).restore_latest(
      _abstract(state, mesh, P("y", "x")))
  assert step == 3
  assert restored["params"]["w"].sharding == NamedSharding(mesh, P("y", "x"))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()


def test_unreadable_checkpoint_is_reported_and_set_aside(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  state = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, state)
  ckpt.save(2, jax.tree.map(lambda x: x + 1, state), wait=True)
  _truncate_files(tmp_path / "2")
  # A save cut short leaves only a temporary directory: never a step.
  os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234567")
  reports = []
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  restored, step = ckpt.restore_latest(_abstract(state, mesh, P("data")), report=reports.append)
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  assert len(reports) == 1 and "\n" not in reports[0]
  assert reports[0].startswith("checkpoint step 2 in ") and "unreadable" in reports[0]
  assert (tmp_path / "2.unreadable").is_dir()  # kept, not deleted
  assert ckpt.steps() == [1]
  ckpt.save(2, state, wait=True)  # the step number is free again
  assert ckpt.steps() == [1, 2]
  ckpt.close()


def test_no_checkpoint_and_read_numpy(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  state = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  assert ckpt.restore_latest(_abstract(state, mesh, P("data"))) == (None, 0)
  ckpt.save(5, state, wait=True)
  ckpt.close()
  host = checkpoint.read_numpy(str(tmp_path), 5)
  assert isinstance(host["params"]["w"], np.ndarray)
  np.testing.assert_array_equal(host["params"]["w"], np.asarray(state["params"]["w"]))
  assert int(host["step"]) == 7


def _big_state(mesh, seed=0):
  """~6 MB of incompressible float32, its big matrix split over every device."""
  rows = NamedSharding(mesh, P(mesh.axis_names))
  rng = np.random.default_rng(seed)
  params = {"w": jax.device_put(rng.standard_normal((1024, 512), np.float32), rows),
            "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(seed)}


def _damage(path, offset, size=4096):
  """Flips every bit of up to `size` bytes from `offset` (moved back to fit in the file)."""
  length = os.path.getsize(path)
  offset, size = max(0, min(offset, length - size)), min(size, length)
  with open(path, "r+b") as f:
    f.seek(offset)
    block = f.read(size)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in block))
  return offset


def _offsets(length):
  return sorted({0, length // 4, length // 2, 800_000, length - 1} if length > 1 else {0})


def test_damage_anywhere_in_a_step_is_caught_and_the_previous_step_restored(tmp_path):
  """4 KB flipped at several offsets of every file of the newest step (offset 800,000 and a
  quarter of the way into the big data file among them): the checksums catch each, the step is
  set aside and the previous one comes back exactly."""
  mesh = jax.make_mesh((8,), ("data",))
  old, new = _big_state(mesh, 1), _big_state(mesh, 2)
  pristine = tmp_path / "pristine"
  ckpt = checkpoint.Checkpointer(str(pristine), keep=3)
  ckpt.save(1, old)
  ckpt.save(2, new, wait=True)
  ckpt.close()
  files = sorted(os.path.relpath(os.path.join(r, f), pristine / "2")
                 for r, _, fs in os.walk(pristine / "2") for f in fs)
  sizes = {f: os.path.getsize(pristine / "2" / f) for f in files}
  biggest = max(files, key=sizes.get)
  assert sizes[biggest] > 800_000 + 4096, sizes
  assert any(f.startswith("checksums.") for f in files)
  abstract = _abstract(old, mesh, P("data"))
  cases = 0
  for rel in files:
    for offset in _offsets(sizes[rel]):
      work = tmp_path / f"case{cases}"
      shutil.copytree(pristine, work)
      _damage(work / "2" / rel, offset)
      reports = []
      restored, step = checkpoint.Checkpointer(str(work), keep=3).restore_latest(
          abstract, report=reports.append)
      assert step == 1, (rel, offset, reports)
      assert len(reports) == 1 and reports[0].startswith("checkpoint step 2 in "), reports
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(old)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert sorted(os.listdir(work)) == ["1", "2.unreadable"]
      shutil.rmtree(work)
      cases += 1
  print(f"{cases} damaged copies over {len(files)} files, each caught")


def test_retention_never_deletes_the_newest_verified_step(tmp_path, monkeypatch):
  """Steps whose manifests never got written (a kill right after orbax finished them) do not
  push the newest verified step out; restored, such a step says it is unverified."""
  mesh = jax.make_mesh((8,), ("data",))
  state = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state)
  ckpt.save(2, state, wait=True)
  assert ckpt.last_good() == 2 and ckpt.verified(1)
  monkeypatch.setattr(checkpoint.manifest, "write", lambda *args: None)
  for step in (3, 4, 5):
    ckpt.save(step, state, wait=True)
  assert ckpt.steps() == [2, 4, 5] and ckpt.last_good() == 2
  ckpt.close()
  reports = []
  restored, step = checkpoint.Checkpointer(str(tmp_path), keep=2).restore_latest(
      _abstract(state, mesh, P("data")), report=reports.append)
  assert step == 5 and len(reports) == 1 and "restored unverified" in reports[0], reports


def test_a_cast_is_a_mismatch():
  """dtypes count as well as shapes: bfloat16 moments are not float32 ones."""
  stored = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)},
            "opt_state": [{}, {"mu": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}]}
  target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)},
            "opt_state": [{}, {"mu": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)}}]}
  assert checkpoint.mismatch(stored, stored) is None
  assert checkpoint.mismatch(stored, target) == (
      "opt_state[1]['mu']['w'] has dtype float32, the config needs bfloat16")


def test_stderr_filter_drops_only_the_closed_event_loop_tracebacks():
  out = io.StringIO()
  quiet = checkpoint._QuietClosedLoop(out)  # pylint: disable=protected-access
  dropped = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
             "RuntimeError: Event loop is closed\n")
  kept = ('Traceback (most recent call last):\n  File "serve.py", line 9, in load\n'
          "    zipfile.ZipFile(path)\nzipfile.BadZipFile: File is not a zip file\n")
  chained = ('Traceback (most recent call last):\n  File "a.py", line 2, in h\n'
             "KeyError: 'k'\n\nDuring handling of the above exception, another exception "
             'occurred:\n\nTraceback (most recent call last):\n  File "a.py", line 4, in h\n'
             "_private.Error\n")
  for text in (dropped, kept, "a line of ours\n", chained):
    quiet.write(text[:17])  # split anywhere, as another thread's writes may be
    quiet.write(text[17:])
  quiet.flush()
  assert out.getvalue() == kept + "a line of ours\n" + chained


def test_an_array_that_differs_from_its_digest_is_named(tmp_path):
  """The arrays' digests are checked too, onto another mesh as well: a manifest recording other
  values (the bytes on disk agree with it, the arrays do not) sets the step aside."""
  mesh = jax.make_mesh((8,), ("data",))
  state = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, state)
  ckpt.save(2, state, wait=True)
  ckpt.close()
  path = tmp_path / "2" / "checksums.0.json"
  recorded = json.loads(path.read_text())
  shards = recorded["arrays"]["['params']['w']"]
  assert sorted(shards) == sorted(f"{2 * i}:{2 * i + 2},0:4" for i in range(8))
  shards["6:8,0:4"] = "crc32:00000000"
  path.write_text(json.dumps(recorded))
  other = jax.make_mesh((2, 4), ("x", "y"))
  reports = []
  restored, step = checkpoint.Checkpointer(str(tmp_path), keep=3).restore_latest(
      _abstract(state, other, P("y", "x")), report=reports.append)
  assert step == 1 and len(reports) == 1, reports
  assert "array ['params']['w'][6:8,0:4] fails its checksum (recorded crc32:00000000" in reports[0]
