"""moe_jax.interop.hf: Hugging Face DeepseekV3ForCausalLM checkpoints in and out.

Against transformers (skipped without the interop extra): a small random DeepseekV3ForCausalLM
(3 layers, the first dense, 16 routed experts top-4 in 4 groups with top-2 groups, 1 shared
expert, q_lora and kv_lora ranks, nonzero e_score_correction_bias) saved with save_pretrained
must give the same float32 logits in moe_jax, for both expert layouts, YaRN with the plain rope
layout, an FP8 copy and an expert-parallel 8-device mesh. Without torch: export/import round
trips, FP8 block dequantization, malformed checkpoints and the hf_eval experiment.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from moe_jax import fp8, model, sharding
from moe_jax.config import MeshConfig, ModelConfig, MoEConfig
from moe_jax.interop import CheckpointError, hf
from moe_jax.interop import safetensors_io

INTEROP = "the interop extra (torch, transformers) is not installed: pip install -e '.[interop]'"
ATOL = 1e-4
HF_TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    routed_scaling_factor=2.5, max_position_embeddings=32, initializer_range=0.1)
# YaRN (factor 4 over 8 positions, mscale != mscale_all_dim), rotate-half rope, no query
# compression, tied embeddings: every other path of the mapping.
HF_YARN = dict(HF_TINY, q_lora_rank=None, rope_interleave=False, tie_word_embeddings=True,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "original_max_position_embeddings": 8, "mscale": 0.707,
                                "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
IDS = np.random.default_rng(1).integers(0, 64, (8, 12)).astype(np.int32)


def _transformers():
  pytest.importorskip("torch", reason=INTEROP)
  return pytest.importorskip("transformers", reason=INTEROP)


def _hf_model(config: dict):
  transformers = _transformers()
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = transformers.DeepseekV3Config(**config, attn_implementation="eager")
  m = transformers.DeepseekV3ForCausalLM(cfg).eval()
  with torch.no_grad():  # norms away from 1 and a real router bias, so both must be mapped
    for name, p in m.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
    for layer in m.model.layers[config["first_k_dense_replace"]:]:
      bias = layer.mlp.gate.e_score_correction_bias
      bias.copy_(0.05 * torch.randn_like(bias))
  return m


def _hf_logits(m, ids=IDS) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return m(torch.from_numpy(ids).long()).logits.float().numpy()


def _logits(ckpt: hf.Loaded, ids=IDS) -> np.ndarray:
  return np.asarray(model.apply(ckpt.params, ckpt.moe_state, jnp.asarray(ids), ckpt.model,
                                ckpt.moe)[0])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{"per_expert", "fused", "yarn"} checkpoint directories and the transformers logits."""
  root = tmp_path_factory.mktemp("hf")
  m = _hf_model(HF_TINY)
  m.save_pretrained(root / "per_expert")  # transformers writes V3's one-tensor-per-expert layout
  m.save_pretrained(root / "fused", save_original_format=False)  # its in-memory fused tensors
  yarn = _hf_model(HF_YARN)
  yarn.save_pretrained(root / "yarn")
  return root, {"per_expert": _hf_logits(m), "fused": _hf_logits(m), "yarn": _hf_logits(yarn)}


def _names(directory) -> set:
  return set(safetensors_io.Reader(str(directory)).tensors)


@pytest.mark.parametrize("variant", ["per_expert", "fused", "yarn"])
def test_logits_equal_transformers(hf_dirs, variant):
  root, ref = hf_dirs
  names = _names(root / variant)
  fused = "model.layers.1.mlp.experts.gate_up_proj" in names
  assert fused == (variant == "fused")
  assert ("model.layers.1.mlp.experts.15.down_proj.weight" in names) == (variant != "fused")
  ckpt = hf.load(str(root / variant))
  assert ckpt.model.rope_factor == (4.0 if variant == "yarn" else 1.0)
  bias = np.asarray(ckpt.moe_state["layer_2"]["router_bias"])
  assert np.abs(bias).min() > 0
  np.testing.assert_allclose(_logits(ckpt), ref[variant], atol=ATOL, rtol=ATOL)


