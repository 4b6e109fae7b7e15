"""The OpenAI request and response formats shared by the batch and HTTP front doors, and the
chat templates (no model)."""
import dataclasses
import json

import pytest

from moe_jax.config import ConfigError, ServeConfig
from moe_jax.rl import tasks
from moe_jax.serve import BadRequest, ByteTokenizer, Choice, Prices, Usage, chat
from moe_jax.serve.openai_api import (FieldError, TextStream, error_json, parse, parse_chat,
                                      usage_json)

_PROBLEM = tasks.Problem("add", (1, 2), 3, "q", "3")


def test_parse_takes_openai_defaults_and_shapes():
  request, options = parse({"prompt": ["hi"], "stop": "\n", "logprobs": 0, "model": "m"})
  assert (request.prompt, request.max_tokens, request.temperature, request.n) == ("hi", 16, 1.0, 1)
  assert request.stop == ("\n",) and options.logprobs and options.model == "m"
  request, options = parse({"prompt": [1, 2, 3], "temperature": None, "stream": True,
                            "stream_options": {"include_usage": True}, "echo": False})
  assert request.prompt == [1, 2, 3] and request.temperature == 1.0
  assert options.stream and options.include_usage and not options.logprobs


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "max_tokens": 2.5},
                                                        "max_tokens"),
    ({"prompt": "a", "temperature": True}, "temperature"), ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"), ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "tempreature": 0}, "tempreature"), ([], "body")])
def test_parse_names_the_bad_field(body, param):
  with pytest.raises(FieldError) as error:
    parse(body)
  assert error.value.param == param and str(error.value).startswith(f"{param}=")
  assert error_json(error.value)["error"]["param"] == param


def test_usage_has_openai_and_deepseek_cache_fields():
  assert usage_json(Usage(10, 8, 2, 5)) == {
      "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
      "prompt_tokens_details": {"cached_tokens": 8}, "prompt_cache_hit_tokens": 8,
      "prompt_cache_miss_tokens": 2}


def _stream(text: str, stop, final: str):
  """Feeds text's bytes one token at a time, as the engine reports them, then finishes."""
  tok = ByteTokenizer()
  ids = list(text.encode())
  stream = TextStream(tok, stop)
  deltas = [d for d in (stream.push(t, -1.0) for t in ids) if d is not None]
  kept = next(k for k in range(len(ids), -1, -1) if final.startswith(tok.decode(ids[:k])))
  deltas.append(stream.finish(Choice(0, final, ids[:kept], [-1.0] * kept, "stop")))
  return deltas


def test_a_stream_never_sends_a_stop_string_or_half_a_character():
  deltas = _stream("añb END tail", ["END"], "añb ")
  assert "".join(d["text"] for d in deltas) == "añb "
  assert all("\ufffd" not in d["text"] for d in deltas)  # ñ is two bytes: sent whole
  assert sum(len(d["token_ids"]) for d in deltas) == len("añb ".encode())
  offsets = [o for d in deltas for o in d["logprobs"]["text_offset"]]
  assert offsets == [0, 1, 1, 2, 3]  # ñ's two bytes both start at its character


# ---------------------------------------------------------------------------- chat

# A template in DeepSeek-V3's format (written for this test): system prompt after BOS, then
# <｜User｜> and <｜Assistant｜> turns, answers closed by EOS, the generation prompt last.
V3_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ m['content'] }}{% endif %}{% endfor %}\n"
            "{% for m in messages %}\n"
            "  {% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
            "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
            "{% elif m['role'] == 'system' %}{% else %}{{ raise_exception('bad role') }}"
            "{% endif %}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]


def _checkpoint(tmp_path, template, **extra):
  config = {"bos_token": {"content": "<｜begin▁of▁sentence｜>"},
            "eos_token": "<｜end▁of▁sentence｜>", "chat_template": template, **extra}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  return str(tmp_path)


def test_a_checkpoints_jinja_template_renders_without_its_bos(tmp_path):
  pytest.importorskip("jinja2", reason="the serve extra (jinja2) is not installed")
  template = chat.load("", _checkpoint(tmp_path, V3_STYLE))
  assert template.render(MESSAGES) == ("Be terse.<｜User｜>Hi<｜Assistant｜>Hello"
                                       "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>")
  assert not template.thinks
  with pytest.raises(BadRequest, match="bad role"):
    template.render([{"role": "tool", "content": "x"}])
  named = chat.load("", _checkpoint(tmp_path, [{"name": "tool_use", "template": "x"},
                                               {"name": "default", "template": V3_STYLE}]))
  assert named.render(MESSAGES) == template.render(MESSAGES)
  with pytest.raises(ValueError, match="tokenizer_config.json.*not valid Jinja"):
    chat.load("", _checkpoint(tmp_path, "{% if %}"))
  assert chat.load("", str(tmp_path / "nowhere")) is chat.PLAIN
  assert chat.load("r1_zero", _checkpoint(tmp_path, V3_STYLE)) is chat.R1_ZERO
  with pytest.raises(ValueError, match="serve.chat_template='chatml'"):
    chat.load("chatml")


