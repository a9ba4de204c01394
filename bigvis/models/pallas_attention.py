"""Attention for short sequences as Pallas (Triton) kernels: `attention_impl='pallas'` (NVIDIA GPUs).

Why not cuDNN's: on an H200 (2026-11, ViT-B/16 at 200 tokens, head size 64, batch 256) cuDNN's
flash kernels and their helpers took 10.35 ms of the 64 ms step, and XLA another 0.87 ms adding the
query bias and summing its gradient. Of those, 1.85 ms are helper passes of a general design: one
reads dO and O to write rowsum(dO * O), one converts dQ from the float32 it accumulates atomically.
With as few tokens as a ViT's, these kernels need neither:
* the forward (grid: query blocks, heads, examples; `_grid`) adds the query bias as it loads the queries, keeps
  the softmax's statistics in registers over the key blocks, and writes O and the log-sum-exp;
* the backward (grid: blocks, heads, examples) lets program j own key block j, for which it sums dK
  and dV over every query block, and query block j, for which it sums dQ over every key block. dQ
  is written once, in the activations' dtype, with no atomics; each program computes
  rowsum(dO * O) for the rows it reads; and the query bias's gradient leaves as per-program
  column sums of dQ. The price is recomputing the logits and dP for dQ: seven block GEMMs where a
  flash backward with atomics does five.
Logits are computed in float32 in log2 units (`exp2`), probabilities and dS rounded to the inputs'
dtype for their GEMMs, as flash kernels do.

Blocks are powers of two (Triton's), the last one trimmed to what the sequence needs (`blocks_of`);
rows past the sequence's end are masked, so any length works without padding, and a fused q/k/v
GEMM's output is read in place. Head sizes must be powers of two of at least 16 (`supports_head_dim`).
`interpret=True` runs the same kernels in Pallas's interpreter (any backend), which is how the tests
check them against XLA's attention on CPUs. Made for bfloat16 (or float16) models: on a GPU, float32
inputs get Triton's TF32 GEMMs.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bigvis.models.pallas_kernels import TILES, P, _compiler_params, _flat_mesh_axes
from bigvis.sharding import per_device

_LOG2E = float(np.log2(np.e))
_MASKED = -1e30  # a logit no key can have; finite, so that exp2 of masked minus masked is no NaN
_STATIC_CAUSAL_BLOCKS = 4


def _sources(refs, fused, dim):
  """((ref, columns per head, column offset) of q, k and v, or of their gradients; the other refs):
  three [batch * length, heads * dim] arrays, or (`fused`) one [batch * length, heads * 3 * dim] array,
  a fused q/k/v GEMM's output (or the gradient it takes), read or written in place at three offsets."""
  if fused:
    return tuple((refs[0], 3 * dim, i * dim) for i in range(3)), refs[1:]
  return tuple((ref, dim, 0) for ref in refs[:3]), refs[3:]


def _at(src, batch, positions, head, length, dim):
  ref, per_head, offset = src if isinstance(src, tuple) else (src, dim, 0)
  cols = head * per_head + offset + jnp.arange(dim)
  return ref.at[(batch * length + positions)[:, None], cols[None, :]]


def _load_block(src, batch, positions, head, length, dim, dtype=None):
  """[len(positions), dim]: one head's rows of one example (of a ref, or a `_sources` source); positions
  past the sequence read as zeros."""
  block = plgpu.load(_at(src, batch, positions, head, length, dim), mask=(positions < length)[:, None], other=0.)
  return block if dtype is None else block.astype(dtype)


def _store_block(src, block, batch, positions, head, length, dim):
  ref = _at(src, batch, positions, head, length, dim)
  plgpu.store(ref, block.astype(ref.dtype), mask=(positions < length)[:, None])


def _queries(q_ref, bias_ref, batch, rows, head, length, dim):
  """A query block with its bias (in the queries' dtype, as `layers.flat_dense` adds it), the sum
  rounded to that dtype as a biased GEMM output would be."""
  q = _load_block(q_ref, batch, rows, head, length, dim)
  if bias_ref is None:
    return q
  bias = plgpu.load(bias_ref.at[head * dim + jnp.arange(dim)]).astype(q.dtype).astype(jnp.float32)
  return (q.astype(jnp.float32) + bias[None, :]).astype(q.dtype)


