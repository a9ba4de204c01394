"""Record counts beside the shards, and readers splitting the records evenly with them."""
import collections
import io
import json
import logging
import os
import random

import pytest
import tensorflow as tf
from PIL import Image

from bigvis.errors import UserError
from data_pipelines import shard_counts, shards
from data_pipelines.sources import reader_parts


def _jpeg() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), (90, 20, 200)).save(buf, "JPEG")
  return buf.getvalue()


def _write(folder, records: int, shard_size: int) -> list[str]:
  image = _jpeg()
  return shards.write_examples(({"image": image, "text": str(i), "key": str(i)} for i in range(records)),
                               str(folder), shard_size)


def _keys(parts) -> list[bytes]:
  return [x["key"] for x in shards.read_shards(parts, require_text=False).as_numpy_iterator()]


@pytest.mark.parametrize("records, shard_size, readers", [(29, 4, 8), (201, 100, 8), (20, 4, 3), (10, 3, 4),
                                                          (7, 7, 2)])
def test_write_shards_counts_and_readers_split_the_records_to_one(tmp_path, records, shard_size, readers):
  """write-shards' last shard is short; with the counts it writes, readers' shares differ by at most one
  record. 29 records in 8 shards of 4 (the last holds 1) over 8 readers: split by file, one reader held
  that single record and showed it in every batch."""
  paths = _write(tmp_path, records, shard_size)
  counts = shard_counts.load_counts(paths)
  assert counts == {p: min(shard_size, records - i * shard_size) for i, p in enumerate(paths)}
  keys = [_keys(reader_parts(paths, r, readers, counts)) for r in range(readers)]
  assert sorted(k for ks in keys for k in ks) == sorted(str(i).encode() for i in range(records))
  sizes = [len(ks) for ks in keys]
  assert max(sizes) - min(sizes) <= 1, sizes
  if (records, shard_size, readers) == (29, 4, 8):  # what dealing whole files gave
    assert min(len(_keys(reader_parts(paths, r, readers))) for r in range(readers)) == 1


