"""bigvis's Pallas kernels against XLA's fusions at a real model's shapes: agreement and time.

The first thing a GPU session should run for `model.norm_impl=pallas` / `model.gelu_impl=pallas` /
`model.attention_impl=pallas`: whether the Triton kernels compute what XLA (or cuDNN, for attention:
what 'auto' runs, on the ViT's padded tokens) does on the card, and how long each takes next to what
it replaces, before whole-step timings mix them with everything else.

  python benchmarks/pallas_kernels_check.py                        # ViT-B/16 at batch 256, bf16
  python benchmarks/pallas_kernels_check.py --rows 19712 --width 512 --mlp 2048   # CLIP text tower

Prints one JSON line per kernel: forward + backward time of each implementation (ms a call: the median
of `--steps` timings of `--calls` calls dispatched back to back), and the largest error of the Pallas
outputs and gradients relative to each array's largest XLA value (`rel_errs`: per output, the loss
first, then each argument's gradient; for GELU in bfloat16 also each one's errors against the same
loss in float32). `--interpret` runs the kernels in Pallas's interpreter (any backend).

  python benchmarks/pallas_kernels_check.py --sweep     # each kernel alone, under other tilings

`--sweep` times each of the six kernels alone (ViT-B/16's shapes: the attention norm's backward
with three copies, the MLP norm's forward with the residual add, attention over 197 tokens) under
alternatives to
`pallas_kernels.TILES` (rows per program, warps, pipeline stages): one JSON line per setting with
its ms, GB/s and largest difference from the current setting's output, then the fastest per kernel
(with `--tiles-out FILE.json`, also as a file `peers.py --kernel-tiles` times a whole step with).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from bigvis.models import pallas_attention, pallas_kernels  # noqa: E402
from bigvis.models.layers import dot_product_attention, pad_for_attention, resolve_attention_impl  # noqa: E402


def _time_ms(fn: Callable, args: tuple, steps: int, calls: int) -> float:
  """The median over `steps` of the time per call of `calls` calls dispatched back to back, one wait at
  the end: the device's time. One call waited on at a time adds the host's dispatch and wait, ≈0.1 ms
  on a GPU, as much as a kernel takes at these shapes (the twelfth session's sweep timed that noise)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) * 1e3 / calls)
  return statistics.median(times)


def _rel_errs(reference: Any, candidate: Any) -> list[float]:
  """Per output (the loss, then each argument's gradient): the largest difference relative to that
  array's largest reference value."""
  return [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
          / max(float(np.max(np.abs(np.asarray(a, np.float32)))), 1e-30)
          for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate))]


def compare(name: str, xla_fn: Callable, pallas_fn: Callable, args: tuple, steps: int, calls: int,
            f32_fn: Callable | None = None) -> dict:
  """Value and gradients of two scalar functions of `args`, jitted; their times and disagreement.
  With `f32_fn` (the same loss computed in float32) and low-precision `args`, also each one's error
  against it: which of the two is the coarse one where they disagree."""
  argnums = tuple(range(len(args)))
  xla_grad = jax.jit(jax.value_and_grad(xla_fn, argnums=argnums))
  pallas_grad = jax.jit(jax.value_and_grad(pallas_fn, argnums=argnums))
  reference, candidate = xla_grad(*args), pallas_grad(*args)
  errs = _rel_errs(reference, candidate)
  short = lambda values: [float(f"{e:.3g}") for e in values]  # noqa: E731  three significant digits
  record = {"kernel": name, "shape": list(args[0].shape), "dtype": str(args[0].dtype),
            "xla_ms": round(_time_ms(xla_grad, args, steps, calls), 4),
            "pallas_ms": round(_time_ms(pallas_grad, args, steps, calls), 4),
            "max_rel_err": max(errs), "rel_errs": short(errs)}
  if f32_fn is not None and args[0].dtype != jnp.float32:
    exact = jax.jit(jax.value_and_grad(f32_fn, argnums=argnums))(*(a.astype(jnp.float32) for a in args))
    record["xla_rel_errs_vs_f32"] = short(_rel_errs(exact, reference))
    record["pallas_rel_errs_vs_f32"] = short(_rel_errs(exact, candidate))
  return record


