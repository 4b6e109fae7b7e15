"""The OpenAI-compatible server, running in this process on a free loopback port with a tiny
random model, driven by the official `openai` client (a test-only dependency), plain HTTP where
a client must misbehave (huge bodies, disconnects)."""
import collections
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import socket
import threading
import time

import jax
import pytest

from moe_jax import model
from moe_jax.config import ModelConfig, MoEConfig

for _module in ("fastapi", "uvicorn", "openai", "jinja2", "prometheus_client"):
  pytest.importorskip(_module, reason=f"the server test needs {_module} "
                      "(pip install -e '.[serve,test]')")
import openai  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moe_jax.serve import ByteTokenizer, Choice, Completion, Engine, Prices, Usage  # noqa: E402
from moe_jax.serve import chat, server  # noqa: E402

MODEL = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=2,
                    num_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=64)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)
NAME = "tiny"
PROMPT = "The quick brown fox jumps"  # 26 tokens with BOS: 6 full blocks of 4
GO_ON = {"ignore_eos": True}  # a random model may end at once; these tests want tokens
BODY_LIMIT = 1 << 16
PRICES = Prices(hit=1.0, miss=3.0, output=10.0)


@pytest.fixture(scope="module")
def engine():
  params, moe_state = model.init(jax.random.key(0), MODEL, MOE)
  return Engine(params, moe_state, MODEL, MOE, num_blocks=96, block_size=4, max_batch=8)


@contextlib.contextmanager
def _serving(engine, **options):
  """An openai client of the server of `engine` (make_app's options), on a free loopback
  port."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  app = server.make_app(engine, NAME, **options)
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
  with _serving(engine, max_body_bytes=BODY_LIMIT, prices=PRICES) as c:
    yield c


def _http(client, method: str, path: str, body: bytes = b"", headers=None):
  """(status, body) of a plain HTTP request to the server of `client`."""
  url = client.base_url
  conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()
  finally:
    conn.close()


def _metrics(client) -> dict:
  """/metrics, parsed by the Prometheus client's own parser: {sample name{labels}: value}."""
  status, body = _http(client, "GET", "/metrics")
  assert status == 200
  samples = {}
  for family in text_string_to_metric_families(body.decode()):
    for sample in family.samples:
      labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
      samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
  return samples


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
    self.stats = collections.Counter()

  def submit(self, request, on_token=None):
    self.jobs += 1
    return self.jobs

  def has_work(self):
    return self.jobs > 0

  def load(self):
    return {"running": self.jobs, "waiting": 0, "blocks_used": 0, "blocks_total": 1}

  def step(self):
    raise RuntimeError("boom")


def test_an_engine_failure_is_a_500_then_health_and_new_requests_say_503():
  with _serving(_BrokenEngine()) as broken:
    assert _http(broken, "GET", "/health")[0] == 200
    for status in (500, 503):
      with pytest.raises(openai.InternalServerError) as error:
        broken.completions.create(model=NAME, prompt="x", max_tokens=1)
      assert error.value.status_code == status
      body = error.value.response.json()["error"]
      assert body["type"] == "server_error" and "RuntimeError: boom" in body["message"]
    status, body = _http(broken, "GET", "/health")
    assert status == 503 and "RuntimeError: boom" in json.loads(body)["error"]["message"]
    assert _metrics(broken)["moe_jax_engine_up"] == 0


def test_serve_exits_non_zero_when_the_engine_stops():
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  outcome = []

  def run():
    try:
      server.serve(_BrokenEngine(), port, NAME)
    except SystemExit as e:
      outcome.append(e)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                         timeout=30)
  deadline = time.monotonic() + 60
  while True:
    try:
      client.completions.create(model=NAME, prompt="x", max_tokens=1)
    except openai.APIConnectionError:
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.1)
      continue
    except openai.InternalServerError:
      break
  thread.join(timeout=30)
  assert not thread.is_alive() and len(outcome) == 1
  assert outcome[0].code not in (0, None) and "RuntimeError: boom" in str(outcome[0].code)


