"""`experiment=serve`: the inference engine behind one of its front doors.

  python -m experiments.run --config=configs/serve.py --workdir=RUN --config.serve.input=R.jsonl
  python -m experiments.run --config=configs/serve.py --config.hf_path=DIR --config.serve.port=N

The model: the latest checkpoint of the training run in the workdir (with the model its
config.json names) or the Hugging Face checkpoint at hf_path (with its tokenizer.json if it has
one). Batch mode reads one OpenAI completion request per line (moe_jax/serve/openai_api.py says
which fields) and checks each line alone, as OpenAI's Batch API does: the good lines are served,
and completions.jsonl gets one answer per non-blank line, in order: its completion (log-probs
included), or {"error": {...}} naming the line and the field. It prints two JSON lines
(throughput and cache hit rate, then the cost report) and exits 2 with one line on stderr if any
line failed. A file that is not UTF-8 is refused whole, naming the byte position.
serve.port > 0 serves the same requests over HTTP instead (moe_jax/serve/server.py). Either way
the engine's cached prefix blocks are flushed to the disk tier at the end, so the next run starts
warm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
import time
from typing import Optional

import jax

from moe_jax import data, sharding, train, workdir as workdirs
from moe_jax.config import ConfigError, ExperimentConfig, from_config_dict
from moe_jax.interop import hf
from moe_jax.interop.hf_config import read_json as read_hf_config
from moe_jax.serve import BadRequest, ByteTokenizer, Engine, Prices, Usage, cost_report
from moe_jax.serve import chat, openai_api


@dataclasses.dataclass
class Line:
  """One non-blank line of a requests file: what it asks, or why it cannot be served."""
  number: int
  request: Optional[object] = None
  options: Optional[openai_api.Options] = None
  error: Optional[dict] = None  # OpenAI's error object, naming the line and the field


def _line_error(source: str, number: int, error: Exception, kind: str = "invalid_request_error",
                param: Optional[str] = None) -> dict:
  if param is None and isinstance(error, BadRequest):
    param = openai_api.error_param(error)
  return {"message": f"{source}:{number}: {error}", "type": kind, "param": param, "code": None,
          "line": number}


def read_requests(path: str) -> list[Line]:
  """Every non-blank line, each checked alone (OpenAI's Batch API: a bad line is that line's
  error, the good ones are served). ConfigError only when the file itself cannot be read."""
  if not os.path.isfile(path):
    raise ConfigError(f"serve.input={path!r}: no such file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ConfigError(f"serve.input={path!r}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte "
                      f"position {e.start} (line {line}); requests files are JSON lines in "
                      "UTF-8") from None
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      request, options = openai_api.parse(json.loads(line))
      if options.stream:
        raise openai_api.FieldError("stream", True, "only the HTTP server streams")
      out.append(Line(number, request, options))
    except json.JSONDecodeError as e:
      out.append(Line(number, error=_line_error(path, number, ValueError(
          f"body: not a JSON object ({e.msg} at column {e.colno})"), param="body")))
    except (BadRequest, RecursionError) as e:
      out.append(Line(number, error=_line_error(path, number, e)))
  if not out:
    raise ConfigError(f"serve.input={path!r}: holds no request")
  return out


class HFTokenizer:
  """A checkpoint's tokenizer.json, as the engine uses a tokenizer (prompts start with BOS)."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=import-outside-toplevel  (the interop extra)
    file = os.path.join(path, "tokenizer.json")
    self._tok = tokenizers.Tokenizer.from_file(file)
    with open(file, "rb") as f:  # the prefix cache's key covers the tokenizer (serve/keys.py)
      self.fingerprint = "tokenizer.json:" + hashlib.sha256(f.read()).hexdigest()[:16]
    config = read_hf_config(path)
    self._bos = config.get("bos_token_id")
    eos = config.get("eos_token_id")
    self.eos_id = eos[0] if isinstance(eos, list) and eos else eos
    self.fingerprint += f":bos={self._bos}"

  def encode(self, text: str) -> list[int]:
    bos = [self._bos] if isinstance(self._bos, int) else []
    return bos + self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(t) for t in ids])


