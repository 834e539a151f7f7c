"""Corpora with known injections, and how well a preparation found them.

`inject` writes a corpus of base documents plus exact copies, near copies (a fraction of
their words replaced), documents carrying e-mail addresses, phone numbers and IPs, and
documents quoting a task file's examples; `truth.json` beside it says which is which.
`score` reads a preparation's output and removed/ folders against that truth: recall and
precision of each kind. The tests use it on random-word documents (distinct by
construction); scripts/bench_prepare.py on the embedded corpus.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
from collections.abc import Sequence
from typing import Any

PII = {'email': ['maria.lopez{i}@example.org', 'j.smith{i}@mail.example.com'],
       'phone': ['(555) 201-{i:04d}', '+44 20 7946 {i:04d}'],
       'ip': ['93.184.{a}.{b}', '8.{a}.{b}.34']}


def random_words(rng: random.Random, n: int, vocab: Sequence[str], per_line: int = 10) -> str:
  """n words of `vocab`, `per_line` to a line (so that line-length rules pass them)."""
  words = [rng.choice(vocab) for _ in range(n)]
  return '\n'.join(' '.join(words[i:i + per_line]) for i in range(0, n, per_line))


def vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
  letters = 'abcdefghijklmnopqrstuvwxyz'
  return sorted({''.join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
                 for _ in range(size)})


def edit_words(text: str, fraction: float, rng: random.Random, vocab: Sequence[str]) -> str:
  """`text` with round(fraction * words) of its whitespace-separated words replaced (at
  least one), each by a word of `vocab`; the spacing is kept."""
  parts = re.split(r'(\s+)', text)  # Words at even indices, the spacing between them odd.
  words = [i for i in range(0, len(parts), 2) if parts[i]]
  n = max(1, round(fraction * len(words)))
  for i in rng.sample(words, min(n, len(words))):
    parts[i] = rng.choice(vocab)
  return ''.join(parts)


def pii_line(kind: str, i: int, rng: random.Random) -> str:
  pattern = PII[kind][i % len(PII[kind])]
  return pattern.format(i=i, a=rng.randint(1, 254), b=rng.randint(1, 254))


def inject(out: str, base: Sequence[str], rng: random.Random, vocab: Sequence[str], *,
           exact: int, near: int | dict[float, int], edit_fraction: float = 0.01, pii: int,
           contaminated: int, task_records: Sequence[dict],
           shards: int = 4) -> dict[str, Any]:
  """Writes base + injected documents as `shards` .jsonl files under `out`, ids in
  order; returns (and writes to out/../truth.json) what was injected where. `near` is a
  count at `edit_fraction`, or edit fraction -> count."""
  docs: list[tuple[str, str, dict]] = [(t, 'base', {}) for t in base]
  levels = near if isinstance(near, dict) else {edit_fraction: near}
  # Copies are made of documents of 200 words or more, where a 1% edit is 2 words or more.
  long = [i for i, t in enumerate(base) if len(t.split()) >= 200]
  picks = rng.sample(long, exact + sum(levels.values()))
  k = 0
  for _ in range(exact):
    docs.append((base[picks[k]], 'exact', {'of': picks[k]}))
    k += 1
  for fraction, count in levels.items():
    for _ in range(count):
      docs.append((edit_words(base[picks[k]], fraction, rng, vocab), 'near',
                   {'of': picks[k], 'edit': fraction}))
      k += 1
  for i in range(pii):  # A base document with one of each kind added (a fresh document).
    kinds = {kind: pii_line(kind, i, rng) for kind in PII}
    text = (f'Contact {kinds["email"]} or call {kinds["phone"]}; the server is at '
            f'{kinds["ip"]}.\n' + random_words(rng, 120, vocab))
    docs.append((text, 'pii', kinds))
  for i in range(contaminated):
    record = task_records[i % len(task_records)]
    quote = record['context'] + record['choices'][record['label']]
    text = random_words(rng, 80, vocab) + '\n' + quote + '\n' + random_words(rng, 80, vocab)
    docs.append((text, 'contaminated', {'record': i % len(task_records)}))
  order = list(range(len(docs)))
  rng.shuffle(order)
  os.makedirs(out, exist_ok=True)
  truth: dict[str, Any] = {'docs': {}}
  rows = [0] * shards
  position = {}
  for n, i in enumerate(order):
    shard = n % shards
    key = f'part{shard}.jsonl:{rows[shard]}'
    rows[shard] += 1
    position[i] = key
  for i in order:
    text, kind, info = docs[i]
    key = position[i]
    with open(os.path.join(out, key.split(':')[0]), 'a') as f:
      f.write(json.dumps({'text': text}) + '\n')
    if 'of' in info:
      info = {**info, 'of': position[info['of']]}
    truth['docs'][key] = {'kind': kind, **info}
  with open(os.path.join(os.path.dirname(os.path.abspath(out)), 'truth.json'), 'w') as f:
    json.dump(truth, f)
  return truth


def _ids(pattern: str) -> list[dict]:
  out = []
  for path in sorted(glob.glob(pattern)):
    with gzip.open(path, 'rt') if path.endswith('.gz') else open(path) as f:
      out += [json.loads(line) for line in f if line.strip()]
  return out


def score(output: str, truth: dict[str, Any]) -> dict[str, Any]:
  """Recall and precision of each injected kind against a preparation's folders."""
  kept = {r['id']: r['text'] for r in _ids(os.path.join(output, '*.jsonl*'))}
  heldout = {r['id'] for r in _ids(os.path.join(output, 'heldout', '*.jsonl*'))}
  dropped_dup = {r['id'] for r in _ids(os.path.join(output, 'removed', 'duplicates', '*'))}
  dropped_cont = {r['id'] for r in _ids(os.path.join(output, 'removed', 'contaminated', '*'))}
  docs = truth['docs']

  def of_kind(kind):
    return [k for k, v in docs.items() if v['kind'] == kind and k not in heldout
            and v.get('of') not in heldout]

  out: dict[str, Any] = {}
  for kind in ('exact', 'near'):
    pairs = of_kind(kind)
    # Found: the copy and its original are not both kept (one of them was dropped).
    found = [k for k in pairs if not (k in kept and docs[k]['of'] in kept)]
    out[kind] = {'injected': len(pairs), 'found': len(found),
                 'recall': len(found) / max(len(pairs), 1)}
  by_edit: dict[float, list[bool]] = {}
  for k in of_kind('near'):
    by_edit.setdefault(docs[k]['edit'], []).append(not (k in kept and docs[k]['of'] in kept))
  out['near_by_edit'] = {str(e): {'injected': len(v), 'recall': sum(v) / len(v)}
                         for e, v in sorted(by_edit.items())}
  in_pairs = {k for kind in ('exact', 'near') for k in of_kind(kind)}
  in_pairs |= {docs[k]['of'] for k in in_pairs}
  false_merges = sorted(dropped_dup - in_pairs)
  out['duplicates_removed'] = len(dropped_dup)
  out['false_merges'] = len(false_merges)
  out['false_merge_ids'] = false_merges[:20]
  out['dedup_precision'] = (len(dropped_dup) - len(false_merges)) / max(len(dropped_dup), 1)
  pii_docs = of_kind('pii')
  missed = {kind: sum(1 for k in pii_docs if k in kept and docs[k][kind] in kept[k])
            for kind in PII}
  present = [k for k in pii_docs if k in kept]
  out['pii'] = {kind: {'injected': len(present), 'left': missed[kind]} for kind in PII}
  cont = of_kind('contaminated')
  caught = [k for k in cont if k in dropped_cont]
  out['contaminated'] = {'injected': len(cont), 'dropped': len(caught),
                         'recall': len(caught) / max(len(cont), 1),
                         'dropped_total': len(dropped_cont),
                         'precision': len(caught) / max(len(dropped_cont), 1)}
  return out
