"""Frozen embeddings of a run, computed on the mesh: the first step of linear probes, robustness and bias audits.

`ImageFeatures` embeds every example of a data section once (CLIP: the image
tower's L2-normalised embedding; ViT: the L2-normalised pre-logits, and the
classifier's logits), returning them with the integer class label and any
other integer features asked for (e.g. a `group` attribute). `TextClassifier`
turns class names and prompt templates into zero-shot class embeddings exactly
as the `zeroshot` evaluator does (bigvis/evaluators/zeroshot.py), so every
report's zero-shot numbers agree with `eval/zeroshot/top1`.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.evaluators import zeroshot
from bigvis.evaluators.common import ZEROSHOT_KEYS, batched_outputs, eval_batch_size, eval_split
from data_pipelines import input as data_input



def section_path(name: str, config: ml_collections.ConfigDict | None) -> str:
  """`evals.<name>` or `reports.<name>`: where an evaluator's settings live, for error messages."""
  in_reports = config is not None and name in (config.get("reports") or {})
  return f"reports.{name}" if in_reports else f"evals.{name}"


def open_section(cfg: ml_collections.ConfigDict, keys: Sequence[str], name: str,
                 config: ml_collections.ConfigDict | None) -> str:
  """Checks a report evaluator's keys (an unknown one names the closest); returns where they live."""
  where = section_path(name, config)
  check_known(cfg, keys, where)
  return where


def zeroshot_classifier(model, mesh, settings: dict, config: ml_collections.ConfigDict | None, where: str, *,
                        required: bool) -> tuple[list[str] | None, TextClassifier | None]:
  """(class names, TextClassifier) from inherited zero-shot `settings`; (None, None) when optional and unset."""
  if not settings.get("class_names"):
    if required:
      raise UserError(f"{where}.class_names is not set and there is no zeroshot entry in evals to take it from.")
    return None, None
  names = zeroshot.class_names_from(settings["class_names"], f"{where}.class_names", min_names=2)
  return names, TextClassifier(model, mesh, settings, config, where)


def zeroshot_section(config: ml_collections.ConfigDict | None, name: str | None, where: str) -> dict:
  """The `evals` entry named `name` (default: the first of type zeroshot), or {} when there is none."""
  evals = (config.get("evals") or {}) if config is not None else {}
  if name:
    if name not in evals:
      raise UserError(f"{where}.zeroshot names '{name}', which is not an entry of config.evals "
                      f"(have {', '.join(sorted(evals)) or 'none'}).")
    return dict(evals[name])
  for ev in evals.values():
    if ev.get("type") == "zeroshot":
      return dict(ev)
  return {}


def inherit(cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict | None, where: str) -> dict:
  """Zero-shot settings (class names, prompts, tokenizer, data) from `cfg`, else from its zeroshot entry."""
  base = zeroshot_section(config, cfg.get("zeroshot"), where)
  out = {k: base.get(k) for k in ZEROSHOT_KEYS + ("data",) if base.get(k) not in (None, "", ())}
  out.update({k: cfg.get(k) for k in ZEROSHOT_KEYS + ("data",) if cfg.get(k) not in (None, "", ())})
  return out


def is_clip(config: ml_collections.ConfigDict | None, model) -> bool:
  """Whether the run is a two-tower CLIP model (it has a text tower for zero-shot classifiers)."""
  if config is not None and "model" in config:
    return config.model.get("name") == "clip"
  return hasattr(model, "text")


def same_split(a: Any, b: Any) -> bool:
  """Whether two data sections read the same examples (source, split, shards, name), whatever their pp."""
  keys = ("source", "split", "shards", "name", "data_dir")
  return all(dict(a).get(k) == dict(b).get(k) for k in keys)


def single_label(labels: jax.Array) -> jax.Array:
  """Class ids of one-hot rows [batch, classes]: the single largest entry's, or -1 (no label) for an
  all-zero row or a multi-hot one, which argmax would give their lowest class."""
  top = jnp.max(labels, axis=-1, keepdims=True)
  single = (top[:, 0] > 0) & (jnp.sum(labels == top, axis=-1) == 1)
  return jnp.where(single, jnp.argmax(labels, axis=-1), -1).astype(jnp.int32)


