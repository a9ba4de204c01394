"""Image-text shards: writer conversions and skips, in-graph validation, damaged files."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bigvis.errors import UserError
from data_pipelines import shards


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _rgb(w=24, h=16, seed=0) -> Image.Image:
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  return Image.fromarray(arr, "RGB")


def _jpeg(w=24, h=16, seed=0, **kw) -> bytes:
  return _encode(_rgb(w, h, seed), "JPEG", quality=90, **kw)


def _rgba_png() -> bytes:
  arr = np.zeros((8, 8, 4), np.uint8)
  arr[..., 0] = 200
  arr[:, 4:, 3] = 255  # left half fully transparent
  return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _png16() -> bytes:
  arr = np.full((6, 5), 65535, np.uint16)
  arr[0, 0] = 0
  return _encode(Image.fromarray(arr), "PNG")


def _cmyk_jpeg() -> bytes:
  return _encode(Image.new("CMYK", (10, 6), (0, 255, 255, 0)), "JPEG", quality=95)


def _dataset(ds):
  return list(ds.as_numpy_iterator())


# ---------------------------------------------------------------------------
# check_image / check_text


def test_check_image_keeps_baseline_rgb_jpeg_bytes():
  data = _jpeg()
  assert shards.check_image(data) == (data, None)


@pytest.mark.parametrize("make, kind", [
    (_rgba_png, "alpha"),
    (_png16, "16bit"),
    (lambda: _encode(Image.new("L", (7, 5), 90), "PNG"), "grayscale"),
    (lambda: _encode(Image.new("L", (7, 5), 90), "JPEG"), "grayscale"),
    (_cmyk_jpeg, "cmyk"),
    (lambda: _encode(_rgb().quantize(16), "PNG"), "palette"),
    (lambda: _jpeg(progressive=True), "jpeg"),
    (lambda: _encode(_rgb(), "PNG"), "png"),
    (lambda: _encode(_rgb(), "BMP"), "bmp"),
])
def test_check_image_converts_to_rgb_jpeg(make, kind):
  out, got = shards.check_image(make())
  assert got == kind
  im = Image.open(io.BytesIO(out))
  assert (im.format, im.mode) == ("JPEG", "RGB") and not im.info.get("progressive")
  assert shards.check_image(out) == (out, None)  # already normalised


def test_check_image_conversions_are_faithful():
  alpha = np.asarray(Image.open(io.BytesIO(shards.check_image(_rgba_png())[0])))
  assert alpha[:, :3].min() > 240  # transparent part composited on white
  assert abs(int(alpha[:, 5:, 0].mean()) - 200) < 8 and alpha[:, 5:, 1].max() < 20
  gray16 = np.asarray(Image.open(io.BytesIO(shards.check_image(_png16())[0])))
  assert gray16.max() > 245 and gray16[0, 0].max() < 128  # scaled, not clipped
  cmyk = np.asarray(Image.open(io.BytesIO(shards.check_image(_cmyk_jpeg())[0])))
  assert cmyk[..., 0].min() > 230 and cmyk[..., 1:].max() < 30  # CMY(0,1,1) is red


@pytest.mark.parametrize("data, reason", [
    (None, "missing_field"),
    (b"", "empty_image"),
    (b"this is not an image at all", "corrupt_image"),
    (_jpeg(30, 30)[:len(_jpeg(30, 30)) // 2], "corrupt_image"),
    (_jpeg(30, 30)[:-2], "corrupt_image"),
    (_encode(_rgb(30, 30), "PNG")[:-200], "corrupt_image"),
    (_jpeg(40, 30), "too_large"),
])
def test_check_image_rejects(data, reason):
  assert shards.check_image(data, max_pixels=1000) == (None, reason)


@pytest.mark.parametrize("text, result", [
    ("  a cat  ", ("a cat", None)),
    ("caf\u00e9".encode(), ("caf\u00e9", None)),
    (None, (None, "missing_field")),
    (" \t\n", (None, "empty_text")),
    ("", (None, "empty_text")),
    (b"bad \xff bytes", (None, "invalid_utf8")),
    ("lone \ud800", (None, "invalid_utf8")),
])
def test_check_text(text, result):
  assert shards.check_text(text) == result


# ---------------------------------------------------------------------------
# write_shards from the three input layouts


def _bad_folder(folder, index):
  """A folder exercising every skip reason and conversion, its index starting with a byte-order mark
  (Excel's "CSV UTF-8" writes one); returns expected (kept texts)."""
  files = {
      "ok.jpg": _jpeg(seed=1), "alpha.png": _rgba_png(), "deep.png": _png16(),
      "gray.png": _encode(Image.new("L", (9, 9), 30), "PNG"), "cmyk.jpg": _cmyk_jpeg(),
      "trunc.jpg": _jpeg(64, 64)[:250], "zero.jpg": b"", "big.jpg": _jpeg(200, 100),
      "noise.jpg": os.urandom(300),
  }
  for name, data in files.items():
    (folder / name).write_bytes(data)
  rows = [
      ("ok.jpg", "A Good Photo", 3), ("alpha.png", "alpha", None), ("deep.png", "deep", 1),
      ("gray.png", "gray", None), ("cmyk.jpg", "cmyk", 2), ("trunc.jpg", "truncated", None),
      ("zero.jpg", "zero", None), ("big.jpg", "big", None), ("noise.jpg", "noise", None),
      ("ok.jpg", "   ", None), ("ok.jpg", b"bad \xff", None), ("absent.jpg", "gone", None),
  ]
  if index == "captions.jsonl":
    with open(folder / index, "wb") as f:
      f.write(b"\xef\xbb\xbf")
      for file, text, label in rows:
        row = {"file": file, "text": "@@"}
        if label is not None:
          row["label"] = label
        line = json.dumps(row).encode()
        text = text if isinstance(text, bytes) else json.dumps(text)[1:-1].encode()
        f.write(line.replace(b"@@", text) + b"\n")
      f.write(b'{"file": "ok.jpg"}\n')  # no text
      f.write(b"{not json\n")
  else:
    with open(folder / index, "wb") as f:
      f.write(b"\xef\xbb\xbffile,text,label\n")
      for file, text, label in rows:
        text = text if isinstance(text, bytes) else text.encode()
        f.write(b'%s,"%s",%s\n' % (file.encode(), text, b"" if label is None else b"%d" % label))
      f.write(b"ok.jpg\n")  # no text column
      f.write(b",no file,\n")


@pytest.mark.parametrize("index", ["captions.jsonl", "captions.csv"])
def test_write_shards_folder_counts_every_reason(tmp_path, index, caplog):
  src = tmp_path / "src"
  src.mkdir()
  _bad_folder(src, index)
  report = shards.write_shards(str(src), str(tmp_path / "out"), shard_size=2, max_pixels=10000)
  assert report["written"] == 5
  assert report["skipped"] == {"missing_field": 3, "empty_image": 1, "corrupt_image": 2,
                               "too_large": 1, "invalid_utf8": 1, "empty_text": 1}
  assert report["converted"] == {"alpha": 1, "16bit": 1, "grayscale": 1, "cmyk": 1}
  assert [os.path.basename(p) for p in report["shards"]] == [
      "data-00000-of-00003.tfrecord", "data-00001-of-00003.tfrecord", "data-00002-of-00003.tfrecord"]
  assert "trunc.jpg" in caplog.text and "corrupt_image" in caplog.text
  # missing_field says which: the file, the caption, the line (it said only 'missing_field').
  assert "(absent.jpg): missing_field (no readable file absent.jpg)" in caplog.text
  assert "(ok.jpg): missing_field (no caption)" in caplog.text
  assert ("missing_field (not a JSON object)" if index == "captions.jsonl" else
          "(): missing_field (no file name)") in caplog.text
  assert not [f for f in os.listdir(tmp_path / "out") if "tmp" in f]

  got = _dataset(shards.read_shards(report["shards"]))
  assert [g["text"] for g in got] == [b"A Good Photo", b"alpha", b"deep", b"gray", b"cmyk"]
  assert [g["label"] for g in got] == [3, -1, 1, -1, 2]
  assert [g["_skip_reason"] for g in got] == [-1] * 5
  assert got[0]["image"] == (src / "ok.jpg").read_bytes()
  assert len({g["key"] for g in got}) == 5
  for g in got:
    assert tf.io.decode_image(g["image"], channels=3).shape[-1] == 3


def test_write_shards_csv_rejects_bad_label_and_header(tmp_path):
  (tmp_path / "a.jpg").write_bytes(_jpeg())
  (tmp_path / "captions.csv").write_text("file,text,label\na.jpg,hi,cat\n")
  with pytest.raises(UserError, match="label 'cat'"):
    shards.write_shards(str(tmp_path), str(tmp_path / "out"))
  (tmp_path / "captions.csv").write_text("image,caption\na.jpg,hi\n")
  with pytest.raises(UserError, match="header"):
    shards.write_shards(str(tmp_path), str(tmp_path / "out"))


def _tar(path, samples):
  with tarfile.open(path, "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_write_shards_webdataset(tmp_path):
  wds = tmp_path / "wds"
  (wds / "part").mkdir(parents=True)
  _tar(wds / "part" / "00000.tar", [
      ("000000001.jpg", _jpeg(seed=2)), ("000000001.txt", b"first caption"),
      ("000000001.cls", b"7"), ("000000001.json", b'{"key": "000000001", "status": "success"}'),
      ("000000002.png", _rgba_png()), ("000000002.json", b'{"caption": "from json", "label": 4}'),
      ("000000003.txt", b"image missing"),
      ("000000004.jpg", _jpeg(seed=3)), ("000000004.txt", b"\xfe\xff"),
  ])
  _tar(wds / "00001.tar", [("a/x.jpg", _jpeg(seed=4)), ("a/x.txt", b"nested key")])
  report = shards.write_shards(str(wds), str(tmp_path / "out"), prefix="wds")
  assert report["written"] == 3
  assert report["skipped"]["missing_field"] == 1 and report["skipped"]["invalid_utf8"] == 1
  assert report["converted"] == {"alpha": 1}
  got = _dataset(shards.read_shards(report["shards"]))
  assert {g["text"]: (g["label"], g["key"]) for g in got} == {
      b"nested key": (-1, b"a/x"), b"first caption": (7, b"000000001"),
      b"from json": (4, b"000000002")}

  # A single tar file is an input too, and a truncated tar keeps what came before the damage.
  data = (wds / "part" / "00000.tar").read_bytes()
  (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
  report = shards.write_shards(str(tmp_path / "cut.tar"), str(tmp_path / "out2"))
  assert report["written"] >= 1


def test_write_shards_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    shards.write_shards(str(tmp_path / "nope"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="captions.jsonl"):
    shards.write_shards(str(tmp_path / "empty"), str(tmp_path / "out"))
  shards.write_examples([{"image": _jpeg(), "text": "t", "key": "k"}], str(tmp_path / "out"))
  with pytest.raises(UserError, match="already holds shards"):
    shards.write_examples([{"image": _jpeg(), "text": "t", "key": "k"}], str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# In-graph validation and reading


def _formats():
  im = _rgb(37, 23)
  return {
      "jpeg": _encode(im, "JPEG"), "jpeg_exif": _encode(im, "JPEG", exif=b"Exif\0\0" + b"\0" * 3000),
      "progressive": _encode(im, "JPEG", progressive=True), "png": _encode(im, "PNG"),
      "png16": _encode(Image.fromarray(np.zeros((23, 37), np.uint16)), "PNG"),
      "gif": _encode(im, "GIF"), "bmp": _encode(im, "BMP"),
      "webp_lossy": _encode(im, "WEBP", quality=80),
      "webp_lossless": _encode(im, "WEBP", lossless=True),
      "webp_extended": _encode(im.convert("RGBA"), "WEBP", exif=b"Exif\0\0xx"),
  }


def _validate(examples, max_pixels=shards.DEFAULT_MAX_PIXELS, require_text=True):
  serialized = tf.constant([shards.serialize_example(e) for e in examples])
  features = shards.parse_example(serialized)
  ok, reason = shards.validate_example(features, max_pixels, require_text)
  return ok.numpy().tolist(), reason.numpy().tolist()


def test_validate_example_reads_sizes_of_every_format():
  formats = _formats()
  names = sorted(formats)
  examples = [{"image": formats[n], "text": "x", "key": n} for n in names]
  ok, reason = _validate(examples)
  assert ok == [True] * len(names), dict(zip(names, reason))
  ok, reason = _validate(examples, max_pixels=37 * 23)
  assert ok == [True] * len(names)
  ok, reason = _validate(examples, max_pixels=37 * 23 - 1)
  assert reason == [shards.SKIP_REASONS.index("too_large")] * len(names), dict(zip(names, reason))
  # One example at a time (inside a tf.data map) gives scalars.
  feats = shards.parse_example(tf.constant(shards.serialize_example(examples[0])))
  ok, reason = shards.validate_example(feats)
  assert ok.shape == () and bool(ok) and int(reason) == -1


def test_validate_example_reasons():
  jpeg, png = _jpeg(64, 64), _encode(_rgb(), "PNG")
  cases = [
      ({"image": jpeg, "text": "fine", "key": "a"}, -1),
      ({"image": b"", "text": "x", "key": "b"}, "empty_image"),
      ({"image": b"GIF89a", "text": "x", "key": "c"}, "corrupt_image"),
      ({"image": os.urandom(500), "text": "x", "key": "d"}, "corrupt_image"),
      ({"image": jpeg[:len(jpeg) // 2], "text": "x", "key": "e"}, "corrupt_image"),
      ({"image": png[:-30], "text": "x", "key": "f"}, "corrupt_image"),
      ({"image": b"\xff\xd8\xff\xe0\x00\x01junk\xff\xd9", "text": "x", "key": "g"}, "corrupt_image"),
      ({"image": jpeg, "text": " \t\n ", "key": "h"}, "empty_text"),
      ({"image": jpeg, "text": b"\xc3\x28", "key": "i"}, "invalid_utf8"),
      ({"image": jpeg, "key": "j"}, "missing_field"),
      ({"image": b"", "text": None, "key": "k"}, "missing_field"),
  ]
  ok, reason = _validate([c for c, _ in cases])
  want = [-1 if r == -1 else shards.SKIP_REASONS.index(r) for _, r in cases]
  assert reason == want
  assert ok == [r == -1 for r in want]
  # Classification data needs no caption.
  ok, _ = _validate([{"image": jpeg, "key": "l", "label": 3}], require_text=False)
  assert ok == [True]


def test_parse_example_defaults():
  no_image = tf.train.Example().SerializeToString()
  feats = shards.parse_example(tf.constant(no_image))
  assert feats["label"].numpy() == -1 and feats["text"].numpy() == b""
  assert feats["key"].numpy() == b"" and not feats["_has_image"].numpy()
  ok, reason = shards.validate_example(feats)
  assert not ok and shards.SKIP_REASONS[int(reason)] == "missing_field"


def test_read_shards_survives_truncated_file_and_counts_skips(tmp_path):
  good = [{"image": _jpeg(seed=i), "text": f"caption {i}", "key": f"k{i}", "label": i}
          for i in range(12)]
  bad = {2: {"image": b"", "text": "x", "key": "e"}, 5: {"image": _jpeg(), "text": " ", "key": "t"},
         6: {"image": b"\x89PNG nope", "text": "x", "key": "c"}}
  examples = list(good)
  for pos in sorted(bad):
    examples.insert(pos, bad[pos])
  paths = shards.write_examples(examples, str(tmp_path), shard_size=5)
  assert len(paths) == 3
  last = open(paths[-1], "rb").read()
  open(paths[-1], "wb").write(last[:len(last) - 40])  # cut the final record

  got = _dataset(shards.read_shards(paths, batch_size=4))
  assert len(got) == len(examples) - 1
  assert [g["_skip_reason"] for g in got][:8] == [-1, -1, 1, -1, -1, 5, 2, -1]

  counted = _dataset(shards.count_skips(shards.read_shards(paths)))
  assert [c["key"] for c in counted] == [f"k{i}".encode() for i in range(11)]
  assert "_skip_reason" not in counted[0]
  assert counted[0]["_skipped"].dtype == np.int64 and counted[0]["_skipped"].tolist() == [0] * 6
  assert counted[2]["_skipped"].tolist() == [0, 1, 0, 0, 0, 0]
  assert counted[-1]["_skipped"].tolist() == [0, 1, 1, 0, 0, 1]

  # A record that is not an Example is dropped alone; a missing file is a UserError.
  with tf.io.TFRecordWriter(str(tmp_path / "junk.tfrecord")) as w:
    w.write(shards.serialize_example(good[0]))
    w.write(b"\x0a\xff\xff not a proto")
    w.write(shards.serialize_example(good[1]))
  assert len(_dataset(shards.read_shards([str(tmp_path / "junk.tfrecord")]))) == 2
  with pytest.raises(UserError, match="does not exist"):
    shards.read_shards([str(tmp_path / "missing.tfrecord")])


def test_read_shards_interleaves_deterministically(tmp_path):
  paths = shards.write_examples(
      ({"image": _jpeg(8, 8), "text": str(i), "key": str(i)} for i in range(9)), str(tmp_path), 3)
  first = [g["key"] for g in _dataset(shards.read_shards(paths, cycle_length=3))]
  assert first == [b"0", b"3", b"6", b"1", b"4", b"7", b"2", b"5", b"8"]
  assert first == [g["key"] for g in _dataset(shards.read_shards(paths, cycle_length=3))]


def test_random_eval_ops_do_not_depend_on_the_process_count():
  """Eval batches split over 2 processes, put back together, equal the 1-process batches, noise included."""
  import ml_collections
  from data_pipelines import input as data_input
  cfg = ml_collections.ConfigDict(dict(source="digits", split="test",
                                       pp="decode|gaussian_noise(20.0)|keep('image','label')"))
  one = list(data_input.eval_batches(cfg, global_batch_size=64))
  parts = [list(data_input.eval_batches(cfg, global_batch_size=64, process_index=i, process_count=2))
           for i in range(2)]
  assert len(one) == len(parts[0]) == len(parts[1]) == 5  # 300 examples, padded to 320
  for b, (p0, p1) in enumerate(zip(*parts)):
    for key in ("image", "label", "_mask"):
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), one[b][key])


def _counting_source(monkeypatch):
  """Patches the eval source so that every example read is counted; returns the counter."""
  import tensorflow as tf
  from data_pipelines import input as data_input
  reads = {"n": 0}
  real = data_input.make_source

  def bump(x):
    reads["n"] += 1
    return x

  def counted(*args, **kwargs):
    ds = real(*args, **kwargs)
    return ds.map(lambda x: {**x, "label": tf.py_function(bump, [x["label"]], x["label"].dtype)})
  monkeypatch.setattr(data_input, "make_source", counted)
  return reads


def test_an_evaluator_builds_its_split_once_and_every_eval_passes_over_the_same_batches(monkeypatch):
  """Rebuilding an eval split at every eval traced its pp again (about 4 s an eval on the digits); the
  evaluator now keeps it, and each pass starts from the first example with the same noise."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from bigvis import sharding
  from bigvis.evaluators import classification
  from data_pipelines import input as data_input
  made = []
  real = data_input.make_source
  monkeypatch.setattr(data_input, "make_source", lambda *a, **kw: made.append(a[1]) or real(*a, **kw))
  cfg = ml_collections.ConfigDict(dict(batch_size=64, data=dict(
      source="digits", split="test", pp="decode|gaussian_noise(20.0)|onehot(10)|keep('image','labels')")))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])

  class Brightness:  # a "classifier" whose logits are the images' mean brightness, for every class
    num_classes = 10

    def apply(self, variables, images, train):
      return jnp.mean(images, axis=(1, 2, 3))[:, None] * variables["params"]["w"], {}
  evaluator = classification.Evaluator(cfg, name="test", model=Brightness(), mesh=mesh)
  params = {"w": jnp.arange(10.0)}
  assert evaluator.run(params) == evaluator.run(params)  # same noise in each pass
  assert made == ["evals.test.data"]  # built once, at start, for the label check and every eval
  first, second = list(evaluator._split.batches()), list(evaluator._split.batches())
  assert len(first) == len(second) == 5
  for a, b in zip(first, second):
    for key in ("image", "labels", "_mask"):
      np.testing.assert_array_equal(a[key], b[key])
  one_off = list(data_input.eval_batches(cfg.data, global_batch_size=64, where="evals.test.data"))
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in one_off]),
                                np.concatenate([b["image"] for b in first]))


@pytest.mark.parametrize("global_batch, batches", [(64, 5), (60, 5), (300, 1), (1, 300)])
def test_eval_batches_read_the_split_once_and_pad_to_whole_batches(monkeypatch, caplog, global_batch, batches):
  import ml_collections
  from data_pipelines import input as data_input
  reads = _counting_source(monkeypatch)
  cfg = ml_collections.ConfigDict(dict(source="digits", split="test", pp="decode|keep('image','label')"))
  with caplog.at_level(logging.WARNING):
    got = list(data_input.eval_batches(cfg, global_batch_size=global_batch))
  assert "AutoGraph" not in caplog.text  # plain tensor code, kept from conversion (9 lines of warning each)
  assert len(got) == batches
  masks = np.concatenate([b["_mask"] for b in got])
  assert len(masks) == batches * global_batch and masks[:300].all() and not masks[300:].any()
  # One pass: 300 examples, plus the start of the split once more for the padding copies (a few records of
  # parallel read-ahead). Counting the split first, as bigvis once did, reads 600 and more.
  assert 300 <= reads["n"] <= 310
  labels = np.concatenate([b["label"] for b in got])
  np.testing.assert_array_equal(labels[300:], labels[0])  # padding repeats the first example


def test_a_long_eval_pass_logs_its_progress(monkeypatch, caplog):
  """An eval over ImageNet's 50,000 (or a linear probe's 1.28M train images) said nothing for minutes."""
  import ml_collections
  from data_pipelines import input as data_input
  monkeypatch.setattr(data_input, "EVAL_PROGRESS_EVERY_S", 0.0)  # a line for every batch
  cfg = ml_collections.ConfigDict(dict(source="digits", split="test", pp="decode|keep('image','label')"))
  with caplog.at_level(logging.INFO, logger="data_pipelines.input"):
    assert len(list(data_input.eval_batches(cfg, global_batch_size=128, where="evals.val.data"))) == 3
  lines = [r.getMessage() for r in caplog.records if r.name == "data_pipelines.input"]
  assert [line.split(",")[0] for line in lines] == ["evals.val.data: 128 examples", "evals.val.data: 256 examples",
                                                    "evals.val.data: 384 examples"]
  # A split of known size (TFDS's) gets "of N" and an ETA, the padded last batch counted as the rest.
  real = data_input.make_source
  monkeypatch.setattr(data_input, "make_source",
                      lambda *a, **k: real(*a, **k).apply(tf.data.experimental.assert_cardinality(300)))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="data_pipelines.input"):
    list(data_input.eval_batches(cfg, global_batch_size=128, where="evals.val.data"))
  lines = [r.getMessage() for r in caplog.records if r.name == "data_pipelines.input"]
  assert lines[0].startswith("evals.val.data: 128 of 300 examples, ") and "ETA 0:00:" in lines[0]
  assert lines[-1].startswith("evals.val.data: 300 of 300 examples, ") and lines[-1].endswith("ETA 0:00:00")


def test_eval_batches_of_an_empty_split_are_a_one_line_error(monkeypatch):
  import ml_collections
  from data_pipelines import input as data_input
  real = data_input.make_source
  monkeypatch.setattr(data_input, "make_source", lambda *a, **k: real(*a, **k).take(0))
  cfg = ml_collections.ConfigDict(dict(source="digits", split="test", pp="decode|keep('image','label')"))
  with pytest.raises(UserError, match="evals has no usable examples"):
    list(data_input.eval_batches(cfg, global_batch_size=64))


@pytest.mark.parametrize("files, readers", [(10, 8), (11, 8), (3, 8), (16, 4), (7, 1), (1000, 256), (1, 2),
                                            (60, 8)])
def test_reader_parts_give_every_reader_the_same_share(files, readers):
  """Readers fill equal parts of each global batch, so each must hold the same share of the data, or
  its examples come round more often (10 files over 8 readers were once 1 or 2 files a reader). The
  files left over are read by every reader where they are few; else each reader reads parts of at
  most two (1,000 files over 256 readers: not 232 files each)."""
  from fractions import Fraction
  from data_pipelines.sources import reader_parts
  paths = [f"f{i}" for i in range(files)]
  share = {p: Fraction(0) for p in paths}
  whole, rest = divmod(files, readers)
  for r in range(readers):
    parts = reader_parts(paths, r, readers)
    assert sum(Fraction(stop - first, modulus) for _, first, stop, modulus in parts) == Fraction(files, readers)
    partial = sum(modulus > 1 for *_, modulus in parts)
    if whole == 0 or rest * readers <= 4 * files:  # few left over: every reader reads each of them
      assert partial == rest
    else:  # 1,000 files over 256 readers: parts of at most two, not 232 files each
      assert files == 1000 and partial <= 2
    for path, first, stop, modulus in parts:
      share[path] += Fraction(stop - first, modulus)
  assert all(s == 1 for s in share.values())  # every record read once, by one reader


@pytest.mark.parametrize("records, shard_size, readers", [(20, 4, 3), (201, 100, 8), (10, 4, 2)])
def test_readers_split_the_records_between_them(tmp_path, records, shard_size, readers):
  """Real shards as write-shards makes them, the last one short: every record read once, and no reader
  more than a record per shared file from another (201 records in shards of 100, 100 and 1 over 8
  readers: 25 or 26 each, where slices taken in a row left two readers nothing)."""
  from data_pipelines.sources import reader_parts
  paths = shards.write_examples(
      ({"image": _jpeg(8, 8), "text": str(i), "key": str(i)} for i in range(records)), str(tmp_path), shard_size)
  keys = [[g["key"] for g in _dataset(shards.read_shards(reader_parts(paths, r, readers)))] for r in range(readers)]
  assert sorted(k for ks in keys for k in ks) == sorted(str(i).encode() for i in range(records))
  counts = sorted(map(len, keys))
  assert counts[-1] - counts[0] <= len(paths) % readers, counts  # a record per shared file
