"""scripts/sweep.py: the grid, its errors, a 2 x 2 sweep end to end (skip, resume,
refusal of another sweep), and the power-law fit over the compute frontier."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

from lm.experiments import scaling_fit, sweep, sweep_runner
from tests.helpers import one_device_env, read_metrics, script

# A model small enough that a point trains in seconds; checkpoints every step, so a
# point can be put back to step 1 as a kill would leave it, and evaluates every step, so
# each point gives the compute frontier two evaluations.
SMALL = ('--config.model.vocab_size=512', '--config.model.num_layers=1',
         '--config.model.num_heads=2', '--config.model.num_kv_heads=2',
         '--config.model.d_ff=64', '--config.seq_len=32', '--config.batch_size=4',
         '--config.eval_batches=1', '--config.data.eval_fraction=0.05',
         '--config.log_every=1', '--config.checkpoint_every=1', '--config.eval_every=1')
GRID = ('--grid=model.d_model=32,64', '--grid=optimizer.lr=1e-3,1e-2')
NAMES = ['d_model=32,lr=1e-3', 'd_model=32,lr=1e-2', 'd_model=64,lr=1e-3',
         'd_model=64,lr=1e-2']


def _sweep(out, tokenizer, *args, check=True):
  return script('sweep.py', '--config=configs/tiny.py', f'--out={out}', '--steps=2',
                f'--config.data.tokenizer={tokenizer}', *SMALL, *args,
                env=one_device_env(), check=check)


@pytest.fixture(scope='module')
def swept(tmp_path_factory, tokenizer):
  """A 2 x 2 sweep run once, two points at a time: (out folder, its stdout)."""
  out = tmp_path_factory.mktemp('sweep') / 'out'
  return out, _sweep(out, tokenizer, *GRID, '--parallel=2').stdout


@pytest.mark.slow
def test_sweep_writes_a_run_folder_and_a_result_line_per_point(swept):
  out, stdout = swept
  assert 'skipped 0 finished; 4 to train' in stdout
  rows = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
  assert [r['name'] for r in rows] == NAMES
  assert set(rows[0]) == {'name', 'model.d_model', 'optimizer.lr', 'params', 'tokens',
                          'flops', 'final_eval_loss', 'wall_s', 'status'}
  assert [(r['model.d_model'], r['optimizer.lr']) for r in rows] == [
      (32, 1e-3), (32, 1e-2), (64, 1e-3), (64, 1e-2)]
  from lm.model import flops
  from lm.run.folder import RunFolder
  for row in rows:
    workdir = out / 'runs' / row['name']
    cfgs = RunFolder(str(workdir)).config()  # What train.py really ran.
    assert (cfgs.model.d_model, cfgs.optimizer.lr) == (row['model.d_model'], row['optimizer.lr'])
    assert cfgs.model.num_layers == 1 and cfgs.run.steps == 2  # fixed overrides, --steps
    assert row['status'] == 'done' and row['wall_s'] > 0
    assert row['tokens'] == 2 * 4 * 32
    assert row['params'] == flops.num_params(cfgs.model)
    assert row['flops'] == row['tokens'] * flops.flops_per_token(cfgs.model, 32)
    evals = [m for m in read_metrics(workdir) if 'eval_loss' in m]
    assert row['final_eval_loss'] == evals[-1]['eval_loss'] and evals[-1]['step'] == 2
  assert rows[2]['params'] > rows[0]['params'] and rows[2]['flops'] > rows[0]['flops']
  for plot in ('loss_vs_lr.png', 'loss_vs_compute.png'):
    assert (out / plot).read_bytes()[:4] == b'\x89PNG'
  # The frontier is drawn from all eight evaluations (two steps of four points): each is
  # one of them, at its step's FLOPs, cheaper ones first, each lower than all cheaper.
  fit = json.loads((out / 'fit.json').read_text())
  evals = {(r['name'], m['step']): (m['step'] * r['flops'] / 2, m['eval_loss'])
           for r in rows for m in read_metrics(out / 'runs' / r['name']) if 'eval_loss' in m}
  assert sorted({step for _, step in evals}) == [1, 2] and len(evals) == 8
  frontier = fit['frontier']
  for e in frontier:
    assert evals[e['name'], e['step']] == pytest.approx((e['flops'], e['eval_loss']))
  assert [e['flops'] for e in frontier] == sorted(e['flops'] for e in frontier)
  assert all(a['eval_loss'] > b['eval_loss'] for a, b in zip(frontier, frontier[1:]))
  for c, loss in evals.values():  # Nothing beats the frontier at its own compute or less.
    assert min(e['eval_loss'] for e in frontier if e['flops'] <= c * (1 + 1e-9)) <= loss
  # Fewer than four frontier points cannot pin three parameters: said, not fitted.
  if len(frontier) < 4:
    assert 'underdetermined' in stdout and fit['fit'] is None
  else:
    assert fit['fit']['points'] == len(frontier)


@pytest.mark.slow
def test_a_second_run_skips_finished_points_and_another_grid_is_refused(swept, tokenizer):
  out, _ = swept
  metrics = {n: os.stat(out / 'runs' / n / 'metrics.jsonl').st_mtime_ns for n in NAMES}
  attempts = (out / 'attempts.jsonl').read_text()
  again = _sweep(out, tokenizer, *GRID)
  assert 'skipped 4 finished; 0 to train' in again.stdout
  assert (out / 'attempts.jsonl').read_text() == attempts  # no train.py started
  assert {n: os.stat(out / 'runs' / n / 'metrics.jsonl').st_mtime_ns for n in NAMES} == metrics
  spec = (out / 'sweep.json').read_text()
  other = _sweep(out, tokenizer, '--grid=model.d_model=32,128', GRID[1], check=False)
  assert other.returncode == 1
  [line] = other.stderr.strip().splitlines()
  assert line.startswith(f"error: {out} holds another sweep (grid: [['model.d_model', ['32', "
                         "'64']], ") and "['32', '128']]" in line, line
  assert (out / 'sweep.json').read_text() == spec
  assert not (out / 'runs' / 'd_model=128,lr=1e-3').exists()


@pytest.mark.slow
def test_an_interrupted_point_resumes_and_the_others_are_skipped(swept, tokenizer):
  out, _ = swept
  name = NAMES[3]
  workdir = out / 'runs' / name
  # As a kill after step 1's checkpoint leaves it: no step 2 checkpoint, no step 2 lines.
  shutil.rmtree(workdir / 'checkpoints' / '2')
  kept = [line for line in (workdir / 'metrics.jsonl').read_text().splitlines()
          if json.loads(line)['step'] <= 1]
  (workdir / 'metrics.jsonl').write_text('\n'.join(kept) + '\n')
  proc = _sweep(out, tokenizer, *GRID)
  assert 'skipped 3 finished; 1 to train' in proc.stdout and f'[1/1] {name}: done' in proc.stdout
  log = (out / 'logs' / f'{name}.log').read_text()
  assert 'start: resumed from step 1' in log  # train.py resumed; it did not start over.
  assert [m['step'] for m in read_metrics(workdir) if 'loss' in m] == [1, 2]
  rows = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
  row = rows[3]
  assert row['status'] == 'done' and row['final_eval_loss'] is not None
  attempts = [json.loads(line) for line in (out / 'attempts.jsonl').read_text().splitlines()]
  mine = [a for a in attempts if a['name'] == name]
  assert len(attempts) == 5 and len(mine) == 2
  assert row['wall_s'] == pytest.approx(sum(a['wall_s'] for a in mine), abs=0.02)


def _config(tokenizer):
  """tiny.py with SMALL's overrides, as scripts/sweep.py reads them."""
  from configs import tiny
  from lm.config import set_key
  config = tiny.get_config()
  for arg in (*SMALL, f'--config.data.tokenizer={tokenizer}'):
    set_key(config, *arg.removeprefix('--config.').split('=', 1))
  return config


