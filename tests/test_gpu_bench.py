"""bench/gpu.sh must not rot between the times a GPU is lent: its dry run (tiny shapes, CPU)
runs every step and prints the table; and MFU's peak table."""
import json
import os
import subprocess
import sys

import jax
import pytest

from moe_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_dry_run_runs_every_step_and_prints_the_table():
  # The script runs `$PYTHON` (default `python`): this interpreter, whether or not its venv is
  # on PATH.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)  # one device, as on the GPU
  result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
  assert [l["bench"] for l in lines] == ["gpu.moe_layer", "gpu.train_step", "gpu.fp8_matmul",
                                         "gpu.decode"]
  assert all("error" not in l for l in lines)
  assert lines[1]["mfu"] is None  # CPU: no published peak, so no MFU
  assert "| gpu.decode | batch16_tokens_per_s |" in result.stdout


class _Device:
  def __init__(self, platform, kind):
    self.platform, self.device_kind = platform, kind


@pytest.mark.parametrize("device, dtype, peak", [
    (_Device("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16", 989e12),
    (_Device("gpu", "NVIDIA H200"), "bfloat16", 989e12),
    (_Device("gpu", "NVIDIA H100 80GB HBM3"), "float32", 494.7e12),
    (_Device("gpu", "Some future GPU"), "bfloat16", None),
    (_Device("cpu", "cpu"), "bfloat16", None),
])
def test_mfu_is_against_the_published_peak_only(device, dtype, peak):
  assert metrics.peak_flops(device, dtype) == peak
  assert metrics.peak_flops(jax.devices()[0], "float32") is None  # the test machine's CPU
