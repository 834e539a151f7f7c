"""The HTTP side: FastAPI routes in OpenAI's wire format over the scheduler.

GET /health (open to all), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (`stream: true` as server-sent events ending in `data: [DONE]`),
POST /v1/inspect, GET / (the chat page; static, it holds nothing). With an API key set,
every route but /health and / wants `Authorization: Bearer KEY` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from data import sft
from data.tokenizer import Tokenizer
from lm.serve import protocol, wire
from lm.serve.protocol import ApiError
from lm.serve.scheduler import Busy, Event, Request, Scheduler

OPEN_PATHS = ('/health', '/')


@dataclasses.dataclass
class Limits:
  """What one request may ask; the server's flags set them."""

  context: int  # Prompt plus new tokens (the model's trained length).
  max_tokens: int  # New tokens per request.
  max_body_bytes: int = 1 << 20


@dataclasses.dataclass
class Served:
  """Everything the routes read: the model's name, its tokenizer, the scheduler."""

  name: str
  tokenizer: Tokenizer
  scheduler: Scheduler
  limits: Limits
  api_key: str | None = None
  inspect: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  page: str | None = None  # The chat page's HTML.
  compiles: Any = None  # lm/serve/server.py's CompileCounter.
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def close(self) -> None:
    """Stops the decode loop and the compile counter."""
    self.scheduler.close()
    if self.compiles is not None:
      self.compiles.close()


def create_app(s: Served) -> FastAPI:
  app = FastAPI(title='lm serve', docs_url=None, redoc_url=None, openapi_url=None)

  @app.middleware('http')
  async def guard(request: HttpRequest, call_next):
    if s.api_key and request.url.path not in OPEN_PATHS:
      given = request.headers.get('authorization', '')
      if not hmac.compare_digest(given.encode(), f'Bearer {s.api_key}'.encode()):
        return _error(ApiError(401, 'a valid API key is required: Authorization: Bearer KEY',
                               code='invalid_api_key'))
    return await call_next(request)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return _error(e)

  @app.get('/health')
  async def health():
    load = s.scheduler.load()
    body = {'status': 'failed' if s.scheduler.failure else 'ok', **load,
            'programs': s.scheduler.engine.compiled(),
            'compiled_since_warm_up': s.compiles.since() if s.compiles else None}
    return JSONResponse(body, status_code=503 if s.scheduler.failure else 200)

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': s.name, 'object': 'model', 'created': s.created,
                                        'owned_by': 'lm', 'max_model_len': s.limits.context}]}

  @app.post('/v1/completions')
  async def completions(request: HttpRequest):
    ask = protocol.completion_ask(await _body(request, s.limits), s.name)
    ids = [s.tokenizer.bos_id] + s.tokenizer.encode(ask.prompt)
    return await _generate(s, request, ask, ids, chat=False)

  @app.post('/v1/chat/completions')
  async def chat(request: HttpRequest):
    ask = protocol.chat_ask(await _body(request, s.limits), s.name)
    t = s.tokenizer
    ids = sft.reply_prompt(ask.messages, t.encode_batch, t.bos_id, t.eos_id)
    return await _generate(s, request, ask, ids, chat=True)

  @app.post('/v1/inspect')
  async def inspect(request: HttpRequest):
    body = await _body(request, s.limits)
    if s.inspect is None:
      raise ApiError(404, 'inspection is not available on this server')
    return await asyncio.to_thread(s.inspect, body)

  if s.page is not None:
    @app.get('/')
    async def page():
      return HTMLResponse(s.page)

  return app


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


async def _read(request: HttpRequest, limit: int) -> bytes:
  """The body, refused (413) past `limit` bytes whether or not a length was declared."""
  declared = request.headers.get('content-length')
  if declared and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f'the request body is {declared} bytes; the limit is {limit}')
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f'the request body is over the limit of {limit} bytes')
    chunks.append(chunk)
  return b''.join(chunks)


async def _body(request: HttpRequest, limits: Limits) -> dict[str, Any]:
  return protocol.parse_json(await _read(request, limits.max_body_bytes))


async def _generate(s: Served, http: HttpRequest, ask: protocol.Ask, ids: list[int],
                    chat: bool) -> Response:
  sampling = protocol.sampling(ask, len(ids), s.limits.context, s.limits.max_tokens,
                               secrets.randbelow(protocol.SEED_RANGE))
  loop = asyncio.get_running_loop()
  events: asyncio.Queue[Event] = asyncio.Queue()
  req = Request(ids, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
  try:
    s.scheduler.submit(req)
  except Busy as e:
    raise ApiError(429, str(e), code='server_busy', kind='rate_limit_error') from None
  except RuntimeError as e:
    raise ApiError(503, str(e), code='engine_failed', kind='server_error') from None
  answer = wire.Answer(chat, s.name, f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}',
                       len(ids), sampling.logprobs, s.tokenizer.piece_text)
  if ask.stream:
    return StreamingResponse(_sse(s.scheduler, req, events, answer, ask.include_usage),
                             media_type='text/event-stream')
  watcher = asyncio.create_task(_cancel_on_disconnect(s.scheduler, http, req))
  try:
    while True:
      event = await events.get()
      if event.error:
        raise ApiError(503, event.error, code='engine_failed', kind='server_error')
      answer.add(event)
      if event.finish:
        return JSONResponse(answer.whole())
  finally:
    watcher.cancel()
    s.scheduler.cancel(req)  # A no-op once finished; frees the slot if we were cut off.


async def _cancel_on_disconnect(scheduler: Scheduler, http: HttpRequest, req: Request) -> None:
  while not await http.is_disconnected():
    await asyncio.sleep(0.2)
  scheduler.cancel(req)


async def _sse(scheduler: Scheduler, req: Request, events: asyncio.Queue[Event],
               answer: wire.Answer, include_usage: bool) -> AsyncIterator[str]:
  """Chunks as they come; the client going away cancels this generator, which frees the
  request's slot."""
  def line(obj: dict[str, Any]) -> str:
    return f'data: {json.dumps(obj)}\n\n'

  try:
    for chunk in answer.opening(include_usage):
      yield line(chunk)
    while True:
      event = await events.get()
      if event.error:
        yield line(ApiError(503, event.error, code='engine_failed', kind='server_error').body())
        break
      for chunk in answer.chunks(event, include_usage):
        yield line(chunk)
      if event.finish:
        break
    yield 'data: [DONE]\n\n'
  finally:
    scheduler.cancel(req)