def _logits(q, k, rows, keys, kv_len, *, scale, causal):
  """q k^T in log2 units, float32, with the keys a query may not see at _MASKED."""
  s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * (scale * _LOG2E)
  visible = (keys < kv_len)[None, :]
  if causal:
    visible = visible & (keys[None, :] <= rows[:, None])
  return jnp.where(visible, s, _MASKED)


def supports_head_dim(head_dim: int) -> bool:
  """Triton's blocks are powers of two, and its GEMMs' sides at least 16: ViT-B and -L's 64 are, ViT-H's
  80 is not (XLA's or cuDNN's attention then)."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def blocks_of(length: int, size: int) -> list[tuple[int, int]]:
  """(start, size) of the blocks that cover `length` tokens: whole blocks of `size`, then the rest in the
  smallest power of two (at least 16, Triton's least GEMM side) that holds it. ViT-B/16's 197 tokens
  in blocks of 64 are 64 + 64 + 64 + 16 = 208, where whole blocks (and cuDNN's, on 200 tokens) cover
  256: (208 / 256)^2 = 0.66 of the logits' work."""
  whole, rest = divmod(length, size)
  blocks = [(i * size, size) for i in range(whole)]
  return blocks + ([(whole * size, min(size, max(16, 1 << (rest - 1).bit_length())))] if rest else [])


def _each_block(program, blocks, body, *, static=False):
  """body(start, size) for this program's block: the blocks but the last share one size and a start
  computed from `program`; the last, where it is smaller, gets code of its own. With `static`, every
  block gets code of its own and a start known when tracing, so that a causal kernel can leave out
  the blocks a block of queries cannot see."""
  (last_start, last_size), size = blocks[-1], blocks[0][1]
  if static:
    for i, (start, n) in enumerate(blocks):
      pl.when(program == i)(functools.partial(body, start, n))
    return
  if last_size == size:
    body(program * size, size)
    return

  @pl.when(program < len(blocks) - 1)
  def _():
    body(program * size, size)

  @pl.when(program == len(blocks) - 1)
  def _():
    body(last_start, last_size)


def _static_causal(causal: bool, blocks: list) -> bool:
  """Whether a causal kernel gets code per block and skips the blocks above the diagonal: a text
  tower's 77 tokens are two blocks, of which queries 0-63 need only the first. Beyond a few blocks the
  code per block would grow with their square, and the kernels compute masked blocks instead."""
  return causal and len(blocks) <= _STATIC_CAUSAL_BLOCKS


def _sees(first_row, n_rows, first_key) -> bool:
  """Whether any of rows [first_row, first_row + n_rows) may see key `first_key` or later ones, causally."""
  if not (isinstance(first_row, int) and isinstance(first_key, int)):  # a start known only when running
    return True
  return first_key <= first_row + n_rows - 1


def _forward_kernel(*refs, length, heads, dim, causal, scale, biased, fused):
  """refs: q, k, v (or one fused array), the query bias if `biased`, kv_len; then O and the log-sum-exp."""
  (q_ref, k_ref, v_ref), refs = _sources(refs, fused, dim)
  bias_ref, (kv_len_ref, o_ref, lse_ref) = (refs[0], refs[1:]) if biased else (None, refs)
  block, head, batch = (pl.program_id(i) for i in range(3))  # see `_grid`
  tile = TILES["attention_forward"]
  kv_len = plgpu.load(kv_len_ref.at[batch])

  def rows_block(first, size):
    rows = first + jnp.arange(size)
    q = _queries(q_ref, bias_ref, batch, rows, head, length, dim)
    m = jnp.full((size,), _MASKED, jnp.float32)  # running row maximum (log2 units)
    l = jnp.zeros((size,), jnp.float32)  # running sum of exp2(logit - m)
    acc = jnp.zeros((size, dim), jnp.float32)
    for start, n_keys in blocks_of(length, tile["keys"]):  # static: a ViT's few key blocks, unrolled
      if causal and not _sees(first, size, start):
        break  # this and later key blocks are all after the block's last query
      keys = start + jnp.arange(n_keys)
      k = _load_block(k_ref, batch, keys, head, length, dim)
      v = _load_block(v_ref, batch, keys, head, length, dim)
      s = _logits(q, k, rows, keys, kv_len, scale=scale, causal=causal)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp2(s - m_new[:, None])
      rescale = jnp.exp2(m - m_new)
      l = l * rescale + jnp.sum(p, axis=1)
      acc = acc * rescale[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
      m = m_new
    # A row that sees no key (an example of no tokens) outputs 0, and with a log-sum-exp of +inf its
    # probabilities are 0 backward too; else l would count the hidden keys it loaded.
    sees = m > 0.5 * _MASKED
    _store_block(o_ref, jnp.where(sees[:, None], acc / l[:, None], 0.), batch, rows, head, length, dim)
    plgpu.store(lse_ref.at[(batch * heads + head) * length + rows], jnp.where(sees, m + jnp.log2(l), jnp.inf),
                mask=rows < length)
  rows_blocks = blocks_of(length, tile["rows"])
  _each_block(block, rows_blocks, rows_block, static=_static_causal(causal, rows_blocks))


def _backward_kernel(*refs, length, heads, dim, causal, scale, biased, fused):
  """Program j: dK and dV of key block j (over every query block), then dQ of query block j (over
  every key block) and its column sum, the query bias's partial gradient. refs: as the forward's
  inputs, then O, the log-sum-exp and dO; dq, dk and dv (one fused array where the inputs are), and
  the bias's partial sums if `biased`."""
  (q_ref, k_ref, v_ref), refs = _sources(refs, fused, dim)
  bias_ref, refs = (refs[0], refs[1:]) if biased else (None, refs)
  kv_len_ref, o_ref, lse_ref, do_ref, *refs = refs
  (dq_ref, dk_ref, dv_ref), refs = _sources(refs, fused, dim)
  dbias_ref = refs[0] if biased else None
  block, head, batch = (pl.program_id(i) for i in range(3))  # see `_grid`
  blocks = blocks_of(length, TILES["attention_backward"]["rows"])
  kv_len = plgpu.load(kv_len_ref.at[batch])

  def rows_of(rows):
    """A query block's q, dO, log-sum-exp and rowsum(dO * O)."""
    q = _queries(q_ref, bias_ref, batch, rows, head, length, dim)
    do = _load_block(do_ref, batch, rows, head, length, dim)
    o = _load_block(o_ref, batch, rows, head, length, dim, jnp.float32)
    lse = plgpu.load(lse_ref.at[(batch * heads + head) * length + rows], mask=rows < length, other=0.)
    return q, do, lse, jnp.sum(do.astype(jnp.float32) * o, axis=1)

  def probabilities_and_dlogits(q, do, lse, delta, k, v, rows, keys):
    """P and dL/d(logits) = P (dP - rowsum(dO * O)) of one query block against one key block."""
    s = _logits(q, k, rows, keys, kv_len, scale=scale, causal=causal)
    p = jnp.where((rows < length)[:, None], jnp.exp2(s - lse[:, None]), 0.)
    dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
    return p, p * (dp - delta[:, None])

  def own_blocks(first, size):
    mine = first + jnp.arange(size)
    k = _load_block(k_ref, batch, mine, head, length, dim)
    v = _load_block(v_ref, batch, mine, head, length, dim)
    dk = jnp.zeros((size, dim), jnp.float32)
    dv = jnp.zeros((size, dim), jnp.float32)
    for start, n_rows in blocks:
      if causal and not _sees(start, n_rows, first):
        continue  # every query of this block comes before the keys
      rows = start + jnp.arange(n_rows)
      q, do, lse, delta = rows_of(rows)
      p, ds = probabilities_and_dlogits(q, do, lse, delta, k, v, rows, mine)
      dv += plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
      dk += plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    _store_block(dk_ref, dk * scale, batch, mine, head, length, dim)
    _store_block(dv_ref, dv, batch, mine, head, length, dim)

    q, do, lse, delta = rows_of(mine)
    dq = jnp.zeros((size, dim), jnp.float32)
    for start, n_keys in blocks:
      if causal and not _sees(first, size, start):
        break
      keys = start + jnp.arange(n_keys)
      k = _load_block(k_ref, batch, keys, head, length, dim)
      v = _load_block(v_ref, batch, keys, head, length, dim)
      _, ds = probabilities_and_dlogits(q, do, lse, delta, k, v, mine, keys)
      dq += plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)
    dq = dq * scale
    _store_block(dq_ref, dq, batch, mine, head, length, dim)
    if biased:  # rows past the end have dq 0: their dS is
      cols = head * dim + jnp.arange(dim)
      plgpu.store(dbias_ref.at[batch * len(blocks) + block, cols], jnp.sum(dq, axis=0))
  _each_block(block, blocks, own_blocks, static=_static_causal(causal, blocks))


def _grid(batch: int, heads: int, blocks: int) -> tuple[int, int, int]:
  """Blocks first: the GPU starts programs in the order of the grid's first axis, so one example's
  and head's blocks run together and their shared keys and values (and backward, queries and
  gradients) are read from memory once, then from the L2 cache. Batch first, each block's programs
  would sweep a whole layer's keys and values (158 MB at ViT-B/16, batch 256), more than the L2
  holds, before the next block's read them again."""
  return blocks, heads, batch


def _flat(x):
  """[batch, length, heads, ...] -> [batch * length, heads * ...], a free reshape."""
  return x.reshape(x.shape[0] * x.shape[1], -1)


def _shape(qkv) -> tuple[int, int, int, int, bool]:
  """(batch, length, heads, head_dim, fused) of (q, k, v) [batch, length, heads, head_dim] each, or of
  one fused array [batch, length, heads, 3, head_dim]."""
  fused = not isinstance(qkv, (tuple, list))
  batch, length, heads, *_, dim = qkv.shape if fused else qkv[0].shape
  return batch, length, heads, dim, fused


def _inputs(qkv, bias, heads: int, dim: int) -> list:
  """The kernels' leading inputs: q, k and v (or the fused array) as 2-D arrays, then the bias if any."""
  flat = [_flat(qkv)] if not isinstance(qkv, (tuple, list)) else [_flat(x) for x in qkv]
  return flat + ([bias.reshape(heads * dim)] if bias is not None else [])


def _forward(qkv, kv_len, bias, *, causal, interpret):
  """(O [batch, length, heads, head_dim] like q, log2-sum-exp [batch, heads, length] float32): one
  device's examples and heads."""
  batch, length, heads, dim, fused = _shape(qkv)
  dtype = (qkv if fused else qkv[0]).dtype
  biased = bias is not None
  kernel = functools.partial(_forward_kernel, length=length, heads=heads, dim=dim, causal=causal,
                             scale=1. / float(np.sqrt(dim)), biased=biased, fused=fused)
  o, lse = pl.pallas_call(
      kernel, grid=_grid(batch, heads, len(blocks_of(length, TILES["attention_forward"]["rows"]))),
      name="bigvis_pallas_attention_forward",
      out_shape=[jax.ShapeDtypeStruct((batch * length, heads * dim), dtype),
                 jax.ShapeDtypeStruct((batch * heads * length,), jnp.float32)],
      compiler_params=_compiler_params(interpret, "attention_forward"), interpret=interpret)(
          *_inputs(qkv, bias, heads, dim), kv_len)
  return o.reshape(batch, length, heads, dim), lse.reshape(batch, heads, length)


def _backward(qkv, kv_len, bias, o, lse, do, *, causal, interpret):
  """The gradient of qkv, in its structure, and with a bias (as a pair) its partial sums [batch *
  blocks, heads * dim]: one device's share."""
  batch, length, heads, dim, fused = _shape(qkv)
  biased = bias is not None
  blocks = len(blocks_of(length, TILES["attention_backward"]["rows"]))
  kernel = functools.partial(_backward_kernel, length=length, heads=heads, dim=dim, causal=causal,
                             scale=1. / float(np.sqrt(dim)), biased=biased, fused=fused)
  inputs = _inputs(qkv, bias, heads, dim)
  n_grads = len(inputs) - biased  # the gradients are like the 2-D q, k and v (or the fused array)
  like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs[:n_grads]]
  sums = [jax.ShapeDtypeStruct((batch * blocks, heads * dim), jnp.float32)] if biased else []
  outs = pl.pallas_call(
      kernel, grid=_grid(batch, heads, blocks), name="bigvis_pallas_attention_backward",
      out_shape=like + sums,
      compiler_params=_compiler_params(interpret, "attention_backward"), interpret=interpret)(
          *inputs, kv_len, _flat(o), lse.reshape(-1), _flat(do))
  grads, dbias = outs[:n_grads], outs[n_grads:]
  grads = grads[0].reshape(qkv.shape) if fused else tuple(g.reshape(x.shape) for g, x in zip(grads, qkv))
  return (grads, dbias[0]) if biased else grads


def _specs(axes, qkv, biased):
  """shard_map specs (None without a mesh) of qkv (q, k and v, each with PartitionSpec `axes`, or the
  fused array), O [batch, length, heads, dim], kv_len [batch], the bias [heads, dim], the log-sum-exp
  [batch, heads, length] and the bias's partial sums [batch * blocks, heads * dim]."""
  if axes is None:
    return None
  batch_axes, length_axes, heads_axes, _ = axes
  tokens = P(*axes)
  return dict(qkv=P(batch_axes, length_axes, heads_axes, None, None) if _shape(qkv)[-1] else (tokens,) * 3,
              tokens=tokens, kv_len=P(batch_axes), bias=P(heads_axes, None) if biased else None,
              lse=P(batch_axes, heads_axes, length_axes),
              sums=P(_flat_mesh_axes((batch_axes,)) or None, heads_axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(qkv, kv_len, bias, causal, interpret, axes):
  return _attention_fwd(qkv, kv_len, bias, causal, interpret, axes)[0]


def _attention_fwd(qkv, kv_len, bias, causal, interpret, axes):
  spec = _specs(axes, qkv, bias is not None)
  forward = functools.partial(_forward, causal=causal, interpret=interpret)
  in_specs = None if spec is None else (spec["qkv"], spec["kv_len"], spec["bias"])
  o, lse = per_device(forward, (qkv, kv_len, bias), in_specs, None if spec is None else (spec["tokens"], spec["lse"]))
  return o, (qkv, kv_len, bias, o, lse)


def _attention_bwd(causal, interpret, axes, saved, do):
  qkv, kv_len, bias, o, lse = saved
  spec = _specs(axes, qkv, bias is not None)
  backward = functools.partial(_backward, causal=causal, interpret=interpret)
  in_specs = out_specs = None
  if spec is not None:
    t = spec["tokens"]
    in_specs = (spec["qkv"], spec["kv_len"], spec["bias"], t, spec["lse"], t)
    out_specs = (spec["qkv"], spec["sums"]) if bias is not None else spec["qkv"]
  grads = per_device(backward, (qkv, kv_len, bias, o, lse, do), in_specs, out_specs)
  if bias is None:
    return grads, None, None
  dqkv, dbias = grads
  return dqkv, None, jnp.sum(dbias, axis=0).reshape(bias.shape).astype(bias.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array | None = None, v: jax.Array | None = None, *,
              kv_len: jax.Array | None = None, query_bias: jax.Array | None = None, causal: bool = False,
              interpret: bool = False, axes: tuple[Any, ...] | None = None) -> jax.Array:
  """softmax((q + query_bias) k^T / sqrt(head_dim)) v over [batch, length, heads, head_dim], with keys
  at or past `kv_len` [batch] (int) hidden, and later keys too where `causal`. With k and v None, q is
  a fused q/k/v GEMM's output [batch, length, heads, 3, head_dim], which the kernels read (and whose
  gradient they write) in place, without slicing it. `query_bias` [heads, head_dim] is added inside
  the kernels, its gradient summed there. Under a mesh, `axes` is the PartitionSpec of q's [batch,
  length, heads, head_dim]; each device runs the kernels on its own examples and heads (the length and
  head_dim axes must be whole on each device)."""
  fused = k is None and v is None
  if fused:
    if q.ndim != 5 or q.shape[3] != 3:
      raise ValueError(f"a fused q/k/v array is [batch, length, heads, 3, head_dim], got {list(q.shape)}")
  elif not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k and v must have one shape and dtype, got {q.shape}, {k.shape}, {v.shape}")
  shape = (q.shape[2], q.shape[-1])
  if not supports_head_dim(shape[1]):
    raise ValueError(f"Pallas attention needs a head size that is a power of two >= 16, got {shape[1]}")
  if query_bias is not None and query_bias.shape != shape:
    raise ValueError(f"query_bias must be [heads, head_dim] = {list(shape)}, got {list(query_bias.shape)}")
  if axes is not None and (axes[1] is not None or axes[3] is not None):
    raise ValueError(f"Pallas attention needs whole sequences and head dims on each device; q is split as {axes}")
  # Keys past the end are not there to see: a longer kv_len would attend to the blocks' zero fill.
  kv_len = jnp.full((q.shape[0],), q.shape[1], jnp.int32) if kv_len is None else jnp.minimum(kv_len, q.shape[1])
  return _attention(q if fused else (q, k, v), kv_len.astype(jnp.int32), query_bias, bool(causal), bool(interpret),
                    None if axes is None else tuple(axes))
