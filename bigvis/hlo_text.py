"""Reading XLA's optimised HLO text: array bytes, transposes and collectives of a compiled step.

`bigvis aot` reports them for a compiled train step, and `benchmarks/hlo_traffic.py` sums the bytes
each kernel moves. Plain text parsing (`compiled.as_text()`, or an `--xla_dump_to` file), so any
backend's program reads the same way.
"""
from __future__ import annotations

import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast")
# A collective's result (`-done` for an asynchronous one: its `-start` holds the operand too); the
# shape is one token or one parenthesised tuple, so text further along the line is never read as one.
_SHAPE = r"(\((?:[^()]|\([^()]*\))*\)|\S+)"
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = " + _SHAPE + " (" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_COMPUTATION = re.compile(r"^(ENTRY )?(%[\w.\-]+) .*\{\s*$")
# Computations an instruction runs: called ones (fusions, async wrappers, reductions, branches) once
# per run of the instruction, a loop's body (and condition) once per iteration.
_CALLS = re.compile(r"\b(?:calls|to_apply|condition)=(%[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_LOOP = re.compile(r"\bwhile\(.*?\bcondition=(%[\w.\-]+), body=(%[\w.\-]+)")
_TRIP_COUNT = re.compile(r"known_trip_count\":\{\"n\":\"(\d+)\"")
_SCALAR_CONSTANT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string, e.g. `(bf16[2,3]{1,0}, f32[4]{0})` -> 28."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES[dtype]
  return total


def count_transposes(hlo_text: str) -> int:
  """Transpose instructions (fused or not) in an optimised HLO module's text."""
  return len(re.findall(r"= \S+ transpose\(", hlo_text))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per kind of collective that one run of the program executes: {"ops": count, "bytes": bytes of
  their results on one device} (an all-gather's whole gathered array, a reduce-scatter's shard).

  Each computation counts as often as the entry computation runs it, through fusions, async
  wrappers and branches; a loop's body its trip count times (a scanned layer stack's per-layer
  gathers): XLA's known trip count (GPUs), else the one constant its condition, or what the
  condition calls, compares the counter with (TPUs); once where neither is there (a lower bound).

  Why: a sharding mistake shows up here before it costs a run; a data-parallel step should move
  little more than its gradients (compiled for 8 H100s, ViT-B/16 had gathered the whole batch's
  activations twice a step: benchmarks/README.md, sixteenth session).
  """
  order: list[str] = []  # computations as printed: callees before their callers
  entry = None
  calls: dict[str, list[tuple[str, int | None, str | None]]] = {}  # caller -> [(callee, trips, condition)]
  found: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, result bytes)]
  constants: dict[str, list[int]] = {}  # computation -> its s32 scalar constants
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      order.append(current)
      entry = current if header.group(1) else entry
      continue
    if current is None:
      continue
    constants.setdefault(current, []).extend(int(c) for c in _SCALAR_CONSTANT.findall(line))
    edges = calls.setdefault(current, [])
    loop = _LOOP.search(line)
    if loop:
      trips = _TRIP_COUNT.search(line)
      edges.append((loop.group(2), int(trips.group(1)) if trips else None, loop.group(1)))
    edges += [(callee, 1, None) for callee in _CALLS.findall(line)]
    for branches in _BRANCHES.findall(line):
      edges += [(callee.strip(), 1, None) for callee in branches.split(",") if callee.strip()]
    op = _COLLECTIVE.match(line)
    if op and op.group(3) != "-start":
      found.setdefault(current, []).append((op.group(2), shape_bytes(op.group(1))))

  def trip_count(condition: str) -> int:
    bound = constants.get(condition, []) + [c for callee, _, _ in calls.get(condition, [])
                                            for c in constants.get(callee, [])]
    return bound[0] if len(bound) == 1 else 1

  times = {name: int(name == entry) for name in order}
  for caller in reversed(order):  # callers before their callees
    for callee, trips, condition in calls.get(caller, []):
      if callee in times:
        n = trips if trips is not None else trip_count(condition) if condition else 1
        times[callee] += times[caller] * n
  counts: dict[str, dict[str, int]] = {}
  for name, ops in found.items():
    n = times.get(name) or 1  # a computation the parse found no path to still counts once
    for kind, nbytes in ops:
      totals = counts.setdefault(kind, {"ops": 0, "bytes": 0})
      totals["ops"] += n
      totals["bytes"] += n * nbytes
  return counts
