"""Bundled digits sets: fixed split sizes, deterministic bytes, captions, zero-shot prompts."""
import filecmp
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines import digits, shards
from data_pipelines import tokenizer as tok


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("BIGVIS_DATA_DIR", str(tmp_path / "data"))
  return tmp_path / "data"


def _read(kind, split, require_text=True):
  """Every example of a split as dicts, parsed and validated a batch at a time (fast)."""
  files = sorted(tf.io.gfile.glob(digits.shard_pattern(kind, split)))
  rows = []
  for batch in tf.data.TFRecordDataset(files).batch(4096):
    features = shards.parse_example(batch)
    ok, _ = shards.validate_example(features, require_text=require_text)
    assert ok.numpy().all()
    cols = {k: v.numpy() for k, v in features.items() if not k.startswith("_")}
    rows += [dict(zip(cols, values)) for values in zip(*cols.values())]
  return rows


def test_classification_split_and_pixels(data_dir):
  train, test = _read("classification", "train", False), _read("classification", "test", False)
  assert (len(train), len(test)) == (1497, 300) == (digits.num_examples("classification", "train"),
                                                   digits.num_examples("classification", "test"))
  assert len(list(shards.read_shards(sorted(tf.io.gfile.glob(digits.shard_pattern(
      "classification", "test"))), require_text=False))) == 300
  keys = [e["key"] for e in train + test]
  assert len(set(keys)) == 1797  # every image exactly once
  assert set(e["label"] for e in test) == set(range(10))
  image = tf.io.decode_png(train[0]["image"]).numpy()
  assert image.shape == (8, 8, 3) and (image[..., 0] == image[..., 1]).all()
  pixels = np.stack([tf.io.decode_png(e["image"]).numpy()[..., 0] for e in train[:200]])
  assert pixels.min() == 0 and pixels.max() == 255
  # Values are the 0..16 scans scaled by 255/16: a background-heavy image, bright strokes.
  from sklearn.datasets import load_digits
  raw = load_digits().images[int(train[0]["key"])]
  assert (image[..., 0] == np.round(raw * 255 / 16)).all()
  assert train[0]["label"] == load_digits().target[int(train[0]["key"])]


def test_build_is_deterministic_cached_and_race_safe(tmp_path, monkeypatch):
  dirs = []
  for name in ("a", "b"):
    monkeypatch.setenv("BIGVIS_DATA_DIR", str(tmp_path / name))
    results = []
    threads = [threading.Thread(target=lambda: results.append(digits.ensure_digits("classification")))
               for _ in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(results) == 2 and results[0] == results[1]
    dirs.append(results[0])
    assert sorted(os.listdir(tmp_path / name)) == [f"digits-classification-{digits.VERSION}"]  # no temp left
  names = sorted(os.listdir(dirs[0]))
  assert len(names) == 13 and names == sorted(os.listdir(dirs[1]))  # 12 shards and their record counts
  assert filecmp.cmpfiles(dirs[0], dirs[1], names, shallow=False)[0] == names
  stamp = os.path.getmtime(os.path.join(dirs[1], names[0]))
  assert digits.ensure_digits("classification") == dirs[1]
  assert os.path.getmtime(os.path.join(dirs[1], names[0])) == stamp


def test_captions_and_zeroshot_templates(data_dir):
  train, test = _read("captions", "train"), _read("captions", "test")
  assert len(train) == 1497 * len(digits.TRAIN_TEMPLATES) == digits.num_examples("captions", "train")
  assert len(test) == 300
  assert len(digits.TRAIN_TEMPLATES) >= 6
  image_ids = lambda rows: [r["key"].split(b"-")[0] for r in rows]
  assert len(set(image_ids(test))) == 300
  counts = np.unique(image_ids(train), return_counts=True)[1]
  assert len(counts) == 1497 and (counts == len(digits.TRAIN_TEMPLATES)).all()
  assert not set(image_ids(train)) & set(image_ids(test))
  assert image_ids(train[:5]) != image_ids(train[5:10])  # neighbours are different images
  captions = {e["text"].decode() for e in train + test}
  assert "a photo of the number seven" in captions and "handwritten 7" in captions
  for e in train[:100]:
    label = int(e["label"])
    text = e["text"].decode()
    assert digits.DIGIT_NAMES[label] in text or str(label) in text
  prompts = set(digits.zeroshot_prompts())
  assert len(prompts) == 10 * len(digits.ZEROSHOT_TEMPLATES)
  assert not prompts & captions
  assert not set(digits.ZEROSHOT_TEMPLATES) & set(digits.TRAIN_TEMPLATES)
  assert list(digits.ZEROSHOT_CLASSNAMES) == list(digits.DIGIT_NAMES) == [
      "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_digits_tokenizer_covers_prompts(data_dir):
  path = digits.digits_tokenizer()
  assert path.startswith(str(data_dir)) and digits.digits_tokenizer() == path
  t = tok.Tokenizer("bundled:digits", max_len=16)
  assert t.path == path and t.vocab_size <= digits.TOKENIZER_VOCAB
  ids = t.encode(digits.zeroshot_prompts() + ["A Scan of a handwritten 7"])
  assert (ids != 1).all()  # no unknown pieces
  assert (ids == 2).sum(axis=1).tolist() == [1] * len(ids)
  op = tok.tokenize(max_len=16, model="bundled:digits")
  out = op({"text": tf.constant("A Scan of a handwritten 7")}, None)["labels"].numpy()
  assert out.tolist() == ids[-1].tolist()


def test_bad_kind_or_split(data_dir):
  with pytest.raises(UserError, match="unknown digits kind 'colour'"):
    digits.ensure_digits("colour")
  with pytest.raises(UserError, match="unknown digits split 'val'"):
    digits.shard_pattern("classification", "val")
