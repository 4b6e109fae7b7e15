"""Deterministic token pipelines: byte tokenizer, token files, corpora and stateless batches.

Sources (`DataConfig.source`):
  stdlib     the `*.py` files of this Python's standard library, found with `sysconfig`, so a run
             never needs a download. Tokenized once into a cache file.
  text       a directory (every text file below it), a glob, or one file. Cached the same way.
  tokens     a file written by `prepare_tokens` / `python -m moe_jax.data`, read with np.memmap.
  synthetic  a generated copying/counting task with known structure, for tests and smoke runs.

Every document is BOS + its UTF-8 bytes + EOS; the documents of a split are concatenated into one
stream. Batches carry no iterator state: the global batch of step i is a pure function of
(seed, step), and each process takes its own contiguous rows of it, so resuming at step i is just
calling `get_batch` with i.

Token file: a 32-byte little-endian header (magic, format version, dtype code, token count, 8
reserved bytes) followed by the tokens; written to a temporary file and renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import pathlib
import struct
import sys
import sysconfig
import tempfile
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from moe_jax.config import ConfigError, DataConfig

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
SPLITS = ("train", "heldout")
SYNTHETIC_TOKENS = 1 << 20       # size of the generated stream for source="synthetic"
EVAL_SEED = 0x5EED               # fixed, so runs with different training seeds share an eval set

_MAGIC = b"MOEJTOK\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQ8x")
_DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
# Test packages and installed packages are not the standard library proper (see stdlib_files).
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def encode(text: Union[str, bytes], *, bos: bool = False, eos: bool = False) -> np.ndarray:
  """UTF-8 bytes as ids 0..255 (uint16), optionally wrapped in BOS/EOS."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  ids = np.empty(len(data) + bos + eos, np.uint16)
  ids[bos:bos + len(data)] = np.frombuffer(data, np.uint8)
  if bos:
    ids[0] = BOS
  if eos:
    ids[-1] = EOS
  return ids


def decode(ids: Iterable[int]) -> str:
  """Text of the byte ids; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids if hasattr(ids, "__len__") else list(ids)).reshape(-1)
  return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")


def write_tokens(path: str, tokens: Union[np.ndarray, Iterable[np.ndarray]], *,
                 dtype=np.uint16) -> int:
  """Writes an array (or an iterable of chunks) as a token file, atomically; returns the count.

  Readers never see a partial file: a failure part-way leaves any old file at `path` untouched.
  """
  dtype = np.dtype(dtype).newbyteorder("<")
  codes = {d: c for c, d in _DTYPE_CODES.items()}
  if dtype not in codes:
    raise ValueError(f"dtype={dtype}: must be uint16 or uint32")
  chunks = [tokens] if isinstance(tokens, np.ndarray) else tokens
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  count, limit = 0, np.iinfo(dtype).max
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(_HEADER.pack(_MAGIC, _VERSION, codes[dtype], 0))
      for chunk in chunks:
        chunk = np.asarray(chunk).reshape(-1)
        if chunk.size and (chunk.min() < 0 or chunk.max() > limit):
          raise ValueError(f"token ids must lie in [0, {limit}] for dtype {dtype}")
        f.write(chunk.astype(dtype, copy=False).tobytes())
        count += chunk.size
      f.seek(0)
      f.write(_HEADER.pack(_MAGIC, _VERSION, codes[dtype], count))
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a prepared corpus from other users
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return count


def read_tokens(path: str) -> np.ndarray:
  """The tokens of a token file as a read-only np.memmap; ValueError if it is not one."""
  with open(path, "rb") as f:
    header = f.read(_HEADER.size)
  if len(header) < _HEADER.size or header[:8] != _MAGIC:
    raise ValueError(f"{path} is not a moe_jax token file (bad magic)")
  _, version, code, count = _HEADER.unpack(header)
  if version != _VERSION or code not in _DTYPE_CODES:
    raise ValueError(f"{path}: unsupported token file version {version} / dtype code {code}")
  dtype = _DTYPE_CODES[code]
  expected, size = _HEADER.size + count * dtype.itemsize, os.path.getsize(path)
  if size != expected:
    raise ValueError(f"{path}: {size} bytes but the header implies {expected} (truncated?)")
  if count == 0:
    return np.zeros(0, dtype)  # mmap cannot map zero bytes
  return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER.size, shape=(count,))


Files = list[tuple[str, str]]  # (absolute path, relative posix path), sorted by relative path


def _walk(root: str, skip) -> Files:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not skip(d)]
    for name in filenames:
      if skip(name):
        continue
      path = os.path.abspath(os.path.join(dirpath, name))
      found.append((path, pathlib.Path(os.path.relpath(path, root)).as_posix()))
  return found


def stdlib_files(root: Optional[str] = None) -> Files:
  """The standard library's `*.py` files, without test packages and installed packages.

  Debian and Ubuntu ship the test suite as a separate package; leaving tests out makes the corpus
  the same set of modules on every install, and keeps out the tests' deliberately odd inputs
  (bad encodings, huge generated literals) that would skew a small model's byte statistics.
  """
  root = root or sysconfig.get_paths()["stdlib"]
  found = _walk(root, lambda d: d in _STDLIB_SKIP_DIRS)
  return sorted((f for f in found if f[1].endswith(".py")), key=lambda f: f[1])


def _is_text(path: str) -> bool:
  with open(path, "rb") as f:
    return b"\x00" not in f.read(8192)  # the usual heuristic: binary files hold NUL bytes early


def text_files(path: str) -> Files:
  """Text files named by `path`: one file, a directory (recursively, skipping hidden entries) or
  a glob (`**` allowed). Relative paths are taken from the directory or the glob's fixed prefix."""
  hidden = lambda name: name.startswith(".")
  if os.path.isfile(path):
    found = [(os.path.abspath(path), os.path.basename(path))]
  elif os.path.isdir(path):
    found = _walk(path, hidden)
  else:
    prefix = []
    for part in pathlib.PurePath(path).parts:
      if any(c in part for c in "*?["):
        break
      prefix.append(part)
    root = os.path.join(*prefix) if prefix else "."
    found = []
    for match in glob.glob(path, recursive=True):
      matches = _walk(match, hidden) if os.path.isdir(match) else [(os.path.abspath(match), "")]
      found += [(p, pathlib.Path(os.path.relpath(p, root)).as_posix()) for p, _ in matches]
  return sorted(((p, r) for p, r in dict(found).items() if _is_text(p)), key=lambda f: f[1])


