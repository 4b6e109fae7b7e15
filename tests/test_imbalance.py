"""bench/imbalance.py's forced routers give the loads they promise, and dropless drops nothing."""
import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest

from moe_jax import moe, sharding
from moe_jax.config import MeshConfig, MoEConfig

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "imbalance.py")
_spec = importlib.util.spec_from_file_location("imbalance", _PATH)
imbalance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imbalance)

CFG = MoEConfig(embed_dim=16, num_experts=8, top_k=2, expert_ffn_dim=8, num_shared_experts=0,
                n_groups=4, topk_groups=2)
T, SEQ = 64, 8


def loads(pattern, cfg=CFG, call=0):
  params, state = moe.init(jax.random.key(0), cfg)
  params = imbalance.force_router(params, cfg)
  x = imbalance.forced_input(imbalance.logits_for(pattern, T, cfg, call=call), cfg, SEQ,
                             jax.random.key(1))
  _, aux = jax.jit(lambda p, x: moe.apply(p, state, x, cfg))(params, x)
  assert float(aux["dropped_fraction"]) == 0.0
  return np.asarray(aux["load"])


def test_patterns_route_as_intended():
  per_expert = T * CFG.top_k // CFG.num_experts
  np.testing.assert_array_equal(loads("uniform"), [per_expert] * 8)
  one = loads("one_expert")
  assert one[0] == T and one.sum() == T * CFG.top_k
  group = loads("one_group")  # group 0 = experts 0 and 1, every token takes both
  np.testing.assert_array_equal(group, [T, T] + [0] * 6)
  zipf = loads("zipf")
  ranking = np.random.default_rng(0).permutation(8)  # the pattern's ranking, rank 1 = hottest
  assert np.argmax(zipf) == np.argmin(ranking) and zipf.max() >= 2 * per_expert
  hots = [imbalance.hot_expert(i, CFG) for i in range(4)]
  assert len({h // CFG.experts_per_group for h in hots}) == 4  # each in another group
  for i, hot in enumerate(hots):
    assert loads("alternating", call=i)[hot] == T


@pytest.mark.parametrize("parallelism", ["alltoall", "gshard"])
def test_mesh_layers_route_the_same_and_stay_dropless(parallelism):
  cfg = dataclasses.replace(CFG, parallelism=parallelism)
  with jax.set_mesh(sharding.make_mesh(MeshConfig(expert=8))):
    np.testing.assert_array_equal(loads("one_group", cfg), loads("one_group"))


def test_bad_shapes_name_the_key():
  with pytest.raises(ValueError, match="embed_dim=4: the forced router needs"):
    imbalance.force_router({}, dataclasses.replace(CFG, embed_dim=4))
  with pytest.raises(ValueError, match="top_k=3: pattern one_group needs"):
    imbalance.logits_for("one_group", T, dataclasses.replace(CFG, top_k=3))
