"""Pallas (Triton) kernels for NVIDIA GPUs where XLA's fusions move more memory than they need to.

`model.norm_impl` and `model.gelu_impl` pick them ('pallas', or 'auto', the default: on NVIDIA GPUs);
`interpret=True` runs the same kernels in Pallas's interpreter (any backend; slow), which is how the
tests check them on CPUs.

* `residual_layernorm`, the pre-LN block's LayerNorm. XLA computes a LayerNorm in two passes over
  the activations forward (the statistics, then the normalised output) and three backward (two row
  reductions, then the input gradient fused with the residual stream's). Compiled for an H100 that
  is ≈237 MB of the ViT-B/16 step's traffic per LayerNorm (24 of them) that a kernel holding each
  row in registers does not move. These kernels read x once and write y once forward (with an addend,
  also read it and write the sum); backward they read
  x, y's gradient(s) and the residual gradient once and write the summed input gradient, with
  per-program partial sums for the scale and bias gradients (and for the residual stream's biases
  where the block hands them over). The residual gradient has to enter the kernel or it costs a
  separate add: so the function is `x -> (x, LayerNorm(x))`, and the cotangent of the first output
  (everything the residual path sends back) is added inside the backward kernel. The residual add
  before the norm enters it too: `(x, addend, b) -> (x + addend + b, LayerNorm(...))` reads the
  stream and the previous projection's output and writes their sum as it normalises it.
* `bias_gelu`, GELU(h + bias) after the first MLP GEMM, saving only h: a forward kernel (read h,
  write GELU) and a backward one that recomputes GELU's derivative and writes the input gradient
  with per-program partial sums of the bias gradient, both with GELU's tanh written as a sigmoid
  (`_gelu_sigmoid`: an exponential and a division, where tanh is ≈25 instructions).
  XLA's fusions for the same work move no more bytes but run ≈36 (forward) and more (backward)
  instructions an element, compiled for an H100: on the H200 they took 3.1 and 4.0 ms of a
  ViT-B/16 step, about half the card's memory bandwidth; the kernels take 2.1 and 3.7 ms (≈3.6 and
  3.1 TB/s), and the step 64.0 ms against 65.0 (2026-11).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bigvis.errors import UserError
from bigvis.sharding import per_device

# Each kernel's tiling and Triton parameters: rows per program, rows per step of a backward's loop,
# columns per program (GELU's; a LayerNorm program takes whole rows), warps and software-pipeline
# stages. A backward's programs each write one row of partial sums, so they take more rows (51,200
# rows of ViT-B/16 at batch 256 -> 800 LayerNorm programs, 4.9 MB of partials). The LayerNorm and
# GELU tilings are the fastest of `benchmarks/pallas_kernels_check.py --sweep` at ViT-B/16's shapes on
# an H200 (twenty-first session: the B/16 step 59.6 -> 58.8 ms); `set_tiles` puts another sweep's in
# place for a run (benchmarks/peers.py --kernel-tiles).
TILES = {
    "layernorm_forward": dict(rows=1, warps=1, stages=1),
    "layernorm_backward": dict(rows=64, step_rows=2, warps=4, stages=2),
    "bias_gelu_forward": dict(rows=8, cols=1024, warps=4, stages=1),
    "bias_gelu_backward": dict(rows=64, step_rows=16, cols=256, warps=4, stages=1),
    # Attention (`pallas_attention`): query rows and keys per block; the backward's blocks are both.
    # Not from the sweep: its fastest (keys=128) was timed at 197 tokens, and CLIP's text tower runs 77.
    "attention_forward": dict(rows=64, keys=64, warps=4, stages=1),
    "attention_backward": dict(rows=64, warps=4, stages=1),
}


def set_tiles(tiles: dict[str, dict[str, int]]) -> None:
  """Replaces some kernels' tilings (each setting whole, with TILES's keys). Kernels read TILES when
  they are traced, so this must come before the step is jitted. Rows, columns and warps are powers of
  two, and a backward's loop steps divide its rows: a loop that stopped short would leave rows unwritten."""
  if not isinstance(tiles, dict) or not tiles:
    raise UserError(f"Pallas kernels' tilings must map kernel names ({', '.join(TILES)}) to settings; got {tiles!r}.")
  for kernel, setting in tiles.items():
    if kernel not in TILES:
      raise UserError(f"Unknown Pallas kernel '{kernel}' in the tilings; known: {', '.join(TILES)}.")
    if (not isinstance(setting, dict) or set(setting) != set(TILES[kernel])
        or not all(isinstance(v, int) and v > 0 for v in setting.values())):
      raise UserError(f"The tiling of '{kernel}' needs positive integers for exactly "
                      f"{', '.join(sorted(TILES[kernel]))}; got {setting}.")
    odd = [k for k in ("rows", "step_rows", "cols", "keys", "warps") if k in setting and setting[k] & (setting[k] - 1)]
    if odd or setting.get("step_rows", 1) > setting["rows"]:
      raise UserError(f"The tiling of '{kernel}' needs powers of two for rows, step_rows, cols, keys and warps, and "
                      f"step_rows <= rows; got {setting}.")
  for kernel, setting in tiles.items():
    TILES[kernel] = dict(setting)


