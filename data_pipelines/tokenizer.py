"""SentencePiece subword tokenizer: training, the in-graph `tokenize` op, and a Python twin.

Models use case-folding NFKC normalisation (`nmt_nfkc_cf`) and fixed special ids:
pad 0, unk 1, end-of-text (EOT, SentencePiece's eos) 2, no bos. A tokenized text
is its ids truncated to `max_len - 1`, then EOT, then pad (0) up to `max_len`:
text towers pool at the EOT position. Importing this module registers the
`tokenize` preprocessing op, e.g. `"...|tokenize(max_len=16, model='bundled:digits')"`.
"""
from __future__ import annotations

import logging
import os
import tempfile
import uuid
from typing import Iterable, Iterator

import numpy as np
import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines.preprocess import Op, register

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, EOT_ID = 0, 1, 2
BUNDLED = ("digits",)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if text.strip():
      yield text


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int = 32000,
                    model_type: str = "unigram", num_threads: int | None = None,
                    max_sentences: int = 0, character_coverage: float = 0.9995) -> str:
  """Trains a SentencePiece model on `texts`; writes `<model_prefix>.model`/.vocab atomically.

  The vocabulary is a soft limit (`hard_vocab_limit=False`), so tiny corpora work.
  `max_sentences` > 0 samples that many sentences; characters rarer than
  `character_coverage` of the corpus become unk. `num_threads=1` makes training
  reproducible (default: up to 16 cores). Returns the `.model` path.
  """
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise UserError(f"tokenizer model_type '{model_type}' is not 'unigram' or 'bpe'.")
  texts = _nonempty(texts)
  first = next(texts, None)
  if first is None:
    raise UserError(f"no non-empty texts to train tokenizer {model_prefix} on.")

  def sentences():
    yield first
    yield from texts

  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "sp")
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=sentences(), model_prefix=local, vocab_size=vocab_size,
          model_type=model_type, normalization_rule_name="nmt_nfkc_cf",
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=EOT_ID, hard_vocab_limit=False,
          character_coverage=character_coverage, input_sentence_size=max_sentences,
          shuffle_input_sentence=True, minloglevel=2,
          num_threads=num_threads or min(16, os.cpu_count() or 1))
    except RuntimeError as e:
      raise UserError(f"training tokenizer {model_prefix} failed: {e}.")
    pieces = spm.SentencePieceProcessor(model_file=local + ".model").get_piece_size()
    if pieces < vocab_size:  # the limit is soft, so a small corpus gives fewer pieces: say so
      log.warning("tokenizer %s has %d pieces, fewer than the %d asked for: its texts hold no more "
                  "(more text gives more).", model_prefix, pieces, vocab_size)
    parent = os.path.dirname(model_prefix)
    if parent:
      tf.io.gfile.makedirs(parent)
    token = uuid.uuid4().hex[:8]
    for ext in (".vocab", ".model"):  # .model last: its presence means both are complete.
      tmp_dst = f"{model_prefix}{ext}.tmp-{token}"
      tf.io.gfile.copy(local + ext, tmp_dst, overwrite=True)
      tf.io.gfile.rename(tmp_dst, model_prefix + ext, overwrite=True)
  return model_prefix + ".model"


def train_tokenizer_from_shards(shard_glob: str, model_prefix: str, vocab_size: int = 32000,
                                max_sentences: int = 1_000_000, **kwargs) -> str:
  """Trains a tokenizer on the `text` feature of the shards matching `shard_glob`."""
  from data_pipelines import shards
  from data_pipelines.sources import shard_files
  files = shard_files(shard_glob, "--shards")

  def texts():
    ds = shards.read_shards(files, require_text=True)
    # Plain tensor code: no AutoGraph conversion (and none of its warnings about lambdas).
    plain = tf.autograph.experimental.do_not_convert
    ds = ds.filter(plain(lambda f: f["_skip_reason"] < 0)).map(plain(lambda f: f["text"]))
    for i, text in enumerate(ds.as_numpy_iterator()):
      if max_sentences and i >= max_sentences:
        return
      yield text.decode("utf-8")

  return train_tokenizer(texts(), model_prefix, vocab_size, **kwargs)


