"""Optimizer from config: schedule, AdamW with a weight-decay mask, clipping, accumulation, freezing."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from bigvis.config import check_known
from bigvis.errors import UserError

OPTIM_KEYS = ("name", "lr", "b1", "b2", "eps", "weight_decay", "schedule", "warmup_steps",
              "min_lr_ratio", "grad_clip_norm", "accumulate_steps", "frozen", "no_decay",
              "momentum")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def schedule_fn(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to `lr`, then cosine/linear decay to `lr*min_lr_ratio`, rsqrt decay towards it, or
  constant."""
  lr, warmup = float(cfg.lr), int(cfg.get("warmup_steps", 0))
  kind, floor = cfg.get("schedule", "cosine"), float(cfg.get("min_lr_ratio", 0.0))
  if kind not in SCHEDULES:
    raise UserError(f"optim.schedule '{kind}' is not one of {', '.join(SCHEDULES)}.")
  if warmup >= total_steps:  # short smoke runs of full recipes: warm up over the whole run
    logging.warning("optim.warmup_steps=%d >= total_steps=%d; warming up over the whole run.", warmup, total_steps)
    warmup = total_steps

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
      decay = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif kind == "linear":
      decay = floor + (1 - floor) * (1 - progress)
    elif kind == "rsqrt":  # towards the floor like the others, which it never reaches
      decay = floor + (1 - floor) * jnp.sqrt(max(warmup, 1) / jnp.maximum(step + 1, max(warmup, 1)))
    else:
      decay = 1.0
    return lr * warm * decay
  return fn


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


# `optim.no_decay` for the ViT and CLIP experiments: the class token and the learned position
# embeddings are offsets added to the tokens, not weights a token is multiplied by; big_vision
# (which decays kernels only) and timm (`no_weight_decay`) leave them undecayed too.
EMBEDDING_OFFSETS = r"(^|/)(cls|pos_embedding)$"

# Never decayed, whatever their shape: biases (attention's are [heads, head_dim]) and norm gains, and
# in a scanned model every parameter has a leading [layers] axis, so shape alone cannot tell them.
NEVER_DECAYED = ("bias", "scale")


def decay_mask(params: Any, no_decay: str) -> Any:
  """True where weight decay applies: weight matrices only (not 1-D parameters such as temperatures,
  nor biases or norm gains of any shape: `NEVER_DECAYED`), and not names matching `no_decay`."""
  flat = traverse_util.flatten_dict(params)
  pattern = re.compile(no_decay) if no_decay else None
  return traverse_util.unflatten_dict({
      k: (v.ndim > 1 and k[-1] not in NEVER_DECAYED and not (pattern and pattern.search(_path_str(k))))
      for k, v in flat.items()})


def frozen_mask(params: Any, frozen: str) -> Any | None:
  """True at the parameters whose path matches `optim.frozen` (None when it is empty). The train step
  stops their gradients, so XLA drops their weight-gradient GEMMs and a wholly frozen tower's backward
  (a Pallas norm or GELU kernel still sums its frozen gains' partials, then discarded), and the
  optimizer leaves them as they are."""
  if not frozen:
    return None
  pattern = re.compile(frozen)
  mask = traverse_util.unflatten_dict({k: bool(pattern.search(_path_str(k)))
                                       for k in traverse_util.flatten_dict(params)})
  if not any(traverse_util.flatten_dict(mask).values()):
    raise UserError(f"optim.frozen '{frozen}' matches no parameter.")
  return mask


def stacks_norms(device: Any) -> bool:
  """Whether `global_norm` should stack small leaves for programs that run on `device`: on GPUs."""
  return device.platform in ("gpu", "cuda", "rocm")


def global_norm(tree: Any, stacked: bool = False) -> jax.Array:
  """The L2 norm of all of a tree's leaves together (float32); with `stacked`, the leaves of one shape
  and dtype summed as one stacked array.

  Why stacked: XLA reduces each array in a kernel or two of its own, so the norm of ViT-B/16's ≈150
  gradients was 263 kernels of a few microseconds each, compiled for an H100; stacked, 22, the
  stacking fused into the reductions (the step's peak memory unchanged, 0.18 GB more traffic). Only on
  GPUs (`stacks_norms`): libtpu (JAX 0.10.2) plans 13 GiB more per chip for CLIP H/14 on v5p-256 with
  stacked leaves, even with only the biases and norm scales stacked (81.1 -> 94.0 GiB)."""
  leaves = jax.tree.leaves(tree)
  if stacked:
    squares = [jnp.sum(jnp.square(jnp.stack([leaves[i] for i in group]).astype(jnp.float32)))
               for group in _same_shape_groups(leaves)]
  else:
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves]
  return jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)


