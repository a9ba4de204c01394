"""A small CLIP on the bundled digits captions; runs on a laptop CPU in a few minutes.

    make train EXP=clip_ti_digits
    bigvis train --config experiments/clip_ti_digits.py --workdir runs/clip_ti_digits
    make train EXP=clip_ti_digits:tokenizer=/data/digits_tok.model   # your own SentencePiece model

The argument `tokenizer=PATH` replaces the bundled tokenizer in training and in every eval
(a model with more than 128 pieces needs --set model.text.vocab_size=N too).

Trains on the 1,497 train digits, each captioned with 8 templates ("number 3",
"the digit three written by hand", ...), and evaluates
  zeroshot   the 300 test digits classified with prompts ("an image of a {}.", ...)
             over the names "zero".."nine"; these prompts never occur in training
  retrieval  Recall@k between the 300 test images and their captions
             (identical captions tie: see bigvis/evaluators/retrieval.py)
and, with `bigvis eval --workdir W` after training (the `reports` section; not run while training),
  linear_probe  logistic regression on frozen image embeddings, 1..16 shots per class and all
                1,497 train digits, against the zero-shot line
  robustness    zero-shot on the test digits and shifted copies made by pp ops
                (data_pipelines/shifts.py): inverted, blurred, rotated, noisy, thick, occluded, pixelated
  bias_audit    a demonstration of the method, not an audit of anything real: three groups of test
                digits (as drawn, strokes dilated, inverted) classified over the digit names + made-up
                flagged labels that describe looks instead of identity ('thick eight', ...), then with
                'a bold one' added (the CLIP paper's 'child' experiment)
"""
import ml_collections

from bigvis.config import base_config
from bigvis.errors import UserError
from bigvis.models import model_config
from bigvis.optim import EMBEDDING_OFFSETS
from data_pipelines.sources import data_config
from data_pipelines.digits import ZEROSHOT_CLASSNAMES, ZEROSHOT_TEMPLATES

CONTEXT = 16
BUNDLED_TOKENIZER = "bundled:digits"


def tokenizer_arg(arg: str | None) -> str:
  """'tokenizer=/a.model' -> '/a.model'; no argument -> the bundled digits tokenizer."""
  if not arg:
    return BUNDLED_TOKENIZER
  key, sep, value = arg.partition("=")
  if key.strip() != "tokenizer" or not sep or not value.strip():
    raise UserError(f"experiment argument '{arg}' is not tokenizer=PATH, the only one clip_ti_digits takes.")
  return value.strip()


def get_config(arg=None):
  tok = tokenizer_arg(arg)
  c = base_config()
  c.experiment = "clip_ti_digits"
  c.total_steps = 500
  c.batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 250
  c.model = model_config(
      "clip", embed_dim=128, temperature_init=1 / 0.07,
      image=dict(variant="mu/4", image_size=16, pool_type="gap", posemb="learn", dtype="float32"),
      # The digits tokenizer has under 100 pieces; 128 leaves room.
      text=dict(variant="mu", vocab_size=128, context_length=CONTEXT, dtype="float32"))
  c.objective = ml_collections.ConfigDict(dict(name="clip"))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.optim.no_decay = EMBEDDING_OFFSETS  # as in the full-size experiments
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.data.train = data_config(
      source="digits_captions", split="train", shuffle_buffer=12000, cache=True,
      pp=f"decode|resize(18)|random_crop(16)|value_range(-1,1)|tokenize({CONTEXT}, model='{tok}')")
  c.evals.zeroshot = ml_collections.ConfigDict(dict(
      type="zeroshot", batch_size=304, class_names=list(ZEROSHOT_CLASSNAMES), prompts=list(ZEROSHOT_TEMPLATES),
      tokenizer=tok, context_length=CONTEXT,
      data=data_config(source="digits", split="test", pp="decode|resize(16)|value_range(-1,1)")))
  c.evals.retrieval = ml_collections.ConfigDict(dict(
      type="retrieval", batch_size=304,
      data=data_config(source="digits_captions", split="test",
                pp=f"decode|resize(16)|value_range(-1,1)|tokenize({CONTEXT}, model='{tok}')")))

  # `bigvis eval` reports. Class names, prompts and the tokenizer come from evals.zeroshot.
  def test(shift=""):
    return data_config(source="digits", split="test", pp=f"decode|resize(16)|{shift + '|' if shift else ''}value_range(-1,1)")
  c.reports = ml_collections.ConfigDict()
  c.reports.linear_probe = ml_collections.ConfigDict(dict(
      type="linear_probe", batch_size=304, shots=[1, 2, 4, 8, 16], seeds=3, val_fraction=0.2,
      train_data=data_config(source="digits", split="train", pp="decode|resize(16)|value_range(-1,1)")))
  c.reports.robustness = ml_collections.ConfigDict(dict(
      type="robustness", batch_size=304, reference="clean",
      sets=dict(clean=test(), inverted=test("invert"), blurred=test("gaussian_blur(1.0)"),
                rotated=test("rotate(30)"), noisy=test("gaussian_noise(64)"), thick=test("thicken(3)"),
                occluded=test("occlude(6)"), pixelated=test("pixelate(4)"))))
  c.reports.bias_audit = ml_collections.ConfigDict(dict(
      type="bias_audit", batch_size=304,
      groups=dict(as_drawn=test(), thick=test("thicken(3)"), inverted=test("invert")),
      flagged=["thick eight", "bold eight", "fat zero"], added=["a bold one"]))
  return c