def _block_cols(n_cols: int) -> int:
  """Triton blocks are powers of two: a 768-wide row is loaded as 1,024 lanes, the tail masked."""
  return 1 << max(n_cols - 1, 1).bit_length()


def _forward_kernel(*refs, n_rows, n_cols, eps, summed):
  """refs: x, with `summed` the addend and the input bias, then scale and bias; the outputs y, mean,
  rstd and with `summed` s = x + addend + input bias (rounded to s's dtype, which the statistics and
  the backward then see)."""
  if summed:
    x_ref, addend_ref, input_bias_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, s_ref = refs
  else:
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
  tile = TILES["layernorm_forward"]["rows"]
  rows = pl.program_id(0) * tile + jnp.arange(tile)
  cols = jnp.arange(_block_cols(n_cols))
  row_ok, col_ok = rows < n_rows, cols < n_cols
  ok = row_ok[:, None] & col_ok[None, :]
  at = (rows[:, None], cols[None, :])
  x = plgpu.load(x_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
  if summed:
    addend = plgpu.load(addend_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    input_bias = plgpu.load(input_bias_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)
    s = (x + addend + input_bias[None, :]).astype(s_ref.dtype)
    plgpu.store(s_ref.at[at], s, mask=ok)
    x = s.astype(jnp.float32)
  mean = jnp.sum(x, axis=1) / n_cols
  centred = jnp.where(ok, x - mean[:, None], 0.)
  rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / n_cols + eps)
  scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)
  y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
  plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=ok)
  plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
  plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(*refs, n_rows, n_cols, n_dy, sum_dx, sum_dres):
  """refs: x, n_dy incoming gradients of y (summed here), the residual gradient, mean, rstd, scale;
  then the outputs dx and partial column sums of scale's and bias's gradients, and with `sum_dx`
  of dx, with `sum_dres` of the residual gradient."""
  x_ref, *dy_refs, dres_ref, mean_ref, rstd_ref, scale_ref = refs[:n_dy + 5]
  dx_ref, *sum_refs = refs[n_dy + 5:]
  program = pl.program_id(0)
  tile = TILES["layernorm_backward"]
  cols = jnp.arange(_block_cols(n_cols))
  col_ok = cols < n_cols
  scale = plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.).astype(jnp.float32)

  def step(i, sums):
    rows = program * tile["rows"] + i * tile["step_rows"] + jnp.arange(tile["step_rows"])
    row_ok = rows < n_rows
    ok = row_ok[:, None] & col_ok[None, :]
    at = (rows[:, None], cols[None, :])
    load = lambda ref: plgpu.load(ref.at[at], mask=ok, other=0.).astype(jnp.float32)  # noqa: E731
    x, dres = load(x_ref), load(dres_ref)
    dy = functools.reduce(jnp.add, [load(ref) for ref in dy_refs])
    mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.)
    rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.)
    xhat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.)
    dxhat = dy * scale[None, :]
    # d/dx of (x - mean) * rstd, applied to dxhat: rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = jnp.sum(dxhat, axis=1) / n_cols
    mean_dxhat_xhat = jnp.sum(dxhat * xhat, axis=1) / n_cols
    dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None] + dres
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
    added = (dy * xhat, dy) + ((dx,) if sum_dx else ()) + ((dres,) if sum_dres else ())
    return tuple(total + jnp.sum(more, axis=0) for total, more in zip(sums, added))

  zeros = jnp.zeros((_block_cols(n_cols),), jnp.float32)
  sums = jax.lax.fori_loop(0, tile["rows"] // tile["step_rows"], step, (zeros,) * (2 + sum_dx + sum_dres))
  for ref, partial in zip(sum_refs, sums):
    plgpu.store(ref.at[program, cols], partial, mask=col_ok)


def _compiler_params(interpret: bool, kernel: str) -> Any:
  # Triton's parameters also pick Pallas's Triton backend over Mosaic GPU, which JAX 0.10 defaults to.
  tile = TILES[kernel]
  return None if interpret else plgpu.CompilerParams(num_warps=tile["warps"], num_stages=tile["stages"])


def _layernorm_forward(x, scale, bias, addend=None, input_bias=None, *, eps, out_dtype, interpret):
  """x [..., width] -> (y like x in out_dtype, mean and rstd [...]), normalising x, or with an
  `addend` (like x) and an `input_bias` [width], s = x + addend + input_bias, then also s: one
  device's rows."""
  width = x.shape[-1]
  n_rows = x.size // width
  summed = addend is not None
  kernel = functools.partial(_forward_kernel, n_rows=n_rows, n_cols=width, eps=eps, summed=summed)
  stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
  rows = jax.ShapeDtypeStruct((n_rows, width), out_dtype)
  sums = [jax.ShapeDtypeStruct((n_rows, width), x.dtype)] if summed else []
  inputs = [x.reshape(n_rows, width)] + ([addend.reshape(n_rows, width), input_bias] if summed else [])
  y, mean, rstd, *s = pl.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, TILES["layernorm_forward"]["rows"]),), name="bigvis_pallas_layernorm_forward",
      out_shape=[rows, stats, stats] + sums,
      compiler_params=_compiler_params(interpret, "layernorm_forward"), interpret=interpret)(*inputs, scale, bias)
  out = (y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1]))
  return out + (s[0].reshape(x.shape),) if summed else out


