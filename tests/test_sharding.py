"""The mesh, the logical-axis rules and the sharded-equals-unsharded contract (8 fake devices)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from moe_jax import sharding
from moe_jax.config import MESH_AXES, ConfigError, MeshConfig

TOKENS = ("data", "stage", "fsdp", "expert")
PF = ("stage", "fsdp")  # parameters' model width: FSDP, and ZeRO over pipeline stages


def test_rules_table_is_valid():
  names = [name for name, _ in sharding.RULES]
  assert len(names) == len(set(names))
  for name in ("batch", "embed", "mlp", "experts", "heads", "kv_heads", "vocab", "q_lora",
               "kv_lora", "seq", "expert_mlp", "expert_embed"):
    assert name in names
  assert sharding.TOKEN_AXES == TOKENS
  assert (sharding.EXPERT_AXIS, sharding.TENSOR_AXIS) == ("expert", "tensor")


def test_check_rules_rejects_duplicates_and_unknown_axes():
  with pytest.raises(ValueError, match="'embed' appears twice"):
    sharding.check_rules([("embed", "fsdp"), ("mlp", "tensor"), ("embed", None)])
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.check_rules([("mlp", "model")])


@pytest.mark.parametrize("names, spec", [
    (("embed", "mlp"), P(PF, "tensor")),
    (("mlp", "embed"), P("tensor", PF)),
    (("vocab", "embed"), P("tensor", PF)),
    (("embed", "heads", "head_dim"), P(PF, "tensor", None)),
    (("kv_lora", "heads", None), P(None, "tensor", None)),
    (("experts", "expert_embed", "expert_mlp"), P("expert", PF, "tensor")),
    # Activations: batch, listed first, takes fsdp and expert from embed and experts.
    (("batch", "seq", "embed"), P(TOKENS, None, None)),
    (("embed", "batch"), P(None, TOKENS)),
    (("batch", "experts"), P(TOKENS, None)),
    (("batch", "seq", "vocab"), P(TOKENS, None, "tensor")),
    (("experts", "expert_tokens", "embed"), P("expert", ("data", "stage", "fsdp"), None)),
    # Stacked pipeline blocks: stage holds the stage dim, so embed (wanting stage too) gets none.
    (("stages", "layers", "embed"), P("stage", None, None)),
    ((), P()),
])
def test_logical_to_spec(names, spec):
  assert sharding.logical_to_spec(names) == spec
  assert sharding.logical_to_spec(P(*names)) == spec


def test_no_name_maps_to_the_stage_axis_inside_a_stage():
  with sharding.stage_local():
    assert sharding.logical_to_spec(("batch", "seq")) == P(("data", "fsdp", "expert"), None)
    assert sharding.token_axes() == ("data", "fsdp", "expert")
  assert sharding.token_axes() == TOKENS


def test_logical_to_spec_rejects_unknown_and_repeated_names():
  with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
    sharding.logical_to_spec(("batch", "embd"))
  with pytest.raises(ValueError, match="'mlp' names two dims"):
    sharding.logical_to_spec(("mlp", "mlp"))


@pytest.mark.parametrize("data, expert", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_make_mesh_data_by_expert(data, expert):
  mesh = sharding.make_mesh(MeshConfig(data=data, expert=expert))
  assert mesh.axis_names == MESH_AXES
  assert sharding.axis_sizes(mesh) == dict(data=data, stage=1, fsdp=1, expert=expert, tensor=1)
  assert mesh.axis_types == (AxisType.Auto,) * 5
  assert sharding.shard_count(mesh, "batch") == 8
  assert sharding.shard_count(mesh, "experts") == expert
  assert sharding.shard_count(mesh, "seq") == 1


@pytest.mark.parametrize("shape", [dict(data=2, expert=2, tensor=2),
                                   dict(fsdp=2, expert=2, tensor=2), dict(data=4, tensor=2)])
def test_make_mesh_with_tensor(shape):
  mesh = sharding.make_mesh(MeshConfig(**shape))
  assert sharding.axis_sizes(mesh) == {**dict(data=1, stage=1, fsdp=1, expert=1), **shape}
  assert sharding.shard_count(mesh, "batch") == 4
  assert sharding.shard_count(mesh, "mlp") == 2
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("shape", [dict(data=3), dict(data=2), dict(data=4, tensor=4)])
def test_mesh_product_must_equal_device_count(shape):
  # data=2 matters most: jax.make_mesh alone would quietly use 2 of the 8 devices.
  with pytest.raises(ConfigError, match=r"^mesh=") as err:
    sharding.make_mesh(MeshConfig(**shape))
  assert "\n" not in str(err.value) and "device count 8" in str(err.value)


def test_constrain_outside_a_mesh_is_identity_but_checks_names():
  x = jnp.ones((4, 3, 8))
  assert sharding.constrain(x, ("batch", "seq", "embed")) is x
  with pytest.raises(ValueError, match="unknown logical axis"):
    sharding.constrain(x, ("batch", "seq", "width"))
  with pytest.raises(ValueError, match="do not fit"):
    sharding.constrain(x, ("batch", "embed"))


def _block(x, w_in, w_out):
  """A ReLU MLP block, constrained where a layer would constrain it."""
  h = sharding.constrain(jax.nn.relu(jnp.einsum("bsd,dh->bsh", x, w_in)), ("batch", "seq", "mlp"))
  return sharding.constrain(jnp.einsum("bsh,hd->bsd", h, w_out), ("batch", "seq", "embed"))


@pytest.mark.parametrize("shape", [dict(data=2, expert=2, tensor=2),
                                   dict(fsdp=4, tensor=2), dict(expert=8)])
def test_sharded_jit_equals_unsharded(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4, 16)).astype(np.float32)
  w_in = rng.normal(size=(16, 32)).astype(np.float32)
  w_out = rng.normal(size=(32, 16)).astype(np.float32)
  expected = _block(x, w_in, w_out)

  mesh = sharding.make_mesh(MeshConfig(**shape))
  names = (("batch", "seq", "embed"), ("embed", "mlp"), ("mlp", "embed"))
  in_shardings = sharding.shard_like(names, mesh)
  with jax.set_mesh(mesh):
    step = jax.jit(_block, in_shardings=in_shardings, out_shardings=in_shardings[0])
    got = step(*(jax.device_put(a, s) for a, s in zip((x, w_in, w_out), in_shardings)))
  assert got.sharding.spec == P(TOKENS, None, None)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_constrain_inside_shard_map_keeps_only_automatic_axes():
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)

  def body(b):
    assert b.shape == (2, 6), b.shape
    return sharding.constrain(b * 2, ("batch", "mlp"))  # batch's axes are manual here

  with jax.set_mesh(mesh):
    f = jax.jit(jax.shard_map(body, in_specs=P(TOKENS), out_specs=P(TOKENS),
                              axis_names=set(sharding.TOKEN_AXES)))
    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), 2 * x)
    assert y.sharding.spec[1] == "tensor"  # the mlp -> tensor constraint survived
    full = jax.jit(jax.shard_map(body, in_specs=P(TOKENS), out_specs=P(TOKENS)))
    np.testing.assert_array_equal(np.asarray(full(x)), 2 * x)


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.02)
    w_in = self.param("w_in", nn.with_logical_partitioning(init, ("embed", "mlp")), (16, 32))
    w_out = self.param("w_out", nn.with_logical_partitioning(init, ("mlp", "embed")), (32, 16))
    scale = self.param("scale", nn.initializers.ones, (16,))  # unboxed: replicated
    return _block(x, w_in, w_out) * scale[None, None, :]


def test_param_shardings_from_boxed_flax_params():
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
  model = _Mlp()
  x = jnp.ones((8, 4, 16))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  assert sharding.logical_axes(abstract)["params"]["w_in"] == P("embed", "mlp")
  shardings = sharding.param_shardings(abstract, mesh)
  with jax.set_mesh(mesh):
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
  params = nn.unbox(variables)["params"]
  assert params["w_in"].sharding.spec == P(PF, "tensor")
  assert params["w_out"].sharding.spec == P("tensor", PF)
  assert params["scale"].sharding.spec == P()
  assert params["w_in"].addressable_shards[0].data.shape == (8, 16)


def test_process_rows_and_global_array_in_one_process():
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  assert sharding.process_rows(mesh, ("batch", None), x.shape) == slice(0, 8)
  g = sharding.global_array(x, mesh, ("batch", None))
  assert g.sharding.spec == P(TOKENS, None)
  np.testing.assert_array_equal(np.asarray(g), x)
