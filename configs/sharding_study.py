"""Sharding study: memory, FLOPs and collective bytes of one training step per device mesh.

  python -m experiments.run --config=configs/sharding_study.py --workdir=/tmp/sharding
  python -m experiments.run --config=configs/sharding_study.py:v3_671b --workdir=/tmp/sharding_v3

Default: tiny_moe's model with the expert-parallel (all-to-all) MoE layer, compiled on a grid of
8-device meshes (experiments/sharding_study.py GRID; fake CPU devices on a CPU machine). The mesh
section is left at 1 x 1 x 1 x 1, which tells the study to run its grid.

"v3_671b": DeepSeek-V3's full shape simulated on 2048 GPUs (mesh below): slices of the model are
compiled on a 2 x 64 fake mesh and scaled to 61 layers (see the study's docstring).
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


def get_config(arg=None):
  """arg: None (the 8-device grid) or "v3_671b" (the 2048-GPU simulation)."""
  if arg == "v3_671b":
    config = _load("deepseek_v3_671b.py").get_config()
    config.mesh.data = 32                 # target: 32 x 64 = 2048 GPUs,
    config.mesh.expert = 64               # expert parallelism 64 (4 routed experts per GPU)
    config.train.batch_size = 2048        # one sequence per GPU per step (no accumulation)
    config.train.seq_len = 4096           # V3's pre-training length
    config.train.optimizer_state_dtype = "bfloat16"  # V3's BF16 moments (optax: first only)
    # The padded exchange sends capacity_factor * tokens * top_k / ep rows to each expert shard;
    # dropless (None) would be tokens * top_k per shard: 64x the rows, 60 GB per layer per GPU.
    config.moe.capacity_factor = 1.25
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or 'v3_671b'")
  else:
    config = _load("tiny_moe.py").get_config()
    config.model.vocab_size = 264         # 259 byte tokens padded to split over tensor=2
  config.experiment = "sharding_study"
  config.moe.parallelism = "alltoall"     # expert-parallel shard_map layer ("gshard" also works)
  return config
