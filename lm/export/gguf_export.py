"""scripts/export_gguf.py's logic: a run's checkpoint as one GGUF file for llama.cpp.

Written with the `gguf` package (the llama.cpp project's own writer), as llama.cpp's
convert_hf_to_gguf.py writes a Hugging Face Llama: our parameters first take the Hugging
Face layout (lm/export/hf.py), then get llama.cpp's names, and the query and key rows are
permuted. Why the permutation: our RoPE rotates the two halves of each head (dimension i
pairs with i + H/2, Hugging Face's layout), while llama.cpp's `llama` architecture rotates
adjacent pairs (2i with 2i + 1, Meta's original layout). Reordering each head's rows to
0, H/2, 1, H/2 + 1, ... makes adjacent pairs of llama.cpp's projections the half pairs of
ours; attention scores are unchanged because queries and keys get the same order.

Dtypes follow the conversion script: norms stay float32; matrices (embedding and head
included) are float16 or q8_0, and a matrix whose rows do not split into q8_0's blocks
of 32 falls back to float16.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from lm.export import hf, hf_export, hf_tokenizer
from lm.model.config import ModelConfig
from lm.run.folder import RunFolder

TYPES = ('f16', 'q8_0')
ARCH = 'llama'

# HF name inside a layer -> llama.cpp's name inside blk.N.
_LAYER_NAMES = {
    'input_layernorm.weight': 'attn_norm.weight',
    'self_attn.q_proj.weight': 'attn_q.weight',
    'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight',
    'self_attn.o_proj.weight': 'attn_output.weight',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight',
    'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
}
_TOP_NAMES = {'model.embed_tokens.weight': 'token_embd.weight',
              'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight'}

# model.* keys and what GGUF's llama says for each; every other key must keep its default.
_EXPRESSED = {
    'vocab_size': 'llama.vocab_size and the token list',
    'd_model': 'llama.embedding_length', 'num_layers': 'llama.block_count',
    'num_heads': 'llama.attention.head_count', 'num_kv_heads': 'llama.attention.head_count_kv',
    'head_dim': 'llama.attention.key_length / value_length, llama.rope.dimension_count',
    'd_ff': 'llama.feed_forward_length', 'rope_theta': 'llama.rope.freq_base',
    'norm_eps': 'llama.attention.layer_norm_rms_epsilon',
    'tie_embeddings': 'no output.weight tensor',
}


def check_expressible(model_cfg: ModelConfig) -> None:
  """Raises naming the first model.* key GGUF's llama architecture cannot express."""
  hf.check_expressible(model_cfg, _EXPRESSED, "GGUF's llama architecture", 'export needs')


def rope_rows(w_RxD: np.ndarray, num_heads: int) -> np.ndarray:
  """HF-layout q or k rows (heads x H) -> llama.cpp's: each head's rows 0, H/2, 1, ...

  The reordering convert_hf_to_gguf.py applies to a Hugging Face Llama's q_proj and
  k_proj (with the kv head count for k).
  """
  r = w_RxD.shape[0]
  h = r // num_heads
  w_NxTwoxHalfxD = w_RxD.reshape(num_heads, 2, h // 2, *w_RxD.shape[1:])
  return np.ascontiguousarray(w_NxTwoxHalfxD.swapaxes(1, 2).reshape(w_RxD.shape))


def gguf_tensors(params: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> llama.cpp's tensors (float32 numpy, in the order llama.cpp lists them).

  Shapes are numpy's (rows, columns), as GGUFWriter takes them: a matrix is the
  Hugging Face (out, in) one, which ggml describes as ne = [in, out].
  """
  state = hf.to_hf(params, model_cfg, 'float32')
  out: dict[str, np.ndarray] = {}
  for name, x in state.items():
    if name in _TOP_NAMES:
      out[_TOP_NAMES[name]] = x
      continue
    layer, rest = name[len('model.layers.'):].split('.', 1)
    if rest == 'self_attn.q_proj.weight':
      x = rope_rows(x, model_cfg.num_heads)
    elif rest == 'self_attn.k_proj.weight':
      x = rope_rows(x, model_cfg.num_kv_heads)
    out[f'blk.{layer}.{_LAYER_NAMES[rest]}'] = x
  return out


def encode_tensor(name: str, x: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
  """(data, GGMLQuantizationType) for one tensor: norms float32, matrices f16 or q8_0."""
  import gguf

  types = gguf.GGMLQuantizationType
  if x.ndim <= 1 or name.endswith('_norm.weight'):
    return x.astype(np.float32), types.F32
  want = types.Q8_0 if qtype == 'q8_0' else types.F16
  try:
    return gguf.quants.quantize(x, want), want
  except gguf.QuantError:  # Rows not a multiple of the block size, as the script does.
    return gguf.quants.quantize(x, types.F16), types.F16


def vocab(tokenizer_path: str, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
  """(tokens, scores, token types) of a sentencepiece model, padded to vocab_size.

  Types are sentencepiece's own (normal, unknown, control, user-defined, unused, byte:
  the numbering GGUF uses), except that a user-defined piece holding a space is normal:
  sentencepiece matches user-defined pieces after spaces became U+2581, so it never
  emits one; llama.cpp would match it in the raw text. Ids past the tokenizer's are
  unused `[PAD<i>]` entries, as the conversion script pads them.
  """
  import gguf

  proto = hf_tokenizer.load_proto(tokenizer_path)
  tokens, scores, types = [], [], []
  for p in proto.pieces:
    kind = int(p.type)
    if kind == gguf.TokenType.USER_DEFINED and ' ' in p.piece:
      kind = int(gguf.TokenType.NORMAL)
    tokens.append(p.piece.encode('utf-8'))
    scores.append(float(p.score))
    types.append(kind)
  for i in range(len(tokens), vocab_size):
    tokens.append(f'[PAD{i}]'.encode())
    scores.append(-1000.0)
    types.append(int(gguf.TokenType.UNUSED))
  return tokens, scores, types


def write(path: str, tensors: Mapping[str, np.ndarray], model_cfg: ModelConfig,
          tokenizer_path: str, *, qtype: str = 'f16', context_length: int = 2048,
          name: str | None = None) -> None:
  """The GGUF file: llama's hyperparameters, the vocabulary and the encoded tensors."""
  import gguf

  check_type(qtype)
  writer = gguf.GGUFWriter(path, ARCH)
  try:
    if name:
      writer.add_name(name)
    _add_hyperparameters(writer, model_cfg, context_length)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == 'q8_0'
                         else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, tokenizer_path, model_cfg.vocab_size)
    for tensor_name, x in tensors.items():
      data, kind = encode_tensor(tensor_name, x, qtype)
      writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()