def test_expert_parallel_mesh_reads_only_local_experts(hf_dirs, monkeypatch):
  root, ref = hf_dirs
  reads = []
  original = safetensors_io.Reader.read
  monkeypatch.setattr(safetensors_io.Reader, "read", lambda self, name, rows=None: (
      reads.append((name, rows)), original(self, name, rows))[1])
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
  model_cfg, moe_cfg = hf.read_config(str(root / "fused"))
  moe_cfg = dataclasses.replace(moe_cfg, parallelism="alltoall")
  ckpt = hf.load(str(root / "fused"), model_cfg, moe_cfg, mesh=mesh)
  gate = ckpt.params["layer_1"]["ffn"]["experts"]["gate"]
  assert gate.sharding.spec[0] == "expert"
  assert {shard.data.shape[0] for shard in gate.addressable_shards} == {4}
  expert_reads = [rows for name, rows in reads if ".experts." in name]
  assert expert_reads and all(rows.stop - rows.start == 4 for rows in expert_reads)
  with jax.set_mesh(mesh):
    ids = jax.device_put(IDS, sharding.named_sharding(mesh, ("batch", None)))
    logits = model.apply(ckpt.params, ckpt.moe_state, ids, ckpt.model, ckpt.moe)[0]
  np.testing.assert_allclose(np.asarray(logits), ref["fused"], atol=ATOL, rtol=ATOL)


