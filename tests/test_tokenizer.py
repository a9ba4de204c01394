"""SentencePiece tokenizer: training, the in-graph `tokenize` op, and its Python twin agree."""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines import preprocess, shards
from data_pipelines import tokenizer as tok

CORPUS = [
    "a photo of a cat sitting on a mat",
    "a dog running in the park",
    "two cats and one dog",
    "the quick brown fox jumps over the lazy dog",
    "a small red car parked near the house",
    "café au lait in a white cup",
] * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return tok.train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "sub" / "sp"),
                             vocab_size=120)


def test_train_tokenizer_special_ids_and_atomic_files(model):
  assert model.endswith("sp.model") and os.path.isfile(model)
  folder = os.path.dirname(model)
  assert sorted(os.listdir(folder)) == ["sp.model", "sp.vocab"]
  t = tok.Tokenizer(model, max_len=8)
  assert (t.sp.pad_id(), t.sp.unk_id(), t.sp.bos_id(), t.eot_id) == (0, 1, -1, 2)
  assert 20 < t.vocab_size <= 120


def test_train_tokenizer_rejects_empty_corpus(tmp_path):
  with pytest.raises(UserError, match="no non-empty texts"):
    tok.train_tokenizer(["", "  "], str(tmp_path / "sp"), vocab_size=50)


TEXTS = ["A photo of a CAT", "", "a dog running in the park " * 6, "Café au lait", "zebra"]


def test_encode_pads_truncates_and_ends_with_eot(model):
  t = tok.Tokenizer(model, max_len=10)
  ids = t.encode(TEXTS)
  assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 10)
  assert ids[1].tolist() == [2] + [0] * 9  # empty text is just EOT
  assert ids[2, -1] == 2 and 0 not in ids[2]  # truncated to max_len - 1, then EOT
  for row in ids:
    end = row.tolist().index(2)
    assert (row[end + 1:] == 0).all() and (row[:end] != 0).all() and (row[:end] != 2).all()
  assert t.decode(ids[0]) == "a photo of a cat"
  assert (t.encode(["A PHOTO of a Cat"]) == t.encode(["a photo of a cat"])).all()


def test_op_matches_python_tokenizer(model):
  t = tok.Tokenizer(model, max_len=10)
  want = t.encode(TEXTS)
  op = tok.tokenize(max_len=10, model=model)
  for text, row in zip(TEXTS, want):
    out = op({"text": tf.constant(text)}, tf.constant([0, 0]))["labels"]
    assert out.dtype == tf.int32 and out.shape == (10,)
    assert out.numpy().tolist() == row.tolist()
  batch = t.tf_encode(tf.constant([TEXTS, TEXTS]))
  assert batch.shape == (2, len(TEXTS), 10) and (batch.numpy()[1] == want).all()


def test_op_registered_and_used_in_tf_data(model):
  assert "tokenize" in preprocess.registered_ops()
  fn = preprocess.build(f"tokenize(max_len=6, model={model!r}, key='caption', key_result='ids')")
  ds = tf.data.Dataset.from_tensor_slices({"caption": TEXTS})
  ds = ds.map(lambda f: fn(f, tf.constant([1, 2])))
  assert ds.element_spec["ids"].shape == (6,)
  got = np.stack([e["ids"] for e in ds.as_numpy_iterator()])
  assert (got == tok.Tokenizer(model, 6).encode(TEXTS)).all()


def test_lower_false_op_matches_python(model):
  t = tok.Tokenizer(model, max_len=8, lower=False)
  op = tok.tokenize(8, model, lower=False)
  out = op({"text": tf.constant("CAT")}, None)["labels"].numpy()
  assert out.tolist() == t.encode(["CAT"])[0].tolist()


def test_bad_models_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    tok.Tokenizer(str(tmp_path / "missing.model"), 8)
  with pytest.raises(UserError, match="bundled:digits"):
    tok.Tokenizer("bundled:klingon", 8)
  from experiments.clip_vitb16 import NO_TOKENIZER  # what the CLIP experiments hold until given one
  with pytest.raises(UserError, match=r"^no tokenizer model is set; pass --config experiments/clip_\*\.py:tokenizer="):
    tok.Tokenizer(NO_TOKENIZER, 8)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(UserError, match="not a SentencePiece model"):
    tok.Tokenizer(str(tmp_path / "junk.model"), 8)


def test_train_tokenizer_from_shards(tmp_path):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (4, 4)).save(buf, "JPEG")
  examples = [{"image": buf.getvalue(), "text": text, "key": str(i)} for i, text in enumerate(CORPUS)]
  examples.append({"image": buf.getvalue(), "text": "   ", "key": "skipped"})
  shards.write_examples(examples, str(tmp_path / "shards"), shard_size=50)
  model = tok.train_tokenizer_from_shards(str(tmp_path / "shards" / "*.tfrecord"),
                                          str(tmp_path / "sp"), vocab_size=80)
  t = tok.Tokenizer(model, 12)
  assert 1 not in t.encode(["the quick brown fox"])[0]  # no unknown pieces
  with pytest.raises(UserError, match="flag --shards=.* matches no files"):
    tok.train_tokenizer_from_shards(str(tmp_path / "none-*.tfrecord"), str(tmp_path / "x"), 80)


def test_a_vocabulary_smaller_than_asked_is_said(tmp_path, caplog):
  """The limit is soft so that tiny corpora train; the log says when the corpus gave fewer pieces."""
  with caplog.at_level(logging.WARNING, logger=tok.__name__):
    model = tok.train_tokenizer(CORPUS, str(tmp_path / "sp"), vocab_size=32000, num_threads=1)
  pieces = tok.Tokenizer(model, 8).vocab_size
  assert pieces < 32000 and f"has {pieces} pieces, fewer than the 32000 asked for" in caplog.text
