"""JSON lines for scripts/gpu_bench.sh, and the table it prints.

  bench_table.py nanogpt --dir=.nanogpt --batch_size=12 --block_size=1024 [--cpu] >>OUT
      Runs nanoGPT's own bench.py (unmodified, in this process, from its folder) and
      prints one JSON line from what it printed: tokens/s from its "time per iteration",
      MFU rescaled from its A100 figure to this device's peak, compile seconds (from
      "Compiling model..." to the first loss line, less one timed step), and the CUDA
      allocator's peak. --cpu: on a CPU-only torch (a dry run), with --compile=False;
      --tiny: its GPTConfig at 2 layers of width 64 (a dry run).
  bench_table.py lm --batch_size=B --seq_len=T [--prefix=P] <bench.py output >>OUT
      Normalises scripts/bench.py's JSON lines: adds "system": "lm", "batch_size",
      "seq_len" (from a "batch_size=N" variant where there is one) and "device".
  bench_table.py table OUT
      Side by side: tokens/s, MFU against the device's dense bf16 peak, compile seconds,
      peak bytes, and lm's tokens/s over nanoGPT's at the same batch and length.

Every JSON line has "system", "config", "batch_size", "seq_len", "tokens_per_sec",
"mfu", "compile_s" and "device".
"""

import argparse
import contextlib
import json
import math
import os
import re
import runpy
import sys
import time

# nanoGPT's estimate_mfu divides by an A100's bf16 peak.
NANOGPT_PEAK = 312e12


def peak_flops(device_name):
  """Dense bf16 peak of a device by name, from lm/model/flops.py's table; None if unknown."""
  sys.path.insert(0, os.getcwd())
  from lm.model.flops import BF16_PEAK_FLOPS
  for name, peak in BF16_PEAK_FLOPS:
    if name.lower() in device_name.lower():
      return peak
  return None


class _Lines:
  """A stdout that passes text on to stderr and keeps each line with its time."""

  def __init__(self):
    self.lines, self._part = [], ''

  def write(self, text):
    sys.stderr.write(text)
    self._part += text
    *done, self._part = self._part.split('\n')
    self.lines += [(time.perf_counter(), line) for line in done]
    return len(text)

  def flush(self):
    sys.stderr.flush()


def nanogpt(args):
  import torch

  cpu = args.cpu or not torch.cuda.is_available()
  argv = ['bench.py', f'--batch_size={args.batch_size}', f'--block_size={args.block_size}',
          '--real_data=False', f'--compile={not cpu and args.compile}']
  if cpu:
    argv.append('--device=cpu')
    torch.cuda.synchronize = lambda *a, **k: None  # bench.py calls it unconditionally.
  device = 'cpu' if cpu else torch.cuda.get_device_name(0)
  config = 'gpt2_124M'
  if args.tiny:  # A dry run: nanoGPT's own code at a toy width, through its own class.
    sys.path.insert(0, os.path.abspath(args.dir))
    import model as nanogpt_model

    class Tiny(nanogpt_model.GPTConfig):
      def __init__(self, **kw):
        super().__init__(**{**kw, 'n_layer': 2, 'n_head': 2, 'n_embd': 64})

    nanogpt_model.GPTConfig = Tiny
    config = 'tiny_2x64'
  out = _Lines()
  cwd, old_argv = os.getcwd(), sys.argv
  t0 = time.perf_counter()
  error = None
  try:
    os.chdir(args.dir)  # bench.py reads configurator.py and imports model from there.
    sys.path.insert(0, os.getcwd())
    sys.argv = argv
    with contextlib.redirect_stdout(out):
      runpy.run_path('bench.py', run_name='__main__')
  except BaseException as e:  # noqa: BLE001 - report it in the JSON line, then fail.
    error = f'{type(e).__name__}: {e}'
  finally:
    os.chdir(cwd)
    sys.argv = old_argv
  wall = time.perf_counter() - t0
  text = '\n'.join(line for _, line in out.lines)
  m = re.search(r'time per iteration: ([\d.]+)ms, MFU: (-?[\d.]+)%', text)
  step_s = float(m.group(1)) / 1000 if m else None
  tokens_per_sec = args.batch_size * args.block_size / step_s if step_s else None
  peak = None if cpu else peak_flops(device)
  mfu = float(m.group(2)) / 100 * NANOGPT_PEAK / peak if m and peak else None
  compile_s = None
  starts = [t for t, line in out.lines if line.startswith('Compiling model')]
  firsts = [t for t, line in out.lines if re.match(r'0/\d+ loss', line)]
  if starts and firsts and step_s:
    compile_s = firsts[0] - starts[0] - step_s
  peak_bytes = None if cpu else int(torch.cuda.max_memory_allocated())
  record = {'system': 'nanoGPT', 'config': config, 'batch_size': args.batch_size,
            'seq_len': args.block_size, 'tokens_per_sec': tokens_per_sec, 'mfu': mfu,
            'compile_s': compile_s, 'device': device, 'step_ms': step_s and step_s * 1000,
            'mfu_a100_as_printed': float(m.group(2)) / 100 if m else None,
            'peak_bytes_in_use': peak_bytes, 'compiled': not cpu and args.compile,
            'wall_s': wall, 'torch': torch.__version__}
  if error or not m:
    record['error'] = error or 'no "time per iteration" line in its output'
  print(json.dumps(record), flush=True)
  return 0 if m and not error else 1


