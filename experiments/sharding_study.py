"""experiment="sharding_study": per-device memory, FLOPs and collective bytes of a training step.

For each mesh it compiles (never runs) the real training step, `train.train_step` (value_and_grad
of `model.loss`, AdamW, router-bias update), with the state sharded by the model's logical axes,
and reads per device:
  param+opt    parameter + optimizer-state + router-bias bytes, from the shard shapes of the
               abstract state (jax.eval_shape: nothing is allocated, any model size works);
  peak         argument + output - aliased + temp bytes of `compiled.memory_analysis()` (XLA:CPU's
               own `peak_memory_in_bytes` counts little more than the arguments, so it is unused),
               compiled on CPU with the memory-optimized scheduler (CPU_COMPILER_OPTIONS);
  flops        `compiled.cost_analysis()["flops"]` (the program of one device). XLA counts a loop
               body once, and the `padded` grouped experts (the CPU default) loop over blocks, so
               their matmuls are all but missing there; hence also
  expert_flops the routed experts' useful training FLOPs per device, computed: 6 x 3 matrices x
               embed x expert_ffn / tensor x tokens per token shard x top_k x MoE blocks;
  grad acc     an f32 copy of the device's parameter shards, from shapes: the gradient accumulator
               a batch of several micro-batches needs (train_step has none; not in peak);
  collectives  `hlo_stats.collective_bytes` of the optimized HLO: result bytes per device per kind;
  a2a min      the MoE exchange's floor: 2 directions x tokens x top_k x embed x bytes per element
               per MoE layer forward, spread over the devices; the step needs it twice (the
               backward sends the gradients of the same rows) for every MoE block (MTP included).
               Zero when the expert axis is 1: nothing needs to move.

Which meshes: the config has no study section, so the mesh section says it.
  mesh all 1 (the default)  the grid GRID over 8 devices: data x expert, then with tensor=2.
  any other mesh            that one mesh, the target of a simulation (e.g. 32 x 64 = 2048 GPUs).
The devices are the default backend's when it has enough, else fake CPU devices, which the study
creates itself before JAX starts its backends (`jax_num_cpu_devices`; no XLA_FLAGS needed).

Simulation, where the target does not fit this machine:
  - A mesh of more than MAX_FAKE_DEVICES is compiled with its data axis shrunk (32 -> 2) and the
    batch cut in proportion: parameters are not split over data, so every device holds the same
    shards and tokens as on the target, and the data-parallel all-reduce stays in the program
    (its result bytes per device do not depend on the group size). The other axes (fsdp,
    expert, tensor) set each device's shards, so they are compiled at full size, up to
    MAX_SPLIT_DEVICES fake devices.
  - A model deeper than MAX_COMPILED_LAYERS is compiled as slices with the same widths (1 dense
    + 1 MoE block, 2 + 1, 1 + 2; each with the MTP modules, embeddings and head). Peak, FLOPs and
    collective bytes are fitted as c + a * dense + b * moe and evaluated at the full depth;
    param+opt and the a2a minimum of the full model are exact (computed from shapes).
Each row's `source` says which figures were compiled as shown and which were extrapolated.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from experiments import report
from moe_jax import hlo_stats, pipeline, sharding, train
from moe_jax.config import MESH_AXES, ConfigError, ExperimentConfig, MeshConfig

# (data, expert, tensor) shapes of the default study, over GRID_DEVICES devices.
GRID = ((1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2))
GRID_DEVICES = 8
# XLA:CPU compiles a V3-width slice on 128 fake devices in under a minute on 2 cores, and on 2048
# in ~25 s more (1.5 GB resident): the data axis shrinks to the first, the others may reach the
# second.
MAX_FAKE_DEVICES = 128
MAX_SPLIT_DEVICES = 2048
# Deeper models are compiled as slices: the blocks are unrolled, so compile time grows with depth.
MAX_COMPILED_LAYERS = 4
KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
COLUMNS = ("mesh", "devices", "compiled_on", "layers", "source", "param_opt_bytes", "peak_bytes",
           "accum_bytes", "flops", "expert_flops", *KINDS, "a2a_lowered_bytes",
           "a2a_min_layer_fwd_bytes", "a2a_min_step_bytes", "a2a_ratio", "a2a_ratio_lowered",
           "permute_min_step_bytes", "bubble", "compile_s")
# A GPU of "80 GB" (H800/A100/H100), in bytes; the study says which layouts fit under it.
GPU_BYTES = 80e9
# XLA:CPU's default scheduler orders for concurrency and ignores memory: it runs each
# rematerialised block's recompute early, so remat saved nothing (BUILD_NOTES). GPU compilers
# schedule under a memory limit; the memory-optimized CPU scheduler is the closer stand-in.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# Figures read from a compiled slice, fitted linearly in the number of dense and MoE blocks.
FITTED = ("peak_bytes", "flops", *KINDS, "a2a_lowered_bytes")


def mesh_label(m: MeshConfig) -> str:
  return "x".join(str(getattr(m, a)) for a in MESH_AXES)


def grid_meshes() -> list[MeshConfig]:
  return [MeshConfig(data=d, expert=e, tensor=t) for d, e, t in GRID]


def study_devices(n: int) -> list:
  """n devices: the default backend's when it has n, else n fake CPU devices."""
  try:
    # Must precede the first backend use; afterwards JAX refuses and the existing devices serve.
    jax.config.update("jax_num_cpu_devices", max(n, GRID_DEVICES))
  except RuntimeError:
    pass
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= n:
      return devices[:n]
  raise ConfigError(f"mesh: needs {n} devices but JAX started with {len(jax.devices('cpu'))} CPU "
                    f"devices; run with XLA_FLAGS=--xla_force_host_platform_device_count={n}")