# ---------------------------------------------------------------------------- chat

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_chat_is_a_completion_of_the_templated_prompt_plain_and_streamed(client):
  prompt = chat.PLAIN.render(CHAT)
  kwargs = dict(temperature=0, max_tokens=12, extra_body=GO_ON)
  plain = _complete(client, prompt=prompt, stop=list(chat.PLAIN.stop), logprobs=0, **kwargs)
  reply = client.chat.completions.create(model=NAME, messages=CHAT, logprobs=True, **kwargs)
  choice = reply.choices[0]
  assert reply.object == "chat.completion" and choice.message.role == "assistant"
  assert choice.message.content == plain.choices[0].text
  assert choice.finish_reason == plain.choices[0].finish_reason
  assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
      plain.choices[0].logprobs.token_logprobs, abs=1e-5)
  usage = reply.usage
  assert usage.prompt_tokens == len(ByteTokenizer().encode(prompt))
  assert usage.model_extra["prompt_cache_hit_tokens"] == usage.prompt_tokens_details.cached_tokens
  assert usage.model_extra["prompt_cache_hit_tokens"] > 0  # the completion above cached it
  assert usage.model_extra["cost"] == pytest.approx(
      (usage.model_extra["prompt_cache_hit_tokens"] * PRICES.hit + usage.model_extra[
          "prompt_cache_miss_tokens"] * PRICES.miss + usage.completion_tokens * PRICES.output)
      / 1e6)
  chunks = list(client.chat.completions.create(
      model=NAME, messages=CHAT, stream=True, stream_options={"include_usage": True}, **kwargs))
  assert chunks[0].choices[0].delta.role == "assistant"
  pieces = [c.choices[0] for c in chunks if c.choices]
  assert "".join(p.delta.content or "" for p in pieces) == choice.message.content
  assert [p.finish_reason for p in pieces][-1] == choice.finish_reason
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_chat_errors_name_the_field_and_the_prompt_length(client):
  long = [{"role": "user", "content": "x" * 80}]
  length = len(ByteTokenizer().encode(chat.PLAIN.render(long)))
  cases = ((long, {}, "messages", f"the prompt is {length} tokens"),
           ([{"role": "tool", "content": "x"}], {}, "messages[0].role", "tool"),
           (CHAT, {"extra_body": {"tools": [{"type": "function"}]}}, "tools", "not supported"))
  for messages, extra, param, words in cases:
    with pytest.raises(openai.BadRequestError) as error:
      client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, **extra)
    body = error.value.response.json()["error"]
    assert body["param"] == param and words in body["message"], body
  # A lone surrogate (which the openai client cannot even send) is a 400 naming the field.
  for path, body, param in (("/v1/chat/completions", r'{"messages": [{"role": "user", '
                             r'"content": "a\ud800b"}]}', "messages[0].content"),
                            ("/v1/completions", r'{"prompt": "a\ud800b"}', "prompt")):
    status, answer = _http(client, "POST", path, body.encode(),
                           {"Content-Type": "application/json"})
    error = json.loads(answer)["error"]
    assert status == 400 and error["param"] == param and "surrogate" in error["message"]
  reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2,
                                         extra_body=GO_ON)
  assert reply.usage.completion_tokens == 2


class _ScriptedEngine:
  """Writes `script` for every prompt, a byte a step, through the engine's interface (submit,
  step, cancel, load, stats): what an R1-Zero-trained model writes, without training one."""
  tokenizer = ByteTokenizer()
  model_cfg = dataclasses.replace(MODEL, max_seq_len=256)

  def __init__(self, script: str):
    self.script = list(script.encode())
    self.jobs, self.prompts = {}, []
    self.stats = collections.Counter()

  def submit(self, request, on_token=None):
    if request.temperature == 0.25:  # a request this engine fails on, not with BadRequest
      raise ZeroDivisionError("a quarter")
    self.prompts.append(list(request.prompt))
    self.jobs[len(self.prompts)] = (request, on_token, [])
    return len(self.prompts)

  def has_work(self):
    return bool(self.jobs)

  def load(self):
    return {"running": len(self.jobs), "waiting": 0, "blocks_used": 0, "blocks_total": 8}

  def step(self):
    done = {}
    for job, (request, on_token, out) in list(self.jobs.items()):
      out.append(self.script[len(out)])
      self.stats["tokens_generated"] += 1
      if on_token is not None:
        on_token(0, out[-1], -0.5)
      if len(out) in (len(self.script), request.max_tokens):
        del self.jobs[job]
        prompt = self.prompts[job - 1]
        done[job] = Completion(prompt, [Choice(0, self.tokenizer.decode(out), out,
                                               [-0.5] * len(out), "stop")],
                               Usage(len(prompt), 0, len(prompt), len(out)))
    return done


