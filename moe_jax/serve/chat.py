"""Chat for the HTTP server: messages -> one prompt by the model's chat template, and a response's
text -> its thinking and its answer (DeepSeek's `reasoning_content` and `content`).

The templates (serve.chat_template):
  ""         the checkpoint's own: a Hugging Face checkpoint's tokenizer_config.json
             `chat_template` (or its chat_template.jinja), else `plain`.
  "plain"    for the byte-level models trained here, which have no special tokens: the system
             messages first, each followed by a blank line, then each turn in order as
             "User: CONTENT\\n\\n" or "Assistant: CONTENT\\n\\n", then "Assistant: ".
             A completion stops at "\\nUser:" (cut off, as any stop string is).
  "r1_zero"  for models trained with the R1-Zero template (moe_jax/rl): each user message is
             R1_ZERO_PROMPT with the message as the question, each earlier answer
             "<think></think> <answer>CONTENT</answer>\\n" (its thinking is not sent back, as
             with DeepSeek's reasoner); a system message is a line before them.

A Jinja template is rendered in jinja2's sandbox the way transformers does (trim_blocks,
lstrip_blocks, loop controls, raise_exception, a JSON `tojson`), with `messages`,
`add_generation_prompt=True`, `bos_token` and `eos_token`; the leading BOS it writes is dropped,
since the tokenizer adds one.

Thinking: an "r1_zero" response is "<think>T</think> <answer>A</answer>": T is the reasoning,
A the content. With a Jinja template that mentions <think> or </think> (DeepSeek-R1's), what
precedes "</think>" is the reasoning (from the prompt's own "<think>" if it ends with one) and
the rest, leading whitespace stripped, the content. A response without the tags is all content.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Callable, Optional

from moe_jax.serve import openai_api
from moe_jax.serve.requests import BadRequest

R1_ZERO_PROMPT = "{question} Think in <think></think>, answer in <answer></answer>.\n"
NAMES = ("", "plain", "r1_zero")
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
_TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
_OPEN = re.compile(r"\s*" + re.escape(THINK))


@dataclasses.dataclass(frozen=True)
class Template:
  """render(messages) -> the prompt's text; messages are {"role", "content"} dicts (role system,
  user or assistant). `thinks`: responses carry <think>...</think>; `answer_tags`: the content
  sits in <answer>...</answer> (R1-Zero); `stop`: stop strings every chat request gets."""
  name: str
  render: Callable[[list[dict]], str]
  thinks: bool = False
  answer_tags: bool = False
  stop: tuple[str, ...] = ()


def _plain(messages: list[dict]) -> str:
  system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
  turns = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n\n"
                  for m in messages if m["role"] != "system")
  return system + turns + "Assistant: "


def _r1_zero(messages: list[dict]) -> str:
  parts = [m["content"] + "\n" for m in messages if m["role"] == "system"]
  for m in messages:
    if m["role"] == "user":
      parts.append(R1_ZERO_PROMPT.format(question=m["content"]))
    elif m["role"] == "assistant":
      parts.append(f"{THINK}{END_THINK} {ANSWER}{m['content']}{END_ANSWER}\n")
  return "".join(parts)


PLAIN = Template("plain", _plain, stop=("\nUser:",))
R1_ZERO = Template("r1_zero", _r1_zero, thinks=True, answer_tags=True)


def _raise(message):
  raise BadRequest(f"messages=<{message}>: the model's chat template refuses them")


def jinja_template(source: str, bos_token: str = "", eos_token: str = "",
                   name: str = "jinja") -> Template:
  """A Hugging Face chat template (jinja2 raises TemplateSyntaxError if it does not parse)."""
  import jinja2  # pylint: disable=import-outside-toplevel  (the serve extra)
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False,
                                                                     indent=indent)
  env.globals.update(raise_exception=_raise,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  compiled = env.from_string(source)

  def render(messages: list[dict]) -> str:
    try:
      text = compiled.render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                             eos_token=eos_token)
    except BadRequest:
      raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
      raise BadRequest(f"messages=<{len(messages)} messages>: the model's chat template failed "
                       f"on them ({type(e).__name__}: {e})") from None
    return text[len(bos_token):] if bos_token and text.startswith(bos_token) else text
  return Template(name, render, thinks=THINK in source or END_THINK in source)


def _token_text(value) -> str:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else ""


def from_checkpoint(path: str) -> Optional[Template]:
  """The chat template a Hugging Face checkpoint directory ships, or None. Raises ValueError
  naming the file when it is there but unusable."""
  config_path = os.path.join(path, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"{config_path}: not readable JSON ({e})") from None
  source, origin = config.get("chat_template"), config_path
  if isinstance(source, list):  # named templates: the default one
    source = next((t.get("template") for t in source if isinstance(t, dict)
                   and t.get("name") == "default"), None)
  jinja_path = os.path.join(path, "chat_template.jinja")
  if source is None and os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      source, origin = f.read(), jinja_path
  if source is None:
    return None
  if not isinstance(source, str):
    raise ValueError(f"{origin}: chat_template must be a string, not {type(source).__name__}")
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    return jinja_template(source, _token_text(config.get("bos_token")),
                          _token_text(config.get("eos_token")), name=origin)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f"{origin}: its chat_template is not valid Jinja (line {e.lineno}: "
                     f"{e.message})") from None


def load(name: str, hf_path: str = "") -> Template:
  """serve.chat_template's template (module docstring); ValueError names what is wrong."""
  if name not in NAMES:
    raise ValueError(f"serve.chat_template={name!r}: must be one of {', '.join(map(repr, NAMES))}")
  if name == "r1_zero":
    return R1_ZERO
  if name == "" and hf_path:
    return from_checkpoint(hf_path) or PLAIN
  return PLAIN


