"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with the paper's variants.

`variant="B/16"` picks width/depth/MLP/heads from `VARIANTS` and the patch size
after the slash. The model returns `(logits, aux)` where `aux` holds the
pooled `pre_logits` (used by CLIP, linear probes and feature extraction).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvis.errors import UserError
from bigvis.models.layers import (Attention, Encoder, LayerNorm, Mlp, constrain, pad_for_attention,
                                  param_with_axes, resolve_attention_impl)

# name: (width, depth, mlp_dim, heads) — Table 1 of the ViT paper, plus Ti/S (DeiT) and a
# 4-layer "mu" for tests and laptop runs.
VARIANTS = {
    "mu": (128, 4, 512, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}
POOLS = ("tok", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d")


def parse_variant(variant: str) -> dict:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise UserError(f"model variant '{variant}' is not of the form NAME/PATCH with NAME one of "
                    f"{', '.join(VARIANTS)} (e.g. 'B/16').")
  width, depth, mlp_dim, heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def sincos2d(h: int, w: int, width: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, [1, h*w, width]."""
  if width % 4:
    raise UserError(f"sincos2d position embedding needs a width divisible by 4, got {width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return emb[None].astype(np.float32)


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int], num_prefix_tokens: int = 0) -> np.ndarray:
  """Bilinearly resizes a learned [1, prefix + h*w, D] embedding to a new patch grid.

  Used when fine-tuning at a higher resolution than pre-training.
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old = int(round(np.sqrt(grid.shape[0])))
  if old * old != grid.shape[0]:
    raise UserError(f"cannot resize a position embedding of {grid.shape[0]} tokens: not a square grid.")
  grid = grid.reshape(old, old, -1)
  resized = jax.image.resize(grid, (*new_grid, grid.shape[-1]), method="bilinear")
  resized = np.asarray(resized).reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([prefix, resized], axis=1)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    n, _, d = x.shape
    probe = self.param("probe", param_with_axes(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d))
    probe = jnp.tile(probe, [n, 1, 1]).astype(self.dtype)
    x = Attention(self.num_heads, dtype=self.dtype, name="attn")(probe, mask, inputs_kv=x)
    y = LayerNorm(dtype=self.dtype)(x)
    x = x + Mlp(self.mlp_dim, dtype=self.dtype)(y)
    return x[:, 0]


PATCH_EMBEDDINGS = ("conv", "matmul")


class PatchEmbedding(nn.Module):
  """Each non-overlapping p x p patch -> a `width` vector: a strided convolution's parameters and result.

  `impl="matmul"` (the default) gathers the patches and runs one GEMM; `impl="conv"` runs the
  convolution. Why the GEMM: on an H200 it made the ViT-B/16 step 3 % faster (68.4 -> 66.3 ms; on an
  H100 the convolution's weight gradient ran as an indexed implicit-GEMM kernel, ≈2.3 ms for ≈0.1
  TFLOP). It needs the encoder's row-major input (`layers.row_major`): without it XLA gave the tokens
  a [tokens, width, batch] layout that cost every block transposes (benchmarks/README.md).
  """
  width: int
  patch_size: int
  impl: str = "matmul"
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """[n, H, W, c] -> [n, H // p, W // p, width]; rows and columns past the last whole patch are dropped."""
    if self.impl not in PATCH_EMBEDDINGS:
      raise UserError(f"model.patch_embedding '{self.impl}' is not one of {PATCH_EMBEDDINGS}.")
    p = self.patch_size
    n, height, width_px, c = image.shape
    kernel = self.param("kernel", param_with_axes(nn.initializers.lecun_normal(), (None, None, "patch", "embed")),
                        (p, p, c, self.width)).astype(self.dtype)
    x = image.astype(self.dtype)
    if self.impl == "conv":
      y = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      h, w = height // p, width_px // p
      patches = x[:, :h * p, :w * p].reshape(n, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
      y = jax.lax.dot_general(patches.reshape(n, h, w, p * p * c), kernel.reshape(p * p * c, self.width),
                              (((3,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("embed",)), (self.width,))
      y = y + bias.astype(self.dtype)
    return y


class ViT(nn.Module):
  """ViT image encoder with optional classification head.

  num_classes=0 returns pooled features as logits (no head). `seq_pad_multiple`
  pads the token sequence (masked in attention and pooling) so fused GPU
  attention kernels that need e.g. a multiple of 64 tokens can be used.
  """
  variant: str = "B/16"
  num_classes: int = 1000
  pool_type: str = "tok"
  posemb: str = "learn"
  image_size: int = 224
  dropout: float = 0.0
  pre_norm: bool = False          # CLIP's ln_pre before the encoder
  representation_size: Optional[int] = None
  head_zero_init: bool = True
  head_bias: bool = True
  conv_bias: bool = True
  dtype: Any = jnp.float32
  attention_impl: str = "auto"   # NVIDIA GPUs: bigvis's kernels up to 128 tokens, else cuDNN; XLA elsewhere
  remat_policy: str = "none"
  scan: bool = False
  seq_pad_multiple: int = 0      # 0: pad only where the attention kernel needs it
  # The three below default to the fastest measured (H200, 2026-11-27: ViT-B/16 +2.5 %, CLIP +3.0 %)
  # and compute the same function with the same parameters on any device.
  fused_qkv: Optional[bool] = None  # q/k/v projections as one GEMM, or (False) three; None: three
                                    # where the Pallas norms take their input gradients, else one
  recompute_gelu: bool = True    # backward recomputes GELU from the MLP GEMM output (layers.Mlp)
  norm_impl: str = "auto"        # "pallas": the blocks' LayerNorms as one-pass Triton kernels (GPU)
  gelu_impl: str = "auto"        # "pallas": GELU forward and backward as Triton kernels, saving only h (GPU)
  residual_in_norm: bool = True  # the Pallas norms take the residual adds (layers.EncoderBlock)
  patch_embedding: str = "matmul"  # or "conv": how PatchEmbedding computes (same parameters and result)
  # The last block computes the class token alone where the pooling reads no other (pool_type 'tok',
  # without scan): the same outputs and gradients, 1/15 of ViT-B/16's GEMM work left out. `aux`'s
  # "encoded" then holds that token only.
  last_block_pooled: bool = True

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    v = parse_variant(self.variant)
    p, width = v["patch_size"], v["width"]
    x = PatchEmbedding(width, p, impl=self.patch_embedding, use_bias=self.conv_bias, dtype=self.dtype,
                       name="embedding")(image)
    n, h, w, _ = x.shape
    x = x.reshape(n, h * w, width)

    if self.posemb == "learn":
      pos = self.param("pos_embedding",
                       param_with_axes(nn.initializers.normal(1 / np.sqrt(width)), (None, "length", "embed")),
                       (1, h * w, width))
    elif self.posemb == "sincos2d":
      pos = sincos2d(h, w, width)
    else:
      raise UserError(f"model.posemb '{self.posemb}' is not one of {POSEMBS}.")
    x = x + jnp.asarray(pos, self.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls", param_with_axes(nn.initializers.zeros, (None, None, "embed")), (1, 1, width))
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]).astype(self.dtype), x], axis=1)
    length = x.shape[1]
    impl = resolve_attention_impl(self.attention_impl, self.dtype, width // v["num_heads"], length=length)
    x, mask = pad_for_attention(x, impl, self.seq_pad_multiple)

    if self.pre_norm:
      x = LayerNorm(dtype=self.dtype, name="norm_pre")(x)
    x = nn.Dropout(self.dropout)(x, not train)
    select = (jnp.zeros((n,), jnp.int32) if self.last_block_pooled and self.pool_type == "tok" and not self.scan
              else None)
    x = Encoder(depth=v["depth"], num_heads=v["num_heads"], mlp_dim=v["mlp_dim"], dtype=self.dtype,
                dropout=self.dropout, attention_impl=impl,
                remat_policy=self.remat_policy, scan=self.scan, fused_qkv=self.fused_qkv,
                recompute_gelu=self.recompute_gelu, norm_impl=self.norm_impl,
                gelu_impl=self.gelu_impl, residual_in_norm=self.residual_in_norm,
                name="encoder")(x, mask, not train, select=select)
    x = LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
    x = x[:, :length]  # drop padding tokens
    aux = {"encoded": x}

    if self.pool_type == "tok":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "map":
      x = MAPHead(num_heads=v["num_heads"], mlp_dim=v["mlp_dim"], dtype=self.dtype, name="map_head")(x)
    elif self.pool_type == "none":
      pass
    else:
      raise UserError(f"model.pool_type '{self.pool_type}' is not one of {POOLS}.")
    x = constrain(x, ("act_batch", "act_embed"))

    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits", dtype=self.dtype,
                           kernel_init=param_with_axes(nn.initializers.lecun_normal(), ("embed", "mlp")),
                           bias_init=param_with_axes(nn.initializers.zeros, ("mlp",)))(x))
    aux["pre_logits"] = x
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
      in_axis = "representation" if self.representation_size else "embed"
      x = nn.Dense(self.num_classes, name="head", dtype=self.dtype, use_bias=self.head_bias,
                   kernel_init=param_with_axes(init, (in_axis, "classes")),
                   bias_init=param_with_axes(nn.initializers.zeros, ("classes",)))(x)
    return x.astype(jnp.float32), aux
