"""The preparation run: five datatrove stages, on the local or the SLURM executor.

1. per task: read, clean, set the held-out split aside, quality filters, PII, write the
   kept documents and their MinHash signatures;
2. per band: sort the signatures and emit duplicate pairs;
3. one task: cluster the pairs, choose what each task drops;
4. per task: drop duplicates, then contaminated documents, and write the output shards;
   with --line_dedup, write them to OUTPUT/work/deduped with their line-span hashes, and
   4a. one task: find every repeat of a span of N lines seen earlier in the corpus;
   4b. per task: cut those repeats out and write the output shards;
5. one task: write OUTPUT/report.json and remove OUTPUT/work.

Everything intermediate lives under OUTPUT/work (removed by the last stage), the
executors' logs and per-task stats under OUTPUT/logs, dropped documents under
OUTPUT/removed/<why>/ for audit, the held-out split under OUTPUT/heldout/.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
  MinhashDedupBuckets,
  MinhashDedupCluster,
  MinhashDedupFilter,
)
from datatrove.pipeline.dedup.sentence_dedup import (
  SentDedupConfig,
  SentenceDedupFilter,
  SentenceDedupSignature,
  SentenceFindDedups,
)
from datatrove.pipeline.writers import JsonlWriter

from data.prep import decont, filters, minhash, pii, report, steps
from data.prep.words import WORDS

STAGES = ('1_filter', '2_buckets', '3_clusters', '4_output', '4a_line_dups', '4b_lines',
          '5_report')


@dataclasses.dataclass(frozen=True)
class Options:
  input: str  # Comma-separated globs of .txt/.jsonl(.gz)/.parquet files, or hub:NAME[:CONFIG].
  output: str
  split: str = 'train'  # Of a hub: dataset.
  text_key: str = 'text'  # The column of .jsonl/.parquet rows and of dataset rows.
  filters: tuple[str, ...] = filters.PRESETS['web']
  pii: bool = True
  dedup: bool = True
  line_dedup: int = 0  # Lines per span whose repeats are cut out; 0 = off.
  decontaminate: str = ''  # '' = make_tasks' test tasks; 'none'; or task files / globs.
  decont_ngrams: int = 13
  eval_fraction: float = 0.01
  minhash_threshold: float = 0.7
  minhash_hashes: int = 112
  minhash_ngrams: int = 5
  tasks: int = 1
  workers: int = 1
  gzip: bool = True
  executor: str = 'local'
  slurm: dict = dataclasses.field(default_factory=dict)  # partition, time, cpus_per_task, ...

  def path(self, *parts: str) -> str:
    return os.path.join(self.output, *parts)


def _record(self, doc) -> dict:
  """The output line: the text and the input key it came from."""
  return {'text': doc.text, 'id': doc.id}


def _writer(folder: str, gz: bool = True, lean: bool = False) -> JsonlWriter:
  name = '${rank}.jsonl' + ('.gz' if gz else '')
  return JsonlWriter(folder, output_filename=name, compression='gzip' if gz else None,
                     adapter=_record if lean else None)


def stage_pipelines(opts: Options) -> list[tuple[str, list, int]]:
  """(stage, pipeline, tasks) of each stage to run, in order."""
  work = opts.path('work')
  mh = minhash.config(opts.minhash_threshold, opts.minhash_hashes, opts.minhash_ngrams)
  dcfg = decont.config(opts.decont_ngrams)
  first = [steps.InputReader(opts.input, opts.split, opts.text_key), steps.Count('read'),
           steps.Clean(), steps.Count('clean'),
           steps.HeldOutSplit(opts.eval_fraction, opts.path('heldout'),
                              os.path.join(work, 'index'), opts.decont_ngrams),
           steps.Count('train split')]
  for name in opts.filters:
    block = filters.FILTERS[name]()
    block.exclusion_writer = _writer(opts.path('removed', name))
    first += [block, steps.Count(f'filter {name}')]
  if opts.pii:
    first += [pii.PIIScrubber(), steps.Count('pii')]
  first.append(_writer(os.path.join(work, 'kept'), lean=True))
  last = [steps.ShardReader(os.path.join(work, 'kept'))]
  out = [(STAGES[0], first, opts.tasks)]
  if opts.dedup:
    first.append(steps.Signature(os.path.join(work, 'signatures'), config=mh, language=WORDS))
    out += [(STAGES[1], [MinhashDedupBuckets(os.path.join(work, 'signatures'),
                                             os.path.join(work, 'buckets'), config=mh)],
             mh.num_buckets),
            (STAGES[2], [MinhashDedupCluster(os.path.join(work, 'buckets'),
                                             os.path.join(work, 'remove_ids'), config=mh,
                                             save_cluster_id=True)], 1)]
    last += [MinhashDedupFilter(os.path.join(work, 'remove_ids'), load_cluster_ids=True,
                                exclusion_writer=_writer(opts.path('removed', 'duplicates'))),
             steps.Count('deduplicate')]
  last += [decont.decont_filter(os.path.join(work, 'index'), dcfg,
                                _writer(opts.path('removed', 'contaminated'))),
           steps.Count('decontaminate')]
  if not opts.line_dedup:
    out.append((STAGES[3], last + [_writer(opts.output, opts.gzip, lean=True)], opts.tasks))
  else:
    out += _line_dedup_stages(opts, last)
  out.append((STAGES[-1], [Finish(opts, tuple(stage for stage, _, _ in out),
                                 (mh.num_buckets, mh.hashes_per_bucket))], 1))
  return out


def line_config(lines: int) -> SentDedupConfig:
  """Spans of `lines` lines, compared after datatrove's normalisation; a document is only
  dropped when nothing of it is left (the quality filters have judged it already)."""
  return SentDedupConfig(n_sentences=lines, split_sentences=False, only_dedup_in_index=False,
                         min_doc_words=0, min_num_sentences=0)


def _line_dedup_stages(opts: Options, last: list) -> list[tuple[str, list, int]]:
  """Stage 4 writes to work/deduped with the line-span hashes of what it wrote (in the
  order stage 4b reads it back), 4a finds the repeats, 4b cuts them out."""
  work, cfg = opts.path('work'), line_config(opts.line_dedup)
  signed = last + [_writer(os.path.join(work, 'deduped'), lean=True),
                   SentenceDedupSignature(os.path.join(work, 'line_signatures'), config=cfg,
                                          language=WORDS)]
  return [(STAGES[3], signed, opts.tasks),
          (STAGES[4], [SentenceFindDedups(os.path.join(work, 'line_signatures'),
                                          os.path.join(work, 'line_dups'), config=cfg)], 1),
          (STAGES[5], [steps.ShardReader(os.path.join(work, 'deduped')),
                       SentenceDedupFilter(os.path.join(work, 'line_dups'), config=cfg,
                                           exclusion_writer=_writer(
                                               opts.path('removed', 'line_duplicates')),
                                           language=WORDS),
                       steps.Count('line dedup'),
                       _writer(opts.output, opts.gzip, lean=True)], opts.tasks)]


class Finish(PipelineStep):
  """The last stage: the report from every stage's stats, then OUTPUT/work removed. A
  stage of its own, so that SLURM runs it after the others like everything else."""

  name, type = 'report', 'REPORT'

  def __init__(self, opts: Options, stages: tuple[str, ...], bands_rows: tuple[int, int]) -> None:
    super().__init__()
    self.opts, self.stages, self.bands_rows = opts, stages, bands_rows

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    options = {k: v for k, v in dataclasses.asdict(self.opts).items() if k != 'slurm'}
    options['minhash_bands_rows'] = list(self.bands_rows)
    report.write(self.opts.output, report.build(self.opts.output, self.stages, options))
    shutil.rmtree(self.opts.path('work'), ignore_errors=True)
    return iter(())


def executors(opts: Options) -> list:
  """The chained executors, last one first to run after all the others."""
  chain = []
  for stage, pipeline, tasks in stage_pipelines(opts):
    logs = opts.path('logs', stage)
    depends = chain[-1] if chain else None
    if opts.executor == 'slurm':
      from datatrove.executor import SlurmPipelineExecutor
      slurm = {'time': '24:00:00', 'partition': 'cpu', **opts.slurm}
      chain.append(SlurmPipelineExecutor(
          pipeline=pipeline, tasks=tasks, logging_dir=logs, depends=depends,
          job_name=f'prepare_{stage}', slurm_logs_folder=os.path.join(logs, 'slurm'),
          **slurm))
    else:
      from datatrove.executor import LocalPipelineExecutor
      chain.append(LocalPipelineExecutor(
          pipeline=pipeline, tasks=tasks, workers=min(opts.workers, tasks), logging_dir=logs,
          depends=depends, start_method='fork'))
  return chain


def run(opts: Options, references: dict[str, list[str]]) -> dict[str, int]:
  """Indexes the tasks' reference texts (decont.task_references), then runs (or, on SLURM,
  submits) the stages: the last executor pulls the others. Returns task name -> indexed
  n-grams."""
  indexed = decont.index_tasks(references, opts.path('work', 'index'),
                               decont.config(opts.decont_ngrams))
  executors(opts)[-1].run()
  return indexed
