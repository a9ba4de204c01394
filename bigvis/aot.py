"""`bigvis aot`: compiles the real train step for a TPU slice or NVIDIA GPUs from any host; checks the fit.

    bigvis aot --config experiments/vit_h14_i21k.py --topology v5p-256 [--set k=v]...
    bigvis aot --config experiments/clip_vitb16.py --topology h100-8

libtpu (the `aot` extra) describes a TPU slice as compile-only devices
(`jax.experimental.topologies`); JAX's CUDA plugin (the `gpu` extra) does the
same for H100s from a description of the chip, no GPU needed. The mesh, the
sharded train state and the jitted step are built by the same functions
training uses (`bigvis.train`) and XLA compiles them here, on a CPU. Nothing is
allocated: the state and the global batch are `jax.ShapeDtypeStruct`s.

Besides memory and FLOPs it counts the transposes in the compiled step: a tower
whose activations XLA laid out as [tokens, width, batch] shows up as a
transpose per block (CLIP B/16's text tower had 156 for an H100 before
`layers.row_major`; ViT-B/16 now has 8: one in the patch embedding, seven in the pooled last
block's one-token attention). And it counts the collectives a step runs
(`hlo_text.collectives`: ops and bytes per kind), where a sharding mistake
shows before it costs a run: a data-parallel step should exchange little more
than its gradients (compiled for 8 H100s, ViT-B/16 had also gathered the whole
batch's activations twice a step, until the sixteenth session).

Reported per chip: memory (XLA's buffer assignment: arguments, outputs that
are not donated back into them, temporaries, program) against the chip's HBM;
FLOPs per step; and a step time estimated from an assumed hardware
utilisation, with the MFU that step time means.

FLOPs are counted on the step's jaxpr (matmuls and convolutions; a scanned
layer loop counts `length` times), because XLA's cost analysis counts the body
of a scanned loop once; attention and the Pallas kernels are traced as XLA's
ops, whose matmuls a jaxpr shows. `flops_per_chip` includes remat recomputation
and token padding (what the chip executes, the basis of the step time);
`model_flops_per_chip` is the same step traced without either (the usual basis
of MFU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from bigvis.errors import UserError
from bigvis.hlo_text import collectives, count_transposes

if TYPE_CHECKING:  # jax loads lazily, so `bigvis --help` stays fast
  import jax
  import ml_collections

GIB = 2**30
# The fraction of peak FLOP/s a well-tuned large transformer step sustains on TPU; the step-time assumption.
ASSUMED_UTILIZATION = 0.5


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: how libtpu names it, what a chip holds and computes, how slice names count."""
  libtpu: str            # prefix libtpu's topology names use, e.g. "v5p" in "v5p:4x4x8"
  device_kind: str       # jax's device_kind of its chips
  dims: int              # 3: a 3-D torus (v4, v5p); 2: a 2-D grid (v5e, v6e)
  cores_per_chip: int    # TensorCores per chip; one JAX device per chip (megacore)
  names_count_cores: bool  # v4-8 / v5p-8 are 8 TensorCores = 4 chips; v5e-8 / v6e-8 are 8 chips
  hbm_bytes: int
  peak_flops: float      # dense bf16 FLOP/s per chip
  chip_config: str | None = None  # libtpu chip_config_name; v4 needs "megacore" for one device per chip
  platform: str = "tpu"
  target_config: str | None = None  # GPUs: XLA's description of the chip (a gpu TargetConfig text proto)


# An H100 SXM as XLA's GPU compiler sees it (its published limits; what a device reports about itself).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPUS_PER_HOST = 8


