"""A small ViT on the bundled digits (scikit-learn's 1,797 handwritten digits); runs on a laptop CPU.

    make train                      # this is the default experiment
    bigvis train --config experiments/vit_ti_digits.py --workdir runs/digits
"""
import ml_collections

from bigvis.config import base_config
from bigvis.models import model_config
from bigvis.optim import EMBEDDING_OFFSETS
from data_pipelines.sources import data_config


def get_config(arg=None):
  c = base_config()
  c.experiment = "vit_ti_digits"
  c.total_steps = 600
  c.batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.model = model_config(
      "vit", variant="mu/4", num_classes=10, image_size=16, pool_type="gap", posemb="learn",
      dropout=0.0, dtype="float32", remat_policy="none", scan=False)
  c.objective = ml_collections.ConfigDict(dict(name="classification", loss="softmax", label_smoothing=0.0))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  c.optim.no_decay = EMBEDDING_OFFSETS  # as in the full-size experiments
  c.data.train = data_config(
      source="digits", split="train", shuffle_buffer=2000, cache=True,
      pp="decode|resize(18)|random_crop(16)|value_range(-1,1)|onehot(10)")
  c.evals.test = ml_collections.ConfigDict(dict(
      type="classification", batch_size=304,
      data=data_config(source="digits", split="test", pp="decode|resize(16)|value_range(-1,1)|onehot(10)")))
  return c
