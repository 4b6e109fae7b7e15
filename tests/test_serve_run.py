"""`experiment=serve` in batch mode as a user runs it (`python -m experiments.run
--config=configs/serve.py`), on the reference run's checkpoint and on its Hugging Face export."""
import json
import os
import shutil

import pytest

from moe_jax import checkpoint, config
from moe_jax.interop import hf

from runs import run

SERVE = "configs/serve.py:runlocal"
PROMPT = "def add(a, b):"  # 15 tokens with BOS: 3 full blocks of 4
REQUESTS = [
    {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    {"prompt": [PROMPT], "max_tokens": 5, "temperature": 0.8, "n": 2, "seed": 3,
     "ignore_eos": True, "logprobs": 1},
    {"prompt": [256, 10, 20, 30], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
]


def _write(path, lines):
  path.write_text("".join((json.dumps(l) if not isinstance(l, str) else l) + "\n"
                          for l in lines))
  return str(path)


def _serve(env, workdir, requests, *flags):
  result = run(env, SERVE, workdir, f"--config.serve.input={requests}",
               "--config.serve.block_size=4", *flags)
  return result, [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tokens(lines):
  return [[c["token_ids"] for c in line["choices"]] for line in lines]


def test_batch_serve_writes_completions_and_a_restart_reads_the_disk_tier(env, reference,
                                                                         tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  requests = _write(tmp_path / "requests.jsonl", REQUESTS[:1] + [""] + REQUESTS[1:])
  result, printed = _serve(env, workdir, requests)
  assert result.returncode == 0, result.stderr[-3000:]
  summary, cost = printed
  assert summary["requests"] == 3 and summary["tokens_per_second"] > 0
  assert summary["completion_tokens"] == 6 + 2 * 5 + 4 == cost["completion_tokens"]
  cold = _read(os.path.join(workdir, "completions.jsonl"))
  assert [len(line["choices"]) for line in cold] == [1, 2, 1]
  for line, request in zip(cold, REQUESTS):
    usage = line["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == (15 if request["prompt"] != REQUESTS[2]["prompt"] else 4)
    for choice in line["choices"]:
      assert len(choice["token_ids"]) == request["max_tokens"]
      assert choice["finish_reason"] == "length"
      logprobs = choice["logprobs"]
      assert len(logprobs["token_logprobs"]) == len(choice["token_ids"])
      assert all(lp <= 0 for lp in logprobs["token_logprobs"])
      assert logprobs["text_offset"][0] == 0
      top = logprobs["top_logprobs"]  # logprobs=k: the k most likely tokens at each step
      assert top is None if "logprobs" not in request else \
          [len(t) for t in top] == [request["logprobs"]] * len(choice["token_ids"])
  # Cold, request 2 already reuses the blocks request 1 cached (admitted one after the other).
  assert [line["usage"]["prompt_cache_hit_tokens"] for line in cold] == [0, 12, 0]
  a, b = cold[1]["choices"]
  assert a["token_ids"] != b["token_ids"]  # two samples of one prompt

  # A new process: the prompt's 3 full blocks come back from the disk tier, same tokens.
  result, (summary, cost) = _serve(env, workdir, requests)
  assert result.returncode == 0, result.stderr[-3000:]
  warm = _read(os.path.join(workdir, "completions.jsonl"))
  assert _tokens(warm) == _tokens(cold)
  assert [line["usage"]["prompt_cache_hit_tokens"] for line in warm] == [12, 12, 0]
  assert warm[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 12
  assert cost["cache_hit_rate"] == 24 / 34 and cost["cost"] < cost["cost_without_cache"]


def test_bad_lines_get_error_records_and_the_good_ones_are_served(env, reference, tmp_path):
  """OpenAI's Batch API: every line is checked alone; a failed line makes the exit non-zero."""
  out = tmp_path / "out.jsonl"
  bad = [('{"prompt": "x", "temperature": "hot"}', "temperature"),
         ('{"prompt": "x", "max_tokens": 40}', "max_tokens"),
         ('{"prompt": "x", "best_of": 3}', "best_of"),
         ('{"prompt": "x"', "body"),
         ('{"prompt": "a\\ud800b"}', "prompt"),
         ('{"prompt": "x", "stream": true}', "stream")]
  requests = _write(tmp_path / "requests.jsonl", [REQUESTS[0]] + [b for b, _ in bad] +
                    [REQUESTS[2]])
  result, (summary, _) = _serve(env, reference, requests, f"--config.serve.output={out}",
                                f"--config.serve.disk_dir={tmp_path / 'cache'}")
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and f"6 of 8 request lines failed (first: {requests}:2: " in lines[0]
  assert summary["requests"] == 2 and summary["failed"] == 6
  answers = _read(out)
  assert len(answers) == 8
  assert [len(a["choices"][0]["token_ids"]) for a in (answers[0], answers[7])] == [6, 4]
  for number, (answer, (_, param)) in enumerate(zip(answers[1:7], bad), 2):
    error = answer["error"]
    assert error["line"] == number and error["param"] == param, error
    assert error["message"].startswith(f"{requests}:{number}: {param}"), error

  (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "x"}\n{"prompt": "caf\xe9"}\n')
  result, _ = _serve(env, reference, str(tmp_path / "latin1.jsonl"),
                     f"--config.serve.output={tmp_path / 'none.jsonl'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "latin1.jsonl" in lines[0] and "byte position 31 (line 2)" in \
      lines[0], lines
  result = run(env, SERVE, reference)
  assert result.returncode == 2 and "serve.input=''" in result.stderr
  result = run(env, SERVE, reference, "--config.serve.port=8000",
               f"--config.serve.input={requests}")
  assert result.returncode == 2 and "exclude each other" in result.stderr
  result = run(env, SERVE, reference, "--config.serve.port=-1")
  assert result.returncode == 2 and "serve.port=-1: must be an integer in [0, 65535]" in \
      result.stderr


def test_batch_serve_of_a_hugging_face_export_matches_the_workdir(env, reference, tmp_path):
  with open(os.path.join(reference, "config.json")) as f:
    cfg = config.from_config_dict(json.load(f))
  state = checkpoint.read_numpy(os.path.join(reference, "checkpoints"), 12)
  hf.export(str(tmp_path / "hf"), state["params"], state["moe_state"], cfg.model, cfg.moe)
  requests = _write(tmp_path / "requests.jsonl", [REQUESTS[0]])
  outputs = []
  for workdir, flags in [(reference, []), (str(tmp_path / "work"),
                                           [f"--config.hf_path={tmp_path / 'hf'}"])]:
    output = tmp_path / f"{len(outputs)}.jsonl"
    result, _ = _serve(env, workdir, requests, f"--config.serve.output={output}",
                       "--config.serve.prefix_cache=False", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(_read(output))
  assert _tokens(outputs[0]) == _tokens(outputs[1])
  assert outputs[1][0]["model"] == "hf"


def test_a_checkpoints_tokenizer_json_starts_prompts_with_bos(tmp_path):
  tokenizers = pytest.importorskip("tokenizers", reason="the interop extra")
  from experiments.serve import HFTokenizer  # pylint: disable=import-outside-toplevel
  vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<eot>", "a", "b"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
  text = HFTokenizer(str(tmp_path))
  assert text.encode("a b a") == [0, 3, 4, 3] and text.eos_id == 1
  assert text.decode([3, 4]) == "a b"
