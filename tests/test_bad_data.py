"""A CLIP run on shards mixing real digits with every kind of bad record: bad ones are skipped and counted."""
import glob
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bigvis import cli
from data_pipelines import digits, shards


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _good_examples(n: int) -> list[dict]:
  files = sorted(glob.glob(digits.shard_pattern("captions", "test")))
  out = []
  for rec in tf.data.TFRecordDataset(files).take(n):
    f = tf.io.parse_single_example(rec, {"image": tf.io.FixedLenFeature([], tf.string),
                                         "text": tf.io.FixedLenFeature([], tf.string)})
    out.append({"image": f["image"].numpy(), "text": f["text"].numpy().decode(), "key": f"good{len(out)}"})
  return out


def _bad_and_convertible_examples() -> tuple[list[bytes], dict[str, int], int]:
  """Raw serialized records: (records, expected skip counts, number of usable convertible ones)."""
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), np.uint8))
  jpeg = _encode(rgb, "JPEG", quality=90)
  ex = lambda image, text="a photo of the number one", key="k": shards.serialize_example(
      {"image": image, "text": text, "key": key})
  bad = [
      ex(b"\xff\xd8\xff\xe0not really a jpeg at all", key="corrupt"),
      ex(jpeg[: len(jpeg) // 2], key="truncated"),
      # Header and end marker intact, the scan zeroed: passes the reader's check, fails to decode
      # (skipped with tf.data's warning, not counted).
      ex(jpeg[:300] + bytes(len(jpeg) - 302) + b"\xff\xd9", key="damaged_scan"),
      ex(b"", key="zero_bytes"),
      ex(_encode(Image.new("RGB", (40, 40)), "PNG"), key="too_large"),  # 1,600 px > the 1,000 limit below
      ex(jpeg, text="", key="empty_caption"),
      ex(jpeg, text="   \t ", key="space_caption"),
      ex(jpeg, text=b"caption \xff\xfe broken", key="bad_utf8"),
      tf.train.Example(features=tf.train.Features(feature={
          "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"no image field"]))})).SerializeToString(),
  ]
  expected = {"corrupt_image": 2, "empty_image": 1, "too_large": 1, "empty_text": 2, "invalid_utf8": 1,
              "missing_field": 1}
  rgba = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12, 4), np.uint8), "RGBA")
  gray16 = Image.fromarray(np.random.default_rng(2).integers(0, 65535, (12, 12)).astype(np.uint16))
  convertible = [
      ex(_encode(rgba, "PNG"), key="alpha"),
      ex(_encode(gray16, "PNG"), key="png16"),
      ex(_encode(rgb.convert("L"), "JPEG"), key="gray"),
      ex(_encode(rgb.convert("CMYK"), "JPEG"), key="cmyk"),
  ]
  return bad + convertible, expected, len(convertible)


@pytest.mark.slow
def test_clip_run_skips_and_counts_each_kind_of_bad_record(tmp_path, capsys):
  """Each kind of bad record is skipped and counted; an image damaged past its header is skipped
  where decoding fails; the run finishes with a finite loss."""
  good = _good_examples(40)
  records, expected, n_convertible = _bad_and_convertible_examples()
  out = tmp_path / "shards"
  out.mkdir()
  # Shard 0: good + bad records interleaved. Shard 1: good records, then cut mid-record.
  with tf.io.TFRecordWriter(str(out / "mixed-00000.tfrecord")) as w:
    for i, rec in enumerate(shards.serialize_example(g) for g in good[:30]):
      w.write(rec)
      if i < len(records):
        w.write(records[i])
  with tf.io.TFRecordWriter(str(out / "mixed-00001.tfrecord")) as w:
    for g in good[30:]:
      w.write(shards.serialize_example(g))
  data = (out / "mixed-00001.tfrecord").read_bytes()
  (out / "mixed-00001.tfrecord").write_bytes(data[: len(data) - 40])  # the last record is torn

  workdir = tmp_path / "run"
  code = cli.main(["train", "--config", "clip_ti_digits", "--workdir", str(workdir),
                   "--set", "data.train.source='shards'", "--set", f"data.train.shards='{out}/mixed-*.tfrecord'",
                   "--set", "data.train.max_pixels=1000", "--set", "data.train.shuffle_buffer=16",
                   "--set", "data.train.cache=False", "--set", "batch_size=16", "--set", "total_steps=12",
                   "--set", "log_every_steps=4", "--set", "evals={}", "--set", "optim.warmup_steps=2"])
  assert code == 0, capsys.readouterr().err[-2000:]
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  last = rows[-1]
  for reason, count in expected.items():
    assert last[f"data/skipped/{reason}"] == count, (reason, last)
  assert last["data/skipped"] == sum(expected.values())
  assert np.isfinite(last["train/loss"])
  # Convertible images (alpha, 16-bit, grayscale, CMYK) are decoded to RGB and used, not skipped.
  decoded = [tf.io.decode_image(tf.io.parse_single_example(r, {"image": tf.io.FixedLenFeature([], tf.string)})
                                ["image"], channels=3, expand_animations=False).shape
             for r in records[-n_convertible:]]
  assert all(s == (12, 12, 3) for s in decoded)
