"""Robustness to distribution shift (CLIP, Section 3.3): one checkpoint, several evaluation sets, one label space.

Each set is a data section (bundled digits, TFRecord shards or a TFDS split) in
`sets`; all share the class names. For a CLIP run every set is classified
zero-shot with the same text classifier, built exactly as the `zeroshot`
evaluator builds it (class names x prompt templates, ensembled); for a ViT run
with the classifier head. The table lists each set's top-1 and top-5 and its
gap to the reference set, `top1(set) - top1(reference)`: the paper's
"accuracy drop under natural distribution shift", here on whatever shifts the
sets hold. The default for the bundled digits (experiments/clip_ti_digits.py)
is the held-out digits and synthetic shifts of them made by pp ops
(data_pipelines/shifts.py): inverted, blurred, rotated, noisy, thicker
strokes, occluded, pixelated.

Config: `sets` (name -> data section), `reference` (the name the gaps are
measured from; default the first name in sorted order), `zeroshot` (the `evals`
entry whose class names, prompts and tokenizer to use; `class_names`,
`prompts`, `tokenizer`, `context_length` override it), `batch_size`.
Metrics: `<set>/top1`, `<set>/top5`, `<set>/gap` and `mean_gap`, `worst_gap` over the shifted sets.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from bigvis.errors import UserError
from bigvis.evaluators import features as feat
from bigvis.evaluators import reports, zeroshot
from bigvis.evaluators.common import topk_accuracy

KEYS = ("type", "sets", "reference", "batch_size", "every_steps", "zeroshot") + feat.ZEROSHOT_KEYS
SAMPLES = 6  # example images per set in the figure


def shift_ops(pp: str, reference_pp: str) -> str:
  """The ops of `pp` that the reference's pp does not have: a set's shift in words, e.g. 'rotate(30)'."""
  ref = {p.strip().replace(" ", "") for p in reference_pp.split("|")}
  extra = [p.strip() for p in pp.split("|") if p.strip() and p.strip().replace(" ", "") not in ref]
  return "|".join(extra) if extra else ("(reference)" if pp.strip() == reference_pp.strip() else "")


def _display(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Model-input values -> [0, 1] for imshow, on the reference set's scale (so shifts stay visible)."""
  return np.clip((image - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(image)


class Evaluator:
  """Zero-shot (or classifier) accuracy of one checkpoint on each of `sets`, and the gap to the reference."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, config=None, **_):
    where = feat.open_section(cfg, KEYS, name, config)
    self.name, self.where = name, where
    sets = cfg.get("sets") or {}
    if len(sets) < 1:
      raise UserError(f"{where}.sets is empty; give name -> data section for each evaluation set.")
    reference = cfg.get("reference") or sorted(sets)[0]
    if reference not in sets:
      raise UserError(f"{where}.reference '{reference}' is not one of the sets ({', '.join(sorted(sets))}).")
    self.reference = reference
    self.order = [reference] + sorted(s for s in sets if s != reference)
    self.sets = {s: sets[s] for s in self.order}
    self.batch_size = int(cfg.get("batch_size", 256))
    self.clip = feat.is_clip(config, model)
    self.images = feat.ImageFeatures(model, mesh, clip=self.clip)
    self.class_names, self.text = (
        feat.zeroshot_classifier(model, mesh, feat.inherit(cfg, config, where), config, where, required=True)
        if self.clip else (None, None))
    self._result: dict[str, Any] | None = None

  def run(self, params) -> dict[str, float]:
    classifier = None
    if self.clip:
      classifier = zeroshot.ensemble(self.text.embed(params, self.class_names, self.batch_size))
    rows = []
    for s, data in self.sets.items():
      out = self.images(params, data, self.batch_size, f"{self.where}.sets.{s}", samples=SAMPLES)
      logits = out["z"] @ classifier.T if self.clip else out["logits"]
      labels = out["label"]
      n = logits.shape[1]
      bad = labels[(labels < 0) | (labels >= n)]
      if len(bad):
        raise UserError(f"{self.where}.sets.{s} has label {int(bad[0])}, outside the {n} classes.")
      rows.append({"set": s, "examples": int(len(labels)), "top1": topk_accuracy(logits, labels, 1),
                   "top5": topk_accuracy(logits, labels, 5), "samples": out["sample_images"]})
    ref = rows[0]["top1"]
    for r in rows:
      r["gap"] = r["top1"] - ref
    self._result = {"rows": rows}
    metrics = {}
    for r in rows:
      metrics.update({f"{r['set']}/top1": r["top1"], f"{r['set']}/top5": r["top5"]})
      if r["set"] != self.reference:
        metrics[f"{r['set']}/gap"] = r["gap"]
    shifted = [r["gap"] for r in rows[1:]]
    if shifted:
      metrics["mean_gap"], metrics["worst_gap"] = float(np.mean(shifted)), float(min(shifted))
    return metrics

  def report(self) -> reports.Report:
    """Per-set accuracy and gap, with a bar chart and a strip of example images from every set."""
    if self._result is None:
      raise RuntimeError("report() needs run() first.")
    rows = self._result["rows"]
    ref_pp = self.sets[self.reference].get("pp", "")
    table = [{"set": r["set"], "shift (ops added to the reference pp)": shift_ops(self.sets[r["set"]].get("pp", ""),
                                                                                  ref_pp),
              "examples": r["examples"], "top1": r["top1"], "top5": r["top5"],
              "gap to reference": r["gap"] if r["set"] != self.reference else None} for r in rows]
    method = "zero-shot (prompt ensemble)" if self.clip else "the classifier head"
    intro = (f"One checkpoint on {len(rows)} evaluation sets sharing a label space, classified with {method}. "
             f"Gap = top-1 on the set minus top-1 on the reference set '{self.reference}'.")
    notes = []
    if len(rows) > 1:
      worst = min(rows[1:], key=lambda r: r["gap"])
      notes.append(f"Mean gap over the {len(rows) - 1} shifted sets: {np.mean([r['gap'] for r in rows[1:]]):+.4f}; "
                   f"largest drop: '{worst['set']}' ({worst['gap']:+.4f}).")
    samples = {r["set"]: r["samples"] for r in rows}
    ref = samples[self.reference]
    lo, hi = (float(ref.min()), float(ref.max())) if ref.size else (0.0, 1.0)

    def draw(fig):
      left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
      ax = left.subplots()
      y = np.arange(len(rows))
      ax.barh(y, [r["top1"] for r in rows], color=["#3182bd"] + ["#9ecae1"] * (len(rows) - 1))
      ax.axvline(rows[0]["top1"], color="#636363", ls="--", lw=1)
      ax.set_yticks(y, [r["set"] for r in rows])
      ax.invert_yaxis()
      ax.set_xlim(0, 1)
      ax.set_xlabel("top-1 accuracy")
      ax.set_title(f"{self.name}")
      for i, r in enumerate(rows):
        label = f"{r['top1']:.3f}" + (f" ({r['gap']:+.3f})" if i else "")
        ax.text(0.02, i, label, va="center", fontsize=8)
      axes = right.subplots(len(rows), SAMPLES, squeeze=False)
      for i, s in enumerate(self.order):
        for j in range(SAMPLES):
          a = axes[i, j]
          a.set_xticks([])
          a.set_yticks([])
          if j < len(samples[s]):
            a.imshow(_display(samples[s][j], lo, hi), interpolation="nearest")
        axes[i, 0].set_ylabel(s, rotation=0, ha="right", va="center", fontsize=8)
      right.suptitle("first images of each set", fontsize=9)

    return reports.Report(title=f"{self.name}: accuracy under distribution shift",
                          columns=list(table[0]), rows=table, intro=intro, notes=notes, draw=draw,
                          figsize=(10.0, 1.0 + 0.45 * len(rows)))
