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
# A collective's result (`-done` for an asynchronous one: its `-start` holds the operand too).
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) .*\{\s*$")
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
  A loop's body counts its trip count times (a scanned layer stack's per-layer gathers): XLA's
  known trip count (GPUs), else the one constant its condition compares the counter with (TPUs);
  once where neither is there.

  Why: a sharding mistake shows up here before it costs a run; a data-parallel step should move
  little more than its gradients (compiled for 8 H100s, ViT-B/16 had gathered the whole batch's
  activations twice a step: benchmarks/README.md, sixteenth session).
  """
  counts: dict[str, dict[str, int]] = {}
  loops: dict[str, list[tuple[str, str, int | None]]] = {}  # computation -> [(condition, body, trips)]
  found: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, result bytes)]
  constants: dict[str, list[int]] = {}  # computation -> its s32 scalar constants
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      continue
    if current is None:
      continue
    constants.setdefault(current, []).extend(int(c) for c in _SCALAR_CONSTANT.findall(line))
    loop = _LOOP.search(line)
    if loop:
      trips = _TRIP_COUNT.search(line)
      loops.setdefault(current, []).append((loop.group(1), loop.group(2), int(trips.group(1)) if trips else None))
    op = _COLLECTIVE.match(line)
    if op and op.group(3) != "-start":
      found.setdefault(current, []).append((op.group(2), shape_bytes(op.group(1))))

  def trip_count(condition: str, known: int | None) -> int:
    bound = constants.get(condition, [])
    return known if known is not None else bound[0] if len(bound) == 1 else 1
  loops_by_body = {name: [(body, trip_count(cond, n)) for cond, body, n in inner] for name, inner in loops.items()}
  times: dict[str, int] = {}  # loop bodies; any other computation runs once
  bodies = {body for inner in loops_by_body.values() for body, _ in inner}
  pending = [(body, n) for name, inner in loops_by_body.items() if name not in bodies for body, n in inner]
  while pending:  # from the outermost loops inwards
    body, n = pending.pop()
    times[body] = n
    pending += [(inner, n * m) for inner, m in loops_by_body.get(body, [])]
  for name, ops in found.items():
    for kind, nbytes in ops:
      entry = counts.setdefault(kind, {"ops": 0, "bytes": 0})
      entry["ops"] += times.get(name, 1)
      entry["bytes"] += times.get(name, 1) * nbytes
  return counts
