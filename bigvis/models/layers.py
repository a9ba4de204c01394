"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...)
and activations are constrained with `act_*` names; `bigvis/sharding.py` maps
both onto mesh axes through rules in the config, so the same module runs data
parallel, FSDP or tensor parallel without code changes.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvis.errors import UserError
from bigvis.sharding import fit_spec, mesh_axes_size, per_device
from bigvis.models.pallas_kernels import bias_gelu as pallas_bias_gelu
from bigvis.models.pallas_kernels import residual_layernorm
from bigvis.models import pallas_attention

Dtype = Any
# How attention is computed: XLA's einsum-softmax (anywhere), cuDNN's fused flash kernels (NVIDIA
# GPUs), bigvis's Pallas kernels for short sequences (`pallas_attention`; NVIDIA GPUs, or interpreted
# on any backend), or "auto" (`resolve_attention_impl`).
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret", "cudnn")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_with_axes(init: Callable, axes: tuple[str | None, ...]) -> Callable:
  """An initializer that records the parameter's logical axis names."""
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, axes)


# How the LayerNorms (`norm_impl`) and the MLP's bias + GELU (`gelu_impl`) are computed: XLA's
# fusions, or bigvis's Pallas kernels (`pallas_kernels`; NVIDIA GPUs), or those kernels run by Pallas's
# interpreter ("pallas_interpret": any backend, slow; how the tests check them on a CPU), or "auto"
# (`resolve_kernel_impl`), the models' default: the kernels where they run. Checked, with the tower's
# key in the message, by `models.check_implementation_choices` when a model is built.
KERNEL_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


def _activation_mesh_axes(names: tuple[str, ...], ndim: int) -> tuple[Any, ...]:
  """The mesh axes (a PartitionSpec's entries) the sharding rules give an activation's trailing
  `ndim` logical names; all None outside a mesh."""
  return tuple(nn.logical_to_mesh_axes(names[-ndim:]))


def _split_over_devices(name: str) -> bool:
  """Whether the sharding rules put logical activation axis `name` on mesh axes of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh_axes_size(mesh, _activation_mesh_axes((name,), 1)[0]) > 1


class _NormParams(nn.Module):
  """nn.LayerNorm's scale and bias (same names, shapes and initialisers), for the Pallas kernels."""

  @nn.compact
  def __call__(self, width: int):
    scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)), (width,))
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("norm",)), (width,))
    return scale, bias


class LayerNorm(nn.Module):
  """LayerNorm whose scale and bias are named on the `embed` axis.

  `impl` (one of KERNEL_IMPLS): "xla" (flax's nn.LayerNorm), or "pallas", one-pass Triton kernels, or
  "auto", the kernels where they run (`resolve_kernel_impl`).
  They apply where the block calls with `keep_input=True`, which returns (x, LayerNorm(x)) (or
  `copies` of LayerNorm(x)) so the residual stream's gradient is added inside the backward kernel;
  elsewhere XLA's LayerNorm runs. There `addend` (x + addend (+ input_bias) is normalised and
  returned instead of x), `input_bias`, `copies` and `residual_bias` hand the kernels the residual
  add before the norm and more passes of the block's backward (see
  `pallas_kernels.residual_layernorm`); all but `copies` only with the kernels. The parameters are
  the same either way.
  """
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6
  impl: str = "xla"

  @nn.compact
  def __call__(self, x, *, keep_input: bool = False, copies: int = 1, addend: Optional[jax.Array] = None,
               input_bias: Optional[jax.Array] = None, residual_bias: Optional[jax.Array] = None):
    impl = resolve_kernel_impl(self.impl)
    if keep_input and impl != "xla":
      scale, bias = _NormParams(name="LayerNorm_0")(x.shape[-1])
      batch_axes = _activation_mesh_axes(("act_batch", "act_length", "act_embed"), x.ndim)
      if batch_axes[-1] is not None:
        raise UserError(f"model.norm_impl '{self.impl}' runs bigvis's LayerNorm kernels here ('auto' "
                        f"does on NVIDIA GPUs), which need each token's {x.shape[-1]} features on one "
                        f"device, but the sharding rules split them over mesh axis {batch_axes[-1]!r}; "
                        f"set model.norm_impl='xla'.")
      return residual_layernorm(x, scale, bias, epsilon=self.epsilon, dtype=self.dtype,
                                interpret=impl == "pallas_interpret", batch_axes=batch_axes[:-1],
                                copies=copies, addend=addend, input_bias=input_bias, residual_bias=residual_bias)
    if addend is not None or input_bias is not None or residual_bias is not None:
      raise ValueError("LayerNorm's addend, input_bias and residual_bias need keep_input=True and the "
                       "Pallas kernels")
    y = nn.LayerNorm(
        epsilon=self.epsilon, dtype=self.dtype,
        scale_init=param_with_axes(nn.initializers.ones, ("norm",)),
        bias_init=param_with_axes(nn.initializers.zeros, ("norm",)))(x)
    return (x,) + (y,) * copies if keep_input else y


