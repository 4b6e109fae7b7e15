"""The inference engine's front doors (experiments/serve.py): batch JSONL or an HTTP server.

  python -m experiments.run --config=configs/serve.py --workdir=RUN \
      --config.serve.input=requests.jsonl               # writes RUN/completions.jsonl
  python -m experiments.run --config=configs/serve.py --config.hf_path=DIR --workdir=W \
      --config.serve.port=8000                          # OpenAI-compatible, on 127.0.0.1

The model is the one the checkpoint holds: a training run's workdir (its config.json names the
model) or a Hugging Face checkpoint (hf_path). This file chooses how to serve it.
"""
import pathlib
import runpy

import ml_collections


def get_config(arg=None):
  """arg: "runlocal" shrinks the pool and the batch for a quick CPU check."""
  config = ml_collections.ConfigDict()
  config.experiment = "serve"            # experiments/serve.py
  config.hf_path = ""                    # a Hugging Face checkpoint; "" = the workdir's latest

  runpy.run_path(str(pathlib.Path(__file__).with_name("hf_eval.py")))["add_runtime"](config)

  config.serve = s = ml_collections.ConfigDict()
  s.input = ""                           # requests JSONL: one OpenAI completion request a line
  s.output = ""                          # completions JSONL; "" = <workdir>/completions.jsonl
  s.port = 0                             # > 0: serve HTTP on 127.0.0.1:port instead
  s.model_name = ""                      # the model's name in the API; "" = checkpoint folder
  s.num_blocks = 256                     # KV pool blocks of block_size token slots
  s.block_size = 16                      # token slots per block (the prefix cache's unit)
  s.max_batch = 16                       # sequences decoded together
  s.prefill_chunk = 512                  # prompt tokens per prefill call
  s.prefix_cache = True                  # reuse the cached blocks of earlier prompts
  s.disk_dir = ""                        # evicted prefix blocks; "" = <workdir>/prefix_cache
  s.fp8_cache = False                    # float8_e4m3fn cache with per-token scales
  s.price_hit = 0.5                      # cost report per million tokens: cached prompt
  s.price_miss = 2.0                     # uncached prompt
  s.price_output = 8.0                   # completion
  s.chat_template = ""                   # /v1/chat/completions: "" = the checkpoint's, or
                                         # "plain" / "r1_zero" (moe_jax/serve/chat.py)
  s.max_body_mb = 8.0                    # larger HTTP request bodies get 413

  if arg == "runlocal":
    s.num_blocks, s.max_batch, s.prefill_chunk = 64, 4, 64
  elif arg:
    raise ValueError(f"config arg {arg!r}: expected nothing or 'runlocal'")
  return config
