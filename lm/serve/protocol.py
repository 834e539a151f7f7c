"""The OpenAI wire format: request bodies checked field by field, responses built.

Every bad field is an ApiError naming it (`param`), answered as OpenAI answers errors:
{"error": {"message", "type", "param", "code"}} with a 4xx status. Fields this server
does not implement (n > 1, echo, penalties, logit_bias) are refused by name rather than
ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from lm.serve.engine import TOP_LOGPROBS
from lm.serve.scheduler import Sampling

MAX_STOP = 4  # Stop strings per request, as OpenAI allows.
SEED_RANGE = 2 ** 31  # Seeds are folded into int32.


class ApiError(Exception):
  """An HTTP error in OpenAI's shape."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = 'invalid_request_error') -> None:
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = (
        status, message, param, code, kind)

  def body(self) -> dict[str, Any]:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': self.code}}


def bad(param: str, why: str) -> ApiError:
  return ApiError(400, f'{param}: {why}', param)


def parse_json(raw: bytes) -> dict[str, Any]:
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f'the request body is not valid JSON: {e}') from None
  if not isinstance(body, dict):
    raise ApiError(400, f'the request body must be a JSON object, got {type(body).__name__}')
  return body


_COMMON = {'model', 'max_tokens', 'temperature', 'top_p', 'top_k', 'stop', 'seed', 'stream',
           'stream_options', 'n', 'presence_penalty', 'frequency_penalty', 'logit_bias', 'user'}
COMPLETION_FIELDS = _COMMON | {'prompt', 'logprobs', 'echo', 'suffix', 'best_of'}
CHAT_FIELDS = _COMMON | {'messages', 'logprobs', 'top_logprobs', 'max_completion_tokens'}
ROLES = {'system': 'system', 'developer': 'system', 'user': 'user', 'assistant': 'assistant'}


@dataclasses.dataclass(frozen=True)
class Ask:
  """A checked request: what to generate and how to answer."""

  model: str
  sampling_fields: dict[str, Any]  # Sampling's fields but max_tokens (set with the prompt).
  max_tokens: int | None  # None: the default below.
  default_max_tokens: int | None  # None: as many as the context leaves.
  stream: bool
  include_usage: bool
  prompt: str | None = None  # /v1/completions
  messages: tuple[dict[str, str], ...] = ()  # /v1/chat/completions


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
  v = body.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise bad(key, f'must be a number, got {json.dumps(v)}')
  if v < lo or (lo_open and v == lo) or v > hi:
    raise bad(key, f'must be in {"(" if lo_open else "["}{lo}, {hi}], got {v}')
  return float(v)


def _integer(body: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
  v = body.get(key)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int):
    raise bad(key, f'must be an integer, got {json.dumps(v)}')
  if v < lo or (hi is not None and v > hi):
    raise bad(key, f'must be at least {lo}' + (f' and at most {hi}' if hi is not None else '')
              + f', got {v}')
  return v


def _refuse_unsupported(body: Mapping[str, Any], allowed: set[str]) -> None:
  for key in body:
    if key not in allowed:
      raise bad(key, 'unknown field')
  if body.get('n') not in (None, 1):
    raise bad('n', 'only n=1 is supported')
  for key in ('presence_penalty', 'frequency_penalty'):
    if body.get(key) not in (None, 0, 0.0):
      raise bad(key, 'penalties are not supported; leave it 0')
  if body.get('logit_bias'):
    raise bad('logit_bias', 'not supported')
  if body.get('echo'):
    raise bad('echo', 'not supported')
  if body.get('suffix') is not None:
    raise bad('suffix', 'not supported')
  if body.get('best_of') not in (None, 1):
    raise bad('best_of', 'only best_of=1 is supported')


def _common(body: Mapping[str, Any], served: str) -> dict[str, Any]:
  model = body.get('model')
  if not isinstance(model, str) or not model:
    raise bad('model', 'required: the name GET /v1/models lists')
  if model != served:
    raise ApiError(404, f'model {model!r} does not exist; this server serves {served!r}',
                   'model', 'model_not_found')
  stop = body.get('stop')
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise bad('stop', 'must be a string or a list of strings')
  if len(stop) > MAX_STOP:
    raise bad('stop', f'at most {MAX_STOP} stop strings, got {len(stop)}')
  stream = body.get('stream', False)
  if stream is None:
    stream = False
  if not isinstance(stream, bool):
    raise bad('stream', 'must be true or false')
  options = body.get('stream_options') or {}
  if not isinstance(options, dict) or set(options) - {'include_usage'}:
    raise bad('stream_options', 'only {"include_usage": bool} is supported')
  if options and not stream:
    raise bad('stream_options', 'only allowed with "stream": true')
  seed = _integer(body, 'seed', -2 ** 63, 2 ** 63 - 1)
  top_k = _integer(body, 'top_k', -1)
  return {
      'model': model, 'stream': stream, 'include_usage': bool(options.get('include_usage')),
      'sampling_fields': {
          'temperature': _number(body, 'temperature', 1.0, 0.0, 2.0),
          'top_p': _number(body, 'top_p', 1.0, 0.0, 1.0, lo_open=True),
          'top_k': max(top_k or 0, 0),  # -1 means all, as vLLM takes it.
          'seed': None if seed is None else seed % SEED_RANGE,
          'stop': tuple(stop)}}


