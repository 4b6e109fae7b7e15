"""DeepSeek-V3's published shape (671B parameters, 37B activated per token), for counting only.

  python -m experiments.run --config configs/deepseek_v3_671b.py --workdir /tmp/count

experiment="count" prints parameter counts from abstract shapes (jax.eval_shape); nothing is
allocated. Shapes from the V3 technical report and its released config.json.
"""
import pathlib
import runpy


def _tiny_moe_config(arg=None):
  # By path: config files are not a package (config_flags loads them by path too).
  return runpy.run_path(str(pathlib.Path(__file__).with_name("tiny_moe.py")))["get_config"](arg)


def get_config(arg=None):
  """Fields absent here keep tiny_moe's values (train, data, fp8, mesh: unused by "count")."""
  if arg:
    raise ValueError(f"config arg {arg!r}: this config has no variants")
  config = _tiny_moe_config()
  config.experiment = "count"
  m, e = config.model, config.moe
  m.vocab_size = 129280                 # V3 byte-level BPE vocabulary
  m.embed_dim = 7168
  m.num_layers = 61
  m.first_k_dense = 3                   # blocks 0-2 dense, 3-60 MoE
  m.dense_ffn_dim = 18432
  m.num_heads = 128
  m.q_lora_rank = 1536
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.max_seq_len = 4096                  # pre-training length (extended to 128K with YaRN)
  m.mtp_depth = 1
  m.init_std = 0.006                    # V3's initialisation std
  m.pad_id = -1                         # the V3 tokenizer's ids are all real tokens here
  m.dtype = "bfloat16"
  e.num_experts = 256
  e.top_k = 8
  e.expert_ffn_dim = 2048
  e.num_shared_experts = 1
  e.n_groups = 8
  e.topk_groups = 4
  e.routed_scaling = 2.5
  e.seq_aux_loss_coef = 1e-4            # V3's sequence-wise balance weight
  e.dtype = "bfloat16"
  return config