# ---------------------------------------------------------------------------- thinking apart

def _held(text: str) -> str:
  """text without what may still change meaning when more comes: a tail that may begin a tag,
  and trailing whitespace (which a tag may turn into a gap that is dropped)."""
  text = text.rstrip()
  for k in range(min(len(text), max(map(len, _TAGS)) - 1), 0, -1):
    if any(tag.startswith(text[-k:]) and k < len(tag) for tag in _TAGS):
      return text[:-k].rstrip()
  return text


def split(text: str, template: Template, opened: bool = False, final: bool = True):
  """(reasoning or None, content) of a response's text (module docstring). `opened`: the prompt
  ended inside <think>. With final=False, `text` is what has come so far, and both parts are
  prefixes of the ones the finished text will give: a stream can send them as they grow."""
  if not template.thinks:
    return None, text
  if not final:
    text = _held(text)
  if not opened:
    start = _OPEN.match(text)
    if start is None:
      return None, text
    text = text[start.end():]
  end = text.find(END_THINK)
  if end < 0:
    return text, ""
  reasoning, content = text[:end], text[end + len(END_THINK):].lstrip()
  if template.answer_tags and content.startswith(ANSWER):
    content = content[len(ANSWER):]
    close = content.find(END_ANSWER)
    if close >= 0:
      tail = content[close + len(END_ANSWER):]
      content = content[:close] + (tail if tail.strip() else "")
  return reasoning, content


def opens_thinking(prompt: str, template: Template) -> bool:
  """Whether a rendered prompt leaves the model inside <think> (DeepSeek-R1's newer template)."""
  return template.thinks and not template.answer_tags and prompt.rstrip().endswith(THINK)


def reasoning_tokens(tokenizer, token_ids, template: Template, opened: bool) -> int:
  """How many of a response's tokens are its thinking (through "</think>")."""
  if not template.thinks:
    return 0
  reasoning, _ = split(tokenizer.decode(token_ids), template, opened)
  if reasoning is None:
    return 0
  low, high = 0, len(token_ids)  # the fewest tokens whose text holds END_THINK
  while low < high:
    mid = (low + high) // 2
    if END_THINK in tokenizer.decode(token_ids[:mid + 1]):
      high = mid
    else:
      low = mid + 1
  return min(low + 1, len(token_ids))


# ---------------------------------------------------------------------------- responses

def logprobs_json(tokenizer, token_ids, logprobs, top=None) -> dict:
  """Chat's logprobs object: each token's text and log-prob (bytes unknown: null), and the k
  most likely tokens' when the request asked for top_logprobs=k (top: Choice.top_logprobs)."""
  top = top or [{}] * len(token_ids)
  entry = lambda t, lp: {"token": tokenizer.decode([t]), "logprob": float(lp), "bytes": None}
  return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in alts.items()]}
                      for t, lp, alts in zip(token_ids, logprobs, top)]}


