"""Input pipeline: sources, cleaning, mixtures, tokenizer, packing, process sharding.

sources.py reads documents (stdlib, files, hub); cleaning.py drops blank, binary, short and
duplicate ones; mixture.py weighs several sources; reader.py turns them into one
resumable sequence of training documents; pipeline.py deals that sequence out to packing
streams and packs them into batches whose rows come from different documents, the same
global batches for any process count (each process tokenises only its own streams);
throughput.py measures it.

This package never imports jax or flax: it hands out numpy batches, and its state is a
small JSON-able dict that the trainer stores next to its checkpoints.
"""

from data.config import DataConfig
from data.heldout import eval_batches
from data.packing import Windower, wrap
from data.pipeline import TrainBatches
from data.tokenizer import Tokenizer, check_vocab, load_or_train, train_tokenizer, training_texts

__all__ = [
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
