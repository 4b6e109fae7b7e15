"""OpenAI's completions and chat formats, shared by the front doors (batch JSONL and the HTTP
server): a request's JSON fields -> `Request`, a `Completion` -> the response's JSON. No web
dependencies.

Fields and defaults are OpenAI's /v1/completions (temperature 1, top_p 1, max_tokens 16, n 1),
plus vLLM's top_k, stop_token_ids and ignore_eos. A request without a seed samples with fresh
entropy (two such requests differ); a seed reproduces. logprobs=k (0..5) returns each sampled
token's log-probability and, in top_logprobs, the k most likely tokens' (none for k=0). Fields
that OpenAI defines but the engine cannot honour (echo, suffix, best_of, penalties, logit_bias)
are refused by name rather than silently ignored.

/v1/chat/completions takes `messages` instead of `prompt` (roles system, developer, user and
assistant; content a string or a list of text parts), max_tokens or max_completion_tokens
(default: the rest of the model's context), `logprobs: true` with top_logprobs 0..20; tools and
response formats other than text are refused. The template that turns messages into a prompt is
chat.py's. Usage is OpenAI's with DeepSeek's prompt_cache_hit_tokens / prompt_cache_miss_tokens,
completion_tokens_details.reasoning_tokens for a thinking template, and `cost` at the server's
prices (serve.price_*, per million tokens).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from moe_jax.serve.requests import (MAX_TOP_LOGPROBS, BadRequest, Choice, Completion, Prices,
                                    Request, Usage, cost_report)

_INT, _NUMBER, _STR, _BOOL = ((int,), "an integer"), ((int, float), "a number"), \
    ((str,), "a string"), ((bool,), "true or false")
# field -> ((types, their name), default); None (JSON null) always means the default.
_FIELDS = {"prompt": (None, None), "model": (_STR, None), "max_tokens": (_INT, 16),
           "temperature": (_NUMBER, 1.0), "top_p": (_NUMBER, 1.0), "top_k": (_INT, 0),
           "n": (_INT, 1), "seed": (_INT, None), "stop": (None, ()),
           "stop_token_ids": (((list,), "a list"), ()), "ignore_eos": (_BOOL, False),
           "logprobs": (_INT, None), "stream": (_BOOL, False),
           "stream_options": (((dict,), "an object"), None), "user": (_STR, None)}
# Fields the engine cannot honour, and the one value each may take (besides null).
_REFUSED = {"echo": False, "suffix": "", "best_of": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "logit_bias": {}}
MAX_LOGPROBS = 5


class FieldError(BadRequest):
  """A bad field: `param` names it (the OpenAI error's `param`)."""

  def __init__(self, param: str, value: Any, allowed: str):
    super().__init__(f"{param}={value!r}: {allowed}")
    self.param = param


def error_param(error: BadRequest) -> Optional[str]:
  """The field a BadRequest names (the engine's say `field=value: ...`)."""
  if isinstance(error, FieldError):
    return error.param
  head = str(error).split("=", 1)[0]
  return head if head.isidentifier() else None


@dataclasses.dataclass
class Options:
  """What shapes the response rather than the completion."""
  model: Optional[str] = None
  logprobs: bool = False
  stream: bool = False
  include_usage: bool = False


def _prompt(value):
  if isinstance(value, str):
    return value
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
    return value[0]
  if isinstance(value, list) and value and all(
      isinstance(t, int) and not isinstance(t, bool) for t in value):
    return value  # token ids
  if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
    raise FieldError("prompt", f"<{len(value)} prompts>", "one prompt per request (a string, a "
                     "list of one string, or a list of token ids); use n for several completions")
  raise FieldError("prompt", value, "must be a string, a list of one string, or a non-empty list "
                   "of token ids")


def _check_utf8(param: str, text: str):
  """A lone UTF-16 surrogate (JSON allows "\\ud800") cannot become UTF-8, hence no tokens."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise FieldError(param, text[max(0, e.start - 8):e.start + 8],
                     f"holds a lone UTF-16 surrogate at character {e.start}; text must be "
                     "valid Unicode") from None


def _fields(body: Any, fields: dict, refused: dict, what: str) -> dict:
  """body's fields checked against `fields` (types, defaults) and `refused`."""
  if not isinstance(body, dict):
    raise FieldError("body", type(body).__name__, "must be a JSON object")
  for key, value in body.items():
    if key in refused:
      if value is not None and value != refused[key]:
        raise FieldError(key, value, f"not supported by this server (only {refused[key]!r})")
    elif key not in fields:
      raise FieldError(key, value, f"unknown field; {what} takes {', '.join(fields)}")
  get = {}
  for key, (kind, default) in fields.items():
    value = body.get(key)
    if value is None:
      get[key] = default
      continue
    if kind is not None and (not isinstance(value, kind[0]) or
                             (isinstance(value, bool) and bool not in kind[0])):
      raise FieldError(key, value, f"must be {kind[1]}")
    get[key] = value
  stop = get["stop"]
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
    raise FieldError("stop", get["stop"], "must be a non-empty string or a list of them")
  for text in stop:
    _check_utf8("stop", text)
  get["stop"] = tuple(stop)
  ids = get["stop_token_ids"]
  if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
    raise FieldError("stop_token_ids", ids, "must be a list of token ids (integers >= 0)")
  stream_options = get["stream_options"] or {}
  if stream_options and not get["stream"]:
    raise FieldError("stream_options", stream_options, "only allowed with stream=true")
  if set(stream_options) - {"include_usage"} or not isinstance(
      stream_options.get("include_usage", False), bool):
    raise FieldError("stream_options", stream_options, 'takes only {"include_usage": bool}')
  get["include_usage"] = stream_options.get("include_usage", False)
  return get


def _sampling(get: dict) -> dict:
  """The Request fields both kinds of request share."""
  return dict(temperature=get["temperature"], top_p=get["top_p"], top_k=get["top_k"],
              n=get["n"], seed=get["seed"], stop=get["stop"],
              stop_token_ids=tuple(get["stop_token_ids"]), ignore_eos=get["ignore_eos"])


def parse(body: Any) -> tuple[Request, Options]:
  """A completion request's JSON object -> (Request, Options); FieldError names a bad field.
  Ranges that depend on the model (max_tokens, token ids) are the engine's to check."""
  get = _fields(body, _FIELDS, _REFUSED, "a completion request")
  if get["prompt"] is None:
    raise FieldError("prompt", None, "required")
  logprobs = get["logprobs"]
  if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
    raise FieldError("logprobs", logprobs, f"must be an integer in [0, {MAX_LOGPROBS}] or null")
  prompt = _prompt(get["prompt"])
  if isinstance(prompt, str):
    _check_utf8("prompt", prompt)
  request = Request(prompt, max_tokens=get["max_tokens"], top_logprobs=logprobs or 0,
                    **_sampling(get))
  return request, Options(get["model"], logprobs is not None, get["stream"],
                          get["include_usage"])


# ---------------------------------------------------------------------------- chat

_CHAT_FIELDS = {**{k: v for k, v in _FIELDS.items() if k not in ("prompt", "logprobs")},
                "messages": (None, None), "max_tokens": (_INT, None),
                "max_completion_tokens": (_INT, None), "logprobs": (_BOOL, False),
                "top_logprobs": (_INT, None)}
_CHAT_REFUSED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "tools": [],
                 "tool_choice": "none", "response_format": {"type": "text"}}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Besides role and content: `name` is accepted and not shown to the model; an earlier answer's
