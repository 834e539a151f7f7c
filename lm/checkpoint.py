"""Orbax checkpoints of the train state and the data pipeline's position.

RUN/checkpoints/<step>/ holds `state` (params, optimizer state, step, RNG) and `data`
(the pipeline's JSON state), so a resumed run continues with the very next batch.
Saves are asynchronous: the step loop goes on while the arrays are written.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the items this project saves."""

  def __init__(self, workdir: str, *, keep: int = 2, metadata: dict[str, Any] | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'),
                                          metadata=metadata or {})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored['state'], restored['data']

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Just the parameters (for fine-tuning from another run)."""
    target = {'params': abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return self._manager.restore(step, args=args)['state']['params']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