def completion_ask(body: Mapping[str, Any], served: str) -> Ask:
  _refuse_unsupported(body, COMPLETION_FIELDS)
  c = _common(body, served)
  prompt = body.get('prompt')
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
    prompt = prompt[0]
  if not isinstance(prompt, str):
    raise bad('prompt', 'required: a string (or a list of one string)')
  logprobs = _integer(body, 'logprobs', 0, TOP_LOGPROBS)
  c['sampling_fields']['logprobs'] = logprobs
  # OpenAI's default for completions is 16 new tokens.
  return Ask(max_tokens=_integer(body, 'max_tokens', 1), default_max_tokens=16,
             prompt=prompt, **c)


def chat_ask(body: Mapping[str, Any], served: str) -> Ask:
  _refuse_unsupported(body, CHAT_FIELDS)
  c = _common(body, served)
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise bad('messages', 'required: a non-empty list of {"role", "content"}')
  out = []
  for i, m in enumerate(messages):
    where = f'messages[{i}]'
    if not isinstance(m, dict) or m.get('role') not in ROLES:
      raise bad(f'{where}.role', f'must be one of {", ".join(ROLES)}')
    out.append({'role': ROLES[m['role']], 'content': _content(m.get('content'), where)})
  logprobs = body.get('logprobs')
  if logprobs is not None and not isinstance(logprobs, bool):
    raise bad('logprobs', 'must be true or false')
  top = _integer(body, 'top_logprobs', 0, TOP_LOGPROBS)
  if top is not None and not logprobs:
    raise bad('top_logprobs', 'needs "logprobs": true')
  c['sampling_fields']['logprobs'] = (top or 0) if logprobs else None
  if body.get('max_tokens') is not None and body.get('max_completion_tokens') is not None:
    raise bad('max_completion_tokens', 'give max_tokens or max_completion_tokens, not both')
  key = 'max_tokens' if body.get('max_tokens') is not None else 'max_completion_tokens'
  return Ask(max_tokens=_integer(body, key, 1), default_max_tokens=None, messages=tuple(out),
             **c)


def _content(content: Any, where: str) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = []
    for j, part in enumerate(content):
      if not (isinstance(part, dict) and part.get('type') == 'text'
              and isinstance(part.get('text'), str)):
        raise bad(f'{where}.content[{j}]', 'only {"type": "text", "text": str} parts')
      parts.append(part['text'])
    return ''.join(parts)
  raise bad(f'{where}.content', 'must be a string or a list of text parts')


def sampling(ask: Ask, prompt_tokens: int, context: int, max_tokens_limit: int,
             default_seed: int) -> Sampling:
  """The request's Sampling once its prompt is tokenised: the prompt and the new tokens
  must fit the context (the error says so in OpenAI's words)."""
  if prompt_tokens >= context:
    raise ApiError(400, f'this model\'s maximum context length is {context} tokens; the '
                   f'prompt has {prompt_tokens}, leaving no room for a new token',
                   'messages' if ask.messages else 'prompt', 'context_length_exceeded')
  room = context - prompt_tokens
  param = 'max_tokens'
  n = ask.max_tokens
  if n is None:
    n = min(room, max_tokens_limit, ask.default_max_tokens or room)
  elif n > max_tokens_limit:
    raise bad(param, f'at most {max_tokens_limit} on this server, got {n}')
  elif n > room:
    raise ApiError(400, f'this model\'s maximum context length is {context} tokens; you '
                   f'asked for {prompt_tokens + n} ({prompt_tokens} in the prompt, {n} for '
                   'the completion)', param, 'context_length_exceeded')
  fields = dict(ask.sampling_fields)
  if fields['seed'] is None:
    fields['seed'] = default_seed
  return Sampling(max_tokens=n, **fields)
