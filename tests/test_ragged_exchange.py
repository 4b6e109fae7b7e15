"""The ragged expert exchange (lax.ragged_all_to_all, GPU/TPU) against the padded one: on CPU
through an emulation of the op, and its lowering for CUDA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import moe, sharding
from moe_jax.config import MeshConfig
from moe_jax.moe import parallel

from test_moe_parallel import CFG, check_same, run, setup


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """lax.ragged_all_to_all as its docstring defines it, from all_gathers (one slice per peer):
  slice j of peer i, operand_i[in_off_i[j]:][:sizes_i[j]], lands on peer j at out_off_i[j]."""
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  operands, in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name) for a in (
      operand, input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  for i in range(operands.shape[0]):
    start, n, src = out_off[i, me], sizes[i, me], in_off[i, me]
    mask = (rows >= start) & (rows < start + n)
    taken = jnp.take(operands[i], jnp.clip(src + rows - start, 0, operand.shape[0] - 1), axis=0)
    output = jnp.where(mask.reshape((-1,) + (1,) * (output.ndim - 1)), taken, output)
  return output


@pytest.fixture
def emulated(monkeypatch):
  monkeypatch.setattr(parallel, "RAGGED_ALL_TO_ALL", emulated_ragged_all_to_all)


@pytest.mark.parametrize("mesh, skew", [(dict(expert=8), False), (dict(data=2, expert=4), True),
                                        (dict(expert=4, tensor=2), False)])
def test_ragged_exchange_equals_padded(emulated, mesh, skew):
  """Outputs, statistics and gradients of the ragged layer equal the padded layer's."""
  cfg = dataclasses.replace(CFG, parallelism="alltoall")
  params, state, x = setup(cfg, skew=skew)
  with jax.set_mesh(sharding.make_mesh(MeshConfig(**mesh))):
    padded = run(dataclasses.replace(cfg, exchange="padded"), params, state, x)
    ragged = run(dataclasses.replace(cfg, exchange="ragged"), params, state, x)
  check_same(ragged, padded)


def test_auto_exchange_is_padded_on_cpu():
  assert parallel.resolve_exchange("auto") == ("padded" if jax.default_backend() == "cpu"
                                               else "ragged")


def test_ragged_exchange_lowers_for_cuda():
  """jax.export for platform cuda: the forward and backward carry ragged-all-to-all."""
  cfg = dataclasses.replace(CFG, parallelism="alltoall", exchange="ragged")
  params, state, x = setup(cfg)
  mesh = sharding.make_mesh(MeshConfig(expert=8))
  loss = lambda p, x: jnp.sum(moe.apply(p, state, x, cfg)[0])
  # The op lowers to a custom call without export's compatibility guarantee: allowed by name.
  allow = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
  with jax.set_mesh(mesh):
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda"],
                                 disabled_checks=allow)(params, x)
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",)
  # one exchange out, one back, and the expert ids, in the forward; two in the backward
  assert text.count("custom_call @ragged_all_to_all") >= 4, text
