"""An OpenAI-compatible HTTP server over one Engine (the `serve` extra: fastapi, uvicorn, jinja2).

  POST /v1/completions        openai_api.py: the fields, their defaults, the response
  POST /v1/chat/completions   the same engine behind the model's chat template (chat.py), the
                              thinking apart as `reasoning_content`
  GET  /v1/models
  GET  /health                200 while the engine serves, 503 once it has stopped
  GET  /metrics               Prometheus text (monitor.py)

One thread owns the engine (`EngineLoop`): it takes what handlers hand it (requests, and
cancellations) and calls `step()` while anything runs, so a request that arrives while others
decode joins the running batch at the next step (continuous batching across HTTP requests). Each
handler waits on its own queue of events from that thread (accepted or refused, tokens when
streaming, the completion).

Errors are OpenAI's error object: 400 bad input, naming the field (a prompt longer than the
context names its length); 404 an unknown model; 413 a body over the size limit, refused before
it is read; 500 a request that failed, naming the cause (the server keeps serving); 503 once the
engine has stopped. A client that disconnects, streaming or not, cancels its request: the engine
drops it before its next step and frees its blocks. If a step fails the engine cannot go on: every
waiting request gets 500, /health and new requests 503, and `serve` exits non-zero. Ctrl-C or
SIGTERM stop the server: open streams are cut after GRACE_S, and the engine thread gets up to
STOP_S to finish the step under way.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import threading
import time
import traceback
from typing import Callable, Optional

import fastapi
import uvicorn
from fastapi import responses

from moe_jax.serve import chat, openai_api
from moe_jax.serve.engine import Engine
from moe_jax.serve.monitor import Monitor
from moe_jax.serve.requests import BadRequest, Prices, Request

MAX_BODY_BYTES = 8 << 20  # the default body-size limit (serve.max_body_mb)
GRACE_S = 2.0             # open connections get this long once Ctrl-C or SIGTERM arrives
STOP_S = 10.0             # and the engine thread this long to finish its step


class _Events:
  """A handler's queue, fed from the engine thread."""

  def __init__(self, stream: bool):
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue = asyncio.Queue()
    self.stream = stream

  def put(self, *event):
    with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
      self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

  async def get(self):
    return await self.queue.get()


class EngineLoop(threading.Thread):
  """The engine's only user: submits, cancels, steps, and reports to each request's events."""

  def __init__(self, engine: Engine, monitor: Monitor, on_failure: Optional[Callable] = None):
    super().__init__(name="engine", daemon=True)
    self.engine, self.monitor, self.on_failure = engine, monitor, on_failure
    self.inbox: queue.Queue = queue.Queue()
    self.stopping = threading.Event()
    self.failure: Optional[str] = None
    self._failing = threading.Lock()  # a request is either queued before a failure or refused

  def submit(self, request: Request, events: _Events):
    with self._failing:
      if self.failure is None:
        self.inbox.put(("submit", request, events))
        return
    events.put("stopped", self.failure)

  def cancel(self, events: _Events):
    """The request of `events` is dropped before the engine's next step."""
    self.inbox.put(("cancel", events))

  def stop(self, timeout: Optional[float] = None) -> bool:
    self.stopping.set()
    self.inbox.put(None)
    self.join(timeout)
    return not self.is_alive()

  def _take(self, item, jobs: dict, ids: dict):
    if item[0] == "cancel":
      job_id = ids.pop(item[1], None)
      if job_id is not None:
        del jobs[job_id]
        self.engine.cancel(job_id)
        self.monitor.count("cancelled")
      return
    _, request, events = item
    on_token = (lambda choice, token, logprob: events.put("token", choice, token, logprob)) \
        if events.stream else None
    try:
      job_id = self.engine.submit(request, on_token)
    except BadRequest as e:
      events.put("refused", e)
      return
    except Exception as e:  # pylint: disable=broad-except  (that request's failure alone)
      events.put("error", f"{type(e).__name__}: {e}")
      return
    jobs[job_id], ids[events] = events, job_id
    events.put("accepted")

  def _record(self):
    self.monitor.stepped(self.engine.load(), self.engine.stats["tokens_generated"])

  def run(self):
    jobs: dict[int, _Events] = {}
    ids: dict[_Events, int] = {}
    try:
      self._record()
      while not self.stopping.is_set():
        try:  # block only when there is nothing to step
          item = self.inbox.get(timeout=None if not self.engine.has_work() else 0)
        except queue.Empty:
          item = False
        while item:
          self._take(item, jobs, ids)
          item = self.inbox.get_nowait() if not self.inbox.empty() else None
        if self.engine.has_work() and not self.stopping.is_set():
          for job_id, completion in self.engine.step().items():
            events = jobs.pop(job_id)
            del ids[events]
            self.monitor.finished(completion.usage)
            events.put("done", completion)
        self._record()  # after a step, or a cancellation that emptied the engine
    except Exception as e:  # pylint: disable=broad-except  (reported to every waiter)
      self._fail(e, jobs)

  def _fail(self, error: Exception, jobs: dict):
    with self._failing:
      self.failure = f"the engine stopped: {type(error).__name__}: {error}"
    self.monitor.died()
    for events in jobs.values():
      events.put("failed", self.failure)
    while not self.inbox.empty():
      item = self.inbox.get_nowait()
      if item and item[0] == "submit":
        item[2].put("failed", self.failure)
    traceback.print_exc()
    if self.on_failure is not None:
      self.on_failure()