def _add_hyperparameters(writer: Any, c: ModelConfig, context_length: int) -> None:
  writer.add_context_length(context_length)
  writer.add_embedding_length(c.d_model)
  writer.add_block_count(c.num_layers)
  writer.add_feed_forward_length(c.d_ff)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_rope_freq_base(float(c.rope_theta))
  writer.add_layer_norm_rms_eps(float(c.norm_eps))
  writer.add_vocab_size(c.vocab_size)
  writer.add_rope_dimension_count(c.head_size)
  if c.head_size * c.num_heads != c.d_model:  # llama.cpp's default is d_model / heads.
    writer.add_key_length(c.head_size)
    writer.add_value_length(c.head_size)


def _add_vocab(writer: Any, tokenizer_path: str, vocab_size: int) -> None:
  proto = hf_tokenizer.load_proto(tokenizer_path)
  if len(proto.pieces) > vocab_size:
    raise ValueError(f'model.vocab_size={vocab_size} is smaller than the tokenizer\'s '
                     f'{len(proto.pieces)} pieces ({tokenizer_path})')
  tokens, scores, types = vocab(tokenizer_path, vocab_size)
  writer.add_tokenizer_model('llama')  # sentencepiece: merges ranked by piece score.
  writer.add_tokenizer_pre('default')
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  spec = proto.trainer_spec
  for role, token_id in (('bos', spec.bos_id), ('eos', spec.eos_id), ('unk', spec.unk_id),
                         ('pad', spec.pad_id)):
    if token_id >= 0:  # sentencepiece says -1 for a role it lacks.
      getattr(writer, f'add_{role}_token_id')(token_id)
  # Every training document starts with BOS (lm/eval/sampling.py's prompts too); none ends
  # with an added EOS.
  writer.add_add_bos_token(spec.bos_id >= 0)
  writer.add_add_eos_token(False)
  # llama.cpp puts a space before the text unless told not to; sentencepiece does so
  # only with add_dummy_prefix.
  writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))


def check_type(qtype: str) -> None:
  if qtype not in TYPES:
    raise ValueError(f'type: expected one of {", ".join(TYPES)}, got {qtype!r}')


def export_gguf(workdir: str, out: str, step: int | None = None,
                qtype: str = 'f16') -> dict[str, Any]:
  """Writes RUN's checkpoint (latest or `step`) as the GGUF file `out`.

  `out` must not exist; the file is written under a temporary name beside it and
  renamed when complete, so a failed export leaves nothing. Returns
  {'out', 'step', 'type', 'tensors', 'bytes', 'seconds'}.
  """
  start = time.perf_counter()
  check_type(qtype)
  try:
    import gguf  # noqa: F401  (each step imports it; a missing package is one line here)
  except ImportError as e:
    raise ValueError('GGUF export needs the gguf package: pip install gguf '
                     "(or pip install -e '.[gguf]')") from e
  if os.path.lexists(out):
    raise ValueError(f'output file {out} exists; refusing to overwrite it')
  folder = RunFolder(workdir)
  model_cfg = folder.config().model  # Says clearly when `workdir` is not a run folder.
  check_expressible(model_cfg)  # Before the restore, which may take a while.
  folder.tokenizer()  # Says clearly when it is missing or not a sentencepiece model.
  hf_tokenizer.check_supported(folder.tokenizer_path, target='GGUF')
  cfgs, step, params = hf_export.restore_run(workdir, step)
  check_expressible(cfgs.model)  # The checkpoint's own config may differ from the latest.
  tensors = gguf_tensors(params, cfgs.model)
  tmp = os.path.join(os.path.dirname(os.path.abspath(out)),
                     f'.{os.path.basename(out)}.{os.getpid()}.tmp')
  try:
    write(tmp, tensors, cfgs.model, folder.tokenizer_path, qtype=qtype,
          context_length=cfgs.run.seq_len,
          name=os.path.basename(os.path.normpath(os.path.abspath(workdir))))
    if os.path.lexists(out):
      raise ValueError(f'output file {out} appeared during the export; left it alone')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {'out': out, 'step': step, 'type': qtype, 'tensors': len(tensors),
          'bytes': os.path.getsize(out), 'seconds': round(time.perf_counter() - start, 2)}
