"""Tests of lm/compress/ and scripts/prune.py: exact sparsity, the methods' order on a
trained model, the new run folder and the refusals."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from lm.compress import calibrate, prune, sparsegpt, structured
from lm.compress.masks import Sparsity, as_matrix
from lm.model.params import stack_layers, unstack_layers
from lm.run.folder import load_run
from tests.helpers import one_device_env, script

PROJECTIONS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@pytest.fixture(scope='module')
def learned_run(tmp_path_factory, tokenizer):
  """A small run trained long enough (150 steps) for its weights and activations to have
  structure, which the calibrated methods exploit and magnitude does not see."""
  workdir = tmp_path_factory.mktemp('learned') / 'run'
  script('train.py', '--config=configs/tiny.py', '--config.steps=150',
         '--config.model.vocab_size=512', f'--config.data.tokenizer={tokenizer}',
         f'--config.workdir={workdir}', '--config.eval_every=0', '--config.seq_len=64',
         '--config.model.num_layers=2', '--config.model.d_model=128',
         '--config.model.d_ff=256', '--config.model.num_heads=4',
         '--config.model.num_kv_heads=2', '--config.optimizer.lr=3e-3',
         '--config.data.eval_fraction=0.05', env=one_device_env())
  return str(workdir)


@pytest.fixture(scope='module')
def pruned(learned_run, tmp_path_factory):
  """method -> its new run folder, at 50%."""
  out = tmp_path_factory.mktemp('pruned')
  run = load_run(learned_run)
  return {m: (prune.prune_run(run, str(out / m), m, Sparsity(fraction=0.5)), str(out / m))
          for m in prune.METHODS}


def kernels(params):
  for block in sorted(k for k in params if k.startswith('block_')):
    for module in ('attn', 'mlp'):
      for name, w in params[block][module].items():
        if name in PROJECTIONS:
          yield f'{block}/{module}/{name}', name, np.asarray(w)


def test_sparsity_flags_are_checked():
  assert Sparsity.parse(0.5, None) == Sparsity(fraction=0.5)
  assert Sparsity.parse(None, '2:4') == Sparsity(n=2, m=4)
  for sparsity, pattern, flag in ((0.0, None, '--sparsity'), (1.0, None, '--sparsity'),
                                  (-0.1, None, '--sparsity'), (None, '4:2', '--pattern'),
                                  (None, '2-4', '--pattern'), (None, '0:4', '--pattern'),
                                  (None, None, '--sparsity=F'), (0.5, '2:4', '--sparsity=F')):
    with pytest.raises(ValueError, match=flag):
      Sparsity.parse(sparsity, pattern)
  with pytest.raises(ValueError, match=r'--pattern=2:3: x has 256 inputs, not a multiple of 3'):
    Sparsity(n=2, m=3).check('x', 256)


@pytest.mark.parametrize('sparsity', [Sparsity(fraction=0.5), Sparsity(fraction=0.3),
                                      Sparsity(n=2, m=4), Sparsity(n=4, m=8)])
def test_every_method_prunes_exactly_per_output(sparsity):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 64)) * rng.uniform(0.1, 3, size=64)
  w = rng.normal(size=(64, 24))
  h = x.T @ x
  results = {'magnitude': sparsegpt.prune_by_scores(w, sparsegpt.magnitude_scores(w), sparsity),
             'wanda': sparsegpt.prune_by_scores(w, sparsegpt.wanda_scores(w, h), sparsity),
             'sparsegpt': sparsegpt.sparsegpt(w, h, sparsity)}
  zeros = sparsity.zeros_per_output(64)
  for method, (pruned_w, keep) in results.items():
    assert ((pruned_w == 0) == ~keep).all(), method  # Kept weights are never exactly 0 here.
    assert ((~keep).sum(axis=0) == zeros).all(), method
    if sparsity.structured:  # Every group of m inputs of an output keeps n.
      assert (keep.reshape(64 // sparsity.m, sparsity.m, 24).sum(axis=1) == sparsity.n).all()
  # The calibrated methods lose less of X W than magnitude; SparseGPT's update, least.
  err = {m: sparsegpt.reconstruction_error(w, p, h) for m, (p, _) in results.items()}
  assert err['sparsegpt'] < err['wanda'] < err['magnitude'], err


@pytest.mark.slow
def test_a_pruned_run_is_exactly_sparse_and_loads_like_any_run(pruned, learned_run):
  source = load_run(learned_run)
  for method, (report, out) in pruned.items():
    run = load_run(out)  # On the default mesh of 8 devices: the folder reads like a run.
    assert run.step == source.step and run.cfgs.model == source.cfgs.model
    masks = np.load(os.path.join(out, prune.MASKS))
    names = set()
    for path, name, w in kernels(run.params):
      names.add(name)
      assert (w == 0).mean() == 0.5, (method, path)
      assert ((w != 0) == masks[path]).all(), (method, path)
      assert report['matrices'][path] == 0.5
    assert names == set(PROJECTIONS)
    # Embeddings and norms stay dense and equal to the source's.
    assert np.array_equal(np.asarray(run.params['embed']), np.asarray(source.params['embed']))
    with open(os.path.join(out, prune.REPORT)) as f:
      assert json.load(f)['method'] == method
  # Magnitude changes no kept weight; SparseGPT moves the kept weights to compensate.
  src = {p: w for p, _, w in kernels(source.params)}
  mag = load_run(pruned['magnitude'][1])
  for path, _, w in kernels(mag.params):
    assert np.array_equal(w[w != 0], src[path][w != 0])
  sgpt = load_run(pruned['sparsegpt'][1])
  assert any(not np.allclose(w[w != 0], src[p][w != 0]) for p, _, w in kernels(sgpt.params))


@pytest.mark.slow
@pytest.mark.parametrize('sparsity', [Sparsity(fraction=0.5), Sparsity(n=2, m=4)])
def test_on_the_calibration_inputs_sparsegpt_reconstructs_best(learned_run, sparsity):
  """Every projection of the trained model, on the inputs it reads from the run's own
  training rows: SparseGPT's X W' is closest to X W, and both calibrated methods beat
  magnitude on the MLP's down projection, whose inputs are the least even."""
  run = load_run(learned_run)
  params = jax.tree.map(np.asarray, run.params)
  tokens, segments = calibrate.calibration_rows(run, 16)
  inputs = calibrate.projection_inputs(run.cfgs.model)(params, tokens, segments)
  for block in range(run.cfgs.model.num_layers):
    for (module, sown), names in prune.STAGES:
      h = calibrate.hessian(inputs[f'block_{block}'][module][sown][0])
      for name in names:
        w = as_matrix(name, params[f'block_{block}'][module][name])
        err = {'magnitude': sparsegpt.prune_by_scores(w, sparsegpt.magnitude_scores(w), sparsity),
               'wanda': sparsegpt.prune_by_scores(w, sparsegpt.wanda_scores(w, h), sparsity),
               'sparsegpt': sparsegpt.sparsegpt(w, h, sparsity)}
        err = {m: sparsegpt.reconstruction_error(w, p, h) for m, (p, _) in err.items()}
        assert err['sparsegpt'] < min(err['wanda'], err['magnitude']), (block, name, err)
        if name == 'down':
          assert err['wanda'] < err['magnitude'], (block, name, err)