def _dequantized_copy(src, dst):
  """An independent (torch) dequantization of an FP8 checkpoint into a float32 one."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(os.path.join(src, "model.safetensors"))
  out = {}
  for name, w in tensors.items():
    if name.endswith("_scale_inv"):
      continue
    if w.dtype == torch.float8_e4m3fn:
      s = tensors[name + "_scale_inv"]
      s = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :w.shape[-2], :w.shape[-1]]
      w = w.float() * s
    out[name] = w.float().contiguous()
  os.makedirs(dst)
  save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  config = json.load(open(os.path.join(src, "config.json")))
  del config["quantization_config"]
  json.dump(config, open(os.path.join(dst, "config.json"), "w"))


def test_fp8_copy_equals_transformers_on_its_dequantized_weights(hf_dirs, tmp_path):
  transformers = _transformers()
  root, ref = hf_dirs
  ckpt = hf.load(str(root / "per_expert"))
  hf.export(str(tmp_path / "fp8"), ckpt.params, ckpt.moe_state, ckpt.model, ckpt.moe, fp8=True)
  reader = safetensors_io.Reader(str(tmp_path / "fp8"))
  assert reader.tensors["model.layers.1.mlp.experts.3.up_proj.weight"][2] == "F8_E4M3"
  assert reader.tensors["model.layers.1.mlp.gate.weight"][2] == "F32"  # the router stays f32
  fp8_ckpt = hf.load(str(tmp_path / "fp8"))
  ours = _logits(fp8_ckpt)
  _dequantized_copy(tmp_path / "fp8", tmp_path / "dequantized")
  m = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dequantized",
                                                         attn_implementation="eager").eval()
  np.testing.assert_allclose(ours, _hf_logits(m), atol=ATOL, rtol=ATOL)
  assert np.abs(ours - ref["per_expert"]).max() > 1e-3  # FP8 rounding did happen


def test_export_loads_in_transformers(hf_dirs, tmp_path):
  transformers = _transformers()
  root, ref = hf_dirs
  ckpt = hf.load(str(root / "yarn"))
  hf.export(str(tmp_path / "out"), ckpt.params, ckpt.moe_state, ckpt.model, ckpt.moe,
            expert_layout="fused")
  m = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out",
                                                         attn_implementation="eager").eval()
  np.testing.assert_allclose(_hf_logits(m), ref["yarn"], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- without torch

MODEL = ModelConfig(vocab_size=64, embed_dim=32, num_layers=3, first_k_dense=1, dense_ffn_dim=48,
                    num_heads=4, num_kv_heads=4, q_lora_rank=24, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=32,
                    mtp_depth=1, pad_id=-1, rope_factor=4.0, rope_original_max_len=8,
                    rope_mscale=1.0, rope_mscale_all_dim=1.0)
MOE = MoEConfig(embed_dim=32, num_experts=16, top_k=4, expert_ffn_dim=16, n_groups=4,
                topk_groups=2, routed_scaling=2.5)


@pytest.fixture(scope="module")
def moe_jax_model():
  params, state = model.init(jax.random.key(0), MODEL, MOE)
  state = jax.tree.map(lambda b: b + jax.random.normal(jax.random.key(1), b.shape), state)
  return params, state


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_export_import_round_trip_is_bit_identical(moe_jax_model, tmp_path, layout):
  params, state = moe_jax_model
  files = hf.export(str(tmp_path), params, state, MODEL, MOE, expert_layout=layout,
                    max_shard_bytes=50_000)
  assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
  assert hf.read_config(str(tmp_path)) == (MODEL, MOE)
  ckpt = hf.load(str(tmp_path))
  for (path, a), (_, b) in zip(_leaves((params, state)), _leaves((ckpt.params, ckpt.moe_state))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_bfloat16_export_rounds_all_but_the_router(moe_jax_model, tmp_path):
  params, state = moe_jax_model
  hf.export(str(tmp_path), params, state, MODEL, MOE, dtype="bfloat16")
  ckpt = hf.load(str(tmp_path))
  bf16 = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(ckpt.params["layer_1"]["attn"]["wq_b"],
                                bf16(params["layer_1"]["attn"]["wq_b"]))
  np.testing.assert_array_equal(ckpt.params["layer_1"]["ffn"]["router"]["kernel"],
                                params["layer_1"]["ffn"]["router"]["kernel"])
  np.testing.assert_array_equal(ckpt.moe_state["layer_3"]["router_bias"],
                                state["layer_3"]["router_bias"])


def test_fp8_weights_requantize_to_the_stored_fp8(moe_jax_model, tmp_path):
  params, state = moe_jax_model
  hf.export(str(tmp_path / "a"), params, state, MODEL, MOE, fp8=True)
  ckpt = hf.load(str(tmp_path / "a"))
  hf.export(str(tmp_path / "b"), ckpt.params, ckpt.moe_state, MODEL, MOE, fp8=True)
  a = safetensors.numpy.load_file(str(tmp_path / "a" / "model.safetensors"))
  b = safetensors.numpy.load_file(str(tmp_path / "b" / "model.safetensors"))
  assert a.keys() == b.keys() and any(v.dtype == ml_dtypes.float8_e4m3fn for v in a.values())
  for name in a:
    assert a[name].tobytes() == b[name].tobytes(), name


def test_fp8_blocks_dequantize_with_ragged_edges(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(200, 300)).astype(np.float32) * np.linspace(0.1, 10, 300)
  q, scale = safetensors_io.quantize_blockwise(w, (128, 128))
  assert q.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (2, 3)
  safetensors.numpy.save_file({"w.weight": q, "w.weight_scale_inv": scale},
                              str(tmp_path / "model.safetensors"))
  got = safetensors_io.Reader(str(tmp_path)).read("w.weight")
  expect = q.astype(np.float32) * np.kron(scale, np.ones((128, 128), np.float32))[:200, :300]
  np.testing.assert_array_equal(got, expect)
  assert np.abs(got - w).max() <= np.abs(w).max() * 2.0**-3  # e4m3 keeps 3 mantissa bits
  np.testing.assert_array_equal(got, fp8.dequantize(q, scale, block_shape=(128, 128)))


def _rewrite(directory, change):
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  change(tensors)
  safetensors.numpy.save_file(tensors, path)


def _truncate(directory):
  path = os.path.join(directory, "model.safetensors")
  os.truncate(path, os.path.getsize(path) - 64)


def _config(directory, **changes):
  path = os.path.join(directory, "config.json")
  config = json.load(open(path))
  config.update(changes)
  json.dump(config, open(path, "w"))


BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"
MALFORMED = {
    "missing tensor": (lambda d: _rewrite(d, lambda t: t.pop(BIAS)), BIAS),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.update({BIAS: np.zeros(15, np.float32)})),
                    BIAS),
    "unknown architecture": (lambda d: _config(d, architectures=["LlamaForCausalLM"]),
                             "LlamaForCausalLM"),
    "truncated file": (_truncate, "model.safetensors"),
    "no config": (lambda d: os.remove(os.path.join(d, "config.json")), "config.json"),
    "integer weights": (lambda d: _rewrite(d, lambda t: t.update(
        {"model.norm.weight": np.zeros(32, np.int32)})), "model.norm.weight"),
    "fp8 without scales": (lambda d: _rewrite(d, lambda t: t.update(
        {"model.norm.weight": np.zeros(32, ml_dtypes.float8_e4m3fn)})), "model.norm.weight"),
}


@pytest.fixture(scope="module")
def exported(moe_jax_model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("exported") / "ckpt"
  hf.export(str(directory), *moe_jax_model, MODEL, MOE)
  return directory


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_fails_in_one_line_before_reading(exported, tmp_path, monkeypatch,
                                                              case):
  damage, named = MALFORMED[case]
  directory = tmp_path / "ckpt"
  shutil.copytree(exported, directory)
  damage(str(directory))
  monkeypatch.setattr(safetensors_io.Reader, "read", lambda *a, **k: pytest.fail("read data"))
  with pytest.raises(CheckpointError) as e:
    hf.load(str(directory))
  assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_mesh_that_cannot_split_a_parameter_fails_before_reading(exported, monkeypatch):
  monkeypatch.setattr(safetensors_io.Reader, "read", lambda *a, **k: pytest.fail("read data"))
  mesh = sharding.make_mesh(MeshConfig(tensor=8))  # 4 heads cannot split 8 ways
  with pytest.raises(CheckpointError, match=r"params/layer_0/attn/wkv_b \[16, 4, 16\]"):
    hf.load(str(exported), mesh=mesh)


def test_missing_shard_named_by_the_index_fails(moe_jax_model, tmp_path):
  files = hf.export(str(tmp_path), *moe_jax_model, MODEL, MOE, max_shard_bytes=50_000)
  os.remove(tmp_path / files[1])
  with pytest.raises(CheckpointError, match=f"{files[1]}: no such file"):
    hf.load(str(tmp_path))


def test_export_refuses_to_overwrite(exported, moe_jax_model):
  with pytest.raises(CheckpointError, match="exists"):
    hf.export(str(exported), *moe_jax_model, MODEL, MOE)


# ----------------------------------------------------------------------------- hf_eval


def _eval_config(**sections):
  """configs/hf_eval.py:runlocal as the typed config, with section overrides."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from moe_jax import config  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("hf_eval_config", "configs/hf_eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = module.get_config("runlocal").to_dict()
  for section, changes in sections.items():
    values[section].update(changes)
  return config.from_config_dict(values)


