"""The bundled "digits" sets: scikit-learn's 1,797 real 8x8 handwritten digits as TFRecord shards.

Built deterministically on first use under `$BIGVIS_DATA_DIR` (default
`~/.cache/bigvis/datasets`, or under `$BIGVIS_CACHE`) so tiny experiments run on a laptop with no download.
Images are 8x8 RGB PNGs, white strokes on black (pixel = value * 255 / 16).
A seed-0 permutation splits them into 1,497 train and 300 test images.

kinds
  classification  train/test with image, label, key
  captions        the same images with text: every train image once per
                  `TRAIN_TEMPLATES` entry, every test image with one caption
Zero-shot prompts (`ZEROSHOT_TEMPLATES` over `ZEROSHOT_CLASSNAMES`) never occur
as training captions. `digits_tokenizer()` is a small SentencePiece model of all
of these texts, also reachable as the tokenizer model `bundled:digits`.
"""
from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np

from bigvis.errors import UserError
from data_pipelines import cache_root

VERSION = "v2"  # bump when images, split, captions, tokenizer settings or shard layout change (v2: record counts)
KINDS = ("classification", "captions")
SPLITS = ("train", "test")
NUM_TRAIN, NUM_TEST = 1497, 300
NUM_SHARDS = {"train": 8, "test": 4}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word} is the class name in letters, {numeral} the digit.
TRAIN_TEMPLATES = (
    "a photo of the number {word}",
    "handwritten {numeral}",
    "the digit {word} written by hand",
    "a scan of a handwritten {word}",
    "number {numeral}",
    "a blurry {numeral} in white on black",
    "a tiny drawing of the digit {numeral}",
    "{word}, handwritten",
)
ZEROSHOT_TEMPLATES = ("an image of a {}.", "a picture showing {}.", "{}, drawn in ink.")
ZEROSHOT_CLASSNAMES = DIGIT_NAMES
TOKENIZER_VOCAB = 200


def data_dir() -> str:
  """Root folder of bundled datasets: $BIGVIS_DATA_DIR, else `datasets` in bigvis's cache."""
  return os.environ.get("BIGVIS_DATA_DIR") or os.path.join(cache_root(), "datasets")


def caption(label: int, template: int) -> str:
  """Training caption `template` (an index into TRAIN_TEMPLATES) for digit `label`."""
  return TRAIN_TEMPLATES[template].format(word=DIGIT_NAMES[label], numeral=label)


def zeroshot_prompts() -> list[str]:
  """Every zero-shot prompt: each template filled with each class name."""
  return [t.format(c) for c in ZEROSHOT_CLASSNAMES for t in ZEROSHOT_TEMPLATES]


def num_examples(kind: str, split: str) -> int:
  """Number of examples in a split of a digits set."""
  _check(kind, split)
  n = NUM_TRAIN if split == "train" else NUM_TEST
  return n * len(TRAIN_TEMPLATES) if (kind, split) == ("captions", "train") else n


def _check(kind: str, split: str | None = None) -> None:
  if kind not in KINDS:
    raise UserError(f"unknown digits kind '{kind}'; use one of {', '.join(KINDS)}.")
  if split is not None and split not in SPLITS:
    raise UserError(f"unknown digits split '{split}'; use one of {', '.join(SPLITS)}.")


def _split_indices() -> dict[str, np.ndarray]:
  order = np.random.default_rng(0).permutation(NUM_TRAIN + NUM_TEST)
  return {"train": order[:NUM_TRAIN], "test": order[NUM_TRAIN:]}


def _load() -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [1797, 8, 8] images scaled to 0..255, int64 labels)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.repeat(image[..., None], 3, axis=-1), "RGB").save(buf, "PNG")
  return buf.getvalue()


def _captioned(split: str, labels: np.ndarray) -> Iterator[tuple[int, int, str]]:
  """(image index, template index, caption) in file order.

  Train: one round per template, each round over all images with a rotated
  template, so neighbouring examples are different images. Test: one each.
  """
  indices = _split_indices()[split]
  rounds = len(TRAIN_TEMPLATES) if split == "train" else 1
  for r in range(rounds):
    for pos, i in enumerate(indices):
      t = (pos + r) % len(TRAIN_TEMPLATES)
      yield int(i), t, caption(int(labels[i]), t)


def _examples(kind: str, split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
  if kind == "classification":
    for i in _split_indices()[split]:
      yield {"image": _png(images[i]), "label": int(labels[i]), "key": f"{i:04d}"}
  else:
    pngs = {}
    for i, t, text in _captioned(split, labels):
      if i not in pngs:
        pngs[i] = _png(images[i])
      yield {"image": pngs[i], "text": text, "label": int(labels[i]), "key": f"{i:04d}-{t}"}


def _writable_root() -> str:
  root = data_dir()
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the dataset folder {root} ({e.strerror}); set BIGVIS_DATA_DIR.")
  return root


def ensure_digits(kind: str) -> str:
  """Folder holding the shards of digits set `kind`, built once (atomically, race-safe)."""
  from data_pipelines.shards import write_examples
  _check(kind)
  final = os.path.join(data_dir(), f"digits-{kind}-{VERSION}")
  if os.path.isdir(final):
    return final
  root = _writable_root()
  tmp = tempfile.mkdtemp(prefix=f".digits-{kind}.tmp-", dir=root)
  try:
    images, labels = _load()
    for split in SPLITS:
      size = math.ceil(num_examples(kind, split) / NUM_SHARDS[split])
      write_examples(_examples(kind, split, images, labels), tmp, size, prefix=split)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):  # Lost a race only if the winner's folder is there.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def shard_pattern(kind: str, split: str) -> str:
  """Glob of the shards of one split of digits set `kind` (building it if needed)."""
  _check(kind, split)
  return os.path.join(ensure_digits(kind), f"{split}-*-of-*.tfrecord")


def digits_tokenizer() -> str:
  """Path of the digits SentencePiece model (all captions + zero-shot prompts), built once."""
  from data_pipelines.tokenizer import train_tokenizer
  prefix = os.path.join(data_dir(), f"digits-tokenizer-{VERSION}")
  if os.path.isfile(prefix + ".model"):
    return prefix + ".model"
  _writable_root()
  _, labels = _load()
  texts = [text for split in SPLITS for _, _, text in _captioned(split, labels)]
  texts += zeroshot_prompts()
  return train_tokenizer(texts, prefix, vocab_size=TOKENIZER_VOCAB, character_coverage=1.0,
                         num_threads=1)