def _points(out, tokenizer):
  """The swept grid's Spec and Points in `out`, made in process as scripts/sweep.py does."""
  config = _config(tokenizer)
  spec = sweep.Spec('configs/tiny.py', sweep.parse_grid([g[len('--grid='):] for g in GRID]),
                    (), 2)
  return spec, sweep.make_points(config, spec, str(out))


@pytest.mark.slow
def test_a_run_folder_of_another_config_is_refused_not_skipped(swept, tokenizer, tmp_path):
  """A config file edited after a sweep began: its finished points must not be skipped
  into the table as if they had run what the file says now."""
  out = tmp_path / 'out'
  shutil.copytree(swept[0], out)
  attempts = (out / 'attempts.jsonl').read_text()
  config = out / 'runs' / NAMES[0] / 'config.json'
  ran = json.loads(config.read_text())
  ran['optimizer']['b2'] = 0.99  # As if the file had said so when this point trained.
  config.write_text(json.dumps(ran))
  proc = _sweep(out, tokenizer, *GRID, check=False)
  assert proc.returncode == 1
  [line] = proc.stderr.strip().splitlines()
  assert f'{out / "runs" / NAMES[0]} ran another config' in line
  assert 'optimizer.b2: 0.99 there, 0.95 now' in line, line
  assert (out / 'attempts.jsonl').read_text() == attempts  # no train.py started
  # The table keeps its loss but does not call it done (nor fit it); the others are.
  rows = sweep.write_results(str(out), _points(out, tokenizer)[1])
  assert [r['status'] for r in rows] == ['config_changed', 'done', 'done', 'done']
  assert rows[0]['final_eval_loss'] is not None