@pytest.mark.slow
def test_the_scanned_layout_is_pruned_the_same(learned_run, tmp_path):
  run = load_run(learned_run)
  cfg = run.cfgs.model
  scanned = dataclasses.replace(
      run, cfgs=run.cfgs._replace(model=dataclasses.replace(cfg, scan_layers=True)),
      params=stack_layers(jax.tree.map(np.asarray, run.params), cfg.num_layers))
  sparsity = Sparsity(n=2, m=4)
  a = prune.prune_run(run, str(tmp_path / 'a'), 'sparsegpt', sparsity)
  b = prune.prune_run(scanned, str(tmp_path / 'b'), 'sparsegpt', sparsity)
  assert a['matrices'] == b['matrices']
  ma, mb = np.load(tmp_path / 'a' / prune.MASKS), np.load(tmp_path / 'b' / prune.MASKS)
  assert sorted(ma) == sorted(mb) and all(np.array_equal(ma[k], mb[k]) for k in ma)
  stacked = load_run(str(tmp_path / 'b'))
  assert 'blocks' in stacked.params
  flat = unstack_layers(jax.tree.map(np.asarray, stacked.params), cfg.num_layers)
  for path, name, w in kernels(flat):
    groups = as_matrix(name, w).reshape(-1, 4, as_matrix(name, w).shape[1])
    assert ((groups != 0).sum(axis=1) == 2).all(), path


