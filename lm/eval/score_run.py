"""Scores a trained run: its held-out split, or local files one by one.

Text is packed as training packs it ([BOS] ids EOS per document, windows of seq_len + 1
sharing one token) into global batches of the run's batch size. A short last window
or batch is padded, and a mask keeps padding out of the loss, token and byte counts.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from data import packing, sources
from data.batch import make_batch
from data.tokenizer import Tokenizer
from lm.config import as_dict, parse
from lm.eval.perplexity import (
  ScoredBatch,
  evaluate,
  heldout_rows,
  make_eval_step,
  summarize,
  token_byte_lengths,
)
from lm.eval.quantize import NONE, QuantConfig, load_quantized_run, weights_record
from lm.run.folder import Run


def pack_texts(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int,
               max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """All rows (R, T + 1) of the texts' token stream, with the mask (R, T) of the targets
  to score.

  Every token but the stream's first is a target once; with max_tokens > 0 only the
  first max_tokens targets are kept.
  """
  windower = packing.Windower(seq_len)
  left = max_tokens + 1 if max_tokens else -1  # Stream tokens still to keep; -1: all.
  for chunk in _chunks(texts, 16):
    for ids in tokenizer.encode_batch(chunk):
      tokens = packing.wrap(ids, tokenizer.eos_id, tokenizer.bos_id)
      if left >= 0:
        tokens, left = tokens[:left], max(left - len(tokens), 0)
      windower.add(tokens)
    if left == 0:
      break
  windows = []
  while (window := windower.pop(partial=True)) is not None:  # The last one may be short.
    windows.append(window)
  tokens = np.zeros((len(windows), seq_len + 1), np.int32)
  mask = np.zeros((len(windows), seq_len), np.int32)
  for r, window in enumerate(windows):
    tokens[r, :len(window)] = window
    mask[r, :len(window) - 1] = 1
  return tokens, mask


def global_batches(rows: tuple[np.ndarray, np.ndarray],
                   batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows grouped into batches of batch_size; the last is filled with masked-out rows."""
  tokens, mask = rows
  pad = -len(tokens) % batch_size
  tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
  mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), np.int32)])
  return [(tokens[i:i + batch_size], mask[i:i + batch_size])
          for i in range(0, len(tokens), batch_size)]


def file_batches(run: Run, rows: tuple[np.ndarray, np.ndarray]) -> list[ScoredBatch]:
  """This process's rows of the global batches that score `rows` (pack_texts), in the
  batch form the run trained on: with segment ids or without."""
  return [local_rows((make_batch(tokens, run.tokenizer.eos_id, run.cfgs.data.segment_ids),
                      mask))
          for tokens, mask in global_batches(rows, run.cfgs.run.batch_size)]


def local_rows(batch: ScoredBatch) -> ScoredBatch:
  """This process's share of a global batch (the rows `global_batch` expects)."""
  n = batch[1].shape[0] // jax.process_count()
  start = jax.process_index() * n
  return jax.tree.map(lambda rows: rows[start:start + n], batch)


def heldout(run: Run, max_tokens: int = 0) -> list[ScoredBatch]:
  """This process's rows of the run's held-out batches: eval_batches, or max_tokens' worth."""
  r = run.cfgs.run
  return heldout_rows(run.cfgs.data, run.tokenizer, r.batch_size, r.seq_len, r.eval_batches,
                      max_tokens)


def file_texts(spec: str, text_key: str) -> Iterator[tuple[str, Iterator[str]]]:
  """(name, its documents) for each file the comma-separated globs match."""
  for pattern in [p.strip() for p in spec.split(',') if p.strip()]:
    if not glob.glob(os.path.expanduser(pattern), recursive=True):
      raise ValueError(f'--files: {pattern!r} matched no files')
  source = sources.FileSource(spec, text_key)
  for i, name in enumerate(source.shard_names):
    yield name, (text for _, text in source.rows(i, 0) if text)


def score(run: Run, batches: list[ScoredBatch], eval_step: Any = None) -> dict[str, Any]:
  """Loss, perplexity, bits per byte, tokens and bytes over the masked targets."""
  if eval_step is None:
    eval_step = make_step(run)
  return evaluate(eval_step, run.params, batches, run.rules)


def make_step(run: Run) -> Any:
  shape = (run.cfgs.run.batch_size, run.cfgs.run.seq_len + 1)
  shardings = jax.tree.map(lambda x: x.sharding, run.params)
  token_bytes = token_byte_lengths(run.tokenizer, run.cfgs.model.vocab_size)
  return make_eval_step(run.model, run.rules, shape, shardings, token_bytes,
                        loss_chunk=run.cfgs.loss.chunk)


def at_length(run: Run, seq_len: int) -> Run:
  """`run` scoring rows of `seq_len` tokens (its held-out split packed at that length),
  checked as a run at that length would be: what a long-context extension is judged by."""
  return dataclasses.replace(run, cfgs=parse({**as_dict(run.cfgs), 'seq_len': seq_len}))


def evaluate_run(workdir: str, *, step: int | None = None, files: str = '',
                 max_tokens: int = 0, quant: QuantConfig = NONE,
                 seq_len: int = 0) -> dict[str, Any]:
  """{"step", "loss", "perplexity", "bits_per_byte", "tokens", "bytes"}, plus "files"
  (one such record per file, without "step") when `files` matches several.

  `max_tokens` > 0 caps the tokens scored from the held-out split, or from each file.
  `quant` scores the run's weights quantised (lm/eval/quantize.py). `seq_len` > 0 scores
  rows of that many tokens instead of the run's own (`at_length`); "seq_len" then joins
  the record.
  """
  if max_tokens < 0:
    raise ValueError(f'--max_tokens must be >= 0, got {max_tokens}')
  if seq_len < 0:
    raise ValueError(f'--seq_len must be >= 0, got {seq_len}')
  run = load_quantized_run(workdir, step, quant)
  if seq_len:
    return {**_evaluate(at_length(run, seq_len), files, max_tokens), 'seq_len': seq_len}
  return _evaluate(run, files, max_tokens)


def _evaluate(run: Run, files: str, max_tokens: int) -> dict[str, Any]:
  if not files:
    return {'step': run.step, **score(run, heldout(run, max_tokens)), **weights_record(run)}
  eval_step = make_step(run)
  per_file = {}
  for name, texts in file_texts(files, run.cfgs.data.text_key):
    rows = pack_texts(texts, run.tokenizer, run.cfgs.run.seq_len, max_tokens)
    if not rows[1].sum():
      raise ValueError(f'--files: no text to score in {name}')
    per_file[name] = score(run, file_batches(run, rows), eval_step)
  total = sum(r['loss'] * r['tokens'] for r in per_file.values())
  result = {'step': run.step, **summarize(total, sum(r['tokens'] for r in per_file.values()),
                                          sum(r['bytes'] for r in per_file.values()))}
  if len(per_file) > 1:
    result['files'] = per_file
  return {**result, **weights_record(run)}


def report_lines(result: dict[str, Any]) -> list[str]:
  """Human-readable lines: one per file when there are several, then the total."""
  def line(name: str, r: dict[str, Any]) -> str:
    return (f'{name}: loss={r["loss"]:.4f} perplexity={r["perplexity"]:.3f} '
            f'bits_per_byte={r["bits_per_byte"]:.4f} tokens={r["tokens"]} bytes={r["bytes"]}')

  lines = [line(name, r) for name, r in result.get('files', {}).items()]
  return lines + [line(f'step {result["step"]}', result)]


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
  it = iter(items)
  while chunk := [x for _, x in zip(range(size), it)]:
    yield chunk
