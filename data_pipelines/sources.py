"""Where examples come from: bundled digits, TFRecord image-text shards, TFDS, or synthetic.

A source returns a tf.data.Dataset of raw feature dicts (`image` as encoded
bytes, `label`, `text`, ...) holding only this process's slice of the data.
Shard-backed sources also carry `_skip_reason` so the pipeline can drop and
count bad examples.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING

import ml_collections

if TYPE_CHECKING:  # annotations only: TensorFlow is imported where it is used
  import tensorflow as tf

from bigvis.errors import UserError

log = logging.getLogger(__name__)

# Every key a data section may hold, with its default; `data_config` fills them all in so
# `--set data.train.source=shards --set data.train.shards=...` works on any experiment.
SOURCE_DEFAULTS = dict(
    source="digits",        # digits | digits_captions | shards | tfds | synthetic
    split="train",          # digits/TFDS split (TFDS slicing syntax allowed)
    shards="",              # shards: glob(s) of TFRecord files, comma-separated
    name="",                # tfds: dataset name
    data_dir="",            # tfds: where prepared datasets live
    pp="",                  # preprocessing ops, data_pipelines/preprocess.py
    shuffle_buffer=10_000,  # training only
    cache=False,            # keep decoded records in memory after the first pass (small sets)
    max_pixels=178_956_970, # larger images are skipped as `too_large`
    num_readers=0,          # parts of the global batch read independently; 0 = one per process
)
SOURCE_KEYS = tuple(SOURCE_DEFAULTS)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A data section with every key present; unknown keys are an error naming the closest one."""
  from bigvis.config import check_known
  check_known(overrides, SOURCE_KEYS, "data")
  return ml_collections.ConfigDict({**SOURCE_DEFAULTS, **overrides})


def data_sections(node, where: str):
  """(where, section) for every data section (a node with a `source` or a `pp`) in a config section and
  under it: what start-up checks (ops, tokenizers, image sizes) walk."""
  if not callable(getattr(node, "items", None)):
    return
  if "source" in node or "pp" in node:
    yield where, node
    return
  for key, value in node.items():
    yield from data_sections(value, f"{where}.{key}")


def shard_files(pattern: str, key: str) -> list[str]:
  """Sorted files matching a glob (comma-separated globs allowed); an error names the config key (or
  the command's flag, `key` starting with --)."""
  flag = key.startswith("--")
  what = f"flag {key}" if flag else f"config key '{key}'"
  if not pattern:
    raise UserError(f"{what} is empty: set it to a glob of TFRecord shards, e.g. "
                    f"{key if flag else '--set ' + key}='/data/laion/train-*.tfrecord' "
                    "(write shards with `bigvis data write-shards`).")
  import tensorflow as tf  # here, not at import: experiment files load this module where only JAX is
  from data_pipelines.shard_counts import is_manifest
  # A glob of a whole folder (`shards/*`) also matches the record-count manifest, which is no shard.
  files = sorted(f for p in pattern.split(",") for f in tf.io.gfile.glob(p.strip()) if not is_manifest(f))
  if not files:
    raise UserError(f"{what}='{pattern}' matches no files; write shards with "
                    "`bigvis data write-shards INPUT OUTPUT_DIR` or fix the path.")
  return files


def reader_parts(files: list[str], reader: int, readers: int,
                 counts: dict[str, int] | None = None) -> list[tuple[str, int, int, int]]:
  """This reader's share of `files` as (path, first, stop, modulus): the records of `path` whose index
  i has first <= i % modulus < stop (whole files: (path, 0, 1, 1)); modulus 0: first <= i < stop.

  Readers fill equal parts of each global batch, so a reader with less data would show its examples
  more often: 10 files over 8 readers, dealt round-robin, were 1 or 2 files a reader. With each file's
  record count (`counts`, from `shard_counts`), reader r takes records [r·N/readers, (r+1)·N/readers)
  of the files read one after another: shares equal to a record, whatever the files' sizes, in whole
  files and parts of at most two. Without counts, files are dealt round-robin while each reader can
  take a whole one; the rest (fewer than `readers`) are shared:
  * where they are few (reading them all costs every reader at most 4 times the data in all, or
    there are fewer files than readers), each reader reads every one of them and keeps record r of
    every `readers`: equal shares to a record per file, whatever the files' sizes (write-shards'
    last shard is short);
  * else each file is cut into `readers` slices by record index and each reader takes that many
    consecutive slices, parts of at most two files; those files are the first ones, so a short last
    shard is some reader's whole file, at most one file short of the others' share.
  """
  if counts is not None:
    return _record_range(files, counts, reader, readers)
  whole, rest = divmod(len(files), readers)
  if whole == 0 or rest * readers <= 4 * len(files):
    shared, dealt = files[whole * readers:], files[:whole * readers]
    return ([(path, 0, 1, 1) for path in dealt[reader::readers]]
            + [(path, reader, reader + 1, readers) for path in shared])
  shared, dealt = files[:rest], files[rest:]
  parts = [(path, 0, 1, 1) for path in dealt[reader::readers]]
  # Slice s is slice s % readers of shared file s // readers; this reader's are consecutive.
  first, stop = reader * rest, (reader + 1) * rest
  for index, path in enumerate(shared):
    lo, hi = max(first, index * readers), min(stop, (index + 1) * readers)
    if lo < hi:
      parts.append((path, lo - index * readers, hi - index * readers, readers))
  return parts


