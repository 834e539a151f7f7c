"""Weighted mixtures of sources: the `data.mixture` syntax and the per-document choice.

`data.mixture` lists entries separated by ';', each 'KIND[:ARG]:WEIGHT':

  stdlib:0.3                                  the standard library's .py files
  files:/data/web/*.jsonl.gz,/data/b.txt:0.6  comma-separated globs, as in data.files
  hub:HuggingFaceFW/fineweb-edu:sample-10BT:1 a hub dataset NAME[:CONFIG]

The weight is the last ':' field, so globs may hold commas; weights are normalised.
data.split and data.text_key apply to every entry. Which source gives the n-th document
is a pure function of (seed, n), so a restored pipeline makes the same choices.
"""

import bisect
import dataclasses
import hashlib
import math
from typing import Any, NamedTuple

KINDS = ('stdlib', 'files', 'hub')


class Entry(NamedTuple):
  kind: str
  arg: str
  weight: float


def parse(spec: str) -> list[Entry]:
  """The entries of a `data.mixture` string; ValueError names the bad entry."""
  entries = []
  for text in (t.strip() for t in spec.split(';')):
    if not text:
      continue
    head, sep, weight_text = text.rpartition(':')
    try:
      weight = float(weight_text)
    except ValueError:
      weight = float('nan')
    if not sep or not math.isfinite(weight) or weight <= 0:
      raise ValueError(f'data.mixture: entry {text!r} must end in ":WEIGHT" with a '
                       'positive number')
    kind, _, arg = head.partition(':')
    kind, arg = kind.strip(), arg.strip()
    if kind not in KINDS:
      raise ValueError(f'data.mixture: entry {text!r} has source {kind!r}, not one of '
                       f'{", ".join(KINDS)}')
    if (kind == 'stdlib') != (not arg):
      need = 'takes no argument' if kind == 'stdlib' else 'needs an argument'
      raise ValueError(f'data.mixture: entry {text!r}: {kind} {need}')
    entries.append(Entry(kind, arg, weight))
  if not entries:
    raise ValueError(f'data.mixture: {spec!r} names no source')
  return entries


def components(cfg: Any) -> list[tuple[float, Any]]:
  """(normalised weight, single-source DataConfig) per source; one entry without a mixture."""
  if not cfg.mixture:
    return [(1.0, cfg)]
  entries = parse(cfg.mixture)
  total = sum(e.weight for e in entries)
  out = []
  for e in entries:
    fields = {'source': e.kind, 'files': '', 'name': '', 'config_name': '', 'mixture': ''}
    if e.kind == 'files':
      fields['files'] = e.arg
    elif e.kind == 'hub':
      name, _, config_name = e.arg.partition(':')
      fields.update(name=name, config_name=config_name)
    out.append((e.weight / total, dataclasses.replace(cfg, **fields)))  # Validates it.
  return out


class Chooser:
  """Picks a component per document from a counter-based hash: no RNG state to save."""

  def __init__(self, weights: list[float], seed: int):
    self._seed = seed
    self._cumulative = []
    acc = 0.0
    for w in weights:
      acc += w
      self._cumulative.append(acc)

  def __call__(self, counter: int) -> int:
    if len(self._cumulative) == 1:
      return 0
    digest = hashlib.blake2b(f'mixture:{self._seed}:{counter}'.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, 'big') / 2.0**64 * self._cumulative[-1]
    return min(bisect.bisect_right(self._cumulative, u), len(self._cumulative) - 1)
