"""Record counts of TFRecord shards, kept in a manifest beside them so readers can split records evenly.

Readers fill equal parts of every global batch, so a reader holding fewer records shows each of
them more often. Dealing whole files cannot balance files of different sizes (write-shards' short
last shard, other tools' uneven shards); with each file's record count, `sources.reader_parts`
gives every reader the same number of records to within one.

One manifest per folder, `shard_counts.json`:
`{"version": 1, "files": {"data-00000-of-00008.tfrecord": {"records": 1000, "bytes": 4183201}}}`.
`write-shards` adds its shards to it; `bigvis data count-shards --shards GLOB` counts shards made
elsewhere. The size in bytes tells a reader that a file changed after it was counted: a count whose
file's size changed is not trusted.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import uuid
from typing import Callable

from bigvis.errors import UserError

MANIFEST = "shard_counts.json"
VERSION = 1
# Stats and reads of many files on a bucket are each a round trip: overlap them.
_IO_THREADS = 32

log = logging.getLogger(__name__)


def _gfile():
  import tensorflow as tf  # here, not at import: data tools import this module where only JAX is
  return tf.io.gfile


def read_manifest(folder: str) -> dict[str, dict]:
  """The folder's entries, {} when it has no manifest; a damaged manifest is an error naming it."""
  path = os.path.join(folder, MANIFEST)
  gfile = _gfile()
  if not gfile.exists(path):
    return {}
  try:
    with gfile.GFile(path, "r") as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest.get("version") != VERSION or not isinstance(files, dict):
      raise ValueError(f"version {manifest.get('version')}")
    return {name: {"records": int(e["records"]), "bytes": int(e["bytes"])} for name, e in files.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"shard manifest {path} is not a version-{VERSION} record-count manifest ({e}); "
                    f"delete it and run `bigvis data count-shards` on the shards.") from None


def record_counts(folder: str, counts: dict[str, int]) -> str:
  """Adds `counts` (file name in `folder` -> records) to the folder's manifest, with each file's size.

  Written under a temporary name and renamed, so a reader sees the old manifest or the new one; one
  writer at a time per folder (a second one writing at once could drop the first one's entries).
  """
  gfile = _gfile()
  sizes = file_sizes([os.path.join(folder, name) for name in counts])
  entries = read_manifest(folder)
  entries.update({name: {"records": int(n), "bytes": sizes[os.path.join(folder, name)]}
                  for name, n in counts.items()})
  path = os.path.join(folder, MANIFEST)
  tmp = os.path.join(folder, f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
  with gfile.GFile(tmp, "w") as f:
    json.dump({"version": VERSION, "files": dict(sorted(entries.items()))}, f, indent=1)
  gfile.rename(tmp, path, overwrite=True)
  return path


def is_manifest(path: str) -> bool:
  """A manifest, or one a crash left under its temporary name: what a folder-wide glob must not read."""
  name = os.path.basename(path)
  return name == MANIFEST or name.startswith(f".{MANIFEST}.tmp-")


def by_folder(files: list[str]) -> dict[str, list[str]]:
  """`files` grouped by their folder, folders sorted: one manifest each."""
  folders: dict[str, list[str]] = {}
  for f in files:
    folders.setdefault(os.path.dirname(f), []).append(f)
  return dict(sorted(folders.items()))


def _io_pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(min(_IO_THREADS, max(1, n)))


def file_sizes(paths: list[str]) -> dict[str, int]:
  """Bytes of each file, stat'ed in parallel (a round trip each on a bucket)."""
  gfile = _gfile()
  with _io_pool(len(paths)) as pool:
    return dict(zip(paths, pool.map(lambda p: gfile.stat(p).length, paths)))


def load_counts(files: list[str]) -> dict[str, int] | None:
  """Records per file from the manifests beside `files`, or None unless every file has a current count.

  A file that is missing from its folder's manifest, or whose size is not the one counted, makes
  the whole answer None (logged, naming it): readers then split by file, as without a manifest.
  """
  manifests = {folder: read_manifest(folder) for folder in by_folder(files)}
  if not any(manifests.values()):
    return None
  entries = {f: manifests[os.path.dirname(f)].get(os.path.basename(f)) for f in files}
  uncounted = [f for f, e in entries.items() if e is None]
  if uncounted:
    log.info("%d of %d shard files have no record count (first: %s); readers split them by file. "
             "`bigvis data count-shards` counts them.", len(uncounted), len(files), uncounted[0])
    return None
  sizes = file_sizes(files)
  changed = [f for f in files if sizes[f] != entries[f]["bytes"]]
  if changed:
    log.warning("%d shard files changed since they were counted (first: %s, %d bytes, counted at %d); "
                "readers split them by file. Run `bigvis data count-shards` again.", len(changed),
                changed[0], sizes[changed[0]], entries[changed[0]]["bytes"])
    return None
  return {f: entries[f]["records"] for f in files}


def count_records(path: str) -> int:
  """Records in one TFRecord file that a reader gets: a damaged file's up to the damage (logged)."""
  import tensorflow as tf

  def count(ds):
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
  try:
    return count(tf.data.TFRecordDataset(path))
  except tf.errors.DataLossError:  # readers read such a file up to the damage: count what they get
    n = count(tf.data.TFRecordDataset(path).ignore_errors())
    log.warning("shard file %s is damaged after %d records; counted those.", path, n)
    return n
  except tf.errors.OpError as e:  # missing, a folder, no permission: nothing a reader could read either
    reason = (e.message or "").splitlines()[:1]
    raise UserError(f"shard file {path} cannot be read ({': '.join([type(e).__name__, *reason])}).") from None


def count_shards(files: list[str], progress: Callable[[int], None] | None = None) -> dict[str, int]:
  """Counts the records of `files` (in parallel) and records them in each folder's manifest."""
  counts: dict[str, int] = {}
  with _io_pool(len(files)) as pool:
    for path, n in zip(files, pool.map(count_records, files)):
      counts[path] = n
      if progress:
        progress(len(counts))
  for folder, paths in by_folder(files).items():
    record_counts(folder, {os.path.basename(f): counts[f] for f in paths})
  return counts
