"""Random model-ready batches, without TensorFlow: `bigvis bench` and `aot` run where only JAX is installed."""
from __future__ import annotations

import ml_collections
import numpy as np


def synthetic_batch(model_cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
  """Random model-ready arrays shaped for `model_cfg`: for benchmarks and smoke tests of full-size configs."""
  rng = np.random.default_rng(seed)
  image_cfg = model_cfg.image if model_cfg.name == "clip" else model_cfg
  size = int(image_cfg.get("image_size", 224))
  out = {"image": rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)}
  if model_cfg.name == "clip":
    text = model_cfg.text
    length, vocab = int(text.get("context_length", 77)), int(text.get("vocab_size", 49408))
    out["labels"] = rng.integers(1, vocab, (batch_size, length)).astype(np.int32)
  else:
    classes = int(model_cfg.get("num_classes", 1000))
    out["labels"] = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch_size)]
  return out
