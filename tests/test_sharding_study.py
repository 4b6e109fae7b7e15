"""The sharding study: its table on a tiny model, the exact state bytes, the depth extrapolation."""
import csv
import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from experiments import sharding_study as study
from moe_jax import config, model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_file(arg=None):
  spec = importlib.util.spec_from_file_location("sharding_study_config",
                                                ROOT / "configs" / "sharding_study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny(**model_overrides) -> config.ExperimentConfig:
  """The study config shrunk so that a training step compiles in seconds."""
  c = _config_file()
  c.model.embed_dim, c.model.num_layers, c.model.dense_ffn_dim = 32, 2, 64
  c.model.kv_lora_rank, c.model.qk_nope_head_dim, c.model.qk_rope_head_dim = 16, 8, 4
  c.model.v_head_dim = 8
  c.moe.expert_ffn_dim = 16
  c.train.batch_size, c.train.seq_len = 8, 16
  for key, value in model_overrides.items():
    setattr(c.model, key, value)
  return config.from_config_dict(c)


def test_table_of_two_meshes(tmp_path):
  cfg = _tiny()
  devices = study.study_devices(8)
  rows = []
  for mesh in (config.MeshConfig(expert=8), config.MeshConfig(data=8)):
    rows += study.study_mesh(cfg, mesh, devices)
  expert, data = rows
  assert [r["source"] for r in rows] == ["measured", "measured"]
  for r in rows:
    for key in ("param_opt_bytes", "peak_bytes", "flops", "all-reduce"):
      assert r[key] > 0, (r["mesh"], key)
    assert r["peak_bytes"] >= r["param_opt_bytes"]  # the state is an argument of the step
  # Experts split 8 ways hold less state per device; tokens must then cross devices.
  assert expert["param_opt_bytes"] < data["param_opt_bytes"]
  assert expert["all-to-all"] >= expert["a2a_min_step_bytes"] > 0
  assert expert["a2a_ratio"] >= 1
  assert data["all-to-all"] == data["a2a_min_step_bytes"] == 0 and data["a2a_ratio"] is None

  text = study.write_outputs(cfg, rows, str(tmp_path))
  assert "| 1x1x1x8x1 |" in text and "| 8x1x1x1x1 |" in text
  with open(tmp_path / "table.csv") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == study.COLUMNS
  assert [r["mesh"] for r in table] == ["1x1x1x8x1", "8x1x1x1x1"]
  assert int(table[1]["all-to-all"]) == 0 and float(table[0]["flops"]) > 0
  assert (tmp_path / "plot.png").stat().st_size > 10_000
  assert (tmp_path / "table.md").read_text().startswith("| mesh")


def test_state_bytes_are_exact_for_any_mesh():
  cfg = _tiny()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg.model, cfg.moe))[0]
  sizes = {jax.tree_util.keystr(p): leaf.size for p, leaf in
           jax.tree_util.tree_flatten_with_path(params)[0]}
  total = sum(sizes.values())
  expert_params = sum(n for path, n in sizes.items() if "experts" in path)
  bias = (cfg.model.num_layers - cfg.model.first_k_dense) * cfg.moe.num_experts
  # float32 parameters, two float32 Adam moments and Adam's int32 count; router biases.
  assert study.state_bytes(cfg, config.MeshConfig(data=8)) == 3 * 4 * total + 4 * bias + 4
  # An abstract mesh of 2048 devices: expert weights split 8 ways, the rest replicated.
  split = study.state_bytes(cfg, config.MeshConfig(data=256, expert=8))
  assert split == 3 * 4 * (total - expert_params + expert_params // 8) + 4 * bias + 4


def test_extrapolation_is_linear_in_dense_and_moe_blocks():
  truth = lambda d, m: {k: 100 + 7 * d + 13 * m for k in study.FITTED}
  cfg = _tiny(num_layers=61, first_k_dense=3)
  blocks = study.slice_blocks(cfg)
  assert blocks == [(1, 1), (2, 1), (1, 2)]
  fit = study.extrapolate([truth(*b) for b in blocks], blocks, (3, 58))
  assert fit == pytest.approx(truth(3, 58))
  # An all-MoE model varies only the MoE blocks.
  assert study.slice_blocks(_tiny(num_layers=8, first_k_dense=0)) == [(0, 1), (0, 2)]
  # Pipelined, MoE blocks come one per stage: the slices hold 4 and 8 on 4 stages.
  piped = dataclasses.replace(_tiny(num_layers=10, first_k_dense=2),
                              mesh=config.MeshConfig(stage=4, fsdp=2))
  assert study.slice_blocks(piped) == [(1, 4), (2, 4), (1, 8)]


@pytest.mark.parametrize("arg", ["v3_671b", "v3_671b_fsdp", "v3_671b_fsdp_tp", "v3_671b_pp"])
def test_v3_layouts_are_2048_gpus_with_expert_parallelism_64(arg):
  cfg = config.from_config_dict(_config_file(arg))
  assert cfg.mesh.size == 2048 and cfg.mesh.expert == 64
  # One 4096-token sequence per token shard: the micro-batch every layout is measured at.
  tokens = cfg.mesh.size // cfg.mesh.tensor // cfg.mesh.stage
  assert cfg.train.batch_size == tokens * cfg.train.microbatches and cfg.train.seq_len == 4096
  assert cfg.model.remat == (cfg.mesh.fsdp > 1)


def test_notes_say_whether_a_simulated_layout_fits_80_gb():
  cfg = _tiny()
  row = dict.fromkeys(study.COLUMNS, 0)
  row.update(mesh="1x4x64x8", devices=2048, source="extrapolated", a2a_ratio=None,
             accum_bytes=5 * 10**9)
  fits = lambda peak: [line for line in study.notes(cfg, [dict(row, peak_bytes=peak)])
                       if "GPU" in line]
  assert fits(70 * 10**9) == ["1x4x64x8: 69.8 GiB per device with the accumulator (75.0 GB): "
                              "fits a GPU of 80 GB."]
  assert "does not fit" in fits(80 * 10**9)[0]
  grid = study.notes(cfg, [dict(row, devices=8, peak_bytes=1)])  # a grid row: no such line
  assert not [line for line in grid if "GPU" in line]


def test_compile_mesh_shrinks_only_the_data_axis():
  assert study.compile_mesh(config.MeshConfig(data=32, expert=64)) == config.MeshConfig(
      data=2, expert=64)
  assert study.compile_mesh(config.MeshConfig(data=2, expert=4)) == config.MeshConfig(
      data=2, expert=4)
  # fsdp, expert and tensor set each device's shards: compiled whole, the data axis gives way.
  assert study.compile_mesh(config.MeshConfig(data=2, fsdp=32, expert=64)) == config.MeshConfig(
      fsdp=32, expert=64)
  with pytest.raises(config.ConfigError, match="at most"):
    study.compile_mesh(config.MeshConfig(expert=4096))


@pytest.mark.slow
def test_slices_extrapolate_to_the_compiled_model():
  """Slices of a 4-block model, scaled to its depth, against compiling it whole."""
  cfg = _tiny(num_layers=4, first_k_dense=2)
  devices = study.study_devices(8)
  mesh = config.MeshConfig(data=2, expert=4)
  whole = study.study_mesh(cfg, mesh, devices)[0]
  study.MAX_COMPILED_LAYERS, old = 2, study.MAX_COMPILED_LAYERS
  try:
    *slices, fit = study.study_mesh(cfg, mesh, devices)
  finally:
    study.MAX_COMPILED_LAYERS = old
  assert len(slices) == 3 and fit["source"].startswith("extrapolated")
  assert fit["param_opt_bytes"] == whole["param_opt_bytes"]
  for key in ("flops", "all-to-all", "all-reduce"):
    assert fit[key] == pytest.approx(whole[key], rel=0.02), key
  assert fit["peak_bytes"] == pytest.approx(whole["peak_bytes"], rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["", ":v3_671b"])
def test_the_study_from_the_command_line(tmp_path, arg):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the study fakes its devices
  out = subprocess.run([sys.executable, "-m", "experiments.run",
                        f"--config=configs/sharding_study.py{arg}", f"--workdir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| mesh" in out.stdout
  for name in ("table.md", "table.csv", "plot.png"):
    assert (tmp_path / name).exists()
  with open(tmp_path / "table.csv") as f:
    rows = list(csv.DictReader(f))
  if arg:
    assert rows[-1]["source"].startswith("extrapolated") and rows[-1]["devices"] == "2048"
    assert float(rows[-1]["all-to-all"]) > float(rows[-1]["a2a_min_step_bytes"]) > 0
  else:
    assert len(rows) == len(study.GRID)
    by_mesh = {r["mesh"]: r for r in rows}
    assert int(by_mesh["8x1x1x1"]["all-to-all"]) == 0
    assert int(by_mesh["1x1x8x1"]["all-to-all"]) > 0


def test_pipelined_mesh_counts_its_permutes_and_bubble():
  """stage 2 x expert 4: the pipeline's collective-permutes are counted once per tick, at least
  its floor; the all-to-all (inside the ticks' loop) at least its own."""
  c = _config_file()
  c.model.embed_dim, c.model.num_layers, c.model.dense_ffn_dim = 32, 3, 64
  c.model.kv_lora_rank, c.model.qk_nope_head_dim, c.model.qk_rope_head_dim = 16, 8, 4
  c.model.v_head_dim, c.moe.expert_ffn_dim = 8, 16
  c.train.batch_size, c.train.seq_len, c.train.microbatches = 8, 16, 2
  cfg = config.from_config_dict(c)
  (row,) = study.study_mesh(cfg, config.MeshConfig(stage=2, expert=4), study.study_devices(8))
  assert row["bubble"] == pytest.approx(1 / 3) and row["accum_bytes"] == 0
  assert row["collective-permute"] >= row["permute_min_step_bytes"] > 0
  assert row["all-to-all"] >= row["a2a_min_step_bytes"] > 0


def test_loop_bodies_count_once_per_trip():
  hlo = """HloModule m

%body (p: f32[4]) -> f32[4] {
  %p = f32[4] parameter(0)
  ROOT %cp = f32[4]{0} collective-permute(%p), source_target_pairs={{0,1},{1,0}}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %w = f32[4] while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %ar = f32[4]{0} all-reduce(%w), replica_groups={{0,1}}, to_apply=%add
}
"""
  got = study.looped_collective_bytes(hlo)
  assert got["collective-permute"] == 5 * 16 and got["all-reduce"] == 16
