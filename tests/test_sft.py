"""Tests of fine-tuning data (data/sft.py, packing.RowPacker) and the loss on responses."""

import json

import numpy as np
import pytest

from data import packing, sft
from data.batch import Batch
from data.config import DataConfig
from data.pipeline import TrainBatches, examples_summary
from data.sources import DataError
from tests import data_helpers as h

BOS, EOS = 1, 2


def chars(strings):
  """A tokenizer with one id per character (ord + 10), so boundaries are exact."""
  return [[ord(c) + 10 for c in s] for s in strings]


def ids(text):
  return chars([text])[0]


# Records.


def test_the_three_record_forms_become_messages():
  assert sft.to_messages({'prompt': 'p', 'response': 'r'}, 'f:1') == [
      {'role': 'user', 'content': 'p'}, {'role': 'assistant', 'content': 'r'}]
  chat = [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'u'},
          {'role': 'assistant', 'content': 'a'}]
  assert sft.to_messages({'messages': chat}, 'f:1') == chat
  task = {'context': 'Q:', 'choices': [' no', ' yes'], 'label': 1}
  assert sft.to_messages(task, 'f:1') == [
      {'role': 'user', 'content': 'Q:'}, {'role': 'assistant', 'content': ' yes'}]
  # Columnar readers fill the other forms' keys with None.
  assert sft.to_messages({'prompt': 'p', 'response': 'r', 'messages': None}, 'f:1')[1] == {
      'role': 'assistant', 'content': 'r'}


@pytest.mark.parametrize('record, message', [
    ({'text': 'x'}, 'needs "prompt" and "response", "messages", or "context"'),
    ({'prompt': 'p'}, '"response" must be a string'),
    ({'messages': []}, 'non-empty list'),
    ({'messages': [{'role': 'bot', 'content': 'x'}]}, r'messages\[0\] needs a "role"'),
    ({'messages': [{'role': 'assistant', 'content': 'a'}, {'role': 'user', 'content': 'u'}]},
     'last message must be a non-empty "assistant"'),
    ({'context': 'c', 'choices': ['a', 'b'], 'label': 2},
     r'"label" must index "choices" \(0 to 1\)'),
    ({'context': 'c', 'choices': ['a', 'b'], 'label': True}, '"label" must index'),
    ({'context': 'c', 'choices': [], 'label': 0}, 'non-empty list of strings'),
    ([1, 2], 'expected a JSON object'),
])
def test_a_bad_record_is_named_with_its_place(record, message):
  with pytest.raises(sft.RecordError, match=f'^data.jsonl line 7: .*{message}'):
    sft.to_messages(record, 'data.jsonl line 7')


# Tokens and the loss mask.


def test_the_template_and_the_mask_are_as_documented():
  messages = [{'role': 'system', 'content': 'S.'}, {'role': 'user', 'content': 'Q?'},
              {'role': 'assistant', 'content': 'A'}, {'role': 'user', 'content': 'R?'},
              {'role': 'assistant', 'content': 'BC'}]
  e = sft.encode_messages(messages, chars, BOS, EOS, 100)
  assert e.rows[:, 0].tolist() == [BOS] + ids('S.Q?A') + [EOS] + ids('R?BC') + [EOS]
  assert e.rows[:, 1].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
  assert not e.truncated and not e.skipped


def test_trailing_spaces_of_a_prompt_belong_to_the_response():
  # lm-evaluation-harness's rule, which task scoring follows too.
  head, tail = sft.split_pair(chars, 'Answer: ', 'yes')
  assert (head, tail) == (ids('Answer:'), ids(' yes'))
  assert sft.split_pair(chars, 'x\n\t ', 'y') == (ids('x'), ids('\n\t y'))
  e = sft.encode_messages([{'role': 'user', 'content': 'Answer: '},
                           {'role': 'assistant', 'content': 'yes'}], chars, BOS, EOS, 100)
  assert e.rows[e.rows[:, 1] == 1, 0].tolist() == ids(' yes') + [EOS]


def test_long_examples_are_truncated_and_prompts_that_fill_the_row_skipped():
  def example(prompt, response):
    return [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}]

  e = sft.encode_messages(example('abc', 'defgh'), chars, BOS, EOS, 6)
  assert e.truncated and e.rows[:, 0].tolist() == [BOS] + ids('abcde')
  assert e.rows[:, 1].tolist() == [0, 0, 0, 0, 1, 1]
  e = sft.encode_messages(example('abcde', 'f'), chars, BOS, EOS, 6)
  assert e.skipped and len(e.rows) == 0
  lines = [json.dumps(sft.to_messages({'prompt': p, 'response': 'xy'}, '')) for p in
           ('a', 'abcd', 'abcdefgh')]
  counts = sft.count(zip(['f:0', 'f:1', 'f:2'], lines), chars, BOS, EOS, 6)
  assert (counts.examples, counts.truncated, counts.skipped, counts.first_skipped) == (
      3, 1, 1, 'f line 3')


