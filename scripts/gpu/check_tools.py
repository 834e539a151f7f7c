"""Small helpers for scripts/gpu_check.sh: each prints one figure and exits 0 (holds) or 1.

  check_tools.py wait_lines METRICS N SECONDS PID   # N train lines written, PID alive
  check_tools.py stopped RUN LOG                    # clean stop: JSON says so, checkpoint
  check_tools.py same_losses A B                    # metrics.jsonl losses bit for bit
  check_tools.py close_losses A B REL_TOL           # losses within a relative tolerance
  check_tools.py trained RUN                        # finite losses, in-loop eval lines
  check_tools.py eval_close LOG_A LOG_B REL_TOL     # eval.py perplexities
  check_tools.py same_generation LOG_A LOG_B STRICT # generate.py greedy ids
  check_tools.py resumed LOG FROM TO                # a run resumed at FROM and reached TO

Figures are one line each, for the `OK name figure` / `FAILED name figure` summary.
Only the standard library is imported (and lm.run.checkpoint for `stopped`), so each call is
quick.
"""

import json
import math
import os
import sys
import time


def records(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(run):
  """step -> loss of the train lines of RUN/metrics.jsonl."""
  return {r['step']: r['loss'] for r in records(os.path.join(run, 'metrics.jsonl'))
          if 'loss' in r}


def last_json(log):
  """The last line of a script's stdout that parses as a JSON object."""
  with open(log, encoding='utf-8', errors='replace') as f:
    lines = f.read().splitlines()
  for line in reversed(lines):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise SystemExit(f'no JSON line in {log}')


def rel(a, b):
  return abs(a - b) / max(abs(a), abs(b), 1e-12)


def wait_lines(metrics, n, seconds, pid):
  n, deadline, pid = int(n), time.time() + float(seconds), int(pid)
  count = 0
  while time.time() < deadline:
    if os.path.exists(metrics):
      with open(metrics, encoding='utf-8') as f:
        count = sum('"loss"' in line for line in f)
      if count >= n:
        return True, f'{count} train lines written'
    try:
      os.kill(pid, 0)
    except OSError:
      return False, f'the run ended with {count} train lines, before {n}'
    time.sleep(0.05)
  return False, f'{count} train lines after {seconds}s, waited for {n}'


def stopped(run, log):
  sys.path.insert(0, os.getcwd())
  from lm.run.checkpoint import committed_steps
  result = last_json(log)
  steps = committed_steps(run)
  step = result.get('step')
  ok = bool(result.get('stopped_early')) and step in steps
  return ok, (f'stopped at step {step} (stopped_early={result.get("stopped_early")}), '
              f'committed checkpoints {steps}')


def same_losses(a, b):
  la, lb = losses(a), losses(b)
  steps = sorted(set(la) | set(lb))
  missing = [s for s in steps if s not in la or s not in lb]
  if missing:
    return False, f'steps missing on one side: {missing[:5]}'
  diff = [s for s in steps if la[s] != lb[s]]  # Python floats from JSON: bit for bit.
  if not diff:
    return True, f'{len(steps)}/{len(steps)} step losses bit-identical'
  worst = max(rel(la[s], lb[s]) for s in diff)
  return False, (f'{len(steps) - len(diff)}/{len(steps)} equal; first differs at step '
                 f'{diff[0]} ({la[diff[0]]!r} vs {lb[diff[0]]!r}), max rel diff {worst:.2e}')


def close_losses(a, b, tol):
  la, lb = losses(a), losses(b)
  steps = sorted(set(la) & set(lb))
  if not steps or len(steps) != len(set(la) | set(lb)):
    return False, f'steps differ: {len(la)} vs {len(lb)} train lines'
  diffs = {s: rel(la[s], lb[s]) for s in steps}
  worst = max(diffs, key=diffs.get)
  ok = diffs[worst] <= float(tol)
  return ok, (f'max rel diff {diffs[worst]:.2e} at step {worst} (tol {float(tol):.0e}), '
              f'step {steps[0]}: {diffs[steps[0]]:.2e}, last loss {la[steps[-1]]:.4f} vs '
              f'{lb[steps[-1]]:.4f}, {len(steps)} steps')


def trained(run):
  recs = records(os.path.join(run, 'metrics.jsonl'))
  train = [r for r in recs if 'loss' in r]
  evals = [r for r in recs if 'eval_loss' in r]
  finite = all(math.isfinite(r['loss']) for r in train) and all(
      math.isfinite(r['eval_loss']) for r in evals)
  ok = finite and bool(train) and bool(evals) and train[-1]['loss'] < train[0]['loss']
  tps = [r['tokens_per_sec'] for r in train[len(train) // 2:] if r.get('tokens_per_sec')]
  mfu = [r['mfu'] for r in train[len(train) // 2:] if r.get('mfu') is not None]
  last_eval = f'{evals[-1]["eval_loss"]:.4f}' if evals else 'none'
  median_tps = sorted(tps)[len(tps) // 2] if tps else 0
  return ok, (f'loss {train[0]["loss"]:.3f} -> {train[-1]["loss"]:.3f} in {len(train)} steps, '
              f'in-loop eval at steps {[r["step"] for r in evals]} (last eval_loss '
              f'{last_eval}), median tokens/s of the 2nd half {median_tps:.0f}'
              + (f', mfu {sorted(mfu)[len(mfu) // 2]:.3f}' if mfu else ''))


def eval_close(a, b, tol):
  ja, jb = last_json(a), last_json(b)
  d = rel(ja['perplexity'], jb['perplexity'])
  return d <= float(tol), (f'perplexity {ja["perplexity"]:.4f} vs {jb["perplexity"]:.4f} '
                           f'(rel diff {d:.2e}, tol {float(tol):.0e}), {ja["tokens"]} tokens, '
                           f'step {ja["step"]}')


def same_generation(a, b, strict):
  ia, ib = last_json(a)['ids'], last_json(b)['ids']
  if ia == ib:
    return True, f'{len(ia)} greedy tokens identical'
  first = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
  figure = f'greedy ids differ from new token {first} of {len(ia)}/{len(ib)}'
  if strict == '1':
    return False, figure
  return True, figure + ' (bf16 compute: reported, not required)'


def resumed(log, start, end):
  with open(log, encoding='utf-8', errors='replace') as f:
    text = f.read()
  result = last_json(log)
  said = f'resumed from step {start}' in text
  loss = result.get('loss')
  ok = said and result.get('step') == int(end) and loss is not None and math.isfinite(loss)
  return ok, (f'{"resumed from step " + start if said else "no resume line"}, reached step '
              f'{result.get("step")}, loss {loss}')


def main():
  cmd, *args = sys.argv[1:]
  ok, figure = globals()[cmd](*args)
  print(figure)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
