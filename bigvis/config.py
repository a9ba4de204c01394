"""Loads experiment files, applies `--set key=value` overrides and validates keys.

An experiment is a Python file with `get_config(arg: str | None) -> ConfigDict`.
Overrides must name keys that exist (a typo is an error naming the closest
valid key), and values are parsed as Python literals and checked against the
type already in the config, so `--set batch_size=64x` fails at once instead of
deep inside a run.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from bigvis.errors import UserError

# Keys every experiment must define, because scripts and the loop rely on them.
REQUIRED_KEYS = (
    "seed", "total_steps", "batch_size", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
)


def split_config_arg(spec: str) -> tuple[str, str | None]:
  """`experiments/x.py:arg` -> (path, arg)."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def resolve_experiment_path(path: str) -> str:
  """Accepts a path, or a bare experiment name looked up in `experiments/`."""
  if os.path.isfile(path):
    return path
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for candidate in (os.path.join("experiments", path + ".py"),
                    os.path.join(here, "experiments", path),
                    os.path.join(here, "experiments", path + ".py")):
    if os.path.isfile(candidate):
      return candidate
  known = sorted(f[:-3] for f in os.listdir(os.path.join(here, "experiments"))
                 if f.endswith(".py") and not f.startswith("_")) if os.path.isdir(
                     os.path.join(here, "experiments")) else []
  hint = difflib.get_close_matches(os.path.basename(path).removesuffix(".py"), known, n=1)
  raise UserError(f"experiment file '{path}' does not exist"
                  + (f"; did you mean experiments/{hint[0]}.py?" if hint else "."))


