"""Parameter counts from shapes alone (`jax.eval_shape`): nothing is allocated."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
import flax.linen as nn

from bigvis.models import XLA_KERNELS, build_model, with_tower_fields


def abstract_params(model_cfg: ml_collections.ConfigDict, *, boxed: bool = False):
  """Shapes of the model's parameters from a one-example dummy input (nothing is allocated).

  `boxed=True` keeps flax's logical-axis boxes, from which shardings are derived.
  """
  # XLA attention and XLA's LayerNorm and GELU in every tower: the kernels change no parameter, and
  # cuDNN's and the Pallas ones cannot be traced on a host without an NVIDIA GPU. Scan, remat and
  # padding stay as configured (scan changes the tree).
  model_cfg = with_tower_fields(model_cfg, attention_impl="xla", **XLA_KERNELS)
  model = build_model(model_cfg)
  image_cfg = model_cfg.image if model_cfg.name == "clip" else model_cfg
  size = int(image_cfg.get("image_size", 224))
  inputs = [jnp.zeros((1, size, size, 3), jnp.float32)]
  if model_cfg.name == "clip":
    inputs.append(jnp.zeros((1, int(model_cfg.text.get("context_length", 77))), jnp.int32))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))["params"]
  return shapes if boxed else nn.meta.unbox(shapes)


def count_by_module(params) -> dict[str, int]:
  """Top-level module name -> parameter count."""
  counts: dict[str, int] = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    counts[path[0]] = counts.get(path[0], 0) + int(leaf.size)
  return counts


def format_table(model_cfg: ml_collections.ConfigDict) -> str:
  """The table `bigvis params` prints, ending with `total_params=<int>`."""
  counts = count_by_module(abstract_params(model_cfg))
  total = sum(counts.values())
  names = {"img": "image tower (incl. projection)", "txt": "text tower (incl. projection)",
           "t": "temperature", "b": "logit bias"}
  lines = [f"{'module':<34} {'params':>15} {'':>8}"]
  for k, v in counts.items():
    lines.append(f"{names.get(k, k):<34} {v:>15,} {v / 1e6:>7.1f}M")
  lines.append(f"{'total':<34} {total:>15,} {total / 1e6:>7.1f}M")
  if model_cfg.name == "vit":
    lines.append(f"(classification head: {model_cfg.get('num_classes', 1000)} classes)")
  lines.append(f"total_params={total}")
  return "\n".join(lines)