def _from_hf(cfg: ExperimentConfig, path: str):
  model_cfg, moe_cfg = hf.read_config(path)
  model_cfg = dataclasses.replace(model_cfg, dtype=cfg.model.dtype)
  moe_cfg = dataclasses.replace(moe_cfg, dtype=cfg.moe.dtype, parallelism=cfg.moe.parallelism,
                                grouped_backend=cfg.moe.grouped_backend)
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    if importlib.util.find_spec("tokenizers") is None:
      raise ConfigError(f"hf_path={path!r}: its tokenizer.json needs the `tokenizers` package "
                        "(pip install -e '.[interop]')")
    tokenizer = HFTokenizer(path)
  elif model_cfg.vocab_size < data.VOCAB_SIZE:
    raise ConfigError(f"hf_path={path!r}: has no tokenizer.json and vocab_size="
                      f"{model_cfg.vocab_size} is too small for the byte tokenizer")
  else:
    tokenizer = ByteTokenizer()
  cfg.check_devices(jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = hf.load(path, model_cfg, moe_cfg, mesh=mesh)
  return ckpt.params, ckpt.moe_state, model_cfg, moe_cfg, mesh, tokenizer


def _from_workdir(cfg: ExperimentConfig, workdir: str):
  stored = workdirs.read_json(os.path.join(workdir, workdirs.CONFIG_FILE))
  if not isinstance(stored, dict):
    raise ConfigError(f"workdir={workdir!r}: holds no config.json of a training run (it names "
                      "the model); give the run's workdir, or --config.hf_path")
  run = from_config_dict(stored)
  # The run's model, served the way this config asks (compute dtypes, mesh, parallelism).
  run = dataclasses.replace(
      run, experiment=cfg.experiment, mesh=cfg.mesh, serve=cfg.serve,
      model=dataclasses.replace(run.model, dtype=cfg.model.dtype),
      moe=dataclasses.replace(run.moe, dtype=cfg.moe.dtype, parallelism=cfg.moe.parallelism,
                              grouped_backend=cfg.moe.grouped_backend))
  setup, state, _ = train.load_state(run, workdir)
  return (state["params"], state["moe_state"], run.model, run.moe, setup.mesh, ByteTokenizer())


def load_engine(cfg: ExperimentConfig, workdir: str) -> Engine:
  s = cfg.serve
  if cfg.hf_path:
    try:
      params, moe_state, model_cfg, moe_cfg, mesh, tokenizer = _from_hf(cfg, cfg.hf_path)
    except hf.CheckpointError as e:
      raise ConfigError(f"hf_path: {e}") from None
  else:
    params, moe_state, model_cfg, moe_cfg, mesh, tokenizer = _from_workdir(cfg, workdir)
  return Engine(params, moe_state, model_cfg, moe_cfg, num_blocks=s.num_blocks,
                block_size=s.block_size, max_batch=s.max_batch, prefill_chunk=s.prefill_chunk,
                prefix_cache=s.prefix_cache,
                disk_dir=s.disk_dir or os.path.join(workdir, "prefix_cache"),
                fp8_cache=s.fp8_cache, mesh=mesh, tokenizer=tokenizer,
                speculative_tokens=s.speculative_tokens)


def _write_lines(path: str, lines: list[dict]):
  """Whole or not at all: a temporary file renamed over the output."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for line in lines:
        f.write(json.dumps(line) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def batch(engine: Engine, lines: list[Line], source: str, output: str, model_name: str,
          prices: Prices) -> dict:
  """Runs every good line (all queued at once: the engine batches them) and writes one answer
  per line: its completion, or {"error": ...} naming the line and the field."""
  ids = {}
  for line in lines:
    if line.error is None:
      try:
        ids[line.number] = engine.submit(line.request)
      except BadRequest as e:
        line.error = _line_error(source, line.number, e)
  start = time.perf_counter()
  done = {}
  while len(done) < len(ids):
    done.update(engine.step())
  seconds = time.perf_counter() - start
  created = int(time.time())
  answers, usage = [], Usage()
  for line in lines:
    completion = done.get(ids.get(line.number))
    if completion is not None and completion.error is not None:
      line.error = _line_error(source, line.number, completion.error, "server_error")
    if line.error is not None:
      answers.append({"id": f"cmpl-{line.number}", "object": "error", "error": line.error})
      continue
    usage += completion.usage
    answers.append(openai_api.completion_json(completion, id=f"cmpl-{line.number}",
                                              model=model_name, created=created,
                                              tokenizer=engine.tokenizer, logprobs=True))
  if jax.process_index() == 0:  # every process ran the same requests; one writes them
    _write_lines(output, answers)
  failed = [line.error for line in lines if line.error is not None]
  summary = {"requests": len(lines) - len(failed), "failed": len(failed),
             "prompt_tokens": usage.prompt_tokens,
             "completion_tokens": usage.completion_tokens, "seconds": round(seconds, 3),
             "tokens_per_second": usage.completion_tokens / max(seconds, 1e-9),
             "prompt_tokens_per_second": usage.prompt_tokens / max(seconds, 1e-9),
             "cache_hit_rate": usage.prompt_cache_hit_tokens / max(usage.prompt_tokens, 1),
             "output": output}
  return {"summary": summary, "cost": cost_report(usage, prices), "failed": failed}


def run(cfg: ExperimentConfig, workdir: str) -> dict:
  s = cfg.serve
  if not s.port and not s.input:
    raise ConfigError("serve.input='': give a requests file (--config.serve.input=FILE) or "
                      "a port to serve on (--config.serve.port=N)")
  if s.port and s.input:
    raise ConfigError(f"serve.input={s.input!r}: a batch file and serve.port={s.port} exclude "
                      "each other; give one")
  if s.port and jax.process_count() > 1:
    raise ConfigError(f"serve.port={s.port}: the HTTP server runs in one process; this run has "
                      f"{jax.process_count()} (batch mode runs in several)")
  if s.port and not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "jinja2")):
    raise ConfigError(f"serve.port={s.port}: the HTTP server needs fastapi, uvicorn and jinja2 "
                      "(pip install -e '.[serve]')")
  template = None
  if s.port:
    try:  # before the model loads: a bad template is a config error, not a late surprise
      template = chat.load(s.chat_template, cfg.hf_path)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  requests = read_requests(s.input) if not s.port else []
  output = s.output or os.path.join(workdir, "completions.jsonl")
  if requests:
    if jax.process_index() == 0:
      workdirs.prepare(os.path.dirname(os.path.abspath(output)))
    if os.path.isdir(output):
      raise ConfigError(f"serve.output={output!r}: is a directory; it must name a file")
  engine = load_engine(cfg, workdir)
  name = s.model_name or os.path.basename(os.path.normpath(cfg.hf_path or workdir))
  try:
    if s.port:
      from moe_jax.serve import server  # pylint: disable=import-outside-toplevel  (serve extra)
      server.serve(engine, s.port, name, template=template,
                   prices=Prices(s.price_hit, s.price_miss, s.price_output),
                   max_body_bytes=int(s.max_body_mb * 2**20))
      return {}
    result = batch(engine, requests, s.input, output, name,
                   Prices(s.price_hit, s.price_miss, s.price_output))
  finally:
    engine.close()
  if jax.process_index() == 0:
    print(json.dumps(result["summary"]))
    print(json.dumps(result["cost"]))
  failed = result["failed"]
  if failed:  # after the good lines' answers are written: a non-zero exit, one line
    raise ConfigError(f"{len(failed)} of {len(requests)} request lines failed (first: "
                      f"{failed[0]['message']}); each has an error record in {output}")
  return result
