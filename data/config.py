"""The typed `data` config block: the `data.*` keys, their defaults and docs (configs/base.py
is built from them), validated whenever one is made."""

import dataclasses

from data import formats, mixture

SOURCES = mixture.KINDS
FORMATS = tuple(formats.FORMATS)
_KINDS = {str: 'a string', int: 'an integer', float: 'a number', bool: 'a bool'}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data.*` keys: where training text comes from, how it is cleaned and batched."""

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
  mixture: str = ''
  """Weighted sources 'KIND[:ARG]:WEIGHT;...' (see data/mixture.py); empty = data.source."""
  streams: int = 0
  """Packing streams of all processes together; 0 = the global batch's rows (one per row).

  Each training document is packed into the stream with the fewest characters dealt so
  far (the lowest-numbered on a tie), so that a run of long documents does not hold one
  stream back while documents read for the others pile up; global row r of batch b is
  the next window of stream (b * rows + r) % streams. Several processes need a multiple
  of the global rows.
  """
  min_chars: int = 0
  """Drop documents shorter than this many characters; 0 = keep all non-blank ones."""
  dedup: bool = False
  """Drop exact duplicate texts within an epoch of a source (see data/cleaning.py)."""
  segment_ids: bool = False
  """Mark each packed document: attention stays inside it and positions restart at 0."""
  encode_threads: int = 0
  """Threads for batched sentencepiece encoding; 0 = every core."""
  format: str = 'text'
  """'text': plain documents. 'sft': JSON-lines records (prompt/response, chat messages
  or task examples; data/sft.py), packed whole, trained on the responses only."""

  def __post_init__(self) -> None:
    self.validate()  # Once, wherever a DataConfig is made: parse, a mixture's parts, tests.

  def validate(self) -> None:
    """Raises ValueError('data.KEY: why (got VALUE)') for the first bad key."""
    def bad(key, why):
      raise ValueError(f'data.{key}: {why} (got {getattr(self, key)!r})')

    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      # bool is an int in Python, but a flag given as a count (or vice versa) is a typo.
      if f.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      else:
        ok = isinstance(value, f.type) and (f.type is bool or not isinstance(value, bool))
      if not ok:
        bad(f.name, f'must be {_KINDS[f.type]}')
    if self.source not in SOURCES:
      bad('source', f'expected one of {", ".join(SOURCES)}')
    if not self.mixture:  # With a mixture, each entry names its own source.
      if self.source == 'files' and not [g for g in self.files.split(',') if g.strip()]:
        bad('files', "must name at least one glob when data.source='files'")
      if self.source == 'hub' and not self.name:
        bad('name', "must name a dataset when data.source='hub'")
    if self.format not in FORMATS:
      bad('format', f'expected one of {", ".join(FORMATS)}')
    if self.format == 'sft' and self.source == 'stdlib' and not self.mixture:
      bad('source', "data.format='sft' reads records from data.files or a hub dataset, "
          'and the stdlib has none')
    if self.source == 'hub' and not self.split:
      bad('split', "must not be empty when data.source='hub'")
    if self.source != 'stdlib' and not self.text_key:
      bad('text_key', 'must not be empty')
    if not 0.0 <= self.eval_fraction < 1.0:
      bad('eval_fraction', 'must be in [0, 1)')
    for key in ('streams', 'min_chars', 'encode_threads'):
      if getattr(self, key) < 0:
        bad(key, 'must be >= 0')
    if self.mixture:
      mixture.parse(self.mixture)