def tree_digest(folder: str) -> str:
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.mark.slow
def test_the_script_and_its_refusals_leave_the_source_alone(learned_run, tmp_path):
  before = tree_digest(learned_run)
  out = tmp_path / 'p24'
  proc = script('prune.py', f'--workdir={learned_run}', f'--out={out}', '--method=wanda',
                '--pattern=2:4', '--calibration_rows=4')
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['sparsity'] == '2:4' and report['calibration']['rows'] == 4
  assert set(report['matrices'].values()) == {0.5}
  refusals = {
      ('--method=wanda', '--sparsity=1.5'): '--sparsity must be in (0, 1)',
      ('--method=wanda', '--pattern=2:3'): '--pattern=2:3: block_0/attn/q has 128 inputs',
      ('--method=wanda', '--sparsity=0.5', '--pattern=2:4'): 'exactly one of --sparsity',
      ('--method=best', '--sparsity=0.5'): '--method must be one of',
      ('--method=structured', '--sparsity=0.5'): '--method=structured takes --d_ff',
      ('--method=structured', '--d_ff=9999'): '--d_ff must be in [1, 256]',
      ('--method=wanda', '--sparsity=0.5', '--d_ff=10'): '--d_ff is for --method=structured',
  }
  for args, message in refusals.items():
    bad = script('prune.py', f'--workdir={learned_run}', f'--out={tmp_path / "bad"}', *args,
                 check=False)
    assert bad.returncode == 1 and message in bad.stderr, (args, bad.stderr)
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  again = script('prune.py', f'--workdir={learned_run}', f'--out={out}', '--method=magnitude',
                 '--sparsity=0.5', check=False)
  assert again.returncode == 1 and f'--out: {out} exists' in again.stderr
  assert not (tmp_path / 'bad').exists()
  assert sorted(os.listdir(tmp_path)) == ['p24']  # No temporary folder left behind.
  # Training cannot resume a pruned run as if it were its own (it would regrow).
  resume = script('train.py', '--config=configs/tiny.py', f'--config.workdir={out}',
                  check=False)
  assert resume.returncode == 1 and 'holds pruned weights' in resume.stderr
  assert tree_digest(learned_run) == before


@pytest.mark.slow
def test_a_2_4_run_exports_to_hugging_face_with_its_zeros(learned_run, tmp_path):
  from lm.export import hf_export
  from lm.export.hf_import import read_safetensors

  out = tmp_path / 'p24'
  prune.prune_run(load_run(learned_run), str(out), 'magnitude', Sparsity(n=2, m=4))
  hf_export.export(str(out), str(tmp_path / 'hf'))
  state = read_safetensors(str(tmp_path / 'hf'))
  projections = [k for k in state if k.endswith('proj.weight')]
  assert len(projections) == 7 * 2
  for key in projections:
    w = state[key]  # (outputs, inputs): groups of four inputs hold two zeros.
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(axis=-1) == 2).all(), key


LEARNED_MODEL = ('--config.model.vocab_size=512', '--config.seq_len=64',
                 '--config.model.num_layers=2', '--config.model.d_model=128',
                 '--config.model.d_ff=256', '--config.model.num_heads=4',
                 '--config.model.num_kv_heads=2', '--config.data.eval_fraction=0.05')


@pytest.mark.slow
def test_recovery_with_hold_zeros_keeps_every_pruned_weight_at_zero(pruned, tmp_path):
  source = pruned['magnitude'][1]
  masks = np.load(os.path.join(source, prune.MASKS))
  before = {p: w for p, _, w in kernels(load_run(source).params)}
  for hold in (True, False):
    workdir = tmp_path / f'hold_{hold}'
    script('train.py', '--config=configs/tiny.py', f'--config.init_from={source}',
           f'--config.workdir={workdir}', '--config.steps=20', '--config.eval_every=0',
           f'--config.optimizer.hold_zeros={hold}', *LEARNED_MODEL, env=one_device_env())
    after = {p: w for p, _, w in kernels(load_run(str(workdir)).params)}
    for path, keep in masks.items():
      assert not np.array_equal(after[path][keep], before[path][keep])  # It trained.
      regrown = np.count_nonzero(after[path][~keep])
      assert (regrown == 0) if hold else (regrown > 0), (hold, path, regrown)
  # Its masks live in the optimizer state: resuming without them is refused, untouched.
  held = tmp_path / 'hold_True'
  steps = sorted(os.listdir(held / 'checkpoints'))
  bad = script('train.py', '--config=configs/tiny.py', f'--config.workdir={held}',
               '--config.steps=30', '--config.optimizer.hold_zeros=false', *LEARNED_MODEL,
               env=one_device_env(), check=False)
  assert bad.returncode == 1
  assert 'optimizer.hold_zeros: true in checkpoint, false now' in bad.stderr
  assert sorted(os.listdir(held / 'checkpoints')) == steps