GENERATIONS = {
    "v4": Generation("v4", "TPU v4", 3, 2, True, 32 * GIB, 275e12, chip_config="megacore"),
    "v5p": Generation("v5p", "TPU v5", 3, 2, True, 95 * GIB, 459e12),
    "v5e": Generation("v5e", "TPU v5 lite", 2, 1, False, 16 * GIB, 197e12),
    "v6e": Generation("v6e", "TPU v6 lite", 2, 1, False, 32 * GIB, 918e12),
    "h100": Generation("h100", "NVIDIA H100 80GB HBM3", 2, 1, False, 80 * GIB, 989e12,
                       platform="cuda", target_config=H100_TARGET_CONFIG),
}
ALIASES = {"v5litepod": "v5e"}
VALID_FORMS = ("GEN-N with GEN one of v4, v5p, v5e (or v5litepod), v6e and N a power of two "
               "(TensorCores for v4/v5p, e.g. v4-8, v5p-256; chips for v5e/v6e, e.g. v5e-16, v6e-64), "
               "GEN:SHAPE giving the chip grid (e.g. v5p:4x4x12, v4:2x2x1, v5e:4x8, v6e:2x2), "
               f"or h100-N for N H100 GPUs (1 to {GPUS_PER_HOST}, or whole hosts of {GPUS_PER_HOST}: h100-64)")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (its generation and chip grid) or H100 hosts (`shape` = hosts, GPUs per host)."""
  name: str
  generation: Generation
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    """The topology as the compiler's plugin takes it: libtpu's `v5p:4x4x8`, CUDA's `1xHOSTSxGPUS`."""
    if self.generation.platform == "cuda":
      return "1x" + "x".join(map(str, self.shape))
    return f"{self.generation.libtpu}:{'x'.join(map(str, self.shape))}"


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's chip grid for a power-of-two slice: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... or 1x1, 1x2, 2x2, 2x4, ..."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(sorted(shape)) if dims == 2 else tuple(shape)


