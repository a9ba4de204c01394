"""Evaluator registry: `config.evals.<name>.type` picks the class; metrics log as `eval/<name>/<metric>`."""
from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from bigvis.errors import UserError

# type -> module; each module defines `Evaluator` (imported lazily: some need sklearn/matplotlib).
EVALUATORS = {
    "classification": "bigvis.evaluators.classification",
    "zeroshot": "bigvis.evaluators.zeroshot",
    "retrieval": "bigvis.evaluators.retrieval",
    "linear_probe": "bigvis.evaluators.linear_probe",
    "robustness": "bigvis.evaluators.robustness",
    "bias_audit": "bigvis.evaluators.bias_audit",
}


# type -> the models (config.model.name) it reads: a classifier's logits, or CLIP's two towers.
MODELS = {"classification": ("vit",), "zeroshot": ("clip",), "retrieval": ("clip",),
          "linear_probe": ("vit", "clip"), "robustness": ("vit", "clip"), "bias_audit": ("clip",)}


def check_model(kind: str, where: str, model_name: str | None) -> None:
  """An evaluator on a model it cannot read is one line, not a traceback from inside it."""
  if model_name and kind in MODELS and model_name not in MODELS[kind]:
    raise UserError(f"{where} is a {kind} evaluator, which reads a {' or '.join(MODELS[kind])} model; this "
                    f"run's is {model_name}.")


def check_types(section: ml_collections.ConfigDict, where: str, model_name: str | None = None) -> None:
  """Every entry names a known evaluator type, for the run's model: a typo fails at start, not hours
  later. Reports run only under `bigvis eval`, so an `every_steps` in one would be ignored: it is refused."""
  for name, cfg in (section or {}).items():
    kind = cfg.get("type", name)
    if kind not in EVALUATORS:
      raise UserError(f"{where}.{name}.type '{kind}' is not one of {', '.join(sorted(EVALUATORS))}.")
    check_model(kind, f"{where}.{name}", model_name)
    if where == "reports" and cfg.get("every_steps") is not None:
      raise UserError(f"reports.{name}.every_steps is set, but reports run only with `bigvis eval`; "
                      f"move the entry to evals to run it during training.")


def keys_of(kind: str, where: str) -> tuple[str, ...]:
  """The config keys an evaluator type reads (none for an unknown type), under `evals` or `reports`."""
  if kind not in EVALUATORS:
    return ()
  keys = importlib.import_module(EVALUATORS[kind]).KEYS
  return tuple(k for k in keys if k != "every_steps") if where == "reports" else tuple(keys)


def build_evaluators(evals: ml_collections.ConfigDict, **context: Any) -> dict[str, Any]:
  """name -> Evaluator for every entry of `config.evals`."""
  config = context.get("config")
  check_types(evals, "evals", config.model.get("name") if config is not None else None)
  out = {}
  for name, cfg in (evals or {}).items():
    kind = cfg.get("type", name)
    module = importlib.import_module(EVALUATORS[kind])
    out[name] = module.Evaluator(cfg, name=name, **context)
  return out