class ImageFeatures:
  """Embeds every example of a data section on the mesh: {z, label, logits (ViT), <extra keys>}."""

  def __init__(self, model, mesh, *, clip: bool, extra_keys: Sequence[str] = ()):
    self.mesh, self.clip, self.extra_keys = mesh, clip, tuple(extra_keys)
    self._splits: dict[tuple, data_input.EvalSplit] = {}  # built at a section's first pass, then reused

    @jax.jit
    def embed(params, batch):
      out = {}
      if clip:
        out["z"], _, _ = model.apply({"params": params}, batch["image"], None, train=False)
      else:
        out["logits"], aux = model.apply({"params": params}, batch["image"], train=False)
        z = aux["pre_logits"].astype(jnp.float32)
        out["z"] = z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)
      if "label" in batch:
        out["label"] = batch["label"].astype(jnp.int32)
      elif "labels" in batch and batch["labels"].ndim == 2 and jnp.issubdtype(batch["labels"].dtype, jnp.floating):
        out["label"] = single_label(batch["labels"])
      for k in self.extra_keys:
        out[k] = batch[k].astype(jnp.int32)
      return out
    self._embed = embed

  def __call__(self, params: Any, data: ml_collections.ConfigDict | dict, batch_size: int,
               where: str, need_label: bool = True, samples: int = 0) -> dict[str, np.ndarray]:
    """One pass over `data` (every example exactly once) -> numpy arrays on every process.

    `samples` > 0 adds `sample_images`: the first preprocessed images this process saw, for figures.
    """
    data = ml_collections.ConfigDict(dict(data))
    cfg = ml_collections.ConfigDict({"batch_size": batch_size, "data": data})
    key = (where, batch_size, json.dumps(data.to_dict(), sort_keys=True, default=str))
    if key not in self._splits:
      self._splits[key] = eval_split(cfg, self.mesh, where)
    batches = self._splits[key].batches()
    first = next(batches, None)
    if first is None:
      raise UserError(f"{where} yielded no examples.")
    missing = [k for k in self.extra_keys if k not in first]
    if missing:
      raise UserError(f"{where} has no integer feature '{missing[0]}' (have {', '.join(sorted(first))}).")
    if need_label and "label" not in first and not ("labels" in first and np.asarray(first["labels"]).ndim == 2
                                                    and np.asarray(first["labels"]).dtype.kind == "f"):
      raise UserError(f"{where} has no integer 'label' feature nor one-hot 'labels' "
                      f"(have {', '.join(sorted(first))}).")

    def chain():
      yield first
      yield from batches
    out = {k: np.asarray(v) for k, v in batched_outputs(self._embed, params, chain(), self.mesh).items()}
    if samples:
      real = np.asarray(first["_mask"]).astype(bool)
      out["sample_images"] = np.asarray(first["image"])[real][:samples]
    return out


class TextClassifier:
  """Class names x prompt templates -> [classes, templates, dim] text embeddings, as the zeroshot evaluator."""

  def __init__(self, model, mesh, settings: dict, config: ml_collections.ConfigDict | None, where: str):
    self.mesh = mesh
    self.tokenizer = zeroshot.text_tokenizer(settings, config, where)
    self.templates = zeroshot.templates_from(settings.get("prompts"), f"{where}.prompts")
    self._embed_text = zeroshot.text_embedder(model)

  def embed(self, params: Any, class_names: Sequence[str], batch_size: int,
            templates: Sequence[str] | None = None) -> np.ndarray:
    """[classes, templates, dim] L2-normalised prompt embeddings of every class in every template."""
    templates = list(templates or self.templates)
    tokens = self.tokenizer.encode(zeroshot.prompt_texts(class_names, templates))
    cfg = ml_collections.ConfigDict({"batch_size": batch_size})
    z = zeroshot.embed_texts(self._embed_text, params, tokens, eval_batch_size(cfg, self.mesh), self.mesh)
    return z.reshape(len(class_names), len(templates), -1)
