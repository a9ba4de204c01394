"""Using a trained run: its config, model and parameters from a workdir, and image/text embedders.

    config, model, params = load_run("runs/clip_ti_digits")
    embed = load_image_embedder("runs/clip_ti_digits")   # list of uint8 HxWx3 -> [n, dim]

Only the parameters are read from the orbax checkpoint (a partial restore: no
optimizer state is allocated), onto one device, so a run trained on a pod can
be used on a laptop as long as its parameters fit in memory.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigvis.errors import UserError

# Deterministic ops that only reshape or rescale the image; everything else in a pp string
# (decoding, random augmentation, labels, text) does not apply to already-decoded images.
GEOMETRY_OPS = ("resize", "resize_small", "central_crop")
VALUE_OPS = ("value_range", "normalize", "invert", "grayscale_to_rgb")
EMBED_BATCH = 64


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from `workdir/config.json`."""
  import tensorflow as tf
  path = os.path.join(workdir, "config.json")
  if not tf.io.gfile.exists(path):
    raise UserError(f"workdir '{workdir}' has no config.json; is it the --workdir of a bigvis train run?")
  try:
    with tf.io.gfile.GFile(path) as f:
      return ml_collections.ConfigDict(json.loads(f.read()))
  except (json.JSONDecodeError, OSError, tf.errors.OpError) as e:
    raise UserError(f"{path} is not readable JSON ({e}).")


def check_config_matches(workdir: str, config: ml_collections.ConfigDict, step: int | None) -> None:
  """`workdir/config.json` must describe the model and objective its checkpoints hold (the fingerprint
  in each checkpoint's record, whatever kernels either names); else the evals would read the wrong
  model's outputs. Checkpoints written before the fingerprint was recorded are not checked."""
  from bigvis.checkpoint import Checkpointer
  from bigvis.train import model_fingerprint
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), reader=True)
  try:
    steps = ckpt.steps() if step is None else [step]
    meta = ckpt.read_meta(steps[-1]) if steps and steps[-1] in ckpt.steps() else {}
  except Exception:  # a damaged record: the restore reports it
    meta = {}
  finally:
    ckpt.close()
  if meta.get("model_fingerprint") and meta["model_fingerprint"] != model_fingerprint(config):
    raise UserError(f"{os.path.join(workdir, 'config.json')} describes another model or objective than the "
                    f"checkpoint at step {steps[-1]} ('{meta.get('experiment') or '?'}'); it was edited or "
                    "overwritten after training.")


def restore_params(directory: str, abstract: Any, step: int | None) -> tuple[int, Any]:
  """(step, params) from the newest readable (or the given) checkpoint under `directory`."""
  from bigvis.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, reader=True)
  try:
    return ckpt.restore_params(abstract, step)
  finally:
    ckpt.close()


def load_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """(config, model, params) of the run in `workdir` at `step` (default: the newest checkpoint)."""
  from bigvis import params as params_lib
  from bigvis.models import build_model, kernels_for_reading
  config = load_config(workdir)
  if "model" not in config:
    raise UserError(f"{os.path.join(workdir, 'config.json')} has no 'model' section.")
  check_config_matches(workdir, config, step)
  model = build_model(kernels_for_reading(config.model))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          params_lib.abstract_params(config.model))
  restored_step, params = restore_params(os.path.join(workdir, "checkpoints"), abstract, step)
  logging.info("restored %s at step %d", workdir, restored_step)
  return config, model, params


def _op_name(part: str) -> str:
  return part.split("(", 1)[0].strip()


def image_pp(config: ml_collections.ConfigDict) -> str:
  """The pp string for already-decoded images, so they are sized and scaled as in the run's evaluation."""
  # The first eval's pp without decode, labels, text or anything random; without evals, a resize to
  # the model's size plus the training pp's value scaling (or [-1, 1] when it names none).
  image_cfg = config.model.image if config.model.name == "clip" else config.model
  size = int(image_cfg.get("image_size", 224))
  eval_pps = [ev.data.pp for ev in (config.get("evals") or {}).values()
              if "data" in ev and ev.data.get("pp")]
  if eval_pps:
    parts = [p.strip() for p in eval_pps[0].split("|") if _op_name(p) in GEOMETRY_OPS + VALUE_OPS]
  else:
    train_pp = config.data.train.get("pp", "") if "data" in config and "train" in config.data else ""
    parts = [f"resize({size})"] + [p.strip() for p in train_pp.split("|") if _op_name(p) in VALUE_OPS]
  if not any(_op_name(p) in ("value_range", "normalize") for p in parts):
    parts.append("value_range(-1, 1)")
  return "|".join(parts)