CUDNN_PAD_MULTIPLE = 8


def nvidia_sm80_or_newer(device: Any) -> bool:
  """An NVIDIA GPU of compute capability 8.0 or newer (cuDNN's flash attention, Pallas's Triton kernels: Ampere, Hopper, ...)."""
  if device.platform not in ("gpu", "cuda"):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is None:  # a JAX without the attribute: trust the name
    return "nvidia" in device.device_kind.lower()
  try:
    return float(capability) >= 8.0
  except (TypeError, ValueError):  # e.g. a ROCm "gfx90a"
    return False


def _nvidia_sm80_device(device: Any = None) -> bool:
  """`nvidia_sm80_or_newer` for `device`, by default the process's first (none: False)."""
  if device is None:
    try:
      device = jax.devices()[0]
    except RuntimeError:
      return False
  return nvidia_sm80_or_newer(device)


# Sequences up to this long get bigvis's attention kernels from `auto` (NVIDIA GPUs): cuDNN computes
# tiles of 128 rows, so at 77 tokens (80 padded) it does 128^2 / 80^2 = 2.6 times the work, where the
# kernels' blocks of 64 + 16 fit. Measured on an H200 (2026-11-27, JAX 0.11.2, batch 256): CLIP B/16
# 77.1 ms a step with cuDNN in both towers, 73.0 with the kernels in the text tower (77 tokens) and
# cuDNN in the image tower; the kernels in the image tower too (197 tokens) 74.6, and ViT-B/16 61.4
# against cuDNN's 59.5: past one tile cuDNN's better-tuned kernels win.
PALLAS_AUTO_MAX_TOKENS = 128


def resolve_attention_impl(impl: str, dtype: Any = jnp.bfloat16, head_dim: int = 64, device: Any = None,
                           length: Optional[int] = None) -> str:
  """`auto` -> `pallas` for sequences of up to PALLAS_AUTO_MAX_TOKENS `length` tokens where bigvis's
  kernels take the job, `cudnn` where cuDNN's fused attention does, else `xla`; others unchanged.

  Both need NVIDIA GPUs of compute capability >= 8.0 and bf16/fp16 compute; cuDNN head sizes that
  are multiples of 8 up to 128, the kernels powers of two from 16 (`pallas_attention.supports_head_dim`).
  Everything else (CPU, TPU, other GPUs, float32 models) gets XLA's attention. Measured on an H100
  (JAX 0.11.2, ViT-B/16 batch 256): cuDNN took the train step from 2,443 to 3,381 img/s with the
  class token kept; the kernels for short sequences: above. `device` is the one that will run the
  model (a mesh's); by default the process's first. Without `length`, `auto` never picks the kernels.
  """
  if impl != "auto":
    return impl
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla"
  if not _nvidia_sm80_device(device):
    return "xla"
  if length is not None and length <= PALLAS_AUTO_MAX_TOKENS and pallas_attention.supports_head_dim(head_dim):
    return "pallas"
  if head_dim % 8 or head_dim > 128:
    return "xla"
  return "cudnn"


def resolve_kernel_impl(impl: str, device: Any = None) -> str:
  """A `norm_impl` or `gelu_impl`: `auto` -> `pallas` where bigvis's Triton kernels run (NVIDIA GPUs
  of compute capability >= 8.0), else `xla`; others unchanged. The norms' kernels were measured on an
  H200 (2026-11-27, ViT-B/16 batch 256, with recompute_gelu and separate q/k/v GEMMs): 3,933 img/s
  against 3,837 with XLA's norms and neither. `device` is the one that will run the model (a mesh's);
  by default the process's first."""
  if impl != "auto":
    return impl
  return "pallas" if _nvidia_sm80_device(device) else "xla"


def norm_kernels_take_residual_adds(norm_impl: str, dropout: float, residual_in_norm: bool) -> bool:
  """Whether a block's norms add the residual stream in their kernels (`EncoderBlock`): the Pallas
  norms (`norm_impl` resolved), no dropout (it sits between the projections' outputs and the sums),
  and `residual_in_norm`."""
  return norm_impl != "xla" and dropout == 0.0 and residual_in_norm


