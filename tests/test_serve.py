"""scripts/serve.py's server, live on a free 127.0.0.1 port: the official OpenAI client,
the wire format, continuous batching, bad input over HTTP, and the chat page in Chromium.

One server (in this process, uvicorn on a thread) serves the shared trained run for the
whole file; a second app on the same scheduler wants an API key.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip('openai')
uvicorn = pytest.importorskip('uvicorn')

from lm.eval import quantize, sampling  # noqa: E402
from lm.serve import api, server  # noqa: E402
from lm.serve.engine import Knobs, buckets, pick  # noqa: E402
from lm.serve.text import TextStream  # noqa: E402

PROMPTS = ['def ', 'import os\n', 'class Foo(object):\n    ', '# Copyright', 'for i in range(',
           'return self.', 'x = [', 'if __name__ == "__main__":\n']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Live:
  """uvicorn serving `app` on a thread; stopped at the end of the module."""

  def __init__(self, app) -> None:
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port,
                                                log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    for _ in range(200):
      if self.server.started:
        return
      time.sleep(0.05)
    raise RuntimeError('the server did not start')

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=10)


@pytest.fixture(scope='module')
def served(trained_run):
  # 4 slots, so 16 requests queue; a 1 KiB body limit, so the 413 cases stay small.
  cfg = server.ServeConfig(slots=4, max_body_bytes=1024)
  s, info = server.load(str(trained_run), None, quantize.NONE, cfg)
  s.info = info
  yield s
  s.close()


@pytest.fixture(scope='module')
def live(served):
  srv = Live(api.create_app(served))
  yield srv
  srv.stop()


@pytest.fixture(scope='module')
def client(live, served):
  return openai.OpenAI(base_url=f'{live.url}/v1', api_key='unused', max_retries=0, timeout=60)


@pytest.fixture(scope='module')
def run(trained_run):
  return quantize.load_quantized_run(str(trained_run))


def reference(run, prompt: str, n: int) -> str:
  """scripts/generate.py's greedy text (its own function, sampling.complete)."""
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=0)
  return sampling.complete(run, prompt, cfg)['text']


