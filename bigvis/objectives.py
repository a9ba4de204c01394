"""Training objectives: `make_objective(config, model)` -> `loss(params, batch, rng) -> (loss, metrics)`.

Losses see the *global* batch as sharded jax.Arrays; under `jax.jit` XLA
inserts the collectives, so the contrastive losses compare every image with
every text of the global batch on any mesh (the paper's setting), and the
logits are computed in float32.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bigvis.config import check_known
from bigvis.errors import UserError

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
_REGISTRY: dict[str, Callable[..., LossFn]] = {}


def register(name: str):
  def wrap(factory):
    _REGISTRY[name] = factory
    return factory
  return wrap


def make_objective(objective_config: ml_collections.ConfigDict, model: nn.Module) -> LossFn:
  cfg = dict(objective_config)
  name = cfg.pop("name", None)
  if name not in _REGISTRY:
    raise UserError(f"objective.name '{name}' is not one of {', '.join(sorted(_REGISTRY))}.")
  return _REGISTRY[name](model, **cfg)


def _check(name: str, kwargs: dict, allowed: tuple[str, ...]):
  check_known(kwargs, allowed, "objective")


@register("classification")
def classification(model: nn.Module, **kw) -> LossFn:
  """Softmax or sigmoid cross-entropy on one-hot `labels`, with label smoothing."""
  _check("classification", kw, ("loss", "label_smoothing"))
  kind, smoothing = kw.get("loss", "softmax"), float(kw.get("label_smoothing", 0.0))
  if kind not in ("softmax", "sigmoid"):
    raise UserError(f"objective.loss '{kind}' is not one of softmax, sigmoid.")

  def loss_fn(params, batch, rng):
    logits, _ = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    labels = batch["labels"]
    if smoothing:
      labels = labels * (1 - smoothing) + smoothing / labels.shape[-1]
    if kind == "softmax":
      losses = optax.softmax_cross_entropy(logits, labels)
    else:
      losses = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    return jnp.mean(losses), {"accuracy": accuracy}
  return loss_fn


def clip_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric cross-entropy over the image-text similarity matrix (CLIP, Figure 3)."""
  logits = scale * jnp.einsum("id,td->it", zimg.astype(jnp.float32), ztxt.astype(jnp.float32))
  targets = jnp.arange(logits.shape[0])
  l_img = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  l_txt = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return 0.5 * (jnp.mean(l_img) + jnp.mean(l_txt))


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP): each pair is an independent binary problem."""
  logits = scale * jnp.einsum("id,td->it", zimg.astype(jnp.float32), ztxt.astype(jnp.float32)) + bias
  labels = 2 * jnp.eye(logits.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def _contrastive(model: nn.Module, kw: dict, kind: str) -> LossFn:
  check_known(kw, (), "objective")
  # Checked here, before data and parameters are built, not when the loss is first traced.
  has_bias = getattr(model, "bias_init", None) is not None
  if kind == "siglip" and not has_bias:
    raise UserError("objective 'siglip' needs model.bias_init set (the SigLIP paper's -10).")
  if kind == "clip" and has_bias:
    raise UserError("model.bias_init adds a logit bias that only objective 'siglip' uses; "
                    "unset it or set objective.name='siglip'.")

  def loss_fn(params, batch, rng):
    zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["labels"], train=True,
                                  rngs={"dropout": rng})
    if kind == "clip":
      loss = clip_loss(zimg, ztxt, aux["logit_scale"])
    else:
      loss = sigmoid_loss(zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
    sims = jnp.einsum("id,td->it", zimg, ztxt)
    accuracy = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
    return loss, {"accuracy": accuracy, "logit_scale": aux["logit_scale"]}
  return loss_fn


@register("clip")
def clip(model: nn.Module, **kw) -> LossFn:
  """CLIP's contrastive loss; batch has `image` and tokenised text as `labels`."""
  return _contrastive(model, kw, "clip")


@register("siglip")
def siglip(model: nn.Module, **kw) -> LossFn:
  """SigLIP's sigmoid loss; needs `model.bias_init`."""
  return _contrastive(model, kw, "siglip")
