"""Throughput of a running OpenAI-compatible server at several numbers of streams:

  python scripts/bench_serve.py --url=http://127.0.0.1:8000 --model=NAME
      [--streams=1,4,16] [--requests=16] [--max_tokens=64] [--label=TEXT]

Each level sends --requests streaming completions (greedy, fixed prompts, `max_tokens`
new tokens, no stop) with that many in flight at once, and prints one JSON line: the
aggregate generated tokens per second (all tokens / wall time), the median and p90 time
to first token, and the per-stream decode rate. Any server of the OpenAI API answers
(this project's scripts/serve.py or llama.cpp's `python -m llama_cpp.server`), so both
are measured the same way.
"""

import concurrent.futures
import json
import logging
import statistics
import time

import httpx
from absl import app, flags

_URL = flags.DEFINE_string('url', 'http://127.0.0.1:8000', 'Server root.')
_MODEL = flags.DEFINE_string('model', None, 'Model name the server lists.')
_STREAMS = flags.DEFINE_list('streams', ['1', '4', '16'], 'Requests in flight at once.')
_REQUESTS = flags.DEFINE_integer('requests', 16, 'Requests per level.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'New tokens per request.')
_LABEL = flags.DEFINE_string('label', '', 'Names the server in the output lines.')

PROMPTS = ['def ', 'import os\n', 'class Foo(object):\n    ', '# Copyright', 'for i in range(',
           'return self.', 'x = [', 'if __name__ == "__main__":\n']


def one(client: httpx.Client, prompt: str) -> dict:
  body = {'model': _MODEL.value, 'prompt': prompt, 'max_tokens': _MAX_TOKENS.value,
          'temperature': 0, 'stream': True, 'stream_options': {'include_usage': True}}
  start = time.perf_counter()
  first, tokens, chunks = None, 0, 0
  with client.stream('POST', '/v1/completions', json=body) as r:
    r.raise_for_status()
    for line in r.iter_lines():
      if not line.startswith('data: ') or line == 'data: [DONE]':
        continue
      chunk = json.loads(line[6:])
      if chunk.get('usage'):
        tokens = chunk['usage']['completion_tokens']
      if chunk.get('choices') and chunk['choices'][0].get('text'):
        chunks += 1
        if first is None:
          first = time.perf_counter() - start
  # A server without stream_options (llama_cpp.server) sends no usage: count its text
  # chunks, one a token there.
  return {'ttft': first, 'seconds': time.perf_counter() - start, 'tokens': tokens or chunks}


def level(streams: int) -> dict:
  with httpx.Client(base_url=_URL.value, timeout=600) as client:
    one(client, PROMPTS[0])  # Warm: a server may compile or allocate on its first request.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(_REQUESTS.value)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
      done = list(pool.map(lambda p: one(client, p), prompts))
    wall = time.perf_counter() - start
  ttft = sorted(d['ttft'] for d in done if d['ttft'] is not None)
  tokens = sum(d['tokens'] for d in done)
  return {'server': _LABEL.value or _URL.value, 'streams': streams, 'requests': len(done),
          'max_tokens': _MAX_TOKENS.value, 'generated_tokens': tokens,
          'seconds': round(wall, 3), 'tokens_per_sec': round(tokens / wall, 1),
          'ttft_median_s': round(statistics.median(ttft), 4),
          'ttft_p90_s': round(ttft[int(0.9 * (len(ttft) - 1))], 4),
          'per_stream_tokens_per_sec': round(statistics.median(
              d['tokens'] / d['seconds'] for d in done), 1)}


def main(argv):
  del argv
  logging.getLogger('httpx').setLevel(logging.WARNING)  # Not a line per request.
  for s in _STREAMS.value:
    print(json.dumps(level(int(s))), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['model'])
  app.run(main)
