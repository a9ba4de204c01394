"""Top-1 accuracy (and loss) of a classifier on a held-out split."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from bigvis.config import check_known
from bigvis.evaluators.common import EVAL_KEYS, batched_outputs, split_batches

KEYS = EVAL_KEYS


class Evaluator:
  """Logs `accuracy` and `loss` over every example of `data` (no example dropped or repeated)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, **_):
    check_known(cfg, KEYS, f"evals.{name}")
    self.cfg, self.name, self.mesh = cfg, name, mesh

    @jax.jit
    def predict(params, batch):
      logits, _ = model.apply({"params": params}, batch["image"], train=False)
      return {"logits": logits, "labels": batch["labels"]}
    self._predict = predict

  def run(self, params) -> dict[str, float]:
    out = batched_outputs(self._predict, params, split_batches(self.cfg, self.mesh, f"evals.{self.name}.data"),
                          self.mesh)
    logits, labels = out["logits"].astype(np.float64), out["labels"]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return {
        "accuracy": float(np.mean(np.argmax(logits, 1) == np.argmax(labels, 1))),
        "loss": float(-np.mean(np.sum(labels * logp, axis=1))),
        "num_examples": int(len(labels)),
    }
