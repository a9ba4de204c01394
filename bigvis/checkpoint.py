"""Orbax checkpoints of the train state, plus a JSON record of the run (step, config).

Saves are atomic (orbax writes to a temporary folder and renames on commit)
and asynchronous. On resume the newest *complete and readable* checkpoint is
used: a damaged newest one is reported in one line and skipped.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from bigvis.errors import UserError


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory` (one folder per step)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    except PermissionError:
      raise UserError(f"checkpoint directory '{self.directory}' is not writable.")

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest checkpoint that restores cleanly, or None."""
    damaged = []
    for step in reversed(self.steps()):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        for bad in damaged:  # so the resumed run can write those steps again
          self._mngr.delete(bad)
        return step, out["state"], out["meta"]
      except Exception as e:  # damaged or incomplete: fall back to the previous one
        damaged.append(step)
        logging.warning("checkpoint at step %d in %s is damaged (%s: %s); trying the previous one.",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
