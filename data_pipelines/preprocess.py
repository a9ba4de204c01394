"""Preprocessing ops chosen by strings such as `"decode|resize(32)|flip_lr|value_range(-1,1)"`.

Each op name maps through a registry to a factory; the factory's arguments come
from the parenthesised Python literals in the string. A built op is a function
`(features: dict, seed: tf.Tensor) -> dict`. Random ops take their randomness
from the per-example `seed` (derived from the run seed and the example's global
index), so an example is preprocessed identically however the pipeline is
parallelised, and a resumed run sees exactly the same augmentations.
"""
from __future__ import annotations

import ast
import difflib
from typing import Any, Callable

import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines import native_ops

Op = Callable[[dict, tf.Tensor], dict]
_REGISTRY: dict[str, Callable[..., Op]] = {}

# Channel statistics users ask for by name in `normalize(...)`.
CHANNEL_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Decorator adding an op factory to the registry under `name`."""
  def wrap(factory):
    _REGISTRY[name] = factory
    return factory
  return wrap


def registered_ops() -> list[str]:
  return sorted(_REGISTRY)


def parse_op(text: str) -> tuple[str, tuple, dict]:
  """'name(args)' -> (name, args, kwargs), the arguments as Python literals; else a one-line error."""
  text = text.strip()
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    raise UserError(f"preprocessing op '{text}' is not of the form name or name(args).")
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    try:
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise UserError(f"preprocessing op '{text}' has arguments that are not literals.")
    return node.func.id, args, kwargs
  raise UserError(f"preprocessing op '{text}' is not of the form name or name(args).")


def build(spec: str) -> Op:
  """Parses a `|`-separated op string into one function (features, seed) -> features."""
  ops = []
  for part in filter(None, (p.strip() for p in spec.split("|"))):
    name, args, kwargs = parse_op(part)
    if name not in _REGISTRY:
      match = difflib.get_close_matches(name, registered_ops(), n=1)
      raise UserError(f"unknown preprocessing op '{name}' in '{spec}'"
                      + (f"; did you mean '{match[0]}'?" if match else "."))
    try:
      ops.append(_REGISTRY[name](*args, **kwargs))
    except (TypeError, ValueError) as e:  # a missing argument, or rotate('x')'s float('x')
      raise UserError(f"preprocessing op '{part}' got bad arguments: {e}.")

  def apply(features: dict, seed: tf.Tensor) -> dict:
    features = dict(features)
    for i, op in enumerate(ops):
      # One independent stream per op position; fold_in keeps it stateless.
      op_seed = tf.random.experimental.stateless_fold_in(seed, i)
      features = op(features, op_seed)
    return features

  return apply


def _image_op(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], key: str = "image") -> Op:
  def op(features, seed):
    features[key] = fn(features[key], seed)
    return features
  return op


def _as_size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _decode_image(data: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, channels] (alpha dropped, 16-bit scaled)."""
  image = tf.io.decode_image(data, channels=channels, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, channels])
  return image


