"""Every DeepSeek-V3 feature at CPU scale: MLA with query compression, group-limited sigmoid
routing with routed_scaling, shared expert, aux-loss-free bias plus a small sequence-wise balance
loss, and one multi-token prediction module. Data and run as tiny_moe.

  python -m experiments.run --config configs/deepseek_v3_mini.py --workdir /tmp/v3mini
"""
import pathlib
import runpy


def _tiny_moe_config(arg=None):
  # By path: config files are not a package (config_flags loads them by path too).
  return runpy.run_path(str(pathlib.Path(__file__).with_name("tiny_moe.py")))["get_config"](arg)


def get_config(arg=None):
  """arg: "runlocal" shrinks as in tiny_moe (widths above follow embed_dim)."""
  config = _tiny_moe_config(arg)
  m, e = config.model, config.moe
  m.q_lora_rank = m.embed_dim // 2      # query latent, like V3's 1536 for 7168
  m.mtp_depth = 1                       # one MTP module, as V3
  m.mtp_loss_weight = 0.3               # V3's weight for the first 10T tokens
  e.num_experts = 16                    # routed experts, in groups:
  e.n_groups = 4                        # 4 groups of 4 experts
  e.topk_groups = 2                     # a token picks experts from its 2 best groups
  e.top_k = 4                           # routed experts per token
  e.expert_ffn_dim = m.embed_dim // 4   # fine-grained experts (V3: 2048 for 7168)
  e.routed_scaling = 2.5                # V3's gate scaling
  return config