def lm(args):
  device = None
  failed = 0
  for line in sys.stdin:
    line = line.strip()
    if not line.startswith('{'):
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    variant = r.get('variant', 'base')
    m = re.fullmatch(r'batch_size=(\d+)', variant)
    out = {'system': 'lm', 'config': r.get('config') or args.config,
           'batch_size': int(m.group(1)) if m else args.batch_size,
           'seq_len': args.seq_len, 'tokens_per_sec': r.get('tokens_per_sec'),
           'mfu': r.get('mfu'), 'compile_s': r.get('compile_s'),
           'device': r.get('device_kind') or device,
           'variant': f'{args.prefix} {variant}' if args.prefix else variant}
    out.update({k: v for k, v in r.items() if k not in out})
    device = out['device']
    failed += 'error' in r
    print(json.dumps(out), flush=True)
  return 1 if failed else 0


def _fmt(x, spec, none='-'):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return none
  return format(x, spec)


def table(args):
  rows = []
  with open(args.file, encoding='utf-8') as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  # nanoGPT's tokens/s by (batch, length), for lm's ratio to it.
  ref = {(r['batch_size'], r['seq_len']): r.get('tokens_per_sec') for r in rows
         if r['system'] == 'nanoGPT' and r.get('tokens_per_sec')}
  head = (f'{"system":8} {"config":12} {"variant":40} {"B":>4} {"T":>5} {"tokens/s":>10} '
          f'{"MFU":>6} {"compile s":>9} {"peak GB":>8} {"lm/nanoGPT":>10}  device')
  print(head)
  print('-' * len(head))
  for r in rows:
    key = (r['batch_size'], r['seq_len'])
    ratio = None
    if r['system'] == 'lm' and r.get('tokens_per_sec') and ref.get(key) and \
        r.get('config') == 'gpt2_small':
      ratio = r['tokens_per_sec'] / ref[key]
    peak = r.get('peak_bytes_in_use') or r.get('memory_bytes_per_device')
    variant = r.get('variant') or ('compiled' if r.get('compiled') else 'eager')
    if r.get('error'):
      variant = 'ERROR ' + variant
    compile_s = _fmt(r.get('compile_s'), '.1f')
    if r['system'] == 'nanoGPT' and r.get('compile_s') is not None:
      compile_s = '~' + compile_s  # First step's time, less one timed step.
    print(f'{r["system"]:8} {str(r.get("config")):12} {variant[:40]:40} {r["batch_size"]:>4} '
          f'{r["seq_len"]:>5} {_fmt(r.get("tokens_per_sec"), ",.0f"):>10} '
          f'{_fmt(r.get("mfu") and 100 * r["mfu"], ".1f"):>6} {compile_s:>9} '
          f'{_fmt(peak and peak / 1e9, ".2f"):>8} {_fmt(ratio, ".2f"):>10}  {r.get("device")}')
  peaks = {r.get('device'): r.get('peak_flops_per_device') for r in rows
           if r.get('peak_flops_per_device')}
  print('MFU: PaLM FLOPs per token (nanoGPT: its own estimate, rescaled from an A100 to '
        'this device) over the dense bf16 peak ' +
        (', '.join(f'{d}: {p / 1e12:.0f} TFLOP/s' for d, p in peaks.items()) or
         'unknown here (none for a CPU)') +
        '. peak GB: the allocator\'s peak where measured, else the compiled step\'s plan.')
  return 0


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='cmd', required=True)
  n = sub.add_parser('nanogpt')
  n.add_argument('--dir', default=os.environ.get('NANOGPT', '.nanogpt'))
  n.add_argument('--batch_size', type=int, default=12)
  n.add_argument('--block_size', type=int, default=1024)
  n.add_argument('--cpu', action='store_true')
  n.add_argument('--compile', type=lambda s: s.lower() in ('1', 'true'), default=True)
  n.add_argument('--tiny', action='store_true', help='2 layers of width 64 (dry runs).')
  m = sub.add_parser('lm')
  m.add_argument('--batch_size', type=int, required=True)
  m.add_argument('--seq_len', type=int, required=True)
  m.add_argument('--config', default=None)
  m.add_argument('--prefix', default='', help='Put before each line\'s variant label.')
  t = sub.add_parser('table')
  t.add_argument('file')
  args = p.parse_args()
  sys.exit({'nanogpt': nanogpt, 'lm': lm, 'table': table}[args.cmd](args))


if __name__ == '__main__':
  main()