@pytest.mark.slow
def test_a_point_that_ran_another_config_mid_sweep_is_a_failure(swept, tokenizer, tmp_path,
                                                                 monkeypatch):
  """The config file edited while a sweep runs: a point whose train.py then ran another
  config is counted failed and said so, not reported done with its loss."""
  out = tmp_path / 'out'
  shutil.copytree(swept[0], out)
  spec, points = _points(out, tokenizer)
  ran = out / 'runs' / NAMES[1] / 'config.json'
  # In place of train.py: a run that ends having trained with another b2 in its folder.
  edit = (f'import json, pathlib; p = pathlib.Path({str(ran)!r}); c = json.loads(p.read_text());'
          f" c['optimizer']['b2'] = 0.99; p.write_text(json.dumps(c))")
  monkeypatch.setattr(sweep, 'child_argv', lambda spec, point: [sys.executable, '-c', edit])
  said = []
  runner = sweep_runner.Runner(spec, str(out), [dict(os.environ)], said.append)
  runner.run([points[1]])
  assert runner.failed == [NAMES[1]]
  assert 'trained another config than the sweep began with (optimizer.b2: 0.99 there, ' \
         '0.95 now)' in said[-1], said


def test_keys_linked_in_the_config_move_together(tokenizer, tmp_path):
  """d_ff linked to d_model in a config file (an ml_collections reference): each point's
  MLP grows with its width, and a value given for d_ff itself breaks the link."""
  config = _config(tokenizer)
  config.model.d_ff = config.model.get_ref('d_model') * 3
  spec = sweep.Spec('configs/tiny.py', sweep.parse_grid(['model.d_model=32,64']), (), 2)
  points = sweep.make_points(config, spec, str(tmp_path))
  assert [(p.cfgs.model.d_model, p.cfgs.model.d_ff) for p in points] == [(32, 96), (64, 192)]
  spec = sweep.Spec('configs/tiny.py',
                    sweep.parse_grid(['model.d_model=32,64', 'model.d_ff=50']), (), 2)
  points = sweep.make_points(config, spec, str(tmp_path))
  assert [(p.cfgs.model.d_model, p.cfgs.model.d_ff) for p in points] == [(32, 50), (64, 50)]


@pytest.mark.slow
def test_a_bad_grid_is_one_line_before_anything_is_written(tmp_path, tokenizer):
  # One script call (each costs seconds of imports); test_grid_parse_errors and
  # test_bad_values_and_points_are_named cover the other mistakes in process.
  proc = _sweep(tmp_path / 'out', tokenizer, '--grid=model.d_model=64',
                '--grid=model.flash=1,2', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      'error: --grid model.flash: no config key model.flash']
  assert not (tmp_path / 'out').exists()


def test_an_out_that_is_a_file_is_named_and_kept(tmp_path, tokenizer):
  out = tmp_path / 'a_file'
  out.write_text('mine')
  spec = sweep.Spec('configs/tiny.py', sweep.parse_grid(['model.d_model=32']), (), 1)
  with pytest.raises(ValueError, match=rf'^--out: {out} is a file, not a folder$'):
    sweep_runner.run_sweep(_config(tokenizer), spec, str(out))
  assert out.read_text() == 'mine'


