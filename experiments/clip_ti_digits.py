"""A small CLIP on the bundled digits captions; runs on a laptop CPU in a few minutes.

    make train EXP=clip_ti_digits
    bigvis train --config experiments/clip_ti_digits.py --workdir runs/clip_ti_digits

Trains on the 1,497 train digits, each captioned with 8 templates ("number 3",
"the digit three written by hand", ...), and evaluates
  zeroshot   the 300 test digits classified with prompts ("an image of a {}.", ...)
             over the names "zero".."nine"; these prompts never occur in training
  retrieval  Recall@k between the 300 test images and their captions
             (identical captions tie: see bigvis/evaluators/retrieval.py)
"""
import ml_collections

from bigvis.config import base_config
from data_pipelines.digits import ZEROSHOT_CLASSNAMES, ZEROSHOT_TEMPLATES

CONTEXT = 16
TOKENIZER = "bundled:digits"


def get_config(arg=None):
  c = base_config()
  c.experiment = "clip_ti_digits"
  c.total_steps = 500
  c.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 250
  c.model = ml_collections.ConfigDict(dict(
      name="clip", embed_dim=128, temperature_init=1 / 0.07,
      image=dict(variant="mu/4", image_size=16, pool_type="gap", posemb="learn", dtype="float32"),
      # The digits tokenizer has under 100 pieces; 128 leaves room.
      text=dict(variant="mu", vocab_size=128, context_length=CONTEXT, dtype="float32")))
  c.objective = ml_collections.ConfigDict(dict(name="clip"))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.data.train = ml_collections.ConfigDict(dict(
      source="digits_captions", split="train", shuffle_buffer=12000, cache=True,
      pp=f"decode|resize(18)|random_crop(16)|value_range(-1,1)|tokenize({CONTEXT}, model='{TOKENIZER}')"))
  c.evals.zeroshot = ml_collections.ConfigDict(dict(
      type="zeroshot", batch_size=304, class_names=list(ZEROSHOT_CLASSNAMES), prompts=list(ZEROSHOT_TEMPLATES),
      tokenizer=TOKENIZER, context_length=CONTEXT,
      data=dict(source="digits", split="test", pp="decode|resize(16)|value_range(-1,1)")))
  c.evals.retrieval = ml_collections.ConfigDict(dict(
      type="retrieval", batch_size=304,
      data=dict(source="digits_captions", split="test",
                pp=f"decode|resize(16)|value_range(-1,1)|tokenize({CONTEXT}, model='{TOKENIZER}')")))
  return c
