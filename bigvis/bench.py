"""`bigvis bench`: times the real train step on a synthetic batch and prints one JSON line.

The mesh, model, sharded state and jitted step are built by the same functions
training uses (`bigvis.train`), so a figure measured here is the figure a run
of that config gets, minus input-pipeline stalls. Steps are dispatched
back to back and timed with one `block_until_ready` at the end, as in the loop.

FLOP counts. `model_flops_per_example` is 3x the forward FLOPs of the same model
built unrolled, unpadded, without remat and with XLA attention (HLO cost
analysis at batch 1): the usual "model FLOPs" behind MFU, independent of
implementation tricks. `xla_flops_per_example` is XLA's cost analysis of the
compiled step (per device on this JAX, so x devices / batch): it also counts
remat recomputation, padded tokens and the optimizer, but counts a scanned
layer loop once and omits custom calls such as cuDNN attention, so it is a
sanity check, not the basis of MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import TYPE_CHECKING, Any

from bigvis.errors import UserError

if TYPE_CHECKING:  # jax and the models load lazily, so `bigvis --help` stays fast
  import jax
  import ml_collections

def describe_model(model_cfg: ml_collections.ConfigDict, device: Any = None) -> str:
  """A one-line summary of what is timed, e.g. `vit B/16 224px bfloat16 attn=auto:cudnn pool=gap ...
  patch=matmul gelu=auto:pallas norm=auto:pallas+residual` (GELU: `pallas` for the kernels, which save
  only its input, `xla+recomputed` for XLA's recomputed one; `+residual` where the norms' kernels take
  the residual adds).

  `auto` attention, GELU and norms show what they resolve to on `device` (default: the process's
  first).
  """
  import jax
  from bigvis.models import resolve_for_device
  from bigvis.models.layers import norm_kernels_take_residual_adds
  if device is None:
    device = jax.devices()[0]
  resolved = resolve_for_device(model_cfg, device).to_dict()

  def tower(c: dict, r: dict) -> str:
    parts = [str(c.get("variant", "?"))]
    if "image_size" in c:
      parts.append(f"{c['image_size']}px")
    if "context_length" in c:
      parts.append(f"ctx{c['context_length']}")
    parts.append(str(c.get("dtype", "float32")))
    for key, short in (("attention_impl", "attn"), ("pool_type", "pool"), ("seq_pad_multiple", "pad"),
                       ("remat_policy", "remat"), ("scan", "scan"), ("patch_embedding", "patch")):
      if key in c:
        value = c[key]
        if key == "attention_impl" and value == "auto":
          value = f"auto:{r[key]}"
        parts.append(f"{short}={value}")
    gelu = r.get("gelu_impl", c.get("gelu_impl", "xla"))  # the kernels save only h, whatever recompute_gelu says
    if gelu == "xla" and c.get("recompute_gelu"):
      gelu = "xla+recomputed"
    if c.get("gelu_impl") == "auto" or gelu != "xla":
      parts.append("gelu=" + ("auto:" if c.get("gelu_impl") == "auto" else "") + gelu)
    if "norm_impl" in c:
      parts.append(f"norm={c['norm_impl']}" + (f":{r['norm_impl']}" if c["norm_impl"] == "auto" else ""))
      if norm_kernels_take_residual_adds(r["norm_impl"], c.get("dropout", 0.0), c.get("residual_in_norm", True)):
        parts[-1] += "+residual"
    return " ".join(parts)
  cfg = model_cfg.to_dict()
  if cfg.get("name") == "clip":
    return (f"clip image[{tower(cfg.get('image', {}), resolved['image'])}] "
            f"text[{tower(cfg.get('text', {}), resolved['text'])}]")
  return f"{cfg.get('name')} {tower(cfg, resolved)}"


def _peak_memory(compiled: Any, devices: list[jax.Device]) -> tuple[float | None, str]:
  """(peak bytes per device, where the figure came from): the allocator's peak, else XLA's plan."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and stats.get("peak_bytes_in_use"):
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return float(max(peaks)), "memory_stats.peak_bytes_in_use"
  from bigvis import metrics as metrics_lib
  try:
    return float(metrics_lib.compiled_memory_bytes(compiled)), "compiled.memory_analysis"
  except Exception:
    return None, "unavailable"


