"""Sharding study: memory, FLOPs and collective bytes of one training step per device mesh.

  python -m experiments.run --config=configs/sharding_study.py --workdir=/tmp/sharding
  python -m experiments.run --config=configs/sharding_study.py:v3_671b --workdir=/tmp/sharding_v3

Default: tiny_moe's model with the expert-parallel (all-to-all) MoE layer, compiled on a grid of
8-device meshes (experiments/sharding_study.py GRID; fake CPU devices on a CPU machine). The mesh
section is left at 1 x 1 x 1 x 1, which tells the study to run its grid.

"v3_671b*": DeepSeek-V3's full shape simulated on 2048 GPUs: slices of the model are compiled on
fake CPU devices and scaled to 61 layers (see the study's docstring). Three layouts, all with
expert parallelism 64 and one 4096-token sequence per token shard as the micro-batch (V3's
final batch, 15360 sequences, is then 7.5 micro-batches per GPU, or 60 with tensor 8):
  v3_671b          data 32 x expert 64: only experts split; compiled on 2 x 64
  v3_671b_fsdp     fsdp 32 x expert 64 (ZeRO-3/FSDP: every weight's embed dim split over fsdp),
                   blocks rematerialised; compiled on all 2048
  v3_671b_fsdp_tp  fsdp 4 x expert 64 x tensor 8 (heads, ffn widths and vocab over tensor; the 8
                   tensor ranks share a sequence), blocks rematerialised; compiled on all 2048
  v3_671b_pp       V3's own layout: pipeline 16 x expert 64 x fsdp 2 (V3: ZeRO-1 data parallelism
                   2; fsdp here also splits the weights), no tensor parallelism, 32 micro-batches of
                   one sequence per token shard (a step of 4096 sequences), GPipe schedule. The
                   model has 3 dense + 64 MoE blocks: V3's 58 padded to 4 per stage, the load of
                   V3's heaviest stage (61 layers over 16 stages), so the per-GPU memory is the
                   heaviest stage's; its totals are 64/58 of V3's.
"""
import importlib.util
import pathlib


def _load(name: str):
  # Loaded by path: config files are not a package (config_flags loads them by path too).
  path = pathlib.Path(__file__).with_name(name)
  spec = importlib.util.spec_from_file_location(path.stem + "_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# variant -> (data, fsdp, tensor, model.remat) of a 2048-GPU mesh with expert 64.
V3_LAYOUTS = {"v3_671b": (32, 1, 1, False), "v3_671b_fsdp": (1, 32, 1, True),
              "v3_671b_fsdp_tp": (1, 4, 8, True), "v3_671b_pp": (1, 2, 1, True)}
# variant -> (pipeline stages, micro-batches per step)
V3_PIPELINES = {"v3_671b_pp": (16, 32)}


def get_config(arg=None):
  """arg: None (the 8-device grid) or a V3_LAYOUTS key (a 2048-GPU simulation)."""
  if arg in V3_LAYOUTS:
    config = _load("deepseek_v3_671b.py").get_config()
    data, fsdp, tensor, remat = V3_LAYOUTS[arg]
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.mesh.expert = 64               # expert parallelism 64 (4 routed experts per GPU)
    config.model.remat = remat            # keep only each block's input for the backward
    # The micro-batch: one sequence per token shard (tensor ranks share theirs).
    config.train.batch_size = data * fsdp * 64
    if arg in V3_PIPELINES:
      config.mesh.stage, config.train.microbatches = V3_PIPELINES[arg]
      config.train.batch_size *= config.train.microbatches
      config.model.num_layers = config.model.first_k_dense + 64
    config.train.seq_len = 4096           # V3's pre-training length
    config.train.optimizer_state_dtype = "bfloat16"  # V3's BF16 moments (both)
    # The padded exchange sends capacity_factor * tokens * top_k / ep rows to each expert shard;
    # dropless (None) would be tokens * top_k per shard: 64x the rows, 60 GB per layer per GPU.
    config.moe.capacity_factor = 1.25
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or one of {', '.join(V3_LAYOUTS)}")
  else:
    config = _load("tiny_moe.py").get_config()
    config.model.vocab_size = 264         # 259 byte tokens padded to split over tensor=2
  config.experiment = "sharding_study"
  config.moe.parallelism = "alltoall"     # expert-parallel shard_map layer ("gshard" also works)
  return config
