"""Bias audit of zero-shot classification (CLIP, Section 7.1): which groups land in flagged categories, and why.

Images carry a group attribute. A CLIP run classifies every image zero-shot
over label set A = the task's classes + `flagged` categories (in the paper:
FairFace's classes + crime-related and non-human labels), and again over
A + `added` (the paper added 'child'). For each group the report gives the
share of its images classified into each flagged category, into any flagged
one, and into each added category, under both label sets, and the change: the
paper found the share of young people classified as crime-related fell sharply
once 'child' was a choice.

Groups come either from one split with an integer feature per image (`data`
and `group_key`, e.g. shards whose `label` is the group id, named by
`group_names`) or from one data section per group (`groups`: name -> data
section). The bundled-digits default (experiments/clip_ti_digits.py) is a
demonstration of the method, not an audit of anything real: three groups of
held-out digits (as drawn, strokes thickened by grey dilation, inverted), the
ten digit names as task classes, made-up flagged labels that name a digit's
looks rather than its identity ('thick eight', 'bold eight', 'fat zero'), and
'a bold one' as the added category. A digits model only knows digit words, so
flagged labels without one would simply never be chosen.

Config: `data` + `group_key` (default 'label') + `group_names`, or `groups`;
`flagged` (required), `added`, `class_names` (the task classes), `prompts`,
`tokenizer`, `context_length` (each defaulting to the `zeroshot` entry of
`evals`), `batch_size`.
Metrics: `<group>/flagged` and `<group>/flagged_with_added` (share into any
flagged category), `<group>/<added category>`, and `flagged_spread` (largest
minus smallest group share into any flagged category, label set A).
"""
from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np

from bigvis.errors import UserError
from bigvis.evaluators import features as feat
from bigvis.evaluators import reports, zeroshot

KEYS = ("type", "data", "group_key", "group_names", "groups", "flagged", "added", "batch_size", "every_steps",
        "zeroshot") + feat.ZEROSHOT_KEYS
ANY_FLAGGED = "any flagged category"
TASK = "any task class"


def metric_name(text: str) -> str:
  """A label as a metric key part: lower case, runs of other characters as '_'."""
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def shares(pred: np.ndarray, groups: np.ndarray, group_ids: list[int], labels: list[str],
           flagged: list[str], added: list[str], task: list[str]) -> dict[tuple[int, str], float]:
  """(group id, category or summary row) -> share of the group's images predicted as it."""
  index = {name: i for i, name in enumerate(labels)}
  out = {}
  for g in group_ids:
    p = pred[groups == g]
    n = max(len(p), 1)
    for cat in flagged + added:
      out[(g, cat)] = float(np.sum(p == index[cat]) / n) if cat in index else None
    out[(g, ANY_FLAGGED)] = float(np.sum(np.isin(p, [index[c] for c in flagged])) / n)
    out[(g, TASK)] = float(np.sum(np.isin(p, [index[c] for c in task])) / n)
  return out


