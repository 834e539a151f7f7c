"""An optional Weights & Biases mirror of metrics.jsonl: `--config.wandb.project=NAME`.

Off unless `wandb.project` is set; `wandb` is then imported (pip install 'lm[wandb]').
The run's W&B id is kept in RUN/wandb_id, so a resumed training run continues the same
W&B run. After a resume from an older checkpoint the replayed steps are not sent again:
W&B keeps the first record of a step, and resuming is bit-exact, so those records are
the ones the replay would write. `wandb.mode='offline'` (or WANDB_MODE) logs to
RUN/wandb/ without a network, for `wandb sync` later.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

from lm.config import WandbConfig
from lm.run import layout


class WandbWriter:
  """Sends each metrics record to one W&B run; `close()` finishes it."""

  def __init__(self, cfg: WandbConfig, workdir: str, config: Mapping[str, Any]) -> None:
    try:
      import wandb
    except ImportError as e:
      raise ValueError('wandb.project is set but the wandb package is not installed '
                       "(pip install 'lm[wandb]')") from e
    id_path = os.path.join(workdir, layout.WANDB_ID)
    if os.path.isfile(id_path):
      with open(id_path, encoding='utf-8') as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      with open(id_path, 'w', encoding='utf-8') as f:
        f.write(run_id + '\n')
    self.run = wandb.init(
        project=cfg.project, entity=cfg.entity or None,
        name=cfg.name or os.path.basename(os.path.abspath(workdir)), id=run_id,
        resume='allow', dir=workdir, config=dict(config), mode=cfg.mode or None,
        settings=wandb.Settings(quiet=True))
    self.id = run_id

  def write(self, record: Mapping[str, Any]) -> None:
    step = int(record['step'])
    if step < self.run.step:  # A replayed step W&B already has (see the module's note).
      return
    self.run.log({k: v for k, v in record.items() if k != 'step' and v is not None},
                 step=step)

  def close(self) -> None:
    self.run.finish()