def test_completions_and_chat_with_the_openai_client(client, served, run):
  models = client.models.list()
  assert [m.id for m in models.data] == [served.name]
  for prompt in PROMPTS[:3]:
    out = client.completions.create(model=served.name, prompt=prompt, max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == reference(run, prompt, 12)
    assert out.usage.completion_tokens <= 12
    assert out.usage.prompt_tokens == 1 + len(run.tokenizer.encode(prompt))
  chat = client.chat.completions.create(
      model=served.name, messages=[{'role': 'user', 'content': 'def main'}], max_tokens=8,
      temperature=0)
  # The template adds BOS and nothing else, so a one-message chat is that completion.
  assert chat.choices[0].message.content == reference(run, 'def main', 8)
  assert chat.choices[0].message.role == 'assistant'
  assert chat.choices[0].finish_reason in ('stop', 'length')


def test_logprobs_are_the_models_and_concatenate_to_the_text(client, served, run):
  out = client.completions.create(model=served.name, prompt='def ', max_tokens=10,
                                  temperature=0, logprobs=3)
  lp = out.choices[0].logprobs
  assert ''.join(lp.tokens) == out.choices[0].text
  assert all(len(top) <= 3 for top in lp.top_logprobs)
  # Greedy: each chosen token is the most likely one, and its logprob is the model's.
  ids = [run.tokenizer.bos_id] + run.tokenizer.encode('def ')
  model = sampling.sampling_model(run.cfgs.model, run.rules)
  gen = sampling.complete(run, 'def ', sampling.SamplingConfig(max_new_tokens=10, temperature=0))
  logits = model.apply({'params': run.params}, jnp.asarray([ids + gen['ids'][:-1]]))[0]
  want = jax.nn.log_softmax(logits.astype(jnp.float32))[len(ids) - 1:]
  want = [float(want[i, t]) for i, t in enumerate(gen['ids'])]
  np.testing.assert_allclose(lp.token_logprobs, want[:len(lp.token_logprobs)], atol=1e-4)
  for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
    assert max(top.values()) == pytest.approx(chosen, abs=1e-6)
  chat = client.chat.completions.create(
      model=served.name, messages=[{'role': 'user', 'content': 'import '}], max_tokens=10,
      temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].logprobs.content
  assert ''.join(c.token for c in content) == chat.choices[0].message.content
  assert all(len(c.top_logprobs) == 2 and bytes(c.bytes).decode() == c.token for c in content)


def test_stream_matches_the_whole_answer(client, served):
  kw = dict(model=served.name, messages=[{'role': 'user', 'content': 'class A:\n'}],
            max_tokens=14, temperature=0, logprobs=True)
  whole = client.chat.completions.create(**kw)
  chunks = list(client.chat.completions.create(stream=True,
                                               stream_options={'include_usage': True}, **kw))
  assert chunks[0].choices[0].delta.role == 'assistant'
  with_choice = [c for c in chunks if c.choices]
  finishes = [c.choices[0].finish_reason for c in with_choice if c.choices[0].finish_reason]
  assert finishes == [whole.choices[0].finish_reason]
  assert with_choice[-1].choices[0].finish_reason  # The finish is in the last choice chunk.
  assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
  assert all(c.usage is None for c in chunks[:-1])
  text = ''.join(c.choices[0].delta.content or '' for c in with_choice)
  assert text == whole.choices[0].message.content
  tokens = [t.token for c in with_choice if c.choices[0].logprobs
            for t in c.choices[0].logprobs.content]
  assert ''.join(tokens) == text
  plain = client.completions.create(model=served.name, prompt='x = ', max_tokens=9,
                                    temperature=0)
  streamed = list(client.completions.create(model=served.name, prompt='x = ', max_tokens=9,
                                            temperature=0, stream=True))
  assert ''.join(c.choices[0].text for c in streamed) == plain.choices[0].text
  assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == [
      plain.choices[0].finish_reason]


def test_stop_strings_and_finish_reasons(client, served, run):
  free = reference(run, 'def ', 20)
  assert len(free) > 6
  stop = free[3:6]
  cut = free[:free.index(stop)]
  for stream in (False, True):
    out = client.completions.create(model=served.name, prompt='def ', max_tokens=20,
                                    temperature=0, stop=[stop, 'never seen'], stream=stream)
    if stream:
      chunks = list(out)
      text = ''.join(c.choices[0].text for c in chunks)
      finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
      text, finish = out.choices[0].text, [out.choices[0].finish_reason]
    assert text == cut and finish == ['stop']
  out = client.completions.create(model=served.name, prompt='def ', max_tokens=3, temperature=0)
  assert out.choices[0].finish_reason == 'length' and out.usage.completion_tokens == 3


@pytest.mark.slow
def test_sixteen_concurrent_requests_match_one_at_a_time(client, served):
  # 16 requests on 4 slots: they queue, share the batch in every mix, and leave early.
  jobs = [(PROMPTS[i % len(PROMPTS)], 4 + 3 * (i % 5)) for i in range(16)]

  def one(job):
    prompt, n = job
    return client.completions.create(model=served.name, prompt=prompt, max_tokens=n,
                                     temperature=0).choices[0].text

  alone = [one(j) for j in jobs]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(one, jobs))
  assert together == alone


def test_seeded_sampling_is_reproducible(client, served):
  kw = dict(model=served.name, prompt='import ', max_tokens=12, temperature=1.0, top_p=0.9)
  a = client.completions.create(seed=7, **kw).choices[0].text
  b = client.completions.create(seed=7, **kw).choices[0].text
  others = {client.completions.create(seed=s, **kw).choices[0].text for s in range(8, 14)}
  assert a == b and len(others | {a}) > 1