def test_an_r1_style_template_that_opens_thinking_splits_from_the_start(tmp_path):
  pytest.importorskip("jinja2", reason="the serve extra (jinja2) is not installed")
  template = chat.load("", _checkpoint(tmp_path, V3_STYLE.replace(
      "{{ '<｜Assistant｜>' }}{% endif %}", "{{ '<｜Assistant｜><think>\\n' }}{% endif %}")))
  prompt = template.render(MESSAGES)
  assert template.thinks and chat.opens_thinking(prompt, template)
  assert chat.split("2 and 2\n</think>\n\n4", template, opened=True) == ("2 and 2\n", "4")


def test_the_r1_zero_template_is_the_training_prompt():
  assert chat.R1_ZERO_PROMPT is tasks.PROMPT
  assert chat.R1_ZERO.render([{"role": "user", "content": "1+2?"}]) == \
      tasks.prompt(dataclasses.replace(_PROBLEM, question="1+2?"))


@pytest.mark.parametrize("text, expected", [
    ("<think>a b</think> <answer>7</answer>", ("a b", "7")),
    ("  <think>a</think>\n<answer>7</answer>\n", ("a", "7")),
    ("<think>a</think> <answer>7</answer> more", ("a", "7 more")),
    ("<think>a</think> 7", ("a", "7")),
    ("<think>still thinking", ("still thinking", "")),
    ("no tags at all", (None, "no tags at all")),
    ("<think>a</think> <answer>7", ("a", "7"))])
def test_r1_zero_responses_split_into_reasoning_and_content(text, expected):
  assert chat.split(text, chat.R1_ZERO) == expected


@pytest.mark.parametrize("text", [
    "<think>a b</think> <answer>7</answer>\n", "  <think> x </think>  <answer> 7 </answer> y",
    "plain <think> text", "<think>a</think>b", "<thinking>", "<think>a</think> <answerx",
    "<think>x</think> <ans", "<think>1 < 2 </thin</think> <answer><</answer>"])
def test_streamed_reasoning_and_content_only_grow(text):
  final = chat.split(text, chat.R1_ZERO)
  for end in range(len(text) + 1):
    reasoning, content = chat.split(text[:end], chat.R1_ZERO, final=False)
    assert (final[0] or "").startswith(reasoning or "") and final[1].startswith(content), end


def test_parse_chat_takes_openai_fields_and_refuses_what_it_cannot_honour():
  parsed = parse_chat({"messages": [{"role": "developer", "content": "s"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]},
                                    {"role": "assistant", "content": None,
                                     "reasoning_content": "r"}],
                       "max_completion_tokens": 5, "logprobs": True, "stop": "\n"})
  assert parsed.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
                             {"role": "assistant", "content": ""}]
  assert parsed.max_tokens == 5 and parsed.options.logprobs and parsed.sampling["stop"] == ("\n",)
  assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).max_tokens is None
  top = parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                    "top_logprobs": 3})
  assert top.sampling["top_logprobs"] == 3  # carried to Request: the engine fills k per token
  for body, param in (({"messages": []}, "messages"),
                      ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                      ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
                       "messages[0].tool_calls"),
                      ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                       "top_logprobs"),
                      ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                        "max_completion_tokens": 4}, "max_completion_tokens"),
                      ({"messages": [{"role": "user", "content": "x"}],
                        "response_format": {"type": "json_object"}}, "response_format"),
                      ({"prompt": "x"}, "prompt")):
    with pytest.raises(FieldError) as error:
      parse_chat(body)
    assert error.value.param == param


def test_usage_carries_the_cost_and_the_thinking_share():
  usage = usage_json(Usage(10, 8, 2, 5), Prices(hit=1.0, miss=2.0, output=4.0), 3)
  assert usage["cost"] == pytest.approx((8 * 1.0 + 2 * 2.0 + 5 * 4.0) / 1e6)
  assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
  tok = ByteTokenizer()
  ids = list("<think>ab</think> <answer>1</answer>".encode())
  assert chat.reasoning_tokens(tok, ids, chat.R1_ZERO, False) == len("<think>ab</think>")
  assert chat.reasoning_tokens(tok, list(b"12"), chat.R1_ZERO, False) == 0


def test_serve_config_checks_the_chat_template_and_the_body_limit():
  assert ServeConfig(chat_template="r1_zero", max_body_mb=0.5).max_body_mb == 0.5
  with pytest.raises(ConfigError, match="chat_template='chatml'"):
    ServeConfig(chat_template="chatml")
  with pytest.raises(ConfigError, match="max_body_mb=0"):
    ServeConfig(max_body_mb=0)