def test_hf_eval_scores_an_exported_byte_model(tmp_path):
  from experiments import hf_eval  # pylint: disable=import-outside-toplevel
  byte_model = dataclasses.replace(MODEL, vocab_size=259, pad_id=258, mtp_depth=0)
  params, state = model.init(jax.random.key(0), byte_model, MOE)
  hf.export(str(tmp_path / "ckpt"), params, state, byte_model, MOE)
  cfg = _eval_config(data=dict(source="synthetic"), mesh=dict(data=8),
                     train=dict(batch_size=8, seq_len=16))
  result = hf_eval.evaluate(cfg, str(tmp_path / "work"), str(tmp_path / "ckpt"))
  assert abs(result["eval_ce"] - np.log(259)) < 0.5  # a random model: about uniform
  assert isinstance(result["sample"], str) and result["prompt"]
  assert json.load(open(tmp_path / "work" / "hf_eval.json"))["eval_ce"] == result["eval_ce"]


def test_hf_eval_with_tokenizer_on_an_expert_parallel_mesh(hf_dirs, tmp_path):
  tokenizers = pytest.importorskip("tokenizers", reason=INTEROP)
  from experiments import hf_eval  # pylint: disable=import-outside-toplevel
  root, _ = hf_dirs
  ckpt = tmp_path / "ckpt"
  shutil.copytree(root / "per_expert", ckpt)
  words = [f"w{i}" for i in range(62)]  # ids 2..63; the config's bos 0 and eos 1 come first
  vocab = {w: i for i, w in enumerate(["<s>", "</s>"] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(ckpt / "tokenizer.json"))
  rng = np.random.default_rng(0)
  (tmp_path / "text").mkdir()
  for i in range(3):
    (tmp_path / "text" / f"{i}.txt").write_text(" ".join(rng.choice(words, 300)))
  cfg = _eval_config(data=dict(source="text", path=str(tmp_path / "text")),
                     mesh=dict(data=2, expert=4), moe=dict(parallelism="alltoall"),
                     train=dict(batch_size=8, seq_len=16))
  result = hf_eval.evaluate(cfg, str(tmp_path / "work"), str(ckpt))
  assert 0 < result["eval_ce"] < 10 and result["prompt"].startswith("<s> w")
  assert all(t in vocab for t in result["sample"].split())


def _hf_eval_command(tmp_path, nan_weights=False):
  """experiments.run on an exported random byte model in tmp_path/ckpt, on 8 devices."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  byte_model = dataclasses.replace(MODEL, vocab_size=259, pad_id=258, mtp_depth=0)
  params, state = model.init(jax.random.key(0), byte_model, MOE)
  if nan_weights:
    params = jax.tree.map(lambda p: p * np.nan, params)
  hf.export(str(tmp_path / "ckpt"), params, state, byte_model, MOE)
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=configs/hf_eval.py:runlocal",
       f"--config.hf_path={tmp_path / 'ckpt'}", "--config.data.source=synthetic",
       "--config.mesh.data=8", "--config.train.batch_size=8", "--config.train.seq_len=16",
       f"--workdir={tmp_path / 'work'}"], capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))  # conftest.py's 8 devices


def test_hf_eval_command(exported, tmp_path):
  del exported
  out = _hf_eval_command(tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["eval_ce"] > 0


def test_hf_eval_of_nan_weights_fails_in_one_line_and_writes_nothing(tmp_path):
  out = _hf_eval_command(tmp_path, nan_weights=True)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 3, out.stderr[-2000:]
  assert len(lines) == 1 and "held-out loss is nan" in lines[0], lines
  assert not (tmp_path / "work" / "hf_eval.json").exists()