def test_nothing_compiles_after_warm_up(client, served):
  before = served.compiles.since(), served.scheduler.engine.compiled()
  for i in range(20):
    prompt = ' '.join(['word'] * (1 + i // 2))  # 4 to ~31 tokens: the buckets 16 and 32
    client.completions.create(model=served.name, prompt=prompt, max_tokens=1 + i % 7,
                              temperature=0.5 * (i % 3), seed=i,
                              extra_body={'top_k': i % 4})
  assert (served.compiles.since(), served.scheduler.engine.compiled()) == before
  # One program per bucket and the step, and on a mesh maybe a variant of each for the
  # fresh cache's layout.
  assert len(buckets(served.limits.context)) + 1 <= before[1] <= 2 * (len(buckets(64)) + 1)


def post(live, path, body=None, raw=None, headers=None):
  return httpx.post(live.url + path, content=raw if raw is not None else json.dumps(body),
                    headers={'Content-Type': 'application/json', **(headers or {})}, timeout=30)


@pytest.mark.parametrize('body,status,param', [
    ({'model': 'nope', 'prompt': 'x'}, 404, 'model'),
    ({'prompt': 'x'}, 400, 'model'),
    ({'MODEL': 'x', 'prompt': 'x'}, 400, 'MODEL'),
    ({'prompt': 'word ' * 100}, 400, 'prompt'),  # Over the 64-token context.
    ({'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens'),
    ({'prompt': 'x', 'max_tokens': -3}, 400, 'max_tokens'),
    ({'prompt': 'x', 'max_tokens': 10 ** 9}, 400, 'max_tokens'),
    ({'prompt': 'x', 'temperature': -0.5}, 400, 'temperature'),
    ({'prompt': 'x', 'top_p': 0}, 400, 'top_p'),
    ({'prompt': 'x', 'logprobs': 21}, 400, 'logprobs'),
    ({'prompt': 'x', 'n': 2}, 400, 'n'),
    ({'prompt': 'x', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'stop'),
    ({'prompt': 7}, 400, 'prompt'),
])
def test_bad_completion_requests(live, served, body, status, param):
  if 'prompt' in body and 'model' not in body and param != 'model':
    body = {'model': served.name, **body}
  r = post(live, '/v1/completions', body)
  assert r.status_code == status, r.text
  err = r.json()['error']
  assert err['param'] == param and err['message']


def test_bad_chat_requests_and_the_server_still_serves(live, served, client):
  name = served.name
  cases = [
      (b'{"model": ', 400, None),
      (b'[1, 2]', 400, None),
      (json.dumps({'model': name, 'messages': []}).encode(), 400, 'messages'),
      (json.dumps({'model': name, 'messages': [{'role': 'robot', 'content': 'x'}]}).encode(),
       400, 'messages[0].role'),
      (json.dumps({'model': name, 'messages': [{'role': 'user', 'content': 'x'}],
                   'top_logprobs': 2}).encode(), 400, 'top_logprobs'),
      (json.dumps({'model': name, 'messages': [{'role': 'user', 'content': 'x' * 2000}]}
                  ).encode(), 413, None),
  ]
  for raw, status, param in cases:
    r = post(live, '/v1/chat/completions', raw=raw)
    assert r.status_code == status, (raw[:60], r.text)
    assert r.json()['error']['param'] == param
  # Chunked, with no length declared: still cut at the limit.
  r = httpx.post(live.url + '/v1/completions', timeout=30,
                 content=iter([b'{"model": "', b'x' * 700, b'", "prompt": "', b'y' * 700, b'"}']))
  assert r.status_code == 413
  assert httpx.get(live.url + '/health').json()['status'] == 'ok'
  assert client.completions.create(model=name, prompt='def ', max_tokens=2).usage


def test_api_key(served):
  keyed = Live(api.create_app(dataclasses.replace(served, api_key='s3cret')))
  try:
    ok = openai.OpenAI(base_url=f'{keyed.url}/v1', api_key='s3cret', max_retries=0)
    assert ok.completions.create(model=served.name, prompt='def ', max_tokens=2).choices
    wrong = openai.OpenAI(base_url=f'{keyed.url}/v1', api_key='guess', max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      wrong.models.list()
    assert httpx.get(keyed.url + '/v1/models').status_code == 401
    assert httpx.post(keyed.url + '/v1/inspect', json={'prompt': 'x'}).status_code == 401
    assert httpx.get(keyed.url + '/health').status_code == 200  # Open: for load balancers.
  finally:
    keyed.stop()


def test_a_client_that_goes_away_frees_its_slot(live, served, monkeypatch):
  engine = served.scheduler.engine
  step = engine.step
  # Slow steps, so that the generation would outlast the client by far.
  monkeypatch.setattr(engine, 'step', lambda *a: (time.sleep(0.05), step(*a))[1])
  seen = []
  submit = served.scheduler.submit
  monkeypatch.setattr(served.scheduler, 'submit', lambda r: (seen.append(r), submit(r))[1])
  body = {'model': served.name, 'prompt': 'def ', 'max_tokens': 50, 'stream': True}
  with httpx.stream('POST', live.url + '/v1/completions', json=body, timeout=30) as r:
    for line in r.iter_lines():
      if line.startswith('data: {') and json.loads(line[6:])['choices'][0]['text']:
        break
  for _ in range(100):
    if served.scheduler.load()['busy'] == 0:
      break
    time.sleep(0.05)
  assert served.scheduler.load()['busy'] == 0
  assert seen[0].cancelled and seen[0].generated < 25


def test_too_many_waiting_is_429(served, monkeypatch):
  monkeypatch.setattr(served.scheduler, 'max_waiting', 0)
  keyed = Live(api.create_app(served))
  try:
    c = openai.OpenAI(base_url=f'{keyed.url}/v1', api_key='x', max_retries=0)
    with pytest.raises(openai.RateLimitError, match='retry later'):
      c.completions.create(model=served.name, prompt='def ', max_tokens=2)
  finally:
    keyed.stop()


def test_inspect_lens_and_attention(live, served, run):
  r = post(live, '/v1/inspect', {'prompt': 'def foo(self):', 'layer': 1, 'head': 2})
  assert r.status_code == 200, r.text
  out = r.json()
  ids, t = out['ids'], len(out['ids'])
  weights = np.asarray(out['attention'])
  assert weights.shape == (t, t)
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-3)
  assert np.all(np.triu(weights, 1) == 0)  # Causal.
  # The lens at the last layer is the model's own prediction.
  logits = run.model.apply({'params': run.params}, jnp.asarray([ids]))[0]
  assert [row[0]['token'] for row in out['lens'][-1]] == [
      run.tokenizer.piece_text(int(i)) for i in jnp.argmax(logits, -1)]
  for body, param in [({'prompt': 'x', 'layer': 9}, 'layer'), ({'prompt': ''}, 'prompt'),
                      ({'prompt': 'x', 'head': -1}, 'head')]:
    assert post(live, '/v1/inspect', body).json()['error']['param'] == param


def test_recomputed_attention_reproduces_the_layer(run):
  """The inspector's weights, times the values and the output projection, give the
  attention output the model itself computes."""
  from lm.model.transformer import Attention
  from lm.serve.inspect import attention_weights

  c = run.cfgs.model
  ids = jnp.asarray([[1, 5, 9, 33, 7, 2, 11]])
  _, got = run.model.apply({'params': run.params}, ids, capture_intermediates=lambda m, _: (
      isinstance(m, Attention) or m.name == 'attn_norm'), mutable=['intermediates'])
  layer = got['intermediates']['block_1']
  h = layer['attn_norm']['__call__'][0][0]
  want = layer['attn']['__call__'][0][0]
  p = run.params['block_1']['attn']
  g = c.num_heads // c.num_kv_heads
  out = 0
  for head in range(c.num_heads):
    w = attention_weights(c, run.params['block_1'], h, head)
    v = h @ p['v'][:, head // g]
    out = out + (w @ v) @ p['o'][head]
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_pick_filters_per_row():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4))
  knobs = Knobs(temperature=jnp.asarray([0.0, 1.0, 1.0, 1.0]),
                top_p=jnp.asarray([1.0, 1.0, 0.6, 1.0]),
                top_k=jnp.asarray([0, 1, 0, 2], jnp.int32), seed=jnp.zeros(4, jnp.int32),
                count=jnp.zeros(4, jnp.int32))
  seen = [set() for _ in range(4)]
  for s in range(60):
    got = pick(logits, knobs._replace(seed=jnp.full(4, s, jnp.int32)), 0)
    for row, t in enumerate(np.asarray(got.token)):
      seen[row].add(int(t))
  # Greedy; top-k 1; top-p 0.6 keeps 0.5 + 0.3; top-k 2.
  assert seen == [{0}, {0}, {0, 1}, {0, 1}]
  # The reported logprob is the model's, before temperature or filtering.
  np.testing.assert_allclose(got.logprob, logits[jnp.arange(4), got.token], atol=1e-6)


def test_text_stream_holds_stop_prefixes_and_unfinished_characters(tok):
  ids = tok.encode('héllo wörld, and more')
  text = tok.decode(ids)
  for stop in ['wör', 'd, a', 'zz', 'more']:
    stream = TextStream(tok.decode, [stop])
    pieces = [p for i in ids for p in stream.add(i, i)] + stream.flush()
    want = text[:text.index(stop)] if stop in text else text
    assert stream.text == want == ''.join(p.text for p in pieces)
  # 'ö' as its two byte tokens: nothing comes out until both are in.
  byte_ids = {tok.piece_text(i): i for i in range(tok.vocab_size)}
  stream = TextStream(tok.decode)
  assert stream.add(byte_ids['<0xC3>']) == []
  assert ''.join(p.text for p in stream.add(byte_ids['<0xB6>'])) == 'ö'
  stream = TextStream(tok.decode)
  stream.add(byte_ids['<0xC3>'])
  assert ''.join(p.text for p in stream.flush()) == '\ufffd'  # Cut short: shown as decoded.


@pytest.mark.slow
def test_the_script_refuses_bad_flags(trained_run, tmp_path):
  from tests.helpers import script

  bad = script('serve.py', f'--workdir={tmp_path / "missing"}', check=False)
  assert bad.returncode == 1 and bad.stderr.strip().startswith('error:')
  assert len(bad.stderr.strip().splitlines()) == 1
  bad = script('serve.py', f'--workdir={trained_run}', '--slots=0', check=False)
  assert bad.returncode == 1 and '--slots' in bad.stderr


@pytest.mark.slow
@pytest.mark.browser
def test_the_chat_page_in_chromium(live, served, tmp_path):
  chromium = shutil.which('chromium') or shutil.which('chromium-browser')
  driver_path = shutil.which('chromedriver')
  if not (chromium and driver_path):
    pytest.skip('needs Debian\'s chromium and chromium-driver (apt-get install chromium '
                'chromium-driver)')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1200,900',
              '--disable-dev-shm-usage'):
    opts.add_argument(arg)
  driver = webdriver.Chrome(service=Service(driver_path), options=opts)
  try:
    _drive(driver, live, served, tmp_path)
  except Exception:
    print(driver.page_source[:3000], driver.get_log('browser'))
    raise
  finally:
    driver.quit()


def _drive(driver, live, served, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  driver.get(live.url + '/')
  wait = WebDriverWait(driver, 60)
  wait.until(lambda d: d.find_element(By.ID, 'model').text == served.name)
  driver.find_element(By.ID, 'text').send_keys('def main():')
  driver.find_element(By.CSS_SELECTOR, '#send button').click()
  wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.assistant[data-finish], .error'))
  assert not driver.find_elements(By.CSS_SELECTOR, '.error')
  tokens = driver.find_elements(By.CSS_SELECTOR, '.assistant .tok')
  assert tokens and all(t.value_of_css_property('background-color') for t in tokens)
  shades = {t.value_of_css_property('background-color') for t in tokens}
  assert len(shades) > 1  # Coloured by probability, not one flat colour.
  driver.save_screenshot(str(tmp_path / 'chat.png'))
  driver.find_element(By.ID, 'show-inspect').click()
  driver.find_element(By.ID, 'look-text').send_keys('import os')
  driver.find_element(By.CSS_SELECTOR, '#look button').click()
  wait.until(lambda d: d.find_element(By.ID, 'heat').get_attribute('data-drawn'))
  rows = driver.find_elements(By.CSS_SELECTOR, 'table.lens tr')
  assert len(rows) == 1 + served.scheduler.engine.model.cfg.num_layers
  driver.save_screenshot(str(tmp_path / 'inspect.png'))
  assert os.path.getsize(tmp_path / 'inspect.png') > 0


def test_the_compile_counter_counts_until_closed():
  counter = server.CompileCounter()
  counter.settle()
  jax.jit(lambda x: x * 3 + 1)(jnp.ones(3))
  seen = counter.since()
  assert seen >= 1
  counter.close()  # Process-wide otherwise: later compiles would be logged as the server's.
  jax.jit(lambda x: x * 5 - 1)(jnp.ones(3))
  assert counter.since() == seen


def test_bench_serve_counts_what_the_server_generated(live, served, client):
  from tests.helpers import script

  proc = script('bench_serve.py', f'--url={live.url}', f'--model={served.name}',
                '--streams=1,3', '--requests=5', '--max_tokens=6', '--label=ours')
  lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  # The same greedy requests, one by one: what each level must have counted.
  prompts = PROMPTS[:5]  # bench_serve.py's prompts, in its order.
  expected = sum(client.completions.create(model=served.name, prompt=p, max_tokens=6,
                                           temperature=0).usage.completion_tokens
                 for p in prompts)
  assert [(d['server'], d['streams'], d['requests']) for d in lines] == [
      ('ours', 1, 5), ('ours', 3, 5)]
  for d in lines:
    assert d['generated_tokens'] == expected
    assert d['tokens_per_sec'] == pytest.approx(expected / d['seconds'], rel=0.01)
    assert 0 < d['ttft_median_s'] <= d['ttft_p90_s'] <= d['seconds']
