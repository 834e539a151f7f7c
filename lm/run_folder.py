"""Reads a run folder back for evaluation and sampling: config, tokenizer, parameters.

Errors are ValueErrors naming the missing path or step, for the scripts to print.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from data.tokenizer import Tokenizer, check_vocab
from lm.checkpoint import Checkpointer, committed_steps, first_line, read_metadata
from lm.config import Configs, parse
from lm.model import Transformer
from lm.sharding import AxisRules, tree_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """A trained run, its parameters restored onto `rules.mesh`."""

  workdir: str
  cfgs: Configs
  tokenizer: Tokenizer
  rules: AxisRules
  model: Transformer
  params: Any
  step: int


def load_config(workdir: str) -> Configs:
  """RUN/config.json, validated as training validated it."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise ValueError(f'no run folder at {workdir}')
  if not os.path.isfile(path):
    raise ValueError(f'no config.json in {workdir}: not a run folder')
  with open(path, encoding='utf-8') as f:
    return parse(ml_collections.ConfigDict(json.load(f)))


def eval_mesh_rules(cfgs: Configs) -> AxisRules:
  """The run's mesh on the devices present; all data-parallel if its sizes do not fit."""
  try:
    return AxisRules.from_config(cfgs.mesh)
  except ValueError as e:
    log.warning('%s; evaluating with a data-parallel mesh instead', e)
    return AxisRules.from_config(dataclasses.replace(cfgs.mesh, data=-1, fsdp=1, tensor=1))


def abstract_params(model: Transformer, rules: AxisRules) -> Any:
  """ShapeDtypeStructs of the parameters with their shardings: a restore target."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda k: model.init({'params': k}, tokens), jax.random.PRNGKey(0))
  boxed = boxed['params']
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), tree_shardings(boxed, rules))


def checkpoint_config(workdir: str, step: int) -> Configs:
  """The config checkpoint `step` was trained with (RUN/config.json for older ones).

  config.json holds the latest run's settings; a checkpoint holds its own, so evaluation
  holds out the very documents that checkpoint's training did.
  """
  step_dir = os.path.join(workdir, 'checkpoints', str(step))
  try:
    meta = read_metadata(step_dir)
  except Exception as e:  # noqa: BLE001  Unreadable: say which checkpoint.
    raise ValueError(f'cannot read the checkpoint {step_dir}: {first_line(e)}') from e
  if not meta or not meta.get('config'):
    return load_config(workdir)
  return parse(ml_collections.ConfigDict(meta['config']))


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config, tokenizer and the parameters of checkpoint `step` (default: the latest).

  The parameters land on the run's mesh (`eval_mesh_rules`), sharded as in training.
  """
  load_config(workdir)  # Says clearly when `workdir` is not a run folder.
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = committed_steps(workdir) if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise ValueError(f'no checkpoints in {ckpt_dir}')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'no checkpoint for step {step} in {ckpt_dir} '
                     f'(steps: {", ".join(map(str, steps))})')
  cfgs = checkpoint_config(workdir, step)
  tok_path = os.path.join(workdir, 'tokenizer.model')
  if not os.path.isfile(tok_path):
    raise ValueError(f'no tokenizer.model in {workdir}')
  tokenizer = Tokenizer(tok_path)
  check_vocab(tokenizer, cfgs.model.vocab_size)
  rules = eval_mesh_rules(cfgs)
  model = Transformer(cfgs.model, rules)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    params = checkpointer.restore_params(step, abstract_params(model, rules))
  except Exception as e:  # noqa: BLE001  A corrupt or truncated checkpoint: one line.
    raise ValueError(f'cannot read the parameters in {checkpointer.step_dir(step)}: '
                     f'{first_line(e)}') from e
  finally:
    checkpointer.close()
  return Run(workdir, cfgs, tokenizer, rules, model, params, step)
