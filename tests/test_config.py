"""ConfigDict -> ExperimentConfig: types, unknown keys, cross-section checks, round trip."""
import json

import ml_collections
import pytest

from moe_jax import config
from moe_jax.config import ConfigError


def small_config(**sections) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "train"
  c.model = ml_collections.ConfigDict(dict(embed_dim=32, num_layers=2, num_heads=2,
                                           num_kv_heads=2, dense_ffn_dim=64, max_seq_len=64))
  c.moe = ml_collections.ConfigDict(dict(num_experts=8, top_k=2, expert_ffn_dim=16,
                                         capacity_factor=ml_collections.config_dict.placeholder(
                                             float)))
  c.mesh = ml_collections.ConfigDict(dict(data=8, fsdp=1, expert=1, tensor=1))
  c.train = ml_collections.ConfigDict(dict(steps=10, batch_size=8, seq_len=32,
                                           learning_rate=1e-3, inject_nan_at_steps=()))
  c.data = ml_collections.ConfigDict(dict(source="synthetic", path=""))
  for name, values in sections.items():
    for key, value in values.items():
      c[name][key] = value
  return c


def test_sections_become_dataclasses_and_moe_inherits_embed_dim():
  cfg = config.from_config_dict(small_config())
  assert isinstance(cfg.model, config.ModelConfig) and isinstance(cfg.train, config.TrainConfig)
  assert cfg.moe.embed_dim == cfg.model.embed_dim == 32
  assert cfg.moe.capacity_factor is None
  assert cfg.train.learning_rate == 1e-3 and cfg.fp8 == config.FP8Config()  # fp8 left out
  assert cfg.train.inject_nan_at_steps == ()


def test_round_trip_through_json():
  cfg = config.from_config_dict(small_config(train=dict(inject_nan_at_steps=(3, 4))))
  again = config.from_config_dict(json.loads(json.dumps(cfg.to_dict())))
  assert again == cfg
  assert again.train.inject_nan_at_steps == (3, 4)
  with_seeds = config.from_config_dict(dict(cfg.to_dict(), seeds=[2, 5]))
  assert with_seeds.seeds == (2, 5)
  assert config.from_config_dict(json.loads(json.dumps(with_seeds.to_dict()))) == with_seeds


def test_ints_widen_to_floats_only():
  cfg = config.from_config_dict({"train": {"learning_rate": 1}, "data": {"source": "synthetic"}})
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


@pytest.mark.parametrize("values, message", [
    ({"modle": {}}, r"^modle=\{\}: unknown key; a config has experiment, model"),
    ({"seeds": [0, 0]}, r"^seeds=\[0, 0\]: must be a list of distinct integers >= 0"),
    ({"seeds": 3}, r"^seeds=3: must be a list of distinct integers >= 0"),
    ({"seeds": [1, -2]}, r"^seeds=\[1, -2\]: must be a list of distinct integers >= 0"),
    ({"train": {"stepz": 3}}, r"^train\.stepz=3: unknown key; train has steps, batch_size"),
    ({"train": {"steps": "10"}}, r"^train\.steps='10': must be an integer$"),
    ({"train": {"steps": 2.5}}, r"^train\.steps=2\.5: must be an integer$"),
    ({"train": {"steps": True}}, r"^train\.steps=True: must be an integer$"),
    ({"moe": {"norm_topk": 1}}, r"^moe\.norm_topk=1: must be True or False$"),
    ({"moe": {"capacity_factor": "x"}}, r"^moe\.capacity_factor='x': must be None or a number$"),
    ({"train": {"inject_nan_at_steps": [1.5]}},
     r"^train\.inject_nan_at_steps=\[1\.5\]: must be a tuple of integers$"),
    ({"train": {"batch_size": -4}}, r"^train\.batch_size=-4: must be a positive integer$"),
    ({"moe": {"top_k": 9}}, r"^moe\.top_k=9: must be <= num_experts=8$"),
    ({"moe": {"embed_dim": 16}}, r"^moe\.embed_dim=16: must equal model\.embed_dim=32"),
    ({"mesh": {"data": 1, "expert": 3}}, r"^moe\.num_experts=8: must be divisible by mesh\.expert=3"),
    ({"train": {"batch_size": 12}},
     r"^train\.batch_size=12: must be divisible by mesh\.data\*stage\*fsdp\*expert=8$"),
    ({"mesh": {"data": 2, "tensor": 4}}, r"^model\.num_heads=2: must be divisible by mesh\.tensor=4"),
    ({"mesh": {"data": 4, "tensor": 2}, "train": {"batch_size": 4}},
     r"^model\.vocab_size=259: must be divisible by mesh\.tensor=2"),
    ({"train": {"seq_len": 128}}, r"^train\.seq_len=128: must be <= model\.max_seq_len=64$"),
    ({"data": {"source": "tokens", "path": "/no/such/file.tok"}},
     r"^data\.path='/no/such/file\.tok': no such file"),
    ({"data": {"source": "text", "path": "/no/such/dir/*.txt"}}, r"^data\.path=.*matches nothing"),
    ({"experiment": 3}, r"^experiment=3: must be a string$"),
])
def test_bad_values_fail_with_one_line_naming_the_key(values, message):
  base = small_config().to_dict()
  for section, entries in values.items():
    if isinstance(entries, dict) and section in base:
      base[section].update(entries)
    else:
      base[section] = entries
  with pytest.raises(ConfigError, match=message) as error:
    config.from_config_dict(base)
  assert "\n" not in str(error.value)


def test_device_count_and_process_count_checks():
  cfg = config.from_config_dict(small_config())
  cfg.check_devices(8, 2)
  with pytest.raises(ConfigError, match=r"^mesh=.*product 8 must equal the device count 4$"):
    cfg.check_devices(4)
  with pytest.raises(ConfigError, match=r"^train\.batch_size=8: .*process count 3$"):
    cfg.check_devices(8, 3)
