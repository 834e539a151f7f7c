"""Writes a sentencepiece BPE model as a Hugging Face `tokenizer.json` that encodes alike.

Why not let transformers convert `tokenizer.model` itself: its Llama converter assumes
ids 0-2 are unk/bos/eos (ours start with pad), it turns every user-defined piece into a
raw-text added token (so our four-space piece, which sentencepiece never emits because
spaces become U+2581 first, would split every indented line differently), and the
conversion differs between transformers 4 and 5. A `tokenizers` serialisation loaded as
`PreTrainedTokenizerFast` behaves the same in every version.

How sentencepiece's BPE encodes, and the equivalent pieces here: the normaliser turns
spaces into U+2581 (identity rules) and, with add_dummy_prefix, puts one U+2581 before
the text; user-defined symbols are matched first on the normalised text and never merged
(added tokens with normalized=True); the rest starts as characters and merges the
adjacent pair whose union has the best score (BPE merges ranked by that score); pieces
outside the vocabulary become byte pieces (byte_fallback).
"""

from __future__ import annotations

import json
import os
from typing import Any

from sentencepiece import sentencepiece_model_pb2

_SPACE_MARK = '\u2581'
# sentencepiece_model.proto ModelProto.SentencePiece.Type.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def load_proto(model_path: str) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, 'rb') as f:
    proto.ParseFromString(f.read())
  return proto


def check_supported(model_path: str, target: str = 'tokenizer.json') -> None:
  """Raises ValueError if `tokenizer_json` cannot reproduce this model's encoding.

  llama.cpp's sentencepiece tokenizer (GGUF's 'llama' model) works the same way: no
  normaliser, user-defined pieces matched first, merges by score, byte fallback. So the
  same checks hold for a GGUF export (`target='GGUF'`).
  """
  _check_supported(load_proto(model_path), model_path, target)


def _check_supported(proto: sentencepiece_model_pb2.ModelProto, model_path: str,
                     target: str = 'tokenizer.json') -> None:
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  problems = []
  if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    problems.append('model_type is not BPE')
  if norm.name != 'identity' or norm.precompiled_charsmap:
    problems.append(f'normalization rule {norm.name!r} (only identity converts exactly)')
  if norm.remove_extra_whitespaces:
    problems.append('remove_extra_whitespaces is on')
  if norm.add_dummy_prefix and any(
      p.type == _USER_DEFINED and ' ' not in p.piece for p in proto.pieces):
    # tokenizers normalises each stretch between added tokens on its own, so the prefix
    # would be repeated after every user-defined symbol.
    problems.append('add_dummy_prefix together with user-defined symbols')
  if trainer.treat_whitespace_as_suffix:
    problems.append('treat_whitespace_as_suffix is on')
  if problems:
    raise ValueError(f'tokenizer {model_path}: cannot convert to {target}: '
                     + '; '.join(problems))


def _merges(pieces: list[Any]) -> list[str]:
  """Every (left, right) split of each normal piece whose halves are normal pieces.

  Ranked by the merged piece's score, best first, as sentencepiece picks merges.
  """
  normal = {p.piece: i for i, p in enumerate(pieces) if p.type == _NORMAL}
  ranked = sorted(normal, key=lambda s: (-pieces[normal[s]].score, normal[s]))
  merges = []
  for piece in ranked:
    splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
    splits = [(a, b) for a, b in splits if a in normal and b in normal]
    for a, b in sorted(splits, key=lambda ab: (normal[ab[0]], normal[ab[1]])):
      # The 'a b' form is read by every tokenizers version; pieces never hold a space
      # (the normaliser has made them U+2581), so the split is unambiguous.
      merges.append(f'{a} {b}')
  return merges