@register("decode")
def decode(channels: int = 3, key: str = "image") -> Op:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, channels] (alpha dropped, 16-bit scaled)."""
  return _image_op(lambda data, seed: _decode_image(data, channels), key)


def _resize_like(image: tf.Tensor, size: tuple, method: str = "bilinear", antialias: bool = True) -> tf.Tensor:
  """Resizes to float32 (values kept in the input's range; no round trip through uint8).

  The antialiasing kernel is only needed when shrinking; when enlarging it
  gives the same pixels at several times the cost, so it is skipped.
  `antialias=False` skips it when shrinking too (big_vision's choice: faster, aliases).
  Bilinear resizes of single images go through bigvis's native op where it could be built
  (`native_ops`): the same values to float precision, several times faster on the host.
  """
  native = native_ops.image_ops() if method == "bilinear" else None
  if native is not None and image.shape.rank == 3 and image.dtype in (tf.uint8, tf.float32):
    # Its kernel widens only along an axis that shrinks, which is the choice made below.
    return native.bigvis_resize(image, tf.cast(tf.stack(size), tf.int32), antialias=antialias)
  if not antialias:
    return tf.image.resize(image, size, method=method, antialias=False)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  shrinking = tf.logical_or(size[0] < h, size[1] < w)
  return tf.cond(shrinking,
                 lambda: tf.image.resize(image, size, method=method, antialias=True),
                 lambda: tf.image.resize(image, size, method=method, antialias=False))


@register("resize")
def resize(size, method: str = "bilinear", key: str = "image") -> Op:
  """Resizes to a fixed `size` (int or (h, w)), ignoring the aspect ratio."""
  size = _as_size(size)
  return _image_op(lambda im, seed: _resize_like(im, size, method), key)


@register("resize_small")
def resize_small(smaller_size: int, method: str = "bilinear", key: str = "image") -> Op:
  """Resizes so the shorter side is `smaller_size`, keeping the aspect ratio."""
  def fn(image, seed):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    return _resize_like(image, (new_h, new_w), method)
  return _image_op(fn, key)


@register("central_crop")
def central_crop(size, key: str = "image") -> Op:
  """Crops the centre `size` (int or (h, w)) region."""
  ch, cw = _as_size(size)
  def fn(image, seed):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - ch) // 2, (w - cw) // 2
    return tf.image.crop_to_bounding_box(image, top, left, ch, cw)
  return _image_op(fn, key)


@register("random_crop")
def random_crop(size, key: str = "image") -> Op:
  """Crops a random `size` region (pads nothing: the image must be large enough)."""
  ch, cw = _as_size(size)
  def fn(image, seed):
    c = image.shape[-1] or tf.shape(image)[-1]
    return tf.image.stateless_random_crop(image, (ch, cw, c), seed=seed)
  return _image_op(fn, key)


def _inception_window(shape: tf.Tensor, seed: tf.Tensor, area_min: float, area_max: float) -> tuple:
  """(begin, size) of a random crop of `area_min`-`area_max` % of an image of `shape`, 3/4-4/3 aspect."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(area_min / 100, area_max / 100),
      min_object_covered=0, use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def _inception_crop(image: tf.Tensor, seed: tf.Tensor, area_min: float, area_max: float) -> tf.Tensor:
  crop = tf.slice(image, *_inception_window(tf.shape(image), seed, area_min, area_max))
  crop.set_shape([None, None, image.shape[-1]])
  return crop


@register("inception_crop")
def inception_crop(size=None, area_min: float = 5, area_max: float = 100,
                   method: str = "bilinear", key: str = "image") -> Op:
  """Random crop of 5%-100% of the area and 3/4-4/3 aspect (Szegedy et al.), then resize."""
  def fn(image, seed):
    crop = _inception_crop(image, seed, area_min, area_max)
    return _resize_like(crop, _as_size(size), method) if size else crop
  return _image_op(fn, key)


@register("decode_jpeg_and_inception_crop")
def decode_jpeg_and_inception_crop(size=None, area_min: float = 5, area_max: float = 100,
                                   method: str = "bilinear", antialias: bool = True, key: str = "image") -> Op:
  """Decodes only the cropped window of a JPEG: the fast path of decode|inception_crop. Other formats
  the shards hold (PNG, GIF, BMP; the reader accepts them) take that slow path, the same crop."""
  def jpeg(data, seed):
    begin, crop_size = _inception_window(tf.image.extract_jpeg_shape(data), seed, area_min, area_max)
    return tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]),
                                         channels=3)

  def fn(data, seed):
    crop = tf.cond(tf.io.is_jpeg(data), lambda: jpeg(data, seed),
                   lambda: _inception_crop(_decode_image(data), seed, area_min, area_max))
    crop.set_shape([None, None, 3])
    return _resize_like(crop, _as_size(size), method, antialias) if size else crop
  return _image_op(fn, key)


@register("flip_lr")
def flip_lr(key: str = "image") -> Op:
  """Mirrors the image left-right with probability 1/2."""
  return _image_op(lambda im, seed: tf.image.stateless_random_flip_left_right(im, seed), key)


@register("value_range")
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255,
                clip: bool = False, key: str = "image") -> Op:
  """Maps pixel values linearly from [in_min, in_max] to float32 [vmin, vmax]."""
  def fn(image, seed):
    image = tf.cast(image, tf.float32)
    image = (image - in_min) / (in_max - in_min)
    image = vmin + image * (vmax - vmin)
    return tf.clip_by_value(image, vmin, vmax) if clip else image
  return _image_op(fn, key)