def parse_topology(name: str) -> Topology:
  """`v5p-256`, `v5e-16`, `v5p:4x4x8`, ... -> Topology; anything else is a UserError listing the valid forms."""
  text = name.strip().lower()
  gpus = re.fullmatch(r"h100-(\d+)", text)
  if gpus:
    n = int(gpus.group(1))
    if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
      raise UserError(f"unknown topology '{name}'; use {VALID_FORMS}.")
    per_host = min(n, GPUS_PER_HOST)
    return Topology(name, GENERATIONS["h100"], (n // per_host, per_host))
  counted = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
  explicit = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[:=](\d+(?:x\d+)+)", text)
  if counted:
    gen = GENERATIONS[ALIASES.get(counted.group(1), counted.group(1))]
    n = int(counted.group(2))
    chips = n // gen.cores_per_chip if gen.names_count_cores else n
    if n <= 0 or n & (n - 1) or (gen.names_count_cores and (n % gen.cores_per_chip or chips < 4)):
      raise UserError(f"unknown TPU topology '{name}'; use {VALID_FORMS}.")
    return Topology(name, gen, _default_shape(chips, gen.dims))
  if explicit:
    gen = GENERATIONS[ALIASES.get(explicit.group(1), explicit.group(1))]
    shape = tuple(int(s) for s in explicit.group(2).split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      raise UserError(f"TPU topology '{name}' is not a {gen.dims}-D chip grid, which {gen.libtpu} has; "
                      f"use {VALID_FORMS}.")
    return Topology(name, gen, shape)
  raise UserError(f"unknown TPU topology '{name}'; use {VALID_FORMS}.")


def _gpu_topology_devices(topology: Topology) -> list[jax.Device]:
  """The CUDA plugin's compile-only devices for `topology`, described by its target config: no GPU needed."""
  import jax
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology=topology.libtpu_name,
                                        target_config=topology.generation.target_config)
  except (jax.errors.JaxRuntimeError, RuntimeError, KeyError, ValueError) as e:
    raise UserError(f"compiling for '{topology.name}' needs JAX's CUDA plugin, which could not describe it "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); install it with "
                    "make install EXTRAS=gpu.") from None
  return list(desc.devices)


def topology_devices(topology: Topology) -> list[jax.Device]:
  """The compile-only devices of the slice or GPU hosts, one per chip; nothing on this host is touched."""
  if topology.generation.platform == "cuda":
    devices = _gpu_topology_devices(topology)
    if len(devices) != topology.chips:
      raise UserError(f"JAX's CUDA plugin gave {len(devices)} devices for '{topology.name}', expected "
                      f"{topology.chips}.")
    return devices
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise UserError("compiling for TPU needs libtpu, which is not installed; "
                    "install it with `make install EXTRAS=aot` (or pip install -e '.[aot]').") from None
  # Not on a Cloud TPU VM: tell libtpu not to look for one (metadata server, worker hostnames).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  gen = topology.generation
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{gen.libtpu}-{topology.chips * (gen.cores_per_chip if gen.names_count_cores else 1)}")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel test workers each load it
  import jax
  from jax.experimental import topologies
  kwargs: dict[str, Any] = {}
  if gen.chip_config:
    kwargs["chip_config_name"] = gen.chip_config
  if gen.dims == 2 and min(topology.shape) < 2:  # slices smaller than one 2x2 host
    kwargs["chips_per_host_bounds"] = [min(s, 2) for s in topology.shape] + [1]
  try:
    devices = list(topologies.get_topology_desc(topology_name=topology.libtpu_name, platform="tpu",
                                                **kwargs).devices)
  except (jax.errors.JaxRuntimeError, RuntimeError) as e:
    raise UserError(f"libtpu cannot describe TPU topology '{topology.name}' ({topology.libtpu_name}): "
                    f"{str(e).splitlines()[0]}") from None
  if len(devices) != topology.chips:
    raise UserError(f"libtpu gave {len(devices)} devices for '{topology.name}', expected one per chip "
                    f"({topology.chips}); this libtpu does not match bigvis's table of TPU generations.")
  return devices


def _subjaxprs(params: dict) -> Iterator[Any]:
  from jax.extend.core import ClosedJaxpr, Jaxpr
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, Jaxpr):
        yield v


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of the matmuls and convolutions in a jaxpr (global shapes), a scan body counted `length` times.

  XLA's cost analysis counts a scanned layer loop once, so this is what step
  times and MFU of scanned models are based on. Opaque kernels (cuDNN's attention,
  Pallas calls) count nothing: `models.counted_as_xla` spells them as XLA's ops.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
      total += 2.0 * math.prod(lhs) * rhs_free
    elif name == "conv_general_dilated":
      rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
    if name == "pallas_call":  # its jaxpr is one block's, run over a grid: trace XLA's ops instead
      continue
    subs = [jaxpr_flops(j) for j in _subjaxprs(eqn.params)]
    if not subs:
      continue
    if name == "scan":
      total += eqn.params["length"] * sum(subs)
    elif name == "cond":
      total += max(subs)
    elif name == "shard_map":  # the body sees one shard; every device runs it
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("manual_axes") or mesh.axis_names
      total += math.prod(mesh.shape[a] for a in manual) * sum(subs)
    else:  # jit, remat, custom_jvp/vjp, while (trip count unknown: once)
      total += sum(subs)
  return total