def compile_mesh(target: MeshConfig) -> MeshConfig:
  """The mesh to compile on: the target, its data axis shrunk until it fits MAX_FAKE_DEVICES
  (to 1 when the other axes alone have more)."""
  rest = target.size // target.data
  if rest > MAX_SPLIT_DEVICES:
    raise ConfigError(f"mesh: fsdp*expert*tensor={rest} devices; at most {MAX_SPLIT_DEVICES} can "
                      "be compiled here (only the data axis is simulated)")
  data = max(d for d in range(1, target.data + 1)
             if target.data % d == 0 and d * rest <= max(MAX_FAKE_DEVICES, rest))
  return dataclasses.replace(target, data=data)


def _plain(cfg: ExperimentConfig) -> ExperimentConfig:
  # State shapes do not depend on the MoE parallelism, and model.init traces the layer on a
  # 2-token batch that an expert-parallel layer cannot split over the mesh.
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, parallelism="none"))


def _abstract_mesh(m: MeshConfig) -> AbstractMesh:
  return AbstractMesh(tuple(m.shape.values()), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_bytes(cfg: ExperimentConfig, mesh: Optional[MeshConfig] = None,
                keys: Sequence[str] = ("params", "opt_state", "moe_state")) -> int:
  """Per-device bytes of these parts of the train state (by default params, optimizer state and
  router biases) on `mesh` (any size)."""
  plain = _plain(cfg)
  shardings = train.state_shardings(plain, _abstract_mesh(mesh or cfg.mesh))
  shapes = jax.eval_shape(functools.partial(train.init_state, cfg=plain), jax.random.key(0))
  total = 0
  for key in keys:
    for a, s in zip(jax.tree.leaves(shapes[key]), jax.tree.leaves(shardings[key])):
      total += math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
  return total


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?body=%?([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CALLS = re.compile(r"(?:to_apply|calls|condition|true_computation|false_computation)=%?([\w.\-]+)"
                    r"|branch_computations=\{([^}]*)\}")


def looped_collective_bytes(hlo_text: str) -> dict[str, int]:
  """hlo_stats.collective_bytes with each loop body's collectives counted once per trip (XLA's
  known_trip_count): the pipeline's ticks are a loop."""
  bodies, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(" "):
      name = match.group(1)
      bodies[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif name is not None:
      bodies[name].append(line)
  totals = dict.fromkeys(hlo_stats.KINDS, 0)

  def visit(comp: str, times: int, depth: int = 0):
    if comp not in bodies or depth > 32:
      return
    lines = bodies[comp]
    for kind, n in hlo_stats.collective_bytes("\n".join(lines)).items():
      totals[kind] += n * times
    for line in lines:
      loop = _WHILE.search(line)
      if loop:
        visit(loop.group(1), times * int(loop.group(2)), depth + 1)
      for called, branches in _CALLS.findall(line):
        for c in ([called] if called else branches.replace("%", "").split(",")):
          visit(c.strip(), times, depth + 1)
  visit(entry, 1)
  return totals


def moe_blocks(cfg: ExperimentConfig) -> int:
  """MoE blocks of the model, MTP modules' included (they are MoE when the model has MoE)."""
  m = cfg.model
  return 0 if m.first_k_dense >= m.num_layers else m.num_layers - m.first_k_dense + m.mtp_depth


def a2a_minimum(cfg: ExperimentConfig) -> tuple[float, float]:
  """(per MoE layer forward, per training step): the all-to-all floor in bytes per device."""
  if cfg.mesh.expert == 1:
    return 0.0, 0.0
  tokens = cfg.train.batch_size * cfg.train.seq_len
  layer = (2 * tokens * cfg.moe.top_k * cfg.moe.embed_dim * jnp.dtype(cfg.moe.dtype).itemsize /
           cfg.mesh.size)
  return layer, 2 * layer * moe_blocks(cfg)


def permute_minimum(cfg: ExperimentConfig) -> float:
  """The pipeline's floor per device per step: every token's activation crosses each of the
  stage - 1 boundaries forward, and its gradient backward, in the compute dtype."""
  stages = cfg.mesh.stage
  tokens = cfg.train.batch_size * cfg.train.seq_len
  boundary = tokens * cfg.model.embed_dim * jnp.dtype(cfg.model.dtype).itemsize
  return 2.0 * boundary * (stages - 1) / cfg.mesh.size


def bubble(cfg: ExperimentConfig) -> float:
  """The schedule's idle share of stage-ticks (pipeline.bubble_fraction); 0 without stages."""
  if cfg.mesh.stage == 1:
    return 0.0
  return pipeline.bubble_fraction(cfg.mesh.stage, cfg.train.microbatches,
                                  cfg.train.pipeline_repeats)


def routed_expert_flops(cfg: ExperimentConfig) -> float:
  """Training FLOPs per device of the routed experts (useful rows, balanced load)."""
  m, e = cfg.mesh, cfg.moe
  rows = cfg.train.batch_size * cfg.train.seq_len * e.top_k / (m.data * m.fsdp * m.expert)
  # Forward 2 and backward 4 FLOPs per weight and row; gate, up and down are D x F/tensor each.
  return 6.0 * 3 * e.embed_dim * e.expert_ffn_dim / m.tensor * rows * moe_blocks(cfg)


def compile_step(cfg: ExperimentConfig, devices: Sequence) -> tuple[Any, Any, float]:
  """(lowered, compiled, compile seconds) of the jitted training step on cfg.mesh over devices."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  plain = _plain(cfg)
  shardings = train.state_shardings(plain, mesh)
  shapes = jax.eval_shape(functools.partial(train.init_state, cfg=plain), jax.random.key(0))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                       shardings)
  rows = sharding.named_sharding(mesh, train.BATCH_AXES)
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in ("inputs", "targets")}
  step = jax.jit(functools.partial(train.train_step, cfg=cfg), donate_argnums=0,
                 in_shardings=(shardings, {k: rows for k in batch}),
                 out_shardings=(shardings, sharding.named_sharding(mesh, ())))
  with jax.set_mesh(mesh):  # the expert-parallel layer reads the mesh from here
    lowered = step.lower(state, batch)
    start = time.perf_counter()
    cpu = devices[0].platform == "cpu"
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS if cpu else None)
  return lowered, compiled, time.perf_counter() - start


def measure(cfg: ExperimentConfig, devices: Sequence, source: str = "measured") -> dict:
  """One row: cfg compiled on cfg.mesh over the first cfg.mesh.size of devices."""
  lowered, compiled, seconds = compile_step(cfg, devices[:cfg.mesh.size])
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per program
  collectives = looped_collective_bytes(compiled.as_text())
  # shard_map's all-to-alls are in the lowered HLO with the dtype the layer sends; XLA:CPU runs
  # 16-bit collectives in f32, so the compiled CPU program can move twice that.
  lowered_a2a = looped_collective_bytes(lowered.as_text(dialect="hlo"))["all-to-all"]
  row = {"mesh": mesh_label(cfg.mesh), "devices": cfg.mesh.size,
         "compiled_on": mesh_label(cfg.mesh), "layers": _layers(cfg), "source": source,
         "param_opt_bytes": state_bytes(cfg),
         "peak_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes -
                        memory.alias_size_in_bytes + memory.temp_size_in_bytes),
         "flops": float(cost.get("flops", 0.0)),
         **{kind: collectives[kind] for kind in KINDS},
         "a2a_lowered_bytes": lowered_a2a or collectives["all-to-all"],
         "compile_s": round(seconds, 1)}
  return _with_minimum(row, cfg)


def _with_minimum(row: dict, cfg: ExperimentConfig) -> dict:
  layer, step = a2a_minimum(cfg)
  ratio = lambda measured: measured / step if step else None
  # Parameters are float32 (the master copy), so their bytes are an f32 accumulator's.
  # A pipelined step takes its micro-batches in one backward: no gradient accumulator.
  pipelined = cfg.mesh.stage > 1 or cfg.train.microbatches > 1
  return dict(row, expert_flops=routed_expert_flops(cfg), a2a_min_layer_fwd_bytes=layer,
              accum_bytes=0 if pipelined else state_bytes(cfg, keys=("params",)),
              bubble=bubble(cfg),
              permute_min_step_bytes=permute_minimum(cfg),
              a2a_min_step_bytes=step, a2a_ratio=ratio(row["all-to-all"]),
              a2a_ratio_lowered=ratio(row["a2a_lowered_bytes"]))


def _layers(cfg: ExperimentConfig) -> str:
  m = cfg.model
  mtp = f"+{m.mtp_depth} MTP" if m.mtp_depth else ""
  return f"{m.first_k_dense} dense+{m.num_layers - m.first_k_dense} MoE{mtp}"


def slice_blocks(cfg: ExperimentConfig) -> list[tuple[int, int]]:
  """(dense, MoE) blocks of the slices: a base, plus one more of each kind the model has more of.
  Pipelined, MoE blocks come in units of one per stage chunk (the compiled program holds one
  stage's chunk: its cost does not grow with the stages)."""
  dense, moe = cfg.model.first_k_dense, cfg.model.num_layers - cfg.model.first_k_dense
  unit = cfg.mesh.stage * cfg.train.pipeline_repeats
  base = (min(dense, 1), min(moe, unit))
  return ([base] + ([(base[0] + 1, base[1])] if dense > base[0] else []) +
          ([(base[0], base[1] + unit)] if moe > base[1] else []))


def sliced(cfg: ExperimentConfig, dense: int, moe: int) -> ExperimentConfig:
  return dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, num_layers=dense + moe, first_k_dense=dense))


def extrapolate(rows: Sequence[dict], blocks: Sequence[tuple[int, int]],
                target: tuple[int, int]) -> dict:
  """FITTED figures of rows (one per slice of `blocks` blocks) fitted linearly, at `target`."""
  design = np.array([[1.0, d, m] for d, m in blocks])
  varied = [0] + [j for j in (1, 2) if len(set(design[:, j])) > 1]
  x = np.array([1.0, *target])[varied]
  out = {}
  for key in FITTED:
    coef = np.linalg.lstsq(design[:, varied], np.array([r[key] for r in rows], float),
                           rcond=None)[0]
    value = float(x @ coef)
    out[key] = value if key == "flops" else int(round(value))
  return out


def study_mesh(cfg: ExperimentConfig, target: MeshConfig, devices: Sequence) -> list[dict]:
  """Rows for one target mesh: measured directly, or slices on a smaller mesh + extrapolation."""
  full = dataclasses.replace(cfg, mesh=target)  # validates the mesh against the model
  fake = compile_mesh(target)
  # The same tokens per device: the batch shrinks with the data axis.
  small = dataclasses.replace(full, mesh=fake, train=dataclasses.replace(
      cfg.train, batch_size=cfg.train.batch_size * fake.data // target.data))
  deep = cfg.model.num_layers > MAX_COMPILED_LAYERS
  if not deep:
    source = "measured" if fake == target else f"measured on {mesh_label(fake)}"
    row = measure(small, devices, source)
    row.update(mesh=mesh_label(target), devices=target.size,
               param_opt_bytes=state_bytes(full))
    return [_with_minimum(row, full)]
  blocks = slice_blocks(cfg)
  rows = []
  for dense, moe in blocks:
    part = sliced(small, dense, moe)
    print(f"  compiling slice {_layers(part)} on {mesh_label(fake)} ...", flush=True)
    rows.append(measure(part, devices, "measured, slice"))
  m = cfg.model
  fit = extrapolate(rows, blocks, (m.first_k_dense, m.num_layers - m.first_k_dense))
  total = {"mesh": mesh_label(target), "devices": target.size, "compiled_on": mesh_label(fake),
           "layers": _layers(full), "source": "extrapolated",
           "param_opt_bytes": state_bytes(full), **fit,
           "compile_s": round(sum(r["compile_s"] for r in rows), 1)}
  return rows + [_with_minimum(total, full)]


# ----------------------------------------------------------------------------- outputs


def _size(n: Optional[float]) -> str:
  if n is None:
    return "-"
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}" if abs(n) < 1000 * scale else f"{n / scale:.0f} {unit}"
  return f"{n:.0f} B"


def _ratio_text(row: dict) -> str:
  if row["a2a_ratio"] is None:
    return "-"
  text = f"{row['a2a_ratio']:.2f}"
  if abs(row["a2a_ratio_lowered"] - row["a2a_ratio"]) > 1e-6:
    text += f" ({row['a2a_ratio_lowered']:.2f} as sent)"
  return text


def markdown_table(rows: Sequence[dict]) -> str:
  head = ("mesh (d x p x f x e x t)", "layers", "source", "param+opt", "peak", "+ grad acc",
          "GFLOP (XLA)", "GFLOP experts", *KINDS, "a2a min", "a2a / min", "permute min",
          "bubble")
  cells = []
  for r in rows:
    mesh = r["mesh"] if r["compiled_on"] == r["mesh"] else f"{r['mesh']} (on {r['compiled_on']})"
    gflop = (f"{r[k] / 1e9:,.1f}" for k in ("flops", "expert_flops"))
    cells.append((r["compiled_on"] if r["source"] == "measured, slice" else mesh, r["layers"],
                  r["source"], _size(r["param_opt_bytes"]), _size(r["peak_bytes"]),
                  _size(r["peak_bytes"] + r["accum_bytes"]), *gflop,
                  *(_size(r[k]) for k in KINDS), _size(r["a2a_min_step_bytes"]),
                  _ratio_text(r), _size(r["permute_min_step_bytes"]), f"{r['bubble']:.0%}"))
  return "\n".join(report.table(head, cells))


def notes(cfg: ExperimentConfig, rows: Sequence[dict]) -> list[str]:
  lines = [f"Per device. {jax.devices()[0].platform}, jax {jax.__version__}; model "
           f"{_layers(cfg)}, embed {cfg.model.embed_dim}, {cfg.moe.num_experts} experts top-"
           f"{cfg.moe.top_k}, moe.parallelism={cfg.moe.parallelism!r}, capacity_factor="
           f"{cfg.moe.capacity_factor}; batch {cfg.train.batch_size} x {cfg.train.seq_len} tokens "
           "(on the target mesh).",
           "GFLOP (XLA): cost analysis of the compiled step; it counts a loop body once, so "
           "the padded grouped experts (CPU) are all but missing. GFLOP experts: their useful "
           "training FLOPs, computed (6 x 3 x embed x expert_ffn/tensor x rows x MoE blocks).",
           "a2a min: 2 directions x tokens x top_k x embed x bytes per element per MoE layer "
           "forward / devices, x2 for the step (backward) x MoE blocks; 0 when expert=1.",
           "Collectives are counted once per loop trip (the pipeline's ticks are a loop). "
           "permute min: the pipeline's floor, every token's activation and its gradient across "
           "each of the stage - 1 boundaries / devices; bubble: the schedule's idle share of "
           "stage-ticks, (stages - 1) / (repeats x micro-batches + stages - 1).",
           "'as sent': the lowered HLO's all-to-all bytes, in the dtype the layer sends (XLA:CPU "
           "runs 16-bit collectives in f32).",
           "+ grad acc: peak plus an f32 gradient accumulator of the device's parameter shards "
           "(from shapes), what a batch of several micro-batches needs; train_step has none."]
  for r in rows:
    if r["a2a_min_layer_fwd_bytes"] and r["source"] != "measured, slice":
      lines.append(f"{r['mesh']}: all-to-all minimum {_size(r['a2a_min_layer_fwd_bytes'])} per "
                   f"MoE layer forward per device; step {_size(r['a2a_min_step_bytes'])}; "
                   f"{r['source'].split(' ')[0].rstrip(',')} {_size(r['all-to-all'])} "
                   f"(ratio {_ratio_text(r)}).")
    if r["source"] != "measured, slice" and r["devices"] > GRID_DEVICES:  # a simulation
      total = r["peak_bytes"] + r["accum_bytes"]
      fits = "fits" if total <= GPU_BYTES else "does not fit"
      lines.append(f"{r['mesh']}: {_size(total)} per device with the accumulator "
                   f"({total / 1e9:.1f} GB): {fits} a GPU of {GPU_BYTES / 1e9:.0f} GB.")
    if r["source"].startswith("extrapolated"):
      per_step = ", ".join(f"{k} {_size(r[k] * r['devices'])}" for k in KINDS[:4])
      lines.append(f"{r['mesh']} ({r['devices']} devices), whole cluster per step: {per_step}. "
                   f"Measured: the slice rows, compiled on {r['compiled_on']}. Extrapolated: "
                   "peak, FLOPs (XLA) and collectives (fitted linearly in dense and MoE blocks). "
                   "Exact (from shapes): param+opt, GFLOP experts and a2a min of the full model "
                   "on the target mesh.")
  return lines


def plot(rows: Sequence[dict], path: str, title: str):
  plt = report.pyplot()
  short = lambda r: r["layers"].replace(" dense", "d").replace(" MoE", "m").replace(" MTP", "mtp")
  labels = [f"{r['compiled_on']}\nslice\n{short(r)}" if r["source"] == "measured, slice" else
            r["mesh"] + ("\nextrapolated" if r["source"] == "extrapolated" else "") for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 3, figsize=(max(13, 2.2 * len(rows)), 4.7))
  biggest = max(max(r["peak_bytes"], sum(r[k] for k in KINDS)) for r in rows)
  unit, scale = ("GiB", 2**30) if biggest >= 2**30 else ("MiB", 2**20)
  size = lambda key: [r[key] / scale for r in rows]
  axes[0].bar(x - 0.2, size("param_opt_bytes"), 0.4, label="param + opt state")
  axes[0].bar(x + 0.2, size("peak_bytes"), 0.4, label="peak (memory analysis)")
  axes[0].set_ylabel(f"{unit} per device")
  bottom = np.zeros(len(rows))
  for kind in KINDS:
    values = np.array(size(kind))
    if values.any():
      axes[1].bar(x, values, 0.6, bottom=bottom, label=kind)
      bottom += values
  axes[1].set_ylabel(f"collective {unit} per device per step")
  tera = max(r["flops"] + r["expert_flops"] for r in rows) >= 1e12
  flop = lambda key: np.array([r[key] / (1e12 if tera else 1e9) for r in rows])
  axes[2].bar(x, flop("flops"), 0.6, color="tab:gray", label="XLA cost analysis")
  axes[2].bar(x, flop("expert_flops"), 0.6, bottom=flop("flops"), color="tab:olive",
              label="+ routed experts (computed)")
  axes[2].set_ylabel(f"{'TFLOP' if tera else 'GFLOP'} per device per step")
  for ax in axes:
    ax.set_xticks(x, labels, fontsize=7, rotation=30 if len(rows) > 4 else 0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend
    ax.legend(fontsize=7, loc="upper left")
  axes[1].set_xlabel("mesh data x stage x fsdp x expert x tensor")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  report.save(fig, path, dpi=110)


def write_outputs(cfg: ExperimentConfig, rows: Sequence[dict], workdir: str) -> str:
  """table.md, table.csv and plot.png in workdir; returns the Markdown text."""
  os.makedirs(workdir, exist_ok=True)
  text = markdown_table(rows) + "\n\n" + "\n".join(f"- {line}" for line in notes(cfg, rows))
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  report.write_csv(os.path.join(workdir, "table.csv"), rows, COLUMNS)
  plot(rows, os.path.join(workdir, "plot.png"),
       f"training step of {_layers(cfg)}, embed {cfg.model.embed_dim}, "
       f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} ({cfg.moe.parallelism})")
  return text


def run(cfg: ExperimentConfig, workdir: str) -> list[dict]:
  """The grid (mesh all 1) or the simulation of cfg.mesh; prints and writes the table."""
  start = time.perf_counter()
  targets = grid_meshes() if cfg.mesh.size == 1 else [cfg.mesh]
  devices = study_devices(max(compile_mesh(t).size for t in targets))
  print(f"sharding study: {len(targets)} mesh(es) on {len(devices)} "
        f"{devices[0].platform} devices", flush=True)
  rows = []
  for target in targets:
    print(f"mesh {mesh_label(target)} (data x stage x fsdp x expert x tensor) ...", flush=True)
    try:
      rows += study_mesh(cfg, target, devices)
    except ConfigError as e:
      if len(targets) == 1:
        raise
      print(f"  skipped: {e}", flush=True)  # a grid shape this model cannot split evenly
  text = write_outputs(cfg, rows, workdir)
  print(text)
  print(f"wrote {workdir}/table.md, table.csv, plot.png in {time.perf_counter() - start:.0f} s",
        flush=True)
  return rows
