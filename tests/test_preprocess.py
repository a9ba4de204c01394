"""The op registry and string mini-language, and determinism of random ops."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bigvis.errors import UserError
from data_pipelines import preprocess
from data_pipelines import shifts as _shifts  # noqa: F401  registers rotate, used below


def _png(h=20, w=30, channels=3):
  arr = (np.arange(h * w * channels) % 256).astype(np.uint8).reshape(h, w, channels)
  buf = io.BytesIO()
  Image.fromarray(arr.squeeze() if channels == 1 else arr).save(buf, format="PNG")
  return arr, buf.getvalue()


SEED = tf.constant([1, 2], tf.int64)


def test_decode_resize_value_range_onehot():
  arr, data = _png()
  op = preprocess.build("decode|resize(16)|value_range(-1,1)|onehot(10)")
  out = op({"image": tf.constant(data), "label": tf.constant(3, tf.int64)}, SEED)
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == tf.float32
  assert -1.0 <= float(tf.reduce_min(out["image"])) and float(tf.reduce_max(out["image"])) <= 1.0
  np.testing.assert_array_equal(out["labels"].numpy(), np.eye(10)[3])


def test_decode_makes_grayscale_rgb():
  _, data = _png(channels=1)
  out = preprocess.build("decode")({"image": tf.constant(data)}, SEED)
  assert out["image"].shape == (20, 30, 3)


def test_value_range_maps_endpoints():
  op = preprocess.build("value_range(-1,1)")
  out = op({"image": tf.constant([[[0, 255, 0]]], tf.uint8)}, SEED)["image"].numpy()
  np.testing.assert_allclose(out, [[[-1, 1, -1]]])


def test_random_ops_depend_only_on_the_seed():
  _, data = _png(64, 80)
  op = preprocess.build("decode|inception_crop(24)|flip_lr")
  a = op({"image": tf.constant(data)}, SEED)["image"].numpy()
  b = op({"image": tf.constant(data)}, SEED)["image"].numpy()
  others = [op({"image": tf.constant(data)}, tf.constant([1, s], tf.int64))["image"].numpy() for s in range(3, 9)]
  np.testing.assert_array_equal(a, b)
  assert a.shape == (24, 24, 3) and any(not np.array_equal(a, o) for o in others)


def test_jpeg_window_decode_matches_shape():
  arr = (np.random.default_rng(0).integers(0, 255, (64, 64, 3))).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  out = preprocess.build("decode_jpeg_and_inception_crop(32)|normalize('clip')")(
      {"image": tf.constant(buf.getvalue())}, SEED)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32


def test_central_crop_and_resize_small():
  arr, data = _png(40, 60)
  out = preprocess.build("decode|resize_small(20)|central_crop(20)")({"image": tf.constant(data)}, SEED)
  assert out["image"].shape == (20, 20, 3)


def test_keep_drops_other_features():
  out = preprocess.build("keep('a')")({"a": tf.constant(1), "b": tf.constant(2)}, SEED)
  assert set(out) == {"a"}


@pytest.mark.parametrize("spec, fragment", [
    ("decode|resise(32)", "did you mean 'resize'"),
    ("decode|resize(", "not of the form"),
    ("resize(size=x)", "not literals"),
    ("rotate('x')", "got bad arguments: could not convert string to float"),
])
def test_bad_specs_are_user_errors(spec, fragment):
  with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
    preprocess.build(spec)


@pytest.mark.parametrize("stats, mean, std", [
    ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("clip", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
def test_normalize_is_per_channel(stats, mean, std):
  """Each channel gets its own mean and std, on uint8 and float inputs of any size."""
  rng = np.random.default_rng(0)
  for image in (rng.integers(0, 256, (5, 7, 3)).astype(np.uint8), rng.uniform(0, 255, (9, 4, 3)).astype(np.float32)):
    out = preprocess.build(f"normalize('{stats}')")({"image": tf.constant(image)}, SEED)["image"].numpy()
    want = (image.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_normalize_with_one_value_for_every_channel_and_mismatched_stats():
  image = np.random.default_rng(1).integers(0, 256, (4, 5, 3)).astype(np.uint8)
  out = preprocess.build("normalize(127.5, 127.5)")({"image": tf.constant(image)}, SEED)["image"].numpy()
  np.testing.assert_allclose(out, (image / 255 - 127.5) / 127.5, rtol=1e-5, atol=1e-5)
  out = preprocess.build("normalize([0.5], [0.25])")({"image": tf.constant(image)}, SEED)["image"].numpy()
  np.testing.assert_allclose(out, (image / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
  gray = image[..., :1]  # one channel, imagenet's three statistics: broadcast to three channels
  out = preprocess.build("normalize('imagenet')")({"image": tf.constant(gray)}, SEED)["image"].numpy()
  assert out.shape == (4, 5, 3)
  with pytest.raises(UserError, match="mean has 3 values and std 2"):
    preprocess.build("normalize([0.1, 0.2, 0.3], [0.5, 0.5])")


def test_inception_crop_antialias_switch():
  """antialias=False resizes with the plain bilinear kernel when shrinking; the default antialiases."""
  arr = (np.random.default_rng(0).integers(0, 255, (64, 64, 3))).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  data = tf.constant(buf.getvalue())
  full = tf.image.decode_jpeg(data, channels=3)  # a 100% crop of a square image is the image
  run = lambda spec: preprocess.build(spec)({"image": data}, SEED)["image"].numpy()
  plain = run("decode_jpeg_and_inception_crop(16, area_min=100, antialias=False)")
  smooth = run("decode_jpeg_and_inception_crop(16, area_min=100)")
  np.testing.assert_allclose(plain, tf.image.resize(full, (16, 16), antialias=False).numpy(), atol=1e-3)
  np.testing.assert_allclose(smooth, tf.image.resize(full, (16, 16), antialias=True).numpy(), atol=1e-3)
  assert np.abs(plain - smooth).max() > 10


def test_jpeg_crop_op_takes_the_other_formats_the_reader_accepts():
  """`decode_jpeg_and_inception_crop` on a PNG (the bundled digits are PNGs; the shard reader accepts
  PNG, GIF and BMP) makes the random crop `inception_crop` makes of the decoded image with the same
  seed, instead of stopping the pipeline; seeds that differ give other crops."""
  arr, data = _png(48, 64)
  run = lambda spec, image, seed=SEED: preprocess.build(spec)({"image": tf.constant(image)}, seed)["image"].numpy()  # noqa: E731
  out = run("decode_jpeg_and_inception_crop(24)", data)
  assert out.shape == (24, 24, 3)
  np.testing.assert_allclose(out, run("inception_crop(24)", arr), atol=1e-4)  # the op at position 0: one seed
  others = [run("decode_jpeg_and_inception_crop(24)", data, tf.constant([1, s], tf.int64)) for s in range(3, 7)]
  assert any(np.abs(o - out).max() > 1 for o in others)


@pytest.mark.parametrize("label", [-1, 10, 12])
def test_onehot_refuses_labels_outside_its_depth(label):
  """A missing (-1) or too large label stops with a message naming the op, not an all-zero target;
  -1 still pads a list of labels."""
  op = preprocess.build("onehot(10)")
  with pytest.raises(tf.errors.InvalidArgumentError, match="onehot\\(10\\)"):
    op({"label": tf.constant(label, tf.int64)}, SEED)
  padded = op({"label": tf.constant([3, 5, -1], tf.int64)}, SEED)["labels"].numpy()
  np.testing.assert_array_equal(padded, np.eye(10)[3] + np.eye(10)[5])


def test_a_pp_op_failing_on_an_example_is_one_line_naming_the_section():
  from data_pipelines import input as data_input
  ds = tf.data.Dataset.from_tensor_slices({"label": tf.constant([1, 12], tf.int64)}).map(
      lambda x: preprocess.build("onehot(10)")(x, SEED)).batch(1)
  batches = data_input.numpy_batches(ds, "evals.test.data")
  assert next(batches)["labels"].shape == (1, 10)
  with pytest.raises(UserError, match=r"^evals.test.data.pp stopped on an example: onehot\(10\): a 'label' is 10 "
                                      r"or more$"):
    next(batches)