def test_record_ranges_cover_every_record_once_in_parts_of_at_most_two_files():
  rng = random.Random(0)
  for _ in range(200):
    files = [f"f{i}" for i in range(rng.randint(1, 40))]
    counts = {f: rng.choice([0, 1, 5, 100, 1000, rng.randint(0, 3000)]) for f in files}
    total = sum(counts.values())
    readers = rng.randint(1, max(1, min(64, total)))
    if total < readers:
      continue
    seen = collections.Counter()
    for r in range(readers):
      parts = reader_parts(files, r, readers, counts)
      assert sum(modulus == 0 for *_, modulus in parts) <= 2  # only the two ends are cut
      share = 0
      for path, first, stop, modulus in parts:
        assert (first, stop, modulus) == (0, 1, 1) or (modulus == 0 and 0 <= first < stop <= counts[path])
        indexes = range(counts[path]) if modulus == 1 else range(first, stop)
        seen.update((path, i) for i in indexes)
        share += len(indexes)
      assert share in (total // readers, total // readers + 1)
    assert len(seen) == total and set(seen.values()) == {1}


def test_training_readers_show_every_record_as_often(tmp_path, caplog):
  """The whole training stream: 8 readers, one example each a batch, over 12 steps. With the counts
  every record comes 3 or 4 times; split by file, the reader with the short shard's single record
  shows it in all 12 batches, and the log says the shares differ."""
  import ml_collections
  from data_pipelines import input as data_input
  _write(tmp_path, 29, 4)
  cfg = ml_collections.ConfigDict(dict(source="shards", shards=str(tmp_path / "*"), pp="keep('key')",
                                       shuffle_buffer=1, num_readers=8))

  def seen() -> collections.Counter:
    batches = data_input.train_iterator(cfg, global_batch_size=8, seed=0)
    return collections.Counter(k for _, b in zip(range(12), batches) for k in b["key"])
  with caplog.at_level(logging.INFO):
    balanced = seen()
  assert len(balanced) == 29 and max(balanced.values()) <= 4, balanced
  assert "8 readers share the 29 records of 8 shard files to within one record" in caplog.text
  assert "differ" not in caplog.text
  os.remove(tmp_path / shard_counts.MANIFEST)
  with caplog.at_level(logging.WARNING):
    assert max(seen().values()) == 12
  assert "the 8 readers' shares of the 8 shard files differ" in caplog.text
  caplog.clear()
  for name in os.listdir(tmp_path):  # 8 shards of equal size, uncounted: nothing to say
    os.remove(tmp_path / name)
  _write(tmp_path, 32, 4)
  os.remove(tmp_path / shard_counts.MANIFEST)
  with caplog.at_level(logging.WARNING):
    assert len(seen()) == 32
  assert "differ" not in caplog.text


def test_a_changed_or_uncounted_file_is_not_trusted(tmp_path, caplog):
  paths = _write(tmp_path / "a", 12, 5)
  assert shard_counts.load_counts(paths) is not None
  with open(paths[1], "ab") as f:  # a file rewritten after it was counted
    f.write(b"\0")
  with caplog.at_level(logging.WARNING, logger=shard_counts.__name__):
    assert shard_counts.load_counts(paths) is None
  assert f"changed since they were counted (first: {paths[1]}" in caplog.text
  other = tf.io.TFRecordWriter(str(tmp_path / "a" / "extra.tfrecord"))
  other.close()
  assert shard_counts.load_counts([paths[0], str(tmp_path / "a" / "extra.tfrecord")]) is None


def test_a_damaged_manifest_is_an_error_naming_it(tmp_path):
  paths = _write(tmp_path, 3, 2)
  (tmp_path / shard_counts.MANIFEST).write_text('{"files": [1, 2]}')
  with pytest.raises(UserError, match=f"shard manifest .*{shard_counts.MANIFEST} is not a version-1"):
    shard_counts.load_counts(paths)


def test_fewer_records_than_readers_is_an_error_naming_the_section(tmp_path):
  import ml_collections
  from data_pipelines.sources import make_sources
  _write(tmp_path, 3, 2)
  cfg = ml_collections.ConfigDict(dict(source="shards", shards=str(tmp_path / "*.tfrecord"), max_pixels=100,
                                       pp=""))
  with pytest.raises(UserError, match=r"the shards of data.train hold 3 records, fewer than its 4 readers "
                                      r"\(one per process unless data.train.num_readers says otherwise\)"):
    make_sources(cfg, "data.train", range(2), 4)
  assert len(make_sources(cfg, "data.train", range(2), 3)) == 2


def test_a_file_no_reader_could_read_is_an_error_naming_it(tmp_path):
  """Counting stops with the file's name, rather than retry it for ever (a missing file, a folder)."""
  for path in (tmp_path / "gone.tfrecord", tmp_path):
    with pytest.raises(UserError, match=f"shard file {path} cannot be read"):
      shard_counts.count_records(str(path))


def test_write_shards_stops_before_writing_beside_a_damaged_manifest(tmp_path):
  (tmp_path / shard_counts.MANIFEST).write_text("{")
  with pytest.raises(UserError, match="is not a version-1 record-count manifest"):
    _write(tmp_path, 3, 2)
  assert os.listdir(tmp_path) == [shard_counts.MANIFEST]


def test_count_shards_counts_files_made_elsewhere(tmp_path, capsys, caplog):
  """Shards another tool wrote, in two folders, one of them cut short in its last record: the command
  writes each folder's manifest, counting what a reader gets from the damaged one, and a folder-wide
  glob does not take the manifest for a shard."""
  from bigvis import cli
  expected = {}
  for folder, n in (("x", 5), ("y", 3)):
    os.makedirs(tmp_path / folder)
    for j in range(2):
      path = str(tmp_path / folder / f"part-{j}.tfrecord")
      with tf.io.TFRecordWriter(path) as w:
        for i in range(n + j):
          w.write(shards.serialize_example({"image": _jpeg(), "text": "t", "key": f"{folder}{j}-{i}"}))
      expected[path] = n + j
  damaged = str(tmp_path / "y" / "part-1.tfrecord")
  data = open(damaged, "rb").read()
  with open(damaged, "wb") as f:
    f.write(data[:-10])  # the last record's tail lost
  expected[damaged] -= 1
  glob = f"{tmp_path / 'x' / '*'},{tmp_path / 'y' / '*.tfrecord'}"
  with caplog.at_level(logging.WARNING, logger=shard_counts.__name__):
    assert cli.main(["data", "count-shards", "--shards", glob]) == 0
  assert f"shard file {damaged} is damaged" in caplog.text
  assert len(_keys([damaged])) == expected[damaged]  # what a reader gets from it
  assert "counted 17 records in 4 files" in capsys.readouterr().out
  assert shard_counts.load_counts(sorted(expected)) == expected
  manifest = json.loads((tmp_path / "x" / shard_counts.MANIFEST).read_text())
  assert set(manifest["files"]) == {"part-0.tfrecord", "part-1.tfrecord"}
  # Run again with the manifests in place, and a temporary one a crash left: `x/*` matches them, and
  # they are no shards to count.
  (tmp_path / "x" / f".{shard_counts.MANIFEST}.tmp-0123abcd").write_text("{")
  assert cli.main(["data", "count-shards", "--shards", glob]) == 0
  assert "counted 17 records in 4 files" in capsys.readouterr().out


def test_write_shards_into_a_folder_keeps_the_other_sets_counts(tmp_path):
  """The bundled digits write two splits into one folder: the manifest holds both."""
  a = shards.write_examples(({"image": _jpeg(), "key": str(i)} for i in range(5)), str(tmp_path), 2, "train")
  b = shards.write_examples(({"image": _jpeg(), "key": str(i)} for i in range(3)), str(tmp_path), 2, "test")
  assert shard_counts.load_counts(a + b) == dict(zip(a + b, [2, 2, 1, 2, 1]))
