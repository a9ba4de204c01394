"""Orbax checkpoints of the train state, plus a JSON record of the run (step, config).

Saves are atomic (orbax writes to a temporary folder and renames on commit)
and asynchronous. On resume the newest *complete and readable* checkpoint is
used: a damaged newest one is reported in one line and set aside (moved to
`damaged/`, not deleted); when none is readable the run stops rather than start
afresh over them. The record holds a checksum of every array's bits, checked on
restore: bytes changed on disk (a bad copy, a disk fault) would otherwise load
as weights, unsaid, and surface as a NaN or a wrong accuracy.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from bigvis.errors import UserError


def _save_replicated_shards_whole_on_cpu() -> None:
  """Orbax splits each replicated shard among its replicas so that they copy it to the host in
  parallel (its default but where JAX_PLATFORMS names a GPU). CPU devices share the host's memory, so
  there it only costs a compiled slice per array shape at a process's first save (88 compiles, about
  3 s, for ViT-Ti on the 8-device test mesh): the whole shard is written by one replica instead."""
  if jax.default_backend() != "cpu":
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_use_replica_parallel", None) is False:  # done already (once: orbax warns of it)
    return
  # Orbax's default handler keeps array metadata (typed PRNG keys restore as keys): so does this one.
  whole = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                         array_metadata_store=getattr(current, "_array_metadata_store", None))
  with _orbax_warnings_muted():  # orbax warns of the override it was asked for, at every CPU command
    ocp.type_handlers.register_type_handler(jax.Array, whole, override=True)


@contextlib.contextmanager
def _orbax_warnings_muted() -> Iterator[None]:
  """Orbax's warnings (absl's logger) off for a call whose warning is expected and says nothing."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """sum_i w_i * (2i + 1) mod 2^32 over the array's bits as 32-bit words w_i (i: the global flat index):
  any change of one word changes it, and it is the same whatever the sharding (integer sums)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    words = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  elif x.dtype.itemsize == 2:
    words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:  # 4 bytes, or 8 split into two words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  index = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape)
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any, prefix: str = "") -> dict[str, list]:
  """Array path (`jax.tree_util.keystr`) -> [checksum of its bits, dtype], computed where the arrays are."""
  sums = jax.device_get(_checksums(tree))
  dtypes = jax.tree.map(lambda x: str(x.dtype), tree)
  return {prefix + jax.tree_util.keystr(path): [int(v), d] for (path, v), d in
          zip(jax.tree_util.tree_flatten_with_path(sums)[0], jax.tree.leaves(dtypes))}


def check_checksums(tree: Any, saved: dict[str, list] | None, prefix: str = "") -> None:
  """Raises ValueError naming the first array whose bits differ from those saved. Records written
  before checksums pass, as do arrays restored into another dtype (whose bits differ by design)."""
  if not saved:
    return
  for path, (value, dtype) in checksums(tree, prefix).items():
    if path in saved and saved[path][1] == dtype and saved[path][0] != value:
      raise ValueError(f"{path} differs from what was saved (checksum {value}, saved {saved[path][0]})")


def _one_line(e: Exception) -> str:
  """'Type: the first line of the message', without TensorStore's pointer to its details (a repr)."""
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text.split(' See full TensorStore details')[0][:200]}"