def attention_pad_multiple(impl: str, length: int, requested: int = 0) -> int:
  """Token padding for `length` tokens: the config's `seq_pad_multiple`, else 8 where cuDNN would
  get an odd length, which it refuses ("Unsupported sequence length" for ViT's 197 on an H100;
  it took 196, 200 and 80)."""
  if requested:
    return requested
  return CUDNN_PAD_MULTIPLE if impl == "cudnn" and length % 2 else 0


def pad_for_attention(x: jax.Array, impl: str, seq_pad_multiple: int = 0, *,
                      masked: bool = True) -> tuple[jax.Array, Optional[jax.Array]]:
  """Pads tokens [batch, length, width] at the end where `attention_pad_multiple` asks for it.

  Returns (tokens, key mask or None). The padding sits after the real tokens,
  so a causal tower needs no mask (no real token attends forward to it).
  """
  length = x.shape[1]
  multiple = attention_pad_multiple(impl, length, seq_pad_multiple)
  if not multiple or length % multiple == 0:
    return x, None
  padded = -(-length // multiple) * multiple
  x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
  mask = jnp.broadcast_to(jnp.arange(padded) < length, (x.shape[0], padded)) if masked else None
  return x, mask


def dot_product_attention(q, k, v, *, mask: Optional[jax.Array], causal: bool, impl: str,
                          query_bias: Optional[jax.Array] = None):
  """Attention over [batch, length, heads, head_dim] with a selectable kernel.

  `xla` is plain einsum-softmax (fp32 softmax, runs anywhere); `cudnn` is the
  fused flash kernel on NVIDIA GPUs; `pallas` bigvis's kernels for short sequences
  (`pallas_attention`), which add `query_bias` [heads, head_dim] themselves (the others add it
  here), and which also take a fused q/k/v GEMM's output [batch, length, heads, 3, head_dim] as q,
  with k and v None; `auto` picks (see `resolve_attention_impl`). `mask`: [batch, keys], true for
  the keys to attend to, a prefix of each sequence (padding).
  """
  impl = resolve_attention_impl(impl, q.dtype, q.shape[-1], length=q.shape[1])
  kv_len = None if mask is None else jnp.sum(mask, axis=-1).astype(jnp.int32)
  if impl in ("pallas", "pallas_interpret"):
    return pallas_attention.attention(q, k, v, kv_len=kv_len, query_bias=query_bias, causal=causal,
                                      interpret=impl == "pallas_interpret",
                                      axes=_activation_mesh_axes(("act_batch", "act_length", "act_heads", None), 4))
  if query_bias is not None:
    q = q + query_bias.astype(q.dtype)
  if impl == "xla":
    depth = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(depth).astype(jnp.float32)
    big_neg = jnp.finfo(jnp.float32).min
    if causal:
      n = q.shape[1]
      logits = jnp.where(jnp.tril(jnp.ones((n, n), bool))[None, None], logits, big_neg)
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, big_neg)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  try:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len,
                                        implementation=impl)
  except RuntimeError as e:  # e.g. "cuDNN is not detected." on CPU/TPU
    raise UserError(f"attention_impl='{impl}' is not available here ({e}); use attention_impl='xla'.") from e


def row_major(x: jax.Array, names: tuple[str, ...] = ("act_batch", "act_length", "act_embed")) -> jax.Array:
  """Pins `x` (and its gradient) to the plain row-major layout. `names`: x's trailing logical axes,
  which give each device's shard under a mesh.

  Why: on GPU, XLA's layout assignment may give a tower's token activations a [tokens, width, batch]
  layout and keep it through the encoder, adding transposes to every block. Compiled for an H100,
  CLIP B/16's text tower had 156 transposes (≈3.9 ms per step in the H100 profile); pinned at the
  encoder input, 9. A no-op where XLA already chose row-major, or where JAX lacks layout constraints.

  Under a mesh of several devices the pin is applied to each device's shard (`sharding.per_device`):
  XLA's partitioner has no rule for it, and gathered the whole batch onto every device around it
  (benchmarks/README.md, sixteenth session).
  """
  try:
    from jax.experimental.layout import Layout, with_layout_constraint
    layout = Layout(tuple(range(x.ndim)))
    jax.eval_shape(functools.partial(with_layout_constraint, layouts=layout), x)
  except (ImportError, TypeError, ValueError, AttributeError, NotImplementedError) as e:  # a JAX whose API moved
    logging.warning("row-major layout constraint unavailable (%s); XLA chooses the layout", e)
    return x

  def pin(a):
    return with_layout_constraint(a, layout)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return pin(x)  # its own transpose pins the gradient
  # Mesh axes that do not divide x's dims are left out (x then replicated over them, correctly).
  spec = fit_spec(jax.sharding.PartitionSpec(*_activation_mesh_axes(names, x.ndim)), x.shape, mesh)
  local = lambda a: per_device(pin, (a,), (spec,), spec)  # noqa: E731
  per_shard = jax.custom_vjp(local)
  per_shard.defvjp(lambda a: (local(a), None), lambda _, ct: (local(ct),))
  return per_shard(x)


