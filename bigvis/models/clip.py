"""CLIP (Radford et al., 2021): image tower + text tower + projections + learned temperature."""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bigvis.models.layers import param_with_axes
from bigvis.models.text import TextTransformer
from bigvis.models.vit import ViT

# The scale exp(t) is clamped here (the paper: "clipped to prevent scaling the logits by more than 100").
MAX_LOGIT_SCALE = 100.0


def l2_normalize(x, axis: int = -1, eps: float = 1e-8):
  return x / jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


class CLIP(nn.Module):
  """`__call__(images, texts)` -> (zimg, ztxt, aux) with L2-normalised embeddings.

  Either input may be None, so the same params embed images or texts alone
  (zero-shot classifiers, retrieval, feature extraction).
  """
  image: dict
  text: dict
  embed_dim: int = 512
  temperature_init: float = 1 / 0.07
  bias_init: float | None = None      # set (e.g. -10) for a sigmoid (SigLIP) loss

  def setup(self):
    self.img = ViT(**{**self.image, "num_classes": self.embed_dim, "head_zero_init": False,
                      "head_bias": False}, name="img")
    self.txt = TextTransformer(**{**self.text, "num_classes": self.embed_dim}, name="txt")
    self.t = self.param("t", param_with_axes(nn.initializers.constant(np.log(self.temperature_init)), (None,)),
                        (1,))
    if self.bias_init is not None:
      self.b = self.param("b", param_with_axes(nn.initializers.constant(self.bias_init), (None,)), (1,))

  def __call__(self, images=None, texts=None, *, train: bool = False):
    zimg = ztxt = None
    aux = {}
    if images is not None:
      zimg, aux_img = self.img(images, train=train)
      aux["img/pre_logits"] = aux_img["pre_logits"]
      zimg = l2_normalize(zimg)
    if texts is not None:
      ztxt, aux_txt = self.txt(texts, train=train)
      aux["txt/pre_logits"] = aux_txt["pre_logits"]
      ztxt = l2_normalize(ztxt)
    aux["logit_scale"] = jnp.minimum(jnp.exp(self.t[0]), MAX_LOGIT_SCALE)
    if self.bias_init is not None:
      aux["logit_bias"] = self.b[0]
    return zimg, ztxt, aux
