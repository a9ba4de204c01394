"""Distribution-shift ops for robustness sets: blur, rotation, noise, thicker or thinner strokes, occlusion.

Importing this module registers the ops in `data_pipelines.preprocess`, so a
shifted copy of a held-out split is a pp string away, e.g.
`"decode|resize(16)|gaussian_blur(1.0)|value_range(-1,1)"`. Every op keeps the
image's dtype (uint8 results are rounded and clipped to 0..255; `resize` gives
float32 in 0..255, which stays float) and works on [H, W, C] images before
`value_range`/`normalize`; the random ones (`gaussian_noise`, `occlude`)
draw only from the op's per-example seed, so a shifted set is the same on
every run and every process layout. `invert` lives in preprocess.py.
"""
from __future__ import annotations

import math

import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines.preprocess import Op, _image_op, register


def _to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(image, tf.float32)


def _like(out: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """A float32 result back in the input's dtype; integers are rounded and clipped to their range."""
  if dtype.is_integer:
    out = tf.clip_by_value(tf.round(out), dtype.min, dtype.max)
  return tf.cast(out, dtype)


def gaussian_kernel(sigma: float) -> tf.Tensor:
  """Normalised 1-D Gaussian taps over +-ceil(3 sigma) pixels."""
  radius = max(1, int(math.ceil(3 * sigma)))
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


@register("gaussian_blur")
def gaussian_blur(sigma: float, key: str = "image") -> Op:
  """Blurs with a Gaussian of `sigma` pixels (separable). Near the edges each pixel is the Gaussian-
  weighted mean of the pixels inside the image (a normalised convolution): a constant image stays
  constant, and any sigma works on any image size, where reflecting the edges needs the kernel's
  radius below the image's side."""
  if not sigma > 0:
    raise UserError(f"gaussian_blur: sigma must be positive, got {sigma}.")
  taps = gaussian_kernel(float(sigma))
  radius = (int(taps.shape[0]) - 1) // 2

  def fn(image, seed):
    x = _to_float(image)
    c = tf.shape(x)[-1]
    rows = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, c, 1])
    cols = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, c, 1])

    def blur(z):
      z = tf.pad(z[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]])
      z = tf.nn.depthwise_conv2d(z, rows, [1, 1, 1, 1], "VALID")
      return tf.nn.depthwise_conv2d(z, cols, [1, 1, 1, 1], "VALID")[0]
    return _like(blur(x) / blur(tf.ones_like(x)), image.dtype)
  return _image_op(fn, key)


@register("rotate")
def rotate(degrees: float, fill: float = 0, key: str = "image") -> Op:
  """Rotates counter-clockwise by `degrees` about the centre (bilinear; corners filled with `fill`)."""
  theta = math.radians(float(degrees))
  cos, sin = math.cos(theta), math.sin(theta)

  def fn(image, seed):
    h = tf.cast(tf.shape(image)[0], tf.float32) - 1
    w = tf.cast(tf.shape(image)[1], tf.float32) - 1
    # Output pixel (x, y) samples input (cos x - sin y + dx, sin x + cos y + dy): y points down.
    dx = (w - (cos * w - sin * h)) / 2
    dy = (h - (sin * w + cos * h)) / 2
    transform = tf.stack([cos, -sin, dx, sin, cos, dy, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=_to_float(image)[None], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=tf.constant(float(fill)), interpolation="BILINEAR", fill_mode="CONSTANT")
    return _like(tf.ensure_shape(out[0], image.shape), image.dtype)
  return _image_op(fn, key)


@register("gaussian_noise")
def gaussian_noise(std: float, clip=(0, 255), key: str = "image") -> Op:
  """Adds Gaussian noise of `std` pixel units drawn from the example's seed, clipped to `clip` (None: not)."""
  if std < 0:
    raise UserError(f"gaussian_noise: std must be non-negative, got {std}.")
  if clip is not None and (len(clip) != 2 or clip[0] >= clip[1]):
    raise UserError(f"gaussian_noise: clip must be (low, high) with low < high or None, got {clip!r}.")

  def fn(image, seed):
    out = _to_float(image) + tf.random.stateless_normal(tf.shape(image), seed=seed, stddev=float(std))
    if clip is not None:
      out = tf.clip_by_value(out, float(clip[0]), float(clip[1]))
    return _like(out, image.dtype)
  return _image_op(fn, key)


def _check_size(name: str, k: int) -> int:
  if not isinstance(k, int) or k < 1:
    raise UserError(f"{name}: the window must be a positive integer number of pixels, got {k!r}.")
  return k


@register("thicken")
def thicken(k: int = 2, key: str = "image") -> Op:
  """Grey dilation with a k x k square: bright strokes on a dark background get thicker."""
  k = _check_size("thicken", k)

  def fn(image, seed):
    out = tf.nn.max_pool2d(_to_float(image)[None], k, 1, "SAME")
    return _like(out[0], image.dtype)
  return _image_op(fn, key)


@register("thin")
def thin(k: int = 2, key: str = "image") -> Op:
  """Grey erosion with a k x k square: bright strokes on a dark background get thinner."""
  k = _check_size("thin", k)

  def fn(image, seed):
    out = -tf.nn.max_pool2d(-_to_float(image)[None], k, 1, "SAME")
    return _like(out[0], image.dtype)
  return _image_op(fn, key)


@register("occlude")
def occlude(size: int, value: float = 0, key: str = "image") -> Op:
  """Paints a `size` x `size` square of `value` at a position drawn from the example's seed."""
  size = _check_size("occlude", size)

  def fn(image, seed):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ph, pw = tf.minimum(size, h), tf.minimum(size, w)
    u = tf.random.stateless_uniform([2], seed)
    top = tf.cast(u[0] * tf.cast(h - ph + 1, tf.float32), tf.int32)
    left = tf.cast(u[1] * tf.cast(w - pw + 1, tf.float32), tf.int32)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    inside = (rows >= top) & (rows < top + ph) & (cols >= left) & (cols < left + pw)
    return _like(tf.where(inside, float(value), _to_float(image)), image.dtype)
  return _image_op(fn, key)


@register("pixelate")
def pixelate(factor: int, key: str = "image") -> Op:
  """Averages `factor` x `factor` blocks and scales back up (nearest): coarse pixels, same size."""
  factor = _check_size("pixelate", factor)

  def fn(image, seed):
    size = tf.shape(image)[:2]
    small = tf.image.resize(_to_float(image), tf.maximum(size // factor, 1), method="area")
    return _like(tf.image.resize(small, size, method="nearest"), image.dtype)
  return _image_op(fn, key)
