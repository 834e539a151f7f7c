"""The typed `data` config block: the same keys and defaults as `c.data` in configs/base.py."""

import dataclasses
from typing import Any, Mapping

SOURCES = ('stdlib', 'files', 'hub')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training text comes from and how it is split; see configs/base.py."""

  source: str = 'stdlib'
  """'stdlib' (the Python standard library's own .py files) | 'files' | 'hub'."""
  files: str = ''
  """'files': comma-separated globs of .txt/.jsonl/.jsonl.gz/.parquet."""
  name: str = ''
  """'hub': dataset name for datasets.load_dataset(streaming=True)."""
  config_name: str = ''
  """'hub': dataset config (subset), if any."""
  split: str = 'train'
  """'hub': split to stream."""
  text_key: str = 'text'
  """Column holding the text (jsonl, parquet, hub); .txt files always use 'text'."""
  tokenizer: str = ''
  """sentencepiece model path; empty = train one into the run folder."""
  eval_fraction: float = 0.01
  """Share of documents held out, chosen by a stable hash of their key."""

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'DataConfig':
    """Builds and validates a config from `c.data` (a ConfigDict or a plain dict)."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown config key(s): {", ".join("data." + k for k in unknown)}')
    cfg = cls(**d)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises ValueError naming the first bad key."""
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == 'eval_fraction':
        if isinstance(value, bool) or not isinstance(value, (int, float)):
          raise ValueError(f'data.eval_fraction must be a number, got {value!r}')
      elif not isinstance(value, str):
        raise ValueError(f'data.{f.name} must be a string, got {value!r}')
    if self.source not in SOURCES:
      raise ValueError(
          f'data.source must be one of {", ".join(SOURCES)}; got {self.source!r}')
    if self.source == 'files' and not [g for g in self.files.split(',') if g.strip()]:
      raise ValueError("data.files must name at least one glob when data.source='files'")
    if self.source == 'hub' and not self.name:
      raise ValueError("data.name must name a dataset when data.source='hub'")
    if self.source == 'hub' and not self.split:
      raise ValueError("data.split must not be empty when data.source='hub'")
    if self.source != 'stdlib' and not self.text_key:
      raise ValueError('data.text_key must not be empty')
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f'data.eval_fraction must be in [0, 1); got {self.eval_fraction!r}')
