"""Where examples come from: bundled digits, TFRecord image-text shards, TFDS, or synthetic.

A source returns a tf.data.Dataset of raw feature dicts (`image` as encoded
bytes, `label`, `text`, ...) holding only this process's slice of the data.
Shard-backed sources also carry `_skip_reason` so the pipeline can drop and
count bad examples.
"""
from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING

import ml_collections

if TYPE_CHECKING:  # annotations only: TensorFlow is imported where it is used
  import tensorflow as tf

from bigvis.errors import UserError

# Every key a data section may hold, with its default; `data_config` fills them all in so
# `--set data.train.shards=...` works on any experiment.
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


def shard_files(pattern: str, key: str) -> list[str]:
  """Sorted files matching a glob (comma-separated globs allowed); an error names the config key."""
  if not pattern:
    raise UserError(f"config key '{key}' is empty: set it to a glob of TFRecord shards, e.g. "
                    f"--set {key}='/data/laion/train-*.tfrecord' (write shards with `bigvis data write-shards`).")
  import tensorflow as tf  # here, not at import: experiment files load this module where only JAX is
  files = sorted(f for p in pattern.split(",") for f in tf.io.gfile.glob(p.strip()))
  if not files:
    raise UserError(f"config key '{key}'='{pattern}' matches no files; write shards with "
                    "`bigvis data write-shards INPUT OUTPUT_DIR` or fix the path.")
  return files


def reader_parts(files: list[str], reader: int, readers: int) -> list[tuple[str, int, int, int]]:
  """This reader's share of `files` as (path, first, stop, modulus): the records of `path` whose index
  i has first <= i % modulus < stop (whole files: (path, 0, 1, 1)).

  Readers fill equal parts of each global batch, so a reader with less data would show its examples
  more often: 10 files over 8 readers, dealt round-robin, were 1 or 2 files a reader. Files are dealt
  round-robin while each reader can take a whole one; the rest (fewer than `readers`) are shared:
  * where they are few (reading them all costs every reader at most 4 times the data in all, or
    there are fewer files than readers), each reader reads every one of them and keeps record r of
    every `readers`: equal shares to a record per file, whatever the files' sizes (write-shards'
    last shard is short);
  * else each file is cut into `readers` slices by record index and each reader takes that many
    consecutive slices, parts of at most two files; those files are the first ones, so a short last
    shard is some reader's whole file, at most one file short of the others' share.
  """
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


def _records(files: list[str], cfg: ml_collections.ConfigDict, reader: int, readers: int) -> tf.data.Dataset:
  from data_pipelines import shards
  # Captions are only required (and checked) when the pipeline tokenizes them.
  return shards.read_shards(reader_parts(files, reader, readers),
                            max_pixels=int(cfg.get("max_pixels", shards.DEFAULT_MAX_PIXELS)),
                            require_text="tokenize" in cfg.get("pp", ""))


def _digits_files(kind: str, split: str) -> list[str]:
  from data_pipelines import digits
  return sorted(glob.glob(digits.shard_pattern(kind, split)))


def tfds_dataset(cfg: ml_collections.ConfigDict, process_index: int, process_count: int) -> tf.data.Dataset:
  """A TFDS split (images left encoded, so `decode` in the pp string works as for shards)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  name, data_dir = cfg.get("name"), cfg.get("data_dir") or None
  if not name:
    raise UserError("config key 'data.<split>.name' must name a TFDS dataset, e.g. 'imagenet2012'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name: TFDS raises DatasetNotFoundError
    raise UserError(f"TFDS dataset '{name}' is unknown ({type(e).__name__}).")
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise UserError(f"TFDS dataset '{name}' is not prepared in data_dir '{data_dir or builder.data_dir}'; "
                    f"run `tfds build {name} --data_dir=...` (or download it) and set data.<split>.data_dir.")
  split = tfds.even_splits(cfg.get("split", "train"), n=process_count, drop_remainder=False)[process_index]
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  return builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)


def make_source(cfg: ml_collections.ConfigDict, where: str, process_index: int = 0,
                process_count: int = 1) -> tf.data.Dataset:
  """Config section `data.train` / `evals.x.data` -> raw examples for this process."""
  kind = cfg.get("source")
  if kind == "digits":
    return _records(_digits_files("classification", cfg.get("split", "train")), cfg, process_index,
                    process_count)
  if kind == "digits_captions":
    return _records(_digits_files("captions", cfg.get("split", "train")), cfg, process_index, process_count)
  if kind == "shards":
    return _records(shard_files(cfg.get("shards"), f"{where}.shards"), cfg, process_index, process_count)
  if kind == "tfds":
    return tfds_dataset(cfg, process_index, process_count)
  raise UserError(f"config key '{where}.source' is '{kind}', not one of digits, digits_captions, shards, "
                  "tfds, synthetic.")
