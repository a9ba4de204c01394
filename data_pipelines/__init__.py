"""tf.data input pipelines for bigvis: sources, preprocessing ops, tokenizer, shards."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# tf.data runs on the host; keep TensorFlow off the accelerators JAX owns.
try:
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised, or no such device type
  pass
