"""Checkpointer: sharded save, restore onto another mesh, damaged and incomplete checkpoints."""
import os

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
