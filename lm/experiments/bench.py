"""Throughput, MFU, compile time and memory of a config's train step.

Synthetic tokens, so the figures are the model's and not the input pipeline's (which is
measured separately as `data_tokens_per_sec`). `aot=True` compiles from abstract shapes
without allocating the state: it says whether a config fits its mesh before any hardware
is rented.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data.batch import Batch
from lm.config import Configs, parse, parse_values, with_values
from lm.eval.quantize import QuantConfig, bytes_per_device
from lm.model import flops
from lm.sharding import AxisRules, batch_sharding
from lm.train.step import abstract_state, init_state, jit_train_step, step_parts


def _setup(cfgs: Configs, devices: Sequence[jax.Device] | None = None):
  rules = AxisRules.from_config(cfgs.mesh, devices)
  parts = step_parts(cfgs, rules)
  return rules, parts.model, parts.tx, parts.step_fn


def memory_per_device(compiled: Any) -> int | None:
  """Peak bytes one device needs for the step: live arguments, outputs and temporaries.

  Donated inputs alias their outputs, so aliased bytes are counted once.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def memory_breakdown(compiled: Any) -> dict[str, int]:
  """The train state's share (arguments) and the step's temporaries, per device."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {'state_bytes_per_device': int(stats.argument_size_in_bytes),
          'temp_bytes_per_device': int(stats.temp_size_in_bytes)}


def xla_flops(compiled: Any) -> float | None:
  """XLA's own count of the step's FLOPs on one device (None where not reported)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _model_figures(cfgs: Configs, tokens_per_sec: float | None) -> dict[str, Any]:
  seq = cfgs.run.seq_len
  peak = flops.device_peak_flops()
  out: dict[str, Any] = {
      'params': flops.num_params(cfgs.model),
      'active_params': flops.active_params(cfgs.model),
      'flops_per_token': flops.flops_per_token(cfgs.model, seq),
      'flops_per_token_causal': flops.flops_per_token(cfgs.model, seq, causal=True),
      'device_kind': jax.devices()[0].device_kind,
      'peak_flops_per_device': peak,
  }
  if tokens_per_sec is not None:
    n = jax.device_count()
    out['mfu'] = flops.mfu(tokens_per_sec, cfgs.model, seq, n, peak)
    out['mfu_causal'] = (None if peak is None else tokens_per_sec *
                         out['flops_per_token_causal'] / (peak * n))
    out['tflops_per_sec'] = tokens_per_sec * out['flops_per_token'] / 1e12
  return out


def _synthetic_batch(rng: np.random.Generator, cfgs: Configs, shape: tuple[int, int]) -> Batch:
  """Random tokens; with data.segment_ids, documents of about 512 tokens in each row."""
  tokens = rng.integers(0, cfgs.model.vocab_size, shape, np.int32)
  if not cfgs.data.segment_ids:
    return Batch(tokens)
  starts = rng.random(shape) < 1 / 512
  return Batch(tokens, segment_ids=1 + np.cumsum(starts, axis=1, dtype=np.int32))


def _abstract_batch(cfgs: Configs, rules: AxisRules, shape: tuple[int, int]) -> Batch:
  rows = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(rules, shape))
  return Batch(rows, segment_ids=rows if cfgs.data.segment_ids else None)


def _abstract_step(cfgs: Configs, rules: AxisRules, model: Any, tx: Any, step_fn: Any):
  """The jitted train step and the abstract (state, batch) it takes, allocating nothing."""
  state = abstract_state(model, tx, cfgs.run.seq_len, rules)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  shape = (cfgs.run.batch_size, cfgs.run.seq_len + 1)
  batch = _abstract_batch(cfgs, rules, shape)
  return jit_train_step(step_fn, shardings, rules, shape), (state, batch)


def lower_step(config: ml_collections.ConfigDict, *,
               devices: Sequence[jax.Device] | None = None,
               platforms: Sequence[str] | None = None) -> jax.stages.Lowered:
  """The config's train step for its mesh, lowered from shapes alone (nothing allocated).

  `devices`: the mesh's devices (default: all). `platforms`: lower for another backend
  than this machine's, e.g. ('cuda',) on a CPU, to read the StableHLO a GPU would get.
  """
  cfgs = parse(config)
  step, args = _abstract_step(cfgs, *_setup(cfgs, devices))
  return step.trace(*args).lower(lowering_platforms=tuple(platforms) if platforms else None)