def _oom_bytes(message: str) -> int | None:
  """Bytes XLA:TPU said it needs when it refuses to compile a program that does not fit HBM, else None.

  Two phrasings: "... required for HLO temporaries (1.75T) exceeds available HBM (15.75G)" and
  "Ran out of memory in memory space hbm. Used 123.4G of 95.7G hbm".
  """
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  m = (re.search(r"\(([\d.]+)([KMGT]?)i?B?\)\s+exceeds available HBM", message)
       or re.search(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+[\d.]+[KMGT]?i?B?\s+hbm", message))
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def compile_for_topology(config: ml_collections.ConfigDict, topology: str,
                         assumed_utilization: float = ASSUMED_UTILIZATION) -> dict[str, Any]:
  """Compiles `config`'s train step for a TPU slice or H100s and returns per-chip memory, FLOPs and fit.

  The mesh is `config.mesh` over the slice's chips, the state and batch are
  shapes with the shardings training would give them, and the step is
  `bigvis.train.make_train_step`, so the figures are those of the real run.
  """
  import jax
  import ml_collections
  from bigvis import config as config_lib
  from bigvis import sharding, train
  from bigvis.models import counted_as_xla, with_tower_fields
  from data_pipelines.synthetic import synthetic_batch

  topo = parse_topology(topology)
  gen = topo.generation
  config_lib.check_known(config, train.TOP_KEYS, "config")
  devices = topology_devices(topo)
  mesh, rules = sharding.mesh_and_rules(config, devices, what=f"chips of {topo.name}")

  # Shapes only: one example fixes the feature shapes, the global batch is a ShapeDtypeStruct.
  example, _ = sharding.split_host_features(synthetic_batch(config.model, 1, config.seed))
  example = {k: v for k, v in example.items() if not k.startswith("_")}
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sh)
           for k, v in example.items()}

  # `auto` attention resolves for the target's chips (a TPU runs XLA's), not this host's devices.
  model, loss_fn = train.model_and_objective(config, mesh)
  _, abstract_state, state_shardings, tx, _ = train.plan_train_state(config, model, mesh, rules, example)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract_state, state_shardings)
  n_params = int(sum(x.size for x in jax.tree.leaves(abstract_state["params"])))
  # What FSDP and tensor parallelism leave copied on the chips: a rule that misses a large matrix
  # shows here.
  copied = sharding.copied_parameters(abstract_state["params"], state_shardings["params"], mesh)
  even_split = n_params / (mesh.shape["fsdp"] * mesh.shape["tensor"])
  step = train.make_train_step(config, loss_fn, tx, state_shardings, mesh, rules)

  # FLOPs are read off the traces of two steps with the same parameters, their kernels as XLA's ops
  # (`counted_as_xla`): the step as the chips run it (remat, padding), and the model's own (neither),
  # the basis of MFU as `bigvis bench` and training count it.
  def counting_step(model_cfg):
    cfg = ml_collections.ConfigDict({**config.to_dict(), "model": model_cfg.to_dict()})
    return train.make_train_step(cfg, train.model_and_objective(cfg, mesh)[1], tx, state_shardings, mesh, rules)
  executed = counted_as_xla(config.model, mesh.devices.flat[0])
  executed_step = counting_step(executed)
  plain_step = counting_step(with_tower_fields(executed, remat_policy="none", seq_pad_multiple=0))

  t0 = time.time()
  memory: dict[str, int] | None = None
  needed: int | None = None
  xla_error: str | None = None
  with sharding.use_mesh(mesh):
    traced = step.trace(state, batch)
    hw_flops = jaxpr_flops(executed_step.trace(state, batch).jaxpr)
    model_flops = jaxpr_flops(plain_step.trace(state, batch).jaxpr)
    try:
      compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
      needed = _oom_bytes(str(e))
      if needed is None:
        raise
      compiled, xla_error = None, str(e).strip().splitlines()[0]
  compile_s = time.time() - t0

  xla_flops = transposes = moved = None
  if compiled is not None:
    m = compiled.memory_analysis()
    memory = {"argument_bytes": int(m.argument_size_in_bytes),
              "output_bytes": int(m.output_size_in_bytes),
              "alias_bytes": int(m.alias_size_in_bytes),
              "temp_bytes": int(m.temp_size_in_bytes),
              "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    from bigvis import metrics as metrics_lib
    needed = metrics_lib.compiled_memory_bytes(compiled)
    memory["xla_peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0) or None
    xla_flops = metrics_lib.compiled_flops(compiled)
    hlo = compiled.as_text()
    transposes, moved = count_transposes(hlo), collectives(hlo)

  chips = topo.chips
  flops_chip, model_chip = hw_flops / chips, model_flops / chips
  step_s = flops_chip / (gen.peak_flops * assumed_utilization) if flops_chip else None
  fits = needed is not None and needed <= gen.hbm_bytes and compiled is not None
  return {
      "experiment": config.get("experiment", ""),
      "topology": topo.name,
      "libtpu_topology": topo.libtpu_name,
      "device_kind": devices[0].device_kind,
      "platform": gen.platform,
      "chips": chips,
      "cores_per_chip": gen.cores_per_chip,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_size": int(config.batch_size),
      "batch_per_chip": config.batch_size / sharding.data_parallel_size(mesh),
      "params": n_params,
      "params_per_chip": round(even_split + sum(copied.values())),
      "params_even_split": round(even_split),
      "most_copied_params": [kv for kv in copied.items() if kv[1] > 0][:3],
      "memory": memory,
      "total_bytes_per_chip": needed,
      "hbm_bytes_per_chip": gen.hbm_bytes,
      "fits": bool(fits),
      "xla_error": xla_error,
      "flops_per_chip": flops_chip,
      "model_flops_per_chip": model_chip,
      "xla_flops_per_chip": xla_flops,
      "peak_flops_per_chip": gen.peak_flops,
      "assumed_utilization": assumed_utilization,
      "step_s": step_s,
      "examples_per_sec": config.batch_size / step_s if step_s else None,
      "mfu": model_chip / (step_s * gen.peak_flops) if step_s else None,
      "transposes": transposes,
      "collectives": moved,
      "compile_s": compile_s,
      "jax": jax.__version__,
      "libtpu": _libtpu_version() if gen.platform == "tpu" else None,
  }


def _libtpu_version() -> str | None:
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None


def _seconds(s: float) -> str:
  return f"{s:8.3f} s " if s >= 1 else f"{s * 1e3:8.3f} ms"


def format_report(r: dict[str, Any]) -> str:
  """The human-readable table `bigvis aot` prints above its JSON line."""
  gib = lambda b: f"{b / GIB:8.2f}" if b is not None else "       ?"  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  cores = "" if r["platform"] != "tpu" else \
      f", {r['cores_per_chip']} TensorCore{'s' if r['cores_per_chip'] > 1 else ''} each"
  lines = [
      f"{r['experiment'] or 'config'} on {r['topology']} ({r['libtpu_topology']}: {r['chips']} chip{'s' if r['chips'] > 1 else ''} of "
      f"{r['device_kind']}{cores})",
      f"  mesh {mesh} | batch {r['batch_size']:,} ({r['batch_per_chip']:,.6g} per data-parallel chip) | "
      f"{r['params'] / 1e6:,.1f}M params | compiled in {r['compile_s']:.0f} s"
      + (f" | {r['transposes']} transposes" if r.get("transposes") is not None else ""),
      "  memory per chip                    GiB",
  ]
  m = r["memory"]
  if m:
    lines += [
        f"    arguments (state + batch)   {gib(m['argument_bytes'])}",
        f"    outputs not donated         {gib(m['output_bytes'] - m['alias_bytes'])}",
        f"    temporaries                 {gib(m['temp_bytes'])}",
        f"    program                     {gib(m['generated_code_bytes'])}",
    ]
  else:
    lines.append(f"    XLA refused to compile: {r['xla_error']}")
    lines.append("    (the total below is the part XLA reported; the whole program needs more)")
  total, hbm = r["total_bytes_per_chip"], r["hbm_bytes_per_chip"]
  share = f"{100 * total / hbm:5.1f}%" if total is not None else "    ?"
  lines += [
      f"    total                       {gib(total)}  of {hbm / GIB:.2f} HBM ({share})  "
      f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
      "  compute per chip and step",
      f"    FLOPs (with remat)          {r['flops_per_chip']:.3e}",
      f"    model FLOPs (no remat)      {r['model_flops_per_chip']:.3e}",
  ]
  if r["step_s"]:
    lines += [
        f"    est. step time              {_seconds(r['step_s'])}  (assumes {100 * r['assumed_utilization']:.0f}% of "
        f"the {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 peak is sustained)",
        f"    est. throughput             {r['examples_per_sec']:,.0f} examples/s",
        f"    MFU at that step time       {100 * r['mfu']:8.1f}%",
    ]
  if r["mesh"].get("fsdp", 1) * r["mesh"].get("tensor", 1) > 1 and r.get("most_copied_params") is not None:
    from bigvis.sharding import most_copied
    most = most_copied(dict(r["most_copied_params"]))
    share = r["params_per_chip"] / r["params_even_split"]
    lines.append(f"  parameters per chip: {r['params_per_chip'] / 1e6:,.1f}M, {share:.3f}x an even split over "
                 f"fsdp x tensor; the most copied: {most or 'none'}")
  if r.get("collectives") is not None:  # what the step sends between chips: a sharding mistake shows here
    moved = ", ".join(f"{k} {v['ops']} ({v['bytes'] / 1e6:,.1f} MB)" for k, v in sorted(r["collectives"].items()))
    lines.append(f"  collectives per chip and step (ops, bytes of their results): {moved or 'none'}")
  return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `bigvis aot` on the CLI's subparsers."""
  p = subparsers.add_parser(
      "aot", help="compile the train step for a TPU slice or H100s from this host; memory, FLOPs, fit",
      description="Compiles the real train step for a TPU topology (needs the `aot` extra: libtpu) or for "
                  "H100 GPUs (needs the `gpu` extra: JAX's CUDA plugin; no GPU) and reports per-chip memory "
                  "against HBM, FLOPs and an estimated step time; exit 1 if it does not fit.")
  p.add_argument("--config", required=True, help="experiments/NAME.py[:arg] or a bare experiment name")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                 help="override a config key (repeatable), e.g. --set mesh.fsdp=8")
  p.add_argument("--topology", required=True, metavar="NAME",
                 help="TPU slice: v4-8 .. v4-4096, v5p-8 .. (TensorCores), v5e-1 .. v5e-256, v6e-1 .. v6e-256 "
                      "(chips), a chip grid such as v5p:4x4x8 or v5e:2x4; or h100-1 .. h100-8, h100-16, ... (GPUs)")
  p.add_argument("--assumed-utilization", type=float, default=ASSUMED_UTILIZATION, metavar="U",
                 help=f"fraction of peak FLOP/s assumed for the step-time estimate (default {ASSUMED_UTILIZATION})")
  p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
  """Prints the report and a final JSON line; 0 when it fits in HBM, 1 (one line on stderr) when not."""
  import jax
  from bigvis import config as config_lib
  if not 0 < args.assumed_utilization <= 1:
    raise UserError(f"--assumed-utilization must be in (0, 1], got {args.assumed_utilization}.")
  parse_topology(args.topology)  # a bad name fails before the config is loaded
  config = config_lib.load(args.config, args.overrides)
  try:  # never touch this host's accelerators: everything runs for the target topology
    jax.config.update("jax_platforms", "cpu")
  except RuntimeError:  # backends already up (e.g. in tests): they are not used anyway
    pass
  r = compile_for_topology(config, args.topology, args.assumed_utilization)
  print(format_report(r))
  print(json.dumps(r), flush=True)
  if not r["fits"]:
    total = r["total_bytes_per_chip"]
    need = f"{total / GIB:.1f} GiB per chip" if total is not None else "more than a chip holds"
    print(f"bigvis: {r['experiment'] or 'the config'} does not fit on {r['topology']}: it needs {need} of "
          f"{r['hbm_bytes_per_chip'] / GIB:.0f} GiB HBM; shard more (--set mesh.fsdp=N), remat more, "
          "or lower batch_size.", file=sys.stderr)
    return 1
  return 0
