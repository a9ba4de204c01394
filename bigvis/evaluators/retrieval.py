"""Image-text retrieval: Recall@1/5/10 image->text and text->image over a split of image-caption pairs.

Each example of the split is one (image, caption) pair, and a retrieved item
counts only when it is the query's own partner, as in the standard Flickr30k /
MSCOCO protocol for one caption per image. Captions (or images) that are
identical tie exactly, and then no model could prefer the partner over its
copies; instead of letting the array order decide, recall is the expectation
over a uniformly random order of the tied items: with `g` items scoring
strictly higher than the partner and `t` others scoring the same,
Recall@k = clip((k - g) / (t + 1), 0, 1). Identical captions are found by
identical token ids; identical images by identical embeddings. On the bundled
digits, a handful of test images share each exact caption and a caption fits
every image of its digit, so recall there is far below 1 even for a perfect
model; it is a relative measure.

Config (`evals.<name>`): `data` whose pp tokenizes the caption into `labels`
(e.g. `...|tokenize(16, model='bundled:digits')`), `batch_size`.
Metrics: `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`, `t2i_r10`, `num_examples`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np

from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.evaluators.common import EVAL_KEYS, batched_outputs, eval_split

KEYS = EVAL_KEYS
KS = (1, 5, 10)


def _groups(x: np.ndarray) -> np.ndarray:
  """Per-row id shared by identical rows."""
  _, inverse = np.unique(x.reshape(len(x), -1), axis=0, return_inverse=True)
  return inverse.reshape(-1)


def _expected_recall(queries: np.ndarray, keys: np.ndarray, partner: np.ndarray, key_groups: np.ndarray,
                     ks: Sequence[int], chunk: int) -> dict[int, float]:
  """Recall@k of each query's partner among all keys, in expectation over random orders of tied keys."""
  # Keys in one group are identical, so each group is scored once and weighted by its size.
  num_groups = int(key_groups.max()) + 1
  counts = np.bincount(key_groups, minlength=num_groups).astype(np.float64)
  first = np.zeros(num_groups, np.int64)
  first[key_groups] = np.arange(len(key_groups))  # any member represents its (identical) group
  unique_keys = keys[first].astype(np.float32)
  partner_group = key_groups[partner]
  totals = {k: 0.0 for k in ks}
  for lo in range(0, len(queries), chunk):
    scores = queries[lo:lo + chunk].astype(np.float32) @ unique_keys.T
    rows = np.arange(len(scores))
    own = scores[rows, partner_group[lo:lo + chunk]][:, None]
    better = (scores > own).astype(np.float64) @ counts
    tied = (scores == own).astype(np.float64) @ counts - 1  # other items tied with the partner
    for k in ks:
      totals[k] += float(np.sum(np.clip((k - better) / (tied + 1), 0.0, 1.0)))
  return {k: totals[k] / len(queries) for k in ks}


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = KS, text_ids: np.ndarray | None = None,
                chunk: int = 1024) -> dict[str, float]:
  """Pairs (zimg[i], ztxt[i]) -> {i2t_r<k>, t2i_r<k>}; `text_ids` (e.g. tokens) marks identical captions."""
  zimg, ztxt = np.asarray(zimg), np.asarray(ztxt)
  if zimg.shape != ztxt.shape or zimg.ndim != 2:
    raise ValueError(f"need paired [n, dim] embeddings, got {zimg.shape} and {ztxt.shape}.")
  n = len(zimg)
  text_groups = _groups(ztxt if text_ids is None else np.asarray(text_ids))
  image_groups = _groups(zimg)
  pairs = np.arange(n)
  i2t = _expected_recall(zimg, ztxt, pairs, text_groups, ks, chunk)
  t2i = _expected_recall(ztxt, zimg, pairs, image_groups, ks, chunk)
  return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


class Evaluator:
  """Recall@{1,5,10} in both directions over every pair of `data` (none dropped or repeated)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, **_):
    where = f"evals.{name}"
    check_known(cfg, KEYS, where)
    if "data" not in cfg:
      raise UserError(f"{where}.data is not set; give a split of image-caption pairs.")
    self.cfg, self.name, self.mesh = cfg, name, mesh
    self._split = eval_split(cfg, mesh, f"{where}.data")

    @jax.jit
    def embed(params, batch):
      if "labels" not in batch or batch["labels"].ndim != 2:
        raise UserError(f"{where}.data.pp must tokenize the caption into 'labels' "
                        "(e.g. ...|tokenize(16, model='bundled:digits')).")
      zimg, ztxt, _ = model.apply({"params": params}, batch["image"], batch["labels"], train=False)
      return {"zimg": zimg, "ztxt": ztxt, "tokens": batch["labels"]}
    self._embed = embed

  def run(self, params) -> dict[str, float]:
    """Embeds every pair of the split with the current params and scores both directions."""
    out = batched_outputs(self._embed, params, self._split.batches(), self.mesh)
    if not out:
      raise UserError(f"evals.{self.name}.data yielded no examples.")
    metrics = recall_at_k(out["zimg"], out["ztxt"], text_ids=out["tokens"])
    metrics["num_examples"] = int(len(out["zimg"]))
    return metrics