def resolve_model(model: str) -> str:
  """Path of a tokenizer model: a file path, or `bundled:<name>` (built on first use)."""
  if model.startswith("bundled:"):
    name = model.split(":", 1)[1]
    if name == "digits":
      from data_pipelines import digits
      return digits.digits_tokenizer()
    raise UserError(f"unknown bundled tokenizer '{model}'; have "
                    + ", ".join(f"bundled:{b}" for b in BUNDLED) + ".")
  if model.startswith("<unset: ") and model.endswith(">"):  # an experiment's placeholder, with its hint
    raise UserError(f"no tokenizer model is set; {model[len('<unset: '):-1]}.")
  if not tf.io.gfile.exists(model):
    raise UserError(f"tokenizer model {model} does not exist.")
  return model


class Tokenizer:
  """Encodes texts to fixed-length int32 ids exactly as the `tokenize` op does."""

  def __init__(self, model: str, max_len: int, lower: bool = True):
    import sentencepiece as spm
    if max_len < 1:
      raise UserError(f"tokenizer max_len must be at least 1, got {max_len}.")
    self.path = resolve_model(model)
    with tf.io.gfile.GFile(self.path, "rb") as f:
      self.proto = f.read()
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(self.proto)
    except RuntimeError:
      raise UserError(f"{self.path} is not a SentencePiece model.")
    if self.sp.eos_id() < 0:
      raise UserError(f"tokenizer {self.path} has no end-of-text (eos) piece.")
    self.max_len, self.lower = max_len, lower
    self._tf = None

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def eot_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def encode(self, texts: list[str]) -> np.ndarray:
    """list of N texts -> int32 [N, max_len]: ids[:max_len-1], EOT, then padding."""
    out = np.full((len(texts), self.max_len), PAD_ID, np.int32)
    for i, text in enumerate(texts):
      text = text.decode("utf-8") if isinstance(text, bytes) else text
      ids = self.sp.encode(text.lower() if self.lower else text)[:self.max_len - 1]
      out[i, :len(ids)] = ids
      out[i, len(ids)] = self.eot_id
    return out

  def decode(self, ids) -> str:
    """Ids (one row of `encode`) -> text, stopping at the first EOT."""
    ids = [int(i) for i in ids]
    ids = ids[:ids.index(self.eot_id)] if self.eot_id in ids else ids
    return self.sp.decode([i for i in ids if i != PAD_ID])

  def tf_tokenizer(self):
    """The tensorflow_text SentencePiece op wrapper, created once (eagerly, outside traces)."""
    if self._tf is None:
      import tensorflow_text as tf_text
      with tf.init_scope():
        self._tf = tf_text.SentencepieceTokenizer(model=self.proto, out_type=tf.int32)
    return self._tf

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    """In-graph `encode` of a string tensor of any shape -> int32 [..., max_len]."""
    if self.lower:
      text = tf.strings.lower(text, encoding="utf-8")
    flat = tf.reshape(text, [-1])
    ids = self.tf_tokenizer().tokenize(flat)[:, :self.max_len - 1]
    eot = tf.fill([tf.shape(flat)[0], 1], tf.constant(self.eot_id, tf.int32))
    ids = tf.concat([ids, eot], axis=1).to_tensor(default_value=PAD_ID)
    ids = tf.pad(ids, [[0, 0], [0, self.max_len - tf.shape(ids)[1]]], constant_values=PAD_ID)
    return tf.reshape(ids, tf.concat([tf.shape(text), [self.max_len]], axis=0))


@register("tokenize")
def tokenize(max_len: int, model: str, key: str = "text", key_result: str = "labels",
             lower: bool = True) -> Op:
  """Text -> int32 [max_len] SentencePiece ids, EOT, zero padding (`model` may be bundled:digits)."""
  tokenizer = Tokenizer(model, max_len, lower)
  tokenizer.tf_tokenizer()

  def op(features, seed):
    ids = tokenizer.tf_encode(features[key])
    ids.set_shape(features[key].shape.concatenate([max_len]))
    features[key_result] = ids
    return features

  return op
