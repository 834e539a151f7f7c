"""Document sources: deterministic streams of (key, text), resumable from a Position.

A source is a list of shards (a stdlib file, a data file, a hub split), each a sequence
of rows. A `Position` (epoch, shard, row) names one document, so resuming re-opens one
shard and skips rows in it instead of replaying the whole stream.

Reading errors (an unreadable or corrupt file, a missing column) are raised as one
`DataError` (a ValueError) that names the file or dataset and the config key.
"""

import dataclasses
import functools
import glob
import hashlib
import itertools
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from data import cleaning, formats, jsonl, sft, stdlib
from data.config import DataConfig

# File suffix -> `datasets` packaged builder. Compressed files are read on the fly.
_BUILDERS = (
    ('.jsonl.gz', 'json'),
    ('.jsonl', 'json'),
    ('.json.gz', 'json'),
    ('.json', 'json'),
    ('.parquet', 'parquet'),
    ('.txt.gz', 'text'),
    ('.txt', 'text'),
)
FILE_SUFFIXES = tuple(s for s, _ in _BUILDERS)


class DataError(ValueError):
  """Bad input data, with a message naming the file, column or source."""


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a document sits in the stream; resuming from it yields that document first."""

  epoch: int = 0
  shard: int = 0  # Index into this epoch's shard order.
  row: int = 0  # Row within that shard.
  index: int = 0  # Documents before this one in the epoch (held-out included).

  def next(self) -> 'Position':
    """The row after this one; past a shard's end, reading moves on to the next shard."""
    return dataclasses.replace(self, row=self.row + 1, index=self.index + 1)

  def to_dict(self) -> dict[str, int]:
    # Written out: dataclasses.asdict deep-copies, and this runs once per document.
    return {'epoch': self.epoch, 'shard': self.shard, 'row': self.row, 'index': self.index}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Position':
    return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Document:
  position: Position
  key: str  # Stable name; the held-out split hashes it.
  text: str


class Source:
  """A fixed list of shards; `rows` streams one shard's (key, text) from a row."""

  shard_names: tuple[str, ...] = ()
  label: str = ''  # Names the source in error messages.

  def rows(self, shard: int, start: int) -> Iterator[tuple[str, str]]:
    raise NotImplementedError

  def check_has_documents(self) -> None:
    """Raises DataError if the source holds no non-blank document, where that is cheap
    to tell (a hub dataset is only opened when read)."""

  def no_documents_message(self) -> str:
    return f'{self.label or "the data source"} holds no documents'


class StdlibSource(Source):
  """One document per standard-library file; the key is its relative path."""

  def __init__(self, root: str | None = None):
    self._root = root or stdlib.stdlib_root()
    self.shard_names = stdlib.list_files(self._root)
    self.label = 'data.source=stdlib'

  def rows(self, shard: int, start: int) -> Iterator[tuple[str, str]]:
    if start == 0:
      name = self.shard_names[shard]
      yield name, stdlib.read(name, self._root)


class FileSource(Source):
  """Local .txt/.jsonl(.gz)/.parquet files, read through `datasets` streaming.

  A .txt file yields one document per paragraph (blank-line separated), so a single
  large text file still has documents to hold out. The key of a row is
  '<file>:<row>', with <file> relative to the glob's fixed leading folders, so the
  held-out split does not change when the data moves or the working directory does.
  """

  def __init__(self, files: str, text_key: str | None):
    self._text_key = text_key  # None: whole records (data.format='sft').
    self._files = resolve_files(files)
    self.shard_names = tuple(name for name, _ in self._files)
    self.label = f'data.files={files!r}'

  def rows(self, shard: int, start: int) -> Iterator[tuple[str, str]]:
    name, path = self._files[shard]
    builder = _builder(path)
    # Undecodable bytes become U+FFFD instead of failing the run. The json builder only
    # decodes (with these errors) when the encoding is not spelled 'utf-8'; 'utf-8-sig'
    # is UTF-8 that also drops a leading byte-order mark.
    kwargs = {'encoding_errors': 'replace'}
    if builder == 'text':
      kwargs['sample_by'] = 'paragraph'
    elif builder == 'json':
      kwargs['encoding'] = 'utf-8-sig'
    else:
      kwargs = {}
    if builder == 'text' and self._text_key is None:
      raise DataError(f"data.format='sft' reads .jsonl or .parquet records, not text: {path}")
    text_key = 'text' if builder == 'text' else self._text_key
    cache_dir = _local_cache_dir()  # Outside the try: its error is not the file's.
    datasets = _datasets()
    try:
      ds = datasets.load_dataset(
          builder, data_files=[path], split='train', streaming=True,
          cache_dir=cache_dir, **kwargs)
      yield from _rows(ds, text_key, start, name, path)
    except Exception as e:  # pyarrow, json and OS errors: the user needs the file.
      # Only builtins in the except clause: at interpreter exit a suspended generator is
      # closed after module globals such as DataError are gone.
      if isinstance(e, DataError):
        raise
      bad = _first_bad_json_line(path) if builder == 'json' else None
      if bad:  # Arrow counts rows from 0 and skips blank lines: say the line itself.
        raise DataError(f'data.files: {path} line {bad[0]}: {bad[1]}') from e
      raise DataError(f'data.files: cannot read {path}: {type(e).__name__}: {e}') from e

  def check_has_documents(self) -> None:
    """Raises DataError naming the files unless one holds a non-blank document.

    Cheap on a large corpus: reading stops at the first such document, and zero-byte
    files are not opened.
    """
    for shard, (_, path) in enumerate(self._files):
      if os.path.getsize(path) and any(text.strip() for _, text in self.rows(shard, 0)):
        return
    raise DataError(self.no_documents_message())

  def no_documents_message(self) -> str:
    paths = [path for _, path in self._files]
    named = ', '.join(paths[:3]) + (f' and {len(paths) - 3} more' if len(paths) > 3 else '')
    verb = 'holds' if len(paths) == 1 else 'hold'
    return f'{self.label}: {named} {verb} no documents (empty or blank text only)'


