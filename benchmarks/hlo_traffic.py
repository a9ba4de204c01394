"""Bytes each kind of kernel moves in one compiled step, read from XLA's optimised HLO.

What a GPU profile shows needs a GPU; this needs only the program, so a change meant to save memory
traffic can be checked on a CPU host before a GPU session measures it. Compile for an H100 without
one and dump the program, with XLA's default flags (they gave the kernels the card's own compile
gave: GEMMs without epilogues; `--xla_gpu_enable_triton_gemm=false` would hand biases and residual
adds to cuBLASLt epilogues that the card did not use; benchmarks/README.md, tenth session):

  XLA_FLAGS="--xla_dump_to=runs/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*with_rules.*" \\
    bigvis aot --config experiments/vit_b16_i1k.py --topology h100-1
  python benchmarks/hlo_traffic.py runs/hlo/*sm_9.0a_gpu_after_optimizations.txt [--top 20]

Each fusion or custom call in the entry computation counts its operands plus its outputs, an upper
bound on what it reads and writes (a slice fusion reads only part of its operand). GEMMs, cuDNN
attention and Pallas kernels are custom calls; everything else is what XLA's own fusions move.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

from bigvis.hlo_text import shape_bytes

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(.*)$")


def kernel_kind(name: str, opcode: str, rest: str) -> str:
  """`fusion` instructions by their name's kind (`loop_add_fusion.3` -> loop_add_fusion), custom calls
  by their target (`__cublas$lt$matmul`, `__cudnn$fmhaSoftmax`, `__gpu$xla.gpu.triton` for Pallas)."""
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    return "custom-call " + (target.group(1) if target else "?")
  return re.sub(r"(?:[._]\d+)+$", "", name.lstrip("%"))


def is_gemm_or_attention(kind: str) -> bool:
  """cuBLAS GEMMs, cuDNN attention and Triton GEMM fusions: compute-bound kernels, kept apart from the
  memory-bound rest (XLA's fusions, Pallas kernels) that memory-traffic changes target."""
  return kind.startswith(("custom-call __cublas", "custom-call __cudnn")) or kind.startswith("gemm_fusion")


def memory_bound_bytes(records: list[dict]) -> int:
  """Bytes in and out of every kernel but GEMMs and attention: what memory-traffic changes target."""
  return sum(r["bytes_in"] + r["bytes_out"] for r in records if not is_gemm_or_attention(r["kind"]))


def traffic(hlo_text: str) -> list[dict]:
  """One record per fusion or custom call of the entry computation: kind, op name, bytes in and out."""
  if "ENTRY" not in hlo_text:
    raise ValueError("no ENTRY computation: pass an HLO module's text (an after_optimizations dump)")
  entry = hlo_text[hlo_text.index("ENTRY"):]
  end = entry.find("\n}\n")  # the entry computation's closing brace
  if end >= 0:
    entry = entry[:end]
  shapes, records = {}, []
  for line in entry.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, args, rest = m.groups()
    shapes[name] = shape
    if opcode not in ("fusion", "custom-call"):
      continue
    op_name = re.search(r'op_name="([^"]*)"', rest)
    records.append(dict(
        kind=kernel_kind(name, opcode, rest),
        op=re.sub(r"block\d+", "blockNN", op_name.group(1)) if op_name else "",
        bytes_in=sum(shape_bytes(shapes.get(a.strip(), "")) for a in re.sub(r"/\*.*?\*/", "", args).split(",")),
        bytes_out=shape_bytes(shape), shape=shape))
  return records


TINY_OUTPUT_BYTES = 800_000  # 200,000 float32 elements


def report(records: list[dict], top: int = 0) -> str:
  """A table by kernel kind (count, GB, share), the total outside GEMMs and attention, and the `top`
  heaviest (op name, output shape) groups."""
  by_kind, count = collections.Counter(), collections.Counter()
  for r in records:
    by_kind[r["kind"]] += r["bytes_in"] + r["bytes_out"]
    count[r["kind"]] += 1
  total = sum(by_kind.values()) or 1
  lines = [f"{'kernels':>7} {'GB':>8} {'share':>6}  kind"]
  lines += [f"{count[k]:7d} {v / 1e9:8.2f} {v / total:6.1%}  {k}" for k, v in by_kind.most_common()]
  rest = memory_bound_bytes(records)
  lines.append(f"outside GEMMs and attention: {rest / 1e9:.2f} GB (operands + outputs, an upper bound); "
               f"all kernels {total / 1e9:.2f} GB")
  # Tiny kernels cost their launch and the gap after them whatever their bytes (fifteenth session).
  tiny = sum(r["bytes_out"] < TINY_OUTPUT_BYTES for r in records)
  lines.append(f"{len(records)} kernels, {tiny} of them writing under {TINY_OUTPUT_BYTES // 1000} kB")
  if top:
    groups, n = collections.Counter(), collections.Counter()
    for r in records:
      key = (r["kind"], r["op"].split("/", 1)[-1][-70:], r["shape"][:60])
      groups[key] += r["bytes_in"] + r["bytes_out"]
      n[key] += 1
    lines.append("")
    lines.append(f"heaviest {top} (kind, op name, output shape), GB over the step:")
    lines += [f"{n[k]:4d} x {v / 1e9:6.2f}  {k[0]}  {k[1]}  {k[2]}" for k, v in groups.most_common(top)]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("hlo", help="an optimised HLO text dump (*after_optimizations.txt)")
  p.add_argument("--top", type=int, default=0, help="also list the N heaviest op-name groups")
  args = p.parse_args(argv)
  with open(args.hlo) as f:
    print(report(traffic(f.read()), args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
