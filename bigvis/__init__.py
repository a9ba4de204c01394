"""bigvis: pretrain Vision Transformers and CLIP with JAX/Flax on a device mesh."""
import os

__version__ = "0.1.0"


def _host_memory_mb() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
  except (AttributeError, OSError, ValueError):
    return None


# TensorFlow's default CPU allocator takes every large tensor straight from the OS and gives it back:
# each batch of 64 float32 224^2 images is 38 MB of fresh pages, faulted in and zeroed, ~0.3 ms per
# image, a fifth of the whole preprocessing cost (benchmarks/README.md). Its BFC allocator keeps freed
# memory and reuses it. TensorFlow reads this when it first allocates, so it is set here, on the first
# import of bigvis, before anything of TensorFlow's runs; a setting of the user's own wins. The pool's
# 64 GB default cap is raised to the machine's memory, so large in-memory caches fit as before.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(max(_host_memory_mb() or 0, 1 << 16)))
