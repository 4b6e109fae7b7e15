"""The expert-parallel MoE layer across two processes (4 CPU devices each, gloo over loopback)
gives the single-device layer's outputs, load and gradients."""
import numpy as np

import multihost

# Each process builds the same inputs from fixed seeds, computes the single-device reference on
# one local device, then the parallel layer over all 8 global devices, gathers the parallel
# results to the host and prints both. The meshes put a process boundary inside the expert axis
# (expert=8: the all-to-all crosses processes) or on the data axis (data=2 x expert=4).
_WORKER = """
import json
import numpy as np
from moe_jax import distributed

distributed.initialize()
import dataclasses
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from moe_jax import moe, sharding
from moe_jax.config import MeshConfig, MoEConfig

jax.config.update("jax_numpy_rank_promotion", "raise")
CFG = MoEConfig(embed_dim=16, num_experts=8, top_k=2, expert_ffn_dim=8, num_shared_experts=1,
                n_groups=2, topk_groups=2)
CASES = (("alltoall", dict(expert=8)), ("alltoall", dict(data=2, expert=4)),
         ("gshard", dict(expert=8)))
PARAM_NAMES = {"router": {"kernel": (None, None)},
               "experts": {"gate": ("experts", None, "expert_mlp"),
                           "up": ("experts", None, "expert_mlp"),
                           "down": ("experts", "expert_mlp", None)},
               "shared": {"gate": (None, "mlp"), "up": (None, "mlp"), "down": ("mlp", None)}}

params, _ = moe.init(jax.random.PRNGKey(0), CFG)
params = jax.tree.map(np.asarray, params)
rng = np.random.RandomState(1)
state = {"router_bias": (0.1 * rng.randn(CFG.num_experts)).astype(np.float32)}
x = rng.randn(8, 5, CFG.embed_dim).astype(np.float32)


def step(cfg):
  def loss(p, x):
    y, aux = moe.apply(p, state, x, cfg)
    return jnp.sum(jnp.sin(y)), (y, aux["load"])
  (_, (y, load)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      params_in, x_in)
  return {"y": y, "load": load, "grad_params": grads[0], "grad_x": grads[1]}


def host(tree):
  return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


params_in, x_in = params, x  # the reference: plain host arrays on one local device
out = {"process": jax.process_index(), "devices": jax.device_count(),
       "reference": host(step(CFG))}
for parallelism, shape in CASES:
  mesh = sharding.make_mesh(MeshConfig(**shape))
  names = ("batch", None, None)
  x_in = sharding.global_array(x[sharding.process_rows(mesh, names, x.shape)], mesh, names)
  # Every process holds all parameters; each global array takes the blocks its devices own.
  params_in = jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx]),
      params, sharding.shard_like(PARAM_NAMES, mesh))
  with jax.set_mesh(mesh):
    result = step(dataclasses.replace(CFG, parallelism=parallelism))
  out[parallelism + ":" + "x".join(f"{k}={v}" for k, v in shape.items())] = host(
      multihost_utils.process_allgather(result, tiled=True))
print("RESULT " + json.dumps(out))
"""


def _assert_tree_close(actual, expected, name):
  if isinstance(expected, dict):
    assert set(actual) == set(expected), name
    for key in expected:
      _assert_tree_close(actual[key], expected[key], f"{name}/{key}")
  else:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_two_processes_match_one_device():
  outs = [multihost.results(out) for out in multihost.run_processes(
      _WORKER, num_processes=2, devices_per_process=4, timeout=100)]
  assert [len(r) for r in outs] == [1, 1]
  results = [r[0] for r in outs]
  assert [(r["process"], r["devices"]) for r in results] == [(0, 8), (1, 8)]
  cases = {"alltoall:expert=8", "alltoall:data=2xexpert=4", "gshard:expert=8"}
  for result in results:
    assert set(result) == {"process", "devices", "reference"} | cases
    reference = result["reference"]
    assert np.abs(np.asarray(reference["y"])).max() > 0  # a live layer, not all zeros
    for case in sorted(cases):
      _assert_tree_close(result[case], reference, case)
  # Both processes saw the same reference inputs, so the same single-device result.
  _assert_tree_close(results[1]["reference"], results[0]["reference"], "reference")
