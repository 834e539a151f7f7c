"""Where metrics go: stdout (or a tqdm bar), metrics.jsonl and TensorBoard.

Only process 0 writes; the other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import tqdm


def _clean(v: Any) -> Any:
  """JSON-able scalars; NaN and inf become null (JSON has no spelling for them)."""
  if v is None or isinstance(v, (str, bool)):
    return v
  v = float(v) if not isinstance(v, int) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def format_line(record: Mapping[str, Any]) -> str:
  parts = []
  for k, v in record.items():
    if isinstance(v, float):
      v = f'{v:.4g}'
    parts.append(f'{k}={v}')
  return ' '.join(parts)


class MetricsWriter:
  """Appends one JSON object per line (flushed) and mirrors it to stdout and TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               enabled: bool = True, stream: TextIO | None = None,
               tensorboard: bool = True) -> None:
    self.enabled = enabled
    self._stream = stream or sys.stdout
    self._jsonl = self._tb = self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    if tensorboard:
      import tensorboardX  # Imported lazily: only the writing process needs it.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'))
    # A progress bar on a terminal; plain lines when piped to a file or a log.
    if self._stream.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=self._stream,
                            dynamic_ncols=True)

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
      self._tb.flush()
    if self._bar is not None:
      self._bar.write(format_line(record))
    else:
      print(format_line(record), file=self._stream, flush=True)

  def advance(self, step: int, loss: float | None = None) -> None:
    if self._bar is not None:
      self._bar.n = step
      if loss is not None:
        self._bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
      self._bar.refresh()

  def close(self) -> None:
    for f in (self._bar, self._tb, self._jsonl):
      if f is not None:
        f.close()