def _layernorm_backward(x, dys, dres, mean, rstd, scale, *, sum_dx, sum_dres, interpret):
  """(dx like x, partial column sums [programs, width] of the scale and bias gradients, then of dx
  and dres where asked): one device's rows. `dys`: the gradients of y's copies, which the kernel
  sums as it reads them."""
  width = x.shape[-1]
  n_rows = x.size // width
  programs = pl.cdiv(n_rows, TILES["layernorm_backward"]["rows"])
  kernel = functools.partial(_backward_kernel, n_rows=n_rows, n_cols=width, n_dy=len(dys), sum_dx=sum_dx,
                             sum_dres=sum_dres)
  partial_sums = jax.ShapeDtypeStruct((programs, width), jnp.float32)
  rows = lambda a: a.reshape(n_rows, -1)  # noqa: E731
  dx, *sums = pl.pallas_call(
      kernel, grid=(programs,), name="bigvis_pallas_layernorm_backward",
      out_shape=[jax.ShapeDtypeStruct((n_rows, width), x.dtype)] + [partial_sums] * (2 + sum_dx + sum_dres),
      compiler_params=_compiler_params(interpret, "layernorm_backward"), interpret=interpret)(
          rows(x), *map(rows, dys), rows(dres), mean.reshape(n_rows), rstd.reshape(n_rows), scale)
  return [dx.reshape(x.shape)] + sums