def _as_rgb_uint8(image: Any, index: int) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint16:  # 16-bit images, scaled as the eval pipeline's decode scales them
    image = np.round(image / 257.0).astype(np.uint8)
  elif image.dtype != np.uint8:
    if image.dtype.kind not in "iu":
      raise UserError(f"image {index} has dtype {image.dtype}; the embedder takes uint8 HxWx3 arrays.")
    if image.size and (image.min() < 0 or image.max() > 255):
      raise UserError(f"image {index} has {image.dtype} values outside 0-255; the embedder takes uint8 "
                      "HxWx3 arrays (or uint16, scaled down).")
    image = image.astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise UserError(f"image {index} has shape {image.shape}; the embedder takes HxWx3 arrays.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def make_preprocessor(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 HxWx3 of any size -> float32 [size, size, 3] as the model saw images in evaluation."""
  import tensorflow as tf
  from data_pipelines import preprocess
  image_cfg = config.model.image if config.model.name == "clip" else config.model
  size = int(image_cfg.get("image_size", 224))
  op = preprocess.build(image_pp(config))

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)], reduce_retracing=True)
  def run(image):
    out = op({"image": image}, tf.constant([0, 0], tf.int64))["image"]
    out = tf.cast(out, tf.float32)
    if out.shape[0] != size or out.shape[1] != size:  # e.g. resize_small without a crop
      out = tf.image.resize(out, (size, size), antialias=True)
    return out

  return lambda image: run(tf.constant(image)).numpy()


def make_image_embedder(config: ml_collections.ConfigDict, model, params,
                        batch_size: int = EMBED_BATCH) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
  """An embedder for a loaded run: CLIP's image-tower embedding, or a ViT's pre-logits, L2-normalised."""
  is_clip = config.model.name == "clip"
  preprocess = make_preprocessor(config)

  @jax.jit
  def embed(p, images):
    if is_clip:
      z, _, _ = model.apply({"params": p}, images, None, train=False)
    else:
      _, aux = model.apply({"params": p}, images, train=False)
      z = aux["pre_logits"].astype(jnp.float32)
    return z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)

  def embedder(images: Sequence[np.ndarray]) -> np.ndarray:
    arrays = [preprocess(_as_rgb_uint8(im, i)) for i, im in enumerate(images)]
    if not arrays:
      raise UserError("no images to embed.")
    return _in_fixed_batches(lambda chunk: embed(params, chunk), arrays, batch_size)

  return embedder


def _in_fixed_batches(fn: Callable[[np.ndarray], Any], rows: Sequence[np.ndarray] | np.ndarray,
                      batch_size: int) -> np.ndarray:
  """fn over `rows` in batches of exactly `batch_size` (the last zero-padded): one compiled shape."""
  out = []
  for lo in range(0, len(rows), batch_size):
    chunk = np.stack(rows[lo:lo + batch_size])
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(out)


def load_image_embedder(workdir: str, step: int | None = None,
                        batch_size: int = EMBED_BATCH) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
  """list of uint8 HxWx3 images (any size) -> L2-normalised float32 embeddings [n, dim], from a run."""
  config, model, params = load_run(workdir, step)
  return make_image_embedder(config, model, params, batch_size)


def make_text_embedder(model, params, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
  """Token ids [n, length] -> a CLIP run's L2-normalised text embeddings [n, dim]."""
  from bigvis.evaluators.zeroshot import text_embedder
  embed = text_embedder(model)

  def embedder(tokens: np.ndarray) -> np.ndarray:
    if not len(tokens):
      return np.zeros((0, 0), np.float32)
    return _in_fixed_batches(
        lambda chunk: embed(params, {"tokens": chunk, "index": np.zeros(len(chunk), np.int32)})["z"],
        np.asarray(tokens), batch_size)

  return embedder


def logit_scale(params) -> float:
  """A CLIP run's learned temperature exp(t), clamped as in training."""
  from bigvis.models.clip import MAX_LOGIT_SCALE
  return float(min(np.exp(float(np.asarray(params["t"]).reshape(-1)[0])), MAX_LOGIT_SCALE))
