"""Builds the batched tf.data pipelines the training loop and evaluators consume.

Order matters for exact resume: raw records -> (drop and count bad ones) ->
repeat + seeded shuffle -> skip what earlier steps consumed -> enumerate ->
preprocess with a per-example seed from (run seed, process, example index) ->
batch. Everything is a function of (seed, step), so restarting at step N
yields exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from bigvis.config import check_known
from bigvis.errors import UserError
from data_pipelines import preprocess
from data_pipelines import tokenizer as _tokenizer  # noqa: F401  registers the `tokenize` op
from data_pipelines import shifts as _shifts  # noqa: F401  registers the distribution-shift ops
from data_pipelines.sources import SOURCE_KEYS, make_source, make_sources

AUTOTUNE = tf.data.AUTOTUNE
# An eval pass longer than this logs how far it is, then again every as long.
EVAL_PROGRESS_EVERY_S = 30.0

log = logging.getLogger(__name__)


def _private(key: str) -> bool:
  return key.startswith("_")


def _drop_bad(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Filters out examples flagged by the source's validator, keeping cumulative counts."""
  from data_pipelines import shards
  if "_skip_reason" not in ds.element_spec:
    return ds
  return shards.count_skips(ds)


def _preprocess(ds: tf.data.Dataset, pp: str, seed: int, stream: int, start: int = 0,
                indexed: bool = False) -> tf.data.Dataset:
  """Applies `pp` with a seed per example from (seed, stream, example index).

  The index counts from `start`, or comes with each element as `(index, features)` when
  `indexed` (eval batches pass the global index, so random eval ops do not depend on how
  many processes share the split).
  """
  op = preprocess.build(pp)
  base = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), stream)

  def apply(index, features):
    keep = {k: v for k, v in features.items() if _private(k)}
    example_seed = tf.random.experimental.stateless_fold_in(base, index)
    out = op({k: v for k, v in features.items() if not _private(k)}, example_seed)
    return {**out, **keep}
  # Deterministic parallel map: output order is input order, whatever the thread timing.
  ds = ds if indexed else ds.enumerate(start=start)
  return ds.map(apply, num_parallel_calls=AUTOTUNE, deterministic=True)


def pp_element_spec(cfg: ml_collections.ConfigDict, where: str,
                    source: tf.data.Dataset | None = None) -> dict[str, tf.TensorSpec]:
  """What `cfg.pp` makes of one of the section's examples (feature -> spec), known without reading any.
  `source`: the section's raw examples, where already made."""
  source = make_source(cfg, where) if source is None else source
  return _preprocess(source, cfg.get("pp", ""), 0, 0).element_spec


def pp_image_shapes(sets: list[tuple[str, ml_collections.ConfigDict]]) -> list[tuple[int, int] | None]:
  """For each (where, data section): the (height, width) of the images its pp makes, where tf.data
  knows it without reading any (a resize or a crop fixes it), else None. Sections that read the same
  data share one source (making one costs about a second)."""
  sources, out = {}, []
  for where, cfg in sets:
    same = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "pp"}, sort_keys=True, default=str)
    if same not in sources:
      sources[same] = make_source(cfg, where)
    spec = pp_element_spec(cfg, where, sources[same])
    shape = spec.get("image").shape if isinstance(spec, dict) and "image" in spec else None
    ok = shape is not None and shape.rank == 3 and shape[:2].is_fully_defined()
    out.append((int(shape[0]), int(shape[1])) if ok else None)
  return out


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise UserError(f"batch_size={global_batch_size} does not divide over {process_count} processes.")
  return global_batch_size // process_count


def _reader_stream(cfg, source: tf.data.Dataset, reader: int, *, batch: int, seed: int,
                   start_step: int) -> tf.data.Dataset:
  """Batches of one reader: its `source` (its slice of the files), its own shuffle and augmentation seeds."""
  ds = _drop_bad(source)
  if cfg.get("cache", False):
    ds = ds.cache()
  ds = ds.repeat()
  buffer = int(cfg.get("shuffle_buffer", 10_000))
  if buffer > 1:
    ds = ds.shuffle(buffer, seed=seed + 7919 * reader, reshuffle_each_iteration=True)
  ds = ds.skip(start_step * batch)
  ds = _preprocess(ds, cfg.get("pp", ""), seed, reader, start=start_step * batch)
  # An image whose header and end marker pass the reader's check (`shards.check_image`) can still be
  # damaged inside; decoding it fails in `pp`. Skipped with tf.data's warning (not counted: the
  # counts travel with the records, and this one is gone) rather than stopping a long run.
  ds = ds.ignore_errors(log_warning=True)
  return ds.batch(batch, drop_remainder=True)


def _concat_readers(*batches: dict) -> dict:
  out = {k: tf.concat([b[k] for b in batches], axis=0) for k in batches[0] if k != "_skipped"}
  if "_skipped" in batches[0]:  # per-reader running counts add up
    total = tf.add_n([tf.reduce_max(b["_skipped"], axis=0) for b in batches])
    out["_skipped"] = tf.tile(total[None], [tf.shape(out[next(iter(out))])[0], 1])
  return out