def benchmark(config: ml_collections.ConfigDict, steps: int, warmup: int = 3,
              devices: list[jax.Device] | None = None, profile_dir: str | None = None,
              profile_steps: int = 3) -> dict[str, Any]:
  """Times `steps` train steps of `config` on a synthetic batch after `warmup` steps; returns the figures.

  With `profile_dir`, `profile_steps` more steps run under the JAX profiler afterwards (never
  inside the timed ones) and leave a TensorBoard/Perfetto trace there;
  `benchmarks/kernel_breakdown.py DIR` sums its device time by kind of kernel.
  """
  import jax
  from bigvis import config as config_lib
  from bigvis import metrics as metrics_lib
  from bigvis import sharding, train
  from data_pipelines.synthetic import synthetic_batch
  if steps < 1 or warmup < 0:
    raise UserError(f"bench needs --steps >= 1 and --warmup >= 0, got steps={steps}, warmup={warmup}.")
  config_lib.check_known(config, train.TOP_KEYS, "config")
  mesh, rules = sharding.mesh_and_rules(config, devices)
  mesh_devices = list(mesh.devices.flat)
  n_dev = len(mesh_devices)

  model, loss_fn = train.model_and_objective(config, mesh)
  local = synthetic_batch(config.model, config.batch_size // jax.process_count(), config.seed)
  local, _ = sharding.split_host_features(local)

  state, state_shardings, tx, _ = train.create_train_state(config, model, mesh, rules, local)
  n_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
  step_fn = train.make_train_step(config, loss_fn, tx, state_shardings, mesh, rules)
  batch = sharding.global_batch(local, mesh)

  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    lowered = step_fn.lower(state, batch)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  # The host's time to hand the steps over: near step_s means the device waited for the host
  # (launches, dispatch), not the other way round.
  dispatch_s = (time.perf_counter() - t0) / steps
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  loss = float(jax.device_get(metrics["train/loss"]))
  if profile_dir:
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    try:
      for _ in range(profile_steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    finally:
      jax.profiler.stop_trace()

  ex_s = config.batch_size / step_s
  model_flops = metrics_lib.model_flops_per_example(config, local)
  xla_flops_dev = metrics_lib.compiled_flops(compiled)  # per device: verified against 1 device in tests
  xla_flops = xla_flops_dev * n_dev / config.batch_size if xla_flops_dev else None
  peak = metrics_lib.device_peak_flops(mesh_devices[0])
  tflops = model_flops * ex_s / 1e12 if model_flops else None
  tflops_xla = xla_flops * ex_s / 1e12 if xla_flops else None
  mem, mem_source = _peak_memory(compiled, mesh_devices)
  return {
      "model": describe_model(config.model, mesh_devices[0]),
      "experiment": config.get("experiment", ""),
      "params": n_params,
      "batch_size": int(config.batch_size),
      "devices": n_dev,
      "device_kind": mesh_devices[0].device_kind,
      "platform": mesh_devices[0].platform,
      "mesh": dict(mesh.shape),
      "steps": int(steps),
      "warmup": int(warmup),
      "step_ms": step_s * 1e3,
      "dispatch_ms": dispatch_s * 1e3,
      "examples_per_sec": ex_s,
      "examples_per_sec_per_device": ex_s / n_dev,
      "tflops_per_sec": tflops,
      "tflops_per_sec_per_device": tflops / n_dev if tflops else None,
      "mfu": (tflops * 1e12 / n_dev / peak) if tflops and peak else None,
      "tflops_per_sec_xla": tflops_xla,
      "mfu_xla": (tflops_xla * 1e12 / n_dev / peak) if tflops_xla and peak else None,
      "model_flops_per_example": model_flops,
      "xla_flops_per_example": xla_flops,
      "peak_flops_per_device": peak,
      "peak_memory_gib": mem / 2**30 if mem is not None else None,
      "peak_memory_source": mem_source,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "final_loss": loss,
      "jax": jax.__version__,
      "host": platform.node(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "profile_dir": profile_dir,
      "profile_steps": profile_steps if profile_dir else 0,
  }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `bigvis bench` on the CLI's subparsers."""
  p = subparsers.add_parser("bench", help="time the train step on synthetic data; prints one JSON line")
  p.add_argument("--config", required=True, help="experiments/NAME.py[:arg] or a bare experiment name")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                 help="override a config key (repeatable), e.g. --set batch_size=256")
  p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
  p.add_argument("--profile", metavar="DIR", help="after timing, trace --profile-steps more steps into DIR")
  p.add_argument("--profile-steps", type=int, default=3)
  p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
  """Loads the config, benchmarks it and prints the result as one JSON line on stdout."""
  from bigvis import config as config_lib
  config = config_lib.load(args.config, args.overrides)
  result = benchmark(config, steps=args.steps, warmup=args.warmup, profile_dir=args.profile,
                     profile_steps=args.profile_steps)
  print(json.dumps(result), flush=True)
  return 0