def _message(reasoning: Optional[str], content: str, template: Template) -> dict:
  message = {"role": "assistant", "content": content}
  if template.thinks:
    message["reasoning_content"] = reasoning
  return message


def completion_json(completion, template: Template, opened: bool, *, id: str, model: str,
                    created: int, tokenizer, logprobs: bool,
                    prices=None) -> dict:  # pylint: disable=redefined-builtin
  """A chat.completion object for an engine Completion."""
  choices, thinking = [], 0
  for c in completion.choices:
    reasoning, content = split(c.text, template, opened)
    thinking += reasoning_tokens(tokenizer, c.token_ids, template, opened)
    choices.append({"index": c.index, "message": _message(reasoning, content, template),
                    "logprobs": (logprobs_json(tokenizer, c.token_ids, c.logprobs,
                                               c.top_logprobs) if logprobs else None),
                    "finish_reason": c.finish_reason})
  return {"id": id, "object": "chat.completion", "created": created, "model": model,
          "choices": choices,
          "usage": openai_api.usage_json(completion.usage, prices,
                                         thinking if template.thinks else None)}


class ChatStream:
  """One chat request's chunks as its tokens come (OpenAI's chat.completion.chunk deltas):
  a first chunk per choice with the role, then `reasoning_content` and `content` deltas as they
  become certain, then each choice's last chunk with its finish_reason."""

  def __init__(self, tokenizer, stop, template: Template, opened: bool, n: int, logprobs: bool):
    self.tokenizer, self.template = tokenizer, template
    self.opened, self.logprobs = opened, logprobs
    self.texts = [openai_api.TextStream(tokenizer, stop) for _ in range(n)]
    self.sent = [("", "") for _ in range(n)]  # (reasoning, content) sent per choice

  def start(self) -> list[dict]:
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(len(self.texts))]

  def push(self, choice: int, token: int, logprob: float) -> Optional[dict]:
    text = self.texts[choice]
    delta = text.push(token, logprob)
    return None if delta is None else self._chunk(choice, text.text, delta, False, None)

  def finish(self, choice) -> dict:
    delta = self.texts[choice.index].finish(choice)
    return self._chunk(choice.index, choice.text, delta, True, choice.finish_reason)

  def _chunk(self, index, text, delta, final, finish) -> Optional[dict]:
    reasoning, content = split(text, self.template, self.opened, final)
    old_reasoning, old_content = self.sent[index]
    out = {}
    if reasoning and len(reasoning) > len(old_reasoning):
      out["reasoning_content"] = reasoning[len(old_reasoning):]
    if len(content) > len(old_content):
      out["content"] = content[len(old_content):]
    self.sent[index] = (reasoning or old_reasoning, content)
    ids = delta["token_ids"]
    if not out and not (self.logprobs and ids) and finish is None:
      return None
    return {"index": index, "delta": out, "finish_reason": finish,
            "logprobs": (logprobs_json(self.tokenizer, ids, delta["logprobs"]["token_logprobs"])
                         if self.logprobs else None)}


async def chunks(stream: ChatStream, events, head: dict, options, prices=None):
  """chat.completion.chunk events: the role, reasoning_content and content deltas, each
  choice's finish_reason, the usage if asked, then [DONE]."""
  send = lambda choices, **rest: openai_api.sse({**head, "choices": choices, **rest})
  yield send(stream.start())
  while True:
    kind, *value = await events.get()
    if kind == "token":
      piece = stream.push(*value)
      if piece is not None:
        yield send([piece])
    elif kind == "done":
      completion = value[0]
      for choice in completion.choices:
        yield send([stream.finish(choice)])
      if options.include_usage:
        thinking = sum(reasoning_tokens(stream.tokenizer, c.token_ids, stream.template,
                                             stream.opened) for c in completion.choices)
        yield send([], usage=openai_api.usage_json(
            completion.usage, prices, thinking if stream.template.thinks else None))
      break
    else:
      yield openai_api.sse(openai_api.error_json(BadRequest(value[0]), "server_error"))
      break
  yield "data: [DONE]\n\n"
