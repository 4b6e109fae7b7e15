"""Parameter counts from abstract shapes: DeepSeek-V3 671B against its published figures."""
import json
import pathlib
import runpy
import types

import numpy as np

from experiments import count
from moe_jax import model
from moe_jax.config import MoEConfig, ModelConfig, from_config_dict

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load(name):
  cfg = from_config_dict(runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"]())
  return cfg, cfg.model, cfg.moe


def closed_form(m: ModelConfig, e: MoEConfig) -> dict:
  """The V3 architecture counted by hand, independently of the model's parameter tree."""
  D, H, Q, C = m.embed_dim, m.num_heads, m.q_lora_rank, m.kv_lora_rank
  N, R, V = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
  attn = D * Q + Q + Q * H * (N + R) + D * (C + R) + C + C * H * (N + V) + H * V * D
  routed, shared = e.num_experts * 3 * D * e.expert_ffn_dim, 3 * D * e.expert_ffn_dim
  routed_active = e.top_k * 3 * D * e.expert_ffn_dim
  router = D * e.num_experts
  moe_layer, moe_active = routed + shared + router, routed_active + shared + router
  dense_layer = 3 * D * m.dense_ffn_dim
  L, k = m.num_layers, m.first_k_dense
  common = L * (attn + 2 * D) + D + k * dense_layer + m.vocab_size * D  # + head; norms 2D/block
  mtp = 2 * D * D + 2 * D + attn + 2 * D + D
  return {"main_total": common + m.vocab_size * D + (L - k) * moe_layer,
          "main_activated": common + D + (L - k) * moe_active,
          "mtp_total": mtp + moe_layer, "mtp_activated": mtp + moe_active}


def test_deepseek_v3_671b_counts():
  config, model_cfg, moe_cfg = load("deepseek_v3_671b")
  assert config.experiment == "count"
  counts = model.count_params(model_cfg, moe_cfg)
  main, mtp = counts["main"], counts["mtp"]
  # Published: 671B total, 37B activated per token; MTP 11.6B beyond the shared embedding/head.
  assert abs(main["total"]["all"] / 671e9 - 1) < 0.01, main["total"]["all"]
  assert abs(main["activated"]["all"] / 37e9 - 1) < 0.02, main["activated"]["all"]
  assert abs(mtp["total"]["all"] / 11.6e9 - 1) < 0.02, mtp["total"]["all"]
  assert mtp["total"]["embedding"] == mtp["total"]["output_head"] == 0
  expected = closed_form(model_cfg, moe_cfg)
  assert main["total"]["all"] == expected["main_total"]
  assert main["activated"]["all"] == expected["main_activated"]
  assert mtp["total"]["all"] == expected["mtp_total"]
  assert mtp["activated"]["all"] == expected["mtp_activated"]
  assert main["total"]["routed_experts"] == 58 * 256 * 3 * 7168 * 2048
  assert main["total"]["dense_ffn"] == 3 * 3 * 7168 * 18432


def test_small_model_counts_by_kind():
  model_cfg = ModelConfig(embed_dim=16, num_layers=3, first_k_dense=1, dense_ffn_dim=32,
                          num_heads=2, num_kv_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
                          qk_rope_head_dim=2, v_head_dim=4, q_lora_rank=8, mtp_depth=1)
  moe_cfg = MoEConfig(embed_dim=16, num_experts=4, top_k=2, expert_ffn_dim=8)
  counts = model.count_params(model_cfg, moe_cfg)
  expected = closed_form(model_cfg, moe_cfg)
  assert counts["main"]["total"]["all"] == expected["main_total"]
  assert counts["mtp"]["activated"]["all"] == expected["mtp_activated"]
  for part in ("main", "mtp"):
    for which in ("total", "activated"):
      row = counts[part][which]
      assert row["all"] == sum(v for k, v in row.items() if k != "all")
  main = counts["main"]
  assert main["total"]["routed_experts"] == 2 * main["activated"]["routed_experts"] == 2 * 4 * 384
  assert main["activated"]["embedding"] == 16 and main["total"]["embedding"] == 259 * 16
  assert main["total"]["router"] == 2 * 16 * 4 and main["total"]["dense_ffn"] == 3 * 16 * 32
  assert counts["mtp"]["total"]["mtp_projection"] == 2 * 16 * 16


def test_count_experiment_prints_and_records(tmp_path, capsys):
  _, model_cfg, moe_cfg = load("deepseek_v3_671b")
  table = count.count_from_dataclasses(model_cfg, moe_cfg)
  assert "routed_experts" in table and "671.03B total" in table
  config = types.SimpleNamespace(model=model_cfg, moe=moe_cfg)
  counts = count.run(config, str(tmp_path))
  assert "main model: 671.03B total" in capsys.readouterr().out
  with open(tmp_path / "param_counts.json") as f:
    assert json.load(f) == counts
  np.testing.assert_equal(counts["mtp"]["total"]["mtp_projection"], 2 * 7168 * 7168)