def load_experiment_module(path: str):
  """Imports an experiment file by path (experiments are files, not a package; one may reuse another)."""
  path = resolve_experiment_path(path)
  module_spec = importlib.util.spec_from_file_location(
      "bigvis_experiment_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"experiment file '{path}' has a syntax error at line {e.lineno}: {e.msg}.")
  return module


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """Imports `get_config` from an experiment file and calls it with the `:arg`."""
  path, arg = split_config_arg(spec)
  path = resolve_experiment_path(path)
  module = load_experiment_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"experiment file '{path}' defines no get_config(arg) function.")
  config = module.get_config(arg) if arg is not None else module.get_config(None)
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  return config


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf and sub-config key as a dotted path."""
  keys = []
  for k, v in config.items():
    full = f"{prefix}{k}"
    keys.append(full)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(all_keys(v, full + "."))
  return keys


# Names users bring from other frameworks, which spelling alone matches badly (difflib pairs
# `learning_rate` with `min_lr_ratio`).
_SYNONYMS = {"learning_rate": "lr", "steps": "total_steps", "num_steps": "total_steps",
             "train_steps": "total_steps", "global_batch_size": "batch_size", "wd": "weight_decay",
             "model": "tensor"}


def _closest(key: str, candidates: Iterable[str], where: str = "") -> str:
  """"; the closest valid key is 'X'" for an unknown `key` among `candidates` (both under `where`)."""
  candidates = list(candidates)
  prefix, _, last = key.rpartition(".")
  synonym = f"{prefix}.{_SYNONYMS[last]}" if prefix and last in _SYNONYMS else _SYNONYMS.get(last)
  if synonym in candidates:
    match = [synonym]
  else:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
  return f"; the closest valid key is '{where + '.' if where else ''}{match[0]}'" if match else ""


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # bare strings: --set model.variant=B/16


def _coerce(key: str, value: Any, current: Any) -> Any:
  """Checks an override's type against the value it replaces."""
  if current is None and isinstance(value, str) and value.lower() in ("true", "false"):
    return value.lower() == "true"  # an optional flag left at None (e.g. model.fused_qkv=false)
  if current is None or value is None or isinstance(current, ml_collections.ConfigDict):
    return value  # None unsets an optional key (e.g. model.representation_size=None)
  if isinstance(current, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
  elif isinstance(current, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif isinstance(current, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(current, str):
    return value if isinstance(value, str) else str(value)
  elif isinstance(current, (tuple, list)):
    if isinstance(value, (tuple, list)):
      return type(current)(value)
  else:
    return value
  name = type(current).__name__
  raise UserError(f"--set {key}={value!r}: expected {'an' if name[0] in 'aeiou' else 'a'} {name} "
                  f"like {current!r}, got {type(value).__name__}.")


def optional_keys(config: ml_collections.ConfigDict, parent: str) -> tuple[str, ...]:
  """Keys the component reading section `parent` accepts though an experiment file may leave them
  out (`optim.momentum`, `evals.<name>.every_steps`, a data section's), so `--set` can add them."""
  node = config_get(config, parent)
  if not isinstance(node, ml_collections.ConfigDict):
    return ()
  parts = parent.split(".")
  if parent == "optim":
    from bigvis.optim import OPTIM_KEYS
    return OPTIM_KEYS
  if "source" in node:  # a data section, wherever it sits (data.train, evals.<name>.data, report sets)
    from data_pipelines.sources import SOURCE_KEYS
    return SOURCE_KEYS
  if len(parts) == 2 and parts[0] in ("evals", "reports"):
    from bigvis.evaluators import keys_of
    return keys_of(node.get("type", parts[1]), parts[0])
  return ()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `key=value` strings; unknown keys are errors naming the closest key. A key the file
  left out may be set where the section's reader takes it (`optional_keys`)."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy with unlocked types
  for item in overrides:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise UserError(f"--set '{item}' is not of the form key=value.")
    parent, _, leaf = key.rpartition(".")
    node = config
    if parent:
      for part in parent.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          raise UserError(f"unknown config key '{key}'{_closest(key, all_keys(config))}.")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f"unknown config key '{key}'{_closest(key, all_keys(config))}.")
    if leaf not in node:
      optional = optional_keys(config, parent) if parent else ()
      if leaf not in optional:
        candidates = all_keys(config) + [f"{parent}.{k}" for k in optional]
        raise UserError(f"unknown config key '{key}'{_closest(key, candidates)}.")
      with node.unlocked():
        node[leaf] = None  # absent reads as the reader's default; the value below replaces it
    value = _coerce(key, _parse_value(raw), node[leaf])
    with node.unlocked():
      node[leaf] = value
  return config


NONFINITE_MODES = ("stop", "skip")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the keys the loop relies on exist and have sane values."""
  keys = set(all_keys(config))
  for k in REQUIRED_KEYS:
    if k not in keys:
      raise UserError(f"the experiment does not set the required key '{k}'.")
  for k in ("total_steps", "batch_size", "log_every_steps"):
    if int(config_get(config, k)) <= 0:
      raise UserError(f"config key '{k}' must be positive, got {config_get(config, k)}.")
  # Matched exactly where the loop reads it: any other spelling would turn off both the stop and
  # the skip, and a run would train on, and checkpoint, NaNs.
  nonfinite = config_get(config, "nonfinite", "stop")
  if nonfinite not in NONFINITE_MODES:
    raise UserError(f"config key 'nonfinite' is {nonfinite!r}, not one of {', '.join(NONFINITE_MODES)}.")


def config_get(config: ml_collections.ConfigDict, dotted: str, default: Any = None) -> Any:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return default
    node = node[part]
  return node


def check_known(section: ml_collections.ConfigDict | dict, allowed: Iterable[str], where: str) -> None:
  """Rejects keys a component does not read, so none is silently ignored."""
  allowed = list(allowed)
  for k in section.keys():
    if k not in allowed:
      raise UserError(f"unknown config key '{where}.{k}'{_closest(k, allowed, where)}.")


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Experiment file + overrides -> validated config."""
  config = apply_overrides(load_experiment(spec), overrides)
  validate(config)
  return config


def base_config() -> ml_collections.ConfigDict:
  """Defaults every experiment starts from; experiment files override what they need."""
  c = ml_collections.ConfigDict()
  c.experiment = ""
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = []          # [[logical_axis, mesh_axes], ...] over bigvis.sharding.DEFAULT_RULES
  c.log_every_steps = 50
  c.eval_every_steps = 0          # 0: evaluate only at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.nonfinite = "stop"            # or "skip": drop non-finite updates and count them
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, schedule="cosine",
      warmup_steps=100, min_lr_ratio=0.0, grad_clip_norm=1.0, accumulate_steps=1, frozen="", no_decay=""))
  # Fine-tuning: parameters from another run's checkpoint (bigvis.warm_start); "" starts from scratch.
  c.init = ml_collections.ConfigDict(dict(workdir="", step=-1, skip=""))  # step -1: its newest
  c.data = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict()
  return c