# reasoning_content is not sent back to it (DeepSeek's reasoner drops it too).
_IGNORED_KEYS = ("name", "reasoning_content")


@dataclasses.dataclass
class ChatRequest:
  messages: list[dict]      # {"role": system | user | assistant, "content": str}
  max_tokens: Optional[int]  # None: the rest of the model's context
  sampling: dict            # the other Request fields
  options: Options


def _content(param: str, content: Any, role: str) -> str:
  if content is None and role == "assistant":
    return ""
  if isinstance(content, list):
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in content):
      raise FieldError(param, content, 'parts must be {"type": "text", "text": "..."} (this '
                       "model reads text only)")
    content = "".join(p["text"] for p in content)
  if not isinstance(content, str):
    raise FieldError(param, content, "must be a string or a list of text parts")
  _check_utf8(param, content)
  return content


def _messages(value: Any) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise FieldError("messages", value, "required: a non-empty list of {role, content} objects")
  out = []
  for i, message in enumerate(value):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise FieldError(where, message, "must be an object with role and content")
    role = message.get("role")
    if role not in _ROLES:
      raise FieldError(f"{where}.role", role, f"must be one of {', '.join(_ROLES)} (this "
                       "server has no tools)")
    for key in message:
      if key not in ("role", "content") + _IGNORED_KEYS:
        raise FieldError(f"{where}.{key}", message[key], "not supported by this server")
    out.append({"role": _ROLES[role],
                "content": _content(f"{where}.content", message.get("content"), role)})
  return out


