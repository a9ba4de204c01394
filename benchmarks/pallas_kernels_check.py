"""bigvis's Pallas kernels against XLA's fusions at a real model's shapes: agreement and time.

The first thing a GPU session should run for `model.norm_impl=pallas` / `model.gelu_impl=pallas`:
whether the Triton kernels compute what XLA does on the card, and how long each takes next to the
XLA fusions it replaces, before whole-step timings mix them with everything else.

  python benchmarks/pallas_kernels_check.py                        # ViT-B/16 at batch 256, bf16
  python benchmarks/pallas_kernels_check.py --rows 19712 --width 512 --mlp 2048   # CLIP text tower

Prints one JSON line per kernel: forward + backward time of each implementation (ms, the median of
`--steps` runs), and the largest error of the Pallas outputs and gradients relative to each
array's largest XLA value. `--interpret` runs the kernels in Pallas's interpreter (any backend).
"""
from __future__ import annotations

import argparse
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
from bigvis.models import pallas_kernels  # noqa: E402


def _time_ms(fn: Callable, args: tuple, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _max_rel_err(reference: Any, candidate: Any) -> float:
  errs = [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
          / max(float(np.max(np.abs(np.asarray(a, np.float32)))), 1e-30)
          for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate))]
  return max(errs)


def compare(name: str, xla_fn: Callable, pallas_fn: Callable, args: tuple, steps: int) -> dict:
  """Value and gradients of two scalar functions of `args`, jitted; their times and disagreement."""
  xla_grad = jax.jit(jax.value_and_grad(xla_fn, argnums=tuple(range(len(args)))))
  pallas_grad = jax.jit(jax.value_and_grad(pallas_fn, argnums=tuple(range(len(args)))))
  reference, candidate = xla_grad(*args), pallas_grad(*args)
  return {"kernel": name, "shape": list(args[0].shape), "dtype": str(args[0].dtype),
          "xla_ms": round(_time_ms(xla_grad, args, steps), 4),
          "pallas_ms": round(_time_ms(pallas_grad, args, steps), 4),
          "max_rel_err": _max_rel_err(reference, candidate)}


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


def bias_gelu_case(rows: int, mlp: int, dtype: Any, interpret: bool) -> tuple[Callable, Callable, tuple]:
  """(XLA's, the kernel's loss, their arguments) for GELU(h + bias) after the first MLP GEMM:
  loss = <GELU(h + bias), c>."""
  keys = jax.random.split(jax.random.key(1), 3)
  h = (jax.random.normal(keys[0], (rows, mlp)) * 2).astype(dtype)
  bias = (0.1 * jax.random.normal(keys[1], (mlp,))).astype(dtype)
  c = jax.random.normal(keys[2], (rows, mlp)).astype(dtype)

  def xla(h, bias):
    return jnp.sum(nn.gelu(h + bias).astype(jnp.float32) * c)

  def pallas(h, bias):
    return jnp.sum(pallas_kernels.bias_gelu(h, bias, interpret=interpret).astype(jnp.float32) * c)
  return xla, pallas, (h, bias)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=256 * 200, help="tokens in the batch (ViT-B/16, batch 256: 51,200)")
  p.add_argument("--width", type=int, default=768, help="model width (LayerNorm)")
  p.add_argument("--mlp", type=int, default=3072, help="MLP hidden width (GELU)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--interpret", action="store_true", help="run the kernels in Pallas's interpreter")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  cases = (
      ("layernorm", layernorm_case(args.rows, args.width, dtype, args.interpret)),
      ("layernorm_biases", layernorm_case(args.rows, args.width, dtype, args.interpret, biases=True)),
      ("layernorm_biases_added_by_xla",
       layernorm_case(args.rows, args.width, dtype, args.interpret, biases=True, addend=False)),
      ("layernorm_three_copies", layernorm_case(args.rows, args.width, dtype, args.interpret, copies=3)),
      ("bias_gelu", bias_gelu_case(args.rows, args.mlp, dtype, args.interpret)))
  for name, case in cases:
    print(json.dumps({**compare(name, *case, steps=args.steps), "device": jax.devices()[0].device_kind}),
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
