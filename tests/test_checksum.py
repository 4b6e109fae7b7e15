"""The one checksum both checkpoints and cache blocks carry: it fails on any change of value,
dtype or shape, and names the array."""
import numpy as np
import pytest

from moe_jax import checksum


def test_equal_arrays_pass_and_any_change_fails():
  rng = np.random.default_rng(0)
  arrays = {"k": rng.standard_normal((4, 8)).astype(np.float32), "v": np.arange(6, dtype=np.int32)}
  recorded = checksum.digests(arrays)
  assert checksum.problem({n: a.copy() for n, a in arrays.items()}, recorded) is None

  flipped = arrays["k"].copy()
  flipped.view(np.uint32)[1, 3] ^= 1  # one bit of one element
  assert "'k' fails its checksum" in checksum.problem({**arrays, "k": flipped}, recorded)
  cast = arrays["v"].astype(np.int64)
  assert "'v'" in checksum.problem({**arrays, "v": cast}, recorded)
  reshaped = arrays["k"].reshape(8, 4)
  assert "'k'" in checksum.problem({**arrays, "k": reshaped}, recorded)
  assert "'v' is missing" in checksum.problem({"k": arrays["k"]}, recorded)
  assert "'x' was not recorded" in checksum.problem({**arrays, "x": arrays["v"]}, recorded)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn", "int8", "bool"])
def test_digest_covers_every_dtype_the_project_writes(dtype):
  import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy)
  a = np.zeros((3, 5), dtype=np.dtype(dtype) if dtype in ("float32", "int8", "bool")
               else getattr(__import__("ml_dtypes"), dtype))
  assert checksum.digest(a).startswith("crc32:")
  assert checksum.digest(a) == checksum.digest(a.copy())
  assert checksum.digest(np.zeros((0, 5), a.dtype)) != checksum.digest(np.zeros((5, 0), a.dtype))
