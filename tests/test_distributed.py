"""Multi-process start-up: the argument/environment logic here, a real two-process job below."""
import jax
import numpy as np
import pytest

import multihost
from moe_jax import distributed
from moe_jax.config import ConfigError

_ENV = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
        "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
        "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def fake_initialize(monkeypatch):
  """Records what would reach jax.distributed.initialize; this process must stay single."""
  for name in _ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_one_process_is_a_no_op(fake_initialize, monkeypatch):
  assert distributed.initialize() is False
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
  assert distributed.initialize() is False
  for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n1"),
                      ("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(name, value)
  monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
  assert distributed.initialize() is False
  assert fake_initialize == []
  assert (distributed.process_index(), distributed.process_count()) == (0, 1)
  assert distributed.is_main()


def test_environment_and_arguments_reach_jax(fake_initialize, monkeypatch):
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
  assert distributed.initialize(process_id=3) is True
  assert fake_initialize == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                  process_id=3, local_device_ids=None,
                                  heartbeat_timeout_seconds=distributed.JAX_HEARTBEAT_TIMEOUT_S)]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_cluster_launch_is_left_to_jax_detection(fake_initialize, monkeypatch):
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert distributed.initialize() is True
  assert fake_initialize == [dict(coordinator_address=None, num_processes=None,
                                  process_id=None, local_device_ids=None,
                                  heartbeat_timeout_seconds=distributed.JAX_HEARTBEAT_TIMEOUT_S)]


def test_bad_environment_names_the_variable(fake_initialize, monkeypatch):
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ConfigError, match=rf"^{distributed.ENV_NUM_PROCESSES}='two'"):
    distributed.initialize()
  with pytest.raises(ConfigError, match="^process_id=2"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
  assert fake_initialize == []


# Runs unchanged on one process with 8 devices and on two with 4 each; prints one RESULT line.
_WORKER = """
import json
import numpy as np
from moe_jax import distributed, sharding
from moe_jax.config import MeshConfig

distributed.initialize()
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

x_np = np.arange(64, dtype=np.float32).reshape(8, 8)
names = ("batch", None)

# Batch split over data (across processes) x expert (within): a jitted reduction all-reduces.
mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
x = sharding.global_array(x_np[sharding.process_rows(mesh, names, x_np.shape)], mesh, names)
replicated = sharding.named_sharding(mesh, (None,))
sumsq = jax.jit(lambda x: jnp.sum(x * x, axis=0), out_shardings=replicated)(x)
psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(0), sharding.TOKEN_AXES), mesh=mesh,
                             in_specs=sharding.logical_to_spec(names), out_specs=P()))(x)

# The expert axis across both processes: an all-to-all that transposes the 8x8 blocks.
mesh8 = sharding.make_mesh(MeshConfig(expert=8))
y = sharding.global_array(x_np[sharding.process_rows(mesh8, names, x_np.shape)], mesh8, names)
def exchange(b):
  assert b.shape == (1, 8), b.shape
  return jax.lax.all_to_all(b, sharding.EXPERT_AXIS, 1, 0, tiled=True)
spec = sharding.logical_to_spec(names)
a2a = jax.jit(jax.shard_map(exchange, mesh=mesh8, in_specs=spec, out_specs=spec))(y)
a2a = jax.jit(lambda a: a, out_shardings=sharding.named_sharding(mesh8, (None, None)))(a2a)

print("RESULT " + json.dumps(dict(
    process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
    local_devices=jax.local_device_count(), sumsq=np.asarray(sumsq).tolist(),
    psum=np.asarray(psum).tolist(), a2a=np.asarray(a2a).ravel().tolist())))
"""


def test_two_processes_match_one():
  two = [multihost.results(out) for out in multihost.run_processes(
      _WORKER, num_processes=2, devices_per_process=4, timeout=60)]
  [one] = [multihost.results(out) for out in multihost.run_processes(
      _WORKER, num_processes=1, devices_per_process=8, timeout=60)]
  assert [r[0]["process"] for r in two] == [0, 1]
  assert {(r[0]["processes"], r[0]["devices"], r[0]["local_devices"]) for r in two} == {(2, 8, 4)}
  assert (one[0]["processes"], one[0]["devices"]) == (1, 8)
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  expected = dict(sumsq=(x * x).sum(0).tolist(), psum=x.sum(0).tolist(), a2a=x.T.ravel().tolist())
  for result in (one[0], two[0][0], two[1][0]):
    assert {k: result[k] for k in expected} == expected


def test_launcher_stops_the_group_when_one_process_fails():
  # Process 0 would wait far past the timeout: the launcher must kill it, not wait it out.
  script = ("import os, sys, time\n"
            f"if os.environ['{distributed.ENV_PROCESS_ID}'] == '1':\n"
            "  print('giving up', flush=True)\n"
            "  sys.exit(3)\n"
            "time.sleep(600)\n")
  with pytest.raises(multihost.ProcessesFailed, match=r"exit codes \[(None|-9), 3\]") as err:
    multihost.run_processes(script, timeout=60)
  assert "giving up" in str(err.value)
