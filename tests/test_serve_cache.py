"""The engine never serves a wrong block and no request or file stops it: the disk tier's checks
(format, key, checksums, shapes), damaged files recomputed with a warning, per-request failures,
fresh entropy, top log-probs, and cold prompts prefilled together."""
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest

from moe_jax import checksum, model
from moe_jax.config import MoEConfig, ModelConfig
from moe_jax.serve import BadRequest, Engine, Request, kv
from moe_jax.serve.pages import CacheWarning, prefix_hashes
from moe_jax.serve.requests import EngineStopped

CFG = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, max_seq_len=64, init_std=0.2)
MOE = MoEConfig(embed_dim=32, num_experts=8, top_k=2, expert_ffn_dim=16)
PROMPT = [256] + [int(t) for t in np.random.default_rng(0).integers(0, 256, 20)]  # 5 full blocks


@pytest.fixture(scope="module")
def weights():
  params, state = model.init(jax.random.key(0), CFG, MOE)
  state = jax.tree.map(lambda b: 0.1 * jax.random.normal(jax.random.key(3), b.shape), state)
  return params, state


def _engine(weights, **kw):
  return Engine(*weights, CFG, MOE, **dict(dict(num_blocks=64, block_size=4, max_batch=8), **kw))


def _run(engine, prompt=PROMPT, **kw):
  done = engine.generate([Request(prompt, max_tokens=6, ignore_eos=True, **kw)])[0]
  return done.choices[0].token_ids, done.usage.prompt_cache_hit_tokens


@pytest.fixture(scope="module")
def cold(weights):
  return _run(_engine(weights, prefix_cache=False))[0]


def _block_files(engine, prompt=PROMPT):
  names = prefix_hashes(engine.root, prompt, 4, (len(prompt) - 1) // 4)
  return [os.path.join(engine.pages.disk.directory, n + ".npz") for n in names]


def _warm_disk(weights, directory, **kw):
  engine = _engine(weights, disk_dir=str(directory), **kw)
  _run(engine)
  engine.close()
  return engine


def test_an_fp8_cache_on_disk_is_never_read_by_a_float_engine(weights, cold, tmp_path):
  _warm_disk(weights, tmp_path, fp8_cache=True)
  with pytest.warns(CacheWarning, match="another cache format"):
    engine = _engine(weights, disk_dir=str(tmp_path))
  assert _run(engine) == (cold, 0)


def _flip(path):
  """One bit of an array's values (a flip in zip metadata that no reader uses changes nothing)."""
  with zipfile.ZipFile(path) as z:
    first = z.infolist()[0]
  with open(path, "r+b") as f:
    f.seek(first.header_offset + 30 + len(first.filename) + 128 + 5)  # local header, npy header
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def _reshaped(path):
  """A valid file of the right key and checksums, with arrays of another shape."""
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if not k.startswith("__")}
  arrays = {k: np.concatenate([v, v]) for k, v in arrays.items()}
  import json  # pylint: disable=import-outside-toplevel
  key = os.path.basename(path)[:-4]
  np.savez(path, **arrays, __key__=np.frombuffer(key.encode(), np.uint8),
           __checksums__=np.frombuffer(json.dumps(checksum.digests(arrays)).encode(), np.uint8))


