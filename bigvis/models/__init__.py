"""Model registry: `model.name` in the config picks the module, the rest are its fields."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.models.clip import CLIP
from bigvis.models.layers import resolve_attention_impl
from bigvis.models.text import TEXT_VARIANTS, TextTransformer
from bigvis.models.vit import ViT, parse_variant

MODELS = {"vit": ViT, "text": TextTransformer, "clip": CLIP}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _resolve_dtypes(kwargs: dict) -> dict:
  if "dtype" in kwargs:
    if kwargs["dtype"] not in DTYPES:
      raise UserError(f"model dtype '{kwargs['dtype']}' is not one of {', '.join(DTYPES)}.")
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  return kwargs


def _defaults(cls) -> dict:
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name") or f.default is dataclasses.MISSING:
      continue
    value = f.default
    out[f.name] = next((k for k, v in DTYPES.items() if v is value), value)  # dtypes by name
  return out


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A `model` section with every field present (defaults filled in), so `--set model.<any field>` works.

  For CLIP, `image=` and `text=` dicts are completed the same way.
  """
  if name not in MODELS:
    raise UserError(f"model.name '{name}' is not one of {', '.join(MODELS)}.")
  cls = MODELS[name]
  check_known(overrides, _fields(cls), "model")
  cfg = {"name": name, **_defaults(cls), **overrides}
  if name == "clip":
    for tower, tower_name in (("image", "vit"), ("text", "text")):
      section = dict(overrides.get(tower, {}))
      check_known(section, _fields(MODELS[tower_name]), f"model.{tower}")
      cfg[tower] = {**_defaults(MODELS[tower_name]), **section}
  # Optional fields default to None; give the ConfigDict their type so --set can fill them.
  return ml_collections.ConfigDict(cfg, type_safe=False)


def build_model(model_config: ml_collections.ConfigDict | dict) -> nn.Module:
  """Config section `model` (with `name`) -> an unbound Flax module.

  Parameters stay float32; `dtype` sets the compute precision (bf16 on
  accelerators), the usual mixed-precision policy.
  """
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise UserError(f"model.name '{name}' is not one of {', '.join(MODELS)}.")
  cls = MODELS[name]
  check_known(cfg, _fields(cls), "model")
  if name == "clip":
    for tower, tower_cls in (("image", ViT), ("text", TextTransformer)):
      check_known(cfg.get(tower, {}), _fields(tower_cls), f"model.{tower}")
      cfg[tower] = _resolve_dtypes(dict(cfg.get(tower, {})))
  return cls(**_resolve_dtypes(cfg))


def _head_dim(name: str, tower: dict) -> int:
  if name == "vit":
    v = parse_variant(tower.get("variant", "B/16"))
    return v["width"] // v["num_heads"]
  variant = tower.get("variant", "B")
  if variant not in TEXT_VARIANTS:
    raise UserError(f"text variant '{variant}' is not one of {', '.join(TEXT_VARIANTS)}.")
  width, _, _, heads = TEXT_VARIANTS[variant]
  return width // heads


def resolve_attention(model_config: ml_collections.ConfigDict, device: Any) -> ml_collections.ConfigDict:
  """A copy of the `model` section with `attention_impl='auto'` replaced by what `device` runs.

  The trainer, `bigvis bench` and `bigvis aot` resolve against their mesh's devices, so a CPU mesh
  on a GPU host, or a TPU target compiled from a GPU host, gets the attention it can run.
  """
  cfg = ml_collections.ConfigDict(model_config.to_dict(), type_safe=False)
  towers = [("vit", cfg.image), ("text", cfg.text)] if cfg.name == "clip" else [(cfg.name, cfg)]
  for name, tower in towers:
    if tower.get("attention_impl") == "auto":
      tower.attention_impl = resolve_attention_impl("auto", DTYPES.get(tower.get("dtype"), jnp.float32),
                                                    _head_dim(name, tower.to_dict()), device)
  return cfg


def model_inputs(model_config: ml_collections.ConfigDict, batch: dict) -> tuple:
  """The positional inputs `model.init`/`apply` take, cut to one example of `batch`."""
  if model_config.name == "clip":
    return batch["image"][:1], batch["labels"][:1]
  return (batch["image"][:1],)