class HubSource(Source):
  """A dataset split streamed by `datasets.load_dataset(name, config, split=...)`.

  stride (i, n) streams rows i, i + n, ... only, each keyed by its row in the split, so
  n readers (scripts/prepare_data.py's tasks) share one split under the trainer's keys.
  """

  def __init__(self, name: str, config_name: str, split: str, text_key: str | None,
               stride: tuple[int, int] = (0, 1)):
    self._name, self._config_name = name, config_name or None
    self._split, self._text_key = split, text_key
    self._stride = stride
    self.shard_names = (name,)
    self.label = f'data.name={name!r}'

  def rows(self, shard: int, start: int) -> Iterator[tuple[str, str]]:
    datasets = _datasets()
    try:
      ds = datasets.load_dataset(
          self._name, self._config_name, split=self._split, streaming=True)
    except Exception as e:  # The hub raises many types; the user needs one line.
      raise DataError(
          f'data.name: cannot stream {self._name!r} (config {self._config_name!r}, '
          f'split {self._split!r}): {type(e).__name__}: {e}') from e
    label = f'dataset {self._name!r}'
    try:
      yield from _rows(ds, self._text_key, start, self._name, label, stride=self._stride)
    except Exception as e:  # As in FileSource.rows.
      if isinstance(e, DataError):
        raise
      raise DataError(f'data.name: cannot read {label}: {type(e).__name__}: {e}') from e


def open_source(cfg: DataConfig) -> Source:
  """The source of a single-source config (see data/mixture.py for several). Every
  process reads a source whole; data/dealing.py decides which documents each packs."""
  if cfg.source == 'stdlib':
    return StdlibSource()
  text_key = formats.of(cfg).text_key(cfg.text_key)
  if cfg.source == 'files':
    return FileSource(cfg.files, text_key)
  return HubSource(cfg.name, cfg.config_name, cfg.split, text_key)


def shard_order(source: Source, epoch: int, seed: int | None) -> list[int]:
  """The order shards are read in an epoch: as listed, or shuffled per (seed, epoch).

  Sorting by a digest of the name keeps the order stable across numpy versions and
  independent of which other shards exist.
  """
  n = len(source.shard_names)
  if seed is None:
    return list(range(n))

  def rank(i: int) -> bytes:
    msg = f'{seed}:{epoch}:{source.shard_names[i]}'.encode()
    return hashlib.blake2b(msg, digest_size=16).digest()

  return sorted(range(n), key=rank)


def documents(
    source: Source,
    start: Position = Position(),
    *,
    repeat: bool,
    seed: int | None = None,
) -> Iterator[Document]:
  """Every document from `start` on; with `repeat`, epochs follow each other forever."""
  pos = start
  while True:
    order = shard_order(source, pos.epoch, seed)
    index = pos.index
    for s in range(pos.shard, len(order)):
      first_row = pos.row if s == pos.shard else 0
      for row, (key, text) in enumerate(source.rows(order[s], first_row), first_row):
        yield Document(Position(pos.epoch, s, row, index), key, text)
        index += 1
    if not repeat:
      return
    if index == 0:  # A whole epoch without a document: repeating would spin forever.
      raise DataError(source.no_documents_message())
    pos = Position(epoch=pos.epoch + 1)


