"""What a run reports: metrics.jsonl, TensorBoard (when installed), PNG plots (drawn by plots.py),
and the FLOP accounting behind model FLOPs utilisation (MFU).

metrics.jsonl holds one JSON object per line, always with "step" (optimizer steps completed):
  train lines: loss, ce, mtp_ce, balance_loss, perplexity, learning_rate, grad_norm, bad_steps,
               tokens_per_s, mfu, load [L_moe][E] (share of assignments), max_vio [L_moe],
               dropped_fraction [L_moe]; averages over the logging interval.
  eval lines:  eval_loss, eval_ce, eval_perplexity.
On resume, lines past the restored step are dropped first, so the file never repeats a step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, TextIO

import numpy as np

from moe_jax import plots
from moe_jax.config import ModelConfig

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str, report: Optional[Callable[[str], None]] = None) -> list[dict]:
  """The records of a JSON-lines file ([] if there is none). A line that is not a JSON object
  with a "step" (torn by a crash mid-write) is dropped, and reported when `report` is given."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
      elif report is not None:
        report(f"{path}: line {number} is not a whole record (torn by a crash?); dropped")
  return records


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  return value


class _TensorBoard:
  """Scalar event files through tensorboardX or tensorboard's own writer, if either imports."""

  def __init__(self, logdir: str):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(logdir)
      self._scalar = self._writer.add_scalar
    except ImportError:
      # tensorboard alone (no TensorFlow): write Summary protos into an event file.
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=import-outside-toplevel
      from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=import-outside-toplevel
      self._writer = EventFileWriter(logdir)

      def scalar(tag, value, step):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                       simple_value=value)])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary))
      self._scalar = scalar

  def write(self, record: dict):
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._scalar(key, float(value), record["step"])
    self._writer.flush()

  def close(self):
    self._writer.close()


def tensorboard_writer(logdir: str) -> Optional[_TensorBoard]:
  try:
    return _TensorBoard(logdir)
  except ImportError:
    return None


class MetricsLog:
  """Appends records to <workdir>/metrics.jsonl (flushed each write) and to TensorBoard.

  With enabled=False (every process but the first) it writes nothing."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0,
               report: Callable[[str], None] = print):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    kept = [r for r in read_jsonl(self.path, report) if r["step"] <= resume_step]
    with open(self.path + ".tmp", "w") as f:  # rewritten atomically: a crash leaves old or new
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(self.path + ".tmp", self.path)
    self._file = open(self.path, "a")
    self._tb = tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict):
    if not self.enabled:
      return
    record = {k: _jsonable(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.write(record)

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """One status line: rewritten in place on a terminal, plain periodic lines otherwise."""

  def __init__(self, total_steps: int, stream: TextIO = sys.stdout):
    self._total, self._stream = total_steps, stream
    self._tty = hasattr(stream, "isatty") and stream.isatty()

  def update(self, step: int, loss: float, tokens_per_s: float, eta_s: Optional[float],
             extra: str = ""):
    if eta_s is None:
      eta = "?"
    else:
      minutes, seconds = divmod(int(max(eta_s, 0)), 60)
      eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    line = (f"step {step}/{self._total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
            f"ETA {eta}{'  ' + extra if extra else ''}")
    if self._tty:
      self._stream.write("\r\033[K" + line)
    else:
      self._stream.write(line + "\n")
    self._stream.flush()

  def message(self, line: str):
    """A line of its own (evaluation, checkpoint), not overwritten by the next update."""
    self._stream.write(("\r\033[K" if self._tty else "") + line + "\n")
    self._stream.flush()

  def close(self):
    if self._tty:
      self._stream.write("\n")
      self._stream.flush()


# ----------------------------------------------------------------------------- FLOPs and MFU


def matmul_parameters(counts: dict) -> int:
  """Parameters that take part in a matmul per token: activated ones less the embedding lookup
  (the MTP modules run in training, so they count; they share the embedding and head)."""
  main, mtp = counts["main"]["activated"], counts["mtp"]["activated"]
  return main["all"] - main["embedding"] + mtp["all"]


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs of the score and value matmuls, per token: 6 * S * H * (dqk + dv)
  per block (PaLM's 12 * L * H * Q * T accounting; causal masking not subtracted)."""
  if cfg.attention == "mla":
    dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
  else:
    dqk = dv = cfg.head_dim
  blocks = cfg.num_layers + cfg.mtp_depth
  return 6.0 * seq_len * cfg.num_heads * (dqk + dv) * blocks


def train_flops_per_token(counts: dict, cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token: 6 per matmul parameter (2 forward, 4 backward) plus
  attention. Hardware-independent: no recomputation, padding or routing overhead counted."""
  return 6.0 * matmul_parameters(counts) + attention_flops_per_token(cfg, seq_len)


# Published dense (no sparsity) peak FLOP/s per chip, by device_kind substring and compute
# dtype: the denominator of MFU. CPUs have none; their MFU needs a quiet calibration (bench/).
PEAK_FLOPS = (
    ("H100", {"bfloat16": 989e12, "float32": 494.7e12}),  # SXM; float32 runs as TF32
    ("H200", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("H800", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
)


def peak_flops(device: Any, dtype: str) -> Optional[float]:
  """The published dense peak of one device for this compute dtype; None where unknown (CPU)."""
  if device.platform == "cpu":
    return None
  for name, peaks in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
      return peaks.get(dtype)
  return None


def measure_matmul_flops(devices: Optional[Sequence[Any]] = None, *, size: Optional[int] = None,
                         repeats: int = 5) -> float:
  """FLOP/s of a plain float32 matmul on all devices at once (one [n, n] @ [n, n] per device),
  the fastest of `repeats` timed runs after a warm-up: the reference rate for MFU.

  The fastest run, not the median, because this estimates a peak: a run slowed by another process
  on a shared machine lowers the reference and lifts every later MFU (a median taken while a
  second job shared the cores once made a CPU run log MFU 100%)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  devices = list(jax.devices() if devices is None else devices)
  n = size or (512 if devices[0].platform == "cpu" else 4096)
  sharding = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))
  make = jax.jit(lambda key: jax.random.normal(key, (len(devices), n, n), jnp.float32),
                 out_shardings=sharding)
  a, b = make(jax.random.key(1)), make(jax.random.key(2))
  matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * len(devices) * n**3 / min(times)


def plot(workdir: str) -> list[str]:
  """Writes loss.png, expert_load.png and max_vio.png from metrics.jsonl (plots.py); returns
  their paths."""
  return plots.write(workdir, read_jsonl(os.path.join(workdir, METRICS_FILE)))


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")
