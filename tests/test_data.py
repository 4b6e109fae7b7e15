"""Tests for moe_jax.data: tokenizer, token files, corpora, caching and stateless batches."""
import os

import numpy as np
import pytest

from moe_jax import data
from moe_jax.config import ConfigError, DataConfig, ModelConfig


def _dataset(num_tokens=4097, seed=0):
  return data.Dataset("synthetic", data.synthetic_tokens(num_tokens, seed),
                      data.synthetic_tokens(1025, seed + 1))


def _write_texts(root, texts):
  for rel, text in texts.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _stream(ds):
  return data.decode(np.concatenate([ds.train, ds.heldout]))


# ---- Tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip_non_ascii():
  text = "def f(x):\n  return x  # héllo wörld, ✓ 日本語 🚀\n"
  ids = data.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
  assert data.decode(ids) == text
  wrapped = data.encode(text, bos=True, eos=True)
  assert wrapped[0] == data.BOS and wrapped[-1] == data.EOS
  assert data.decode(np.concatenate([wrapped, [data.PAD]])) == text
  assert data.decode(data.encode(b"ok\xff")) == "ok\ufffd"  # invalid UTF-8 is replaced
  assert data.VOCAB_SIZE == ModelConfig().vocab_size == data.PAD + 1


# ---- Token files --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_token_file_round_trip(tmp_path, dtype):
  tokens = np.arange(0, 70000, 7) % (np.iinfo(dtype).max + 1)
  path = str(tmp_path / "t.tok")
  assert data.write_tokens(path, [tokens[:5], tokens[5:]], dtype=dtype) == len(tokens)
  back = data.read_tokens(path)
  assert isinstance(back, np.memmap) and back.dtype == dtype
  np.testing.assert_array_equal(back, tokens)
  assert os.path.getsize(path) == 32 + len(tokens) * np.dtype(dtype).itemsize
  data.write_tokens(path, np.zeros(0, np.uint16))
  assert len(data.read_tokens(path)) == 0


def test_token_file_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad.tok"
  bad.write_bytes(b"not a token file at all, definitely not")
  with pytest.raises(ValueError, match="magic"):
    data.read_tokens(str(bad))
  good = str(tmp_path / "good.tok")
  data.write_tokens(good, np.arange(100))
  with open(good, "r+b") as f:
    f.truncate(32 + 150)
  with pytest.raises(ValueError, match="truncated"):
    data.read_tokens(good)
  with pytest.raises(ValueError, match=r"\[0, 65535\]"):
    data.write_tokens(str(tmp_path / "big.tok"), np.array([70000]))


def test_write_is_atomic(tmp_path):
  path = str(tmp_path / "t.tok")
  data.write_tokens(path, np.arange(10))

  def failing_chunks():
    yield np.arange(1000)
    raise OSError("disk on fire")

  with pytest.raises(OSError, match="disk on fire"):
    data.write_tokens(path, failing_chunks())
  np.testing.assert_array_equal(data.read_tokens(path), np.arange(10))
  assert os.listdir(tmp_path) == ["t.tok"]  # no temporary file left behind


# ---- Corpora ------------------------------------------------------------------------------------

def test_stdlib_corpus_found_and_split():
  files = data.stdlib_files()
  rels = [rel for _, rel in files]
  assert rels == sorted(rels) and all(rel.endswith(".py") for rel in rels)
  assert "os.py" in rels and "json/decoder.py" in rels
  assert not any(set(rel.split("/")) & {"site-packages", "test", "tests"} for rel in rels)
  assert sum(os.path.getsize(path) for path, _ in files) > 1 << 20
  train, heldout = data.split_files(files, 0.02)
  assert [set(side) for side in data.split_files(files[::-1], 0.02)] == [set(train), set(heldout)]
  assert train and heldout and not set(train) & set(heldout)
  assert sorted(train + heldout, key=lambda f: f[1]) == files
  # The split is per path: a subset of the files keeps each file's side.
  _, sub_heldout = data.split_files(files[::3], 0.02)
  assert set(sub_heldout) == set(heldout) & set(files[::3])


def test_stdlib_dataset_is_cached(tmp_path):
  cache = tmp_path / "cache"
  ds = data.load_dataset(DataConfig(source="stdlib"), cache_dir=str(cache))
  train, heldout = data.split_files(data.stdlib_files(), 0.02)
  expected = sum(os.path.getsize(path) + 2 for path, _ in heldout)
  assert len(ds.heldout) == expected and ds.heldout[0] == data.BOS and ds.heldout[-1] == data.EOS
  assert len(ds.train) > 1 << 20
  built = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  assert len(built) == 2 and all(name.startswith("stdlib-py") for name in built)
  again = data.load_dataset(DataConfig(source="stdlib"), cache_dir=str(cache))
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == built  # read, not rebuilt
  np.testing.assert_array_equal(again.heldout, ds.heldout)
  assert 0 < data.unigram_loss(ds) < np.log(data.VOCAB_SIZE)