def test_reasoning_content_comes_apart_for_an_r1_zero_model():
  think, answer = "7 plus 5 makes 12", "12"
  engine = _ScriptedEngine(f"<think>{think}</think> <answer>{answer}</answer>")
  with _serving(engine, template=chat.R1_ZERO) as r1:
    messages = [{"role": "user", "content": "What is 7+5?"}]
    reply = r1.chat.completions.create(model=NAME, messages=messages)
    assert engine.prompts[0] == ByteTokenizer().encode(
        chat.R1_ZERO_PROMPT.format(question="What is 7+5?"))
    message = reply.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (think, answer)
    thinking = reply.usage.completion_tokens_details.reasoning_tokens
    assert thinking == len(f"<think>{think}</think>")
    chunks = list(r1.chat.completions.create(model=NAME, messages=messages, stream=True,
                                             stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = ["".join((d.model_extra or {}).get(k) or "" for d in deltas)
                for k in ("reasoning_content",)] + ["".join(d.content or "" for d in deltas)]
    assert streamed == [think, answer]
    # The thinking streams before the answer is written, not all at the end.
    assert sum(1 for d in deltas if (d.model_extra or {}).get("reasoning_content")) > 3
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thinking
    # One request's failure is its own 500, naming the cause; the next is served.
    with pytest.raises(openai.InternalServerError) as error:
      r1.chat.completions.create(model=NAME, messages=messages, temperature=0.25)
    assert "ZeroDivisionError: a quarter" in error.value.response.json()["error"]["message"]
    assert r1.chat.completions.create(model=NAME, messages=messages).choices[0].message.content \
        == answer
    assert _http(r1, "GET", "/health")[0] == 200


def test_a_checkpoints_r1_style_jinja_template_thinks_from_the_prompt(tmp_path):
  """The template of a Hugging Face checkpoint's tokenizer_config.json, in DeepSeek-R1's format
  (written for this test): the generation prompt opens <think>, the reply closes it."""
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{{ '<｜User｜>' + m['content'] }}{% else %}{{ '<｜Assistant｜>' + m['content'] + "
              "eos_token }}{% endif %}{% endfor %}{{ '<｜Assistant｜><think>\\n' }}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": template, "bos_token": "<｜begin▁of▁sentence｜>",
      "eos_token": "<｜end▁of▁sentence｜>"}), encoding="utf-8")
  engine = _ScriptedEngine("3 and 4 is 7\n</think>\n\n7")
  with _serving(engine, template=chat.load("", str(tmp_path))) as r1:
    reply = r1.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "3+4?"}])
  assert engine.prompts[0] == ByteTokenizer().encode("<｜User｜>3+4?<｜Assistant｜><think>\n")
  message = reply.choices[0].message
  assert (message.model_extra["reasoning_content"], message.content) == ("3 and 4 is 7\n", "7")


# ---------------------------------------------------------------------------- bad HTTP

def test_a_body_over_the_limit_is_413_before_it_is_parsed(client):
  big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
  status, body = _http(client, "POST", "/v1/completions", big,
                       {"Content-Type": "application/json"})
  error = json.loads(body)["error"]
  assert status == 413 and error["param"] == "body" and str(BODY_LIMIT) in error["message"]


