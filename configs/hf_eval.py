"""Held-out loss and a greedy sample of a Hugging Face DeepseekV3ForCausalLM checkpoint.

  python -m experiments.run --config=configs/hf_eval.py --config.hf_path=/path/to/checkpoint
  python -m experiments.run --config=configs/hf_eval.py:runlocal --config.hf_path=DIR \
      --config.data.source=synthetic        # a checkpoint exported from moe_jax (byte vocab)

The checkpoint's config.json decides the model; this file only chooses how to run it (mesh,
dtypes, expert parallelism) and what to score it on. Big checkpoints want a mesh that holds them:
e.g. --config.mesh.expert=8 --config.moe.parallelism=alltoall on 8 devices.
"""
import ml_collections


def get_config(arg=None):
  """arg: "runlocal" scores one small batch (a seconds-long check)."""
  config = ml_collections.ConfigDict()
  config.experiment = "hf_eval"          # experiments/hf_eval.py
  config.hf_path = ""                    # checkpoint directory: config.json + *.safetensors

  add_runtime(config)

  config.train = t = ml_collections.ConfigDict()  # only the evaluation sizes are used
  t.batch_size = 8                       # sequences per evaluation batch
  t.seq_len = 256                        # tokens per sequence
  t.eval_batches = 4                     # batches scored

  config.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"                    # "stdlib" or "text" (any tokenizer); "synthetic" or
  d.path = ""                            # "tokens" hold byte tokens. File, dir or glob for text
  d.heldout_fraction = 0.02              # share held out (the split scored)

  if arg == "runlocal":
    t.batch_size, t.seq_len, t.eval_batches = 2, 64, 1
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or 'runlocal'")
  return config


def add_runtime(config):
  """How a checkpoint runs, whatever it holds (configs/serve.py uses it too): the compute
  dtypes, the expert layer and the mesh; the architecture comes from the checkpoint."""
  config.model = m = ml_collections.ConfigDict()  # the architecture comes from the checkpoint
  m.dtype = "float32"                    # compute dtype ("float32" or "bfloat16")

  config.moe = e = ml_collections.ConfigDict()
  e.dtype = "float32"                    # compute dtype of the experts
  e.parallelism = "none"                 # "none", "alltoall" or "gshard" (needs mesh.expert > 1)
  e.grouped_backend = "auto"             # "auto", "ragged" or "padded" expert matmuls

  config.mesh = mesh = ml_collections.ConfigDict()  # product = number of devices
  mesh.data = 1                          # data parallelism
  mesh.fsdp = 1                          # parameters' embed dim split over devices
  mesh.expert = 1                        # expert parallelism
  mesh.tensor = 1                        # tensor parallelism