def layernorm_case(rows: int, width: int, dtype: Any, interpret: bool, copies: int = 1, biases: bool = False,
                   addend: bool = True) -> tuple[Callable, Callable, tuple]:
  """(XLA's, the kernels' loss, their arguments) for the block's LayerNorm with the residual path:
  loss = <y, c> + <x, d>, so dy = c and the residual gradient = d, as a block's backward brings them.
  As the block calls them: with `biases` (the MLP's norm), the stream x is first summed with the
  attention's output a and its bias b (in the forward kernel; without `addend`, by XLA, the form of
  `model.residual_in_norm=false`), a bias r is added to the residual stream after, and the kernel
  sums both biases' gradients; with three `copies` (the attention's norm when query, key and value
  are separate GEMMs), the other copies of y get their own gradients, c2 and c3, which the kernel
  adds to c."""
  keys = jax.random.split(jax.random.key(0), 8)
  x = (jax.random.normal(keys[0], (rows, width)) * 2 + 0.3).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(keys[1], (width,))
  bias = 0.1 * jax.random.normal(keys[2], (width,))
  b, r = (0.1 * jax.random.normal(k, (width,)) for k in keys[5:7])
  c, c2, d = (jax.random.normal(k, (rows, width)).astype(dtype) for k in (keys[3], keys[7], keys[4]))
  c3 = jax.random.normal(jax.random.key(2), (rows, width)).astype(dtype)
  a = jax.random.normal(jax.random.key(1), (rows, width)).astype(dtype)

  def loss(x, ys):
    dot = lambda a, b: jnp.sum(a.astype(jnp.float32) * b)  # noqa: E731
    return sum(dot(y, c_) for y, c_ in zip(ys, (c, c2, c3))) + dot(x, d)

  def xla(x, scale, bias, b, r, a):
    x = x + (a + b.astype(dtype)) if biases else x
    y = nn.LayerNorm(epsilon=1e-6, dtype=dtype).apply({"params": {"scale": scale, "bias": bias}}, x)
    return loss(x + r.astype(dtype) if biases else x, (y,) * copies)

  def pallas(x, scale, bias, b, r, a):
    stop = lambda v: jax.lax.stop_gradient(v).astype(dtype)  # noqa: E731
    in_kernel = biases and addend
    x = x + (a + stop(b)) if biases and not addend else x  # the bias's gradient still the kernel's
    x, *ys = pallas_kernels.residual_layernorm(
        x, scale, bias, epsilon=1e-6, dtype=dtype, interpret=interpret, copies=copies,
        addend=a if in_kernel else None, input_bias=b if biases else None, residual_bias=r if biases else None)
    return loss(x + stop(r) if biases else x, ys)
  return xla, pallas, (x, scale, bias, b, r, a)


def bias_gelu_case(rows: int, mlp: int, dtype: Any, interpret: bool) -> tuple[Callable, Callable, tuple, Callable]:
  """(XLA's, the kernel's loss, their arguments, XLA's loss in float32) for GELU(h + bias) after the
  first MLP GEMM: loss = <GELU(h + bias), c>."""
  keys = jax.random.split(jax.random.key(1), 3)
  h = (jax.random.normal(keys[0], (rows, mlp)) * 2).astype(dtype)
  bias = (0.1 * jax.random.normal(keys[1], (mlp,))).astype(dtype)
  c = jax.random.normal(keys[2], (rows, mlp)).astype(dtype)

  def xla(h, bias):
    return jnp.sum(nn.gelu(h + bias).astype(jnp.float32) * c)

  def pallas(h, bias):
    return jnp.sum(pallas_kernels.bias_gelu(h, bias, interpret=interpret).astype(jnp.float32) * c)

  def f32(h, bias):
    return jnp.sum(nn.gelu(h + bias) * c.astype(jnp.float32))
  return xla, pallas, (h, bias), f32


