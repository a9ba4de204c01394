"""Pallas (Triton) kernels for NVIDIA GPUs where XLA's fusions move more memory than they need to.

Both are options (`model.norm_impl='pallas'`, `model.gelu_impl='pallas'`); `interpret=True` runs the
same kernels in Pallas's interpreter (any backend; slow), which is how the tests check them on CPUs.

* `residual_layernorm`, the pre-LN block's LayerNorm. XLA computes a LayerNorm in two passes over
  the activations forward (the statistics, then the normalised output) and three backward (two row
  reductions, then the input gradient fused with the residual stream's). Compiled for an H100 that
  is ≈237 MB of the ViT-B/16 step's traffic per LayerNorm that a kernel holding each row in
  registers does not move. These kernels read x once and write y once forward; backward they read
  x, dy and the residual gradient once and write the summed input gradient, with per-program
  partial sums for the scale and bias gradients. The residual gradient has to enter the kernel or
  it costs a separate add: so the function is `x -> (x, LayerNorm(x))`, and the cotangent of the
  first output (everything the residual path sends back) is added inside the backward kernel.
* `bias_gelu`, GELU(h + bias) after the first MLP GEMM, saving only h. Its backward kernel
  recomputes GELU's derivative and writes the input gradient with per-program partial sums of the
  bias gradient: XLA's fusion for the same work (elementwise output plus a column reduction) ran at
  about half the H200's memory bandwidth (4.8 ms a ViT-B/16 step, 2026-11).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Rows per forward program; rows per backward program and per step of its loop. The backward's
# programs each write one row of partial scale/bias sums, so they take more rows (51,200 rows of
# ViT-B/16 at batch 256 -> 800 programs, 4.9 MB of partials).
FORWARD_ROWS = 4
BACKWARD_ROWS = 64
BACKWARD_STEP_ROWS = 4
NUM_WARPS = 4


def _block_cols(n_cols: int) -> int:
  """Triton blocks are powers of two: a 768-wide row is loaded as 1,024 lanes, the tail masked."""
  return 1 << max(n_cols - 1, 1).bit_length()


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, n_rows, n_cols, eps):
  rows = pl.program_id(0) * FORWARD_ROWS + jnp.arange(FORWARD_ROWS)
  cols = jnp.arange(_block_cols(n_cols))
  row_ok, col_ok = rows < n_rows, cols < n_cols
  ok = row_ok[:, None] & col_ok[None, :]
  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=ok, other=0.).astype(jnp.float32)
  mean = jnp.sum(x, axis=1) / n_cols
  centred = jnp.where(ok, x - mean[:, None], 0.)
  rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / n_cols + eps)
  scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)
  y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
  plgpu.store(y_ref.at[rows[:, None], cols[None, :]], y.astype(y_ref.dtype), mask=ok)
  plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
  plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(x_ref, dy_ref, dres_ref, mean_ref, rstd_ref, scale_ref,
                     dx_ref, dscale_ref, dbias_ref, *, n_rows, n_cols):
  program = pl.program_id(0)
  cols = jnp.arange(_block_cols(n_cols))
  col_ok = cols < n_cols
  scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)

  def step(i, sums):
    dscale, dbias = sums
    rows = program * BACKWARD_ROWS + i * BACKWARD_STEP_ROWS + jnp.arange(BACKWARD_STEP_ROWS)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & col_ok[None, :]
    at = (rows[:, None], cols[None, :])
    x = plgpu.load(x_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    dy = plgpu.load(dy_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    dres = plgpu.load(dres_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.)
    rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.)
    xhat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.)
    dxhat = dy * scale[None, :]
    # d/dx of (x - mean) * rstd, applied to dxhat: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = jnp.sum(dxhat, axis=1) / n_cols
    mean_dxhat_xhat = jnp.sum(dxhat * xhat, axis=1) / n_cols
    dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None] + dres
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
    return dscale + jnp.sum(dy * xhat, axis=0), dbias + jnp.sum(dy, axis=0)

  zeros = jnp.zeros((_block_cols(n_cols),), jnp.float32)
  dscale, dbias = jax.lax.fori_loop(0, BACKWARD_ROWS // BACKWARD_STEP_ROWS, step, (zeros, zeros))
  plgpu.store(dscale_ref.at[program, cols], dscale, mask=col_ok)
  plgpu.store(dbias_ref.at[program, cols], dbias, mask=col_ok)


def _compiler_params(interpret: bool) -> Any:
  # Triton's parameters also pick Pallas's Triton backend over Mosaic GPU, which JAX 0.10 defaults to.
  return None if interpret else plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(x2, scale, bias, eps, out_dtype, interpret):
  n_rows, n_cols = x2.shape
  kernel = functools.partial(_forward_kernel, n_rows=n_rows, n_cols=n_cols, eps=eps)
  stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, FORWARD_ROWS),), name="bigvis_pallas_layernorm_forward",
      out_shape=[jax.ShapeDtypeStruct((n_rows, n_cols), out_dtype), stats, stats],
      compiler_params=_compiler_params(interpret), interpret=interpret)(x2, scale, bias)


def _backward(x2, dy2, dres2, mean, rstd, scale, interpret):
  n_rows, n_cols = x2.shape
  programs = pl.cdiv(n_rows, BACKWARD_ROWS)
  kernel = functools.partial(_backward_kernel, n_rows=n_rows, n_cols=n_cols)
  partial_sums = jax.ShapeDtypeStruct((programs, n_cols), jnp.float32)
  return pl.pallas_call(
      kernel, grid=(programs,), name="bigvis_pallas_layernorm_backward",
      out_shape=[jax.ShapeDtypeStruct((n_rows, n_cols), x2.dtype), partial_sums, partial_sums],
      compiler_params=_compiler_params(interpret), interpret=interpret)(x2, dy2, dres2, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _residual_layernorm(x, scale, bias, eps, out_dtype, interpret):
  return _residual_layernorm_fwd(x, scale, bias, eps, out_dtype, interpret)[0]


def _residual_layernorm_fwd(x, scale, bias, eps, out_dtype, interpret):
  width = x.shape[-1]
  y, mean, rstd = _forward(x.reshape(-1, width), scale, bias, eps, out_dtype, interpret)
  return (x, y.reshape(x.shape)), (x, mean, rstd, scale, bias)  # x is the input itself: no copy


def _residual_layernorm_bwd(eps, out_dtype, interpret, saved, cotangents):
  del eps, out_dtype
  x, mean, rstd, scale, bias = saved
  dres, dy = cotangents  # dres: all the residual path sends back to x
  width = x.shape[-1]
  dx, dscale, dbias = _backward(x.reshape(-1, width), dy.reshape(-1, width).astype(x.dtype),
                                dres.reshape(-1, width).astype(x.dtype), mean, rstd, scale, interpret)
  return (dx.reshape(x.shape), jnp.sum(dscale, axis=0).astype(scale.dtype),
          jnp.sum(dbias, axis=0).astype(bias.dtype))


_residual_layernorm.defvjp(_residual_layernorm_fwd, _residual_layernorm_bwd)


def _per_device(call, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
  """`call(*args)` on each device's own shard under a mesh (a Pallas call has no partitioning rule of
  its own, so XLA would otherwise gather the activations onto every device); directly without one.
  A spec of None marks the call as unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if in_specs is None or mesh.empty or mesh.size == 1:
    return call(*args)
  # check_vma=False: a Pallas call's outputs carry no record of which mesh axes they vary over.
  return shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def residual_layernorm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                       dtype: Any, interpret: bool = False,
                       batch_axes: tuple[Any, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """(x, LayerNorm(x) in `dtype`) over the last axis, the backward adding the residual gradient.

  Under a mesh, `batch_axes` is x's PartitionSpec without the last (normalised) axis, which must be
  whole on every device: each device then runs the kernels on its own rows.
  """
  def call(x, scale, bias):
    return _residual_layernorm(x, scale, bias, float(epsilon), jnp.dtype(dtype), interpret)
  P = jax.sharding.PartitionSpec
  spec = None if batch_axes is None else P(*batch_axes, None)
  return _per_device(call, (x, scale, bias), None if spec is None else (spec, P(), P()), (spec, spec))


# --- GELU(h + bias), backward as one kernel ------------------------------------------------------

GELU_ROWS = 64       # rows per backward program (one row of partial bias sums each)
GELU_STEP_ROWS = 8   # rows per step of its loop
GELU_COLS = 256      # columns per program: [8, 256] tiles


def _gelu_tanh_grad(z):
  """d/dz of jax.nn.gelu(z, approximate=True) = z * 0.5 * (1 + tanh(c * (z + 0.044715 z^3)))."""
  c = float(np.sqrt(2. / np.pi))
  t = jnp.tanh(c * (z + 0.044715 * z * z * z))
  return 0.5 * (1. + t) + 0.5 * z * (1. - t * t) * c * (1. + 3. * 0.044715 * z * z)


def _bias_gelu_backward_kernel(h_ref, bias_ref, dg_ref, dh_ref, dbias_ref, *, n_rows, n_cols):
  row_block, col_block = pl.program_id(0), pl.program_id(1)
  cols = col_block * GELU_COLS + jnp.arange(GELU_COLS)
  col_ok = cols < n_cols
  bias = plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)

  def step(i, dbias):
    rows = row_block * GELU_ROWS + i * GELU_STEP_ROWS + jnp.arange(GELU_STEP_ROWS)
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    at = (rows[:, None], cols[None, :])
    z = plgpu.load(h_ref.at[at], mask=ok, other=0.).astype(jnp.float32) + bias[None, :]
    dg = plgpu.load(dg_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    dh = jnp.where(ok, dg * _gelu_tanh_grad(z), 0.)
    plgpu.store(dh_ref.at[at], dh.astype(dh_ref.dtype), mask=ok)
    return dbias + jnp.sum(dh, axis=0)

  dbias = jax.lax.fori_loop(0, GELU_ROWS // GELU_STEP_ROWS, step, jnp.zeros((GELU_COLS,), jnp.float32))
  plgpu.store(dbias_ref.at[row_block, cols], dbias, mask=col_ok)


def _bias_gelu_backward(h2, bias, dg2, interpret):
  n_rows, n_cols = h2.shape
  grid = (pl.cdiv(n_rows, GELU_ROWS), pl.cdiv(n_cols, GELU_COLS))
  kernel = functools.partial(_bias_gelu_backward_kernel, n_rows=n_rows, n_cols=n_cols)
  return pl.pallas_call(
      kernel, grid=grid, name="bigvis_pallas_bias_gelu_backward",
      out_shape=[jax.ShapeDtypeStruct((n_rows, n_cols), h2.dtype),
                 jax.ShapeDtypeStruct((grid[0], n_cols), jnp.float32)],
      compiler_params=_compiler_params(interpret), interpret=interpret)(h2, bias, dg2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_gelu(h, bias, interpret):
  # Forward in XLA (flax's nn.gelu, the tanh approximation): one fusion reading h, writing GELU.
  return jax.nn.gelu(h + bias, approximate=True)


def _bias_gelu_fwd(h, bias, interpret):
  return _bias_gelu(h, bias, interpret), (h, bias)


def _bias_gelu_bwd(interpret, saved, dg):
  h, bias = saved
  width = h.shape[-1]
  dh, dbias = _bias_gelu_backward(h.reshape(-1, width), bias, dg.reshape(-1, width).astype(h.dtype), interpret)
  return dh.reshape(h.shape), jnp.sum(dbias, axis=0).astype(bias.dtype)


_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def bias_gelu(h: jax.Array, bias: jax.Array, *, interpret: bool = False,
              axes: tuple[Any, ...] | None = None) -> jax.Array:
  """GELU(h + bias) (flax's tanh approximation), saving only h and computing the backward in one
  Pallas kernel. Under a mesh, `axes` is h's PartitionSpec (its last axis may be split, e.g. over
  `tensor`): each device runs the kernel on its own shard."""
  def call(h, bias):
    return _bias_gelu(h, bias, interpret)
  P = jax.sharding.PartitionSpec
  specs = None if axes is None else (P(*axes), P(axes[-1]))
  return _per_device(call, (h, bias), specs, None if axes is None else P(*axes))
