"""Checksum manifests of checkpoint steps: written once orbax has finished a step, verified when
the step is restored (moe_jax.checksum is the one digest, for checkpoints and cache blocks alike).

`<step>/checksums.<process>.json`, one per process, since each process sees only its own shards:
  arrays  {path: {"start:stop,...": digest}}: every addressable shard this process holds as
          replica 0, digested from memory at save time, so the check covers whatever happened
          on the way to disk and back; keyed by the shard's global index, so a step restored onto
          another mesh is checked wherever a restored shard covers a recorded one
  files   {relative path: digest}: the step's files this process owns (its own
          `ocdbt.process_<i>` folder; process 0 also everything outside those), which catches
          damage that no array would show (metadata a restore does not read today)
A manifest is written through a temporary file and a rename after orbax finished the step, so a
step is *verified* (the retention policy keeps the newest verified one, a diverged run names it)
only once every process's manifest exists. A step without any (written before checksums, or
killed between orbax's finish and the manifest) restores unverified.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from moe_jax import checksum, workdir

PREFIX, SUFFIX = "checksums.", ".json"
_OWNER = re.compile(r"(?:^|/)ocdbt\.process_(\d+)/")


def name(process: int) -> str:
  return f"{PREFIX}{process}{SUFFIX}"


def _index(index: tuple, shape: tuple) -> str:
  return ",".join(f"{s.start or 0}:{shape[d] if s.stop is None else s.stop}"
                  for d, s in enumerate(index))


def _parse(key: str) -> list[tuple[int, int]]:
  return [tuple(int(v) for v in part.split(":")) for part in key.split(",")] if key else []


def leaves(tree: Any) -> dict[str, Any]:
  """{path: leaf}, paths as jax.tree_util.keystr."""
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shards(x) -> list[tuple[tuple, Any, int]]:
  """(index, data, replica id) of each shard this process holds."""
  if isinstance(x, jax.Array):
    return [(s.index, s.data, s.replica_id) for s in x.addressable_shards]
  x = np.asarray(x)
  return [(tuple(slice(None) for _ in x.shape), x, 0)]


def array_digests(tree: Any) -> dict[str, dict[str, str]]:
  """The `arrays` section of this process's manifest (device-to-host copies of its shards)."""
  return {path: {_index(index, np.shape(x)): checksum.digest(data)
                 for index, data, replica in _shards(x) if replica == 0}
          for path, x in leaves(tree).items()}


def _owner(rel: str) -> int:
  found = _OWNER.search(rel)
  return int(found.group(1)) if found else 0


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), step_dir)
      if not (os.path.dirname(rel) == "" and f.startswith(PREFIX)):
        out.append(rel)
  return sorted(out)


def write(step_dir: str, arrays: dict, process: int, count: int):
  """This process's manifest of a step orbax has finished writing."""
  files = {rel: checksum.file_digest(os.path.join(step_dir, rel))
           for rel in _files(step_dir) if _owner(rel) % count == process}
  workdir.write_json(os.path.join(step_dir, name(process)),
                     {"algorithm": checksum.ALGORITHM, "process_count": count,
                      "arrays": arrays, "files": files})


def _read(step_dir: str) -> tuple[list[dict], Optional[str]]:
  """(the manifests, None) or ([], a problem); ([], None) when the step has none at all."""
  names = [f for f in os.listdir(step_dir) if f.startswith(PREFIX) and f.endswith(SUFFIX)]
  if not names:
    return [], None
  out = []
  for f in sorted(names):
    try:
      with open(os.path.join(step_dir, f), encoding="utf-8") as handle:
        m = json.load(handle)
      if not (isinstance(m.get("arrays"), dict) and isinstance(m.get("files"), dict) and
              isinstance(m.get("process_count"), int)):
        raise ValueError("not a checksum manifest")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
      return [], f"its checksum manifest {f} cannot be read ({type(e).__name__})"
    out.append(m)
  missing = [name(i) for i in range(out[0]["process_count"]) if name(i) not in names]
  if missing:
    return [], f"its checksum manifest {missing[0]} is missing"
  return out, None


def complete(step_dir: str) -> bool:
  """Whether every process's manifest of the step is there (a verified step)."""
  manifests, problem = _read(step_dir)
  return bool(manifests) and problem is None


def _check_files(step_dir: str, files: dict, process: int, count: int) -> Optional[str]:
  for rel, want in sorted(files.items()):
    if _owner(rel) % count != process:
      continue
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"its file {rel} is missing"
    got = checksum.file_digest(path)
    if got != want:
      return f"its file {rel} fails its checksum (recorded {want}, read {got})"
  return None


def _check_arrays(tree: Any, recorded: dict) -> Optional[str]:
  arrays = leaves(tree)
  for path in sorted(recorded.keys() ^ arrays.keys()):
    return f"array {path} is {'missing' if path in recorded else 'not in its manifest'}"
  for path, x in arrays.items():
    todo = dict(recorded[path])
    # Whole where this process holds it whole: every recorded shard is then checked, whatever
    # the restore's sharding; else where a restored shard covers a recorded one.
    whole = not isinstance(x, jax.Array) or x.is_fully_addressable
    for index, data, _ in (_shards(np.asarray(x)) if whole else _shards(x)):
      bounds = [(s.start or 0, np.shape(x)[d] if s.stop is None else s.stop)
                for d, s in enumerate(index)]
      host = None
      for key in [k for k in todo if all(a <= lo and hi <= b for (lo, hi), (a, b)
                                         in zip(_parse(k), bounds))]:
        host = np.asarray(data) if host is None else host
        part = host[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in
                          zip(_parse(key), bounds))]
        got = checksum.digest(part)
        if got != todo.pop(key):
          return (f"array {path}[{key}] fails its checksum (recorded {recorded[path][key]}, "
                  f"read {got})")
  return None


def verify(step_dir: str, tree: Any, process: int, count: int) -> tuple[bool, Optional[str]]:
  """(verified, problem) of a restored step as this process sees it: (False, None) when the step
  has no manifest; a problem is one phrase naming the file or array."""
  manifests, problem = _read(step_dir)
  if problem or not manifests:
    return False, problem
  arrays, files = {}, {}
  for m in manifests:
    files.update(m["files"])
    for path, entries in m["arrays"].items():
      arrays.setdefault(path, {}).update(entries)
  problem = _check_files(step_dir, files, process, count) or _check_arrays(tree, arrays)
  return problem is None, problem