class _Refusal(Exception):
  """A request answered with an error: its HTTP status and OpenAI error object."""

  def __init__(self, status: int, error: BadRequest, kind: str = "invalid_request_error"):
    super().__init__(str(error))
    self.status, self.error, self.kind = status, error, kind


class _Gone(Exception):
  """The client disconnected."""


async def _read_json(http: fastapi.Request, limit: int):
  """The body as JSON; 413 as soon as it is known to exceed `limit` bytes, before parsing."""
  too_big = lambda size: _Refusal(413, openai_api.FieldError(
      "body", f"<{size} bytes>", f"larger than this server takes ({limit} bytes, "
      "serve.max_body_mb)"))
  declared = http.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise too_big(int(declared))
  chunks, size = [], 0
  async for chunk in http.stream():
    size += len(chunk)
    if size > limit:
      raise too_big(f"over {limit}")
    chunks.append(chunk)
  try:
    return json.loads(b"".join(chunks))
  except RecursionError:
    raise _Refusal(400, BadRequest("body=<JSON>: nested too deeply")) from None
  except ValueError as e:
    raise _Refusal(400, BadRequest(f"body=<{size} bytes>: not JSON ({e})")) from None


def _parsed(parse, body):
  try:
    return parse(body)
  except BadRequest as e:
    raise _Refusal(400, e) from None
  except RecursionError:
    raise _Refusal(400, BadRequest("body=<JSON>: nested too deeply")) from None


async def _disconnected(http: fastapi.Request):
  """Returns once the client has gone (the body has been read: only a disconnect comes)."""
  while (await http.receive())["type"] != "http.disconnect":
    pass


async def _next(events: _Events, gone: asyncio.Future):
  get = asyncio.ensure_future(events.get())
  done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
  if get in done:
    return get.result()
  get.cancel()
  raise _Gone()


class _Handlers:
  """The endpoints of one app, over one engine thread."""

  def __init__(self, engine: Engine, model_name: str, template: chat.Template,
               monitor: Monitor, worker: EngineLoop, max_body_bytes: int):
    self.engine, self.model_name, self.template = engine, model_name, template
    self.monitor, self.worker, self.max_body_bytes = monitor, worker, max_body_bytes
    self.ids = itertools.count()
    self.created = int(time.time())

  async def refused(self, _, e: _Refusal):
    self.monitor.count("refused" if e.status < 500 else "failed")
    return responses.JSONResponse(openai_api.error_json(e.error, e.kind), status_code=e.status)

  async def crashed(self, _, e: Exception):  # a bug of ours: still that request's error alone
    self.monitor.count("failed")
    error = BadRequest(f"the server failed on this request: {type(e).__name__}: {e}")
    return responses.JSONResponse(openai_api.error_json(error, "server_error"), status_code=500)

  async def health(self):
    if self.worker.failure is not None:
      return responses.JSONResponse(openai_api.error_json(BadRequest(self.worker.failure),
                                                          "server_error"), status_code=503)
    return {"status": "ok"}

  async def metrics(self):
    return responses.PlainTextResponse(self.monitor.render(),
                                       media_type="text/plain; version=0.0.4; charset=utf-8")

  async def models(self):
    return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                        "created": self.created, "owned_by": "moe_jax"}]}

  def _head(self, model: Optional[str], prefix: str, kind: str) -> dict:
    if model is not None and model != self.model_name:
      raise _Refusal(404, openai_api.FieldError(
          "model", model, f"no such model; this server has {self.model_name!r}"))
    return {"id": f"{prefix}-{next(self.ids)}", "object": kind, "created": int(time.time()),
            "model": self.model_name}

  async def _run(self, http, request: Request, stream: bool, chunks, whole):
    """Submits `request`; answers whole(completion), or with `stream` the server-sent events
    chunks(events) yields. Cancels the request if the client goes before the end."""
    events, finished = _Events(stream), False
    self.worker.submit(request, events)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
      kind, *value = await _next(events, gone)
      if kind == "accepted" and stream:
        finished = True  # from here on the stream's own generator cancels
        return responses.StreamingResponse(_cancelling(chunks(events), self.worker, events),
                                           media_type="text/event-stream")
      if kind == "accepted":
        kind, *value = await _next(events, gone)
      finished = True
      if kind == "done":
        return whole(value[0])
      if kind == "refused":
        raise _Refusal(400, value[0])
      status = {"stopped": 503}.get(kind, 500)
      raise _Refusal(status, BadRequest(value[0]), "server_error")
    except _Gone:
      return responses.Response(status_code=499)  # nobody reads it
    finally:
      gone.cancel()
      if not finished:
        self.worker.cancel(events)

  async def completions(self, http: fastapi.Request):
    request, options = _parsed(openai_api.parse, await _read_json(http, self.max_body_bytes))
    head = self._head(options.model, "cmpl", "text_completion")
    tokenizer, prices = self.engine.tokenizer, self.monitor.prices
    whole = lambda completion: openai_api.completion_json(
        completion, id=head["id"], model=self.model_name, created=head["created"],
        tokenizer=tokenizer, logprobs=options.logprobs, prices=prices)
    chunks = lambda events: openai_api.completion_chunks(tokenizer, request, options, events,
                                                         head, prices)
    return await self._run(http, request, options.stream, chunks, whole)

  async def chat_completions(self, http: fastapi.Request):
    parsed = _parsed(openai_api.parse_chat, await _read_json(http, self.max_body_bytes))
    options, template, tokenizer = parsed.options, self.template, self.engine.tokenizer
    head = self._head(options.model, "chatcmpl", "chat.completion.chunk")
    prompt = _parsed(template.render, parsed.messages)
    try:
      prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt)
    except UnicodeError as e:
      raise _Refusal(400, BadRequest(f"messages=<...>: the prompt cannot be encoded ({e})"))
    request = _chat_request(parsed, prompt_ids, self.engine.model_cfg.max_seq_len, template)
    opened, prices = chat.opens_thinking(prompt, template), self.monitor.prices
    whole = lambda completion: chat.completion_json(
        completion, template, opened, id=head["id"], model=self.model_name,
        created=head["created"], tokenizer=tokenizer, logprobs=options.logprobs, prices=prices)
    chunks = lambda events: chat.chunks(
        chat.ChatStream(tokenizer, request.stop, template, opened, request.n, options.logprobs),
        events, head, options, prices)
    return await self._run(http, request, options.stream, chunks, whole)


