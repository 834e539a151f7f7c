"""Weight-only int8 / int4 quantisation of a trained run for evaluation and sampling.

Built on qwix's post-training quantisation (the library MaxText uses): `quantized_model`
wraps the Transformer so that each block's einsums take a quantised weight, and
`quantize_params` turns restored float parameters into qwix `QArray`s (integer values
and float scales) laid out on the run's mesh by the same logical axes as the floats.

- int8: one scale per output channel: the largest magnitude over the contracted axes
  / 127.5 (qwix widens the top bucket by half a step), values rounded to -127..127.
- int4: one scale per group of `group` weights along the last contracted axis (the
  model axis D for q, k, v and the MLP's up and gate, d_ff for down, head_dim for the
  attention output, whose groups then span every head) and per output channel.
- Activations stay in the compute dtype, and so, by default, do the embedding and the
  output head (their share of a large model is small; of a tiny one, large). With
  `embeddings` they are quantised too, one scale per vocabulary entry (int4: per group
  along D), and dequantised where read: the rows a lookup gathers, the head before the
  logits (lm/model/transformer.py). Norm gains are never quantised.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.model.params import boxed_params
from lm.model.transformer import Transformer
from lm.run.folder import Run, load_run
from lm.sharding import AxisRules, tree_shardings

MODES = ('none', 'int8', 'int4')
# Each block's einsums: `blocks/...` when layers are scanned, `block_<i>/...` when not.
BLOCK_PATHS = r'(blocks|block_\d+)/.*'


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  mode: str = 'none'
  group: int = 32  # int4 only; 32 divides head_dim, d_model and d_ff of every config.
  embeddings: bool = False  # Quantise the embedding and output head too.

  def validate(self) -> None:
    if self.mode not in MODES:
      raise ValueError(f'--quantize: expected one of {MODES}, got {self.mode!r}')
    if self.group < 1:
      raise ValueError(f'--quantize_group must be positive, got {self.group}')
    if self.embeddings and not self.on:
      raise ValueError('--quantize_embeddings goes with --quantize=int8 or int4')

  @property
  def on(self) -> bool:
    return self.mode != 'none'

  def check_shapes(self, model: Transformer) -> None:
    """int4 groups must tile every contracted axis they split; say which one does not.
    Mixtures of experts are refused: qwix quantises einsums, and the experts' grouped
    matmuls are not einsums, so only the router and attention would be (the router's
    choices changed, the bulk of the weights not)."""
    c = model.cfg
    if self.on and c.moe.enabled:
      raise ValueError(f'--quantize={self.mode}: model.moe.num_experts={c.moe.num_experts}: '
                       'the experts of an MoE model are not quantised yet; evaluate it '
                       'with float weights')
    if self.mode != 'int4':
      return
    for key, size in (('d_model', c.d_model), ('d_ff', c.d_ff), ('head_dim', c.head_size)):
      if size % self.group:
        raise ValueError(f'--quantize_group={self.group} does not divide model.{key} '
                         f'({size}); pick a divisor of {key}')


NONE = QuantConfig()  # Float weights, as trained: every loader's default.


def _qtype(cfg: QuantConfig) -> Any:
  return {'int8': jnp.int8, 'int4': jnp.int4}[cfg.mode]


def _rules(cfg: QuantConfig) -> list[Any]:
  import qwix  # Imported here: only quantised runs need it.

  tile = cfg.group if cfg.mode == 'int4' else None
  return [qwix.QuantizationRule(module_path=BLOCK_PATHS, weight_qtype=_qtype(cfg),
                                tile_size=tile)]


TABLES = (('embed',), ('head',))  # Their vocabulary axis: 0 in embed (V x D), 1 in head.


def _table_recipe(path: tuple[str, ...], cfg: QuantConfig) -> dict[str, Any]:
  """qwix.quantize's arguments for the embedding or head: a scale per vocabulary entry."""
  vocab = TABLES.index(path)
  tiled = {1 - vocab: cfg.group} if cfg.mode == 'int4' else {}
  return {'qtype': _qtype(cfg), 'channelwise_axes': [vocab], 'tiled_axes': tiled}


def quantized_model(model: Transformer, cfg: QuantConfig) -> Transformer:
  """`model` whose blocks read qwix-quantised weights (`model` itself if mode is none)."""
  if not cfg.on:
    return model
  import qwix

  return qwix.quantize_model(model, qwix.PtqProvider(_rules(cfg)))


def _is_quantized(x: Any) -> bool:
  from qwix._src.providers.ptq import WithAux  # qwix exports no public name for it.

  return isinstance(x, WithAux)


