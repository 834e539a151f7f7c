"""Everything under a run folder (RUN/), read and written.

  folder.py         the layout (`RunFolder`: every path under RUN/) and loading a run
                    back (`load_run`: config, tokenizer, a checkpoint's parameters).
  checkpoint.py     Orbax checkpoints of the train state, checked and committed.
  meta.py           what a checkpoint was made with, and which keys another config may change.
  save_agreement.py several processes agreeing, at the same step, on how a save went.
  checksums.py      checksums of a checkpoint's arrays and JSON.
  lock.py           one trainer per run folder (RUN/.lock).
  log.py            RUN/train.log, library warnings kept off the terminal.
  metrics.py        metrics records to stdout, RUN/metrics.jsonl and TensorBoard.
  wandb_tracker.py  the optional W&B mirror of the same records.
"""
