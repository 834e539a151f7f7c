"""Defaults for every config key; variants import this and override a few fields.

Each key is declared once, with its default and what it means, in the dataclass of its
section, and this config is built from them:

  top-level keys  RunConfig in lm/config.py        model.*      lm/model/config.py
  mesh.*          lm/mesh.py                       loss.*       lm/model/config.py
  optimizer.*     lm/optim/config.py               data.*       data/config.py
  wandb.*         WandbConfig in lm/config.py

`lock_config=True` in the scripts makes an unknown key (for example a typo on the
command line) an error that names it.
"""

import ml_collections

from lm.config import default_config


def get_config() -> ml_collections.ConfigDict:
  return default_config()
