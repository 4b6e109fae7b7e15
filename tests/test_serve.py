"""The inference engine against the model's full forward: paged cache, prefix cache and its disk
tier, continuous batching, sampling, stops, a pool too small, and expert parallelism."""
import dataclasses
import os
import runpy
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
from moe_jax import model, sharding
from moe_jax.config import MeshConfig, MoEConfig, ModelConfig, from_config_dict
from moe_jax.serve import BadRequest, Engine, Request, kv

_BASE = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, head_dim=8, num_kv_heads=2, max_seq_len=64, init_std=0.2)
CONFIGS = {"mla": _BASE, "mha": dataclasses.replace(_BASE, attention="mha")}
MOE = MoEConfig(embed_dim=32, num_experts=8, top_k=2, expert_ffn_dim=16)
LENGTHS = (5, 11, 3, 17)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
  cfg = CONFIGS[request.param]
  params, state = model.init(jax.random.key(0), cfg, MOE)
  state = jax.tree.map(lambda b: 0.1 * jax.random.normal(jax.random.key(3), b.shape), state)
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(0, 256, size=n)] for n in LENGTHS]
  return cfg, params, state, prompts


def _engine(setup, **kw):
  cfg, params, state, _ = setup
  kw = dict(dict(num_blocks=64, block_size=4, max_batch=8), **kw)
  return Engine(params, state, cfg, MOE, **kw)


def _tokens(completions):
  return [[c.token_ids for c in done.choices] for done in completions]


def test_greedy_tokens_and_logprobs_equal_the_full_forward(setup):
  cfg, params, state, prompts = setup
  done = _engine(setup).generate([Request(p, max_tokens=9, ignore_eos=True) for p in prompts])
  for prompt, completion in zip(prompts, done):
    choice = completion.choices[0]
    assert len(choice.token_ids) == 9 and choice.finish_reason == "length"
    logits, _ = model.apply(params, state, jnp.asarray([prompt + choice.token_ids]), cfg, MOE)
    P = len(prompt)
    steps = np.asarray(logits[0, P - 1:P - 1 + 9])
    assert np.abs(steps).max() > 1.0  # logits of O(1): 1e-4 means something
    np.testing.assert_array_equal(choice.token_ids, steps.argmax(-1))
    expected = np.asarray(jax.nn.log_softmax(steps, -1))[np.arange(9), choice.token_ids]
    np.testing.assert_allclose(choice.logprobs, expected, atol=1e-4, rtol=0)
    assert completion.usage.prompt_tokens == P and completion.usage.completion_tokens == 9


def test_cold_warm_and_restarted_cache_give_the_same_tokens(setup, tmp_path):
  _, _, _, prompts = setup
  shared = prompts[3][:12]  # three full blocks of 4 shared by every prompt
  requests = [Request(shared + p, max_tokens=6, ignore_eos=True, temperature=t, seed=s)
              for p, t, s in zip(prompts, (0.0, 0.9, 0.0, 1.2), (0, 1, 2, 3))]
  cold_engine = _engine(setup, disk_dir=str(tmp_path))
  cold = cold_engine.generate(requests)
  assert cold[0].usage.prompt_cache_hit_tokens == 0
  assert sum(c.usage.prompt_cache_hit_tokens for c in cold[1:]) >= 3 * 12  # in one batch
  warm = cold_engine.generate(requests)
  assert _tokens(warm) == _tokens(cold)
  assert all(c.usage.prompt_cache_hit_tokens >= 12 for c in warm)
  for a, b in zip(cold, warm):  # other batch shapes: equal to float32 rounding
    np.testing.assert_allclose(a.choices[0].logprobs, b.choices[0].logprobs, atol=1e-5)
  cold_engine.close()
  # A new process: the blocks come back from the disk tier only.
  restarted = _engine(setup, disk_dir=str(tmp_path))
  again = restarted.generate(requests)
  assert _tokens(again) == _tokens(cold)
  assert restarted.pages.disk.reads >= 3 and again[0].usage.prompt_cache_hit_tokens >= 12