# Packing whole examples.


def test_row_packer_keeps_examples_whole_and_numbers_them():
  packer = packing.RowPacker(seq_len=7)  # Rows of 8 tokens.
  examples = [np.stack([np.full(n, n), np.ones(n)], axis=1).astype(np.int32)
              for n in (3, 4, 2, 0, 5, 8, 1)]
  rows = []
  for e in examples:
    packer.add(e)
    while (row := packer.pop()) is not None:
      rows.append(row)
  assert packer.pop() is None  # The last example might still share its row.
  rows.append(packer.pop(partial=True))
  assert packer.pop(partial=True) is None
  tokens = [r[:, 0].tolist() for r in rows]
  assert tokens == [[3, 3, 3, 4, 4, 4, 4, 0], [2, 2, 5, 5, 5, 5, 5, 0], [8] * 8,
                    [1, 0, 0, 0, 0, 0, 0, 0]]
  assert rows[0][:, 2].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
  assert rows[1][:, 2].tolist() == [1, 1, 2, 2, 2, 2, 2, 0]  # The empty one is skipped.
  assert [r[:, 1].sum() for r in rows] == [7, 7, 8, 1]  # Padding is never trained on.
  with pytest.raises(ValueError, match='9 tokens does not fit a row of 8'):
    packer.add(np.zeros((9, 2), np.int32))


# The pipeline.


def _records(n):
  out = []
  for i in range(n):
    words = ' '.join(h.WORDS[:1 + i % 9])
    if i % 3 == 0:
      out.append({'prompt': f'Q{i}: {words}?', 'response': f' A{i} {words[::-1]}'})
    elif i % 3 == 1:
      out.append({'messages': [
          {'role': 'system', 'content': f'S{i}. '}, {'role': 'user', 'content': words},
          {'role': 'assistant', 'content': f' ok {i}'}, {'role': 'user', 'content': ' more?'},
          {'role': 'assistant', 'content': f' {words.upper()}'}]})
    else:
      out.append({'context': f'{words} is', 'choices': [' even', ' odd'], 'label': i % 2})
  return out