def test_hold_zeros_needs_init_from():
  from configs import tiny
  from lm.config import parse

  cfg = tiny.get_config()
  cfg.optimizer.hold_zeros = True
  with pytest.raises(ValueError, match='^optimizer.hold_zeros: .*set init_from'):
    parse(cfg)


def test_structured_sizes_are_checked():
  from lm.model.config import ModelConfig

  cfg = ModelConfig(d_model=64, num_heads=8, num_kv_heads=4, d_ff=128, num_layers=4)
  new = structured.Shape(d_ff=64, num_kv_heads=2, num_layers=3).resolve(cfg)
  assert (new.d_ff, new.num_kv_heads, new.num_heads, new.num_layers) == (64, 2, 4, 3)
  assert new.head_size == cfg.head_size == 8  # Pinned, not d_model / the new num_heads.
  for shape, message in ((structured.Shape(d_ff=256), r'--d_ff must be in \[1, 128\]'),
                         (structured.Shape(num_layers=-1), '--num_layers'),
                         (structured.Shape(), 'needs a smaller')):
    with pytest.raises(ValueError, match=message):
      shape.resolve(cfg)


@pytest.mark.slow
def test_structured_pruning_drops_what_does_nothing_and_exports(learned_run, tmp_path):
  import torch
  import transformers

  from lm.eval import sampling
  from lm.export import hf_export

  run = load_run(learned_run)
  params = jax.tree.map(np.array, run.params)  # Writable copies.
  # Hand-made dead parts: MLP unit 5 of every layer, and the whole of layer 1 (both its
  # residual branches zeroed, so the block passes the stream through unchanged).
  for block in ('block_0', 'block_1'):
    for name in ('gate', 'up'):
      params[block]['mlp'][name][:, 5] = 0
  params['block_1']['attn']['o'][:] = 0
  params['block_1']['mlp']['down'][:] = 0
  run = dataclasses.replace(run, params=params)
  cfg = run.cfgs.model
  out = tmp_path / 'small'
  report = prune.prune_run(run, str(out), prune.STRUCTURED, shape=structured.Shape(
      d_ff=cfg.d_ff - 1, num_kv_heads=1, num_layers=1))
  assert report['kept']['layers'] == [0]
  assert 5 not in report['kept']['mlp_units'][0]
  small = load_run(str(out))
  new = small.cfgs.model
  assert (new.num_layers, new.d_ff, new.num_kv_heads, new.num_heads) == (1, 255, 1, 2)
  assert report['params_after'] == sum(np.size(x) for x in jax.tree.leaves(small.params))
  # The kept weights are the source's, sliced.
  units, group = report['kept']['mlp_units'][0], report['kept']['kv_groups'][0]
  got = jax.tree.map(np.asarray, small.params['block_0'])
  np.testing.assert_array_equal(got['mlp']['down'], params['block_0']['mlp']['down'][units])
  np.testing.assert_array_equal(got['attn']['k'], params['block_0']['attn']['k'][:, group])
  np.testing.assert_array_equal(got['attn']['q'],
                                params['block_0']['attn']['q'][:, [2 * group[0], 2 * group[0] + 1]])
  # It exports, and transformers generates its greedy tokens.
  hf_export.export(str(out), str(tmp_path / 'hf'))
  prompt = 'import os\n'
  ours = sampling.complete(small, prompt, sampling.SamplingConfig(max_new_tokens=8,
                                                                  temperature=0))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'hf'), attn_implementation='eager').float().eval()
  with torch.no_grad():
    theirs = model.generate(torch.tensor([ours['prompt_ids']]), do_sample=False,
                            max_new_tokens=8, min_new_tokens=8)
  assert theirs[0, len(ours['prompt_ids']):].tolist() == ours['ids']