def test_evicted_blocks_come_back_from_disk(setup, tmp_path):
  _, _, _, prompts = setup
  first = Request(prompts[3], max_tokens=4, ignore_eos=True)
  engine = _engine(setup, num_blocks=12, disk_dir=str(tmp_path))
  reference = engine.generate([first])
  # Fill the pool with other prompts, so the first prompt's blocks are evicted to disk.
  engine.generate([Request(p[::-1] * 2, max_tokens=4, ignore_eos=True) for p in prompts[1:]])
  assert engine.pages.evictions > 0 and engine.pages.disk.writes > 0
  back = engine.generate([first])
  assert _tokens(back) == _tokens(reference)
  assert back[0].usage.prompt_cache_hit_tokens == 16 and engine.pages.disk.reads > 0


def test_prefix_cache_off_computes_every_prompt(setup):
  _, _, _, prompts = setup
  engine = _engine(setup, prefix_cache=False)
  requests = [Request(prompts[3], max_tokens=3, ignore_eos=True)] * 2
  done = engine.generate(requests)
  assert [d.usage.prompt_cache_hit_tokens for d in done] == [0, 0]
  assert engine.stats["prompt_tokens_prefilled"] == 2 * len(prompts[3])


def test_an_mla_slot_holds_the_latent_and_the_rope_key_only():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "deepseek_v3_671b.py")
  v3 = from_config_dict(runpy.run_path(path)["get_config"]()).model
  assert kv.values_per_token(v3) == 512 + 64 == 576
  mha = dataclasses.replace(v3, attention="mha", num_kv_heads=v3.num_heads,
                            head_dim=v3.qk_nope_head_dim + v3.qk_rope_head_dim)
  assert kv.values_per_token(mha) == 2 * 128 * 192  # keys and values of every head
  pool = jax.eval_shape(lambda: kv.init_pool(_BASE, 4, 2))
  assert {k: v.shape for k, v in pool["layer_0"].items()} == {"ckv": (4, 2, 16),
                                                               "k_rope": (4, 2, 4)}


def test_n_completions_prefill_the_prompt_once(setup):
  _, _, _, prompts = setup
  engine = _engine(setup, max_batch=16)
  done = engine.generate([Request(prompts[3], max_tokens=5, n=16, temperature=1.0, seed=7,
                                  ignore_eos=True)])[0]
  assert engine.stats["prompt_tokens_prefilled"] == len(prompts[3])
  assert [c.index for c in done.choices] == list(range(16))
  assert len({tuple(c.token_ids) for c in done.choices}) > 8  # different streams per choice
  assert done.usage.prompt_tokens == len(prompts[3]) and done.usage.completion_tokens == 80
  # Each choice alone (n=1 with its own choice index is not expressible): same seed, same tokens.
  again = _engine(setup, max_batch=16).generate([Request(prompts[3], max_tokens=5, n=16,
                                                         temperature=1.0, seed=7,
                                                         ignore_eos=True)])[0]
  assert _tokens([again]) == _tokens([done])


class Letters:
  """One letter per token, so a random model's text is plain ASCII and cuts are exact."""
  eos_id = 258

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_exactly_and_stop_tokens_end(setup):
  engine = _engine(setup, tokenizer=Letters())
  prompt = "def f(x):"
  full = engine.generate([Request(prompt, max_tokens=20, ignore_eos=True)])[0].choices[0]
  assert len(full.token_ids) == 20
  stop = full.text[7:9]
  cut = full.text.find(stop)
  done = engine.generate([Request(prompt, max_tokens=20, stop=[stop, "never"],
                                  ignore_eos=True)])[0].choices[0]
  assert done.finish_reason == "stop" and done.text == full.text[:cut]
  assert done.token_ids == full.token_ids[:len(done.token_ids)]
  assert len(done.token_ids) == len(done.logprobs) == cut
  ended = engine.generate([Request(prompt, max_tokens=20, stop_token_ids=[full.token_ids[4]],
                                   ignore_eos=True)])[0].choices[0]
  first = full.token_ids.index(full.token_ids[4])
  assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[:first]