def train_dataset(cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, where: str = "data.train") -> tf.data.Dataset:
  """Infinite, shuffled, preprocessed batches for this process, starting at `start_step`.

  The global batch is made of `num_readers` equal parts (default: one per
  process), each from its own slice of the files. A process builds only its
  readers, so it reads only its files, and the global batches depend on the
  reader count alone: 1 process x 8 devices and 2 processes x 4 devices see
  the same data when they use the same `num_readers`.
  """
  check_known(cfg, SOURCE_KEYS, where)
  readers = int(cfg.get("num_readers") or process_count)
  if readers % process_count or global_batch_size % readers:
    raise UserError(f"{where}.num_readers={readers} must be a multiple of the {process_count} processes "
                    f"and divide batch_size={global_batch_size}.")
  mine = range(process_index * readers // process_count, (process_index + 1) * readers // process_count)
  sources = make_sources(cfg, where, mine, readers)
  streams = [_reader_stream(cfg, source, r, batch=global_batch_size // readers, seed=seed,
                            start_step=start_step) for r, source in zip(mine, sources)]
  ds = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(tuple(streams)).map(_concat_readers)
  return ds.prefetch(AUTOTUNE)


def train_iterator(cfg, *, global_batch_size, seed, start_step=0, process_index=0, process_count=1,
                   where="data.train") -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches; the pipeline is rebuilt at `start_step` on resume."""
  ds = train_dataset(cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
                     process_index=process_index, process_count=process_count, where=where)
  return numpy_batches(ds, where)


def numpy_batches(ds: tf.data.Dataset, where: str) -> Iterator[dict[str, np.ndarray]]:
  """`ds` as numpy; an op of the section's pp that fails on an example (a label outside `onehot(N)`, a
  blur wider than the image) is one line naming the section, not TensorFlow's traceback."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      message = e.message.split("\n")[0]
      if "assertion failed: [" in message:  # tf.debugging's: the op's own words, in the first [...]
        message = message.split("assertion failed: [", 1)[1].split("]", 1)[0].replace("\\'", "'")
      raise UserError(f"{where}.pp stopped on an example: {message}") from None
    yield batch


def _padded_to_full_batches(raw: tf.data.Dataset, global_batch_size: int) -> tf.data.Dataset:
  """`(index, example)` for every example, `_mask` True, then copies of the first (`_mask` False) up to a
  whole number of global batches, all in one pass.

  The split's size is not counted beforehand (that would read it twice): the first padding copy's index
  is the size, so a scan learns it there and ends the stream at the next multiple of the global batch.
  """
  plain = tf.autograph.experimental.do_not_convert  # plain tensor code: no AutoGraph conversion (or warnings)
  real = raw.map(plain(lambda x: {**x, "_mask": tf.constant(True)}))
  pads = raw.take(1).map(plain(lambda x: {**x, "_mask": tf.constant(False)})).cache().repeat(global_batch_size - 1)

  @plain
  def track(size, item):
    i, x = item
    size = tf.where((size < 0) & tf.logical_not(x["_mask"]), i, size)
    keep = x["_mask"] | (i < (size + global_batch_size - 1) // global_batch_size * global_batch_size)
    return size, (i, x, keep)
  stream = real.concatenate(pads).enumerate().scan(tf.constant(-1, tf.int64), track)
  return stream.take_while(plain(lambda i, x, keep: keep)).map(plain(lambda i, x, keep: (i, x)))


class EvalSplit:
  """An eval split's pipeline, built once: each `batches()` is one pass over it, as this process's part
  of each global batch; `_mask` marks real examples.

  Every process walks the same padded sequence of global batches (so all take part in the same number
  of collective steps) but decodes only its own part. Kept by an evaluator, its pp is traced once, not
  at every eval (about 4 s an eval for the digits on two CPU cores).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, where: str = "evals"):
    check_known(cfg, SOURCE_KEYS, where)
    self.where, self.global_batch_size, self.process_index = where, global_batch_size, process_index
    self.batch = local_batch_size(global_batch_size, process_count)
    raw = make_source(cfg, where)
    self.size = int(raw.cardinality())  # known for TFDS splits; negative (unknown) for record files
    padded = _padded_to_full_batches(_drop_bad(raw), global_batch_size)
    mine = padded.filter(tf.autograph.experimental.do_not_convert(
        lambda i, x: (i % global_batch_size) // self.batch == process_index))
    ds = _preprocess(mine, cfg.get("pp", ""), 0, 0, indexed=True)
    self.dataset = ds.batch(self.batch, drop_remainder=True).prefetch(AUTOTUNE)

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the split, from its first example."""
    seen, t0 = 0, time.time()
    next_log = t0 + EVAL_PROGRESS_EVERY_S
    for b in numpy_batches(self.dataset, self.where):
      seen += self.global_batch_size
      if self.process_index == 0 and time.time() >= next_log:
        next_log = time.time() + EVAL_PROGRESS_EVERY_S
        log.info("%s", _eval_progress(self.where, seen, self.size, time.time() - t0))
      yield b
    if not seen:  # every process sees the same (empty) stream, so all of them stop here
      raise UserError(f"{self.where} has no usable examples.")


def eval_batches(cfg: ml_collections.ConfigDict, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, where: str = "evals") -> Iterator[dict[str, np.ndarray]]:
  """One pass over an eval split (`EvalSplit`, built for this pass alone)."""
  return EvalSplit(cfg, global_batch_size=global_batch_size, process_index=process_index,
                   process_count=process_count, where=where).batches()


def _eval_progress(where: str, seen: int, size: int, elapsed_s: float) -> str:
  """'evals.val: 12,288 of 50,000 examples, 4,096 ex/s, ETA 0:00:10' (without a known size: no ETA)."""
  from bigvis.metrics import duration
  rate = seen / max(elapsed_s, 1e-9)
  if size < 0:
    return f"{where}: {seen:,} examples, {rate:,.0f} ex/s"
  seen = min(seen, size)  # the last batch is padded
  return f"{where}: {seen:,} of {size:,} examples, {rate:,.0f} ex/s, ETA {duration((size - seen) / rate)}"
