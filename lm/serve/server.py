"""A trained run as a Served: the run loaded, its engine warmed up, the scheduler running."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from lm.eval import quantize, sampling
from lm.serve import api
from lm.serve.engine import Engine
from lm.serve.scheduler import Scheduler

log = logging.getLogger(__name__)
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/backend_compile_duration')


class CompileCounter:
  """Counts programs traced or compiled in this process (jax.monitoring's events), so the
  server can say when a request made one after warm-up: each costs that request seconds."""

  def __init__(self) -> None:
    self.count = 0
    self.baseline = 0
    jax.monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, event: str, _duration: float, **_: Any) -> None:
    if event in COMPILE_EVENTS:
      self.count += 1
      if self.baseline:
        log.warning('a program was compiled while serving (%d since warm-up)', self.since())

  def close(self) -> None:
    """Stops listening (the listener is process-wide)."""
    jax.monitoring.unregister_event_duration_listener(self._event)

  def settle(self) -> None:
    """Marks the end of warm-up."""
    self.baseline = self.count

  def since(self) -> int:
    return self.count - self.baseline


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'page.html')


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """The server's own settings (scripts/serve.py's flags)."""

  slots: int = 8  # Requests decoded together.
  max_waiting: int = 64  # Requests queued for a slot before new ones get 429.
  max_tokens: int = 0  # New tokens a request may ask; 0 = the context.
  max_body_bytes: int = 1 << 20
  api_key: str | None = None
  name: str = ''  # The model's name in /v1/models; '' = the run folder's name.

  def validate(self) -> None:
    for key in ('slots', 'max_waiting', 'max_body_bytes'):
      if getattr(self, key) < 1:
        raise ValueError(f'--{key} must be positive, got {getattr(self, key)}')
    if self.max_tokens < 0:
      raise ValueError(f'--max_tokens must be >= 0, got {self.max_tokens}')


def load(workdir: str, step: int | None, quant: quantize.QuantConfig,
         cfg: ServeConfig) -> tuple[api.Served, dict[str, Any]]:
  """The Served for a run folder, warmed up and running; and what warm-up compiled."""
  cfg.validate()
  run = quantize.load_quantized_run(workdir, step, quant)
  context = run.cfgs.run.seq_len
  engine = Engine(sampling.run_model(run), run.params, cfg.slots, context, run.tokenizer.vocab_size)
  scheduler = Scheduler(engine, run.tokenizer.decode, run.tokenizer.eos_id, cfg.max_waiting)
  from lm.serve import inspect  # The page's second view.

  inspector = inspect.Inspector(run, context)
  compiles = CompileCounter()
  warm = scheduler.warm_up()
  inspector.warm_up()
  compiles.settle()
  scheduler.start()
  with open(PAGE, encoding='utf-8') as f:
    page = f.read()
  name = cfg.name or os.path.basename(os.path.normpath(workdir))
  limits = api.Limits(context, min(cfg.max_tokens or context, context), cfg.max_body_bytes)
  served = api.Served(name, run.tokenizer, scheduler, limits, cfg.api_key, inspector.answer,
                      page, compiles)
  return served, {'model': name, 'step': run.step, 'context': context, 'slots': cfg.slots,
                  **warm, **quantize.weights_record(run)}