def test_deeply_nested_json_is_a_json_400(client):
  for path in ("/v1/completions", "/v1/chat/completions"):
    for body in ("[" * 20000 + "]" * 20000,
                 '{"prompt": ' + "[" * 900 + "]" * 900 + ', "messages": 1}'):
      status, answer = _http(client, "POST", path, body.encode(),
                             {"Content-Type": "application/json"})
      assert status == 400, (path, body[:30], answer[:200])
      assert json.loads(answer)["error"]["type"] == "invalid_request_error"
  assert _complete(client, max_tokens=1, extra_body=GO_ON).usage.completion_tokens == 1


def test_metrics_are_prometheus_text_with_the_named_series(client):
  before = _metrics(client)
  replies = [_complete(client, temperature=0, max_tokens=4, extra_body=GO_ON) for _ in range(2)]
  after = _metrics(client)
  for name in ("moe_jax_num_requests_running", "moe_jax_num_requests_waiting",
               "moe_jax_kv_blocks_used", "moe_jax_kv_blocks_total",
               "moe_jax_prefix_cache_hit_rate", "moe_jax_generation_tokens_per_second"):
    assert name in after, name
  assert after["moe_jax_engine_up"] == 1 and after["moe_jax_num_requests_running"] == 0
  assert after["moe_jax_kv_blocks_total"] == 95
  assert after["moe_jax_generation_tokens_per_second"] > 0
  assert after["moe_jax_cost_total"] - before["moe_jax_cost_total"] == pytest.approx(
      sum(r.usage.model_extra["cost"] for r in replies))
  assert after["moe_jax_requests_total{outcome=finished}"] == \
      before["moe_jax_requests_total{outcome=finished}"] + 2
  assert after["moe_jax_prompt_tokens_total{source=cache}"] - before[
      "moe_jax_prompt_tokens_total{source=cache}"] == sum(
          r.usage.prompt_tokens_details.cached_tokens for r in replies)
  assert 0 < after["moe_jax_prefix_cache_hit_rate"] < 1  # the second prompt hit the cache


# ---------------------------------------------------------------------------- disconnects

class _SlowEngine(Engine):
  """An Engine whose steps take STEP_S and are recorded: (start time, the running job ids)."""
  STEP_S = 0.1

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.log = []

  def step(self):
    self.log.append((time.monotonic(), set(self.running) | set(self.waiting)))
    time.sleep(self.STEP_S)
    return super().step()


@pytest.fixture(scope="module")
def slow():
  params, moe_state = model.init(jax.random.key(0), MODEL, MOE)
  engine = _SlowEngine(params, moe_state, MODEL, MOE, num_blocks=96, block_size=4, max_batch=8)
  with _serving(engine) as c:
    yield engine, c


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_is_cancelled_within_one_step(slow, stream):
  engine, client = slow
  body = json.dumps({"prompt": PROMPT, "max_tokens": 30, "ignore_eos": True, "stream": stream,
                     "temperature": 0})
  url = client.base_url
  conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
  conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  if stream:
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(2):  # two token chunks: the request is running
      while not response.readline().startswith(b"data: "):
        pass
  else:
    deadline = time.monotonic() + 60
    while not engine.running and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(3 * _SlowEngine.STEP_S)
  job = next(iter(engine.running))
  conn.sock.shutdown(socket.SHUT_RDWR)
  conn.close()
  gone = time.monotonic()
  deadline = gone + 30
  while engine.has_work() and time.monotonic() < deadline:
    time.sleep(0.02)
  assert not engine.has_work() and job not in engine.jobs
  # A step may already be under way when the client goes; no step after it computes the job.
  assert sum(1 for start, jobs in engine.log if start > gone and job in jobs) <= 1
  assert engine.pages.available() == engine.pages.capacity  # every block free or cached
  assert engine.reserved == 0
  assert engine.stats["decode_steps"] < 30 * len(engine.log)
  deadline = time.monotonic() + 10
  while _metrics(client)["moe_jax_num_requests_running"] and time.monotonic() < deadline:
    time.sleep(0.02)
  samples = _metrics(client)
  assert samples["moe_jax_requests_total{outcome=cancelled}"] >= 1
  assert samples["moe_jax_num_requests_running"] == samples["moe_jax_kv_blocks_used"] == 0
  assert _complete(client, max_tokens=2, extra_body=GO_ON).usage.completion_tokens == 2