class HeadsDense(nn.Module):
  """The parameters of a dense layer over several trailing dims, e.g. [..., embed] -> [..., heads,
  head_dim]: (kernel, bias) for x's trailing shape, so a caller can fuse several such layers into one
  GEMM or place their biases elsewhere (`Attention`) under their own parameter names; `flat_dense`
  applies them.

  Keeps the kernel's natural N-D shape with one logical name per dim (flax's
  DenseGeneral initialises a flattened kernel, which breaks logical sharding
  constraints under a mesh). Initialised like a 2-D xavier-uniform matrix.
  """
  features: tuple[int, ...]
  contract: int
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]

  @nn.compact
  def __call__(self, x) -> tuple[jax.Array, jax.Array]:
    in_shape = x.shape[-self.contract:]
    fan_in, fan_out = int(np.prod(in_shape)), int(np.prod(self.features))

    def init(key, shape, dtype=jnp.float32):
      return nn.initializers.xavier_uniform()(key, (fan_in, fan_out), dtype).reshape(shape)
    kernel = self.param("kernel", param_with_axes(init, self.kernel_axes), (*in_shape, *self.features))
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.bias_axes), self.features)
    return kernel, bias


def flat_dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], contract: int,
               dtype: Dtype) -> jax.Array:
  """x [..., *in] @ kernel [*in, *out] + bias [*out] (None: no bias) -> [..., *out], computed as one
  2-D GEMM with a 1-D bias (the reshapes are free in row-major layouts).

  Why flat: XLA may hand a 1-D bias to cuBLASLt's BIAS epilogue (JAX 0.10.2 compiling for an H100
  does), but an N-D one (e.g. [heads, kv]) is first broadcast to the whole output and added through
  the GEMM's C operand, an extra write and read of the output (ViT-B/16's query/key/value bias:
  1.7 ms a step on an H200). JAX 0.11.2 on an H200 chose no epilogue, and added each 1-D bias in a
  pass of its own; see `Attention` for the two it leaves out.
  """
  batch_shape, out_shape = x.shape[:x.ndim - contract], kernel.shape[contract:]
  fan_in, fan_out = int(np.prod(kernel.shape[:contract])), int(np.prod(out_shape))
  y = jax.lax.dot_general(x.reshape(*batch_shape, fan_in).astype(dtype),
                          kernel.reshape(fan_in, fan_out).astype(dtype),
                          (((len(batch_shape),), (0,)), ((), ())))
  if bias is not None:
    y = y + bias.reshape(fan_out).astype(dtype)
  return y.reshape(*batch_shape, *out_shape)


