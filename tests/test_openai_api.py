"""The OpenAI request and response format shared by the batch and HTTP front doors (no model)."""
import pytest

from moe_jax.serve import ByteTokenizer, Choice, Usage
from moe_jax.serve.openai_api import FieldError, TextStream, error_json, parse, usage_json


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