P = jax.sharding.PartitionSpec


def _flat_mesh_axes(entries: tuple[Any, ...]) -> tuple[str, ...]:
  """Every mesh axis named in PartitionSpec entries, in order: the axes that split a flattened dim."""
  names = []
  for entry in entries:
    names += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
  return tuple(names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _residual_layernorm(x, scale, bias, addend, input_bias, residual_bias, eps, out_dtype, interpret, batch_axes,
                        copies, summed):
  return _residual_layernorm_fwd(x, scale, bias, addend, input_bias, residual_bias, eps, out_dtype, interpret,
                                 batch_axes, copies, summed)[0]


def _residual_layernorm_fwd(x, scale, bias, addend, input_bias, residual_bias, eps, out_dtype, interpret,
                            batch_axes, copies, summed):
  """`summed` (there is an addend): the kernel adds it and the input bias to x; without, any input
  bias is already in x (only its gradient is wanted)."""
  forward = functools.partial(_layernorm_forward, eps=eps, out_dtype=out_dtype, interpret=interpret)
  args = (x, scale, bias) + ((addend, input_bias) if summed else ())
  in_specs = out_specs = None
  if batch_axes is not None:
    rows, stats = P(*batch_axes, None), P(*batch_axes)
    in_specs = (rows, P(), P()) + ((rows, P()) if summed else ())
    out_specs = (rows, stats, stats) + ((rows,) if summed else ())
  y, mean, rstd, *s = per_device(forward, args, in_specs, out_specs)
  s = s[0] if summed else x  # without an addend, x itself (no copy)
  # The biases' values are not needed backward, only their gradients, and the addend's gradient is
  # s's: nothing of them is kept but the (small) biases, for their gradients' shape and dtype.
  return (s,) + (y,) * copies, (s, mean, rstd, scale, input_bias, residual_bias)


def _residual_layernorm_bwd(eps, out_dtype, interpret, batch_axes, copies, summed, saved, cotangents):
  del eps, out_dtype, copies
  s, mean, rstd, scale, input_bias, residual_bias = saved
  dres, *dys = cotangents  # dres: all the residual path sends back to s
  sum_ds, sum_dres = input_bias is not None, residual_bias is not None
  backward = functools.partial(_layernorm_backward, sum_dx=sum_ds, sum_dres=sum_dres, interpret=interpret)
  in_specs = out_specs = None
  if batch_axes is not None:
    rows, stats, partials = P(*batch_axes, None), P(*batch_axes), P(_flat_mesh_axes(batch_axes), None)
    in_specs = (rows, [rows] * len(dys), rows, stats, stats, P())
    out_specs = [rows] + [partials] * (2 + sum_ds + sum_dres)
  ds, *sums = per_device(backward, (s, dys, dres, mean, rstd, scale), in_specs, out_specs)
  # The partials summed stacked, one reduction for the 2 to 4 (XLA reduces each array in a kernel of
  # its own; the stacking fuses into the reduction, the rows taken apart in the gradients' readers).
  totals = iter(jnp.sum(jnp.stack(sums), axis=1))
  total = lambda like: next(totals).astype(like.dtype)  # noqa: E731
  dscale, dbias = total(scale), total(scale)  # scale and bias: one LayerNorm's parameters, of one dtype
  d_input_bias = total(input_bias) if sum_ds else None
  d_residual_bias = total(residual_bias) if sum_dres else None
  # s = x + addend + input_bias: x and the addend both get s's gradient, one array.
  return ds, dscale, dbias, ds if summed else None, d_input_bias, d_residual_bias


_residual_layernorm.defvjp(_residual_layernorm_fwd, _residual_layernorm_bwd)


def residual_layernorm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                       dtype: Any, interpret: bool = False, batch_axes: tuple[Any, ...] | None = None,
                       copies: int = 1, addend: jax.Array | None = None, input_bias: jax.Array | None = None,
                       residual_bias: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """(s, LayerNorm(s) in `dtype`, ...: `copies` of it) over the last axis, where s is x, or with an
  `addend`, x + addend + input_bias; the backward adds the residual gradient (s's).

  More passes of a block fold into the kernels' reads and writes:
  * `addend` (like x): the residual add before the norm, x + the previous projection's GEMM output
    + its bias (`input_bias`, which comes with it), is done in the forward kernel, which writes s as it normalises it
    (XLA would write s in a pass of its own and the kernel read it again: ≈79 MB per norm at
    ViT-B/16 batch 256). x and the addend get s's gradient.
  * `input_bias`: a [width] bias in s, added by the kernel with an addend, else already added into x
    by the caller with its gradient stopped (the previous projection's). Its gradient is the column
    sum of s's, which the backward kernel sums as it writes s's, where XLA would read it again.
  * `copies`: LayerNorm(s) is returned that many times, one per consumer, so their gradients reach the
    kernel apart and are summed as it reads them; XLA would add them in a pass of its own (ViT's
    separate query, key and value projections: three copies; two of them were ≈157 MB less traffic
    per block at ViT-B/16 batch 256, each further one ≈157 MB where the GEMMs take no epilogue).
    They pass through an optimisation barrier, as distinct values: XLA merges GEMMs that read one
    array into one GEMM and slices its output (CLIP's text tower with fused_qkv=false: 2 GB of
    slices a step).
  * `residual_bias`: a [width] bias that the caller adds, its gradient stopped, to the residual
    stream after the returned s (the next projection's, where no later norm takes it as its input
    bias). Its gradient is the column sum of the residual gradient, which the kernel reads anyway.
  Under a mesh, `batch_axes` is x's PartitionSpec without the last (normalised) axis, which must be
  whole on every device: each device then runs the kernels on its own rows.
  """
  if addend is not None and (addend.shape != x.shape or addend.dtype != x.dtype):
    raise ValueError(f"addend must be like x ({x.dtype}{list(x.shape)}), got {addend.dtype}{list(addend.shape)}")
  if addend is not None and input_bias is None:
    raise ValueError("an addend comes with its input_bias (the projection's bias the kernel adds)")
  for name, b in (("input_bias", input_bias), ("residual_bias", residual_bias)):
    if b is not None and b.shape != x.shape[-1:]:
      raise ValueError(f"{name} must be [{x.shape[-1]}], got {list(b.shape)}")
  s, *ys = _residual_layernorm(x, scale, bias, addend, input_bias, residual_bias, float(epsilon), jnp.dtype(dtype),
                               interpret, None if batch_axes is None else tuple(batch_axes), int(copies),
                               addend is not None)
  if len(ys) > 1:  # distinct values (the docstring's `copies`)
    ys = jax.lax.optimization_barrier(tuple(ys))
  return (s, *ys)


# --- GELU(h + bias): forward and backward kernels ----------------------------------------------

_GELU_C = float(np.sqrt(2. / np.pi))
_GELU_2C_LOG2E = float(2. * np.sqrt(2. / np.pi) / np.log(2.))  # exp(-2u) = 2^(-2u log2(e))


def _gelu_sigmoid(z):
  """(s, e) for GELU's tanh form written as a sigmoid: 0.5 (1 + tanh(u)) = s = 1 / (1 + e), with
  u = c (z + 0.044715 z^3) and e = exp(-2u), computed as a power of 2 and capped at 2^115 so that e
  (and e s) stay finite.

  Why not tanh: on the GPU jnp.tanh is a libdevice routine and XLA's fusions use a rational function
  with a division, ≈25 instructions an element; compiled for an H100, XLA's forward GELU fusion runs
  ≈36 an element, as long at the SMs' issue rate as its bytes take at the memory's. An exponential
  and a division are a few (`ex2.approx` and a reciprocal). And 1 + tanh(u) cancels where z is
  negative (the GPU's approximate tanh, ≈2^-11 absolute, would be off by tens of percent at
  z = -3), which s does not: 1 - s = e s, to float32 rounding everywhere.
  """
  e = jnp.exp2(jnp.minimum(-_GELU_2C_LOG2E * (z + 0.044715 * z * z * z), 115.))  # exp(-2u), < 2^115
  return 1. / (1. + e), e


def _gelu_tanh(z):
  """jax.nn.gelu(z, approximate=True) = z * 0.5 * (1 + tanh(c * (z + 0.044715 z^3))) = z s."""
  return z * _gelu_sigmoid(z)[0]


def _gelu_tanh_grad(z):
  """d/dz of `_gelu_tanh`: s + z s (1 - s) 2 du/dz."""
  s, e = _gelu_sigmoid(z)
  return s + z * s * (e * s) * (2. * _GELU_C) * (1. + 3. * 0.044715 * z * z)


def _rounded_bias(bias_ref, cols, col_ok, dtype):
  """The bias's columns in float32, rounded to `dtype` first (h's: as XLA adds a bias it converted)."""
  return plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.).astype(dtype).astype(jnp.float32)


