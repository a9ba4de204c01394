"""ViT-B/16 trained from scratch on ImageNet-1k (TFDS `imagenet2012`), the ViT paper's setting.

Batch 4096, Adam(0.9, 0.999), lr 3e-3 with 10k warmup steps and cosine decay,
weight decay 0.1 (decoupled), 300 epochs, class-token pooling, bf16 compute.
    make train EXP=vit_b16_i1k ARGS="--set data.train.data_dir=/data/tfds"
The argument `res=N` trains and evaluates at N px instead (fine-tuning at 384, README):
    make train EXP=vit_b16_i1k:res=384 ARGS="--set init.workdir=… --set init.skip='^head/'"
"""
import ml_collections

from bigvis.config import base_config
from bigvis.errors import UserError
from bigvis.models import model_config
from bigvis.optim import EMBEDDING_OFFSETS
from data_pipelines.sources import data_config

IMAGES_PER_EPOCH = 1_281_167


def resolution(arg: str | None) -> int:
  """'res=384' -> 384; no argument -> 224."""
  if not arg:
    return 224
  key, _, value = arg.partition("=")
  if key.strip() != "res" or not value.strip().isdigit() or int(value) < 16:
    raise UserError(f"experiment argument '{arg}' is not res=N (pixels, e.g. res=384), the only one "
                    "vit_b16_i1k takes.")
  return int(value)


def get_config(arg=None):
  res = resolution(arg)
  c = base_config()
  c.experiment = "vit_b16_i1k"
  c.batch_size = 4096
  c.total_steps = 300 * IMAGES_PER_EPOCH // c.batch_size
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.model = model_config(
      "vit", variant="B/16", num_classes=1000, image_size=res, pool_type="tok", posemb="learn",
      dropout=0.0, dtype="bfloat16", remat_policy="none", scan=False, attention_impl="auto")
  c.objective = ml_collections.ConfigDict(dict(name="classification", loss="softmax", label_smoothing=0.1))
  # Decayed: kernels and the head; not the class token or position embeddings (optim.EMBEDDING_OFFSETS),
  # nor biases and gains (optim.NEVER_DECAYED), as in big_vision and timm.
  c.optim.update(dict(lr=3e-3, b1=0.9, b2=0.999, weight_decay=0.1, warmup_steps=10_000, grad_clip_norm=1.0,
                      no_decay=EMBEDDING_OFFSETS))
  c.data.train = data_config(
      source="tfds", name="imagenet2012", split="train[:99%]", data_dir="", shuffle_buffer=250_000,
      pp=f"decode_jpeg_and_inception_crop({res})|flip_lr|value_range(-1,1)|onehot(1000)|keep('image','labels')")
  c.evals.val = ml_collections.ConfigDict(dict(
      type="classification", batch_size=1024,
      data=data_config(source="tfds", name="imagenet2012", split="train[99%:]", data_dir="",
                pp=f"decode|resize_small({res * 8 // 7})|central_crop({res})|value_range(-1,1)|onehot(1000)|keep('image','labels')")))
  c.evals.test = ml_collections.ConfigDict(dict(
      type="classification", batch_size=1024,
      data=data_config(source="tfds", name="imagenet2012", split="validation", data_dir="",
                pp=f"decode|resize_small({res * 8 // 7})|central_crop({res})|value_range(-1,1)|onehot(1000)|keep('image','labels')")))
  return c
