"""tf.data input pipelines for bigvis: sources, preprocessing ops, tokenizer, shards."""
import importlib.util
import os

import bigvis  # noqa: F401  before TensorFlow: it chooses TensorFlow's host allocator


def cache_root() -> str:
  """Where bigvis keeps what it builds on first use (bundled datasets, native ops): $BIGVIS_CACHE or
  ~/.cache/bigvis."""
  return os.environ.get("BIGVIS_CACHE") or os.path.expanduser("~/.cache/bigvis")


# TensorFlow's warnings stay on: they are how a damaged shard's dropped records show (info is noise).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# tf.data runs on the host; keep TensorFlow off the accelerators JAX owns. Experiment files and the
# synthetic batches of `bigvis bench` / `aot` need no TensorFlow, so a JAX-only install can run them.
if importlib.util.find_spec("tensorflow") is not None:
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass
