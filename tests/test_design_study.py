"""The design studies' arms: equal active compute where the study says so, and V3's MTP weight
schedule."""
import pathlib
import runpy

import jax.numpy as jnp
import pytest

from experiments import design_study
from moe_jax import model, train
from moe_jax.config import ConfigError, from_config_dict

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def _config(name, arg=None):
  return from_config_dict(runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"](arg))


def _ffn_params(cfg, kind):
  counts = model.count_params(cfg.model, cfg.moe)["main"][kind]
  return counts["routed_experts"] + counts["shared_experts"] + counts["dense_ffn"]


def test_granularity_arms_have_equal_active_ffn_and_the_moe_arms_equal_routed_width():
  cfg = _config("granularity_study")
  arms = {a: design_study.arm_config(cfg, "granularity_study", a, 0)
          for a in design_study.ARMS["granularity_study"]}
  active = {a: _ffn_params(c, "activated") for a, c in arms.items()}
  assert len(set(active.values())) == 1, active
  routed = {a: model.count_params(c.model, c.moe)["main"]["total"]["routed_experts"]
            for a, c in arms.items() if a != "dense"}
  assert len(set(routed.values())) == 1, routed
  assert arms["dense"].model.first_k_dense == cfg.model.num_layers
  assert arms["64e_top6+shared"].moe.num_shared_experts == 2


def test_balance_arms_switch_the_methods_and_keep_the_rest():
  cfg = _config("balance_study")
  arm = lambda name: design_study.arm_config(cfg, "balance_study", name, 1).moe
  assert (arm("none").bias_update_rate, arm("none").aux_loss_coef) == (0.0, 0.0)
  assert (arm("aux_loss").aux_loss_coef, arm("aux_loss").bias_update_rate) == (1e-3, 0.0)
  assert arm("aux_free").bias_update_rate == cfg.moe.bias_update_rate > 0
  assert arm("aux_free+seq").seq_aux_loss_coef == 1e-4
  assert design_study.arm_config(cfg, "balance_study", "none", 1).train.seed == 1


def test_mtp_weight_follows_v3s_schedule():
  cfg = design_study.arm_config(_config("mtp_study"), "mtp_study", "mtp_1", 0)
  switch = round(10 / 14.8 * cfg.train.steps)  # 135 of 200 steps at 0.3
  weights = [float(train.mtp_weight(jnp.int32(s), cfg)) for s in (0, switch - 1, switch, 199)]
  assert weights == pytest.approx([0.3, 0.3, 0.1, 0.1])
  constant = _config("tiny_moe")
  assert float(train.mtp_weight(jnp.int32(399), constant)) == pytest.approx(0.3)
  with pytest.raises(ConfigError, match=r"mtp_late_from=1.5: must be a fraction"):
    from_config_dict({"model": {"mtp_late_from": 1.5}})


def test_max_vio_of_loads():
  loads = jnp.asarray([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
  assert design_study.max_vio(jnp.asarray(loads)) == pytest.approx(0.7 / 0.25 - 1)
