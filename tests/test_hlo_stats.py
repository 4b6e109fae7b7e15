"""Collective bytes read from optimized HLO match what a tiny shard_map program moves."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import hlo_stats, sharding
from moe_jax.config import MeshConfig


def test_counts_each_collective_of_a_shard_map():
  mesh = sharding.make_mesh(MeshConfig(expert=8))
  axis = sharding.EXPERT_AXIS

  def body(a_16x4):  # one device's block: 16 x 4 float32 = 256 bytes
    b = jax.lax.all_to_all(a_16x4, axis, 0, 0, tiled=True)                   # 256
    c = jax.lax.psum(b * 2, axis)                                             # 256
    d = jax.lax.all_gather(c, axis, tiled=True)                               # 8 x 256
    e = jax.lax.psum_scatter(d, axis, tiled=True)                             # 256
    f = jax.lax.ppermute(e, axis, [(i, (i + 1) % 8) for i in range(8)])       # 256
    # int32, not bf16: XLA:CPU runs 16-bit collectives in f32 (converts around them).
    g = jax.lax.all_to_all(f.astype(jnp.int32)[:8], axis, 0, 0, tiled=True)  # 128
    return g

  spec = P(axis)
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct((128, 4), jnp.float32, sharding=jax.NamedSharding(mesh, spec))
  compiled = fn.lower(x).compile()
  expected = {"all-to-all": 256 + 128, "all-reduce": 256, "all-gather": 8 * 256,
              "reduce-scatter": 256, "collective-permute": 256, "ragged-all-to-all": 0}
  assert hlo_stats.collective_bytes(compiled) == expected
  assert hlo_stats.collective_bytes(compiled.as_text()) == expected
  assert sorted(op.nbytes for op in hlo_stats.collective_ops(compiled)
                if op.kind == "all-to-all") == [128, 256]


def test_a_psum_over_a_size_one_axis_moves_nothing():
  mesh = sharding.make_mesh(MeshConfig(data=8))
  body = lambda a: jax.lax.psum(a * 2, sharding.TENSOR_AXIS)  # tensor has size 1
  spec = P(sharding.DATA_AXIS)
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct((64, 4), jnp.float32, sharding=jax.NamedSharding(mesh, spec))
  compiled = fn.lower(x).compile()
  assert hlo_stats.collective_bytes(compiled)["all-reduce"] == 0
  # XLA:CPU keeps the op (with one-device groups); it is listed, flagged trivial.
  assert all(op.trivial for op in hlo_stats.collective_ops(compiled))


def test_no_collectives_on_one_device():
  compiled = jax.jit(lambda x: x * 2).lower(jnp.ones((4, 4))).compile()
  assert set(hlo_stats.collective_bytes(compiled).values()) == {0}


_ASYNC_HLO = """
ENTRY %main (p: f32[8,4]) -> f32[64,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %ags = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(%p), dimensions={0}
  %agd = f32[64,4]{1,0} all-gather-done(%ags)
  %ars = bf16[8]{0} all-reduce-start(%x), to_apply=%add
  %ard = bf16[8]{0} all-reduce-done(%ars)
  %one = f32[8]{0} all-reduce-start(%x), replica_groups={{0},{1}}, to_apply=%add
  %one_done = f32[8]{0} all-reduce-done(%one)
  %iota = f32[8]{0} all-reduce(%x), replica_groups=[2,1]<=[2], to_apply=%add
  %pairs = f32[8]{0} all-reduce(%x), replica_groups=[1,2]<=[2], to_apply=%add
  %axis1 = f32[8]{0} all-reduce(%x), replica_groups=mesh['a'=2,'b'=1] {'b'}, to_apply=%add
  %axis0 = f32[2]{0} all-reduce(%x), replica_groups=mesh['a'=2,'b'=1] {'a'}, to_apply=%add
  %cps = (pred[3]{0}, pred[3]{0}, u32[], u32[]) collective-permute-start(%y)
  %cpd = pred[3]{0} collective-permute-done(%cps)
  %a2a = (f32[1,4]{1,0}, /*index=1*/s32[2]{0}) all-to-all(%q, %r), replica_groups={{0,1}}
  ROOT %rag = f8e4m3fn[16,2]{1,0} ragged-all-to-all(%a, %b, %c, %d, %e, %f)
}
"""


def test_async_pairs_tuples_and_small_types_from_text():
  assert hlo_stats.collective_bytes(_ASYNC_HLO) == {
      "all-gather": 64 * 4 * 4, "all-reduce": 8 * 2 + 8 * 4 + 2 * 4, "collective-permute": 3,
      "all-to-all": 4 * 4 + 2 * 4, "reduce-scatter": 0, "ragged-all-to-all": 32}
  ops = hlo_stats.collective_ops(_ASYNC_HLO)
  assert [op.kind for op in ops] == ["all-gather"] + ["all-reduce"] * 6 + [
      "collective-permute", "all-to-all", "ragged-all-to-all"]
  assert [op.trivial for op in ops if op.kind == "all-reduce"] == [
      False, True, True, False, True, False]


@pytest.mark.parametrize("shape,nbytes", [("f32[]", 4), ("s4[3]{0}", 2), ("f32[<=8,2]", 64),
                                          ("(bf16[2,3]{1,0}, token[])", 12)])
def test_shape_bytes(shape, nbytes):
  assert hlo_stats.shape_bytes(shape) == nbytes