def _bias_gelu_forward_kernel(h_ref, bias_ref, g_ref, *, n_rows, n_cols):
  tile = TILES["bias_gelu_forward"]
  rows = pl.program_id(0) * tile["rows"] + jnp.arange(tile["rows"])
  cols = pl.program_id(1) * tile["cols"] + jnp.arange(tile["cols"])
  col_ok = cols < n_cols
  ok = (rows < n_rows)[:, None] & col_ok[None, :]
  at = (rows[:, None], cols[None, :])
  bias = _rounded_bias(bias_ref, cols, col_ok, g_ref.dtype)
  z = plgpu.load(h_ref.at[at], mask=ok, other=0.).astype(jnp.float32) + bias[None, :]
  plgpu.store(g_ref.at[at], _gelu_tanh(z).astype(g_ref.dtype), mask=ok)


def _bias_gelu_forward(h, bias, *, interpret):
  """GELU(h + bias) like h: one device's shard."""
  width = h.shape[-1]
  n_rows = h.size // width
  tile = TILES["bias_gelu_forward"]
  kernel = functools.partial(_bias_gelu_forward_kernel, n_rows=n_rows, n_cols=width)
  g = pl.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, tile["rows"]), pl.cdiv(width, tile["cols"])),
      name="bigvis_pallas_bias_gelu_forward", out_shape=jax.ShapeDtypeStruct((n_rows, width), h.dtype),
      compiler_params=_compiler_params(interpret, "bias_gelu_forward"),
      interpret=interpret)(h.reshape(n_rows, width), bias)
  return g.reshape(h.shape)


