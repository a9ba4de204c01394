"""Evaluation reports: one table as `<name>.csv` and `<name>.md`, and a `<name>.png` where a picture helps.

An evaluator that has more to say than a few scalars returns a `Report` from
`report()` after `run()`; `bigvis eval` writes it under `WORKDIR/reports/`.
Every file is written to a temporary name in the same folder and renamed, so a
reader (or a killed run) never sees half a report. Figures are drawn with
matplotlib's Agg canvas directly: the global backend (and pyplot's state) is
left alone, so this works headless and inside notebooks alike.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import uuid
from typing import Any, Callable, Sequence

Figure = Any  # matplotlib.figure.Figure; imported lazily


@dataclasses.dataclass
class Report:
  """A titled table (rows of column -> value), Markdown notes around it, and an optional figure."""
  title: str
  columns: list[str]
  rows: list[dict[str, Any]]
  intro: str = ""                     # Markdown before the table: what was measured and how
  notes: list[str] = dataclasses.field(default_factory=list)  # Markdown lines after the table
  draw: Callable[[Figure], None] | None = None  # fills a matplotlib Figure; None: no png
  figsize: tuple[float, float] = (6.4, 4.2)


def format_value(value: Any) -> str:
  """Numbers as humans read them in a table: 4 significant decimals for fractions, plain ints."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if math.isnan(value):
      return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
  return str(value)


def _cell(value: Any) -> str:
  return format_value(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
  """A GitHub-flavoured Markdown table; numbers right-aligned."""
  numeric = [bool(rows) and all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
             for c in columns]
  lines = ["| " + " | ".join(columns) + " |",
           "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def to_markdown(name: str, report: Report, with_png: bool) -> str:
  parts = [f"# {report.title}", ""]
  if report.intro:
    parts += [report.intro.strip(), ""]
  parts += [markdown_table(report.columns, report.rows), ""]
  for note in report.notes:
    parts += [note, ""]
  if with_png:
    parts += [f"![{name}]({name}.png)", ""]
  return "\n".join(parts)


def to_csv(report: Report) -> str:
  """The table as CSV with full precision (repr of floats), blank for missing cells."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(report.columns)
  for r in report.rows:
    w.writerow(["" if r.get(c) is None else r.get(c) for c in report.columns])
  return buf.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
  import tensorflow as tf  # tf.io.gfile: a workdir may be a bucket's (gs://…)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)


def render_png(report: Report) -> bytes:
  """The report's figure as PNG bytes, drawn on a private Agg canvas (no pyplot, backend untouched)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure as MplFigure
  fig = MplFigure(figsize=report.figsize, dpi=120, layout="constrained")
  FigureCanvasAgg(fig)
  report.draw(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def write_report(directory: str, name: str, report: Report) -> list[str]:
  """Writes `<name>.csv`, `<name>.md` (and `<name>.png`) into `directory`; returns their paths."""
  import tensorflow as tf
  tf.io.gfile.makedirs(directory)
  paths = []
  png = render_png(report) if report.draw is not None else None
  chart = os.path.join(directory, f"{name}.png")
  if png is not None:
    paths.append(chart)
    _atomic_write(chart, png)
  elif tf.io.gfile.exists(chart):  # an earlier run's chart would sit beside this report as if its own
    tf.io.gfile.remove(chart)
  paths.insert(0, os.path.join(directory, f"{name}.csv"))
  _atomic_write(paths[0], to_csv(report).encode())
  paths.insert(1, os.path.join(directory, f"{name}.md"))
  _atomic_write(paths[1], to_markdown(name, report, png is not None).encode())
  return paths


def metrics_report(name: str, metrics: dict[str, Any], intro: str = "") -> Report:
  """The fallback report of an evaluator without its own: one row per metric."""
  rows = [{"metric": k, "value": v} for k, v in metrics.items()]
  return Report(title=f"{name}", columns=["metric", "value"], rows=rows, intro=intro)


def zeroshot_report(name: str, metrics: dict[str, Any], templates: Sequence[str],
                    class_names: Sequence[str] = ()) -> Report:
  """Zero-shot accuracy of each prompt template alone and of their ensemble, from the evaluator's metrics."""
  rows = []
  for i, t in enumerate(templates):
    key = f"top1_template{i}"
    if key in metrics:
      rows.append({"classifier": t, "templates": 1, "top1": metrics[key]})
  rows.append({"classifier": "ensemble (mean of normalised prompt embeddings)" if len(templates) > 1
               else templates[0] if templates else "ensemble",
               "templates": len(templates), "top1": metrics.get("top1"), "top5": metrics.get("top5")})
  notes = []
  single = [r["top1"] for r in rows[:-1]]
  if single:
    best = max(single)
    gain = metrics.get("top1", float("nan")) - best
    notes.append(f"Ensemble top-1 {format_value(metrics.get('top1'))} vs the best single template "
                 f"{format_value(best)} ({gain:+.4f}) and their mean {format_value(sum(single) / len(single))}.")
  intro = (f"Zero-shot classification of {metrics.get('num_examples', '?')} images"
           + (f" over {len(class_names)} classes" if class_names else "")
           + ": each class is described by every prompt template, and a class embedding is the "
             "renormalised mean of its L2-normalised prompt embeddings (CLIP's prompt ensembling).")

  def draw(fig):
    ax = fig.subplots()
    labels = [r["classifier"] for r in rows[:-1]] + [f"ensemble of {len(templates)}"]
    values = [r["top1"] for r in rows]
    colors = ["#9ecae1"] * (len(rows) - 1) + ["#3182bd"]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), [lab if len(lab) <= 40 else lab[:37] + "..." for lab in labels])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("top-1 accuracy")
    ax.set_title(f"{name}: single templates vs ensemble")
    for i, v in enumerate(values):
      ax.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=9)

  return Report(title=f"{name}: prompt templates and their ensemble", columns=["classifier", "templates",
                                                                              "top1", "top5"],
                rows=rows, intro=intro, notes=notes, draw=draw if single else None,
                figsize=(7.0, 1.2 + 0.45 * len(rows)))