@register("normalize")
def normalize(mean="imagenet", std=None, key: str = "image") -> Op:
  """Scales to [0, 1] then standardises per channel (`"imagenet"`, `"clip"` or numbers)."""
  if isinstance(mean, str):
    if mean not in CHANNEL_STATS:
      raise UserError(f"normalize: unknown statistics '{mean}'; use one of {sorted(CHANNEL_STATS)}.")
    mean, std = CHANNEL_STATS[mean]
  if std is None:
    raise UserError("normalize: give std together with a numeric mean.")
  mean, std = (list(v) if isinstance(v, (list, tuple)) else [v] for v in (mean, std))
  if len(mean) != len(std):
    raise UserError(f"normalize: mean has {len(mean)} values and std {len(std)}; give one per channel, "
                    "or one for all.")
  # (x / 255 - mean) / std as one multiply-add.
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  shift = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)

  def fn(image, seed):
    if image.shape[-1] != len(std):  # one value for every channel (or channels unknown): broadcast
      return tf.cast(image, tf.float32) * scale + shift
    # Per channel over [H, W*C] rows rather than broadcasting a [C] vector: TensorFlow's CPU
    # kernels broadcast an innermost dim of 3 slowly (0.72 vs 0.24 ms for a 224^2 image,
    # single-threaded); the arithmetic, and so every output value, is the same.
    shape = tf.shape(image)
    rows = tf.reshape(tf.cast(image, tf.float32), [shape[0], shape[1] * shape[2]])
    rows = rows * tf.tile(scale, [shape[1]]) + tf.tile(shift, [shape[1]])
    return tf.reshape(rows, shape)
  return _image_op(fn, key)


@register("grayscale_to_rgb")
def grayscale_to_rgb(key: str = "image") -> Op:
  """Repeats a single channel three times."""
  return _image_op(lambda im, seed: tf.image.grayscale_to_rgb(im) if im.shape[-1] == 1 else im, key)


@register("invert")
def invert(key: str = "image") -> Op:
  """255 - pixel: white-on-black becomes black-on-white (uint8 or float images in [0, 255])."""
  return _image_op(lambda im, seed: tf.cast(255, im.dtype) - im, key)


@register("onehot")
def onehot(depth: int, key: str = "label", key_result: str = "labels",
           on: float = 1.0, off: float = 0.0) -> Op:
  """Integer label -> float32 one-hot vector of length `depth` (multi-label ids are summed; -1 pads a
  list of them). A label outside [0, depth) stops the pipeline with a message naming it: tf.one_hot
  would make it an all-zero target, a loss of 0 and class 0 in accuracy (a missing label reads -1,
  a dataset with more classes than `depth` overflows)."""
  def op(features, seed):
    label = tf.cast(features[key], tf.int32)
    checks = [tf.debugging.assert_less(label, depth, message=f"onehot({depth}): a '{key}' is {depth} or more")]
    if label.shape.rank == 0:
      checks.append(tf.debugging.assert_non_negative(label, message=f"onehot({depth}): a '{key}' is negative "
                                                                    "(missing)"))
    with tf.control_dependencies(checks):
      label = tf.identity(label)
    vec = tf.one_hot(label, depth, on_value=on, off_value=off, dtype=tf.float32)
    if vec.shape.rank == 2:
      vec = tf.reduce_max(vec, axis=0)
    features[key_result] = vec
    return features
  return op


@register("keep")
def keep(*keys: str) -> Op:
  """Drops every feature not named."""
  def op(features, seed):
    missing = [k for k in keys if k not in features]
    if missing:
      raise UserError(f"keep: features {missing} do not exist; have {sorted(features)}.")
    return {k: features[k] for k in keys}
  return op


@register("copy")
def copy(inkey: str, outkey: str) -> Op:
  """Copies feature `inkey` to `outkey`."""
  def op(features, seed):
    features[outkey] = features[inkey]
    return features
  return op


@register("rename")
def rename(**mapping: str) -> Op:
  """rename(new=old, ...): renames features."""
  def op(features, seed):
    for new, old in mapping.items():
      features[new] = features.pop(old)
    return features
  return op


def describe() -> dict[str, Any]:
  """Op name -> first docstring line, for `bigvis data ops`."""
  return {k: (v.__doc__ or "").strip().splitlines()[0] for k, v in sorted(_REGISTRY.items())}