def _bias_gelu_backward_kernel(h_ref, bias_ref, dg_ref, dh_ref, dbias_ref, *, n_rows, n_cols):
  row_block, col_block = pl.program_id(0), pl.program_id(1)
  tile = TILES["bias_gelu_backward"]
  cols = col_block * tile["cols"] + jnp.arange(tile["cols"])
  col_ok = cols < n_cols
  bias = _rounded_bias(bias_ref, cols, col_ok, dh_ref.dtype)

  def step(i, dbias):
    rows = row_block * tile["rows"] + i * tile["step_rows"] + jnp.arange(tile["step_rows"])
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    at = (rows[:, None], cols[None, :])
    z = plgpu.load(h_ref.at[at], mask=ok, other=0.).astype(jnp.float32) + bias[None, :]
    dg = plgpu.load(dg_ref.at[at], mask=ok, other=0.).astype(jnp.float32)
    dh = jnp.where(ok, dg * _gelu_tanh_grad(z), 0.)
    plgpu.store(dh_ref.at[at], dh.astype(dh_ref.dtype), mask=ok)
    return dbias + jnp.sum(dh, axis=0)

  dbias = jax.lax.fori_loop(0, tile["rows"] // tile["step_rows"], step, jnp.zeros((tile["cols"],), jnp.float32))
  plgpu.store(dbias_ref.at[row_block, cols], dbias, mask=col_ok)


def _bias_gelu_backward(h, bias, dg, *, interpret):
  """(dh like h, partial bias sums [row programs, width]): one device's shard."""
  width = h.shape[-1]
  n_rows = h.size // width
  tile = TILES["bias_gelu_backward"]
  grid = (pl.cdiv(n_rows, tile["rows"]), pl.cdiv(width, tile["cols"]))
  kernel = functools.partial(_bias_gelu_backward_kernel, n_rows=n_rows, n_cols=width)
  dh, dbias = pl.pallas_call(
      kernel, grid=grid, name="bigvis_pallas_bias_gelu_backward",
      out_shape=[jax.ShapeDtypeStruct((n_rows, width), h.dtype),
                 jax.ShapeDtypeStruct((grid[0], width), jnp.float32)],
      compiler_params=_compiler_params(interpret, "bias_gelu_backward"), interpret=interpret)(
          h.reshape(n_rows, width), bias, dg.reshape(n_rows, width))
  return dh.reshape(h.shape), dbias


def _gelu_specs(axes):
  """shard_map specs of h (PartitionSpec `axes`; None without a mesh), the bias (h's last axis) and
  the partial bias sums (a row per program of every device's rows)."""
  if axes is None:
    return None, None, None
  return P(*axes), P(axes[-1]), P(_flat_mesh_axes(axes[:-1]), axes[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bias_gelu_kernels(h, bias, interpret, axes):
  return _bias_gelu_fwd(h, bias, interpret, axes)[0]


def _bias_gelu_fwd(h, bias, interpret, axes):
  h_spec, bias_spec, _ = _gelu_specs(axes)
  forward = functools.partial(_bias_gelu_forward, interpret=interpret)
  g = per_device(forward, (h, bias), None if axes is None else (h_spec, bias_spec), h_spec)
  return g, (h, bias)


def _bias_gelu_bwd(interpret, axes, saved, dg):
  h, bias = saved
  h_spec, bias_spec, sums_spec = _gelu_specs(axes)
  backward = functools.partial(_bias_gelu_backward, interpret=interpret)
  dh, dbias = per_device(backward, (h, bias, dg), None if axes is None else (h_spec, bias_spec, h_spec),
                          (h_spec, sums_spec))
  return dh, jnp.sum(dbias, axis=0).astype(bias.dtype)


_bias_gelu_kernels.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def bias_gelu(h: jax.Array, bias: jax.Array, *, interpret: bool = False,
              axes: tuple[Any, ...] | None = None) -> jax.Array:
  """GELU(h + bias) (flax's tanh approximation), saving only h: the forward one Pallas kernel (read h,
  write GELU), the backward another (the derivative of GELU recomputed, times the incoming gradient,
  and per-program partial sums of the bias gradient), both with GELU's tanh written as a sigmoid
  (`_gelu_sigmoid`). The bias may be float32 (the parameter): the kernels round it to h's dtype as
  they read it, where XLA would convert it in a tiny kernel of its own. Under a mesh, `axes` is h's
  PartitionSpec (its last axis may be split, e.g. over `tensor`): each device runs the kernels on
  its own shard."""
  return _bias_gelu_kernels(h, bias, interpret, None if axes is None else tuple(axes))
