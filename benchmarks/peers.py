"""bigvis against timm and open_clip: the same training step, batch, resolution and precision, one machine.

    python benchmarks/peers.py                       # ViT-B/16 and CLIP B/16, batch 256, on the GPU
    python benchmarks/peers.py --large               # adds ViT-L/16 (batch 128) and H/14 (batch 64)
    python benchmarks/peers.py --only vit --steps 50 --out runs/peers.jsonl
    python benchmarks/peers.py --large --dry-run     # load and trace every run's config; time nothing
    python benchmarks/peers.py --cpu-smoke --skip-torch   # tiny models on the CPU (what the tests run)

Every measurement runs in its own subprocess, one after another, so no run
inherits another's memory, compile caches or allocator state. Each prints one
JSON line; a run that fails (e.g. cuDNN refusing a shape, out of memory) is
reported with its error and the rest go on. The final table gives examples/s,
TFLOP/s (model FLOPs), the fraction of the bf16 matmul ceiling measured in the
same session (`jnp.dot` 8192^3), and the ratio of each bigvis variant to its
peer. The peers use the settings of their own best practice: `torch.compile`,
`torch.autocast(bfloat16)`, fused AdamW, TF32 allowed; bigvis uses bf16
compute with float32 parameters and AdamW state.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bigvis variants per family: (name, experiment, --set overrides). `default` is the experiment as it is
# (attention_impl='auto': on an NVIDIA GPU, cuDNN with 197 -> 200 and 77 -> 80 tokens, masked);
# `tok+xla` is plain XLA attention (the configs' default before 2026-11-26, and what they run on TPU);
# `gap+cudnn` drops the class token so 196 tokens reach cuDNN unpadded; `pad8+cudnn` spells out what
# `auto` picks (the setting measured before `auto` existed).
VIT_VARIANTS = (
    ("bigvis_vit_b16_default", "experiments/vit_b16_i1k.py", ()),
    ("bigvis_vit_b16_tok_xla", "experiments/vit_b16_i1k.py", ("model.attention_impl=xla",)),
    ("bigvis_vit_b16_gap_cudnn", "experiments/vit_b16_i1k.py", ("model.pool_type=gap", "model.attention_impl=cudnn")),
    ("bigvis_vit_b16_pad8_cudnn", "experiments/vit_b16_i1k.py",
     ("model.attention_impl=cudnn", "model.seq_pad_multiple=8")),
)
CLIP_VARIANTS = (
    ("bigvis_clip_b16_default", "experiments/clip_vitb16.py", ()),
    ("bigvis_clip_b16_tok_xla", "experiments/clip_vitb16.py",
     ("model.image.attention_impl=xla", "model.text.attention_impl=xla")),
    ("bigvis_clip_b16_pad8_cudnn", "experiments/clip_vitb16.py",
     ("model.image.attention_impl=cudnn", "model.text.attention_impl=cudnn", "model.image.seq_pad_multiple=8",
      "model.text.seq_pad_multiple=8")),
)
# L/16 and H/14 as timm builds them (1,000 classes, no pre-logits layer, no dropout), unrolled and
# without remat: one 80 GB card holds them at these batches, and remat would spend FLOPs on recompute.
_AS_TIMM = ("model.num_classes=1000", "model.representation_size=None", "model.dropout=0.0",
            "objective.loss=softmax", "model.pool_type=gap", "model.remat_policy=none", "model.scan=False",
            "model.attention_impl=cudnn")
LARGE_VARIANTS = (
    ("bigvis_vit_l16_gap_cudnn", "experiments/vit_l16_i21k.py", _AS_TIMM),
    ("bigvis_vit_h14_gap_cudnn", "experiments/vit_h14_i21k.py", _AS_TIMM),
)
# Tiny stand-ins for the CPU smoke test: the same code paths (padding, CLIP) in seconds.
SMOKE_VARIANTS = (
    ("bigvis_vit_ti_digits", "experiments/vit_ti_digits.py", (), "vit"),
    ("bigvis_vit_ti_digits_pad8", "experiments/vit_ti_digits.py", ("model.pool_type=tok", "model.seq_pad_multiple=8"),
     "vit"),
    ("bigvis_clip_ti_digits", "experiments/clip_ti_digits.py", (), "clip"),
)


def _run_specs(args: argparse.Namespace) -> list[dict]:
  """What to measure, in order: the matmul ceiling, then per family the peer and the bigvis variants."""
  specs: list[dict] = []
  tiles = None
  if args.kernel_tiles:  # read here, so a wrong path stops the script before any run
    try:
      with open(args.kernel_tiles) as f:
        tiles = json.load(f)
    except (OSError, ValueError) as e:
      raise SystemExit(f"peers: --kernel-tiles {args.kernel_tiles} is not a readable JSON file: {e}")
    if not isinstance(tiles, dict) or not tiles:  # e.g. a sweep whose every tiling failed
      raise SystemExit(f"peers: --kernel-tiles {args.kernel_tiles} names no kernel's tiling: {tiles!r}")

  def bigvis(name, config, overrides, family, batch, group):
    specs.append({"kind": "bigvis", "name": name + args.tag, "family": family, "group": group, "config": config,
                  "batch": batch, "overrides": [*overrides, *args.bigvis_set],
                  "steps": args.steps, "warmup": args.warmup, **({"kernel_tiles": tiles} if tiles else {})})

  def torch(name, family, model, batch, group):
    if not args.skip_torch and not args.cpu_smoke:
      specs.append({"kind": "torch", "name": name, "family": family, "group": group, "model": model,
                    "batch": batch, "steps": args.steps, "warmup": args.warmup, "compile": not args.no_compile})

  if args.cpu_smoke:
    for name, config, overrides, family in SMOKE_VARIANTS:
      bigvis(name, config, overrides, family, args.batch, family)
  else:
    torch("timm_vit_base_patch16_224", "vit_b16", "timm:vit_base_patch16_224", args.batch, "vit")
    for v in VIT_VARIANTS:
      bigvis(*v, "vit_b16", args.batch, "vit")
    if os.path.exists(os.path.join(REPO, "experiments/clip_vitb16.py")):
      torch("open_clip_ViT-B-16", "clip_b16", "open_clip:ViT-B-16", args.batch, "clip")
      for v in CLIP_VARIANTS:
        bigvis(*v, "clip_b16", args.batch, "clip")
    else:
      print("peers: experiments/clip_vitb16.py is missing; skipping CLIP B/16", file=sys.stderr)
    if args.large:
      torch("timm_vit_large_patch16_224", "vit_l16", "timm:vit_large_patch16_224", args.large_batch, "vit")
      bigvis(*LARGE_VARIANTS[0], "vit_l16", args.large_batch, "vit")
      torch("timm_vit_huge_patch14_224", "vit_h14", "timm:vit_huge_patch14_224", args.huge_batch, "vit")
      bigvis(*LARGE_VARIANTS[1], "vit_h14", args.huge_batch, "vit")
  def matches(s, o):  # a family, or a run by its name with or without --tag
    return o in (s["group"], s["name"], s["name"].removesuffix(args.tag))

  def chosen(s):
    return any(matches(s, o) for o in args.only)
  unmatched = [o for o in args.only if not any(matches(s, o) for s in specs)]
  if unmatched:  # a typo must not spend GPU time on nothing
    raise SystemExit(f"peers: --only names no run: {', '.join(unmatched)} (runs: "
                     f"{', '.join(s['name'].removesuffix(args.tag) for s in specs)}).")
  specs = [s for s in specs if chosen(s)]
  ceiling = {"kind": "jax_matmul", "name": "jax_bf16_matmul", "family": "ceiling", "group": "ceiling",
             "size": 512 if args.cpu_smoke else 8192, "steps": args.steps, "warmup": args.warmup}
  return specs if args.no_ceiling else [ceiling, *specs]


# ----------------------------------------------------------------------------------------------
# Workers: each runs in a fresh subprocess and prints one JSON line.

def bigvis_config(spec: dict):
  """The config a bigvis spec runs: the experiment with its batch and overrides."""
  from bigvis import config as config_lib
  return config_lib.load(spec["config"], [f"batch_size={spec['batch']}", *spec["overrides"]])


def _worker_bigvis(spec: dict) -> dict:
  from bigvis import bench
  if spec.get("kernel_tiles"):
    from bigvis.models import pallas_kernels
    pallas_kernels.set_tiles(spec["kernel_tiles"])  # before the step is traced: kernels read TILES then
  result = bench.benchmark(bigvis_config(spec), steps=spec["steps"], warmup=spec["warmup"])
  return {**result, "kernel_tiles": spec["kernel_tiles"]} if spec.get("kernel_tiles") else result


def check_specs(specs: list[dict]) -> list[str]:
  """Loads every bigvis spec's config and traces its model's shapes: catches typos before a GPU is held."""
  import jax
  from bigvis import bench, params
  lines = []
  for spec in specs:
    if spec["kind"] != "bigvis":
      lines.append(f"{spec['name']}: {spec.get('model', spec['kind'])} batch {spec.get('batch', '-')}")
      continue
    config = bigvis_config(spec)
    if spec.get("kernel_tiles"):
      from bigvis.models import pallas_kernels
      pallas_kernels.set_tiles(spec["kernel_tiles"])  # a wrong kernel or key: an error before a GPU is held
    n = sum(x.size for x in jax.tree.leaves(params.abstract_params(config.model)))  # shapes only
    lines.append(f"{spec['name']}: {bench.describe_model(config.model)}, {n / 1e6:.1f}M params, "
                 f"batch {config.batch_size}")
  return lines


def _worker_jax_matmul(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  n = spec["size"]
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
  for _ in range(max(spec["warmup"], 1)):
    f(a, b).block_until_ready()
  t0 = time.perf_counter()
  out = None
  for _ in range(spec["steps"]):
    out = f(a, b)
  out.block_until_ready()
  dt = (time.perf_counter() - t0) / spec["steps"]
  return {"tflops_per_sec": 2 * n ** 3 / dt / 1e12, "size": n, "device_kind": jax.devices()[0].device_kind}


def _worker_torch(spec: dict) -> dict:
  import torch
  lib, _, name = spec["model"].partition(":")
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  batch = spec["batch"]
  if lib == "timm":
    import timm
    model = timm.create_model(name, num_classes=1000).to(dev)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    loss_of = lambda f: torch.nn.functional.cross_entropy(f(x), y)
  else:
    import open_clip
    model = open_clip.create_model(name, output_dict=True).to(dev)
    clip_loss = open_clip.ClipLoss()
    x = torch.randn(batch, 3, 224, 224, device=dev)
    t = torch.randint(1, 49000, (batch, 77), device=dev)

    def loss_of(f):
      out = f(x, t)
      return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
  f = torch.compile(model) if spec["compile"] else model

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = loss_of(f)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(spec["warmup"]):
    step()
  sync()
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    step()
  sync()
  dt = (time.perf_counter() - t0) / spec["steps"]
  return {"examples_per_sec": batch / dt, "step_ms": dt * 1e3, "batch_size": batch, "compile": spec["compile"],
          "device_kind": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
          "compile_s": setup_s, "torch": torch.__version__}


WORKERS = {"bigvis": _worker_bigvis, "jax_matmul": _worker_jax_matmul, "torch": _worker_torch}


def _run(spec: dict, timeout: float, env: dict) -> dict:
  """Runs one spec in a subprocess; returns its JSON result, or its error."""
  t0 = time.time()
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"name": spec["name"], "family": spec["family"], "kind": spec["kind"], "error": f"timeout {timeout}s"}
  result = None
  for line in reversed(proc.stdout.splitlines()):
    try:
      result = json.loads(line)
      break
    except json.JSONDecodeError:
      continue
  if proc.returncode or result is None:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-3:]
    result = {"error": " | ".join(tail)[-600:], "returncode": proc.returncode}
  return {"name": spec["name"], "family": spec["family"], "kind": spec["kind"], **result,
          "wall_s": time.time() - t0}


def _fmt(v: Any, width: int, digits: int) -> str:
  return ("-" if v is None else f"{v:.{digits}f}").rjust(width)


def table(results: list[dict]) -> str:
  """A fixed-width summary: throughput, TFLOP/s, fraction of the matmul ceiling, ratio to the peer."""
  ceiling = next((r.get("tflops_per_sec") for r in results if r["kind"] == "jax_matmul" and "error" not in r),
                 None)
  # A run is compared with its family's peer at its own batch, so a batch-512 pair shares the table.
  peers = {(r["family"], r.get("batch_size")): r.get("examples_per_sec")
           for r in results if r["kind"] == "torch" and "error" not in r}
  lines = [f"{'run':<32} {'ex/s':>9} {'step ms':>9} {'TFLOP/s':>8} {'ceiling':>8} {'MFU':>6} {'vs peer':>8}"]
  for r in results:
    if r["kind"] == "jax_matmul":
      lines.append(f"{r['name']:<32} {'':>9} {'':>9} {_fmt(r.get('tflops_per_sec'), 8, 1)} "
                   f"{'1.00' if 'error' not in r else '-':>8} {'':>6} {'':>8}"
                   + (f"  error: {r['error']}" if "error" in r else ""))
      continue
    if "error" in r:
      lines.append(f"{r['name']:<32} error: {r['error']}")
      continue
    tflops = r.get("tflops_per_sec")
    frac = tflops / ceiling if tflops and ceiling else None
    peer = None
    if r["kind"] == "bigvis":  # the peer at the same batch, else (older files) the family's only one
      peer = peers.get((r["family"], r.get("batch_size"))) or next(
          (v for (fam, _), v in peers.items() if fam == r["family"]), None)
    ratio = r["examples_per_sec"] / peer if peer else None
    lines.append(f"{r['name']:<32} {r['examples_per_sec']:>9.1f} {_fmt(r.get('step_ms'), 9, 1)} "
                 f"{_fmt(tflops, 8, 2)} {_fmt(frac, 8, 2)} {_fmt(r.get('mfu'), 6, 2)} "
                 f"{_fmt(ratio, 8, 2)}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256, help="global batch for B/16 runs (default 256)")
  p.add_argument("--large", action="store_true", help="also run ViT-L/16 and H/14 against timm")
  p.add_argument("--large-batch", type=int, default=128)
  p.add_argument("--huge-batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--bigvis-set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra --set for every bigvis run, e.g. model.remat_policy=dots_no_batch")
  p.add_argument("--kernel-tiles", metavar="FILE.json",
                 help="Pallas kernels' tilings for every bigvis run (pallas_kernels_check.py --sweep --tiles-out)")
  p.add_argument("--only", default="vit,clip",
                 help="comma-separated families (vit, clip) or run names, e.g. bigvis_vit_b16_gap_cudnn")
  p.add_argument("--tag", default="", help="suffix for bigvis run names, e.g. _b512 (tells reruns apart in --out)")
  p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling (measured by an earlier run)")
  p.add_argument("--skip-torch", action="store_true", help="run only bigvis (and the matmul ceiling)")
  p.add_argument("--no-compile", action="store_true", help="peers without torch.compile")
  p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, for tests")
  p.add_argument("--timeout", type=float, default=900, help="seconds per run")
  p.add_argument("--out", help="also append the JSON lines to this file")
  p.add_argument("--table", metavar="FILE.jsonl", help="print the table of results saved with --out; run nothing")
  p.add_argument("--dry-run", action="store_true", help="check every run's config and list the runs; time nothing")
  args = p.parse_args(argv)
  args.only = [s.strip() for s in args.only.split(",") if s.strip()]
  if args.cpu_smoke:
    if args.batch == 256:
      args.batch = 16
  return args


def main(argv: list[str] | None = None) -> int:
  """Runs every measurement in its own process, prints JSON lines, then the table."""
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(table([json.loads(line) for line in f if line.strip()]), flush=True)
    return 0
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  if args.dry_run:
    sys.path.insert(0, REPO)
    print("\n".join(check_specs(_run_specs(args))), flush=True)
    return 0
  if args.out and os.path.dirname(args.out):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
  results = []
  for spec in _run_specs(args):
    print(f"peers: running {spec['name']} ...", file=sys.stderr, flush=True)
    result = _run(spec, args.timeout, env)
    results.append(result)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(line + "\n")
  print(table(results), flush=True)
  return 0 if all("error" not in r for r in results if r["kind"] == "bigvis") else 1


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, REPO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    worker_spec = json.loads(sys.argv[2])
    print(json.dumps(WORKERS[worker_spec["kind"]](worker_spec)), flush=True)
    sys.exit(0)
  sys.exit(main())
