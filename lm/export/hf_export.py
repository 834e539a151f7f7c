"""scripts/export_hf.py's logic: a run's checkpoint as a Hugging Face Llama folder.

It reads the run through `RunFolder` (lm/run/folder.py) and writes with lm/export/hf.py, which
holds the parameter mapping and the Llama config.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from data import sft
from lm.config import Configs
from lm.export import hf, hf_tokenizer
from lm.model.params import abstract_params
from lm.model.transformer import Transformer
from lm.run.folder import RunFolder


def export(workdir: str, out_dir: str, step: int | None = None,
           dtype: str = 'float32') -> dict[str, Any]:
  """Writes RUN's checkpoint (latest or `step`) as a Hugging Face Llama folder.

  out_dir gets config.json, generation_config.json, model.safetensors and the
  tokenizer (tokenizer.model plus a tokenizer.json that encodes like it). It must not
  exist or be empty. Returns {'out', 'step', 'params'}.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'output path {out_dir} is a file')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f'output folder {out_dir} is not empty; refusing to overwrite it')
  hf.check_dtype(dtype)  # Before the restore, which may take a while.
  folder = RunFolder(workdir)
  # Says clearly when `workdir` is not a run folder; refuses a model Llama cannot express
  # before the restore, which may take a while (to_hf checks the checkpoint's own config).
  hf.check_expressible(folder.config().model)
  tokenizer = folder.tokenizer()
  hf_tokenizer.check_supported(folder.tokenizer_path)
  cfgs, step, params = restore_run(workdir, step)
  count = hf.write_model(out_dir, params, cfgs.model, dtype=dtype,
                         max_position_embeddings=cfgs.run.seq_len, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  shutil.copyfile(folder.tokenizer_path, os.path.join(out_dir, RunFolder.TOKENIZER))
  hf_tokenizer.write(folder.tokenizer_path, out_dir, max_length=cfgs.run.seq_len,
                     chat_template=sft.CHAT_TEMPLATE)
  return {'out': out_dir, 'step': step, 'params': count}


def restore_run(workdir: str, step: int | None = None) -> tuple[Configs, int, Any]:
  """(configs, step, params as host numpy) of RUN's checkpoint `step` (default latest).

  Restored on the host where there is one: an export needs no accelerator memory.
  """
  folder = RunFolder(workdir)
  step = folder.pick_step(step)
  cfgs = folder.checkpoint_config(step)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = abstract_params(Transformer(cfgs.model), sharding=device)
  return cfgs, step, jax.device_get(folder.restore_params(step, abstract))