def _heldout_score(rel: str) -> float:
  digest = hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def split_files(files: Files, heldout_fraction: float) -> tuple[Files, Files]:
  """(train, heldout): a file is held out when a hash of its relative path is below the fraction,
  so its split never depends on which other files exist. With few files, each split keeps at
  least one (the lowest hash goes to heldout, the highest to train)."""
  scores = [_heldout_score(rel) for _, rel in files]
  heldout = {i for i, s in enumerate(scores) if s < heldout_fraction}
  if len(files) >= 2 and not heldout:
    heldout = {int(np.argmin(scores))}
  if len(files) >= 2 and len(heldout) == len(files):
    heldout.discard(int(np.argmax(scores)))
  return ([f for i, f in enumerate(files) if i not in heldout],
          [f for i, f in enumerate(files) if i in heldout])


def _documents(files: Files) -> Iterable[np.ndarray]:
  for path, _ in files:
    with open(path, "rb") as f:
      yield encode(f.read(), bos=True, eos=True)


def default_cache_dir() -> str:
  """$MOE_JAX_CACHE, else ~/.cache/moe_jax."""
  return os.environ.get("MOE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "moe_jax")


def _check_cache_dir(cache_dir: str):
  """ConfigError (one line) if the token cache cannot be a directory: a file is in the way."""
  path = os.path.abspath(cache_dir)
  while path and not os.path.exists(path):
    path = os.path.dirname(path) if os.path.dirname(path) != path else ""
  if path and not os.path.isdir(path):
    name = "MOE_JAX_CACHE" if os.environ.get("MOE_JAX_CACHE") else "the token cache"
    raise ConfigError(f"{name}={cache_dir!r}: {path} is a file; the cache must be a directory "
                      "(set MOE_JAX_CACHE to one)")


def _fingerprint(files: Files, *extra) -> str:
  h = hashlib.blake2b(repr((_VERSION,) + extra).encode("utf-8"), digest_size=8)
  for path, rel in files:
    st = os.stat(path)
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
  return h.hexdigest()


def _cached(files: Files, cache_dir: str, tag: str, split: str, fingerprint: str) -> np.ndarray:
  """Tokens of `files`, tokenized once into `<tag>-<split>-<fingerprint>.tok`."""
  path = os.path.join(cache_dir, f"{tag}-{split}-{fingerprint}.tok")
  if os.path.exists(path):
    with contextlib.suppress(ValueError):  # a damaged cache file is rebuilt, never trusted
      return read_tokens(path)
  write_tokens(path, _documents(files))
  prefix = os.path.join(glob.escape(cache_dir), glob.escape(f"{tag}-{split}-"))
  for stale in glob.glob(prefix + "*.tok"):
    if os.path.basename(stale) != os.path.basename(path):
      with contextlib.suppress(FileNotFoundError):  # another process may have removed it
        os.remove(stale)
  return read_tokens(path)


def _split_tokens(tokens: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  n = len(tokens)
  heldout = min(n - 1, max(1, round(n * heldout_fraction)))
  return tokens[:n - heldout], tokens[n - heldout:]


def _file_corpus(files: Files, tag: str, heldout_fraction: float, cache_dir: str):
  fingerprint = _fingerprint(files, heldout_fraction)
  if len(files) == 1:  # nothing to split by file: hold out the tail of its tokens
    return _split_tokens(_cached(files, cache_dir, tag, "all", fingerprint), heldout_fraction)
  train, heldout = split_files(files, heldout_fraction)
  return (_cached(train, cache_dir, tag, "train", fingerprint),
          _cached(heldout, cache_dir, tag, "heldout", fingerprint))


def _no_match(value, source: str, allowed: str):
  raise ConfigError(f"data.path={value!r}: {allowed} (source={source!r})")


def prepare_tokens(paths_or_glob: Union[str, Sequence[str]], out_path: str) -> int:
  """Tokenizes text files (files, directories or globs) into one token file; returns its count."""
  entries = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else paths_or_glob
  files = {}
  for entry in map(os.fspath, entries):
    found = text_files(entry)
    if not found:
      _no_match(entry, "text", "matches no text file; give a file, a directory or a glob")
    files.update(found)
  return write_tokens(out_path, _documents(list(files.items())))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Two token streams; `train` and `heldout` may be memory-mapped."""
  name: str
  train: np.ndarray
  heldout: np.ndarray
  vocab_size: int = VOCAB_SIZE

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise ValueError(f"split={name!r}: must be one of {SPLITS}")
    return self.train if name == "train" else self.heldout


def _synthetic_block(rng: np.random.Generator, num_docs: int) -> np.ndarray:
  copy = rng.random(num_docs) < 0.5
  period = rng.integers(4, 17, num_docs)
  length = np.where(copy, period * rng.integers(2, 7, num_docs), rng.integers(8, 65, num_docs))
  start = rng.integers(0, 26, num_docs)
  pool = rng.integers(0, 26, int(period.sum()))  # the copy documents' patterns, back to back
  doc = np.repeat(np.arange(num_docs), length)
  j = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
  pattern = pool[np.cumsum(period)[doc] - period[doc] + j % period[doc]]
  body = np.where(copy[doc], pattern, (start[doc] + j) % 26) + ord("a")
  ends = np.cumsum(length + 2)
  out = np.empty(ends[-1], np.uint16)
  is_body = np.ones(ends[-1], bool)
  is_body[ends - length - 2] = is_body[ends - 1] = False
  out[ends - length - 2], out[ends - 1], out[is_body] = BOS, EOS, body
  return out


def synthetic_tokens(num_tokens: int, seed: int = 0) -> np.ndarray:
  """A learnable stream of lowercase documents: half repeat a random 4-16 letter pattern 2-6
  times (solved by copying from context), half count through the alphabet from a random letter
  (solved by a successor rule). A model that learns either beats the unigram loss clearly.
  Generated in fixed blocks, so a shorter stream is a prefix of a longer one."""
  rng = np.random.Generator(np.random.PCG64(seed))
  blocks, total = [np.zeros(0, np.uint16)], 0
  while total < num_tokens:
    blocks.append(_synthetic_block(rng, 1024))
    total += len(blocks[-1])
  return np.concatenate(blocks)[:num_tokens]


def load_dataset(config: DataConfig, *, cache_dir: Optional[str] = None) -> Dataset:
  """The train and held-out token streams of `config`; text sources are tokenized once into
  `cache_dir` (default `default_cache_dir()`). A bad `data.path` fails before anything is written."""
  cache_dir = cache_dir or default_cache_dir()
  fraction = config.heldout_fraction
  if config.source == "synthetic":
    train, heldout = _split_tokens(synthetic_tokens(SYNTHETIC_TOKENS), fraction)
    return Dataset("synthetic", train, heldout)
  if config.source == "tokens":
    if not os.path.isfile(config.path):
      _no_match(config.path, "tokens", "no such file; give a file written by prepare_tokens")
    try:
      train, heldout = _split_tokens(read_tokens(config.path), fraction)
    except ValueError as e:
      raise ConfigError(f"data.path={config.path!r}: {e}; prepare one with "
                        "`python -m moe_jax.data --input GLOB --output FILE`") from None
    return Dataset(f"tokens:{config.path}", train, heldout)
  _check_cache_dir(cache_dir)  # text sources are tokenized into it
  if config.source == "stdlib":
    files = stdlib_files()
    if not files:
      raise ConfigError(f"data.source='stdlib': no *.py files under "
                        f"{sysconfig.get_paths()['stdlib']!r}; use source='text' or 'tokens'")
    tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
  else:
    files = text_files(config.path)
    if not files:
      _no_match(config.path, "text", "matches no text file; give a file, a directory or a glob")
    root = hashlib.blake2b(os.path.abspath(config.path).encode("utf-8"), digest_size=6)
    tag = f"text-{root.hexdigest()}"
  train, heldout = _file_corpus(files, tag, fraction, cache_dir)
  return Dataset(config.source if config.source == "stdlib" else f"text:{config.path}",
                 train, heldout)


def check_vocab(dataset: Dataset, config: DataConfig, vocab_size: int):
  """ConfigError if a token id of the data is outside the model's vocabulary (an embedding
  lookup would silently clamp it). Reads each split once: a scan of a memory-mapped file."""
  largest = max((int(split.max()) for split in (dataset.train, dataset.heldout) if len(split)),
                default=-1)
  if largest >= vocab_size:
    where = (f"data.path={config.path!r}" if config.source in ("tokens", "text")
             else f"data.source={config.source!r}")
    raise ConfigError(f"{where}: holds token id {largest}, outside model.vocab_size="
                      f"{vocab_size}; give a vocab_size above it or other data")


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows of seq_len+1 tokens starting every seq_len tokens: each token is a target once."""
  return max(0, (num_tokens - 1) // seq_len)


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def window_indices(n: int, step: int, batch_size: int, seed: int, start: int = 0,
                   count: Optional[int] = None) -> np.ndarray:
  """Window ids of rows [start, start+count) of global batch `step`.

  Global row r of step s is position p = s*batch_size + r of the sequence made by concatenating
  one permutation of range(n) per epoch, each seeded by (seed, epoch) alone.
  """
  count = batch_size - start if count is None else count
  positions = int(step) * batch_size + start + np.arange(count, dtype=np.int64)
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = _epoch_order(int(seed), int(epoch), n)[offsets[rows]]
  return out


def get_batch(dataset: Dataset, split: str, step: int, *, batch_size: int, seq_len: int,
              seed: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of global batch `step`: {'inputs', 'targets'} int32 [b, seq_len], with
  b = batch_size // process_count and targets the inputs shifted left by one token."""
  tokens = dataset.split(split)
  n = num_windows(len(tokens), seq_len)
  if n == 0:
    raise ValueError(f"the {split} split has {len(tokens)} tokens; needs > seq_len={seq_len}")
  if batch_size % process_count:
    raise ConfigError(f"train.batch_size={batch_size}: must be divisible by the process count "
                      f"{process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: must be in [0, {process_count})")
  b = batch_size // process_count
  windows = window_indices(n, step, batch_size, seed, start=process_index * b, count=b)
  rows = np.array(tokens[(windows * seq_len)[:, None] + np.arange(seq_len + 1)], np.int32)
  return {"inputs": np.ascontiguousarray(rows[:, :-1]),
          "targets": np.ascontiguousarray(rows[:, 1:])}


def get_eval_batch(dataset: Dataset, index: int, *, batch_size: int, seq_len: int,
                   process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """Held-out batch `index` of a fixed evaluation set, the same for every training seed."""
  return get_batch(dataset, "heldout", index, batch_size=batch_size, seq_len=seq_len,
                   seed=EVAL_SEED, process_index=process_index, process_count=process_count)


def _counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  counts = np.zeros(vocab_size, np.int64)
  for i in range(0, len(tokens), 1 << 24):  # chunks bound the int64 copy bincount makes
    counts += np.bincount(tokens[i:i + (1 << 24)], minlength=vocab_size)[:vocab_size]
  return counts


def unigram_loss(dataset: Dataset) -> float:
  """Cross-entropy (nats/token) on the held-out split of an add-one smoothed unigram model fit on
  the train split: the loss a model reaches by learning token frequencies and nothing else."""
  train = _counts(dataset.train, dataset.vocab_size)
  heldout = _counts(dataset.heldout, dataset.vocab_size)
  log_probs = np.log((train + 1) / (train.sum() + dataset.vocab_size))
  return float(-(heldout * log_probs).sum() / heldout.sum())


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m moe_jax.data",
      description="Tokenize text files once into a token file for data.source='tokens'.")
  parser.add_argument("--input", nargs="+", required=True,
                      help="files, directories or globs (quote globs to keep ** from the shell)")
  parser.add_argument("--output", required=True, help="token file to write (atomically)")
  args = parser.parse_args(argv)
  try:
    count = prepare_tokens(args.input, args.output)
  except ConfigError as e:
    parser.error(str(e))  # one line and exit status 2, not a traceback
  print(f"wrote {count} tokens to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