def run_aot(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compiles the train step for the config's mesh from shapes alone."""
  cfgs = parse(config)
  rules, *parts = _setup(cfgs)
  step, args = _abstract_step(cfgs, rules, *parts)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  return {'config': cfgs.run.name, 'devices': jax.device_count(),
          'mesh': dict(rules.mesh.shape), 'tokens_per_sec': None, 'step_ms': None,
          'mfu': None, 'tflops_per_sec': None,
          'compile_s': time.perf_counter() - t0,
          'memory_bytes_per_device': memory_per_device(compiled),
          'xla_flops_per_device': xla_flops(compiled),
          'data_tokens_per_sec': None,
          **memory_breakdown(compiled), **_model_figures(cfgs, None)}


def plan_inference(config: ml_collections.ConfigDict, quant: QuantConfig) -> dict[str, Any]:
  """Compiles the scoring step (forward pass and per-token NLL over batch_size x seq_len)
  of the model with its weights quantised as `quant` says, from shapes alone: whether
  a quantised model fits its mesh, before any checkpoint is read."""
  from lm.eval.perplexity import make_eval_step
  from lm.eval.quantize import abstract_params, quantized_model
  from lm.model.transformer import Transformer

  cfgs = parse(config)
  quant.validate()
  rules = AxisRules.from_config(cfgs.mesh)
  model = Transformer(dataclasses.replace(cfgs.model, remat=False, dropout=0.0), rules)
  quant.check_shapes(model)
  model = quantized_model(model, quant)
  params = abstract_params(model, rules, quant)
  shape = (cfgs.run.batch_size, cfgs.run.seq_len + 1)
  mask_shape = (shape[0], shape[1] - 1)
  mask = jax.ShapeDtypeStruct(mask_shape, jnp.int32, sharding=batch_sharding(rules, mask_shape))
  batch = _abstract_batch(cfgs, rules, shape)
  step = make_eval_step(model, rules, shape, jax.tree.map(lambda x: x.sharding, params),
                        np.zeros(cfgs.model.vocab_size, np.int32), loss_chunk=cfgs.loss.chunk)
  t0 = time.perf_counter()
  compiled = step.lower(params, batch, mask).compile()
  return {'config': cfgs.run.name, 'devices': jax.device_count(),
          'mesh': dict(rules.mesh.shape), 'quantize': quant.mode,
          'compile_s': time.perf_counter() - t0,
          'param_bytes_per_device': bytes_per_device(params),
          'memory_bytes_per_device': memory_per_device(compiled),
          'temp_bytes_per_device': memory_breakdown(compiled).get('temp_bytes_per_device'),
          'params': flops.num_params(cfgs.model),
          'active_params': flops.active_params(cfgs.model)}


def run_steps(config: ml_collections.ConfigDict, *, steps: int = 20,
              warmup: int = 3) -> dict[str, Any]:
  """Times `steps` train steps after `warmup` untimed ones, on synthetic tokens."""
  cfgs = parse(config)
  rules, model, tx, step_fn = _setup(cfgs)
  state, shardings = init_state(model, tx, cfgs.run.seq_len, rules, cfgs.run.seed)
  shape = (cfgs.run.batch_size, cfgs.run.seq_len + 1)
  sharding = batch_sharding(rules, shape)
  rng = np.random.default_rng(0)
  # A few distinct batches already on the device, so the host does no work in the loop.
  batches = [jax.device_put(_synthetic_batch(rng, cfgs, shape), sharding) for _ in range(4)]
  t0 = time.perf_counter()
  compiled = jit_train_step(step_fn, shardings, rules, shape).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 4])
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 4])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  tokens_per_sec = steps * cfgs.run.batch_size * cfgs.run.seq_len / elapsed
  out = {'config': cfgs.run.name, 'devices': jax.device_count(),
         'mesh': dict(rules.mesh.shape), 'tokens_per_sec': tokens_per_sec,
         'step_ms': 1000 * elapsed / steps, 'mfu': None, 'tflops_per_sec': None,
         'compile_s': compile_s, 'memory_bytes_per_device': memory_per_device(compiled),
         'xla_flops_per_device': xla_flops(compiled), 'data_tokens_per_sec': None,
         'loss': float(metrics['loss'])}
  out.update(memory_breakdown(compiled))
  out.update(_model_figures(cfgs, tokens_per_sec))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:  # Live allocator peak: GPUs and TPUs report it.
    out['peak_bytes_in_use'] = int(stats['peak_bytes_in_use'])
  return out