@pytest.fixture(scope='module')
def sft_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('sft')
  records = _records(120)
  with open(d / 'train.jsonl', 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return DataConfig(source='files', files=str(d / 'train.jsonl'), format='sft',
                    eval_fraction=0.0), records


def test_batches_hold_whole_examples_trained_on_their_responses(tok, sft_files):
  cfg, records = sft_files
  batch = next(iter(TrainBatches(cfg, tok, 4, 48, prefetch=0)))
  assert all(v.shape == (4, 49) and v.dtype == np.int32 for v in batch)  # All three fields.
  assert (batch.tokens[:, 0] == tok.bos_id).all()  # Every row starts at an example.
  texts = {json.dumps(sft.to_messages(r, ''), sort_keys=True) for r in records}
  seen = 0
  for tokens, segments, mask in zip(*batch):
    assert (mask[segments == 0] == 0).all()
    for s in range(1, segments.max() + 1):
      piece, trained = tokens[segments == s], mask[segments == s]
      assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
      # The example decodes back to one record, and exactly its responses are trained.
      match = [t for t in texts if tok.decode(piece.tolist()) == sft.plain_text(t)]
      assert match, tok.decode(piece.tolist())
      responses = [m['content'] for m in json.loads(match[0]) if m['role'] == 'assistant']
      assert tok.decode(piece[trained == 1].tolist()) == ''.join(responses)
      seen += 1
  assert seen >= 4


def test_sft_batches_resume_exactly(tok, sft_files):
  cfg, _ = sft_files
  kw = dict(batch_size=4, seq_len=48, prefetch=2, seed=1)
  full, states = h.batches(cfg, tok, 12, fields=True, **kw)
  rest, _ = h.batches(cfg, tok, 7, state=states[4], fields=True, **kw)
  for a, b in zip(full[5:], rest):
    for x, y in zip(a, b, strict=True):  # Tokens, segment ids and loss masks alike.
      np.testing.assert_array_equal(x, y)
  assert all(s['offset'] == 0 for s in states[4]['streams'].values())


def test_summary_counts_what_training_will_do(tok, sft_files):
  cfg, records = sft_files
  truncated = skipped = 0
  for r in records:  # Counted here from the template's definition.
    segments, text = [], ''
    for m in sft.to_messages(r, ''):
      text += m['content']
      if m['role'] == 'assistant':
        segments.append(text)
        text = ''
    length = 1 + sum(len(tok.encode(seg)) + 1 for seg in segments)
    messages = sft.to_messages(r, '')
    first = next(i for i, m in enumerate(messages) if m['role'] == 'assistant')
    prompt = 1 + len(tok.encode(''.join(m['content'] for m in messages[:first]).rstrip(' ')))
    skipped += prompt >= 17
    truncated += length > 17 and prompt < 17
  assert 0 < truncated and 0 < skipped
  assert examples_summary(cfg, tok, 16) == (
      f'training {len(records)} examples; {truncated} longer than 17 tokens (seq_len + 1) '
      f'are truncated at the end; {skipped} whose prompt leaves no response token within '
      f'them are skipped (first: ' + examples_summary(cfg, tok, 16).split('(first: ')[1])


def test_rows_too_short_for_every_prompt_are_refused_naming_seq_len(tok, sft_files):
  cfg, _ = sft_files
  # Two tokens: BOS and one of the prompt, whatever it is; no response fits after it.
  with pytest.raises(ValueError, match=r'^seq_len: every one of the \d+ training examples '
                                       r'has a prompt .* seq_len \+ 1 = 2 tokens \(first: '):
    examples_summary(cfg, tok, 1)


def test_a_bad_line_is_named_and_text_files_are_refused(tok, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
  cfg = DataConfig(source='files', files=str(path), format='sft', eval_fraction=0.0)
  with pytest.raises(DataError, match=f'{path} line 2: "response" must be a string'):
    next(iter(TrainBatches(cfg, tok, 2, 16, prefetch=0)))
  txt = tmp_path / 'notes.txt'
  txt.write_text('hello\n')
  cfg = DataConfig(source='files', files=str(txt), format='sft', eval_fraction=0.0)
  with pytest.raises(DataError, match='reads .jsonl or .parquet records, not text'):
    next(iter(TrainBatches(cfg, tok, 2, 16, prefetch=0)))
  with pytest.raises(ValueError, match="data.format='sft' reads records from data.files"):
    DataConfig(format='sft')
  with pytest.raises(ValueError, match=r"data.format: expected one of text, sft \(got 'chat'\)"):
    DataConfig(format='chat')


# The loss on responses in the train step.


def _sft_batches(tok, sft_files, n=2, batch_size=8, seq_len=32):
  cfg, _ = sft_files
  it = TrainBatches(cfg, tok, batch_size, seq_len, prefetch=0)
  return [next(it) for _ in range(n)]


def _train_sft(batches, shape, grad_accum=1, loss_chunk=0):
  import jax

  from lm.model.config import ModelConfig
  from lm.model.transformer import Transformer
  from lm.optim.config import OptimizerConfig
  from lm.optim.optimizer import make_optimizer, schedule
  from lm.train.step import init_state, jit_train_step, make_train_step
  from tests.test_sharding import _rules

  model_cfg = ModelConfig(vocab_size=512, d_model=32, num_layers=1, num_heads=4,
                          num_kv_heads=2, d_ff=64)
  opt = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule='constant', grad_accum=grad_accum)
  rules = _rules(shape)
  net = Transformer(model_cfg, rules)
  tx = make_optimizer(opt, 10)
  state, shardings = init_state(net, tx, 32, rules, seed=0)
  step = jit_train_step(make_train_step(net, tx, schedule(opt, 10), grad_accum=grad_accum,
                                        loss_chunk=loss_chunk, rules=rules),
                        shardings, rules, (8, 33))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params), net


@pytest.mark.slow
def test_the_step_trains_on_responses_alike_on_any_mesh_and_micro_batching(tok, sft_files):
  batches = _sft_batches(tok, sft_files)
  one, params, _ = _train_sft(batches, (1, 1, 1))
  for shape, accum, chunk in (((2, 2, 2), 1, 0), ((2, 2, 2), 2, 0), ((1, 8, 1), 4, 8)):
    other, _, _ = _train_sft(batches, shape, accum, chunk)
    np.testing.assert_allclose(other, one, rtol=2e-5)
  # The logged loss is the mean over trained tokens, from before the step.
  import jax

  from lm.model.forward import next_token_pairs
  from lm.model.loss import token_nll
  _, params0, net = _train_sft([], (1, 1, 1))
  inputs, segments, targets = next_token_pairs(batches[0])
  logits = net.apply({'params': params0}, inputs, segment_ids_BxT=segments)
  nll = np.asarray(jax.jit(token_nll)(logits, targets)[0])
  np.testing.assert_allclose(one[0], nll[batches[0].loss_mask[:, 1:] == 1].mean(), rtol=1e-5)
  assert one[1] < one[0]