def test_a_small_pool_queues_requests_and_keeps_every_sequence_intact(setup):
  _, _, _, prompts = setup
  requests = [Request(p, max_tokens=8, ignore_eos=True) for p in prompts]
  alone = [_engine(setup).generate([r])[0] for r in requests]
  # 7 usable blocks of 4: the 17-token prompt needs 6, so requests must wait for each other.
  small = _engine(setup, num_blocks=8, prefix_cache=False)
  together = small.generate(requests)
  assert _tokens(together) == _tokens(alone)
  assert small.pages.available() == small.pages.capacity and small.reserved == 0
  with pytest.raises(BadRequest, match=r"need 8 KV blocks of 4 tokens; the pool has 7"):
    small.generate([Request(prompts[3] + [1] * 8, max_tokens=8)])
  with pytest.raises(BadRequest, match=r"temperature=-1: must be a number in \[0, 100\]"):
    small.generate([Request("x", temperature=-1)])
  with pytest.raises(BadRequest, match="max_seq_len=64"):
    small.generate([Request("x", max_tokens=64)])


def test_expert_parallel_mesh_gives_the_single_device_tokens(setup):
  cfg, params, state, prompts = setup
  requests = [Request(p, max_tokens=6, ignore_eos=True, temperature=t, seed=1)
              for p, t in zip(prompts, (0.0, 0.7, 0.0, 0.7))]
  single = _engine(setup).generate(requests)
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  moe_cfg = dataclasses.replace(MOE, parallelism="alltoall")
  put = lambda tree, axes: jax.device_put(tree, sharding.shard_like(axes, mesh))
  engine = Engine(put(params, model.param_axes(cfg, moe_cfg)),
                  put(state, model.moe_state_axes(cfg, moe_cfg)), cfg, moe_cfg, num_blocks=64,
                  block_size=4, max_batch=8, mesh=mesh)
  assert engine.params["layer_1"]["ffn"]["experts"]["up"].sharding.spec[0] == "expert"
  assert engine.min_batch == 8
  assert _tokens(engine.generate(requests)) == _tokens(single)


def test_fp8_latent_storage_is_close_to_the_float_cache(setup):
  cfg, _, _, prompts = setup
  requests = [Request(p, max_tokens=8, ignore_eos=True) for p in prompts]
  exact = _engine(setup).generate(requests)
  fp8_engine = _engine(setup, fp8_cache=True)
  approx = fp8_engine.generate(requests)
  # float32 values (4 bytes) become 1 byte, plus one float32 scale per token and leaf.
  values = [int(np.prod(shape)) for shape in kv.slot_shapes(cfg).values()]
  assert kv.bytes_per_token(_engine(setup).pool) == cfg.num_layers * 4 * sum(values)
  assert kv.bytes_per_token(fp8_engine.pool) == cfg.num_layers * sum(v + 4 for v in values)
  # Greedy paths part at the first near-tie; up to there the log-probs must stay close.
  common, worst = [], 0.0
  for x, y in zip(exact, approx):
    a, b = x.choices[0], y.choices[0]
    n = next((i for i, (s, t) in enumerate(zip(a.token_ids, b.token_ids)) if s != t), 8)
    common.append(n)
    worst = max([worst] + [abs(p - q) for p, q in zip(a.logprobs[:n], b.logprobs[:n])])
  print("fp8 cache: tokens in common", common, "largest log-prob difference", worst)
  # (e4m3 keeps 3 mantissa bits; this random model at init_std 0.2 is sharper than a trained one)
  assert np.mean(common) >= 3 and 0 < worst < 0.25, (common, worst)


def test_sample_experiment_runs_through_the_engine(env, config_file, reference):
  result = runs.run(env, config_file, reference, "--config.experiment=sample")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "greedy samples from step 12:" in out
  texts = out.split("-" * 60 + "\n")[1:]
  assert [t[:len(p)] for t, p in zip(texts, ("def ", "import ", "class "))] == [
      "def ", "import ", "class "]
  assert all(len(t.rstrip("\n")) > len("import ") for t in texts)


def test_requests_refuse_bools_and_bad_stop_ids(setup):
  engine = _engine(setup)
  for request, message in ((Request("x", temperature=True), "temperature=True"),
                           (Request([1, True]), r"prompt=\[1, True\]"),
                           (Request("x", stop_token_ids=[-1]), r"stop_token_ids=\[-1\]"),
                           (Request("x", stop_token_ids="a"), "stop_token_ids='a'")):
    with pytest.raises(BadRequest, match=message):
      engine.generate([request])