def _boxed(qmodel: Transformer, cfg: QuantConfig) -> Any:
  """The quantised model's parameter tree, boxed with logical axes: qwix's recipe for the
  blocks' weights; with `embeddings`, the embedding and head as QArrays too (their
  scales carry the table's axis names; a mesh axis that does not divide is dropped)."""
  import qwix

  boxed = boxed_params(qmodel)
  if not cfg.embeddings:
    return boxed
  boxed = flax.core.unfreeze(boxed)
  for path in TABLES:
    if path[0] in boxed:
      box = boxed[path[0]]
      q = jax.eval_shape(functools.partial(qwix.quantize, **_table_recipe(path, cfg)), box.value)
      boxed[path[0]] = jax.tree.map(lambda x, box=box: box.replace_boxed(x), q)
  return boxed


def abstract_params(qmodel: Transformer, rules: AxisRules, cfg: QuantConfig) -> Any:
  """ShapeDtypeStructs of the quantised parameters, sharded on `rules.mesh`; the kept
  matrices (embedding, head) in the compute dtype, as `quantize_params` leaves them."""
  boxed = _boxed(qmodel, cfg)
  dt = jnp.dtype(qmodel.cfg.dtype)

  def one(x, sharding):
    cast = cfg.on and _kept_matrix(x)  # Float weights (mode none) stay as stored.
    return jax.ShapeDtypeStruct(x.shape, dt if cast else x.dtype, sharding=sharding)

  return jax.tree.map(one, nn.meta.unbox(boxed), tree_shardings(boxed, rules))


def _kept_matrix(x: Any) -> bool:
  # The embedding and an untied head: held in the compute dtype they are read in.
  return jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2


def quantize_params(qmodel: Transformer, params: Any, rules: AxisRules,
                    cfg: QuantConfig) -> Any:
  """Float parameters -> the tree `qmodel` reads, sharded on `rules.mesh` by logical axes.

  qwix's recipe (`how`) is for one layer's weight; with scanned layers each layer of the
  stacked weight gets its own scales (a vmap over the leading layer axis).
  """
  import qwix

  boxed = _boxed(qmodel, cfg)
  flat_abstract = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed), is_leaf=_is_leaf)
  dt = jnp.dtype(qmodel.cfg.dtype)

  def convert(flat):
    out = {}
    for path, aux in flat_abstract.items():
      w = flat[path]
      if _is_quantized(aux):
        how = aux.how
        quantize = functools.partial(
            qwix.quantize, qtype=how.qtype, channelwise_axes=how.channelwise_axes,
            tiled_axes=how.tiled_axes, calibration_method=how.calibration_method)
        if path[0] == 'blocks':
          quantize = jax.vmap(quantize)
        w = aux.replace(array=quantize(w))
      elif isinstance(aux, qwix.QArray):
        w = qwix.quantize(w, **_table_recipe(path, cfg))
      elif _kept_matrix(w):
        w = w.astype(dt)
      out[path] = w
    return flax.traverse_util.unflatten_dict(out)

  shardings = tree_shardings(boxed, rules)
  return jax.jit(convert, out_shardings=shardings)(flax.traverse_util.flatten_dict(params))


def _is_leaf(_: Any, x: Any) -> bool:
  return not isinstance(x, dict)  # A QArray of the embedding is one parameter, not a dict.


def bytes_per_device(params: Any) -> int:
  """Parameter bytes each device holds (int4 counted as half a byte); arrays or
  ShapeDtypeStructs with a sharding, whose shards are all the same shape."""
  total = 0.0
  for leaf in jax.tree.leaves(params):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += np.prod(shard, dtype=np.int64) * jax.dtypes.itemsize_bits(leaf.dtype) / 8
  return int(total)


def load_quantized_run(workdir: str, step: int | None = None, quant: QuantConfig = NONE) -> Run:
  """lm/run/folder.py's `load_run`, then with `quant` on the blocks' weights quantised
  and the run's model reading them so."""
  quant.validate()
  run = load_run(workdir, step, check_model=quant.check_shapes)
  if not quant.on:
    return run
  model = quantized_model(run.model, quant)
  params = quantize_params(model, run.params, run.rules, quant)
  return dataclasses.replace(run, model=model, params=params, quant=quant)


def weights_record(run: Run) -> dict[str, Any]:
  """{"quantize", "param_bytes_per_device"} when quantised (else nothing: the JSON the
  scripts print keeps its plain keys): how the weights are held, and how much."""
  if run.quant is None or not run.quant.on:
    return {}
  return {'quantize': run.quant.mode, 'param_bytes_per_device': bytes_per_device(run.params)}
