"""bigvis's native resize: built at first use, equal to TensorFlow's resize, and a safe fallback."""
import logging

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import digits, native_ops, preprocess


@pytest.fixture(scope="module")
def ops():
  module = native_ops.image_ops()
  assert module is not None, "the native ops should build wherever the tests run (a C++ compiler is there)"
  return module


# (input h, w) -> (output h, w): shrinking, enlarging, one axis each way, 1-pixel edges, odd ratios.
SIZES = [((400, 380), (224, 224)), ((90, 120), (224, 224)), ((300, 100), (224, 224)), ((1, 7), (5, 3)),
         ((7, 1), (1, 9)), ((513, 257), (31, 64)), ((224, 224), (224, 224)), ((37, 410), (97, 13))]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("antialias", [True, False])
def test_native_resize_matches_tensorflow(ops, channels, dtype, antialias):
  rng = np.random.default_rng(channels)
  for (h, w), (oh, ow) in SIZES:
    image = rng.integers(0, 256, size=(h, w, channels)).astype(dtype)
    got = ops.bigvis_resize(image, [oh, ow], antialias=antialias).numpy()
    if antialias:  # the training pipeline's choice: antialias only where an axis shrinks
      shrinking = oh < h or ow < w
      want = tf.image.resize(image, (oh, ow), "bilinear", antialias=shrinking).numpy()
    else:
      want = tf.image.resize(image, (oh, ow), "bilinear", antialias=False).numpy()
    assert got.shape == (oh, ow, channels) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_native_resize_static_shape_and_bad_input(ops):
  out = ops.bigvis_resize(tf.zeros([10, 20, 3], tf.uint8), [4, 5])
  assert out.shape == (4, 5, 3)
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
    ops.bigvis_resize(tf.zeros([10, 20], tf.uint8), [4, 5])
  with pytest.raises(tf.errors.InvalidArgumentError, match="positive"):
    ops.bigvis_resize(tf.zeros([10, 20, 3], tf.uint8), tf.constant([0, 5]))


def _jpeg(h: int, w: int) -> bytes:
  rng = np.random.default_rng(0)
  smooth = tf.image.resize(rng.integers(0, 256, size=(h // 8, w // 8, 3)).astype(np.float32), (h, w))
  return tf.io.encode_jpeg(tf.cast(smooth, tf.uint8), quality=90).numpy()


def _op_types(op) -> set[str]:
  """The op types of `op` traced for one encoded image (top level: the native op is not in a branch)."""
  fn = tf.function(lambda data, seed: op({"image": data}, seed)["image"])
  graph = fn.get_concrete_function(tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)).graph
  return {o.type for o in graph.get_operations()}


@pytest.mark.parametrize("spec", ["decode_jpeg_and_inception_crop(224)|flip_lr|normalize('imagenet')",
                                  "decode|resize_small(64)|central_crop(64)",
                                  "decode_jpeg_and_inception_crop(96, antialias=False)"])
def test_pipeline_output_is_the_same_without_native_ops(ops, monkeypatch, spec):
  """Every seed's crop, flip and values agree between the native path and TensorFlow's ops."""
  data = tf.constant(_jpeg(333, 471))
  op = preprocess.build(spec)
  assert "BigvisResize" in _op_types(op)  # the pipeline really takes the native path...
  native = [op({"image": data}, tf.constant([s, 1], tf.int64))["image"].numpy() for s in range(12)]
  monkeypatch.setattr(native_ops, "image_ops", lambda: None)
  op = preprocess.build(spec)
  assert "BigvisResize" not in _op_types(op)  # ...and TensorFlow's resize without it
  plain = [op({"image": data}, tf.constant([s, 1], tf.int64))["image"].numpy() for s in range(12)]
  for a, b in zip(native, plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2e-3 if a.max() > 10 else 5e-5)  # 0-255 or normalised


def test_build_is_cached_beside_the_datasets(tmp_path, monkeypatch):
  """One cache for everything bigvis makes on first use: BIGVIS_CACHE moves datasets and libraries."""
  monkeypatch.setenv("BIGVIS_CACHE", str(tmp_path))
  monkeypatch.delenv("BIGVIS_DATA_DIR", raising=False)
  assert digits.data_dir() == str(tmp_path / "datasets")
  first = native_ops.build()
  assert first.is_relative_to(tmp_path / "native")
  stamp = first.stat().st_mtime_ns
  assert native_ops.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
  assert not list(first.parent.glob("*.partial"))
  # Not loaded: a second copy of the library in this process would register its kernels twice.


def test_unbuildable_falls_back_with_a_warning(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    assert native_ops.load(cache=tmp_path, compiler="no-such-compiler-xyz") is None
  assert "no-such-compiler-xyz" in caplog.text and "slower resize" in caplog.text
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with caplog.at_level(logging.WARNING):
    assert native_ops.load(source=broken, cache=tmp_path / "cache") is None
  assert "could not build broken.cc" in caplog.text and "error" in caplog.text
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half-written library left behind


def test_switched_off_by_environment(monkeypatch):
  monkeypatch.setenv("BIGVIS_NATIVE_OPS", "0")
  native_ops.image_ops.cache_clear()
  try:
    assert native_ops.image_ops() is None
  finally:
    native_ops.image_ops.cache_clear()  # later tests build (or load) it again