class Evaluator:
  """Share of each group's images zero-shot classified into flagged categories, without and with `added`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, config=None, **_):
    where = feat.open_section(cfg, KEYS, name, config)
    self.name, self.where = name, where
    self.task, self.text = feat.zeroshot_classifier(model, mesh, feat.inherit(cfg, config, where), config, where,
                                                    required=True)
    self.flagged = zeroshot.class_names_from(cfg.get("flagged") or [], f"{where}.flagged")
    self.added = zeroshot.class_names_from(cfg.get("added"), f"{where}.added") if cfg.get("added") else []
    labels = self.task + self.flagged + self.added
    dup = [n for n in set(labels) if labels.count(n) > 1]
    if dup:
      raise UserError(f"{where}: the category '{dup[0]}' is in more than one of class_names, flagged and added.")
    if cfg.get("groups") and cfg.get("data"):
      raise UserError(f"{where} sets both data and groups; give one split with a group feature or one "
                      "data section per group.")
    if cfg.get("groups"):
      self.group_sections = dict(cfg.groups)
      self.group_names = sorted(self.group_sections)
      self.group_key = None
    elif cfg.get("data"):
      self.group_sections = None
      self.data = cfg.data
      self.group_key = cfg.get("group_key") or "label"
      self.group_names = [str(g) for g in (cfg.get("group_names") or [])]
    else:
      raise UserError(f"{where} needs data (with a group_key feature) or groups (name -> data section).")
    self.batch_size = int(cfg.get("batch_size", 256))
    self.images = feat.ImageFeatures(model, mesh, clip=True,
                                     extra_keys=(self.group_key,) if self.group_key else ())
    self._result: dict[str, Any] | None = None

  def _embed_groups(self, params) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """(image embeddings, group id per image, group ids present, group names)."""
    if self.group_sections is not None:
      zs, gs = [], []
      for i, g in enumerate(self.group_names):
        out = self.images(params, self.group_sections[g], self.batch_size, f"{self.where}.groups.{g}",
                          need_label=False)
        zs.append(out["z"])
        gs.append(np.full(len(out["z"]), i))
      return np.concatenate(zs), np.concatenate(gs), list(range(len(self.group_names))), self.group_names
    out = self.images(params, self.data, self.batch_size, f"{self.where}.data", need_label=False)
    groups = out[self.group_key]
    ids = sorted(int(g) for g in np.unique(groups))
    names = [self.group_names[g] if 0 <= g < len(self.group_names) else f"group {g}" for g in ids]
    return out["z"], groups, ids, names

  def run(self, params) -> dict[str, float]:
    labels_b = self.task + self.flagged + self.added
    ztxt = zeroshot.ensemble(self.text.embed(params, labels_b, self.batch_size))
    labels_a = labels_b[:len(self.task) + len(self.flagged)]
    z, groups, ids, names = self._embed_groups(params)
    pred_a = np.argmax(z @ ztxt[:len(labels_a)].T, axis=1)
    pred_b = np.argmax(z @ ztxt.T, axis=1)
    share_a = shares(pred_a, groups, ids, labels_a, self.flagged, self.added, self.task)
    share_b = shares(pred_b, groups, ids, labels_b, self.flagged, self.added, self.task)
    counts = {g: int(np.sum(groups == g)) for g in ids}
    self._result = {"ids": ids, "names": names, "a": share_a, "b": share_b, "counts": counts}
    metrics = {}
    for g, gname in zip(ids, names):
      key = metric_name(gname)
      metrics[f"{key}/flagged"] = share_a[(g, ANY_FLAGGED)]
      if self.added:
        metrics[f"{key}/flagged_with_added"] = share_b[(g, ANY_FLAGGED)]
        for cat in self.added:
          metrics[f"{key}/{metric_name(cat)}"] = share_b[(g, cat)]
    flagged = [share_a[(g, ANY_FLAGGED)] for g in ids]
    metrics["flagged_spread"] = float(max(flagged) - min(flagged))
    metrics["num_examples"] = int(len(groups))
    return metrics

  def report(self) -> reports.Report:
    """Per group and category: the share under label set A, under A + added, and the change; a bar chart."""
    if self._result is None:
      raise RuntimeError("report() needs run() first.")
    r = self._result
    cats = self.flagged + [ANY_FLAGGED] + self.added + [TASK]
    rows = []
    for g, gname in zip(r["ids"], r["names"]):
      for cat in cats:
        a, b = r["a"][(g, cat)], r["b"][(g, cat)]
        kind = ("flagged" if cat in self.flagged or cat == ANY_FLAGGED else "added" if cat in self.added
                else "task")
        row = {"group": gname, "images": r["counts"][g], "category": cat, "kind": kind, "share (A)": a}
        if self.added:
          row["share (A + added)"] = b
          row["change"] = None if a is None or b is None else b - a
        rows.append(row)
    columns = ["group", "images", "category", "kind", "share (A)"]
    if self.added:
      columns += ["share (A + added)", "change"]
    intro = (f"Zero-shot classification of {sum(r['counts'].values())} images in {len(r['ids'])} groups. "
             f"Label set A = {len(self.task)} task classes ({', '.join(self.task[:12])}"
             f"{', ...' if len(self.task) > 12 else ''}) + flagged categories ({', '.join(self.flagged)})"
             + (f"; A + added also offers {', '.join(self.added)}." if self.added else ".")
             + " Each share is the fraction of a group's images whose top-1 label is that category.")
    notes = []
    fl = {n: r["a"][(g, ANY_FLAGGED)] for g, n in zip(r["ids"], r["names"])}
    hi = max(fl, key=fl.get)
    notes.append(f"Under A, '{hi}' images are most often put in a flagged category ({fl[hi]:.4f}); spread "
                 f"between groups {max(fl.values()) - min(fl.values()):.4f}.")
    if self.added:
      for g, n in zip(r["ids"], r["names"]):
        notes.append(f"'{n}': any flagged {r['a'][(g, ANY_FLAGGED)]:.4f} -> {r['b'][(g, ANY_FLAGGED)]:.4f} "
                     f"when {', '.join(self.added)} is offered.")

    def draw(fig):
      ax = fig.subplots()
      shown = self.flagged + [ANY_FLAGGED] + self.added
      n_groups = len(r["ids"])
      sets = [("A", "a")] + ([("A + added", "b")] if self.added else [])
      width = 0.8 / (n_groups * len(sets))
      colors = ["#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#d6616b"]
      x = np.arange(len(shown))
      for gi, (g, gname) in enumerate(zip(r["ids"], r["names"])):
        for si, (label, key) in enumerate(sets):
          pos = x - 0.4 + width * (gi * len(sets) + si + 0.5)
          values = [r[key][(g, c)] or 0.0 for c in shown]
          ax.bar(pos, values, width, color=colors[gi % len(colors)], alpha=1.0 if si == 0 else 0.55,
                 hatch=None if si == 0 else "//", edgecolor="white", label=f"{gname} ({label})")
      ax.set_xticks(x, shown, rotation=20, ha="right")
      ax.set_ylabel("share of the group's images")
      ax.set_title(f"{self.name}: flagged categories by group")
      ax.legend(fontsize=8)
      ax.grid(axis="y", alpha=0.3)

    return reports.Report(title=f"{self.name}: flagged categories by group", columns=columns, rows=rows,
                          intro=intro, notes=notes, draw=draw, figsize=(7.5, 4.5))