def test_text_directory_glob_and_stale_cache(tmp_path, monkeypatch):
  corpus, cache = tmp_path / "corpus", tmp_path / "cache"
  texts = {f"d{i % 3}/f{i}.txt": f"file {i}: ünïcode ✓\n" * (i + 1) for i in range(8)}
  _write_texts(corpus, texts)
  (corpus / "blob.bin").write_bytes(b"\x00\x01binary")
  _write_texts(corpus, {".git/HEAD": "hidden\n", "d0/.hidden.txt": "hidden\n"})
  monkeypatch.setenv("MOE_JAX_CACHE", str(cache))  # the default cache dir follows the env var
  config = DataConfig(source="text", path=str(corpus), heldout_fraction=0.2)
  ds = data.load_dataset(config)
  stream = _stream(ds)
  assert all(text in stream for text in texts.values()) and "hidden" not in stream
  assert len(ds.train) and len(ds.heldout)
  first = sorted(p.name for p in cache.iterdir())

  (corpus / "d0/f0.txt").write_text("changed contents\n", encoding="utf-8")
  os.utime(corpus / "d0/f0.txt", ns=(1, 1))
  assert "changed contents" in _stream(data.load_dataset(config))
  second = sorted(p.name for p in cache.iterdir())
  assert len(second) == 2 and not set(first) & set(second)  # stale files replaced, not piled up

  globbed = data.load_dataset(DataConfig(source="text", path=str(corpus / "**" / "f1*.txt")),
                              cache_dir=str(cache))
  assert "file 1:" in _stream(globbed) and "file 2:" not in _stream(globbed)


def test_single_text_file_holds_out_its_tail(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("abcdefghij" * 100, encoding="utf-8")
  ds = data.load_dataset(DataConfig(source="text", path=str(path), heldout_fraction=0.1),
                         cache_dir=str(tmp_path / "cache"))
  assert (len(ds.train), len(ds.heldout)) == (902, 100)
  np.testing.assert_array_equal(np.concatenate([ds.train, ds.heldout]),
                                data.encode(path.read_text(), bos=True, eos=True))


def test_prepare_tokens_cli_and_tokens_source(tmp_path, capsys):
  _write_texts(tmp_path / "in", {"a.txt": "alpha\n", "sub/b.md": "beta ✓\n"})
  out = str(tmp_path / "out" / "corpus.tok")
  assert data.main(["--input", str(tmp_path / "in"), "--output", out]) == 0
  assert "wrote 19 tokens" in capsys.readouterr().out
  expected = np.concatenate([data.encode("alpha\n", bos=True, eos=True),
                             data.encode("beta ✓\n", bos=True, eos=True)])
  np.testing.assert_array_equal(data.read_tokens(out), expected)
  ds = data.load_dataset(DataConfig(source="tokens", path=out, heldout_fraction=0.25))
  assert len(ds.heldout) == 5  # round(19 * 0.25)
  np.testing.assert_array_equal(np.concatenate([ds.train, ds.heldout]), expected)
  assert data.prepare_tokens(str(tmp_path / "in" / "*.txt"), out) == 8
  with pytest.raises(SystemExit) as exit_info:  # a usage error, not a traceback
    data.main(["--input", str(tmp_path / "none*.txt"), "--output", out])
  assert exit_info.value.code == 2 and "data.path=" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_missing_path_is_a_config_error(tmp_path, source):
  cache = tmp_path / "cache"
  missing = str(tmp_path / "nowhere" / "*.txt")
  with pytest.raises(ConfigError) as err:
    data.load_dataset(DataConfig(source=source, path=missing), cache_dir=str(cache))
  message = str(err.value)
  assert message.startswith("data.path=") and missing in message and "\n" not in message
  assert not cache.exists()  # failed before anything was written


def test_tokens_source_rejects_a_non_token_file(tmp_path):
  path = tmp_path / "plain.txt"
  path.write_text("just text, not tokens\n", encoding="utf-8")
  with pytest.raises(ConfigError, match=r"data\.path=.*not a moe_jax token file"):
    data.load_dataset(DataConfig(source="tokens", path=str(path)))


def test_synthetic_source():
  ds = data.load_dataset(DataConfig(source="synthetic"))
  assert len(ds.train) + len(ds.heldout) == data.SYNTHETIC_TOKENS
  np.testing.assert_array_equal(ds.train[:1000], data.synthetic_tokens(1000))
  allowed = set(range(ord("a"), ord("z") + 1)) | {data.BOS, data.EOS}
  assert set(np.unique(ds.train).tolist()) <= allowed
  bos = np.flatnonzero(ds.train == data.BOS)
  assert bos[0] == 0 and (ds.train[bos[1:] - 1] == data.EOS).all()  # whole documents, in order
  # Structure a model can learn: most next letters are predictable from the context.
  text = data.decode(ds.heldout[:5000])
  successor = np.mean([ord(b) - ord(a) in (1, -25) for a, b in zip(text, text[1:])])
  assert successor > 0.25
  assert 2.5 < data.unigram_loss(ds) < 3.6


def test_unigram_loss_by_hand():
  ds = data.Dataset("hand", np.array([0, 0, 0, 1], np.uint16), np.array([0, 1], np.uint16),
                    vocab_size=3)
  # Add-one smoothing: p(0) = 4/7, p(1) = 2/7.
  assert data.unigram_loss(ds) == pytest.approx(-(np.log(4 / 7) + np.log(2 / 7)) / 2)


# ---- Batches ------------------------------------------------------------------------------------

def test_batch_is_a_pure_function():
  ds = _dataset()
  kwargs = dict(batch_size=8, seq_len=16, seed=3)
  a = data.get_batch(ds, "train", 7, **kwargs)
  b = data.get_batch(_dataset(), "train", 7, **kwargs)
  assert a["inputs"].shape == a["targets"].shape == (8, 16) and a["inputs"].dtype == np.int32
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  other = data.get_batch(ds, "train", 7, batch_size=8, seq_len=16, seed=4)
  assert not np.array_equal(a["inputs"], other["inputs"])
  windows = data.window_indices(data.num_windows(len(ds.train), 16), 7, 8, 3)
  np.testing.assert_array_equal(a["inputs"][:, 0], ds.train[windows * 16])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_global_batch(process_count):
  ds = _dataset()
  kwargs = dict(batch_size=8, seq_len=16, seed=1)
  whole = data.get_batch(ds, "train", 5, **kwargs)
  shards = [data.get_batch(ds, "train", 5, process_index=i, process_count=process_count, **kwargs)
            for i in range(process_count)]
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), whole[key])
  with pytest.raises(ConfigError, match="train.batch_size=8"):
    data.get_batch(ds, "train", 0, process_count=3, **kwargs)


