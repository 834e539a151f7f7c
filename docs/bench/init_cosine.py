"""How much of a run's trained matrices is still their random start: the cosine of each
matrix with its initial value (the run's seed through model.init), averaged per kind.

  python docs/bench/init_cosine.py RUN    (zero-initialised matrices print nan)
"""

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lm.model.transformer import Transformer
from lm.run.folder import load_run


def main(workdir: str) -> None:
  run = load_run(workdir)
  model = Transformer(run.cfgs.model)
  tokens = jnp.zeros((1, run.cfgs.run.seq_len), jnp.int32)
  start = nn.meta.unbox(model.init({'params': jax.random.PRNGKey(run.cfgs.run.seed)},
                                   tokens)['params'])
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  trained, cosines = flat(jax.device_get(run.params)), collections.defaultdict(list)
  for key, w0 in flat(start).items():
    w1 = trained[key]
    if w1.ndim < 2:
      continue
    parts = key.replace("']['", '/').strip("[']").split('/')
    kind = '/'.join(parts[1:] if parts[0].startswith('block') else parts)
    n0 = np.linalg.norm(w0)
    cosines[kind].append(float((w0 * w1).sum() / (n0 * np.linalg.norm(w1))) if n0 else np.nan)
  for kind, values in sorted(cosines.items()):
    print(f'{kind}: {np.mean(values):.2f} over {len(values)}')


if __name__ == '__main__':
  main(sys.argv[1])
