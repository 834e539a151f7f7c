"""Input pipeline: sources, cleaning, mixtures, tokenizer, packing, process sharding.

Where each thing lives:
  sources.py    reads documents (stdlib, files, hub); cleaning.py drops blank, binary,
                short and duplicate ones; split.py picks the held-out ones.
  mixture.py    weighs several sources; reader.py turns them into one resumable
                sequence of training documents.
  tokenizer.py  trains and loads the sentencepiece tokenizer (lm/export/hf_tokenizer.py
                exports it).
  formats.py    data.format picked once: plain text packed end to end, or fine-tuning
                examples packed whole (what a document is, its encoder, its packer).
  packing.py    the one [BOS] ids EOS wrap and the one seq_len + 1 windower, shared by
                training, held-out batches and lm/eval/score_run.py's file scoring.
  dealing.py    deals the training documents to packing streams, rows and processes:
                the same global batches for any process count, each process tokenising
                only its own streams.
  state.py      the data state: snapshot, merging every process's, restore checks.
  batch.py      Batch, the one typed record of token rows (with segment ids and the
                loss mask) that every batch of training and evaluation is.
  pipeline.py   TrainBatches, the prefetching facade over the above.
  heldout.py    eval_batches, the held-out batches.
  sft.py        fine-tuning records (data.format='sft'): messages, the chat template,
                tokens and the loss mask; packing.py's RowPacker packs them whole.
  jsonl.py      JSON lines read a line at a time, a bad line named by its number.
  tasks/        multiple-choice task files and their choices as token rows, split as
                lm-evaluation-harness splits them (lm/eval/tasks.py scores them), and
                scripts/make_tasks.py's tasks from held-out stdlib files.
  throughput.py measures the pipeline's tokens/s (lm/experiments/bench.py reports the
                same figure).

This package never imports jax or flax: it hands out numpy batches, and its state is a
small JSON-able dict that the trainer stores next to its checkpoints.
"""

from data.batch import Batch
from data.config import DataConfig
from data.heldout import eval_batches
from data.packing import Windower, wrap
from data.pipeline import TrainBatches
from data.tokenizer import Tokenizer, check_vocab, load_or_train, train_tokenizer, training_texts

__all__ = [
    'Batch',
    'DataConfig',
    'TrainBatches',
    'Tokenizer',
    'check_vocab',
    'eval_batches',
    'load_or_train',
    'train_tokenizer',
    'training_texts',
    'Windower',
    'wrap',
]
