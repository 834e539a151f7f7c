"""A sentencepiece tokenizer that round-trips any text exactly, and how to get one."""

import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from data import formats, reader
from data.config import DataConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece reads its training input line by line, so newlines never appear inside
# learned pieces; these give newlines, tabs and common indentation one id each.
_USER_SYMBOLS = ('\n', '\t', '    ', '        ')
# sentencepiece writes spaces as U+2581 inside pieces and turns every U+2581 back into
# a space on decode, so a literal one in the input is encoded as its UTF-8 bytes.
_SPACE_MARK = '\u2581'
_DEFAULT_MAX_BYTES = 8 << 20


class Tokenizer:
  """Wraps a sentencepiece model file."""

  def __init__(self, path: str, num_threads: int | None = None):
    if not os.path.isfile(path):
      raise ValueError(f'tokenizer model not found: {path}')
    self._path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # A garbled or foreign file: one line, no trace.
      raise ValueError(f'{path} is not a sentencepiece model: {" ".join(str(e).split())}') from e
    self._num_threads = num_threads or os.cpu_count() or 1
    self._mark_ids = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in _SPACE_MARK.encode()]
    if any(self._sp.id_to_piece(i) != f'<0x{b:02X}>'
           for i, b in zip(self._mark_ids, _SPACE_MARK.encode())):
      self._mark_ids = []  # No byte fallback: a literal U+2581 cannot round-trip.

  @property
  def path(self) -> str:
    return self._path

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id decodes to (0 for pad/unk/bos/eos), for bits per byte."""
    sp = self._sp
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        out[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i)):
        out[i] = len(sp.id_to_piece(i).replace(_SPACE_MARK, ' ').encode('utf-8'))
    return out

  def encode(self, text: str) -> list[int]:
    if _SPACE_MARK in text and self._mark_ids:
      return self._encode_with_marks(text)
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
    """Encodes on several threads; sentencepiece releases the GIL while it works."""
    out = self._sp.encode(list(texts), num_threads=num_threads or self._num_threads)
    for i, text in enumerate(texts):
      if _SPACE_MARK in text and self._mark_ids:
        out[i] = self._encode_with_marks(text)
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece_text(self, i: int) -> str:
    """Token `i` as text on its own: its piece with the space mark as a space; a byte
    piece stays '<0xNN>' and a control token (BOS, EOS) is ''."""
    if self._sp.is_control(i):
      return ''
    return self._sp.id_to_piece(int(i)).replace(_SPACE_MARK, ' ')

  def _encode_with_marks(self, text: str) -> list[int]:
    ids: list[int] = []
    for i, part in enumerate(text.split(_SPACE_MARK)):
      if i:
        ids.extend(self._mark_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str,
    *,
    model_type: str = 'bpe',
    max_bytes: int = _DEFAULT_MAX_BYTES,
    num_threads: int = 1,
) -> Tokenizer:
  """Trains a byte-fallback sentencepiece model on the first `max_bytes` of `texts`.

  The same texts give the same model. Normalisation is off and whitespace is kept as
  is, so decode(encode(x)) == x for source code and any Unicode. The learned merges
  depend on the thread count (and vary between runs with several threads), and BPE
  training gains little from threads, so one thread is the default.
  """
  if vocab_size < 1:
    raise ValueError(f'vocab_size must be positive, got {vocab_size}')
  with tempfile.TemporaryDirectory(prefix='train_tokenizer_') as tmp:
    input_path = os.path.join(tmp, 'input.txt')
    if not _write_sample(texts, input_path, max_bytes):
      raise ValueError('no text to train the tokenizer on')
    # Lines are fed from the file rather than by its name: the model records the input
    # path, and a temporary name would make every model file differ.
    model = io.BytesIO()
    with open(input_path, encoding='utf-8', newline='\n') as lines:  # Keep '\r'.
      try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line.rstrip('\n') for line in lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            byte_fallback=True,
            character_coverage=0.9995,  # Rare characters go to bytes, not the vocab.
            normalization_rule_name='identity',
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=list(_USER_SYMBOLS),
            max_sentence_length=1 << 14,
            input_sentence_size=0,  # Use every line: sampling would vary the model.
            num_threads=num_threads,
            minloglevel=2,
        )
      except RuntimeError as e:  # e.g. a vocabulary too large for the sample.
        raise ValueError(
            f'vocab_size={vocab_size}: sentencepiece training failed: {e}') from e
    model_path = os.path.join(tmp, 'spm.model')
    with open(model_path, 'wb') as f:
      f.write(model.getvalue())
    _atomic_copy(model_path, out_path)
  return Tokenizer(out_path)


def load_or_train(cfg: DataConfig, run_model: str, vocab_size: int) -> Tokenizer:
  """The run's tokenizer, always kept at `run_model` (the run folder's copy).

  data.tokenizer set: that file (checked to load, then copied to `run_model`).
  Otherwise `run_model` if it exists, else a new one trained on the training split
  and saved there. A file that is not a sentencepiece model raises ValueError naming it.
  """
  if cfg.tokenizer:
    if not os.path.isfile(cfg.tokenizer):
      raise ValueError(f'data.tokenizer: no such file: {cfg.tokenizer}')
    try:  # Loaded before the copy, so a bad file leaves nothing in the run folder.
      Tokenizer(cfg.tokenizer)
    except ValueError as e:
      raise ValueError(f'data.tokenizer: {e}') from e
    if os.path.isfile(run_model):
      if not _same_bytes(cfg.tokenizer, run_model):
        raise ValueError(
            f'data.tokenizer: {cfg.tokenizer} differs from {run_model}, which this run '
            'already uses')
    else:
      _atomic_copy(cfg.tokenizer, run_model)
    return Tokenizer(run_model)
  if os.path.isfile(run_model):
    return Tokenizer(run_model)
  reader.check_has_documents(cfg)  # Else an empty data file reads as 'no text'.
  return train_tokenizer(training_texts(cfg), vocab_size, run_model)


def training_texts(cfg: DataConfig) -> Iterable[str]:
  """The training split's documents, cleaned, one pass in listed order (no held-out text).

  A mixture interleaves its sources by weight, so a capped sample still covers each.
  """
  for doc in reader.single_pass(cfg, heldout=False):
    yield formats.of(cfg).training_text(doc.text)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  if model_vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'model.vocab_size={model_vocab_size} is smaller than the tokenizer\'s '
        f'vocabulary ({tokenizer.vocab_size}, {tokenizer.path})')


def _write_sample(texts: Iterable[str], path: str, max_bytes: int) -> int:
  """Writes whole documents (the last one cut) until max_bytes; returns bytes written."""
  written = 0
  with open(path, 'wb') as f:
    for text in texts:
      # NUL would end a line inside sentencepiece's C++ reader.
      data = text.replace('\x00', '').encode('utf-8', errors='replace')
      if len(data) > max_bytes - written:  # Cut on a character boundary.
        data = data[:max_bytes - written].decode('utf-8', errors='ignore').encode('utf-8')
      if not data.endswith(b'\n'):
        data += b'\n'
      f.write(data)
      written += len(data)
      if written >= max_bytes:
        break
  return written


def _atomic_copy(src: str, dst: str) -> None:
  # Several hosts may write the same model at once; readers never see half a file.
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dst)), suffix='.tmp')
  os.close(fd)
  try:
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _same_bytes(a: str, b: str) -> bool:
  with open(a, 'rb') as fa, open(b, 'rb') as fb:
    return fa.read() == fb.read()
