"""Model registry: `model.name` in the config picks the module, the rest are its fields."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.models.clip import CLIP
from bigvis.models.pallas_attention import supports_head_dim
from bigvis.models.layers import (ATTENTION_IMPLS, KERNEL_IMPLS, attention_pad_multiple, nvidia_sm80_or_newer,
                                  resolve_attention_impl, resolve_kernel_impl)
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


def build_model(model_config: ml_collections.ConfigDict | dict, device: Any = None) -> nn.Module:
  """Config section `model` (with `name`) -> an unbound Flax module.

  Parameters stay float32; `dtype` sets the compute precision (bf16 on
  accelerators), the usual mixed-precision policy. With `device` (a mesh's),
  `attention_impl`, `norm_impl` and `gelu_impl` 'auto' are decided for that device (`resolve_for_device`).
  """
  if device is not None:
    model_config = resolve_for_device(model_config, device)
  check_implementation_choices(model_config, device)
  cfg = _copied_dict(model_config)
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


def _copied_dict(model_config: ml_collections.ConfigDict | dict) -> dict:
  """A deep copy of a model config as plain dicts, so rewriting a tower never touches the caller's."""
  return model_config.to_dict() if hasattr(model_config, "to_dict") else copy.deepcopy(dict(model_config))


def _towers(cfg: dict) -> list[tuple[type, dict]]:
  """(module class, section) of each tower in a model config dict: CLIP's image and text, else itself."""
  if cfg.get("name") == "clip":
    return [(ViT, cfg.setdefault("image", {})), (TextTransformer, cfg.setdefault("text", {}))]
  return [(MODELS[cfg["name"]], cfg)] if cfg.get("name") in MODELS else []


def with_tower_fields(model_config: ml_collections.ConfigDict | dict, **fields) -> ml_collections.ConfigDict:
  """A copy of a model config with `fields` set in every tower whose module has them."""
  cfg = _copied_dict(model_config)
  for cls, section in _towers(cfg):
    section.update({k: v for k, v in fields.items() if k in _fields(cls)})
  return ml_collections.ConfigDict(cfg, type_safe=False)


def without_tower_fields(model_config: ml_collections.ConfigDict | dict, *names: str) -> dict:
  """A plain-dict copy of a model config with `names` left out of every tower."""
  cfg = _copied_dict(model_config)
  for _, section in _towers(cfg):
    for name in names:
      section.pop(name, None)
  return cfg


def unrolled(model_config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
  """A copy with `scan` off in every tower, computing what the scanned towers do: their last blocks
  compute every token (`last_block_pooled` needs the blocks unrolled), so the copy's do too."""
  cfg = _copied_dict(model_config)
  for _, section in _towers(cfg):
    if section.get("scan"):
      section.update(scan=False, last_block_pooled=False)
  return ml_collections.ConfigDict(cfg, type_safe=False)


def _head_dim(cls: type, tower: dict) -> int:
  if cls is ViT:
    v = parse_variant(tower["variant"])
    return v["width"] // v["num_heads"]
  if tower["variant"] not in TEXT_VARIANTS:
    raise UserError(f"text variant '{tower['variant']}' is not one of {', '.join(TEXT_VARIANTS)}.")
  width, _, _, heads = TEXT_VARIANTS[tower["variant"]]
  return width // heads


def _tokens(cls: type, tower: dict) -> int:
  """The sequence a tower's attention sees: the patches (and class token), or the context length."""
  if cls is ViT:
    side = int(tower["image_size"]) // parse_variant(tower["variant"])["patch_size"]
    return side * side + (tower["pool_type"] == "tok")
  return int(tower["context_length"])


def resolve_for_device(model_config: ml_collections.ConfigDict | dict, device: Any) -> ml_collections.ConfigDict:
  """A copy of the `model` section with `attention_impl`, `norm_impl` and `gelu_impl` 'auto' (spelled
  out or the defaults) replaced by what `device` runs.

  The trainer, `bigvis bench`, `bigvis aot` and `bigvis eval` resolve against their mesh's devices, so
  a CPU mesh on a GPU host, or a TPU target compiled from a GPU host, gets the kernels it can run.
  """
  cfg = _copied_dict(model_config)
  for cls, section in _towers(cfg):
    tower = {**_defaults(cls), **section}
    if tower["attention_impl"] == "auto":
      section["attention_impl"] = resolve_attention_impl(
          "auto", DTYPES.get(tower["dtype"], tower["dtype"]), _head_dim(cls, tower), device, _tokens(cls, tower))
    for field in ("norm_impl", "gelu_impl"):
      if tower[field] == "auto":
        section[field] = resolve_kernel_impl("auto", device)
  return ml_collections.ConfigDict(cfg, type_safe=False)


# The fields that pick XLA's fusions over bigvis's Pallas kernels: the same parameters and results on
# any device, for the places that build a model off the GPU it trained on (shapes, FLOPs, inference).
XLA_KERNELS = {"norm_impl": "xla", "gelu_impl": "xla"}


def counted_as_xla(model_config: ml_collections.ConfigDict | dict, device: Any) -> ml_collections.ConfigDict:
  """The model `device` runs, with its attention, LayerNorm and GELU kernels spelled as XLA's ops over
  the same (padded) tokens: the same matmuls, for FLOP counts read off a jaxpr, where a cuDNN or Pallas
  call is one opaque primitive (ViT-B/16's attention matmuls, 4 % of its FLOPs, went uncounted)."""
  cfg = _copied_dict(resolve_for_device(model_config, device))
  for cls, section in _towers(cfg):
    tower = {**_defaults(cls), **section}
    section["seq_pad_multiple"] = attention_pad_multiple(tower["attention_impl"], _tokens(cls, tower),
                                                         tower["seq_pad_multiple"])
    section.update(attention_impl="xla", **XLA_KERNELS)
  return ml_collections.ConfigDict(cfg, type_safe=False)


def kernels_for_reading(model_config: ml_collections.ConfigDict | dict, device: Any = None) -> ml_collections.ConfigDict:
  """The model section for reading a trained run (evaluation, inference) on `device` (default: the
  process's first): its kernels where they run there, else XLA's LayerNorm and GELU and the attention
  'auto' picks, the same function with the same parameters, so a run that named `pallas` (or `cudnn`)
  is read anywhere."""
  if resolve_kernel_impl("auto", device) == "pallas":
    return ml_collections.ConfigDict(_copied_dict(model_config), type_safe=False)
  return with_tower_fields(model_config, attention_impl="auto", **XLA_KERNELS)


def check_implementation_choices(model_config: ml_collections.ConfigDict | dict, device: Any = None) -> None:
  """A one-sentence error naming the key for a `fused_qkv` that is not true, false or None, a
  `residual_in_norm` that is not true or false, a `norm_impl`/`gelu_impl` that is not one of
  KERNEL_IMPLS, an `attention_impl` not one of ATTENTION_IMPLS, or (given the mesh's `device`) for
  'pallas' where bigvis's Pallas kernels
  cannot run: they are Triton kernels, for NVIDIA GPUs of compute capability 8.0 or newer."""
  cfg = _copied_dict(model_config)
  clip = cfg.get("name") == "clip"
  for cls, section in _towers(cfg):
    tower = {**_defaults(cls), **section}
    prefix = "model." + (("image." if cls is ViT else "text.") if clip else "")
    if tower.get("fused_qkv") is not None and not isinstance(tower["fused_qkv"], bool):
      raise UserError(f"{prefix}fused_qkv {tower['fused_qkv']!r} is not true, false or None.")
    if not isinstance(tower.get("residual_in_norm", True), bool):
      raise UserError(f"{prefix}residual_in_norm {tower['residual_in_norm']!r} is not true or false.")
    for field, choices in (("norm_impl", KERNEL_IMPLS), ("gelu_impl", KERNEL_IMPLS),
                           ("attention_impl", ATTENTION_IMPLS)):
      value = tower.get(field, "xla")
      if value not in choices:
        raise UserError(f"{prefix}{field} '{value}' is not one of {', '.join(choices)}.")
      if field == "attention_impl" and value in ("pallas", "pallas_interpret") and not supports_head_dim(
          _head_dim(cls, tower)):
        raise UserError(f"{prefix}attention_impl '{value}' needs a head size that is a power of two of at least "
                        f"16, not {_head_dim(cls, tower)}; use 'auto'.")
      if value == "pallas" and device is not None and not nvidia_sm80_or_newer(device):
        raise UserError(f"{prefix}{field} 'pallas' runs Triton kernels on NVIDIA GPUs (compute capability "
                        f"8.0 or newer), not on this mesh's {device.device_kind}; use 'xla'.")


def model_inputs(model_config: ml_collections.ConfigDict, batch: dict) -> tuple:
  """The positional inputs `model.init`/`apply` take, cut to one example of `batch`."""
  if model_config.name == "clip":
    return batch["image"][:1], batch["labels"][:1]
  return (batch["image"][:1],)