def tokenizer_json(model_path: str, *, add_bos: bool = True) -> dict[str, Any]:
  """The `tokenizers` serialisation of a sentencepiece BPE model."""
  proto = load_proto(model_path)
  _check_supported(proto, model_path)
  pieces = list(proto.pieces)
  unk = next(p.piece for p in pieces if p.type == _UNKNOWN)
  added = []
  for i, p in enumerate(pieces):
    # sentencepiece matches user-defined symbols on the normalised text, where no space
    # is left: one that holds a space is never emitted, so it stays a plain vocab entry.
    if p.type in (_CONTROL, _UNKNOWN) or (p.type == _USER_DEFINED and ' ' not in p.piece):
      special = p.type != _USER_DEFINED
      added.append({'id': i, 'content': p.piece, 'single_word': False, 'lstrip': False,
                    'rstrip': False, 'normalized': not special, 'special': special})
  bos_id = proto.trainer_spec.bos_id
  bos = pieces[bos_id].piece if bos_id >= 0 else None
  if add_bos and bos is not None:
    seq = lambda name, type_id: {'Sequence': {'id': name, 'type_id': type_id}}
    tok = lambda type_id: {'SpecialToken': {'id': bos, 'type_id': type_id}}
    post = {'type': 'TemplateProcessing', 'single': [tok(0), seq('A', 0)],
            'pair': [tok(0), seq('A', 0), tok(1), seq('B', 1)],
            'special_tokens': {bos: {'id': bos, 'ids': [bos_id], 'tokens': [bos]}}}
  else:
    post = None
  decoders = [{'type': 'Replace', 'pattern': {'String': _SPACE_MARK}, 'content': ' '},
              {'type': 'ByteFallback'}, {'type': 'Fuse'}]
  normalizer = {'type': 'Replace', 'pattern': {'String': ' '}, 'content': _SPACE_MARK}
  if proto.normalizer_spec.add_dummy_prefix:
    normalizer = {'type': 'Sequence', 'normalizers': [
        {'type': 'Prepend', 'prepend': _SPACE_MARK}, normalizer]}
    # After Fuse, so only the start of the whole text loses its space.
    decoders.append({'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0})
  return {
      'version': '1.0',
      'truncation': None,
      'padding': None,
      'added_tokens': added,
      'normalizer': normalizer,
      'pre_tokenizer': None,
      'post_processor': post,
      'decoder': {'type': 'Sequence', 'decoders': decoders},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': unk,
                'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                'fuse_unk': True, 'byte_fallback': True, 'ignore_merges': False,
                'vocab': {p.piece: i for i, p in enumerate(pieces)},
                'merges': _merges(pieces)},
  }


def special_tokens(model_path: str) -> dict[str, str]:
  """{'bos_token': '<s>', ...} for the roles this model defines."""
  spec = load_proto(model_path)
  out = {}
  for role, i in (('bos', spec.trainer_spec.bos_id), ('eos', spec.trainer_spec.eos_id),
                  ('unk', spec.trainer_spec.unk_id), ('pad', spec.trainer_spec.pad_id)):
    if i >= 0:
      out[f'{role}_token'] = spec.pieces[i].piece
  return out


def write(model_path: str, out_dir: str, *, max_length: int, add_bos: bool = True,
          chat_template: str | None = None) -> None:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json in out_dir.

  Special tokens are read as such in text (split_special_tokens off, as in every Llama
  tokenizer): a chat template writes BOS and EOS as "<s>" and "</s>", so
  `apply_chat_template` gives the ids training used (data/sft.py). sentencepiece reads
  those strings as characters; `tokenizer(text, split_special_tokens=True)` does too,
  and so does `apply_chat_template(..., sanitize_control_tokens=True)` for message text.
  """
  tokens = special_tokens(model_path)
  config = {
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'model_max_length': max_length,
      'add_bos_token': add_bos and 'bos_token' in tokens,
      'add_eos_token': False,
      'clean_up_tokenization_spaces': False,
      'split_special_tokens': False,
      **tokens,
      **({'chat_template': chat_template} if chat_template else {}),
  }
  files = {'tokenizer.json': tokenizer_json(model_path, add_bos=add_bos),
           'tokenizer_config.json': config, 'special_tokens_map.json': tokens}
  os.makedirs(out_dir, exist_ok=True)
  for name, obj in files.items():
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2, ensure_ascii=False)
      f.write('\n')