def attention_case(batch: int, length: int, heads: int, head_dim: int, dtype: Any,
                   interpret: bool) -> tuple[Callable, Callable, tuple, Callable]:
  """(the model's attention, the Pallas kernels', their arguments, XLA's in float32) for a ViT's
  attention with its query bias: loss = <attention(q + bias, k, v), c>. The model's is what
  `attention_impl='auto'` runs: on an NVIDIA GPU cuDNN's, on the tokens padded as the ViT pads them
  (197 -> 200) with the padding masked; elsewhere XLA's. The Pallas kernels take the 197 as they are."""
  keys = jax.random.split(jax.random.key(4), 5)
  q, k, v, c = (jax.random.normal(key, (batch, length, heads, head_dim)).astype(dtype) for key in keys[:4])
  bias = 0.5 * jax.random.normal(keys[4], (heads, head_dim))

  def model(q, k, v, bias, impl="auto"):
    impl = resolve_attention_impl(impl, dtype, head_dim)  # as the ViT does: the padding is cuDNN's
    tokens = lambda x: x.reshape(batch, length, heads * head_dim)  # noqa: E731  the padding is per token
    (qp, mask), (kp, _), (vp, _) = (pad_for_attention(tokens(x), impl) for x in (q, k, v))
    split = lambda x: x.reshape(batch, x.shape[1], heads, head_dim)  # noqa: E731
    out = dot_product_attention(split(qp), split(kp), split(vp), mask=mask, causal=False, impl=impl,
                                query_bias=bias)
    return jnp.sum(out[:, :length].astype(jnp.float32) * c.astype(jnp.float32))

  def pallas(q, k, v, bias):
    out = pallas_attention.attention(q, k, v, query_bias=bias, interpret=interpret)
    return jnp.sum(out.astype(jnp.float32) * c.astype(jnp.float32))
  return model, pallas, (q, k, v, bias), functools.partial(model, impl="xla")


# The comparisons, by name: (args, dtype) -> a case.
CASES = {
    "layernorm": lambda a, dt: layernorm_case(a.rows, a.width, dt, a.interpret),
    "layernorm_biases": lambda a, dt: layernorm_case(a.rows, a.width, dt, a.interpret, biases=True),
    "layernorm_biases_added_by_xla":
        lambda a, dt: layernorm_case(a.rows, a.width, dt, a.interpret, biases=True, addend=False),
    "layernorm_three_copies": lambda a, dt: layernorm_case(a.rows, a.width, dt, a.interpret, copies=3),
    "bias_gelu": lambda a, dt: bias_gelu_case(a.rows, a.mlp, dt, a.interpret),
    "attention": lambda a, dt: attention_case(a.rows // _padded(a.length), a.length, a.heads, _head_dim(a), dt,
                                              a.interpret),
}


def _head_dim(args: argparse.Namespace) -> int:
  return args.head_dim or args.width // args.heads