class Attention(nn.Module):
  """Multi-head attention with logical axes on heads and head dims (self- or cross-attention).

  `fused_qkv` computes self-attention's query, key and value projections as one GEMM over the
  three kernels side by side (one input gradient instead of three summed); the parameters keep
  their separate names and shapes either way.

  Only the query bias is added where its projection is. Each of a query's attention weights sums
  to 1 over the keys (masked or causal too), which makes the other two biases passes of their own
  that change nothing or could be done on a vector:
  * the key bias adds q·b_k to every logit in a query's row, which softmax ignores: it is left out
    and gets no gradient (it has none: the key gradients' column sums cancel);
  * the value bias adds b_v to every output row, so it is folded into the out projection's bias,
    b_o + b_v·W_o (a [width] vector), with the same gradients for b_v, b_o and W_o.
  On an H200 (JAX 0.11.2, separate GEMMs) each bias add was a pass over [tokens, width] of its own,
  the three 1.76 ms of the 65.1 ms ViT-B/16 step. Both hold while k only feeds the logits and the
  weights are not dropped out: a change that used k elsewhere (a norm on q and k, say) or dropped
  attention weights must add those biases where their projections are.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  impl: str = "xla"
  fused_qkv: bool = True

  @nn.compact
  def __call__(self, x, mask=None, inputs_kv=None, *, inputs_v=None, add_out_bias: bool = True):
    """`inputs_v`: the value projection's input where it is not the key's (`inputs_kv`, else x): in
    `EncoderBlock` with the Pallas norms, copies of one norm's output, so that the three projections'
    input gradients reach the norm's kernel apart. Without `add_out_bias`, (the output without the
    out projection's bias, that bias with the value bias folded in), for a caller that adds it
    (`EncoderBlock` with the Pallas norms: their kernel with the residual add, or XLA's add with the
    bias's gradient left to the kernel)."""
    width = x.shape[-1]
    head_dim = width // self.num_heads
    k_in = x if inputs_kv is None else inputs_kv
    v_in = k_in if inputs_v is None else inputs_v
    dense = lambda name: HeadsDense((self.num_heads, head_dim), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                                    name=name)
    (query_kernel, query_bias), (key_kernel, _), (value_kernel, value_bias) = (
        dense(name)(inputs) for name, inputs in (("query", x), ("key", k_in), ("value", v_in)))
    # bigvis's attention kernels add the query bias as they load the queries (and sum its gradient),
    # where XLA would add it in a pass of its own (0.58 ms of the H200's ViT-B/16 step, 0.29 more for
    # its gradient).
    in_kernel = resolve_attention_impl(self.impl, self.dtype, head_dim, length=x.shape[-2]) in (
        "pallas", "pallas_interpret")
    if self.fused_qkv and inputs_kv is None and inputs_v is None:
      # Heads outermost ([embed, heads, 3, kv]): flattened for the GEMM, the output dim then keeps
      # the heads' tensor-parallel sharding; with [embed, 3, heads, kv] it could not (compiled for
      # 8 H100s with mesh.tensor=2, that resharding added 131 transposes to the ViT-B/16 step).
      kernel = jnp.stack([query_kernel, key_kernel, value_kernel], axis=2)
      # One 1-D bias over the GEMM's output, zero for key and value: a GEMM epilogue can take it
      # (added to the query slice alone, it could not).
      zeros = jnp.zeros_like(query_bias)
      qkv = flat_dense(x, kernel, None if in_kernel else jnp.stack([query_bias, zeros, zeros], axis=1), 1,
                       self.dtype)
      if in_kernel:  # read in place: no slices of q, k and v, no concatenation of their gradients
        qkv = constrain(qkv, ("act_batch", "act_length", "act_heads", None, None))
        out = dot_product_attention(qkv, None, None, mask=mask, causal=self.causal, impl=self.impl,
                                    query_bias=query_bias)
        return self._out(out, value_bias, width, add_out_bias)
      q, k, v = (qkv[..., i, :] for i in range(3))
    else:
      q = flat_dense(x, query_kernel, None if in_kernel else query_bias, 1, self.dtype)
      k, v = (flat_dense(inputs, kernel, None, 1, self.dtype) for inputs, kernel in ((k_in, key_kernel),
                                                                                    (v_in, value_kernel)))
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_heads", None))
    out = dot_product_attention(q, k, v, mask=mask, causal=self.causal, impl=self.impl,
                                query_bias=query_bias if in_kernel else None)
    return self._out(out, value_bias, width, add_out_bias)

  def _out(self, out, value_bias, width, add_out_bias):
    """The out projection of the heads' outputs, the value bias folded into its bias (see above)."""
    out_kernel, out_bias = HeadsDense((width,), 2, ("heads", "kv", "embed"), ("embed",), name="out")(out)
    bias = out_bias + jnp.einsum("hd,hde->e", value_bias, out_kernel)  # float32, like the parameters
    y = flat_dense(out, out_kernel, bias if add_out_bias else None, 2, self.dtype)
    y = constrain(y, ("act_batch", "act_length", "act_embed"))
    return y if add_out_bias else (y, bias)


def _bias_gelu(h: jax.Array, bias: jax.Array) -> jax.Array:
  return nn.gelu(h + bias)


# GELU whose backward pass keeps only the GEMM's output and recomputes the rest. Plain autodiff lets
# XLA save GELU's inner tanh next to its output (forward: read h, write GELU and tanh), and the
# backward then reads h, the tanh and the incoming gradient: on ViT-B/16 seven passes over the
# [tokens, mlp] activations per layer where five do (tanh is cheap to recompute).
# `jax.checkpoint` rather than a custom VJP: its optimisation barrier keeps XLA from merging the
# recomputation back into the forward pass. The bias add is inside the checkpoint on purpose: what
# is saved is then the GEMM's unbiased output, and the GEMM keeps a plain epilogue. With the bias
# outside, XLA hands bias + GELU to cuBLASLt's BIAS_GELU_AUX epilogue, whose GEMM ran at ≈550
# TFLOP/s where the step's others average ≈720 (H200, 2026-11): 1.5 % slower overall.
_bias_gelu_checkpointed = jax.checkpoint(_bias_gelu, policy=jax.checkpoint_policies.nothing_saveable)


def bias_gelu_recomputed(h: jax.Array, bias: jax.Array) -> jax.Array:
  """GELU(h + bias), the same values and gradients as `_bias_gelu`, saving only h (and bias)."""
  return _bias_gelu_checkpointed(h, bias)


class Dense(nn.Module):
  """`nn.Dense` (same parameters, initialisers and result) whose bias add can be handed to an
  `epilogue(y, bias)` that fuses it with the activation, or left to the caller (`add_bias=False`)."""
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, epilogue: Callable = jnp.add, *, add_bias: bool = True,
               in_features: Optional[int] = None, epilogue_rounds_bias: bool = False):
    """x [..., in] -> [..., features]; with x None, only the bias (the parameters created for
    `in_features` inputs), for a caller that needs it before the layer runs. `epilogue_rounds_bias`:
    the epilogue gets the float32 parameter and rounds it to y's dtype itself (a kernel that reads it:
    no pass of XLA's to convert it first)."""
    kernel = self.param("kernel", self.kernel_init, (in_features or x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    if x is None:
      return bias
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    if not add_bias:
      return y
    return epilogue(y, bias if epilogue_rounds_bias else bias.astype(self.dtype))


class Mlp(nn.Module):
  """Two dense layers with GELU; the hidden units sit on the `mlp` axis.

  `recompute_gelu` saves only the first GEMM's output for the backward pass (`bias_gelu_recomputed`);
  `gelu_impl='pallas'` (or 'auto' on NVIDIA GPUs) always does (whatever `recompute_gelu` says), with
  GELU forward and backward as Pallas kernels (`pallas_kernels.bias_gelu`). The result and gradients
  are the same, to float32 rounding (the kernels compute in float32).
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  out_dim: Optional[int] = None
  recompute_gelu: bool = False
  gelu_impl: str = "xla"

  @nn.compact
  def __call__(self, x, deterministic: bool = True, *, add_output_bias: bool = True,
               output_bias_only: bool = False):
    """x [..., width] -> [..., out_dim or width]. `output_bias_only`: just the second layer's bias
    (parameters created as usual), for a caller that adds it itself: it then calls with
    `add_output_bias=False` for the output without it."""
    width = self.out_dim or x.shape[-1]
    dense_1 = Dense(width, dtype=self.dtype, name="Dense_1",
                    kernel_init=param_with_axes(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=param_with_axes(nn.initializers.normal(1e-6), ("embed",)))
    if output_bias_only:
      return dense_1(None, in_features=self.mlp_dim)
    gelu_impl = resolve_kernel_impl(self.gelu_impl)
    if gelu_impl != "xla":
      axes = _activation_mesh_axes(("act_batch", "act_length", "act_mlp"), x.ndim)
      epilogue = functools.partial(pallas_bias_gelu, interpret=gelu_impl == "pallas_interpret", axes=axes)
    else:
      epilogue = bias_gelu_recomputed if self.recompute_gelu else _bias_gelu
    x = Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0",
              kernel_init=param_with_axes(nn.initializers.xavier_uniform(), ("embed", "mlp")),
              bias_init=param_with_axes(nn.initializers.normal(1e-6), ("mlp",)))(
                  x, epilogue, epilogue_rounds_bias=gelu_impl != "xla")
    x = constrain(x, ("act_batch", "act_length", "act_mlp"))
    x = nn.Dropout(self.dropout)(x, deterministic)
    return dense_1(x, add_bias=add_output_bias)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `defer_output` (where the next block's norm can take it): where the norms' kernels take the
  residual adds (`residual_in_norm`), the block returns (x, MLP(LN(x)) without its last bias, that
  bias) unsummed, and the next block's norm kernel adds them as it reads them. A block takes such a
  triple or the residual stream.

  `select` [batch] (int): the one token per example whose output is wanted (the last block before a
  class-token or end-of-text pooling); the block returns [batch, 1, width], its keys and values from
  every token and the rest computed for that token alone (`_selected_token`).
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  causal: bool = False
  attention_impl: str = "xla"
  fused_qkv: Optional[bool] = True  # None: decided per block (below)
  recompute_gelu: bool = False
  norm_impl: str = "xla"
  gelu_impl: str = "xla"
  # The Pallas norms' kernels take the residual adds. Where XLA's GEMMs take no epilogue (as on the
  # H200 with JAX 0.11.2, and as JAX 0.10.2 compiles for an H100 with its default Triton GEMMs) the
  # adds are passes of their own, which the kernels save (ViT-B/16: 1.8 GB a step). Turn it off only
  # where XLA adds the stream in the GEMM as cuBLASLt's C operand (seen with
  # --xla_gpu_enable_triton_gemm=false): there the kernel taking the add costs that much more.
  residual_in_norm: bool = True
  defer_output: bool = False

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True, select: Optional[jax.Array] = None):
    # With the Pallas norms, more passes fold into their kernels (see
    # `pallas_kernels.residual_layernorm`): separate query, key and value projections send their
    # input gradients apart, in three copies of the norm's output; the biases added to the residual
    # stream (the out projection's, the MLP's last) get their gradients as column sums the kernels
    # take as they write or read the stream's gradient; and (`residual_in_norm`) the MLP norm's
    # kernel adds the attention's output and its bias to the stream as it normalises the sum, as
    # (`defer_output`) the next block's attention norm does with the MLP's. Not under dropout, which
    # sits between those outputs and the sums.
    norm_impl = resolve_kernel_impl(self.norm_impl)
    pallas_norms = norm_impl != "xla"  # as LayerNorm decides for keep_input=True
    # Not where the heads are split over devices (tensor parallelism): each projection's input
    # gradient is then a partial sum, and apart they cost an all-reduce each where XLA sums first
    # (compiled for 8 H100s with mesh.tensor=2: 12 more in the ViT-B/16 step).
    heads_split = _split_over_devices("act_heads")
    # fused_qkv None: three GEMMs where the norm's kernel adds their input gradients (H200, ViT-B/16
    # +0.9 %), one elsewhere, where XLA would add them in passes of its own (H100, XLA's norms: one
    # GEMM +1.5 %).
    fused_qkv = self.fused_qkv if self.fused_qkv is not None else not (pallas_norms and not heads_split)
    # Three copies rather than one for query and one for key and value: XLA would add the key's and
    # the value's input gradients in a pass of its own where the GEMMs take no epilogue (JAX 0.10.2
    # for an H100 with Triton GEMMs enabled, as on a card: 2.83 GB of ViT-B/16's step), or in the
    # second GEMM's C operand, which reads as much as the kernel's third read.
    copies = 3 if pallas_norms and not fused_qkv and not heads_split else 1
    in_kernel = pallas_norms and self.dropout == 0.0  # the biases' gradients
    adds_in_kernel = norm_kernels_take_residual_adds(norm_impl, self.dropout, self.residual_in_norm)
    stream = ("act_batch", "act_length", "act_embed")
    # A block before deferred its residual add (it does so only where this block's norm takes it).
    x, addend, input_bias = x if isinstance(x, tuple) else (x, None, None)
    x = constrain(x, stream)
    addend = addend if addend is None else constrain(addend, stream)
    x, y, *y_kv = LayerNorm(dtype=self.dtype, impl=norm_impl, name="norm_attn")(
        x, keep_input=True, copies=copies, addend=addend, input_bias=input_bias)
    if select is not None:
      return self._selected_token(x, y, y_kv, mask, select, deterministic)
    attention = Attention(self.num_heads, dtype=self.dtype, causal=self.causal, impl=self.attention_impl,
                          fused_qkv=fused_qkv, name="attn")
    mlp = Mlp(self.mlp_dim, dtype=self.dtype, dropout=self.dropout, recompute_gelu=self.recompute_gelu,
              gelu_impl=self.gelu_impl, name="mlp")
    norm_mlp = LayerNorm(dtype=self.dtype, impl=norm_impl, name="norm_mlp")
    inputs_kv, inputs_v = y_kv if y_kv else (None, None)
    if not in_kernel:
      y = attention(y, mask, inputs_kv=inputs_kv, inputs_v=inputs_v)
      x = x + nn.Dropout(self.dropout)(y, deterministic)
      x, y = norm_mlp(x, keep_input=True)
      y = mlp(y, deterministic)
      return x + nn.Dropout(self.dropout)(y, deterministic)
    stop = lambda bias, like: jax.lax.stop_gradient(bias).astype(like.dtype)  # noqa: E731
    y, out_bias = attention(y, mask, inputs_kv=inputs_kv, inputs_v=inputs_v, add_out_bias=False)
    mlp_bias = mlp(x, output_bias_only=True)
    defer = self.defer_output and adds_in_kernel
    if adds_in_kernel:
      x, y = norm_mlp(x, keep_input=True, addend=y.astype(x.dtype), input_bias=out_bias,
                      residual_bias=None if defer else mlp_bias)
    else:  # the bias added here, its gradient the kernel's column sum
      x, y = norm_mlp(x + (y + stop(out_bias, y)), keep_input=True, input_bias=out_bias, residual_bias=mlp_bias)
    y = mlp(y, deterministic, add_output_bias=False)
    if defer:  # the next block's norm adds the MLP's bias and sums its gradient
      return x, y.astype(x.dtype), mlp_bias
    return x + (y + stop(mlp_bias, y))  # without a next norm to take the bias, norm_mlp sums its gradient

  def _selected_token(self, x, y, y_kv, mask, select, deterministic):
    """The block's output at token `select` of each example, from the stream x and its norm y (and
    y's copies): keys and values from every token, the query, the out projection, the MLP and its
    norm for the one token, as XLA ops (a few hundred rows; the parameters are the block's own). For
    ViT-B/16's class token that is 10/12 of the last block's GEMMs and its attention, MLP norm and
    GELU left out: the same outputs and gradients."""
    take = lambda a: jnp.take_along_axis(a, select[:, None, None], axis=1)  # noqa: E731  [batch, 1, width]
    visible = mask  # [batch, keys]: the padding's mask, and causally the keys up to the token
    if self.causal:
      upto = jnp.arange(y.shape[1])[None, :] <= select[:, None]
      visible = upto if mask is None else upto & mask
    inputs_kv, inputs_v = y_kv if y_kv else (y, None)
    attention = Attention(self.num_heads, dtype=self.dtype, impl="xla", fused_qkv=False, name="attn")
    x = take(x) + nn.Dropout(self.dropout)(attention(take(y), visible, inputs_kv=inputs_kv, inputs_v=inputs_v),
                                           deterministic)
    x, y = LayerNorm(dtype=self.dtype, name="norm_mlp")(x, keep_input=True)
    y = Mlp(self.mlp_dim, dtype=self.dtype, dropout=self.dropout, name="mlp")(y, deterministic)
    return x + nn.Dropout(self.dropout)(y, deterministic)


class ScannableBlock(nn.Module):
  """EncoderBlock with the (carry, _) -> (carry, None) signature nn.scan needs."""
  block_kwargs: dict

  @nn.compact
  def __call__(self, x, mask, deterministic, select=None):
    return EncoderBlock(**self.block_kwargs, name="block")(x, mask, deterministic, select), None


class Encoder(nn.Module):
  """A stack of `depth` blocks, optionally rematerialised and scanned over layers.

  Scanning compiles one block instead of `depth` copies (fast compiles for
  H/14); remat trades recomputation for activation memory.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  causal: bool = False
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan: bool = False
  fused_qkv: Optional[bool] = True
  recompute_gelu: bool = False
  norm_impl: str = "xla"
  gelu_impl: str = "xla"
  residual_in_norm: bool = True

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True, select: Optional[jax.Array] = None):
    """x [batch, tokens, width] -> the same; with `select` [batch] (int), the last block computes only
    that token of each example ([batch, 1, width], `EncoderBlock`), for a pooling that reads no other.
    Not with `scan`, where every layer runs the same code."""
    if select is not None and self.scan:
      raise ValueError("Encoder(scan=True) runs every block on all tokens; select needs scan=False.")
    if self.attention_impl in ("cudnn", "pallas"):  # an NVIDIA GPU: keep the stream [batch, tokens, width]
      x = row_major(x)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                  dropout=self.dropout, causal=self.causal, attention_impl=self.attention_impl,
                  fused_qkv=self.fused_qkv, recompute_gelu=self.recompute_gelu, norm_impl=self.norm_impl,
                  gelu_impl=self.gelu_impl, residual_in_norm=self.residual_in_norm)
    block = ScannableBlock
    if self.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(3,))
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(kwargs, name="blocks")(x, mask, deterministic)
    else:
      for i in range(self.depth):
        # Each block but the last hands its residual add to the next one's norm kernel (where the
        # block has them). Not under remat, whose saved block inputs would double.
        defer = i < self.depth - 1 and self.remat_policy == "none"
        last = select if i == self.depth - 1 else None
        x, _ = block(dict(kwargs, defer_output=defer), name=f"block{i:02d}")(x, mask, deterministic, last)
    return x
