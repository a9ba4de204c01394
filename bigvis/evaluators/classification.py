"""Top-1 accuracy (and loss) of a classifier on a held-out split."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.evaluators.common import EVAL_KEYS, batched_outputs, eval_split

KEYS = EVAL_KEYS


class Evaluator:
  """Logs `accuracy` and `loss` over every example of `data` (no example dropped or repeated)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, **_):
    check_known(cfg, KEYS, f"evals.{name}")
    self.cfg, self.name, self.mesh, self.where = cfg, name, mesh, f"evals.{name}.data"
    # Labels the head can be scored against, checked now rather than failing in numpy after the pass.
    where = self.where
    self._split = eval_split(cfg, mesh, where)
    labels = self._split.dataset.element_spec.get("labels")
    if labels is None:
      raise UserError(f"{where}.pp gives no 'labels' to score the classifier against; end it with onehot(N).")
    classes = getattr(model, "num_classes", None)
    if classes and labels.shape[-1] is not None and labels.shape[-1] != classes:
      raise UserError(f"{where}.pp gives {labels.shape[-1]}-way labels, but the model's head has {classes} "
                      "classes.")

    @jax.jit
    def predict(params, batch):
      logits, _ = model.apply({"params": params}, batch["image"], train=False)
      return {"logits": logits, "labels": batch["labels"]}
    self._predict = predict

  def run(self, params) -> dict[str, float]:
    out = batched_outputs(self._predict, params, self._split.batches(), self.mesh)
    logits, labels = out["logits"].astype(np.float64), out["labels"]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    return {
        "accuracy": float(np.mean(np.argmax(logits, 1) == np.argmax(labels, 1))),
        "loss": float(-np.mean(np.sum(labels * logp, axis=1))),
        "num_examples": int(len(labels)),
    }
