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


def check_types(section: ml_collections.ConfigDict, where: str) -> None:
  """Every entry names a known evaluator type: a typo fails at start, not hours later. Reports run
  only under `bigvis eval`, so an `every_steps` in one would be ignored: it is refused."""
  for name, cfg in (section or {}).items():
    kind = cfg.get("type", name)
    if kind not in EVALUATORS:
      raise UserError(f"{where}.{name}.type '{kind}' is not one of {', '.join(sorted(EVALUATORS))}.")
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
  check_types(evals, "evals")
  out = {}
  for name, cfg in (evals or {}).items():
    kind = cfg.get("type", name)
    module = importlib.import_module(EVALUATORS[kind])
    out[name] = module.Evaluator(cfg, name=name, **context)
  return out
