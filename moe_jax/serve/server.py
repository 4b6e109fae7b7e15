"""An OpenAI-compatible HTTP server over one Engine (the `serve` extra: fastapi and uvicorn).

  POST /v1/completions   (openai_api.py: the fields, their defaults, the response)
  GET  /v1/models

One thread owns the engine (`EngineLoop`): it submits what handlers hand it and calls `step()`
while anything runs, so a request that arrives while others decode joins the running batch at
the next step (continuous batching across HTTP requests). Each handler waits on its own queue of
events from that thread (accepted or refused, tokens when streaming, the completion). A bad
request is answered 400 in OpenAI's error shape and costs the engine nothing.
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
from typing import Optional

import fastapi
import uvicorn
from fastapi import responses

from moe_jax.serve import openai_api
from moe_jax.serve.engine import Engine
from moe_jax.serve.requests import BadRequest, Request


class _Events:
  """A handler's queue, fed from the engine thread."""

  def __init__(self, stream: bool):
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue = asyncio.Queue()
    self.stream = stream

  def put(self, *event):
    self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

  async def get(self):
    return await self.queue.get()


class EngineLoop(threading.Thread):
  """The engine's only user: submits, steps, and reports back to each request's events."""

  def __init__(self, engine: Engine):
    super().__init__(name="engine", daemon=True)
    self.engine = engine
    self.inbox: queue.Queue = queue.Queue()
    self.stopping = threading.Event()
    self.failure: Optional[str] = None
    self._failing = threading.Lock()  # a request is either queued before a failure or refused

  def submit(self, request: Request, events: _Events):
    with self._failing:
      if self.failure is None:
        self.inbox.put((request, events))
        return
    events.put("failed", self.failure)

  def stop(self):
    self.stopping.set()
    self.inbox.put(None)
    self.join()

  def _take(self, request: Request, events: _Events, waiting: dict):
    on_token = (lambda choice, token, logprob: events.put("token", choice, token, logprob)) \
        if events.stream else None
    try:
      waiting[self.engine.submit(request, on_token)] = events
    except BadRequest as e:
      events.put("refused", e)
      return
    events.put("accepted")

  def run(self):
    waiting: dict[int, _Events] = {}
    try:
      while not self.stopping.is_set():
        try:  # block only when there is nothing to step
          item = self.inbox.get(timeout=None if not self.engine.has_work() else 0)
        except queue.Empty:
          item = False
        while item:
          self._take(*item, waiting)
          item = self.inbox.get_nowait() if not self.inbox.empty() else None
        if self.engine.has_work():
          for job_id, completion in self.engine.step().items():
            waiting.pop(job_id).put("done", completion)
    except Exception as e:  # pylint: disable=broad-except  (reported to every waiter)
      with self._failing:
        self.failure = f"the engine stopped: {type(e).__name__}: {e}"
      for events in waiting.values():
        events.put("failed", self.failure)
      while not self.inbox.empty():
        item = self.inbox.get_nowait()
        if item:
          item[1].put("failed", self.failure)
      traceback.print_exc()  # the server stays up, answering 500 with the reason


def _error(status: int, error: BadRequest, kind: str = "invalid_request_error"):
  return responses.JSONResponse(openai_api.error_json(error, kind), status_code=status)


def _sse(value) -> str:
  return f"data: {json.dumps(value)}\n\n"


def make_app(engine: Engine, model_name: str) -> fastapi.FastAPI:
  """The ASGI app; its lifespan starts and stops the engine thread."""
  worker = EngineLoop(engine)
  ids = itertools.count()
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(_):
    worker.start()
    yield
    worker.stop()

  app = fastapi.FastAPI(title="moe_jax", lifespan=lifespan)
  app.state.engine_loop = worker

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "moe_jax"}]}

  @app.post("/v1/completions")
  async def completions(http: fastapi.Request):
    try:
      body = json.loads(await http.body())
    except ValueError as e:
      return _error(400, BadRequest(f"body: not JSON ({e})"))
    try:
      request, options = openai_api.parse(body)
    except BadRequest as e:
      return _error(400, e)
    if options.model is not None and options.model != model_name:
      return _error(404, openai_api.FieldError("model", options.model,
                                               f"no such model; this server has {model_name!r}"))
    events = _Events(options.stream)
    worker.submit(request, events)
    kind, *value = await events.get()
    if kind == "refused":
      return _error(400, value[0])
    if kind == "failed":
      return _error(500, BadRequest(value[0]), "server_error")
    head = {"id": f"cmpl-{next(ids)}", "object": "text_completion", "created": int(time.time()),
            "model": model_name}
    if options.stream:
      return responses.StreamingResponse(_stream(engine, request, options, events, head),
                                         media_type="text/event-stream")
    kind, *value = await events.get()
    if kind == "failed":
      return _error(500, BadRequest(value[0]), "server_error")
    return openai_api.completion_json(value[0], id=head["id"], model=model_name,
                                      created=head["created"], tokenizer=engine.tokenizer,
                                      logprobs=options.logprobs)

  return app


async def _stream(engine: Engine, request: Request, options, events: _Events, head: dict):
  """Server-sent events: a chunk per sendable piece of text, the finish reasons, the usage if
  asked (stream_options.include_usage), then [DONE]."""
  texts = [openai_api.TextStream(engine.tokenizer, request.stop) for _ in range(request.n)]

  def chunk(index: int, delta: dict, finish: Optional[str]) -> str:
    return _sse({**head, "choices": [{
        "index": index, "text": delta["text"], "token_ids": delta["token_ids"],
        "logprobs": delta["logprobs"] if options.logprobs else None, "finish_reason": finish}]})
  while True:
    kind, *value = await events.get()
    if kind == "token":
      choice, token, logprob = value
      delta = texts[choice].push(token, logprob)
      if delta is not None:
        yield chunk(choice, delta, None)
    elif kind == "done":
      completion = value[0]
      for choice in completion.choices:
        yield chunk(choice.index, texts[choice.index].finish(choice), choice.finish_reason)
      if options.include_usage:
        yield _sse({**head, "choices": [], "usage": openai_api.usage_json(completion.usage)})
      break
    else:
      yield _sse(openai_api.error_json(BadRequest(value[0]), "server_error"))
      break
  yield "data: [DONE]\n\n"


def serve(engine: Engine, port: int, model_name: str, host: str = "127.0.0.1"):
  """Serves until interrupted (Ctrl-C or SIGTERM)."""
  print(f"serving {model_name!r} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
  uvicorn.run(make_app(engine, model_name), host=host, port=port, log_level="warning")
