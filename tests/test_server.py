"""The OpenAI-compatible server, running in this process on a free loopback port with a tiny
random model, driven by the official `openai` client (a test-only dependency)."""
import concurrent.futures
import contextlib
import socket
import threading
import time

import jax
import pytest

from moe_jax import model
from moe_jax.config import ModelConfig, MoEConfig

for _module in ("fastapi", "uvicorn", "openai"):
  pytest.importorskip(_module, reason=f"the server test needs {_module} "
                      "(pip install -e '.[serve,test]')")
import openai  # noqa: E402
import uvicorn  # noqa: E402

from moe_jax.serve import Engine, server  # noqa: E402

MODEL = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=64)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)
NAME = "tiny"
PROMPT = "The quick brown fox jumps"  # 26 tokens with BOS: 6 full blocks of 4
GO_ON = {"ignore_eos": True}  # a random model may end at once; these tests want tokens


@pytest.fixture(scope="module")
def engine():
  params, moe_state = model.init(jax.random.key(0), MODEL, MOE)
  return Engine(params, moe_state, MODEL, MOE, num_blocks=96, block_size=4, max_batch=8)


@contextlib.contextmanager
def _serving(engine):
  """An openai client of the server of `engine`, on a free loopback port."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  app = server.make_app(engine, NAME)
  http = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not http.started:
    assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
    time.sleep(0.05)
  try:
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                        api_key="none", max_retries=0, timeout=120)
  finally:
    http.should_exit = True
    thread.join(timeout=60)
  assert not app.state.engine_loop.is_alive()


@pytest.fixture(scope="module")
def client(engine):
  with _serving(engine) as c:
    yield c


def _complete(client, **kwargs):
  return client.completions.create(model=NAME, **{"prompt": PROMPT, "max_tokens": 8, **kwargs})


def test_models(client):
  assert [m.id for m in client.models.list().data] == [NAME]


def test_usage_and_a_repeated_prompt_is_served_from_the_cache(client):
  first = _complete(client, temperature=0, extra_body=GO_ON)
  again = _complete(client, temperature=0, extra_body=GO_ON)
  assert again.choices[0].text == first.choices[0].text
  assert first.choices[0].finish_reason == "length" and first.object == "text_completion"
  for response in (first, again):
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (26, 8, 34)
    cached = usage.prompt_tokens_details.cached_tokens
    assert usage.model_extra["prompt_cache_hit_tokens"] == cached
    assert usage.model_extra["prompt_cache_miss_tokens"] == 26 - cached
  assert again.usage.prompt_tokens_details.cached_tokens == 24


def test_n_completions_and_logprobs(client):
  response = _complete(client, n=3, temperature=1.0, seed=7, logprobs=1, extra_body=GO_ON)
  assert sorted(c.index for c in response.choices) == [0, 1, 2]
  assert len({c.text for c in response.choices}) > 1
  assert response.usage.completion_tokens == 3 * 8
  for choice in response.choices:
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert [len(top) for top in logprobs.top_logprobs] == [1] * 8  # logprobs=1: k=1 each
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_a_stream_sends_the_same_text_and_cuts_at_a_stop_string(client):
  plain = _complete(client, temperature=0, max_tokens=24, extra_body=GO_ON).choices[0].text
  stop = next(ch for ch in plain if ch.isascii() and ch.isprintable() and plain.index(ch) >= 3)
  for stops, text, reason in (([], plain, "length"), ([stop], plain[:plain.index(stop)], "stop")):
    kwargs = dict(temperature=0, max_tokens=24, stop=stops or None, logprobs=0, extra_body=GO_ON)
    whole = _complete(client, **kwargs).choices[0]
    assert (whole.text, whole.finish_reason) == (text, reason)
    chunks = list(_complete(client, stream=True, stream_options={"include_usage": True},
                            **kwargs))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == text
    assert len(pieces) >= 2 or stops  # streamed, not sent at the end (a stop may come early)
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + [reason]
    streamed = [lp for p in pieces for lp in p.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert chunks[-1].usage.prompt_tokens == 26 and not chunks[-1].choices


def test_bad_requests_get_400_and_the_server_keeps_serving(client):
  for kwargs, param in (({"temperature": -1}, "temperature"), ({"max_tokens": 60}, "max_tokens"),
                        ({"extra_body": {"best_of": 2}}, "best_of"),
                        ({"prompt": ["a", "b"]}, "prompt")):
    with pytest.raises(openai.BadRequestError) as error:
      _complete(client, **kwargs)
    assert error.value.status_code == 400
    body = error.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert f"{param}=" in body["message"] and "\n" not in body["message"]
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="gpt-5", prompt="x", max_tokens=1)
  assert _complete(client, temperature=0, max_tokens=2, extra_body=GO_ON).usage.completion_tokens == 2


def test_concurrent_requests_share_decode_steps(client, engine):
  before = engine.stats["decode_steps"]
  prompts = [f"request {i}: " + "x" * i for i in range(4)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    responses = list(pool.map(lambda p: _complete(client, prompt=p, temperature=0, max_tokens=16,
                                                  extra_body=GO_ON), prompts))
  assert all(r.usage.completion_tokens == 16 for r in responses)
  # Run one after another, four requests take 4 * 15 decode steps; batched, fewer.
  assert engine.stats["decode_steps"] - before < 4 * 15


class _BrokenEngine:
  """Accepts requests, then fails in its first step."""
  tokenizer = None

  def __init__(self):
    self.jobs = 0

  def submit(self, request, on_token=None):
    self.jobs += 1
    return self.jobs

  def has_work(self):
    return self.jobs > 0

  def step(self):
    raise RuntimeError("boom")


def test_an_engine_failure_is_a_500_for_every_request_not_a_hang():
  with _serving(_BrokenEngine()) as broken:
    for _ in range(2):
      with pytest.raises(openai.InternalServerError) as error:
        broken.completions.create(model=NAME, prompt="x", max_tokens=1)
      body = error.value.response.json()["error"]
      assert body["type"] == "server_error" and "RuntimeError: boom" in body["message"]
