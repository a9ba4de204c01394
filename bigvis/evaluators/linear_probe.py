"""Few-shot and full-data linear probes on frozen image embeddings, against zero-shot (CLIP, Section 3.2).

Features are the run's L2-normalised image embeddings (CLIP's image tower, a
ViT's pre-logits), computed once on the mesh for `train_data` and `data`. A
validation split is carved from `train_data` deterministically (the same
`val_fraction` of every class, by a fixed permutation), and the rest is the
pool the probes learn from. For each k in `shots` and each of `seeds` seeds, k
examples per class are drawn from the pool, an L2-regularised multinomial
logistic regression (scikit-learn, L-BFGS) is fitted for every C in `C_grid`,
the C with the best validation accuracy is kept (the smallest on ties), and
its test accuracy is recorded: mean and standard deviation over seeds. "full"
uses the whole pool (deterministic, one fit per C). For CLIP runs the
zero-shot top-1 on the same test split (the same prompts and class names as
the `zeroshot` entry of `evals`) is drawn as a line, and the number of shots at
which the probe matches it is interpolated log-linearly between neighbouring
k, as for the paper's Figure 7 (its Figure 6 is the plot).

Config (`reports.<name>` or `evals.<name>`): `train_data` (required), `data`
(default: the zeroshot entry's), `shots` (default 1, 2, 4, 8, 16), `seeds` (3),
`val_fraction` (0.2), `C_grid` (1e-2 .. 1e4), `max_iter` (1000), `zeroshot`
(name of the `evals` entry whose class names and prompts to use; default the
first zeroshot entry; `class_names`, `prompts`, `tokenizer`, `context_length`
override it), `batch_size`.
Examples without a label (-1, as shards store a missing one, or a one-hot row with no single
class) are left out of both splits and counted.
Metrics: `top1_<k>shot`, `top1_full`, `zeroshot_top1`, `zeroshot_equivalent_shots`
(absent when zero-shot beats even the full-data probe) with `zeroshot_equivalent_shots_is_bound`
(1 when the fewest-shot probe already matches zero-shot, so zero-shot is worth at most that many
shots), `num_train`, `num_test`, `num_unlabeled` (train and test together).
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Sequence

import ml_collections
import numpy as np

from bigvis.errors import UserError
from bigvis.evaluators import features as feat
from bigvis.evaluators.common import topk_accuracy
from bigvis.evaluators import reports, zeroshot

KEYS = ("type", "data", "train_data", "batch_size", "every_steps", "shots", "seeds", "val_fraction", "C_grid",
        "max_iter", "zeroshot") + feat.ZEROSHOT_KEYS
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 7))
# Below this many (examples x dims) one BLAS thread is fastest: threads only add overhead on small fits.
SMALL_FIT = 5_000_000


def _by_class(labels: np.ndarray, indices: np.ndarray) -> list[tuple[int, np.ndarray]]:
  """(class, its indices in ascending order) for each class among `labels[indices]`, in class order:
  one sort, where a scan per class is O(classes x examples) (hours at ImageNet-21k's size)."""
  order = indices[np.argsort(labels[indices], kind="stable")]
  sorted_labels = labels[order]
  starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if len(order) else np.array([], int)
  return [(int(sorted_labels[s]), members) for s, members in zip(starts, np.split(order, starts[1:]))]


def split_validation(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(pool, validation) indices: `fraction` of every class (at least one, if it has two) to validation."""
  rng = np.random.default_rng(seed)
  pool, val = [np.array([], int)], [np.array([], int)]
  for _, members in _by_class(labels, np.arange(len(labels))):
    idx = rng.permutation(members)
    n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
    val.append(idx[:n_val])
    pool.append(idx[n_val:])
  return np.sort(np.concatenate(pool)), np.sort(np.concatenate(val))


def sample_shots(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
  """k pool indices per class (all of a class with fewer), drawn by `seed`."""
  rng = np.random.default_rng([seed, k])
  out = [np.array([], int)]
  for _, members in _by_class(labels, np.asarray(pool)):
    out.append(rng.choice(members, size=min(k, len(members)), replace=False))
  return np.sort(np.concatenate(out))


def fit_probe(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, c_grid: Sequence[float],
              max_iter: int = 1000):
  """Logistic regression for each C (ascending, warm-started); returns (the model with the best val accuracy, its C)."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from threadpoolctl import threadpool_limits
  if len(np.unique(y)) < 2:
    raise UserError(f"a linear probe needs examples of at least two classes, got {len(np.unique(y))}.")
  best, best_acc, best_c = None, -1.0, None
  model = LogisticRegression(max_iter=max_iter, warm_start=True)
  with threadpool_limits(1 if x.size < SMALL_FIT else None), warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    for c in sorted(c_grid):
      model.set_params(C=float(c))
      model.fit(x, y)
      acc = float(np.mean(model.predict(x_val) == y_val)) if len(y_val) else 0.0
      if acc > best_acc:
        best, best_acc, best_c = copy.deepcopy(model), acc, float(c)
  return best, best_c


def equivalent_shots(shots: Sequence[float], accuracy: Sequence[float], target: float) -> tuple[float, str] | None:
  """The k (log-linearly interpolated) where accuracy first reaches `target`: (k, "<=" | "="), or None."""
  for i, (k, acc) in enumerate(zip(shots, accuracy)):
    if acc >= target:
      if i == 0:
        return float(k), "<="
      k0, a0 = shots[i - 1], accuracy[i - 1]
      t = (target - a0) / (acc - a0) if acc > a0 else 1.0
      return float(2 ** (math.log2(k0) + t * (math.log2(k) - math.log2(k0)))), "="
  return None


def _labelled(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The per-example arrays of `features` at its labelled examples (label >= 0)."""
  keep = features["label"] >= 0
  return {k: v[keep] if len(v) == len(keep) else v for k, v in features.items()}


class Evaluator:
  """k-shot and full-data logistic-regression probes on frozen embeddings, with CLIP's zero-shot for reference."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, config=None, **_):
    where = feat.open_section(cfg, KEYS, name, config)
    self.name, self.where = name, where
    self.settings = feat.inherit(cfg, config, where)
    if "train_data" not in cfg:
      raise UserError(f"{where}.train_data is not set; give the labelled split the probes learn from.")
    if "data" not in self.settings:
      raise UserError(f"{where}.data is not set and there is no zeroshot entry in evals to take it from.")
    self.train_data, self.data = cfg.train_data, self.settings["data"]
    if feat.same_split(self.train_data, self.data):
      logging.warning("%s.train_data is the split the probes are tested on: their accuracy is not a held-out "
                      "one.", where)
    shots = list(cfg.get("shots") or DEFAULT_SHOTS)
    if not all(isinstance(k, (int, float)) and float(k).is_integer() and k >= 1 for k in shots):
      raise UserError(f"{where}.shots must be positive integers, got {shots}.")
    self.shots = sorted({int(k) for k in shots})
    self.seeds = int(cfg.get("seeds", 3))
    self.val_fraction = float(cfg.get("val_fraction", 0.2))
    if self.seeds < 1 or not 0 < self.val_fraction < 1:
      raise UserError(f"{where}: seeds must be >= 1 and val_fraction in (0, 1), got {self.seeds} and "
                      f"{self.val_fraction}.")
    self.c_grid = [float(c) for c in (cfg.get("C_grid") or DEFAULT_C_GRID)]
    if any(c <= 0 for c in self.c_grid):
      raise UserError(f"{where}.C_grid values must be positive, got {self.c_grid}.")
    self.max_iter = int(cfg.get("max_iter", 1000))
    self.batch_size = int(cfg.get("batch_size", 256))
    clip = feat.is_clip(config, model)
    self.images = feat.ImageFeatures(model, mesh, clip=clip)
    self.class_names, self.text = (
        feat.zeroshot_classifier(model, mesh, self.settings, config, where, required=False) if clip else (None, None))
    self._result: dict[str, Any] | None = None

  def run(self, params) -> dict[str, float]:
    train = self.images(params, self.train_data, self.batch_size, f"{self.where}.train_data")
    test = self.images(params, self.data, self.batch_size, f"{self.where}.data")
    # Unlabelled examples would be a class of their own in training and a sure miss in testing.
    unlabeled = int(np.sum(train["label"] < 0) + np.sum(test["label"] < 0))
    train, test = (_labelled(split) for split in (train, test))
    if not len(test["label"]):
      raise UserError(f"{self.where}.data has no labelled example.")
    pool, val = split_validation(train["label"], self.val_fraction)
    if not len(val):
      raise UserError(f"{self.where}.train_data has no class with two labelled examples, so no validation "
                      "split to choose the regularisation on.")
    if self.class_names is not None:
      zeroshot.check_labels(test["label"], len(self.class_names), f"{self.where}.data")
    x, y = train["z"].astype(np.float32), train["label"]
    # A k above every class's examples would draw them all: the full-data probe, reported as k shots.
    most = int(np.bincount(y[pool]).max())
    shots = [k for k in self.shots if k <= most]
    if len(shots) < len(self.shots):
      left_out = [k for k in self.shots if k > most]
      if not shots:
        raise UserError(f"{self.where}.shots {left_out}: no class of train_data has that many examples besides "
                        f"the validation split (at most {most}).")
      logging.warning("%s: shots %s left out, no class of train_data has that many examples besides the "
                      "validation split (at most %d).", self.where, left_out, most)
    rows = []
    for k in shots:
      accs, cs, sizes = [], [], []
      for seed in range(self.seeds):
        idx = sample_shots(y, pool, k, seed)
        probe, c = fit_probe(x[idx], y[idx], x[val], y[val], self.c_grid, self.max_iter)
        accs.append(float(np.mean(probe.predict(test["z"]) == test["label"])))
        cs.append(c)
        sizes.append(len(idx))
      rows.append({"shots": k, "accs": accs, "C": cs, "train_examples": int(np.median(sizes))})
    probe, c = fit_probe(x[pool], y[pool], x[val], y[val], self.c_grid, self.max_iter)
    full = {"shots": "full", "accs": [float(np.mean(probe.predict(test["z"]) == test["label"]))], "C": [c],
            "train_examples": int(len(pool))}
    zs = None
    if self.text is not None:
      ztxt = self.text.embed(params, self.class_names, self.batch_size)
      zs = topk_accuracy(zeroshot.zeroshot_logits(test["z"], ztxt), test["label"], 1)
    num_classes = len(np.unique(y[pool]))
    self._result = {"rows": rows, "full": full, "zeroshot": zs, "num_classes": num_classes,
                    "num_train": int(len(y)), "num_val": int(len(val)), "num_test": int(len(test["label"]))}
    metrics = {f"top1_{r['shots']}shot": float(np.mean(r["accs"])) for r in rows}
    metrics["top1_full"] = full["accs"][0]
    if zs is not None:
      metrics["zeroshot_top1"] = zs
      cross = self._crossing()
      if cross is not None:
        metrics["zeroshot_equivalent_shots"] = cross[0]
        # 1 where even the fewest-shot probe matched zero-shot: the k is then only an upper bound.
        metrics["zeroshot_equivalent_shots_is_bound"] = float(cross[1] == "<=")
    metrics.update(num_train=int(len(y)), num_test=int(len(test["label"])), num_unlabeled=unlabeled)
    return metrics

  def _curve(self) -> tuple[list[float], list[float]]:
    """(shots per class, mean accuracy), with "full" placed at the pool's mean examples per class."""
    r = self._result
    ks = [float(row["shots"]) for row in r["rows"]]
    accs = [float(np.mean(row["accs"])) for row in r["rows"]]
    full_k = r["full"]["train_examples"] / max(r["num_classes"], 1)
    if full_k > ks[-1]:
      ks.append(full_k)
      accs.append(r["full"]["accs"][0])
    return ks, accs

  def _crossing(self) -> tuple[float, str] | None:
    zs = self._result["zeroshot"]
    return None if zs is None else equivalent_shots(*self._curve(), zs)

  def report(self) -> reports.Report:
    """Accuracy per k (mean +- std over seeds), the full-data probe and the zero-shot line."""
    if self._result is None:
      raise RuntimeError("report() needs run() first.")
    r, zs = self._result, self._result["zeroshot"]
    table = []
    for row in r["rows"] + [r["full"]]:
      mean = float(np.mean(row["accs"]))
      table.append({"shots per class": row["shots"], "train examples": row["train_examples"],
                    "seeds": len(row["accs"]), "top1 mean": mean, "top1 std": float(np.std(row["accs"])),
                    "C (median)": f"{float(np.median(row['C'])):g}",
                    "minus zero-shot": None if zs is None else mean - zs})
    columns = ["shots per class", "train examples", "seeds", "top1 mean", "top1 std", "C (median)"]
    if zs is not None:
      columns.append("minus zero-shot")
    notes = []
    if zs is not None:
      cross = self._crossing()
      notes.append(f"Zero-shot top-1 on the same {r['num_test']} test images: {zs:.4f}.")
      if cross is None:
        notes.append("Zero-shot beats every probe, including the one trained on all the data.")
      elif cross[1] == "<=":
        notes.append(f"The probe already matches zero-shot at {cross[0]:g} shot(s) per class, the fewest tried.")
      else:
        notes.append(f"The probe matches zero-shot at about {cross[0]:.1f} labelled examples per class "
                     "(log-linear interpolation between neighbouring k).")
    intro = (f"L2-regularised logistic regression (scikit-learn, L-BFGS) on frozen L2-normalised image "
             f"embeddings. {r['num_train']} training images: {r['num_val']} held out for choosing C from "
             f"{', '.join(f'{c:g}' for c in self.c_grid)}, the rest the pool k examples per class are drawn "
             f"from ({self.seeds} seeds; mean and std over seeds). Test: {r['num_test']} images.")
    ks, accs = self._curve()
    cross = self._crossing() if zs is not None else None
    title = f"{self.name}: few-shot linear probes" + (" vs zero-shot" if zs is not None else "")

    def draw(fig):
      ax = fig.subplots()
      kk = [row["shots"] for row in r["rows"]]
      means = np.array([np.mean(row["accs"]) for row in r["rows"]])
      stds = np.array([np.std(row["accs"]) for row in r["rows"]])
      ax.plot(kk, means, "o-", color="#3182bd", label="linear probe (mean over seeds)")
      ax.fill_between(kk, means - stds, means + stds, color="#3182bd", alpha=0.2)
      ticks, labels = list(kk), [str(k) for k in kk]
      if len(ks) > len(kk):
        ax.plot([kk[-1], ks[-1]], [means[-1], accs[-1]], ":", color="#3182bd")
        ax.plot([ks[-1]], [accs[-1]], "s", color="#08519c", label=f"all data ({r['full']['train_examples']})")
        ticks.append(ks[-1])
        labels.append(f"all\n({ks[-1]:.0f})")
      if zs is not None:
        ax.axhline(zs, color="#e6550d", ls="--", label=f"zero-shot ({zs:.3f})")
        if cross is not None and cross[1] == "=":
          ax.axvline(cross[0], color="#e6550d", ls=":", lw=1)
          ax.annotate(f"matches at ~{cross[0]:.1f}", (cross[0], zs), textcoords="offset points",
                      xytext=(4, -14), color="#e6550d")
      ax.set_xscale("log", base=2)
      ax.set_xticks(ticks, labels)
      ax.minorticks_off()
      ax.set_xlabel("labelled training examples per class")
      ax.set_ylabel("top-1 accuracy")
      shown = list(means - stds) + list(accs) + ([zs] if zs is not None else [])
      low = min(shown)
      ax.set_ylim(max(0.0, low - max(0.05, 0.15 * (1 - low))), 1.0 + 0.01)
      ax.grid(alpha=0.3)
      ax.legend(loc="lower right")
      ax.set_title(title)

    return reports.Report(title=title, columns=columns, rows=table,
                          intro=intro, notes=notes, draw=draw)