@pytest.mark.parametrize('specs,message', [
    (['model.d_model=64,,128'], 'no empty value'),
    (['=1,2'], 'expected KEY=V1,V2'),
    (['model.d_model=64,64'], 'listed twice'),
    (['model.d_model=64', 'model.d_model=128'], 'given twice'),
    (['workdir=a,b'], 'sets workdir itself'),
    ([], 'at least one --grid'),
])
def test_grid_parse_errors(specs, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid(specs)


@pytest.mark.parametrize('grid,message', [
    ('model.d_model=64,abc', "--grid model.d_model: cannot set model.d_model='abc'"),
    ('model.num_kv_heads=4,3', 'point num_kv_heads=3: '),
    ('optimizer.lr=1e-3,0.001', '--grid optimizer.lr: 1e-3 and 0.001 are one value'),
    ('data.files=a/b,a_b', 'data.files=a/b and data.files=a_b would share the run folder'),
])
def test_bad_values_and_points_are_named(tmp_path, grid, message):
  from configs import tiny
  spec = sweep.Spec('configs/tiny.py', sweep.parse_grid([grid]), (), None)
  with pytest.raises(ValueError, match=message):
    sweep.make_points(tiny.get_config(), spec, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_point_names_and_fixed_overrides():
  assert sweep.point_name([('model.d_model', '64'), ('optimizer.lr', '1e-3')]) == \
      'd_model=64,lr=1e-3'
  assert sweep.point_name([('optimizer.lr', '1'), ('a.lr', "x/'y")]) == \
      "optimizer.lr=1,a.lr=x__y"
  grid = sweep.parse_grid(['optimizer.lr=1,2'])
  argv = ['sweep.py', '--config=c.py', '--config.seed', '3', '--noconfig.model.remat',
          '--config.steps=5', '--out=x']
  assert sweep.fixed_overrides(argv, grid) == (
      '--config.seed=3', '--noconfig.model.remat', '--config.steps=5')
  with pytest.raises(ValueError, match='both a --grid'):
    sweep.fixed_overrides(['s', '--config.optimizer.lr=3'], grid)
  with pytest.raises(ValueError, match='sets workdir itself'):
    sweep.fixed_overrides(['s', '--config.workdir=runs/x'], grid)


def test_parallel_slots_share_out_the_devices():
  envs = sweep_runner.slot_envs(2, ['0', '1', '2', '3'], {'A': '1'})
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['0,1', '2,3'] and envs[0]['A'] == '1'
  with pytest.raises(ValueError, match='more than the 2 GPU'):
    sweep_runner.slot_envs(3, ['0', '1'], {})
  cpu = sweep_runner.slot_envs(2, [], {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert [e['XLA_FLAGS'] for e in cpu] == ['--xla_force_host_platform_device_count=4'] * 2
  assert sweep_runner.slot_envs(1, ['0', '1'], {'A': '1'}) == [{'A': '1'}]  # all for one


def test_visible_gpus_come_from_the_flag_else_cuda_visible_devices(monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2, 3')
  assert sweep_runner.visible_gpus('') == ['2', '3']
  assert sweep_runner.visible_gpus('5,6,7') == ['5', '6', '7']


def _synthetic(noise, seed=0):
  c = np.geomspace(1e13, 1e17, 8)
  rng = np.random.default_rng(seed)
  return c, 1.8 + 400.0 * c ** -0.2 + rng.normal(0, noise, c.shape)


def test_power_law_fit_recovers_known_parameters_and_its_errors_shrink_with_the_noise():
  exact = scaling_fit.fit_power_law(*_synthetic(0.0))
  assert exact.E == pytest.approx(1.8, rel=1e-6) and exact.alpha == pytest.approx(0.2, rel=1e-6)
  assert exact.A == pytest.approx(400.0, rel=1e-5) and exact.rmse < 1e-9
  noisy, quiet = (scaling_fit.fit_power_law(*_synthetic(n)) for n in (0.02, 0.002))
  for fit in (noisy, quiet):
    for name, true in (('E', 1.8), ('A', 400.0), ('alpha', 0.2)):
      assert abs(getattr(fit, name) - true) < 4 * getattr(fit, f'{name}_err'), (name, fit)
  for name in ('E', 'A', 'alpha'):
    assert 0 < getattr(quiet, f'{name}_err') < getattr(noisy, f'{name}_err') / 5
  assert 'E = 1.8' in quiet.describe() and '±' in quiet.describe()
  assert quiet.determined and 'poorly' not in quiet.describe()


def test_a_fit_the_budgets_do_not_pin_down_says_so():
  # Losses falling in a straight line on a log axis: E and A trade off as alpha -> 0.
  c = np.geomspace(1e10, 1e11, 4)
  fit = scaling_fit.fit_power_law(c, 5.0 - 0.1 * np.log(c / 1e10) + [0, 0.01, -0.01, 0])
  assert not fit.determined and 'poorly determined' in fit.describe()
  assert fit.E_err > abs(fit.E) or fit.E < 0


def test_power_law_fit_agrees_with_scipy_curve_fit():
  optimize = pytest.importorskip('scipy.optimize')
  c, y = _synthetic(0.02, seed=1)
  fit = scaling_fit.fit_power_law(c, y)
  x0 = np.exp(np.mean(np.log(c)))  # scipy needs the same scaling to converge
  (e, a0, alpha), cov = optimize.curve_fit(lambda x, e, a, al: e + a * x ** -al, c / x0, y,
                                           p0=(fit.E, fit.A * x0 ** -fit.alpha, fit.alpha))
  assert (fit.E, fit.alpha) == pytest.approx((e, alpha), rel=1e-4)
  assert fit.A == pytest.approx(a0 * x0 ** alpha, rel=1e-4)
  assert (fit.E_err, fit.alpha_err) == pytest.approx(
      (math.sqrt(cov[0, 0]), math.sqrt(cov[2, 2])), rel=1e-3)


def test_fewer_than_four_budgets_are_not_fitted():
  c, y = _synthetic(0.0)
  with pytest.raises(ValueError, match='underdetermined'):
    scaling_fit.fit_power_law(c[:3], y[:3])
  assert 'underdetermined' in scaling_fit.underdetermined(3)
  assert scaling_fit.underdetermined(4) is None


def test_best_point_of_each_budget():
  # Budgets of 1e9 (two points within the tolerance), 2e9 and 4e9; None and NaN are
  # points that did not finish or diverged.
  flops = [2e9, 1e9, 1e9 * (1 + 1e-5), 4e9, 2e9, 2e9, 8e9]
  losses = [2.5, 3.0, 2.9, 2.6, None, 2.4, math.nan]
  assert scaling_fit.best_per_budget(flops, losses) == [2, 5, 3]
  # The frontier drops the 4e9 budget: 2.6 is no better than 2.4 at half the compute.
  assert scaling_fit.compute_frontier(flops, losses) == [2, 5]
  assert scaling_fit.compute_frontier(flops + [16e9], losses + [2.3]) == [2, 5, 7]


def _pids_running(needle: str) -> list[int]:
  """Live processes (not zombies) whose command line holds `needle` (Linux's /proc)."""
  pids = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        cmdline = f.read()
      with open(f'/proc/{entry}/stat', encoding='ascii') as f:
        state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
      continue
    if needle.encode() in cmdline and state != 'Z':
      pids.append(int(entry))
  return pids


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the parent-death signal')
def test_a_killed_sweep_stops_its_point_which_saves_and_frees_its_folder(tmp_path, tokenizer):
  import signal
  import subprocess
  import time

  from tests.helpers import REPO
  out = tmp_path / 'out'
  argv = [sys.executable, os.path.join(REPO, 'scripts', 'sweep.py'), '--config=configs/tiny.py',
          f'--out={out}', '--steps=100000', f'--config.data.tokenizer={tokenizer}', *SMALL,
          '--config.checkpoint_every=0', '--config.eval_every=0', '--grid=model.d_model=32']
  sweep_proc = subprocess.Popen(argv, cwd=REPO, env=one_device_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
  workdir = out / 'runs' / 'd_model=32'
  deadline = time.time() + 120
  while time.time() < deadline and not (
      (workdir / 'metrics.jsonl').exists() and (workdir / 'metrics.jsonl').read_text()):
    assert sweep_proc.poll() is None
    time.sleep(0.2)
  children = _pids_running(f'--config.workdir={workdir}')
  assert children, 'the point is not running'
  sweep_proc.send_signal(signal.SIGKILL)
  sweep_proc.wait()
  deadline = time.time() + 60
  while any(map(_alive, children)) and time.time() < deadline:
    time.sleep(0.2)
  left = [pid for pid in children if _alive(pid)]
  for pid in left:  # Not to outlive the test, whatever it asserts.
    os.kill(pid, signal.SIGKILL)
  assert not left, 'the point trained on after its sweep was killed'
  log = (out / 'logs' / 'd_model=32.log').read_text()
  assert 'signal 15' in log or 'stopping after this step' in log, log[-2000:]
  assert [d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()], log[-3000:]