def _padded(length: int) -> int:
  """Tokens after the ViT's padding for cuDNN (197 -> 200): --rows counts those."""
  return -(-length // 8) * 8


# Alternatives to pallas_kernels.TILES that --sweep times, per kernel (the current setting first); the
# newest kernels first, so that a sweep cut short has timed them. Attention's loops over blocks are
# unrolled, which leaves Triton's software pipelining (stages) nothing to do.
_SWEEP = {
    "attention_forward": [dict(rows=r, keys=k, warps=w, stages=1)
                          for r, k, w in ((64, 64, 4), (128, 64, 8), (64, 128, 4), (32, 64, 4), (64, 32, 4),
                                          (128, 128, 8), (64, 64, 8))],
    "attention_backward": [dict(rows=r, warps=w, stages=1) for r, w in ((64, 4), (32, 4), (64, 8), (128, 8))],
    "layernorm_forward": [dict(rows=r, warps=w, stages=1) for r in (4, 1, 2, 8) for w in (4, 1, 2, 8)],
    "layernorm_backward": [dict(rows=r, step_rows=s, warps=w, stages=st)
                           for r, s in ((64, 4), (64, 2), (64, 8), (128, 4)) for w in (4, 8) for st in (1, 2)],
    "bias_gelu_forward": [dict(rows=r, cols=c, warps=w, stages=1)
                          for r, c in ((32, 256), (16, 256), (64, 256), (8, 1024)) for w in (4, 8)],
    "bias_gelu_backward": [dict(rows=r, step_rows=s, cols=256, warps=w, stages=st)
                           for r, s in ((64, 8), (128, 8), (64, 16), (32, 8)) for w in (4, 8) for st in (1, 2)],
}
# Each kernel's current tiling (pallas_kernels.TILES) first: the reference of every other's results.
SWEEP = {kernel: [pallas_kernels.TILES[kernel]] + [t for t in tilings if t != pallas_kernels.TILES[kernel]]
         for kernel, tilings in _SWEEP.items()}
# Outputs of a kernel from this index on are partial sums with a row per program, which the tiling
# sets: the sweep compares their totals.
PARTIAL_SUMS_FROM = {"layernorm_backward": 1, "bias_gelu_backward": 1, "attention_backward": 3}


def sweep_calls(rows: int, width: int, mlp: int, dtype: Any, interpret: bool, length: int = 197,
                heads: int = 12, head_dim: int = 64) -> dict[str, tuple[Callable, tuple]]:
  """kernel name -> (a function calling that kernel alone, its arguments), at the block's shapes (the
  attention's: `length` tokens of rows // the padded length examples, unpadded)."""
  keys = jax.random.split(jax.random.key(3), 8)
  act = lambda k, cols: jax.random.normal(k, (rows, cols)).astype(dtype)  # noqa: E731
  vec = lambda k, n: 0.1 * jax.random.normal(k, (n,))  # noqa: E731
  x, a, dy1, dy2, dy3, dres = (act(k, width) for k in keys[:6])
  h, dg = act(keys[6], mlp), act(keys[7], mlp)
  scale, bias = 1 + vec(keys[0], width), vec(keys[1], width)
  mean, rstd = jnp.mean(x.astype(jnp.float32), -1), jnp.ones((rows,), jnp.float32)
  k, a_ = pallas_kernels, pallas_attention
  batch = rows // _padded(length)
  qkv = [jax.random.normal(key, (batch, length, heads, head_dim)).astype(dtype)
         for key in jax.random.split(keys[5], 4)]
  kv_len, qbias = jnp.full((batch,), length, jnp.int32), vec(keys[3], heads * head_dim).reshape(heads, -1)
  o, lse = a_._forward(tuple(qkv[:3]), kv_len, qbias, causal=False, interpret=interpret)
  return {
      "layernorm_forward": (lambda x, a, b, s, c: k._layernorm_forward(
          x, s, c, a, b, eps=1e-6, out_dtype=dtype, interpret=interpret), (x, a, bias, scale, bias)),
      "layernorm_backward": (lambda x, d1, d2, d3, r, m, s, sc: k._layernorm_backward(
          x, (d1, d2, d3), r, m, s, sc, sum_dx=False, sum_dres=False, interpret=interpret),
          (x, dy1, dy2, dy3, dres, mean, rstd, scale)),
      "bias_gelu_forward": (lambda h, b: k._bias_gelu_forward(h, b, interpret=interpret),
                            (h, vec(keys[2], mlp).astype(dtype))),
      "bias_gelu_backward": (lambda h, b, g: k._bias_gelu_backward(h, b, g, interpret=interpret),
                             (h, vec(keys[2], mlp).astype(dtype), dg)),
      "attention_forward": (lambda q, k_, v, n, b: a_._forward((q, k_, v), n, b, causal=False, interpret=interpret),
                            (*qkv[:3], kv_len, qbias)),
      "attention_backward": (lambda q, k_, v, n, b, o, lse, do: a_._backward(
          (q, k_, v), n, b, o, lse, do, causal=False, interpret=interpret), (*qkv[:3], kv_len, qbias, o, lse, qkv[3])),
  }


# A tiling whose outputs differ from the current one's by more than this (relative to each output's
# largest value: a few bfloat16 roundings, or the summation order of a partial sum) computes something
# else and is never the fastest.
AGREEMENT = 1e-2


def sweep(args: argparse.Namespace, kernel_done: Callable[[str, list[dict]], None] = lambda name, records: None
          ) -> list[dict]:
  """One record per (kernel, tiling): ms, GB/s (operands + outputs) and the largest difference from the
  current tiling's outputs, absolute and relative; TILES is restored after each. `kernel_done(name,
  its records)` after each kernel's tilings, so that a sweep cut short keeps what it found."""
  dtype, records = jnp.dtype(args.dtype), []
  calls = sweep_calls(args.rows, args.width, args.mlp, dtype, args.interpret, args.length, args.heads,
                      _head_dim(args))
  for name in SWEEP:
    call, call_args = calls[name]
    current = dict(pallas_kernels.TILES[name])
    reference = None
    for setting in SWEEP[name]:
      pallas_kernels.TILES[name] = setting
      try:
        fn = jax.jit(lambda *a: call(*a))  # a new function, so a new trace: the kernel reads TILES then
        out = jax.block_until_ready(fn(*call_args))
        ms = _time_ms(fn, call_args, args.steps, args.calls)
      except Exception as e:  # a tiling Triton cannot compile: say so, go on
        records.append({"kernel": name, **setting, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        continue
      finally:
        pallas_kernels.TILES[name] = current
      moved = sum(a.nbytes for a in jax.tree.leaves((call_args, out)))
      out = [o.astype(jnp.float32) if i < PARTIAL_SUMS_FROM.get(name, 1 << 30) else jnp.sum(o, 0)
             for i, o in enumerate(jax.tree.leaves(out))]
      reference = out if reference is None else reference
      records.append({"kernel": name, **setting, "ms": round(ms, 4), "gb_per_s": round(moved / ms / 1e6, 1),
                      "max_abs_diff": max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(reference, out)),
                      "max_rel_diff": max(_rel_errs(reference, out))})
      print(json.dumps(records[-1]), flush=True)
    kernel_done(name, [r for r in records if r["kernel"] == name])
  return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=256 * 200, help="tokens in the batch (ViT-B/16, batch 256: 51,200)")
  p.add_argument("--width", type=int, default=768, help="model width (LayerNorm)")
  p.add_argument("--mlp", type=int, default=3072, help="MLP hidden width (GELU)")
  p.add_argument("--length", type=int, default=197,
                 help="tokens per example (attention: rows // this padded to 8's multiple examples)")
  p.add_argument("--heads", type=int, default=12, help="attention heads")
  p.add_argument("--head-dim", type=int, default=0, help="attention head size (default: width // heads)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=20, help="timings; the median is printed")
  p.add_argument("--calls", type=int, default=20, help="calls dispatched back to back in each timing")
  p.add_argument("--interpret", action="store_true", help="run the kernels in Pallas's interpreter")
  p.add_argument("--sweep", action="store_true", help="time each kernel alone under other tilings")
  p.add_argument("--tiles-out", metavar="FILE.json",
                 help="with --sweep: write the fastest tiling per kernel, for peers.py --kernel-tiles")
  p.add_argument("--cases", default=",".join(CASES),
                 help=f"without --sweep: the comparisons to run, comma-separated, of {', '.join(CASES)}")
  args = p.parse_args(argv)
  args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [c for c in args.cases if c not in CASES]
  if unknown or (args.tiles_out and not args.sweep):
    p.error(f"unknown case(s): {', '.join(unknown)}" if unknown else "--tiles-out needs --sweep")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  if args.sweep:
    fastest = {}
    if args.tiles_out and os.path.exists(args.tiles_out):
      os.remove(args.tiles_out)  # never an earlier sweep's

    def kernel_done(name: str, records: list[dict]) -> None:
      """The fastest agreeing tiling so far, printed and (with --tiles-out) written at once."""
      timed = [r for r in records if "ms" in r and r["max_rel_diff"] <= AGREEMENT]
      if not timed:
        return
      current = [r["ms"] for r in timed if all(r[k] == v for k, v in pallas_kernels.TILES[name].items())]
      best = min(timed, key=lambda r: r["ms"])
      fastest[name] = {k: best[k] for k in pallas_kernels.TILES[name]}
      print(json.dumps({"fastest": name, **best, "current_ms": current[0] if current else None,
                        "device": jax.devices()[0].device_kind}), flush=True)
      if args.tiles_out:
        with open(args.tiles_out, "w") as f:
          json.dump(fastest, f)
    sweep(args, kernel_done)
    return 0
  for name in args.cases:
    xla, pallas, case_args, *f32 = CASES[name](args, dtype)
    record = compare(name, xla, pallas, case_args, steps=args.steps, calls=args.calls, f32_fn=(f32 or [None])[0])
    print(json.dumps({**record, "device": jax.devices()[0].device_kind}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
