"""Serves a trained run with OpenAI's API and a chat page:

  python scripts/serve.py --workdir=RUN [--host=127.0.0.1] [--port=8000]
      [--quantize=int8|int4] [--api_key=KEY] [--slots=8] [--max_tokens=N]

Endpoints (docs/serving.md): GET /health, GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (stream: true as server-sent events), POST /v1/inspect, GET / (the
chat page). The API key may also come from the LM_API_KEY environment variable; with one
set every route but /health and / needs `Authorization: Bearer KEY`. Once the model is
loaded and compiled it prints one JSON line ({"url", "model", "step", "context", "slots",
"programs", "seconds"}), then serves until interrupted.
"""

import json
import os

from absl import app, flags, logging

from lm.cli import define_quantize_flags, define_run_flags

_WORKDIR, _STEP = define_run_flags()
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 opens the '
                            'server to the network (set an API key first).')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_API_KEY = flags.DEFINE_string('api_key', None, 'Key every request but /health and / must '
                               'send as "Authorization: Bearer KEY"; default $LM_API_KEY.')
_SLOTS = flags.DEFINE_integer('slots', 8, 'Requests decoded together (the batch).')
_MAX_WAITING = flags.DEFINE_integer('max_waiting', 64, 'Requests queued for a slot before '
                                    'new ones are refused with 429.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 0, 'New tokens one request may ask for; '
                                   '0 = the context.')
_MAX_BODY = flags.DEFINE_integer('max_body_bytes', 1 << 20, 'Largest request body (413 above).')
_NAME = flags.DEFINE_string('model_name', '', 'Name in /v1/models; default the run folder\'s.')
_QUANTIZE = define_quantize_flags()


def main(argv):
  logging.set_verbosity(logging.ERROR)
  from lm import cli  # After flag parsing, so --help stays fast.

  cli.reject_extra_args(argv)
  import uvicorn

  from lm.eval import quantize
  from lm.serve import api, server

  cfg = server.ServeConfig(_SLOTS.value, _MAX_WAITING.value, _MAX_TOKENS.value, _MAX_BODY.value,
                           _API_KEY.value or os.environ.get('LM_API_KEY') or None, _NAME.value)
  served, info = cli.run_or_exit(lambda: server.load(
      _WORKDIR.value, _STEP.value, quantize.QuantConfig(*_QUANTIZE()), cfg))
  print(json.dumps({'url': f'http://{_HOST.value}:{_PORT.value}', **info}), flush=True)
  try:
    uvicorn.run(api.create_app(served), host=_HOST.value, port=_PORT.value, log_level='warning')
  finally:
    served.close()


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
