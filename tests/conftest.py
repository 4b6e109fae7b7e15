"""Fakes an 8-device CPU mesh before any test imports JAX's backend, and shares compiled
programs between tests."""
import atexit
import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any("xla_force_host_platform_device_count" in f for f in _flags):
  _flags.append("--xla_force_host_platform_device_count=8")
# The tests' programs are tiny, so their time is compiling, mostly LLVM's optimizations:
# without them the suite takes about half the time. Numerics are unchanged in kind (IEEE
# float32 either way, no fast math); runs and benchmarks keep XLA's defaults.
if not any("xla_backend_optimization_level" in f for f in _flags):
  _flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
os.environ["XLA_FLAGS"] = " ".join(_flags)

# Many tests compile the same programs: the same tiny model's train step in several tests and
# in each `experiments.run` subprocess (which inherit this environment), each seed of the FP8
# study. A compilation cache for this session only
# (fresh each run, so no test depends on an earlier run) halves such tests.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="moe_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)


# ----------------------------------------------------------------------------- runner fixtures
# One environment, config file and uninterrupted reference run for every test of the runner.
import pytest  # noqa: E402

import multihost  # noqa: E402
import runs  # noqa: E402


@pytest.fixture(scope="session")
def env():
  # Inherits the session's compilation cache (conftest.py): reruns of a config compile in ~1 s.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=multihost.xla_flags(1))
  env.pop("MOE_JAX_NUM_PROCESSES", None)
  return env


@pytest.fixture(scope="session")
def config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("configs") / "tiny_run.py"
  path.write_text(runs.CONFIG)
  return str(path)


@pytest.fixture(scope="session")
def reference(env, config_file, tmp_path_factory):
  """An uninterrupted 12-step run."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = runs.run(env, config_file, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled programs: every XLA:CPU executable keeps ~3 memory maps, and
  the whole suite compiles enough of them to reach vm.max_map_count (65,530), where XLA crashed
  with SIGSEGV in a later compile (BUILD_NOTES.md, "Serving engine")."""
  yield
  jax.clear_caches()
  gc.collect()