DAMAGE = {
    "truncated": lambda path, other: os.truncate(path, os.path.getsize(path) // 2),
    "flipped": lambda path, other: _flip(path),
    "swapped": lambda path, other: shutil.copyfile(other, path),
    "directory": lambda path, other: (os.remove(path), os.mkdir(path)),
    "reshaped": lambda path, other: _reshaped(path),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_block_file_is_named_set_aside_and_recomputed(weights, cold, tmp_path, damage):
  files = _block_files(_warm_disk(weights, tmp_path))
  DAMAGE[damage](files[2], files[3])
  engine = _engine(weights, disk_dir=str(tmp_path))
  with pytest.warns(CacheWarning, match=os.path.basename(files[2])):
    tokens, hit = _run(engine)
  assert tokens == cold and hit == 2 * 4  # the two blocks before the damaged one
  assert os.path.isdir(os.path.join(os.path.dirname(files[2]), "set_aside"))
  assert engine.pages.disk.rejected == 1
  engine.close()  # writes the recomputed block over the set-aside one's place
  again = _engine(weights, disk_dir=str(tmp_path))
  assert _run(again) == (cold, 20)


def test_a_missing_or_directory_block_file_is_recomputed_and_eviction_survives(weights, cold,
                                                                              tmp_path):
  # 11 usable blocks: a second prompt of 33 tokens evicts the first prompt's first 5 to disk.
  engine = _engine(weights, num_blocks=12, disk_dir=str(tmp_path))
  _run(engine)
  other = [256] + [7] * 32
  files = _block_files(engine)
  os.mkdir(files[4])  # where eviction will write
  with pytest.warns(CacheWarning, match=os.path.basename(files[4])):
    _run(engine, other)
  assert engine.pages.disk.stored(os.path.basename(files[4])[:-4])
  os.remove(files[0])
  with pytest.warns(CacheWarning, match=os.path.basename(files[0]) + " is missing"):
    tokens, hit = _run(engine)
  assert tokens == cold and hit == 0
  assert not os.path.exists(files[0])  # recomputed, in memory only
  os.mkdir(files[0])
  with pytest.warns(CacheWarning, match=os.path.basename(files[0]) + " is not a regular file"):
    engine.close()  # shutdown writes past a directory too
  assert engine.pages.disk.stored(os.path.basename(files[0])[:-4]) and engine.alive


def test_blocks_evicted_in_part_are_found_in_memory_and_on_disk(weights, cold, tmp_path):
  """A prompt's oldest blocks are evicted first; the later ones, still in memory, count too."""
  engine = _engine(weights, num_blocks=12, disk_dir=str(tmp_path))
  _run(engine)  # 21 + 6 tokens: 6 full blocks cached
  _run(engine, [256] + [9] * 24)  # needs 8 blocks of the 11: evicts the first prompt's oldest
  assert 0 < engine.pages.evictions < 5
  assert _run(engine) == (cold, 20)


def test_a_lone_surrogate_is_that_requests_error_and_the_next_is_served(weights, cold):
  engine = _engine(weights)
  with pytest.raises(BadRequest, match=r"prompt=.*character 1.*surrogate"):
    engine.submit(Request("a\ud800b"))
  assert _run(engine)[0] == cold and engine.alive


def test_a_request_whose_callback_fails_ends_alone(weights, cold):
  engine = _engine(weights)
  def broken(*_):
    raise RuntimeError("client went away")
  bad = engine.submit(Request(PROMPT[:9], max_tokens=4), on_token=broken)
  good = engine.submit(Request(PROMPT, max_tokens=6, ignore_eos=True))
  done = {}
  while len(done) < 2:
    done.update(engine.step())
  assert done[bad].error.status == 500 and "client went away" in str(done[bad].error)
  assert done[good].error is None and done[good].choices[0].token_ids == cold
  assert engine.pages.available() == engine.pages.capacity and engine.reserved == 0


def test_a_failing_model_call_stops_the_engine_visibly(weights, monkeypatch):
  engine = _engine(weights)
  def broken(*_, **__):
    raise RuntimeError("device lost")
  monkeypatch.setattr(kv, "step", broken)
  engine.submit(Request(PROMPT))
  with pytest.raises(RuntimeError, match="device lost"):
    engine.step()
  assert not engine.alive and "device lost" in engine.error
  with pytest.raises(EngineStopped, match="device lost"):
    engine.submit(Request(PROMPT))


def test_unseeded_requests_differ_and_seeded_ones_repeat(weights):
  engine = _engine(weights)
  sample = lambda **kw: _run(engine, temperature=1.0, **kw)[0]
  assert sample() != sample()
  assert sample(seed=5) == sample(seed=5)


def test_top_logprobs_hold_k_entries_led_by_the_greedy_token(weights, cold):
  done = _engine(weights).generate([Request(PROMPT, max_tokens=6, ignore_eos=True,
                                            top_logprobs=3)])[0].choices[0]
  assert len(done.top_logprobs) == 6 and all(len(t) == 3 for t in done.top_logprobs)
  for token, logprob, top in zip(done.token_ids, done.logprobs, done.top_logprobs):
    best = max(top, key=top.get)
    assert best == token and top[token] == pytest.approx(logprob, abs=1e-6)
    assert sorted(top.values(), reverse=True) == list(top.values())


def test_a_prompt_longer_than_the_context_is_blamed_on_the_prompt(weights):
  with pytest.raises(BadRequest, match=r"^prompt=.*the prompt is 70 tokens; max_model_len=64"):
    _engine(weights).submit(Request([1] * 70, max_tokens=1))


def test_cold_prompts_are_prefilled_together_with_the_tokens_of_each_alone(weights):
  prompts = [PROMPT[:n] for n in (5, 21, 13, 9)] + [[256, 3, 4]]  # 4 rows of 16, 1 of 32
  requests = [Request(p[::-1], max_tokens=5, ignore_eos=True) for p in prompts]
  alone = [_engine(weights).generate([r])[0].choices[0].token_ids for r in requests]
  engine = _engine(weights)
  together = [c.choices[0].token_ids for c in engine.generate(requests)]
  assert together == alone and engine.stats["prefill_calls"] == 2


def test_the_openai_format_leaves_seed_unset_and_fills_top_logprobs(weights):
  from moe_jax.serve import openai_api  # pylint: disable=import-outside-toplevel
  request, options = openai_api.parse({"prompt": PROMPT, "max_tokens": 4, "logprobs": 2,
                                       "temperature": 0})
  assert request.seed is None and request.top_logprobs == 2 and options.logprobs
  engine = _engine(weights)
  body = openai_api.completion_json(engine.generate([request])[0], id="c", model="m", created=0,
                                    tokenizer=engine.tokenizer, logprobs=True)
  top = body["choices"][0]["logprobs"]["top_logprobs"]
  assert len(top) == 4 and all(1 <= len(t) <= 2 for t in top)  # two ids may share a text