def shard_name(source: Source, pos: Position, seed: int | None) -> str:
  """The name of the shard `pos` points into ('' past the last shard)."""
  order = shard_order(source, pos.epoch, seed)
  return source.shard_names[order[pos.shard]] if pos.shard < len(order) else ''


def resolve_files(spec: str) -> list[tuple[str, str]]:
  """(name, absolute path) of every file the comma-separated globs match, sorted by name."""
  by_path: dict[str, str] = {}
  for pattern in [p.strip() for p in spec.split(',') if p.strip()]:
    expanded = os.path.expanduser(pattern)
    matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not matches:
      raise DataError(f'data.files: glob {pattern!r} matched no files')
    base = glob_base(expanded)
    for path in matches:
      if _builder(path) is None:
        suffixes = ', '.join(FILE_SUFFIXES)
        raise DataError(f'data.files: {path} is not one of {suffixes}')
      if not os.access(path, os.R_OK):
        raise DataError(f'data.files: cannot read {path}: permission denied')
      name = pathlib.Path(os.path.relpath(path, base)).as_posix()
      by_path.setdefault(os.path.abspath(path), name)
  return sorted((name, path) for path, name in by_path.items())


def glob_base(pattern: str) -> str:
  """The leading folders of a glob that hold no wildcard (a plain path: its folder)."""
  parts = pathlib.PurePath(pattern).parts
  fixed = []
  for part in parts:
    if any(c in part for c in '*?['):
      break
    fixed.append(part)
  if len(fixed) == len(parts):
    fixed = fixed[:-1]
  return os.path.join(*fixed) if fixed else '.'


def _builder(path: str) -> str | None:
  for suffix, builder in _BUILDERS:
    if path.endswith(suffix):
      return builder
  return None


def _rows(ds: Any, text_key: str | None, start: int, name: str, label: str, *,
          stride: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, str]]:
  """(key, text) of each row from `start` on; text_key None: the whole record as
  data/sft.py's document, checked (a bad record names its line). stride (i, n): only
  rows i, i + n, ... of ds, `start` counting those, each keyed by its row in ds."""
  first, step = stride
  if start or first:
    ds = ds.skip(start * step + first)
  if step > 1:
    ds = itertools.islice(ds, 0, None, step)
  for i, example in enumerate(ds, start):
    row = i * step + first
    if text_key is None:
      try:
        text = sft.record_text(example, f'{label} line {row + 1}')
      except sft.RecordError as e:
        raise DataError(str(e)) from None
      yield f'{name}:{row}', cleaning.fix_text(text)
      continue
    if text_key not in example:
      raise DataError(
          f'data.text_key: column {text_key!r} not found in {label} '
          f'(columns: {", ".join(sorted(example))})')
    text = example[text_key]
    if text is None:
      text = ''
    elif not isinstance(text, str):
      raise DataError(
          f'data.text_key: column {text_key!r} in {label} holds '
          f'{type(text).__name__}, not text')
    yield f'{name}:{row}', cleaning.fix_text(text)


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
  """(line number, why) of the first non-blank line of a JSON lines file that is not
  JSON, decoded as the reader decodes it; None if every line parses."""
  try:
    for _ in jsonl.records(path, encoding='utf-8-sig', errors='replace'):
      pass
  except jsonl.BadLine as e:
    return e.line, e.why
  except OSError:
    return None
  return None


def _local_cache_dir() -> str:
  """This user's folder for the lock files that streaming local files leaves behind.

  Per user (one shared folder in the temp dir belongs to whoever made it first), under
  $XDG_CACHE_HOME or ~/.cache, out of the repo; DataError names it if it is not usable.
  """
  home = os.environ.get('XDG_CACHE_HOME', '')
  if not os.path.isabs(home):  # The XDG spec says to ignore a relative path.
    home = os.path.join(os.path.expanduser('~'), '.cache')
  return _usable_dir(os.path.join(home, 'lm', 'datasets'))


@functools.lru_cache(maxsize=8)
def _usable_dir(path: str) -> str:
  """`path`, created and checked by writing a file there (root ignores mode bits)."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise DataError(
        f'cannot use the datasets cache folder {path} ({type(e).__name__}: {e.strerror or e}); '
        'set XDG_CACHE_HOME to a writable folder') from e
  return path


def _datasets() -> Any:
  """The `datasets` library with its progress bars off. Imported on first use: it takes
  half a second, which every script and stdlib run would pay for nothing."""
  import datasets

  datasets.disable_progress_bars()
  return datasets
