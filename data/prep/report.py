"""The preparation report: documents and bytes after each stage, what each filter removed,
duplicate clusters, repeated line spans cut out, PII replacements and contaminated
documents, from datatrove's per-task stats (OUTPUT/logs/<stage>/stats/<rank>.json);
written as OUTPUT/report.json and printed as a table. Imports nothing of datatrove, so
the trainer's header can read reports too.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

REPORT = 'report.json'


def _add(total: dict[str, Any], stats: dict[str, Any]) -> None:
  for key, value in stats.items():
    value = value['total'] if isinstance(value, dict) else value
    if isinstance(value, (int, float)):
      total[key] = total.get(key, 0) + value


def merged_steps(logs: str) -> list[tuple[str, dict[str, Any]]]:
  """(step name, stats summed over tasks) of one stage's pipeline, in pipeline order."""
  steps: list[tuple[str, dict[str, Any]]] = []
  for path in sorted(glob.glob(os.path.join(logs, 'stats', '*.json'))):
    with open(path) as f:
      for i, step in enumerate(json.load(f)):
        if i == len(steps):
          steps.append((step['name'], {}))
        _add(steps[i][1], step['stats'])
  return steps


def build(output: str, stages: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
  rows: list[dict[str, Any]] = []  # One per Count step: the documents that went on.
  pending: dict[str, int] = {}  # Drops seen since the last Count, by reason.
  pii: dict[str, int] = {}
  contaminated: dict[str, int] = {}
  clusters: dict[str, int] = {}
  lines = {'lines_removed': 0, 'documents_emptied': 0}
  lines_in = None  # Documents the line dedup filter read, until the next Count.
  for stage in stages:
    for name, stats in merged_steps(os.path.join(output, 'logs', stage)):
      if name.startswith('COUNT: '):
        if lines_in is not None:  # Documents with nothing left are dropped.
          lines['documents_emptied'] = lines_in - int(stats.get('documents', 0))
          pending['line duplicates'] = lines['documents_emptied']
          lines_in = None
        rows.append({'stage': name.removeprefix('COUNT: '),
                     'documents': int(stats.get('documents', 0)),
                     'bytes': int(stats.get('bytes', 0)), 'removed': pending})
        pending = {}
        continue
      if 'sentence-deduplication stage 3' in name:  # datatrove's name, lines or sentences
        lines_in = int(stats.get('total', 0))
        lines['lines_removed'] = int(stats.get('removed_sentences', 0))
        continue
      for key, value in stats.items():
        if key.startswith('dropped_'):
          pending[key.removeprefix('dropped_')] = int(value)
        elif key.startswith('pii_'):
          pii[key.removeprefix('pii_')] = int(value)
        elif key.startswith('contaminated_'):
          ref = key.removeprefix('contaminated_')
          ref = 'heldout' if ref.startswith('heldout_') else ref.removeprefix('task_')
          contaminated[ref] = contaminated.get(ref, 0) + int(value)
        elif key in ('clusters', 'duplicates', 'to_remove'):
          clusters[key] = int(value)
        elif name == 'SPLIT: heldout' and key == 'heldout':
          pending['heldout'] = int(value)
        elif 'MinHash stage 4' in name and key == 'dropped':
          pending['duplicate'] = int(value)
  first, last = (rows[0], rows[-1]) if rows else ({}, {})
  return {
      'input': {'documents': first.get('documents', 0), 'bytes': first.get('bytes', 0)},
      'output': {'documents': last.get('documents', 0), 'bytes': last.get('bytes', 0),
                 'files': sorted(os.path.basename(p)
                                 for p in glob.glob(os.path.join(output, '*.jsonl*')))},
      'stages': rows,
      'heldout': {'documents': next((r['removed'].get('heldout', 0) for r in rows
                                     if 'heldout' in r['removed']), 0), 'folder': 'heldout'},
      'duplicates': {'clusters': clusters.get('clusters', 0),
                     'documents_in_clusters': clusters.get('duplicates', 0),
                     'removed': clusters.get('to_remove', 0)},
      'line_dedup': lines,
      'pii': {kind: pii.get(kind, 0) for kind in ('email', 'phone', 'ip', 'documents')},
      'contaminated': {'documents': sum(contaminated.values()), 'by_reference': contaminated},
      'options': options,
  }


def table(report: dict[str, Any]) -> str:
  lines = [f'{"stage":<24}{"documents":>11}{"bytes":>14}  removed']
  for row in report['stages']:
    removed = ', '.join(f'{n} {why}' for why, n in row['removed'].items() if n)
    lines.append(f'{row["stage"]:<24}{row["documents"]:>11,}{row["bytes"]:>14,}  {removed}')
  d, p = report['duplicates'], report['pii']
  lines.append(f'duplicate clusters: {d["clusters"]} ({d["documents_in_clusters"]} documents, '
               f'{d["removed"]} removed); PII replaced: {p["email"]} e-mail, {p["phone"]} phone, '
               f'{p["ip"]} IP in {p["documents"]} documents; contaminated: '
               f'{report["contaminated"]["documents"]}')
  return '\n'.join(lines)


def write(output: str, report: dict[str, Any]) -> str:
  path = os.path.join(output, REPORT)
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(path + '.tmp', path)
  return path


def header_line(files: str) -> str:
  """For the trainer's header: what preparation kept, when a glob of data.files lies in
  a prepared folder (one holding report.json); '' otherwise."""
  from data.sources import glob_base

  parts = []
  for pattern in [p.strip() for p in files.split(',') if p.strip()]:
    path = os.path.join(glob_base(os.path.expanduser(pattern)), REPORT)
    try:
      with open(path) as f:
        r = json.load(f)
      kept, read = r['output']['documents'], r['input']['documents']
      removed = {why: n for row in r['stages'] for why, n in row['removed'].items() if n}
    except (OSError, ValueError, KeyError, TypeError):
      continue
    said = ', '.join(f'{n:,} {why}' for why, n in removed.items())
    parts.append(f'{path}: {kept:,} of {read:,} documents kept ({said})')
  return '; '.join(parts)
