"""scripts/prune.py's work: a run's projections pruned layer by layer into a new run folder.

Layer by layer, as Wanda and SparseGPT do: the calibration rows (the run's own training
split) go through the model with every earlier layer already pruned, so each layer is
fitted to the inputs it will really see. Within a layer, four stages in the order the
data flows: q, k and v (they read the same input), o, gate and up, down; before each,
one forward pass sows the inputs of that stage's projections (lm/model/transformer.py's
KERNEL_INPUTS) and their X^T X is summed. Embeddings and the output head stay dense, as
in both papers.

`--method=structured` instead measures importance once and slices out whole units, heads
and layers (structured.py) into a smaller model.

The new run folder holds the pruned parameters as a checkpoint of the source's step, the
source's config (its workdir the new folder; smaller sizes after structured pruning) and
tokenizer, `masks.npz` (the kept weights of every pruned matrix, by parameter path; not
for structured) and `prune.json` (what was done).
It is written beside its final name and renamed into place, so an error leaves nothing
under --out; the source run is only read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.compress import calibrate, structured
from lm.compress import sparsegpt as methods
from lm.compress.masks import Sparsity, as_matrix, zero_fraction
from lm.config import as_dict
from lm.model.params import stack_layers, unstack_layers
from lm.run.checkpoint import Checkpointer
from lm.run.folder import Run, RunFolder
from lm.run.meta import file_sha256, make_metadata
from lm.train.step import TrainState

METHODS = ('magnitude', 'wanda', 'sparsegpt')  # Zeros at the sizes the model has.
STRUCTURED = 'structured'  # A smaller model: lm/compress/structured.py.
# (module, sown input) -> the kernels that read it: the four stages of a layer, in order.
STAGES = ((('attn', 'qkv'), ('q', 'k', 'v')), (('attn', 'o'), ('o',)),
          (('mlp', 'up'), ('gate', 'up')), (('mlp', 'down'), ('down',)))
MASKS = 'masks.npz'
REPORT = 'prune.json'


def prune_params(cfg: Any, params: dict[str, Any], method: str, sparsity: Sparsity,
                 tokens: np.ndarray | None, segments: np.ndarray | None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(pruned unscanned params as numpy, {path: mask of kept weights})."""
  params = jax.tree.map(np.asarray, params)
  for block in range(cfg.num_layers):
    for (module, _), names in STAGES:
      for name in names:
        if name in params[f'block_{block}'][module]:
          kernel = params[f'block_{block}'][module][name]
          sparsity.check(f'block_{block}/{module}/{name}', as_matrix(name, kernel).shape[0])
  capture = calibrate.projection_inputs(cfg) if method != 'magnitude' else None
  masks = {}
  for block in range(cfg.num_layers):
    layer = params[f'block_{block}']
    for (module, sown), names in STAGES:
      names = [n for n in names if n in layer[module]]  # relu2 has no gate.
      h = None
      if capture is not None:
        inputs = capture(params, tokens, segments)
        h = calibrate.hessian(inputs[f'block_{block}'][module][sown][0])
      for name in names:
        kernel = layer[module][name]
        w = as_matrix(name, kernel)
        if method == 'sparsegpt':
          pruned, keep = methods.sparsegpt(w, h, sparsity)
        else:
          scores = (methods.magnitude_scores(w) if method == 'magnitude'
                    else methods.wanda_scores(w, h))
          pruned, keep = methods.prune_by_scores(w, scores, sparsity)
        layer[module][name] = pruned.reshape(kernel.shape).astype(kernel.dtype)
        masks[f'block_{block}/{module}/{name}'] = keep.reshape(kernel.shape)
  return params, masks