def test_no_window_repeats_within_an_epoch():
  seq_len, n = 4, 60
  tokens = np.arange(n * seq_len + 1, dtype=np.uint16)  # each window's first token names it
  ds = data.Dataset("range", tokens, tokens)
  batch = 7  # does not divide n: some batches straddle two epochs
  starts = np.concatenate([data.get_batch(ds, "train", s, batch_size=batch, seq_len=seq_len,
                                          seed=0)["inputs"][:, 0] for s in range(-(-2 * n // batch))])
  windows = starts // seq_len
  for epoch in range(2):
    assert sorted(windows[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(windows[:n], windows[n:2 * n])  # each epoch is reshuffled


def test_resume_needs_no_state():
  ds = _dataset()
  kwargs = dict(batch_size=16, seq_len=32, seed=5)
  run = [data.get_batch(ds, "train", s, **kwargs)["inputs"] for s in range(12)]
  data._epoch_order.cache_clear()  # a fresh process: nothing remembered
  resumed = [data.get_batch(_dataset(), "train", s, **kwargs)["inputs"] for s in range(7, 12)]
  for a, b in zip(run[7:], resumed):
    np.testing.assert_array_equal(a, b)


def test_eval_batches_are_fixed_and_held_out():
  ds = _dataset()
  a = data.get_eval_batch(ds, 1, batch_size=4, seq_len=16)
  np.testing.assert_array_equal(a["inputs"], data.get_eval_batch(ds, 1, batch_size=4,
                                                                 seq_len=16)["inputs"])
  windows = data.window_indices(data.num_windows(len(ds.heldout), 16), 1, 4, data.EVAL_SEED)
  np.testing.assert_array_equal(a["inputs"][:, 0], ds.heldout[windows * 16])
  with pytest.raises(ValueError, match="split="):
    data.get_batch(ds, "valid", 0, batch_size=4, seq_len=16, seed=0)
  with pytest.raises(ValueError, match="needs > seq_len"):
    data.get_batch(ds, "heldout", 0, batch_size=4, seq_len=4096, seed=0)