def test_an_example_scores_the_same_alone_and_packed_behind_another(tok, sft_files):
  import jax
  import jax.numpy as jnp

  from lm.model.forward import model_loss
  batch = _sft_batches(tok, sft_files, n=1, seq_len=96)[0]
  _, params, net = _train_sft([], (1, 1, 1))
  row = next(r for r in range(8) if batch.segment_ids[r].max() >= 2)
  assert (batch.segment_ids[row] == 1).any()
  tokens, segments, mask = (field[row] for field in batch)
  second = segments == 2
  # The same row with only the second example trained on, and that example alone.
  packed = Batch(tokens[None], segment_ids=segments[None], loss_mask=(mask * second)[None])
  n = int(second.sum())
  alone = Batch(*(np.zeros_like(v) for v in packed))
  alone.tokens[0, :n] = tokens[second]
  alone.segment_ids[0, :n] = 1
  alone.loss_mask[0, :n] = mask[second]
  loss = jax.jit(lambda p, b: model_loss(net, p, b)[0])
  np.testing.assert_allclose(loss(params, packed), loss(params, alone), rtol=1e-5)
  # Control: without segment ids the first example leaks into the second's loss.
  leaky = packed._replace(segment_ids=jnp.ones_like(packed.segment_ids))
  assert abs(float(loss(params, leaky)) - float(loss(params, alone))) > 1e-4


# Hugging Face's view of the template.


@pytest.mark.slow
def test_apply_chat_template_gives_the_ids_training_uses(tok, tmp_path):
  import transformers

  from lm.export import hf_tokenizer
  hf_tokenizer.write(tok.path, str(tmp_path), max_length=64, chat_template=sft.CHAT_TEMPLATE)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  records = _records(30) + [
      {'prompt': 'x = 1\n# x is ', 'response': '1\n'},  # Whitespace at the boundary.
      {'messages': [{'role': 'user', 'content': 'caf\u00e9 \U0001f600'},
                    {'role': 'assistant', 'content': '\t\u4e2d\u6587'}]}]
  for record in records:
    messages = sft.to_messages(record, '')
    ours = sft.encode_messages(messages, tok.encode_batch, tok.bos_id, tok.eos_id, 10**6)
    assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False) == (
        ours.rows[:, 0].tolist()), record


@pytest.mark.slow
def test_train_script_names_a_bad_line_and_writes_no_config(tokenizer, tmp_path):
  from tests.helpers import script
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"context": "a", "choices": [" b"], "label": 0}\n'
                  '{"context": "a", "choices": [" b"], "label": 3}\n')
  run = tmp_path / 'run'
  proc = script('train.py', '--config=configs/tiny.py', f'--config.workdir={run}',
                f'--config.data.tokenizer={tokenizer}', '--config.model.vocab_size=512',
                '--config.data.source=files', f'--config.data.files={path}',
                '--config.data.format=sft', check=False, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'error: {path} line 2: "label" must index "choices" (0 to 0), got 3']
  assert not (run / 'config.json').exists()


def test_reply_prompt_is_what_training_saw_before_the_response(tok):
  """A served chat's prompt ids are the training example's ids up to its first trained
  token: the reply the model learnt begins right where generation starts."""
  turns = [{'role': 'user', 'content': 'x = 1\n# x is '}, {'role': 'assistant', 'content': '1\n'},
           {'role': 'system', 'content': 'Be brief. '}, {'role': 'user', 'content': 'y = '},
           {'role': 'assistant', 'content': '2'}]
  for end in (1, 4):  # One user turn; then a second exchange after an answered one.
    example = sft.encode_messages(turns[:end + 1], tok.encode_batch, tok.bos_id, tok.eos_id,
                                  10**6).rows
    last_response = np.flatnonzero(example[:, 1])
    start = last_response[0] if end == 1 else last_response[np.flatnonzero(
        np.diff(last_response) > 1)[0] + 1]
    prompt = sft.reply_prompt(turns[:end], tok.encode_batch, tok.bos_id, tok.eos_id)
    assert prompt == example[:start, 0].tolist()
