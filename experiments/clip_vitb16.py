"""CLIP ViT-B/16 (Radford et al., 2021): 149.6M parameters (image 86.2M, text 63.4M), embed 512.

The paper's recipe: global batch 32,768, AdamW(0.9, 0.98, eps 1e-6), weight
decay 0.2, 2,000 warmup steps then cosine decay, 32 epochs of 400M pairs,
learned temperature initialised to 0.07 and clipped at 100, bf16 compute, the
image tower with CLIP's `ln_pre` and a bias-free patch embedding.

    bigvis train --config experiments/clip_vitb16.py:tokenizer=/data/sp.model \\
        --set data.train.shards='/data/pairs/data-*.tfrecord' --workdir runs/clip_b16

The `:arg` is comma-separated key=value pairs:
  tokenizer=PATH    the SentencePiece model captions are tokenized with (e.g. from
                    `bigvis data train-tokenizer`); the paper used a 49,408-token BPE
  imagenet=DIR      adds the zero-shot ImageNet eval `zeroshot` (TFDS imagenet2012
                    `validation` prepared in DIR); needs classnames=
  classnames=FILE   the 1,000 class names, one per line in TFDS label order
  retrieval=GLOB    adds the eval `retrieval` (Recall@1/5/10) on image-caption shards
The evals are off unless asked for, because their data is rarely on the machine
and a missing dataset must not end a long run at its first evaluation. The
zero-shot eval uses 7 prompt templates (the subset of the paper's 80 that its
authors found to ensemble best), not all 80: 80 x 1,000 prompts cost more than
the image pass.

Smoke test on any machine: `--set batch_size=8 --set total_steps=2 --set data.train.source=synthetic`.
"""
import ml_collections

from bigvis.config import base_config
from bigvis.models import model_config
from bigvis.optim import EMBEDDING_OFFSETS
from data_pipelines.sources import data_config
from bigvis.errors import UserError

PAIRS_SEEN = 32 * 400_000_000          # 32 epochs over WIT-400M
BATCH = 32_768
CONTEXT = 77
VOCAB = 49_408
# The 7 of CLIP's 80 ImageNet templates that ensemble best (openai/CLIP prompt-engineering notebook).
TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
             "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
ARG_KEYS = ("tokenizer", "imagenet", "classnames", "retrieval")
# Reads as the culprit when a run reaches tokenization without `:tokenizer=`.
NO_TOKENIZER = "<unset: pass --config experiments/clip_*.py:tokenizer=/path/to/sentencepiece.model>"


def parse_arg(arg: str | None) -> dict:
  """'tokenizer=/a.model,imagenet=/tfds' -> {'tokenizer': '/a.model', 'imagenet': '/tfds'}."""
  out = {}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in ARG_KEYS:
      raise UserError(f"experiment argument '{item}' is not key=value with key one of {', '.join(ARG_KEYS)}.")
    out[key] = value
  if "imagenet" in out and not out.get("classnames"):
    raise UserError("experiment argument imagenet= needs classnames=FILE (one ImageNet class name per line).")
  return out


def clip_paper_config(name: str, *, image: str, text: str, embed_dim: int, lr: float, arg: str | None,
                      remat_policy: str = "none", scan: bool = False) -> ml_collections.ConfigDict:
  """The CLIP paper's training setup around towers `image` (e.g. "B/16") and `text` (e.g. "B")."""
  opts = parse_arg(arg)
  tok = opts.get("tokenizer") or NO_TOKENIZER
  c = base_config()
  c.experiment = name
  c.batch_size = BATCH
  c.total_steps = PAIRS_SEEN // BATCH
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  # Pure data parallelism fits B/16 in accelerator memory; for L/14 and H/14 on pods shard parameters
  # and Adam state over a `fsdp` axis (ZeRO-3: the `embed` axis of every weight), e.g.
  # --set mesh.data=-1 --set mesh.fsdp=8. The contrastive loss still sees the whole global batch.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.model = model_config(
      "clip", embed_dim=embed_dim, temperature_init=1 / 0.07,
      image=dict(variant=image, image_size=224, pool_type="tok", posemb="learn", pre_norm=True,
                 conv_bias=False, dtype="bfloat16", attention_impl="auto", remat_policy=remat_policy, scan=scan),
      text=dict(variant=text, vocab_size=VOCAB, context_length=CONTEXT, dtype="bfloat16",
                attention_impl="auto", remat_policy=remat_policy, scan=scan))
  c.objective = ml_collections.ConfigDict(dict(name="clip"))
  # optim.decay_mask never decays gains, the temperature (1-D) or biases (any shape). The class token
  # and position embeddings are additive offsets rather than weights (CLIP's own class embedding is
  # 1-D, hence undecayed), so they are excluded too; token embeddings and kernels are decayed.
  c.optim.update(dict(name="adamw", lr=lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, schedule="cosine",
                      warmup_steps=2000, min_lr_ratio=0.0, grad_clip_norm=1.0,  # clipping: a cheap guard
                      no_decay=EMBEDDING_OFFSETS))
  c.data.train = data_config(
      source="shards", shards="", shuffle_buffer=250_000,
      # The one augmentation, as open_clip trains (RandomResizedCrop, scale 0.9-1): 90-100 % of the
      # area at 3/4-4/3 aspect, resized to 224; the paper describes a random square crop.
      pp=f"decode_jpeg_and_inception_crop(224, area_min=90)|normalize('clip')"
         f"|tokenize({CONTEXT}, model='{tok}')|keep('image', 'labels')")
  eval_pp = "decode|resize_small(224, method='bicubic')|central_crop(224)|normalize('clip')"
  if "imagenet" in opts:
    c.evals.zeroshot = ml_collections.ConfigDict(dict(
        type="zeroshot", batch_size=1024, class_names=opts["classnames"], prompts=list(TEMPLATES),
        tokenizer=tok, context_length=CONTEXT,
        data=data_config(source="tfds", name="imagenet2012", split="validation", data_dir=opts["imagenet"],
                  pp=eval_pp + "|keep('image', 'label')")))
  if "retrieval" in opts:
    c.evals.retrieval = ml_collections.ConfigDict(dict(
        type="retrieval", batch_size=1024,
        data=data_config(source="shards", shards=opts["retrieval"],
                  pp=eval_pp + f"|tokenize({CONTEXT}, model='{tok}')|keep('image', 'labels')")))
  return c


def get_config(arg=None):
  return clip_paper_config("clip_vitb16", image="B/16", text="B", embed_dim=512, lr=5e-4, arg=arg)
