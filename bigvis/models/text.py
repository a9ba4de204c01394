"""Causal text transformer (CLIP's text tower): features taken at the end-of-text token.

Token id 0 is padding; the tokenizer appends end-of-text after the caption, so
the end-of-text position is the last non-padding token.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigvis.models.layers import (Encoder, LayerNorm, constrain, pad_for_attention, param_with_axes,
                                  resolve_attention_impl)

# name: (width, depth, mlp_dim, heads) — the CLIP paper's text towers.
TEXT_VARIANTS = {
    "mu": (128, 4, 512, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (512, 12, 2048, 8),
    "L": (768, 12, 3072, 12),
    "H": (1024, 24, 4096, 16),
}


class TextTransformer(nn.Module):
  """Token ids [batch, length] -> (features [batch, width or num_classes], aux)."""
  variant: str = "B"
  vocab_size: int = 49408
  context_length: int = 77
  num_classes: int = 0           # >0 adds a bias-free linear projection (CLIP's text_projection)
  dtype: Any = jnp.float32
  attention_impl: str = "auto"   # NVIDIA GPUs: bigvis's kernels up to 128 tokens, else cuDNN; XLA elsewhere
  remat_policy: str = "none"
  scan: bool = False
  causal: bool = True
  seq_pad_multiple: int = 0      # 0: pad only where the attention kernel needs it (cuDNN: 77 -> 80)
  # As the ViT's (vit.py), but one q/k/v GEMM: at 77 tokens and width 512 three move more bytes.
  fused_qkv: bool = True         # query/key/value projections as one GEMM, or (False) three
  recompute_gelu: bool = True    # backward recomputes GELU from the MLP GEMM output (layers.Mlp)
  norm_impl: str = "auto"        # "pallas": the blocks' LayerNorms as one-pass Triton kernels (GPU)
  gelu_impl: str = "auto"        # "pallas": GELU forward and backward as Triton kernels, saving only h (GPU)
  residual_in_norm: bool = True  # the Pallas norms take the residual adds (layers.EncoderBlock)
  last_block_pooled: bool = True  # the last block computes the end-of-text token alone (without scan; vit.py)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    from bigvis.errors import UserError
    if self.variant not in TEXT_VARIANTS:
      raise UserError(f"text variant '{self.variant}' is not one of {', '.join(TEXT_VARIANTS)}.")
    width, depth, mlp_dim, heads = TEXT_VARIANTS[self.variant]
    if tokens.shape[1] > self.context_length:
      raise UserError(f"text of length {tokens.shape[1]} exceeds the context length {self.context_length}.")
    x = nn.Embed(self.vocab_size, width, dtype=self.dtype, name="embedding",
                 embedding_init=param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")))(tokens)
    pos = self.param("pos_embedding", param_with_axes(nn.initializers.normal(0.01), (None, "length", "embed")),
                     (1, self.context_length, width))
    length = tokens.shape[1]
    x = x + pos[:, :length].astype(self.dtype)
    impl = resolve_attention_impl(self.attention_impl, self.dtype, width // heads, length=length)
    # Under the causal mask no real token sees the padding, so only a bidirectional tower masks it.
    x, mask = pad_for_attention(x, impl, self.seq_pad_multiple, masked=not self.causal)
    eot = jnp.maximum(jnp.sum(tokens != 0, axis=1) - 1, 0).astype(jnp.int32)
    pooled = self.last_block_pooled and not self.scan
    x = Encoder(depth=depth, num_heads=heads, mlp_dim=mlp_dim, dtype=self.dtype, causal=self.causal,
                attention_impl=impl, remat_policy=self.remat_policy, scan=self.scan, fused_qkv=self.fused_qkv,
                recompute_gelu=self.recompute_gelu, norm_impl=self.norm_impl, gelu_impl=self.gelu_impl,
                residual_in_norm=self.residual_in_norm,
                name="encoder")(x, mask, not train, select=eot if pooled else None)
    x = LayerNorm(dtype=self.dtype, name="encoder_norm")(x if pooled else x[:, :length])
    x = x[:, 0] if pooled else jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    x = constrain(x, ("act_batch", "act_embed"))
    aux = {"pre_logits": x}
    if self.num_classes:
      x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name="head",
                   kernel_init=param_with_axes(nn.initializers.normal(width ** -0.5), ("embed", "classes")))(x)
    return x.astype(jnp.float32), aux