def parse_chat(body: Any) -> ChatRequest:
  """A chat request's JSON object -> ChatRequest; FieldError names a bad field."""
  get = _fields(body, _CHAT_FIELDS, _CHAT_REFUSED, "a chat request")
  messages = _messages(get["messages"])
  limit, alias = get["max_tokens"], get["max_completion_tokens"]
  if limit is not None and alias is not None and limit != alias:
    raise FieldError("max_completion_tokens", alias, f"differs from max_tokens={limit}; give one")
  top = get["top_logprobs"]
  if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
    raise FieldError("top_logprobs", top, f"must be an integer in [0, {MAX_TOP_LOGPROBS}] or null")
  if top is not None and not get["logprobs"]:
    raise FieldError("top_logprobs", top, "only allowed with logprobs=true")
  options = Options(get["model"], get["logprobs"], get["stream"], get["include_usage"])
  sampling = dict(_sampling(get), top_logprobs=top or 0)
  return ChatRequest(messages, limit if limit is not None else alias, sampling, options)


def error_json(error: BadRequest, kind: str = "invalid_request_error") -> dict:
  message = str(error).encode("utf-8", "backslashreplace").decode("utf-8")
  return {"error": {"message": message, "type": kind, "param": error_param(error),
                    "code": None}}


def usage_json(usage: Usage, prices: Optional[Prices] = None,
               reasoning_tokens: Optional[int] = None) -> dict:
  """OpenAI's usage with its cached-token detail, DeepSeek's two cache fields, the thinking's
  share of the completion when there is one, and the cost at `prices`."""
  out = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
         "total_tokens": usage.prompt_tokens + usage.completion_tokens,
         "prompt_tokens_details": {"cached_tokens": usage.prompt_cache_hit_tokens},
         "prompt_cache_hit_tokens": usage.prompt_cache_hit_tokens,
         "prompt_cache_miss_tokens": usage.prompt_cache_miss_tokens}
  if reasoning_tokens is not None:
    out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
  if prices is not None:
    out["cost"] = cost(usage, prices)
  return out


def cost(usage: Usage, prices: Prices) -> float:
  """What a usage costs at `prices` (per million tokens; cache hits at the hit price)."""
  return cost_report(usage, prices)["cost"]


def logprobs_json(tokenizer, token_ids, logprobs, context=(), top=None) -> dict:
  """OpenAI's logprobs object for `token_ids`, which follow the tokens `context` of the same
  choice. A token's text offset counts from the choice's start; the bytes of one character all
  start where it does. top: per token {token id: log-prob} (Choice.top_logprobs) or None."""
  context = list(context)
  offsets = [len(tokenizer.decode(context + list(token_ids[:i])).rstrip("\ufffd"))
             for i in range(len(token_ids))]
  return {"tokens": [tokenizer.decode([t]) for t in token_ids],
          "token_logprobs": [float(x) for x in logprobs], "text_offset": offsets,
          "top_logprobs": None if top is None else [
              {tokenizer.decode([t]): float(p) for t, p in alternatives.items()}
              for alternatives in top]}


