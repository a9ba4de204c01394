"""Pieces shared by evaluators: jitted batched inference over an eval split on the mesh."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bigvis import sharding
from data_pipelines import input as data_input

# Keys every evaluator reads; each module's `KEYS` adds its own, and no other key is accepted.
EVAL_KEYS = ("type", "data", "batch_size", "every_steps")
# Those of a zero-shot text classifier, which report entries may also inherit from an `evals` zero-shot entry.
ZEROSHOT_KEYS = ("class_names", "prompts", "tokenizer", "context_length")


def eval_batch_size(cfg: ml_collections.ConfigDict, mesh) -> int:
  """The eval batch, rounded up to a multiple of the data-parallel devices."""
  n = sharding.data_parallel_size(mesh)
  b = int(cfg.get("batch_size", 256))
  return -(-b // n) * n


def batched_outputs(fn: Callable, params: Any, batches: Iterator[dict], mesh) -> dict[str, np.ndarray]:
  """Runs `fn(params, batch)` on each batch; gathers outputs and `_mask` to numpy on every process."""
  outs: dict[str, list] = {}
  for local in batches:
    batch = sharding.global_batch(sharding.split_host_features(local)[0], mesh)
    result = fn(params, batch)
    result["_mask"] = batch["_mask"]
    result = multihost_utils.process_allgather(result, tiled=True)
    for k, v in result.items():
      outs.setdefault(k, []).append(np.asarray(v))
  if not outs:
    return {}
  cat = {k: np.concatenate(v) for k, v in outs.items()}
  mask = cat.pop("_mask").astype(bool)
  return {k: v[mask] for k, v in cat.items()}


def eval_split(cfg: ml_collections.ConfigDict, mesh, where: str) -> data_input.EvalSplit:
  """An evaluator's split, built when the evaluator is (a bad path or pp stops the run at its start),
  and kept: each eval is one `batches()` pass over it."""
  return data_input.EvalSplit(cfg.data, global_batch_size=eval_batch_size(cfg, mesh),
                              process_index=jax.process_index(), process_count=jax.process_count(), where=where)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Share of rows whose true label is among the k highest logits."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))
