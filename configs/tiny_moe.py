"""The CPU default: a ~3.6M-parameter MLA + MoE byte-level LM on Python's standard library.

A whole run (400 steps with evaluation) takes a few minutes on 2 CPU cores and ends well below
the corpus' unigram loss (3.658 nats/token).

  python -m experiments.run --config configs/tiny_moe.py --workdir /tmp/tiny
  python -m experiments.run --config configs/tiny_moe.py:runlocal --workdir /tmp/smoke
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  """arg: "runlocal" shrinks the model and the run to a seconds-long smoke test."""
  config = ml_collections.ConfigDict()
  config.experiment = "train"           # what experiments/run.py runs: "train" or "count"

  config.model = m = ml_collections.ConfigDict()
  m.vocab_size = 259                    # byte tokenizer: 256 bytes + BOS, EOS, PAD
  m.embed_dim = 256                     # model width D
  m.num_layers = 4                      # decoder blocks
  m.first_k_dense = 1                   # leading blocks with a dense SwiGLU instead of MoE
  m.dense_ffn_dim = 512                 # hidden width of the dense SwiGLU
  m.attention = "mla"                   # "mla" (DeepSeek-V3) or "mha" (MHA/GQA)
  m.num_heads = 4                       # attention heads
  m.num_kv_heads = 4                    # "mha" only: key/value heads (GQA when fewer)
  m.head_dim = 64                       # "mha" only: per-head width
  m.q_lora_rank = 0                     # "mla": query latent width; 0 = no compression
  m.kv_lora_rank = 64                   # "mla": joint key/value latent width (cached)
  m.qk_nope_head_dim = 32               # "mla": per-head query/key part without RoPE
  m.qk_rope_head_dim = 16               # "mla": decoupled RoPE key width (cached)
  m.v_head_dim = 32                     # "mla": per-head value width
  m.rope_theta = 10000.0                # RoPE base
  m.max_seq_len = 256                   # longest sequence (training or generation)
  m.mtp_depth = 0                       # multi-token prediction modules (V3: 1)
  m.mtp_loss_weight = 0.3               # weight of the mean MTP cross-entropy
  m.norm_eps = 1e-6                     # RMSNorm epsilon
  m.init_std = 0.02                     # std of the normal initialisation of matrices
  m.pad_id = 258                        # target id left out of the loss (-1: none)
  m.dtype = "float32"                   # compute dtype ("float32" or "bfloat16")

  config.moe = e = ml_collections.ConfigDict()  # embed_dim comes from model.embed_dim
  e.num_experts = 8                     # routed experts per MoE block
  e.top_k = 2                           # routed experts per token
  e.expert_ffn_dim = 128                # hidden width of each expert
  e.num_shared_experts = 1              # experts every token passes through
  e.score_fn = "sigmoid"                # router affinity: "sigmoid" (V3) or "softmax"
  e.n_groups = 1                        # expert groups for group-limited routing
  e.topk_groups = 1                     # groups a token may pick experts from
  e.routed_scaling = 1.0                # factor on the routed gates (V3: 2.5)
  e.norm_topk = True                    # normalise the selected gates to sum to 1
  e.capacity_factor = config_dict.placeholder(float)  # None: dropless
  e.grouped_backend = "auto"            # "auto", "ragged" or "padded" expert matmuls
  e.aux_loss_coef = 0.0                 # Switch/GShard balance loss weight
  e.seq_aux_loss_coef = 1e-4            # V3 sequence-wise balance loss weight
  e.z_loss_coef = 0.0                   # router z-loss weight
  # Aux-loss-free bias step (gamma); 0 disables. Choose it against the router's learning rate:
  # about 5-7x the peak (V3: 1e-3 at 2.2e-4). At 1e-3 here (lr 3e-3) the bias cannot keep up and
  # two MoE blocks collapse onto one expert for ~250 of 400 steps; 2e-2 keeps MaxVio under 0.45
  # from step 100 on, 5e-2 jitters around 0.5 (BUILD_NOTES.md, "Load balancing").
  e.bias_update_rate = 2e-2
  e.dtype = "float32"                   # compute dtype of the experts
  e.parallelism = "none"                # "none", "alltoall" or "gshard"

  config.fp8 = f = ml_collections.ConfigDict()
  f.recipe = "none"                     # "none", "tensor", "delayed" or "blockwise"
  f.fwd_dtype = "e4m3"                  # FP8 type of activations and weights
  f.grad_dtype = "e4m3"                 # FP8 type of gradients
  f.tile = 128                          # scaling tile 1 x tile, weight blocks tile x tile
  f.amax_history_len = 16               # "delayed": amax history length
  f.power_of_two_scale = False          # round scales up to powers of two
  f.dispatch = False                    # FP8 activations through the expert all-to-all

  config.mesh = mesh = ml_collections.ConfigDict()  # product = number of devices
  mesh.data = 1                         # data parallelism
  mesh.stage = 1                        # pipeline stages (MoE blocks split among them)
  mesh.fsdp = 1                         # fully sharded data parallelism
  mesh.expert = 1                       # expert parallelism
  mesh.tensor = 1                       # tensor parallelism

  config.train = t = ml_collections.ConfigDict()
  t.steps = 400                         # optimizer steps
  t.batch_size = 16                     # global sequences per step
  t.seq_len = 128                       # tokens per sequence
  t.learning_rate = 3e-3                # peak, after warmup, then cosine decay
  t.warmup_steps = 30                   # linear warmup steps
  t.min_lr_ratio = 0.1                  # final learning rate / peak
  t.weight_decay = 0.1                  # AdamW decoupled weight decay
  t.b1 = 0.9                            # AdamW first-moment decay
  t.b2 = 0.95                           # AdamW second-moment decay
  t.grad_clip = 1.0                     # global-norm clip; 0 disables
  t.log_every = 10                      # steps between metric lines
  t.eval_every = 100                    # steps between held-out evaluations
  t.eval_batches = 4                    # batches per evaluation
  t.checkpoint_every = 100              # steps between checkpoints
  t.keep_checkpoints = 3                # checkpoints kept on disk
  t.max_bad_steps = 5                   # non-finite steps in a row before stopping
  t.seed = 0                            # parameter and data seed
  t.optimizer_state_dtype = "float32"   # AdamW moments: "float32" or "bfloat16"
  t.microbatches = 1                    # pipeline micro-batches per step
  t.pipeline_repeats = 1                # chunks per pipeline stage: 1 GPipe, >1 interleaved

  config.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"                   # "stdlib", "text", "tokens" or "synthetic"
  d.path = ""                           # file, directory or glob for "text" / "tokens"
  d.heldout_fraction = 0.02             # share held out for evaluation

  if arg == "runlocal":
    m.embed_dim, m.num_layers, m.dense_ffn_dim = 64, 2, 128
    e.num_experts, e.expert_ffn_dim = 4, 32
    t.steps, t.batch_size, t.seq_len = 20, 4, 64
    t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 5, 10, 1, 10
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or 'runlocal'")
  return config
