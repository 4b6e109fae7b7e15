"""What checkpoint checksums cost: save and restore times with and without them, side by side in
one process, on the tiny model's train state and on a ~100 MB state.

Prints one JSON object per state: medians of `--repeats` timed rounds (after one warm-up) of
  save     Checkpointer.save(wait=True): orbax's write, plus (with checksums) the digest of every
           shard from memory and the digest of every written file into the manifest
  restore  Checkpointer.restore_latest: orbax's read, plus (with checksums) the digests of the
           restored shards and of the files, checked against the manifest
"Without" replaces the manifest's functions by no-ops (nothing else differs); each round writes
into a fresh directory of the same filesystem (--dir, default a temporary one).

    python -m bench.checkpoint
    python -m bench.checkpoint --dir=/fast/disk --repeats=7
"""
import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from moe_jax import checkpoint, checkpoint_manifest, config, train

@contextlib.contextmanager
def no_checksums():
  saved = {n: getattr(checkpoint_manifest, n) for n in ("array_digests", "write", "verify")}
  checkpoint_manifest.array_digests = lambda tree: {}
  checkpoint_manifest.write = lambda *args: None
  checkpoint_manifest.verify = lambda *args: (True, None)
  try:
    yield
  finally:
    for n, f in saved.items():
      setattr(checkpoint_manifest, n, f)


def tiny_state():
  from configs import tiny_moe  # pylint: disable=import-outside-toplevel
  cfg = config.from_config_dict(tiny_moe.get_config())
  return jax.jit(functools.partial(train.init_state, cfg=cfg))(jax.random.key(0))


def big_state(megabytes: int):
  rng = np.random.default_rng(0)
  n = megabytes * (1 << 20) // 4 // 8
  return {f"w{i}": jax.device_put(rng.standard_normal(n, np.float32)) for i in range(8)}


def one_round(state, abstract, root: str) -> tuple[float, float]:
  directory = tempfile.mkdtemp(dir=root)
  try:
    ckpt = checkpoint.Checkpointer(directory, keep=1)
    start = time.perf_counter()
    ckpt.save(1, state, wait=True)
    save_s = time.perf_counter() - start
    ckpt.close()
    start = time.perf_counter()
    restored, step = checkpoint.Checkpointer(directory, keep=1).restore_latest(
        abstract, report=lambda _: None)
    jax.block_until_ready(restored)
    assert step == 1
    return save_s, time.perf_counter() - start
  finally:
    shutil.rmtree(directory)


def measure(name: str, state, root: str, repeats: int) -> dict:
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  times = {"with": [], "without": []}
  for i in range(repeats + 1):  # interleaved, so both see the same machine load
    for kind in ("with", "without"):
      with contextlib.ExitStack() as stack:
        if kind == "without":
          stack.enter_context(no_checksums())
        result = one_round(state, abstract, root)
      if i:
        times[kind].append(result)
  med = {k: [statistics.median(t[j] for t in v) for j in (0, 1)] for k, v in times.items()}
  megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / (1 << 20)
  return {"bench": "checkpoint", "state": name, "megabytes": round(megabytes, 2),
          "save_s_with": med["with"][0], "save_s_without": med["without"][0],
          "save_ratio": med["with"][0] / med["without"][0],
          "restore_s_with": med["with"][1], "restore_s_without": med["without"][1],
          "restore_ratio": med["with"][1] / med["without"][1], "repeats": repeats,
          "backend": jax.default_backend(), "jax": jax.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--megabytes", type=int, default=100)
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
  try:
    for name, make in (("tiny_moe", tiny_state),
                       (f"{args.megabytes}MB", lambda: big_state(args.megabytes))):
      print(json.dumps(measure(name, make(), root, args.repeats)), flush=True)
  finally:
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