def choice_json(choice: Choice, tokenizer, logprobs: bool) -> dict:
  return {"index": choice.index, "text": choice.text, "token_ids": list(choice.token_ids),
          "logprobs": (logprobs_json(tokenizer, choice.token_ids, choice.logprobs,
                                     top=choice.top_logprobs) if logprobs else None),
          "finish_reason": choice.finish_reason}


# pylint: disable-next=redefined-builtin
def completion_json(completion: Completion, *, id: str, model: str, created: int, tokenizer,
                    logprobs: bool, prices: Optional[Prices] = None) -> dict:
  return {"id": id, "object": "text_completion", "created": created, "model": model,
          "choices": [choice_json(c, tokenizer, logprobs) for c in completion.choices],
          "usage": usage_json(completion.usage, prices)}


class TextStream:
  """One choice's text as it is sampled, for streaming. Text is held back while a stop string
  may still begin in it or its last character is incomplete, so what is sent is always a
  prefix of the final text; each token's log-prob goes with the chunk that completes its text."""

  def __init__(self, tokenizer, stop=()):
    self.tokenizer = tokenizer
    self.stop = tuple(stop)
    self.hold = max((len(s) for s in stop), default=1) - 1
    self.ids: list[int] = []
    self.logprobs: list[float] = []
    self.text = ""   # sent so far
    self.sent = 0    # tokens sent so far

  def push(self, token: int, logprob: float) -> Optional[dict]:
    """The delta this token makes sendable, or None."""
    self.ids.append(token)
    self.logprobs.append(logprob)
    text = self.tokenizer.decode(self.ids)
    # The engine reports a token before it looks for stop strings: look here too.
    cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
    safe = (text[:cut] if cut >= 0 else text[:len(text) - self.hold]).rstrip("\ufffd")
    if len(safe) <= len(self.text) or not safe.startswith(self.text):
      return None
    return self._delta(safe, final=False)

  def finish(self, choice: Choice) -> dict:
    """The rest of the choice's final text and tokens."""
    self.ids, self.logprobs = list(choice.token_ids), list(choice.logprobs)
    return self._delta(choice.text, final=True)

  def _delta(self, text: str, final: bool) -> dict:
    end = len(self.ids) if final else self.sent
    while not final and end < len(self.ids) and \
        len(self.tokenizer.decode(self.ids[:end + 1])) <= len(text):
      end += 1
    delta = {"text": text[len(self.text):],
             "token_ids": self.ids[self.sent:end],
             "logprobs": logprobs_json(self.tokenizer, self.ids[self.sent:end],
                                       self.logprobs[self.sent:end], self.ids[:self.sent])}
    self.text, self.sent = text, end
    return delta


def sse(value) -> str:
  """One server-sent event."""
  return f"data: {json.dumps(value)}\n\n"


async def completion_chunks(tokenizer, request: Request, options: Options, events, head: dict,
                            prices: Optional[Prices] = None):
  """Server-sent events: a chunk per sendable piece of text, the finish reasons, the usage if
  asked (stream_options.include_usage), then [DONE]. `events` is the server's queue of what
  the engine thread reports: ("token", choice, id, logprob), ("done", Completion), or a failure
  with its message."""
  texts = [TextStream(tokenizer, request.stop) for _ in range(request.n)]

  def chunk(index: int, delta: dict, finish: Optional[str]) -> str:
    return sse({**head, "choices": [{
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
        yield sse({**head, "choices": [], "usage": usage_json(completion.usage, prices)})
      break
    else:
      yield sse(error_json(BadRequest(value[0]), "server_error"))
      break
  yield "data: [DONE]\n\n"
