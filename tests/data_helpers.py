"""Helpers shared by the tests of the data/ package (test_data*.py); no tests here."""

import gzip
import json
import pathlib

import numpy as np
import pandas as pd

from data.config import DataConfig
from data.pipeline import TrainBatches

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi '
         'omicron pi rho sigma tau upsilon phi chi psi omega').split()


def doc_text(i: int) -> str:
  """A unique, variable-length document (5 to 60 words) with its id in it."""
  n = 5 + (i * 37) % 56
  return f'doc{i:03d} ' + ' '.join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def write_jsonl(path, texts, key='text'):
  with open(path, 'w', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({key: t, 'other': len(t)}) + '\n')


def batches(cfg, tok, n, state=None, fields=False, **kw):
  """n batches and the state after each: their token rows, or with `fields` the Batch
  records whole."""
  it = TrainBatches(cfg, tok, kw.pop('batch_size', 2), kw.pop('seq_len', 16), **kw)
  if state is not None:
    it.load_state_dict(state)
  out, states = [], []
  for _ in range(n):
    out.append(next(it) if fields else tokens(next(it)))
    states.append(json.loads(json.dumps(it.state_dict())))
  it.close()
  return out, states


def global_batches(cfg, tok, n, processes, state=None, rows=8, **kw):
  """n global batches of `rows` rows from `processes` processes, and their merged states."""
  its = [TrainBatches(cfg, tok, rows // processes, 32, process_index=p,
                      process_count=processes, seed=2, encode_docs=8, **kw)
         for p in range(processes)]
  for it in its:
    if state is not None:
      it.load_state_dict(state)
  out, states = [], []
  for _ in range(n):
    out.append(np.concatenate([tokens(next(it)) for it in its]))
    merged = TrainBatches.merge_states([it.state_dict() for it in its])
    states.append(json.loads(json.dumps(merged)))
  for it in its:
    it.close()
  return out, states


def tokens(batch):
  """A batch's token rows, checking it holds nothing else (no data.segment_ids, no SFT)."""
  assert batch.segment_ids is None and batch.loss_mask is None
  return batch.tokens


def resume_matches(cfg, tok, n=10, k=3, **kw):
  """Takes n batches; a pipeline restored after batch k + 1 gives batches k + 2 .. n."""
  full, states = batches(cfg, tok, n, **kw)
  rest, _ = batches(cfg, tok, n - 1 - k, state=states[k], **kw)
  assert len(rest) == n - 1 - k
  for a, b in zip(full[k + 1:], rest):
    np.testing.assert_array_equal(a, b)
  return states


def reader_position(state, source=0):
  return state['reader']['sources'][source]['position']


def streams(batches):
  """Each packing stream's tokens: row r of consecutive batches, edge tokens once."""
  return [[t for b in batches for t in b[r][:-1].tolist()] for r in range(len(batches[0]))]


def split_docs(tok, stream):
  """The documents wholly contained in a token stream, decoded."""
  docs, cur = [], None
  for t in stream:
    if t == tok.bos_id:
      cur = []
    elif t == tok.eos_id:
      if cur is not None:
        docs.append(tok.decode(cur))
      cur = None
    elif cur is not None:
      cur.append(t)
  return docs


def stream_docs(tok, batches, by_row=True):
  """Decodes the documents of training batches (per stream) or eval batches (row-major)."""
  if by_row:
    return [d for stream in streams(batches) for d in split_docs(tok, stream)]
  return split_docs(tok, [t for b in batches for row in b for t in row[:-1].tolist()])


def lopsided_text(i: int) -> str:
  """Every fourth document long (50 to 149 words), the others 3 to 7 words."""
  n = 50 + (i * 53) % 100 if i % 4 == 0 else 3 + i % 5
  return f'doc{i:03d} ' + ' '.join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def make_corpus(d: pathlib.Path) -> tuple[DataConfig, list[str]]:
  """60 small documents over .jsonl, .jsonl.gz, .txt and .parquet files in folder d."""
  texts = [doc_text(i) for i in range(60)]
  write_jsonl(d / 'a.jsonl', texts[0:15])
  with gzip.open(d / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
    for t in texts[15:30]:
      f.write(json.dumps({'text': t}) + '\n')
  (d / 'c.txt').write_text('\n\n'.join(texts[30:45]) + '\n', encoding='utf-8')
  pd.DataFrame({'text': texts[45:60]}).to_parquet(d / 'd.parquet')
  globs = ','.join(str(d / p) for p in ('*.jsonl', '*.jsonl.gz', '*.txt', '*.parquet'))
  return DataConfig(source='files', files=globs, eval_fraction=0.2), texts


def make_lopsided(d: pathlib.Path) -> tuple[DataConfig, list[str]]:
  """60 documents of very unequal lengths in folder d; dealt in turn to 4 streams, the
  long ones would all go to stream 0."""
  texts = [lopsided_text(i) for i in range(60)]
  write_jsonl(d / 'x.jsonl', texts)
  return DataConfig(source='files', files=str(d / 'x.jsonl'), eval_fraction=0.0), texts
