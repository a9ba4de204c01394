"""Where a profiled train step spends its device time, by kind of kernel.

    bigvis bench --config experiments/vit_b16_i1k.py --set model.pool_type=gap \\
        --set model.attention_impl=cudnn --profile runs/prof
    python benchmarks/kernel_breakdown.py runs/prof [--top 20]

Reads the newest `perfetto_trace.json.gz` the JAX profiler wrote under DIR and
sums kernel durations on the device's streams: matmuls (cuBLAS / CUTLASS /
Triton GEMMs), fused attention (cuDNN), convolutions, XLA's elementwise and
reduction fusions, layout copies and transposes, and the rest. "busy" is the
union of kernel intervals; the gap to the traced span is time the device sat
idle (launch overhead, host stalls). On a CPU-only trace the XLA worker threads
stand in for the device, which is only good for testing this script.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

# First match wins; order matters (a cuDNN attention kernel's name can contain "gemm").
# cuDNN's attention backward runs helper kernels (dO.O, dQ conversion) beside the flash kernel; the
# patch embedding's convolution is an implicit GEMM in NHWC.
CATEGORIES = (
    ("pallas (bigvis)", re.compile(r"bigvis_pallas|pallas_call")),  # bigvis/models/pallas_kernels.py
    ("attention", re.compile(r"fmha|flash|sdpa|attention|softmax_fusion|dot_do_o|convert_dq", re.I)),
    ("convolution", re.compile(r"implicit_gemm|fprop_optimized|nhwcAddPadding|convolution", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|\bdot|_dot_|dot_general", re.I)),
    ("copy/transpose", re.compile(r"memcpy|memset|copy|transpose|bitcast", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|elementwise|add|multiply|convert", re.I)),
)


def category(name: str) -> str:
  for label, pattern in CATEGORIES:
    if pattern.search(name):
      return label
  return "other"


def newest_trace(root: str) -> str:
  """The newest perfetto trace under `root` (the profiler writes one folder per capture), or `root` itself."""
  if os.path.isfile(root):
    return root
  files = glob.glob(os.path.join(root, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"kernel_breakdown: no perfetto_trace.json.gz under '{root}'; run "
                     "`bigvis bench ... --profile DIR` first.")
  return max(files, key=os.path.getmtime)


def device_events(trace: dict, process_pattern: str) -> tuple[list[dict], str]:
  """Complete ('X') kernel events on the device processes' streams, or the XLA threads of a CPU-only trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {pid for pid, name in procs.items() if re.search(process_pattern, name)}
  if device_pids:
    on_device = [e for e in events if e.get("ph") == "X" and e["pid"] in device_pids]
    # Kernels sit on `Stream #N` threads; some profilers add module/op summary lines beside them.
    streams = [e for e in on_device if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
    return streams or on_device, "device"
  cpu = [e for e in events if e.get("ph") == "X" and threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLAEigen")]
  return cpu, "cpu-threads"


def busy_time(events: list[dict]) -> float:
  """Length of the union of [ts, ts + dur) intervals, microseconds."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events):
    if start >= end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def breakdown(trace: dict, steps: int, process_pattern: str = r"GPU|TPU|/device:") -> dict:
  """Per-step device milliseconds by category and by kernel, plus busy time and traced span."""
  events, source = device_events(trace, process_pattern)
  if not events:
    raise SystemExit("kernel_breakdown: the trace holds no device kernel events.")
  by_cat: dict[str, float] = collections.defaultdict(float)
  by_kernel: dict[str, float] = collections.defaultdict(float)
  for e in events:
    dur = e.get("dur", 0.0)
    by_cat[category(e["name"])] += dur
    by_kernel[e["name"]] += dur
  span = max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events)
  per_step = lambda us: us / steps / 1e3
  return {
      "source": source, "steps": steps, "kernels": len(events),
      "span_ms_per_step": per_step(span), "busy_ms_per_step": per_step(busy_time(events)),
      "kernel_ms_per_step": per_step(sum(by_cat.values())),
      "by_category_ms": {k: per_step(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "by_kernel_ms": {k: per_step(v) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])},
  }


def render(result: dict, top: int) -> str:
  total = result["kernel_ms_per_step"] or 1.0
  lines = [f"device time per step: span {result['span_ms_per_step']:.2f} ms, busy {result['busy_ms_per_step']:.2f} ms "
           f"({result['kernels']} kernel launches over {result['steps']} steps, {result['source']})",
           f"{'category':<24} {'ms/step':>9} {'share':>7}"]
  for name, ms in result["by_category_ms"].items():
    lines.append(f"{name:<24} {ms:>9.2f} {ms / total:>7.1%}")
  lines.append(f"\n{'kernel (top ' + str(top) + ')':<72} {'ms/step':>9} {'kind':>18}")
  for name, ms in list(result["by_kernel_ms"].items())[:top]:
    short = name if len(name) <= 72 else name[:69] + "..."
    lines.append(f"{short:<72} {ms:>9.3f} {category(name):>18}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("profile_dir", help="the --profile DIR of `bigvis bench`, or a perfetto_trace.json.gz")
  p.add_argument("--steps", type=int, default=3, help="steps in the trace (bench's --profile-steps)")
  p.add_argument("--top", type=int, default=20, help="kernels to list")
  p.add_argument("--json", action="store_true", help="also print the whole breakdown as one JSON line")
  args = p.parse_args(argv)
  path = newest_trace(args.profile_dir)
  with gzip.open(path) as f:
    result = breakdown(json.load(f), args.steps)
  print(render(result, args.top))
  if args.json:
    print(json.dumps({"trace": path, **result}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