def make_app(engine: Engine, model_name: str, *, template: chat.Template = chat.PLAIN,
             prices: Optional[Prices] = None, max_body_bytes: int = MAX_BODY_BYTES,
             on_failure: Optional[Callable] = None) -> fastapi.FastAPI:
  """The ASGI app; its lifespan starts and stops the engine thread. on_failure() is called from
  that thread if the engine stops."""
  monitor = Monitor(prices)
  worker = EngineLoop(engine, monitor, on_failure)
  handlers = _Handlers(engine, model_name, template, monitor, worker, max_body_bytes)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    worker.start()
    yield
    worker.stop(STOP_S)

  app = fastapi.FastAPI(title="moe_jax", lifespan=lifespan)
  app.state.engine_loop, app.state.monitor = worker, monitor
  app.add_exception_handler(_Refusal, handlers.refused)
  app.add_exception_handler(Exception, handlers.crashed)
  app.get("/health")(handlers.health)
  app.get("/metrics")(handlers.metrics)
  app.get("/v1/models")(handlers.models)
  app.post("/v1/completions")(handlers.completions)
  app.post("/v1/chat/completions")(handlers.chat_completions)
  return app


def _chat_request(parsed: openai_api.ChatRequest, ids: list, max_len: int,
                  template: chat.Template) -> Request:
  if len(ids) >= max_len:
    raise _Refusal(400, openai_api.FieldError(
        "messages", f"<a {len(ids)}-token prompt>", f"the prompt is {len(ids)} tokens; this "
        f"model's context (max_model_len, model.max_seq_len) is {max_len}, which leaves no "
        "room for a completion"))
  max_tokens = parsed.max_tokens if parsed.max_tokens is not None else max_len - len(ids)
  sampling = dict(parsed.sampling, stop=tuple(parsed.sampling["stop"]) + template.stop)
  return Request(ids, max_tokens=max_tokens, **sampling)


async def _cancelling(chunks, worker: EngineLoop, events: _Events):
  """The stream's chunks; if it is closed early (the client went away, or the server stops),
  the request is cancelled."""
  done = False
  try:
    async for chunk in chunks:
      yield chunk
    done = True
  finally:
    if not done:
      worker.cancel(events)


def serve(engine: Engine, port: int, model_name: str, *, template: chat.Template = chat.PLAIN,
          prices: Optional[Prices] = None, max_body_bytes: int = MAX_BODY_BYTES,
          host: str = "127.0.0.1"):
  """Serves until interrupted (Ctrl-C or SIGTERM). SystemExit (status 1) if the engine stopped."""
  server: list[uvicorn.Server] = []
  app = make_app(engine, model_name, template=template, prices=prices,
                 max_body_bytes=max_body_bytes,
                 on_failure=lambda: setattr(server[0], "should_exit", True))
  server.append(uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                              timeout_graceful_shutdown=GRACE_S)))
  print(f"serving {model_name!r} on http://{host}:{port}/v1 with the {template.name!r} chat "
        "template (Ctrl-C stops)", flush=True)
  with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once it has stopped
    server[0].run()
  failure = app.state.engine_loop.failure
  if failure is not None:
    raise SystemExit(f"{failure}: the server has stopped")