def data_throughput(config: ml_collections.ConfigDict, *, batches: int = 20,
                    seconds: float = 5.0) -> dict[str, Any]:
  """Tokens/s the real input pipeline (read, clean, tokenise, pack) sustains for the config:
  data.throughput.pipeline_rate, at least `batches` batches and `seconds` timed."""
  from data.throughput import pipeline_rate
  from data.tokenizer import Tokenizer, load_or_train

  cfgs = parse(config)
  if cfgs.data.tokenizer:
    tokenizer = Tokenizer(cfgs.data.tokenizer)
  else:
    # A throwaway file: the benchmark must not write into a real run.
    path = os.path.join(tempfile.mkdtemp(prefix='bench-'), 'tok.model')
    tokenizer = load_or_train(cfgs.data, path, cfgs.model.vocab_size)
  rate = pipeline_rate(cfgs.data, tokenizer, cfgs.run.batch_size, cfgs.run.seq_len,
                       seed=cfgs.run.seed, batches=batches, seconds=seconds)
  return {'data_tokens_per_sec': rate['tokens_per_sec'], 'data_batches': rate['batches'],
          'data_seconds': rate['seconds']}


def variants(config: ml_collections.ConfigDict,
             vary: Sequence[str]) -> list[tuple[str, ml_collections.ConfigDict]]:
  """The config as given, then one copy per value of each `KEY=V1,V2,...` in `vary`.

  Each key changes alone from the given config (one lever at a time, not every
  combination). `KEY=V;KEY2=V2` is one copy with all of its keys set together: a recipe
  that changes several levers at once, measured against the same base. Values are Python
  literals (128, True, 'a') or else plain strings.
  """
  out = [('base', config)]
  for spec in vary:
    if ';' in spec:
      pairs = [parse_values(part, '--vary') for part in spec.split(';')]
      if any(len(values) != 1 for _, values in pairs):
        raise ValueError(f'--vary={spec!r}: a combined variant sets one value per key')
      out.append(_variant(config, [(key, values[0]) for key, values in pairs]))
    else:
      key, values = parse_values(spec, '--vary')
      out.extend(_variant(config, [(key, value)]) for value in values)
  return out


def _variant(config: ml_collections.ConfigDict,
             settings: list[tuple[str, str]]) -> tuple[str, ml_collections.ConfigDict]:
  variant, _ = with_values(config, settings, '--vary')
  return ';'.join(f'{key}={value}' for key, value in settings), variant


def checkpoint_timing(config: ml_collections.ConfigDict, *, repeats: int = 3) -> dict[str, Any]:
  """Seconds to save and restore the config's train state, and what checksums cost of it.

  Medians over `repeats` saves (into a temporary folder, committed) and restores (with
  verification); `checksum_s` is computing the checksums of the state once more, the
  part of each save and of each restore that checksums add.
  """
  from lm.run import checksums
  from lm.run.checkpoint import Checkpointer

  cfgs = parse(config)
  rules, model, tx, _ = _setup(cfgs)
  state, _ = init_state(model, tx, cfgs.run.seq_len, rules, cfgs.run.seed)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  t0 = time.perf_counter()
  checksums.of_arrays(state)  # Compiles once per state structure.
  first = time.perf_counter() - t0
  timings: dict[str, list[float]] = {'save_s': [], 'restore_s': [], 'checksum_s': []}
  with tempfile.TemporaryDirectory(prefix='lm-bench-ckpt-') as tmp:
    ckpt = Checkpointer(tmp, keep=repeats + 1)
    try:
      for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        ckpt.save(step, state, {'position': step})
        ckpt.wait()
        timings['save_s'].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(step, abstract))
        timings['restore_s'].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checksums.of_arrays(state)
        timings['checksum_s'].append(time.perf_counter() - t0)
    finally:
      ckpt.close()
  return {'config': cfgs.run.name, 'devices': jax.device_count(),
          'state_bytes': sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
          'checksum_first_s': first, **{k: float(np.median(v)) for k, v in timings.items()}}
