"""TensorFlow ops of bigvis's own, compiled at first use: the image resize of the training pipeline.

TensorFlow's antialiased resize spends most of the input pipeline's time in one slow loop
(benchmarks/README.md, "Input pipeline"). `native/image_resize.cc` computes the same values several
times faster. The first process that needs it compiles it with the machine's C++ compiler against
the installed TensorFlow (about 10 s) and caches the library in bigvis's cache (`$BIGVIS_CACHE`,
default `~/.cache/bigvis`), so later runs load it at once. Without a compiler, or with `BIGVIS_NATIVE_OPS=0`, the pipeline uses TensorFlow's own ops,
after one warning that names the reason.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import tensorflow as tf

from data_pipelines import cache_root

SOURCE = Path(__file__).with_name("native") / "image_resize.cc"
_log = logging.getLogger(__name__)


def _compile_command(compiler: str, source: Path, target: Path) -> list[str]:
  # TensorFlow's own flags carry its include path, C++ standard and ABI; -O3 lets the compiler
  # vectorise the row loops for any x86-64 or ARM host that shares the cache.
  return [compiler, "-shared", "-fPIC", "-O3", "-w", str(source), "-o", str(target),
          *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def build(source: Path = SOURCE, cache: Path | None = None, compiler: str | None = None) -> Path:
  """Compiles `source` into a shared library (or finds it already built) and returns its path.

  The library lives under `cache` (default: `native/` in bigvis's cache), in a folder named by a hash
  of the source, TensorFlow's version, the machine type and the whole compile command.

  Raises `RuntimeError` naming what went wrong. Concurrent builders are safe: each writes its own
  temporary file and renames it into place.
  """
  compiler = compiler or os.environ.get("CXX") or "c++"
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler '{compiler}' on PATH (set CXX to one)")
  key = hashlib.sha256(b"\0".join([
      source.read_bytes(), tf.__version__.encode(), platform.machine().encode(),
      " ".join(_compile_command(compiler, Path("s"), Path("t"))).encode()])).hexdigest()[:16]
  folder = (cache or Path(cache_root())) / "native" / key
  target = folder / f"{source.stem}.so"
  if target.exists():
    return target
  folder.mkdir(parents=True, exist_ok=True)
  _log.info("bigvis: building native image ops with %s (first use on this machine, about 10 s) into %s",
            compiler, folder)
  fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=folder)
  os.close(fd)
  try:
    done = subprocess.run(_compile_command(compiler, source, Path(partial)), capture_output=True, text=True)
    if done.returncode != 0:
      lines = done.stderr.strip().splitlines() or ["no output"]
      first_error = next((line.strip() for line in lines if "error" in line.lower()), lines[-1].strip())
      raise RuntimeError(f"'{compiler}' could not build {source.name} (exit {done.returncode}): {first_error}")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


def load(source: Path = SOURCE, cache: Path | None = None, compiler: str | None = None) -> ModuleType | None:
  """The op module built from `source`, or None (with one warning saying why) if it cannot be had.

  Load one build per process: two copies of a library from different paths register the same
  kernels twice, and TensorFlow then refuses to run either.
  """
  try:
    return tf.load_op_library(str(build(source, cache, compiler)))
  except (RuntimeError, OSError, tf.errors.OpError) as e:
    _log.warning("bigvis: native image ops unavailable (%s); using TensorFlow's slower resize.", e)
    return None


@functools.cache
def image_ops() -> ModuleType | None:
  """The op module (`bigvis_resize`) for this process, or None when `BIGVIS_NATIVE_OPS=0` or unbuildable."""
  if os.environ.get("BIGVIS_NATIVE_OPS", "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  return load()
