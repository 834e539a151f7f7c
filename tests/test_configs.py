"""Every config file loads, validates, and builds an abstract model of the expected size."""

import ast
import dataclasses
import glob
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from lm.config import SECTIONS, parse, set_key
from lm.model import flops
from lm.model.transformer import Transformer
from tests.helpers import REPO

CONFIG_DIR = os.path.join(REPO, 'configs')
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
               if not p.endswith('__init__.py'))

# Published sizes of the shapes these configs copy.
EXPECTED_PARAMS = {
    'gpt2_small': 124e6,
    'gpt2_medium': 355e6,
    'llama_1b': 1.1e9,
    'llama_7b': 6.74e9,
    'llama_7b_long': 6.74e9,
}


def test_every_config_is_listed():
  assert {'base', 'tiny', 'gpt2_small', 'gpt2_medium', 'llama_1b', 'llama_7b'} <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_and_builds_an_abstract_model(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  cfgs = parse(config)
  assert cfgs.run.workdir == f'runs/{name}'
  model = Transformer(cfgs.model)
  # eval_shape: shapes only, so even the 7B model costs no memory here.
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  n = flops.count_params(nn.meta.unbox(abstract)['params'])
  assert n == flops.num_params(cfgs.model)
  if name in EXPECTED_PARAMS:
    assert n == pytest.approx(EXPECTED_PARAMS[name], rel=0.02)


def test_tiny_is_small_and_divides_every_test_mesh():
  cfgs = parse(importlib.import_module('configs.tiny').get_config())
  m = cfgs.model
  assert 1e6 < flops.num_params(m) < 10e6
  for size in (m.vocab_size, m.d_model, m.num_heads, m.d_ff):
    assert size % 8 == 0
  assert cfgs.run.batch_size % 8 == 0


def test_unknown_and_bad_keys_are_named():
  config = importlib.import_module('configs.tiny').get_config()
  config.lock()  # as scripts/ load it (lock_config=True)
  with pytest.raises(AttributeError, match='modle'):
    config.modle = 1
  config.unlock()
  config.model.flash = True
  with pytest.raises(ValueError, match='model.flash'):
    parse(config)
  del config.model['flash']
  config.data.sourse = 'stdlib'
  with pytest.raises(ValueError, match='unknown config key data.sourse'):
    parse(config)
  config = importlib.import_module('configs.tiny').get_config()
  config.optimizer.schedule = 'linear'
  with pytest.raises(ValueError, match='optimizer.schedule'):
    parse(config)


def test_a_loss_chunk_that_does_not_divide_the_rows_is_named():
  config = importlib.import_module('configs.tiny').get_config()
  config.loss.chunk = 3 * config.seq_len // 4 + 1
  with pytest.raises(ValueError, match=rf'loss.chunk: must divide seq_len={config.seq_len} '
                                       rf'\(got {config.loss.chunk}\)'):
    parse(config)
  config.loss.chunk = config.seq_len // 4
  parse(config)


@pytest.mark.slow
def test_the_old_name_of_loss_chunk_still_sets_it():
  from configs import tiny

  # On the command line (and in config files): the old key is linked to the new one.
  proc = subprocess.run([sys.executable, '-c', (
      'import sys; from absl import flags; from ml_collections import config_flags; '
      'from lm import cli; from lm.config import parse; '
      "c = config_flags.DEFINE_config_file('config', lock_config=True); "
      'cli.parse_flags(sys.argv); print(parse(c.value).loss.chunk)'),
      '--config=configs/tiny.py', '--config.model.loss_chunk=32'],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert proc.stdout.split() == ['32']
  # In the config.json of a run written before the key moved.
  old = tiny.get_config().to_dict()
  del old['loss']
  old['model']['loss_chunk'] = 16
  assert parse(ml_collections.ConfigDict(old)).loss.chunk == 16
  old['loss'] = {'chunk': 8}
  with pytest.raises(ValueError, match='model.loss_chunk=16 and loss.chunk=8 disagree'):
    parse(ml_collections.ConfigDict(old))


def _field_docs(cls):
  """{field: its docstring}: the string literal right after each field of a dataclass."""
  body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
  return {a.target.id: b.value.value for a, b in zip(body, body[1:])
          if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
          and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def test_every_key_is_documented_where_it_is_declared():
  from configs import base
  from lm.config import RunConfig

  declared = base.get_config().to_dict()
  for name, cls in {'run': RunConfig, **SECTIONS}.items():
    docs = _field_docs(cls)
    keys = declared if name == 'run' else declared[name]
    for field in dataclasses.fields(cls):
      assert docs.get(field.name, '').strip(), f'{cls.__name__}.{field.name} has no docstring'
      assert field.name in keys, f'{name}.{field.name} is missing from configs/base.py'


@pytest.mark.parametrize('key,value', [
    ('steps', 0), ('eval_batches', -1), ('mesh.fsdp', 0), ('mesh.tensor', -1),
    ('model.num_kv_heads', 3), ('model.dtype', 'int8'), ('model.remat_policy', 'most'),
    ('loss.chunk', -1), ('optimizer.b1', 1.0), ('optimizer.schedule', 'linear'),
    ('optimizer.grad_accum', 3), ('data.eval_fraction', 1.5), ('data.source', 'web'),
    ('data.streams', -1), ('wandb.mode', 'live'),
])
def test_a_bad_value_is_named_in_one_style(key, value):
  config = importlib.import_module('configs.tiny').get_config()
  set_key(config, key, repr(value))  # mesh.tensor=-1 next to the default mesh.data=-1.
  with pytest.raises(ValueError) as e:
    parse(config)
  assert re.fullmatch(rf'{re.escape(key)}: .+ \(got {re.escape(repr(value))}\)', str(e.value)), (
      str(e.value))


def test_a_corrupt_config_names_what_is_wrong():
  from configs import tiny

  with pytest.raises(ValueError, match='^mesh: the section is missing$'):
    parse({})
  with pytest.raises(ValueError, match=r"^model: expected a section of keys \(got \[1\]\)$"):
    parse({**tiny.get_config().to_dict(), 'model': [1]})


def test_config_json_round_trips_through_parse(tmp_path):
  from configs import tiny
  from lm.config import as_dict
  from lm.run.folder import RunFolder

  cfgs = parse(tiny.get_config())
  RunFolder(str(tmp_path)).write_config(cfgs)
  back = parse(ml_collections.ConfigDict(json.loads((tmp_path / 'config.json').read_text())))
  assert back == cfgs and as_dict(back) == as_dict(cfgs)


@pytest.mark.slow
def test_parsing_a_config_and_loading_a_run_import_only_what_they_need():
  """Parsing reads dataclasses alone (no Flax, no optax); the run layer does not pull in
  quantisation (qwix) or the eval package: a fresh interpreter shows what each import
  brings."""
  def imported(module: str) -> set[str]:
    code = f'import sys, {module}; print(" ".join(sorted(sys.modules)))'
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return {name.split('.')[0] if not name.startswith('lm.') else name
            for name in proc.stdout.split()}

  parsing = imported('lm.config')
  assert not parsing & {'flax', 'optax', 'orbax'}, parsing & {'flax', 'optax', 'orbax'}
  loading = imported('lm.run.folder')
  assert 'flax' in loading  # The control: the import really ran.
  assert not {'qwix', 'lm.eval', 'lm.eval.quantize', 'lm.train'} & loading


@pytest.mark.parametrize('text,message', [
    ('{}', 'mesh: the section is missing'),
    ('[1, 2]', r'expected an object of config keys and sections \(got list\)'),
    ('{"steps": ', 'not a JSON file'),
])
def test_a_corrupt_config_json_is_one_line_naming_the_file(tmp_path, text, message):
  from lm.run.folder import RunFolder

  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ValueError, match=rf'^{re.escape(str(tmp_path / "config.json"))}: '
                                       rf'{message}'):
    RunFolder(str(tmp_path)).config()
