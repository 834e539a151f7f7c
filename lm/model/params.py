"""The parameter tree, from shapes alone, and its two layer layouts.

`boxed_params` is the one abstract initialisation: every parameter a ShapeDtypeStruct
boxed with its logical axis names. The optimizer reads the names (`param_axes`), a
restore reads the shapes laid out on a mesh (`abstract_params`), and quantisation boxes
its own tree from it (lm/eval/quantize.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model.transformer import Transformer
from lm.sharding import AxisRules, tree_shardings


def boxed_params(model: Transformer) -> Any:
  """The parameters as ShapeDtypeStructs in nn.LogicallyPartitioned boxes; nothing is
  allocated."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda k: model.init({'params': k}, tokens),
                        jax.random.PRNGKey(0))['params']


def param_axes(model: Transformer) -> Any:
  """Each parameter's logical axis names (a tuple per parameter)."""
  return jax.tree.map(lambda box: tuple(box.names), boxed_params(model),
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(model: Transformer, rules: AxisRules | None = None,
                    sharding: jax.sharding.Sharding | None = None) -> Any:
  """ShapeDtypeStructs of the parameters: a restore target, laid out by `rules`' logical
  axes, or all on one `sharding` (say, the host, for an export)."""
  boxed = boxed_params(model)
  shardings = (tree_shardings(boxed, rules) if rules is not None else
               jax.tree.map(lambda _: sharding, nn.meta.unbox(boxed)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Unscanned params (block_0 ... block_{L-1}) -> scanned layout (blocks, leading L)."""
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  layers = [params[f'block_{i}'] for i in range(num_layers)]
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Scanned params -> one subtree per layer."""
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(num_layers):
    out[f'block_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['blocks'])
  return out