def prune_run(run: Run, out: str, method: str, sparsity: Sparsity | None = None, *,
              shape: structured.Shape | None = None,
              calibration_rows_n: int = 16) -> dict[str, Any]:
  """Prunes `run` into the new run folder `out`; returns the report (prune.json).
  `sparsity` for magnitude, wanda and sparsegpt; `shape` for structured."""
  start = time.perf_counter()
  cfg = run.cfgs.model
  if method not in METHODS + (STRUCTURED,):
    raise ValueError(f'--method must be one of {", ".join(METHODS + (STRUCTURED,))}, got '
                     f'{method!r}')
  if cfg.moe.num_experts:
    raise ValueError(f'{run.workdir} is a mixture of experts; prune.py prunes dense '
                     'models only')
  new_cfg = shape.resolve(cfg) if method == STRUCTURED else cfg
  if os.path.exists(out):  # Nothing a user has is replaced.
    raise ValueError(f'--out: {out} exists; choose a new folder for the pruned run')
  params = jax.tree.map(np.asarray, run.params)
  if cfg.scan_layers:
    params = unstack_layers(params, cfg.num_layers)
  tokens, segments = (calibrate.calibration_rows(run, calibration_rows_n) if method != 'magnitude'
                      else (None, None))
  report: dict[str, Any] = {
      'method': method, 'source': {'workdir': os.path.abspath(run.workdir), 'step': run.step},
      'out': out, 'calibration': None if tokens is None else {
          'rows': int(tokens.shape[0]), 'seq_len': int(tokens.shape[1]),
          'tokens': int(tokens.size), 'split': 'train'}}
  masks = None
  if method == STRUCTURED:
    scores = structured.importance(cfg, params, tokens, segments)
    pruned, kept = structured.prune_structure(cfg, new_cfg, params, scores)
    report.update(kept=kept, params_before=_count(params), params_after=_count(pruned),
                  model={k: getattr(new_cfg, k) for k in
                         ('num_layers', 'd_ff', 'num_heads', 'num_kv_heads', 'head_dim')})
  else:
    pruned, masks = prune_params(cfg, params, method, sparsity, tokens, segments)
    report.update(
        sparsity=sparsity.describe(),
        matrices={path: round(1 - float(k.mean()), 6) for path, k in masks.items()},
        pruned_fraction_of_matrices=round(
            1 - sum(int(k.sum()) for k in masks.values()) / sum(k.size for k in masks.values()),
            6),
        zero_fraction_of_all_params=round(_zeros(pruned), 6))
  if new_cfg.scan_layers:
    pruned = jax.tree.map(np.asarray, stack_layers(pruned, new_cfg.num_layers))
  write_run(run, out, new_cfg, pruned, masks, report)
  report['seconds'] = round(time.perf_counter() - start, 2)
  return report


def _count(params: Any) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def _zeros(params: Any) -> float:
  leaves = jax.tree.leaves(params)
  return sum(zero_fraction(x) * x.size for x in leaves) / sum(x.size for x in leaves)


def write_run(run: Run, out: str, model_cfg: Any, params: Any,
              masks: dict[str, np.ndarray] | None, report: dict[str, Any]) -> None:
  """The new run folder, of `model_cfg` (smaller after structured pruning): written under
  a temporary name, then renamed to `out`. `masks`: None when nothing is held at zero."""
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(out)}.prune-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)  # Only ever this process's own leftovers.
  try:
    cfgs = run.cfgs._replace(run=dataclasses.replace(run.cfgs.run, workdir=out),
                             model=model_cfg)
    folder = RunFolder(tmp)
    folder.write_config(cfgs)
    shutil.copyfile(RunFolder(run.workdir).tokenizer_path, folder.tokenizer_path)
    meta = make_metadata(dataclasses.asdict(cfgs.model), file_sha256(folder.tokenizer_path),
                         run.tokenizer.vocab_size, as_dict(cfgs))
    meta['pruned'] = {k: report.get(k) for k in ('method', 'sparsity', 'source')}
    state = TrainState(step=jnp.asarray(run.step, jnp.int32),
                       params=jax.tree.map(jnp.asarray, params), opt_state={},
                       rng=jax.random.PRNGKey(run.cfgs.run.seed))
    checkpointer = Checkpointer(tmp, metadata=meta)
    try:
      checkpointer.save(run.step, state, {})
      checkpointer.wait()
    finally:
      checkpointer.close()
    if masks is not None:
      np.savez_compressed(os.path.join(tmp, MASKS), **masks)
    with open(os.path.join(tmp, REPORT), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
