"""The expert-parallel MoE layers on the 8-device CPU mesh equal the single-device layer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import moe, sharding
from moe_jax.config import MeshConfig, MoEConfig

MESHES = {"1x8": dict(data=1, expert=8), "2x4": dict(data=2, expert=4),
          "4x2": dict(data=4, expert=2), "8x1": dict(data=8, expert=1),
          "2x2x2_tensor": dict(data=2, expert=2, tensor=2)}
CFG = MoEConfig(embed_dim=16, num_experts=8, top_k=2, expert_ffn_dim=8, num_shared_experts=1,
                n_groups=2, topk_groups=2)


def setup(cfg, skew=False):
  params, _ = moe.init(jax.random.PRNGKey(0), cfg)
  kb, kx = jax.random.split(jax.random.PRNGKey(1))
  bias = 0.1 * jax.random.normal(kb, (cfg.num_experts,))
  if skew:  # nearly every token picks expert 0: the worst case for static buffers
    bias = bias.at[0].add(10.0)
  x = jax.random.normal(kx, (8, 5, cfg.embed_dim))
  return params, {"router_bias": bias}, x


def run(cfg, params, state, x):
  loss = lambda p, x: jnp.sum(jnp.sin(moe.apply(p, state, x, cfg)[0]))
  y, aux = jax.jit(lambda p, x: moe.apply(p, state, x, cfg))(params, x)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  return y, aux, grads


def check_same(par, ref):
  y, aux, grads = par
  y_ref, aux_ref, grads_ref = ref
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for key in ("load", "aux_loss", "seq_aux_loss", "z_loss", "dropped_fraction", "max_vio"):
    np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               grads_ref)


@pytest.mark.parametrize("parallelism", ["alltoall", "gshard"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_parallel_equals_single_device(mesh_name, parallelism):
  params, state, x = setup(CFG)
  ref = run(CFG, params, state, x)
  mesh = sharding.make_mesh(MeshConfig(**MESHES[mesh_name]))
  with jax.set_mesh(mesh):
    par = run(dataclasses.replace(CFG, parallelism=parallelism), params, state, x)
  check_same(par, ref)
  assert float(par[1]["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("parallelism", ["alltoall", "gshard"])
def test_skewed_router_stays_dropless(parallelism):
  params, state, x = setup(CFG, skew=True)
  ref = run(CFG, params, state, x)
  assert float(ref[1]["max_vio"]) >= 3  # expert 0 has every token: 4x the mean load
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=8))):
    par = run(dataclasses.replace(CFG, parallelism=parallelism), params, state, x)
  check_same(par, ref)
  assert float(par[1]["dropped_fraction"]) == 0.0


def test_alltoall_capacity_counts_drops():
  cfg = dataclasses.replace(CFG, parallelism="alltoall", capacity_factor=1.0)
  params, state, x = setup(cfg, skew=True)
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=8))):
    _, aux = jax.jit(lambda p, x: moe.apply(p, state, x, cfg))(params, x)
  # Each shard has 5 tokens x 2 slots and buckets of ceil(10 / 8) = 2 rows per destination;
  # every token sends one assignment to expert 0's shard, so 3 of each shard's 10 drop at least.
  assert float(aux["dropped_fraction"]) >= 0.3


def test_needs_a_mesh_and_divisible_shapes():
  cfg = dataclasses.replace(CFG, parallelism="alltoall")
  params, state, x = setup(cfg)
  with pytest.raises(ValueError, match="needs a device mesh"):
    moe.apply(params, state, x, cfg)
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=8))):
    with pytest.raises(ValueError, match="must split evenly over the 8 token shards"):
      moe.apply(params, state, x[:3], cfg)