def _drop_abandoned_reads() -> None:
  """After a failed restore, the reads still in flight finish on the event loop orbax has closed (each
  prints 'RuntimeError: Event loop is closed'), and orbax's abandoned read coroutines print their own
  error when collected: hundreds of tracebacks, as unraisable exceptions, around the one line that says
  what failed. Those two kinds (and only those) are dropped, for the process."""
  previous = sys.unraisablehook
  if getattr(previous, "_bigvis_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    if "/orbax/" in getattr(getattr(source, "cr_code", None), "co_filename", ""):
      return
    previous(unraisable)
  hook._bigvis_drops_abandoned_reads = True
  sys.unraisablehook = hook


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory` (one folder per step)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, reader: bool = False):
    """`reader=True` opens an existing folder only to read (evaluation while a run may still train)."""
    self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://… as it is
    _save_replicated_shards_whole_on_cpu()
    if reader and not epath.Path(self.directory).is_dir():
      raise UserError(f"'{self.directory}' does not exist: the run has written no checkpoint yet.")
    options = ocp.CheckpointManagerOptions(max_to_keep=None if reader else keep, create=not reader,
                                           enable_async_checkpointing=async_save and not reader)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    except PermissionError:
      raise UserError(f"checkpoint directory '{self.directory}' is not writable.")

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    meta = {**meta, "checksums": checksums(state)}
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest checkpoint that restores cleanly, or None when there is none.
    Newer damaged ones are set aside (`set_aside`); when none restores it is an error, not a fresh start
    that would overwrite them."""
    damaged, first_error = [], ""
    _drop_abandoned_reads()
    for step in reversed(self.steps()):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        check_checksums(out["state"], out["meta"].get("checksums"))
        for bad in damaged:  # so the resumed run can write those steps again
          self.set_aside(bad)
        return step, out["state"], out["meta"]
      except Exception as e:  # damaged or incomplete: fall back to the previous one
        damaged.append(step)
        first_error = first_error or _one_line(e)
        logging.warning("checkpoint at step %d in %s is damaged (%s); trying the previous one.",
                        step, self.directory, first_error)
    if damaged:
      raise UserError(f"none of the checkpoints in '{self.directory}' (steps {', '.join(map(str, sorted(damaged)))}) "
                      f"can be restored, the newest failing with {first_error}; move them away to start afresh.")
    return None

  def set_aside(self, step: int) -> None:
    """Moves a damaged step's folder to `damaged/<step>-<time>` in the checkpoint directory, where
    orbax does not look (it lists step folders only): the run can write that step again, and nothing
    is deleted. Where the file system cannot rename a folder (object stores), it is deleted."""
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / "damaged" / f"{step}-{int(time.time())}"
    moved = False
    if jax.process_index() == 0 and src.exists():
      try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        moved = True
        logging.warning("damaged checkpoint at step %d moved to %s.", step, dst)
      except Exception as e:  # noqa: BLE001 - any failure falls back to orbax's delete
        logging.warning("could not move damaged checkpoint %s aside (%s); deleting it.", src, type(e).__name__)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      moved = bool(multihost_utils.broadcast_one_to_all(np.asarray(moved)))
    if moved:
      self._mngr.reload()
    else:
      self._mngr.delete(step)

  def restore_params(self, abstract_params: Any, step: Optional[int] = None, *,
                     subset: bool = False) -> tuple[int, Any]:
    """(step, params) of the newest readable (or the given) checkpoint; the optimizer state is not read.
    With `subset`, `abstract_params` may name only some of the stored parameters (`warm_start`)."""
    steps = self.steps()
    if not steps:
      raise UserError(f"'{self.directory}' holds no complete checkpoint yet.")
    if step is not None and step not in steps:
      raise UserError(f"there is no checkpoint at step {step} in '{self.directory}'; have steps "
                      f"{', '.join(map(str, steps))}.")
    item = {"params": abstract_params}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    expected = {"/".join(map(str, k)): tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params).items()}
    _drop_abandoned_reads()
    for s in ([step] if step is not None else reversed(steps)):
      # A partial restore fills the model's parameters and drops the rest without a word: a model
      # configured otherwise than the trained one (a pooling, a head) would evaluate half-restored.
      stored = self.stored_param_shapes(s)
      if stored is not None and subset:
        stored = {k: v for k, v in stored.items() if k in expected}
      if stored is not None and stored != expected:
        extra, missing = sorted(set(stored) - set(expected)), sorted(set(expected) - set(stored))
        reshaped = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
        what = (f"parameters the model lacks ({', '.join(extra[:3])})" if extra else
                f"no {', '.join(missing[:3])}" if missing else
                f"{reshaped[0]} of shape {stored[reshaped[0]]}, not {expected[reshaped[0]]}")
        raise UserError(f"the checkpoint at step {s} in '{self.directory}' holds {what}: it was trained with "
                        "another model config than the one given.")
      try:
        params = self._mngr.restore(s, args=args)["state"]["params"]
        check_checksums(params, self.read_meta(s).get("checksums"), prefix="['params']")
        return s, params
      except Exception as e:  # damaged, or another model's checkpoint
        if step is not None or s == steps[0]:
          raise UserError(f"the checkpoint at step {s} in '{self.directory}' cannot be restored into this "
                          f"run's model ({_one_line(e)}).")
        logging.warning("checkpoint at step %d in %s is not readable (%s); trying the previous one.",
                        s, self.directory, type(e).__name__)
    raise AssertionError("unreachable")

  def stored_param_shapes(self, step: int) -> Optional[dict[str, tuple]]:
    """Path -> shape of the parameters saved at `step`, from the checkpoint's metadata (None where it
    cannot be read: the restore then reports what is wrong)."""
    try:
      # Read as a plain PyTree checkpoint, the item folder has no step-level metadata file: orbax's
      # 'Metadata file does not exist' warning at every `bigvis eval` is muted.
      with _orbax_warnings_muted():
        metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
      tree = getattr(metadata, "item_metadata", metadata)
      params = getattr(tree, "tree", tree)["params"]
      return {"/".join(map(str, k)): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
    except Exception:
      return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
