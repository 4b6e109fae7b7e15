"""`experiment=hf_eval`: held-out loss and a greedy sample of a Hugging Face checkpoint.

  python -m experiments.run --config=configs/hf_eval.py --config.hf_path=DIR [--workdir=W]

The checkpoint's config.json fixes the model. The experiment config gives the mesh, compute
choices (model.dtype, moe.dtype, moe.parallelism, moe.grouped_backend), the text (data.*) and the
evaluation size (train.batch_size sequences of train.seq_len tokens, train.eval_batches batches).
Text is tokenized with the checkpoint's tokenizer.json when it has one (needs the `tokenizers`
package, part of the interop extra), else with moe_jax's byte tokenizer (checkpoints exported from
here). Prints one JSON line and writes it to <workdir>/hf_eval.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data, metrics, sharding, train, workdir as workdirs
from moe_jax.config import ConfigError, DataConfig, ExperimentConfig
from moe_jax.interop import hf
from moe_jax.interop.hf_config import read_json
from moe_jax.serve import Engine, Request

PROMPT_TOKENS = 16
NEW_TOKENS = 32


class Text:
  """encode(str) -> ids of one document; decode(ids) -> str."""

  def __init__(self, hf_path: str, vocab_size: int):
    path = os.path.join(hf_path, "tokenizer.json")
    self.byte_level = not os.path.isfile(path)
    if self.byte_level:
      if vocab_size < data.VOCAB_SIZE:
        raise ConfigError(f"hf_path={hf_path!r}: has no tokenizer.json and vocab_size="
                          f"{vocab_size} is too small for the byte tokenizer ({data.VOCAB_SIZE})")
      return
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f"hf_path={hf_path!r}: its tokenizer.json needs the `tokenizers` "
                        "package (pip install -e '.[interop]')") from None
    self._tok = tokenizers.Tokenizer.from_file(path)
    config = read_json(hf_path)
    self._bos, self._eos = config.get("bos_token_id"), config.get("eos_token_id")

  def encode(self, text: str) -> list[int]:
    if self.byte_level:
      return list(data.encode(text, bos=True, eos=True))
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = [self._bos] if isinstance(self._bos, int) else []
    return bos + ids + ([self._eos] if isinstance(self._eos, int) else [])

  def decode(self, ids) -> str:
    return data.decode(ids) if self.byte_level else self._tok.decode(list(map(int, ids)))


def heldout_tokens(cfg: DataConfig, text: Text) -> np.ndarray:
  """The held-out split of cfg, tokenized with the checkpoint's tokenizer."""
  if text.byte_level:
    return data.load_dataset(cfg).heldout
  if cfg.source not in ("stdlib", "text"):
    raise ConfigError(f"data.source={cfg.source!r}: holds byte tokens; a checkpoint with "
                      "tokenizer.json needs data.source 'stdlib' or 'text'")
  files = data.stdlib_files() if cfg.source == "stdlib" else data.text_files(cfg.path)
  if not files:
    raise ConfigError(f"data.path={cfg.path!r}: matches no text file")
  heldout = data.split_files(files, cfg.heldout_fraction)[1] if len(files) > 1 else files
  docs = []
  for path, _ in heldout:
    with open(path, encoding="utf-8", errors="replace") as f:
      docs.append(text.encode(f.read()))
  tokens = np.concatenate([np.asarray(d, np.int32) for d in docs])
  if len(files) == 1:  # as data.py does: one file holds out the tail of its tokens
    tokens = tokens[len(tokens) - max(1, round(len(tokens) * cfg.heldout_fraction)):]
  return tokens


def _on_mesh(mesh, fn: Callable) -> Callable:
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


def evaluate(cfg: ExperimentConfig, workdir: str, hf_path: str) -> dict:
  """Loads hf_path onto cfg's mesh; mean held-out cross-entropy and a greedy continuation."""
  cfg.check_devices(jax.device_count(), jax.process_count())
  if jax.process_index() == 0 and os.path.lexists(workdir):
    workdirs.prepare(workdir)  # hf_eval.json goes there: a bad workdir is found before the work
  model_cfg, moe_cfg = hf.read_config(hf_path)
  model_cfg = dataclasses.replace(model_cfg, dtype=cfg.model.dtype)
  moe_cfg = dataclasses.replace(moe_cfg, dtype=cfg.moe.dtype, parallelism=cfg.moe.parallelism,
                                grouped_backend=cfg.moe.grouped_backend)
  # The config's cross-checks (mesh splits, seq_len) run again, now on the checkpoint's model.
  checked = {"hf_path": ""} if hasattr(cfg, "hf_path") else {}
  run_cfg = dataclasses.replace(cfg, model=model_cfg, moe=moe_cfg, **checked)
  text = Text(hf_path, model_cfg.vocab_size)
  tokens = heldout_tokens(cfg.data, text)
  t = run_cfg.train
  if data.num_windows(len(tokens), t.seq_len) == 0:
    raise ConfigError(f"train.seq_len={t.seq_len}: longer than the held-out split "
                      f"({len(tokens)} tokens)")
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = hf.load(hf_path, model_cfg, moe_cfg, mesh=mesh)
  dataset = data.Dataset(f"heldout:{hf_path}", tokens[:0], tokens, model_cfg.vocab_size)
  batches = train.Batches(dataset, t, mesh)
  eval_step = _on_mesh(mesh, jax.jit(functools.partial(train.eval_step, cfg=run_cfg)))
  totals: Optional[dict] = None
  for i in range(t.eval_batches):
    out = eval_step(ckpt.params, ckpt.moe_state, batches.eval(i))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  result = {k: float(v) / t.eval_batches for k, v in totals.items()}
  if not all(np.isfinite(list(result.values()))):
    raise train.NonFinite(f"hf_path={hf_path!r}: held-out loss is {result['eval_loss']}: the "
                          "checkpoint's weights are not finite (NaN or inf); nothing written")
  result["eval_perplexity"] = metrics.perplexity(result["eval_ce"])

  new_tokens = min(NEW_TOKENS, model_cfg.max_seq_len // 2)
  prompt = [int(t) for t in tokens[:min(PROMPT_TOKENS, model_cfg.max_seq_len - new_tokens)]]
  engine = Engine(ckpt.params, ckpt.moe_state, model_cfg, moe_cfg, mesh=mesh, tokenizer=text,
                  num_blocks=2 + -(-(len(prompt) + new_tokens) // 16))
  sample = engine.generate([Request(prompt, max_tokens=new_tokens, ignore_eos=True)])[0]
  sample = sample.choices[0].token_ids
  result.update(hf_path=hf_path, heldout_tokens=int(len(tokens)), prompt=text.decode(prompt),
                sample=text.decode(sample))
  if jax.process_index() == 0:
    print(json.dumps(result))
    workdirs.prepare(workdir)
    workdirs.write_json(os.path.join(workdir, "hf_eval.json"), result)
  return result


def run(cfg: ExperimentConfig, workdir: str) -> dict:
  hf_path = getattr(cfg, "hf_path", "")
  if not hf_path:
    raise ConfigError("hf_path='': must name a Hugging Face checkpoint directory "
                      "(--config.hf_path=DIR)")
  try:
    return evaluate(cfg, workdir, hf_path)
  except hf.CheckpointError as e:  # the runner reports config errors in one line, exit 2
    raise ConfigError(f"hf_path: {e}") from None
