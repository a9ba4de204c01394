"""ViT-L/16 pre-trained on ImageNet-21k (TFDS `imagenet21k`), the ViT paper's recipe.

Batch 4096, Adam(0.9, 0.999), lr 1e-3, 10k warmup, linear decay, weight decay
0.03, 90 epochs, sigmoid cross-entropy (i21k is multi-label), a 1024-wide
pre-logits layer, bf16 compute. Data parallel by default; on pods add
`--set mesh.fsdp=4` (or 8) to shard parameters and Adam state.
"""
import ml_collections

from bigvis.config import base_config
from bigvis.models import model_config
from bigvis.optim import EMBEDDING_OFFSETS
from data_pipelines.sources import data_config

IMAGES_PER_EPOCH = 13_000_000
NUM_CLASSES = 21843


def get_config(arg=None):
  c = base_config()
  c.experiment = "vit_l16_i21k"
  c.batch_size = 4096
  c.total_steps = 90 * IMAGES_PER_EPOCH // c.batch_size
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  c.mesh.data, c.mesh.fsdp = -1, 1   # on pods: --set mesh.fsdp=4 (or 8) shards params + Adam state
  c.model = model_config(
      "vit", variant="L/16", num_classes=NUM_CLASSES, image_size=224, pool_type="tok", posemb="learn",
      representation_size=1024, dropout=0.1, dtype="bfloat16", remat_policy="dots_no_batch", scan=True)
  c.objective = ml_collections.ConfigDict(dict(name="classification", loss="sigmoid", label_smoothing=0.0))
  # Decayed: kernels and the head; not the class token or position embeddings (optim.EMBEDDING_OFFSETS),
  # nor biases and gains (optim.NEVER_DECAYED), as in big_vision and timm.
  c.optim.update(dict(lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.03, warmup_steps=10_000, schedule="linear",
                      grad_clip_norm=1.0, no_decay=EMBEDDING_OFFSETS))
  c.data.train = data_config(
      source="tfds", name="imagenet21k", split="full[51200:]", data_dir="", shuffle_buffer=250_000,
      pp=f"decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1,1)|onehot({NUM_CLASSES})"
         "|keep('image','labels')")
  c.evals.val = ml_collections.ConfigDict(dict(
      type="classification", batch_size=1024,
      data=data_config(source="tfds", name="imagenet21k", split="full[:51200]", data_dir="",
                pp=f"decode|resize_small(256)|central_crop(224)|value_range(-1,1)|onehot({NUM_CLASSES})"
                   "|keep('image','labels')")))
  return c