def _same_shape_groups(leaves: list, max_size: int | None = None, specs: list | None = None) -> list[list[int]]:
  """Indices of `leaves` grouped by shape and dtype (and PartitionSpec, with `specs`), only leaves of
  at most `max_size` elements."""
  groups: dict[tuple, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if max_size is None or leaf.size <= max_size:
      key = (leaf.shape, jnp.dtype(leaf.dtype), None if specs is None else specs[i])
      groups.setdefault(key, []).append(i)
  return list(groups.values())


SMALL_LEAF_SIZE = 1 << 16  # biases and norm gains; ViT-B/16's smallest matrix has 589,824 elements


def stack_small_leaves(tree: Any, shardings: Any = None) -> Any:
  """The same values, each group of small leaves of one shape and dtype handed out as slices of one
  stacked array behind an optimisation barrier. With `shardings` (a NamedSharding per leaf, as the
  train state's), only leaves sharded alike are stacked, the stack sharded as they are.

  Why: XLA updates each parameter in a kernel of its own, and most of ViT-B/16's are vectors: 123
  kernels of a few microseconds each, compiled for an H100. Reading slices of one array, the updates
  of a group become siblings XLA merges into a few multi-output kernels (123 -> 12 in isolation;
  the barrier keeps XLA from undoing the stack). Applied to the gradients on GPUs (`stacks_norms`).
  Why by sharding: a stack of vectors sharded differently (LayerNorm gains replicated, a projection's
  bias over `fsdp`) takes one layout, and every other row is resharded back (on an 8-device CPU mesh
  with data, fsdp and tensor axes: 44 all-gathers in the step became 98)."""
  leaves, treedef = jax.tree.flatten(tree)
  shards = None if shardings is None else treedef.flatten_up_to(shardings)
  specs = None if shards is None else [tuple(s.spec) for s in shards]
  for group in _same_shape_groups(leaves, SMALL_LEAF_SIZE, specs):
    if len(group) > 1:
      stacked = jnp.stack([leaves[i] for i in group])
      if shards is not None:
        first = shards[group[0]]
        stacked = jax.lax.with_sharding_constraint(
            stacked, jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec(None, *first.spec)))
      stacked = jax.lax.optimization_barrier(stacked)
      for row, i in enumerate(group):
        leaves[i] = stacked[row]
  return jax.tree.unflatten(treedef, leaves)


def clip_by_global_norm(max_norm: float, stacked: bool = False) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (the same state, so checkpoints carry over, and the same scaling) with
  `global_norm`, which the train step's logged grad_norm also uses: XLA computes the one norm once."""
  def update(updates, state, params=None):
    del params
    norm = global_norm(updates, stacked)
    below = norm < max_norm
    updates = jax.tree.map(lambda t: jax.lax.select(below, t, (t / norm.astype(t.dtype)) * max_norm), updates)
    return updates, state
  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, params: Any, stacked_norm: bool = False
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (transformation, schedule): the learning rate the update of each train step applies.
  `params` may be abstract (shapes only); `stacked_norm`: `global_norm`'s for clipping (`stacks_norms`
  of the devices the step runs on, as the train step's logged norm)."""
  check_known(cfg, OPTIM_KEYS, "optim")
  sched = schedule_fn(cfg, total_steps)
  name = cfg.get("name", "adamw")
  chain = []
  if cfg.get("grad_clip_norm"):
    chain.append(clip_by_global_norm(float(cfg.grad_clip_norm), stacked_norm))
  if name == "adamw":
    if cfg.get("momentum") is not None:
      raise UserError("optim.momentum is set, but only optim.name='sgd' reads it (AdamW's is optim.b1).")
    chain.append(optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8)))
  elif name == "sgd":
    chain.append(optax.trace(decay=cfg.get("momentum", 0.9)))
  else:
    raise UserError(f"optim.name '{name}' is not one of adamw, sgd.")
  if cfg.get("weight_decay", 0.0):  # decoupled: lr * (update + wd * param), for SGD as for AdamW
    chain.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=decay_mask(params, cfg.get("no_decay", ""))))
  # With accumulation the inner transformation counts updates, one per `accumulate` train steps,
  # while the schedule is written in train steps (as total_steps and warmup_steps are): each update
  # takes the schedule's value at the first train step of its window, which is also what is logged.
  accumulate = int(cfg.get("accumulate_steps", 1))
  if accumulate < 1:
    raise UserError(f"optim.accumulate_steps must be at least 1, got {accumulate}.")
  per_update = sched if accumulate == 1 else (lambda count: sched(count * accumulate))
  chain.append(optax.scale_by_learning_rate(per_update))
  tx = optax.chain(*chain)

  frozen = frozen_mask(params, cfg.get("frozen", ""))
  if frozen is not None:
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if accumulate == 1:
    return tx, sched
  return optax.MultiSteps(tx, every_k_schedule=accumulate), lambda step: per_update(jnp.asarray(step) // accumulate)