def _record_range(files: list[str], counts: dict[str, int], reader: int,
                  readers: int) -> list[tuple[str, int, int, int]]:
  """Records [reader·N/readers, (reader+1)·N/readers) of `files` read one after another."""
  total = sum(counts[f] for f in files)
  lo, hi = reader * total // readers, (reader + 1) * total // readers
  parts, start = [], 0
  for path in files:
    end = start + counts[path]
    first, stop = max(lo, start) - start, min(hi, end) - start
    if first < stop:
      parts.append((path, 0, 1, 1) if (first, stop) == (0, counts[path]) else (path, first, stop, 0))
    start = end
  return parts


def _split_counts(files: list[str], readers: int, where: str, log_it: bool) -> dict[str, int] | None:
  """Record counts for `readers` to split `files` by (`reader_parts`), or None to split them by file.

  Decided once for all of a process's readers, so they cannot disagree should a manifest appear
  meanwhile. Processes decide apart, alike unless a manifest is written while they start.
  """
  from data_pipelines import shard_counts
  counts = shard_counts.load_counts(files)
  if counts is not None:
    total = sum(counts.values())
    if total < readers:
      raise UserError(f"the shards of {where} hold {total} records, fewer than its {readers} readers "
                      f"(one per process unless {where}.num_readers says otherwise); write more data.")
    if log_it:
      log.info("%d readers share the %d records of %d shard files to within one record.", readers, total,
               len(files))
    return counts
  if log_it:  # split by file, readers' shares can differ: say so when their bytes do by over 10%
    sizes = shard_counts.file_sizes(files)
    shares = [sum(sizes[path] * (stop - first) / modulus for path, first, stop, modulus in
                  reader_parts(files, r, readers)) for r in range(readers)]
    if min(shares) < 0.9 * max(shares):
      log.warning("the %d readers' shares of the %d shard files differ: %.3g to %.3g MB, so the smaller "
                  "shares' examples come round more often; `bigvis data count-shards --shards GLOB` "
                  "counts their records, and readers then split them evenly.", readers, len(files),
                  min(shares) / 1e6, max(shares) / 1e6)
  return None


def _records(files: list[str], cfg: ml_collections.ConfigDict, reader: int, readers: int,
             counts: dict[str, int] | None) -> tf.data.Dataset:
  from data_pipelines import shards
  # Captions are only required (and checked) when the pipeline tokenizes them.
  return shards.read_shards(reader_parts(files, reader, readers, counts),
                            max_pixels=int(cfg.get("max_pixels", shards.DEFAULT_MAX_PIXELS)),
                            require_text="tokenize" in cfg.get("pp", ""))


def _digits_files(kind: str, split: str) -> list[str]:
  from data_pipelines import digits
  return sorted(glob.glob(digits.shard_pattern(kind, split)))


def tfds_dataset(cfg: ml_collections.ConfigDict, process_index: int, process_count: int,
                 where: str = "data.train") -> tf.data.Dataset:
  """A TFDS split (images left encoded, so `decode` in the pp string works as for shards)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  name, data_dir = cfg.get("name"), cfg.get("data_dir") or None
  if not name:
    raise UserError(f"config key '{where}.name' must name a TFDS dataset, e.g. 'imagenet2012'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name: TFDS raises DatasetNotFoundError
    raise UserError(f"TFDS dataset '{name}' is unknown ({type(e).__name__}).")
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise UserError(f"TFDS dataset '{name}' is not prepared in data_dir '{data_dir or builder.data_dir}'; "
                    f"run `tfds build {name} --data_dir=...` (or download it) and set {where}.data_dir.")
  split = tfds.even_splits(cfg.get("split", "train"), n=process_count, drop_remainder=False)[process_index]
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  return builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)


def _files(cfg: ml_collections.ConfigDict, where: str) -> list[str]:
  kind = cfg.get("source")
  if kind == "digits":
    return _digits_files("classification", cfg.get("split", "train"))
  if kind == "digits_captions":
    return _digits_files("captions", cfg.get("split", "train"))
  if kind == "shards":
    return shard_files(cfg.get("shards"), f"{where}.shards")
  raise UserError(f"config key '{where}.source' is '{kind}', not one of digits, digits_captions, shards, "
                  "tfds, synthetic.")


def make_sources(cfg: ml_collections.ConfigDict, where: str, readers: range,
                 num_readers: int) -> list[tf.data.Dataset]:
  """Config section `data.train` -> raw examples of each of `readers`, of the `num_readers` that split
  the data between them (a process builds only its own)."""
  # Else it trained on other data, unsaid. (A TFDS name left set is no such sign: experiments on TFDS
  # hold one, and users switch them to shards with `source` and `shards` alone.)
  if cfg.get("shards") and cfg.get("source") != "shards":
    raise UserError(f"config key '{where}.shards' is set, but {where}.source is '{cfg.get('source')}', which "
                    f"does not read shards; add --set {where}.source=shards.")
  if cfg.get("source") == "tfds":
    return [tfds_dataset(cfg, r, num_readers, where) for r in readers]
  files = _files(cfg, where)
  # One reader reads every file whole: only a split between readers needs the counts. The log lines
  # come from the process with reader 0.
  counts = _split_counts(files, num_readers, where, 0 in readers) if num_readers > 1 else None
  return [_records(files, cfg, r, num_readers, counts) for r in readers]


def make_source(cfg: ml_collections.ConfigDict, where: str) -> tf.data.Dataset:
  """Config section `evals.x.data` -> all of its raw examples, for one reader."""
  return make_sources(cfg, where, range(1), 1)[0]
