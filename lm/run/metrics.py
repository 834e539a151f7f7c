"""Where metrics go: stdout (or a tqdm bar), metrics.jsonl and TensorBoard.

Only process 0 writes; the other processes get a writer that drops everything. A run
that resumes from step S replays the steps after S, so opening the writer first trims
metrics.jsonl (and TensorBoard, by purge_step) back to S: one record per step, the
latest.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import tqdm

from lm.run import layout


def _clean(v: Any) -> Any:
  """JSON-able scalars; NaN and inf become null (JSON has no spelling for them)."""
  if v is None or isinstance(v, (str, bool)):
    return v
  if isinstance(v, (list, tuple)):  # Per-expert loads: jsonl only, not the line.
    return [_clean(x) for x in v]
  v = float(v) if not isinstance(v, int) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def format_line(record: Mapping[str, Any]) -> str:
  parts = []
  for k, v in record.items():
    if isinstance(v, list):
      continue  # Too long for a line: metrics.jsonl has it.
    if isinstance(v, float):
      v = f'{v:.4g}'
    parts.append(f'{k}={v}')
  return ' '.join(parts)


class MetricsWriter:
  """Appends one JSON object per line (flushed) and mirrors it to stdout and TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               enabled: bool = True, stream: TextIO | None = None,
               tensorboard: bool = True, mirrors: Sequence[Any] = ()) -> None:
    """mirrors: more writers (`write(record)`, `close()`) that get every record, e.g. W&B."""
    self.enabled = enabled
    self._mirrors = list(mirrors) if enabled else []
    self._stream = stream or sys.stdout
    self._jsonl = self._tb = self._bar = None
    self._kept: set[tuple[int, str]] = set()  # (step, key) of the records kept from before
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, layout.METRICS)
    self._kept = trim_jsonl(path, start_step)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if tensorboard:
      import tensorboardX  # Imported lazily: only the writing process needs it.
      # Events past start_step belong to steps that are about to be replayed.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, layout.TENSORBOARD),
                                            purge_step=start_step + 1)
    # A progress bar on a terminal (steps/s and time left); plain lines when piped.
    if self._stream.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=self._stream,
                            dynamic_ncols=True, unit='step')

  def has(self, step: int, key: str) -> bool:
    """Whether a record of `step` with `key` was kept from before this writer opened."""
    return (step, key) in self._kept

  def header(self, lines: list[str]) -> None:
    """A few lines on what the run is about to do (not recorded in metrics.jsonl)."""
    if not self.enabled:
      return
    for line in lines:
      if self._bar is not None:
        self._bar.write(line)
      else:
        print(line, file=self._stream, flush=True)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {k: _clean(v) for k, v in record.items()}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    step = record.get('step', 0)
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
        elif isinstance(v, list):  # One curve per element: k/0, k/1, ...
          for i, x in enumerate(v):
            if isinstance(x, (int, float)):
              self._tb.add_scalar(f'{k}/{i}', x, step)
      self._tb.flush()
    for mirror in self._mirrors:
      mirror.write(record)
    if self._bar is not None:
      self._bar.write(format_line(record))
    else:
      print(format_line(record), file=self._stream, flush=True)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)  # update(), not n=: tqdm's rate needs it.

  def close(self) -> None:
    for f in (self._bar, self._tb, self._jsonl, *self._mirrors):
      if f is not None:
        f.close()


def trim_jsonl(path: str, last_step: int) -> set[tuple[int, str]]:
  """Drops records after `last_step` (and a torn last line); returns (step, key) kept.

  The file is rewritten through a temporary file and a rename, so a crash here leaves
  either the old file or the trimmed one.
  """
  if not os.path.isfile(path):
    return set()
  kept_lines, kept = [], set()
  changed = False
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        changed = True  # A line torn by a kill mid-write.
        continue
      if step > last_step:
        changed = True
        continue
      kept_lines.append(line if line.endswith('\n') else line + '\n')
      kept.update((step, key) for key in record)
  if changed:
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept_lines)
    os.replace(tmp, path)
  return kept


def read_records(path: str) -> list[dict[str, Any]]:
  """Every record of a metrics.jsonl, in order: the one reader of the file.

  A last line without its newline that does not parse was torn by a kill mid-write: it
  is left out, as `trim_jsonl` drops it when the run resumes. Any other line that is not
  a JSON object with a step is an error naming the file and line.
  """
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      int(record['step'])
    except (ValueError, KeyError, TypeError) as e:
      if n == len(lines) and not line.endswith('\n'):
        break  # Torn by a kill mid-write.
      why = e.msg if isinstance(e, json.JSONDecodeError) else 'not a record with a step'
      raise ValueError(f'{path}:{n}: {why}') from None
    records.append(record)
  return records

