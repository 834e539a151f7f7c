"""Tests of lm/train/distill.py: the loss, its gradient, and distill.teacher in train.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from data.batch import Batch
from lm.config import DistillConfig, parse
from lm.model.forward import model_loss
from lm.model.transformer import Transformer
from lm.train.distill import distill_loss, kl_per_token
from tests.helpers import one_device_env, read_metrics, script


def small_model():
  cfg = tiny.get_config()
  cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_layers = 64, 32, 2
  cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.d_ff = 4, 2, 64
  cfg.model.zero_init_out = False
  model = Transformer(parse(cfg).model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 64)
  params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])['params']
  return model, params, Batch(tokens=tokens)


def test_kl_per_token_is_the_textbook_sum():
  t = np.array([[[1.0, 2.0, 0.5]]])
  s = np.array([[[0.0, 1.0, 3.0]]])
  for temperature in (1.0, 2.5):
    p = np.exp(t / temperature) / np.exp(t / temperature).sum()
    q = np.exp(s / temperature) / np.exp(s / temperature).sum()
    expected = float(np.sum(p * np.log(p / q)))
    assert float(kl_per_token(jnp.array(t), jnp.array(s), temperature)[0, 0]) == (
        pytest.approx(expected, rel=1e-5))


def test_a_teacher_equal_to_the_student_gives_the_plain_loss_and_gradient():
  model, params, batch = small_model()
  plain = jax.value_and_grad(lambda p: model_loss(model, p, batch)[0])(params)
  for cfg in (DistillConfig(teacher='x'), DistillConfig(teacher='x', temperature=2.0,
                                                        kl_weight=3.0)):
    (total, metrics), grads = jax.value_and_grad(
        lambda p, cfg=cfg: distill_loss(model, p, model, params, batch, cfg), has_aux=True)(params)
    assert float(metrics['distill_kl']) == 0.0
    assert float(total) == pytest.approx(float(plain[0]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, plain[1])


def test_another_teacher_adds_its_weighted_kl():
  model, params, batch = small_model()
  other = model.init(jax.random.PRNGKey(7), batch.tokens[:, :-1])['params']
  cfg = DistillConfig(teacher='x', kl_weight=0.5, ce_weight=0.25, temperature=2.0)
  total, metrics = distill_loss(model, params, model, other, batch, cfg)
  ce = model_loss(model, params, batch)[0]
  assert float(metrics['distill_kl']) > 0
  assert float(total) == pytest.approx(
      0.25 * float(ce) + 0.5 * 4.0 * float(metrics['distill_kl']), rel=1e-5)


def test_distill_keys_are_checked():
  for key, value, message in (('kl_weight', -1.0, 'distill.kl_weight: must be >= 0'),
                              ('temperature', 0.0, 'distill.temperature: must be positive')):
    cfg = tiny.get_config()
    cfg.distill[key] = value
    with pytest.raises(ValueError, match=message):
      parse(cfg)


MODEL = ('--config.seq_len=64', '--config.model.num_layers=2', '--config.model.d_model=128',
         '--config.model.d_ff=256', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=2', '--config.eval_every=0')


@pytest.mark.slow
def test_train_distills_from_a_teacher_and_refuses_another_vocabulary(trained_run, tokenizer,
                                                                       tmp_path):
  workdir = tmp_path / 'student'
  proc = script('train.py', '--config=configs/tiny.py', '--config.steps=4',
                '--config.model.vocab_size=512', f'--config.data.tokenizer={tokenizer}',
                f'--config.workdir={workdir}', f'--config.distill.teacher={trained_run}',
                '--config.model.tie_embeddings=false', '--config.log_every=2',
                '--config.model.d_ff=128', *MODEL, env=one_device_env())
  assert f'distilling from {trained_run} (step 2,' in proc.stdout + proc.stderr
  train = [r for r in read_metrics(workdir) if 'distill_kl' in r]
  assert len(train) == 2 and all(r['distill_kl'] > 0 for r in train)

  from data import stdlib
  from data.tokenizer import train_tokenizer

  def refusal(files, vocab):
    """train.py's error for a student whose tokenizer is trained on `files`."""
    path = str(tmp_path / f'tok_{vocab}.model')
    train_tokenizer((stdlib.read(p) for p in files), vocab, path, max_bytes=1 << 18)
    bad = script('train.py', '--config=configs/tiny.py', '--config.steps=2',
                 f'--config.model.vocab_size={vocab}', f'--config.data.tokenizer={path}',
                 f'--config.workdir={tmp_path / "refused"}',
                 f'--config.distill.teacher={trained_run}', *MODEL, env=one_device_env(),
                 check=False)
    assert bad.returncode == 1 and not (tmp_path / 'refused').exists()
    return bad.stderr.strip().splitlines()[-1]

  assert refusal(stdlib.list_files()[:50], 1024) == (
      f'error: distill.teacher: {trained_run} has a vocabulary of 512, this run 1024; a '
      'teacher must share the tokenizer')
  # The same vocabulary size from another tokenizer: the same ids mean other text.
  line = refusal(stdlib.list_files()[-80:], 512)
  assert line.startswith('error: distill.teacher: ') and "is not this run's tokenizer" in line
  assert json.loads((trained_run / 'config.json').read_text())  # The teacher is unchanged.
  assert os.path.isdir(trained_run / 'checkpoints' / '2')
