"""Starting a run from another run's parameters: fine-tuning, as in the ViT paper (pre-train on
ImageNet-21k, fine-tune on ImageNet-1k at a higher resolution with a new head).

`init.workdir` names a bigvis workdir; its newest checkpoint (or `init.step`) gives every parameter
the new model shares with it. An image tower's learned position embedding of another patch grid is
resized bilinearly (`vit.resize_posemb`). `init.skip`, a regex over parameter paths such as
'^head/', keeps those freshly initialised: a head for another number of classes. Any other parameter
missing from the checkpoint, or of another shape, is an error naming it: a half-loaded model would
train on, unsaid. The optimizer starts afresh. This applies only to a run without checkpoints of
its own; a fine-tuning run that is resumed continues from its own.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from bigvis.config import check_known
from bigvis.errors import UserError

INIT_KEYS = ("workdir", "step", "skip")


def _resizable(path: str, stored: tuple, wanted: tuple) -> bool:
  """An image tower's learned position embedding, [1, tokens, width], of another square patch grid."""
  def square(n: int) -> bool:
    return int(round(np.sqrt(n))) ** 2 == n
  return (path.split("/")[-1] == "pos_embedding" and not path.startswith("txt/") and len(stored) == 3
          and stored[::2] == wanted[::2] and square(stored[1]) and square(wanted[1]))


def _skip_pattern(init: ml_collections.ConfigDict) -> re.Pattern | None:
  try:
    return re.compile(init.get("skip")) if init.get("skip") else None
  except re.error as e:
    raise UserError(f"init.skip '{init.skip}' is not a regular expression ({e}).") from None


def _source_step(init: ml_collections.ConfigDict, ckpt) -> int:
  steps = ckpt.steps()
  if not steps:
    raise UserError(f"init.workdir '{init.workdir}' holds no complete checkpoint to start from.")
  step = init.get("step", -1)
  step = steps[-1] if step < 0 else step
  if step not in steps:
    raise UserError(f"init.step {step} is not a checkpoint of init.workdir '{init.workdir}'; it has steps "
                    f"{', '.join(map(str, steps))}.")
  return step


def _open(init: ml_collections.ConfigDict):
  from bigvis.checkpoint import Checkpointer
  try:
    return Checkpointer(os.path.join(init.workdir, "checkpoints"), reader=True)
  except UserError:  # no checkpoints folder
    raise UserError(f"init.workdir '{init.workdir}' holds no complete checkpoint to start from.") from None


def check_source(init: ml_collections.ConfigDict) -> None:
  """The checks of `init` that need no model, made before a run builds anything."""
  check_known(init, INIT_KEYS, "init")
  _skip_pattern(init)
  if init.get("workdir"):
    ckpt = _open(init)
    try:
      _source_step(init, ckpt)
    finally:
      ckpt.close()


def load_pretrained(init: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
  """`params` (this run's initialised, sharded parameters) with those `init.workdir`'s checkpoint holds,
  placed with `shardings`."""
  from bigvis.models.vit import resize_posemb
  skip = _skip_pattern(init)
  ckpt = _open(init)
  try:
    step = _source_step(init, ckpt)
    stored = ckpt.stored_param_shapes(step)
    if stored is None:
      raise UserError(f"the parameters of the checkpoint at step {step} in '{ckpt.directory}' cannot be read.")

    flat = traverse_util.flatten_dict(params, sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    wanted, resized, fresh = {}, [], []
    for path, x in flat.items():
      if skip and skip.search(path):
        fresh.append(path)
        continue
      if path not in stored:
        raise UserError(f"init.workdir's checkpoint at step {step} has no parameter '{path}'; add it to "
                        "init.skip to train it from its initialisation.")
      elif stored[path] == x.shape:
        wanted[path] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_shardings[path])
      elif _resizable(path, stored[path], x.shape):
        whole = jax.sharding.NamedSharding(flat_shardings[path].mesh, jax.sharding.PartitionSpec())
        wanted[path] = jax.ShapeDtypeStruct(stored[path], x.dtype, sharding=whole)
        resized.append(path)
      else:
        raise UserError(f"parameter '{path}' is {stored[path]} in init.workdir's checkpoint at step {step} "
                        f"but {tuple(x.shape)} in this model; add it to init.skip (e.g. a head for "
                        "other classes) or configure the model as that run's.")
    step, loaded = ckpt.restore_params(traverse_util.unflatten_dict(wanted, sep="/"), step, subset=True)
  finally:
    ckpt.close()

  loaded = traverse_util.flatten_dict(loaded, sep="/")
  for path in resized:  # the grid from the checkpoint's tokens to this model's
    side = int(round(np.sqrt(flat[path].shape[1])))
    loaded[path] = jax.device_put(resize_posemb(np.asarray(loaded[path]), (side, side)), flat_shardings[path])
  unused = sorted(set(stored) - set(flat))
  logging.info("initialised %d of %d parameter arrays from %s at step %d%s%s%s", len(loaded), len(flat),
               init.workdir, step,
               f"; resized {', '.join(resized)}" if resized else "",
               f"; kept fresh (init.skip): {', '.join(fresh)}" if fresh else "",
               f"; not used: {', '.join(unused)}" if unused else "")
  return traverse_util.unflatten_dict({**flat, **loaded}, sep="/")
