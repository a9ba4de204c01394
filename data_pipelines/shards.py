"""Image-text TFRecord shards: the on-disk format, its writer, and its validating reader.

Schema. Each record is a serialized `tf.train.Example` with
  image  bytes   the encoded image (the writer stores JPEG, the bundled digits PNG)
  text   bytes   the UTF-8 caption (optional for classification-only shards)
  label  int64   an optional class id (missing reads as -1)
  key    bytes   a unique id of the example (missing reads as "")
Shards of one set are named `<prefix>-00000-of-00012.tfrecord` in one folder.

Writing. `write_shards` converts a folder with `captions.jsonl`/`captions.csv`, or
webdataset `.tar` files (img2dataset layout), into shards. Every image is decoded
once with Pillow (`check_image`): unusable items are skipped with a warning naming
them and counted by reason; usable but unusual images (alpha, 16-bit, grayscale,
CMYK, palette, progressive JPEG, other formats) are normalised to 8-bit RGB JPEG
and counted as `converted/<kind>`. Shards appear under their final names only
once all of them are complete, with their record counts in the folder's manifest
(`shard_counts`), which lets readers split the records evenly between them.

Reading. `read_shards` reads with `tf.data.TFRecordDataset` per file followed by
`.ignore_errors(log_warning=True)`, so a shard truncated or corrupted mid-record
loses only the rest of that file (logged, not counted); records that are not
Examples are dropped the same way. Each element is checked in-graph with cheap
header checks (`validate_example`) and carries `_skip_reason` (-1 = usable, else
an index into `SKIP_REASONS`). `count_skips` filters the bad ones and attaches a
cumulative per-reason count `_skipped`, which the input pipeline reports as
`data/skipped/<reason>`.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import sys
import tarfile
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from bigvis.errors import UserError
from data_pipelines import shard_counts

log = logging.getLogger(__name__)

# Order is priority: an example is reported under the first reason that applies.
SKIP_REASONS = ("missing_field", "empty_image", "corrupt_image", "too_large",
                "invalid_utf8", "empty_text")
# Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 178956970
SHARD_SUFFIX = ".tfrecord"
_PILLOW_FORMATS = ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"]
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_JPEG_TAIL = 4096  # bytes searched for the JPEG end-of-image marker


def shard_name(prefix: str, index: int, count: int) -> str:
  """File name of shard `index` of `count`."""
  return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def shard_glob(output_dir: str, prefix: str = "data") -> str:
  """Glob matching every shard of `prefix` in `output_dir`."""
  return os.path.join(output_dir, f"{prefix}-{'[0-9]' * 5}-of-*{SHARD_SUFFIX}")


# ----------------------------------------------------------------------------
# Python-side validation (writer).


def _png_bit_depth(data: bytes) -> int:
  return data[24] if len(data) > 25 and data[12:16] == b"IHDR" else 8


def _has_alpha(im) -> bool:
  return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def _conversion_kind(im, data: bytes) -> str | None:
  """Why `im` cannot be stored as is, or None for a clean baseline 8-bit RGB JPEG."""
  if im.mode == "CMYK":
    return "cmyk"
  if _has_alpha(im):
    return "alpha"
  if im.mode.startswith("I") or (im.format == "PNG" and _png_bit_depth(data) == 16):
    return "16bit"
  if im.mode in ("L", "1"):
    return "grayscale"
  if im.mode == "P":
    return "palette"
  if im.mode != "RGB":
    return im.mode.lower()
  if im.format == "JPEG":
    clean = not im.info.get("progressive") and data.endswith(b"\xff\xd9")
    return None if clean else "jpeg"
  return (im.format or "unknown").lower()


def _to_rgb(im, kind: str):
  from PIL import Image
  if kind == "alpha":
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if im.mode.startswith("I") or im.mode == "F":
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
      arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
  return im.convert("RGB")


def check_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tuple[bytes | None, str | None]:
  """Validates and normalises one encoded image: (bytes, None|conversion kind) or (None, reason).

  A baseline 8-bit RGB JPEG comes back unchanged with kind None; a decodable image
  in another form comes back as an RGB JPEG (quality 95) with its conversion kind
  (`cmyk`, `alpha`, `16bit`, `grayscale`, `palette`, `jpeg`, or the source format
  such as `png`); an unusable one gives None and a reason from `SKIP_REASONS`.
  """
  from PIL import Image
  if data is None:
    return None, "missing_field"
  if len(data) == 0:
    return None, "empty_image"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      im = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError:
      return None, "too_large"
    except Exception:  # Pillow raises many types for undecodable input.
      return None, "corrupt_image"
    w, h = im.size
    if w * h > max_pixels:
      return None, "too_large"
    if w * h == 0:
      return None, "corrupt_image"
    try:
      im.load()
      kind = _conversion_kind(im, data)
      if kind is None:
        return data, None
      rgb = _to_rgb(im, kind)
      out = io.BytesIO()
      rgb.save(out, "JPEG", quality=95)
    except Exception:  # Truncated or otherwise undecodable pixel data.
      return None, "corrupt_image"
  return out.getvalue(), kind


def check_text(text: str | bytes | None) -> tuple[str | None, str | None]:
  """Validates one caption: (stripped text, None) or (None, reason)."""
  if text is None:
    return None, "missing_field"
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError:
      return None, "invalid_utf8"
  if not isinstance(text, str):
    return None, "missing_field"
  try:
    text.encode("utf-8")  # lone surrogates from JSON "\ud800" escapes
  except UnicodeEncodeError:
    return None, "invalid_utf8"
  text = text.strip()
  return (text, None) if text else (None, "empty_text")


# ----------------------------------------------------------------------------
# Writing.


def _bytes(value: str | bytes) -> bytes:
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def serialize_example(example: dict) -> bytes:
  """One dict with image, key and optional text/label -> serialized tf.train.Example."""
  def bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_bytes(value)]))

  feature = {"image": bytes_feature(example["image"]), "key": bytes_feature(example["key"])}
  if example.get("text") is not None:
    feature["text"] = bytes_feature(example["text"])
  if example.get("label") is not None:
    feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(example["label"])]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_examples(examples: Iterable[dict], output_dir: str, shard_size: int = 1000,
                   prefix: str = "data",
                   progress: Callable[[int], None] | None = None) -> list[str]:
  """Writes example dicts to `<prefix>-NNNNN-of-MMMMM.tfrecord` shards; returns their paths.

  Shards are written under temporary names and renamed only when every one is
  complete, so readers never see a partial set; their record counts then go to the
  folder's manifest (`shard_counts`). `progress(n_written)` is called after each shard.
  """
  if shard_size < 1:
    raise UserError(f"shard_size must be at least 1, got {shard_size}.")
  tf.io.gfile.makedirs(output_dir)
  if tf.io.gfile.glob(shard_glob(output_dir, prefix)):
    raise UserError(f"{output_dir} already holds shards named '{prefix}-*'; "
                    "choose another folder or prefix.")
  shard_counts.read_manifest(output_dir)  # a damaged one stops here, not once the shards are written
  token = uuid.uuid4().hex[:8]
  temps: list[str] = []
  writer = None
  written = 0
  try:
    for example in examples:
      if writer is None:
        temps.append(os.path.join(output_dir, f".{prefix}-{len(temps):05d}.tmp-{token}"))
        writer = tf.io.TFRecordWriter(temps[-1])
      writer.write(serialize_example(example))
      written += 1
      if written % shard_size == 0:
        writer.close()
        writer = None
        if progress:
          progress(written)
    if writer is not None:
      writer.close()
      writer = None
      if progress:
        progress(written)
    paths = [os.path.join(output_dir, shard_name(prefix, i, len(temps))) for i in range(len(temps))]
    for tmp, path in zip(temps, paths):
      tf.io.gfile.rename(tmp, path, overwrite=False)
    # Every shard holds `shard_size` records but the last: counted for readers to split evenly.
    counts = [min(shard_size, written - i * shard_size) for i in range(len(paths))]
    if paths:
      shard_counts.record_counts(output_dir, {os.path.basename(p): n for p, n in zip(paths, counts)})
    return paths
  except BaseException:
    if writer is not None:
      writer.close()
    for tmp in temps:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
    raise


def _read_file(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def _int_or_none(value, where: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{where}: label {value!r} is not an integer.")


def _folder_items(folder: str, index: str) -> Iterator[dict]:
  """Items of a folder of images listed in captions.jsonl or captions.csv."""
  path = os.path.join(folder, index)
  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" writes one) is not part of the first column's name.
  with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
    if index.endswith(".jsonl"):
      rows = ((n, line) for n, line in enumerate(f, 1) if line.strip())
    else:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
        raise UserError(f"{path} needs a header line with columns file,text[,label].")
      rows = ((n, row) for n, row in enumerate(reader, 2))
    for n, row in rows:
      where = f"{path} line {n}"
      if isinstance(row, str):
        try:
          row = json.loads(row)
        except json.JSONDecodeError:
          row = None
        if not isinstance(row, dict):
          yield {"name": where, "image": None, "text": None, "label": None, "key": where,
                 "detail": "not a JSON object"}
          continue
      file = row.get("file")
      text = row.get("text")
      if isinstance(text, str):  # Undo surrogateescape: bad bytes stay bad bytes.
        try:
          text = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
          pass  # A lone surrogate escape; check_text reports it as invalid_utf8.
      image = _read_file(os.path.join(folder, file)) if isinstance(file, str) and file else None
      detail = ("no file name" if not (isinstance(file, str) and file) else
                f"no readable file {file}" if image is None else
                "no caption" if text is None else "")
      yield {"name": f"{where} ({file})", "image": image, "text": text,
             "label": _int_or_none(row.get("label"), where),
             "key": str(row.get("key") or file or where), "detail": detail}


def _split_member(name: str) -> tuple[str, str]:
  """webdataset convention: the key is the path up to the first dot of the basename."""
  head, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(head, stem), ext.lower()


def _sample_item(tar_path: str, key: str, files: dict[str, bytes]) -> dict:
  meta = {}
  if "json" in files:
    try:
      meta = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      meta = {}
    meta = meta if isinstance(meta, dict) else {}
  image = next((files[e] for e in _IMAGE_EXTS if e in files), None)
  text = files.get("txt", meta.get("caption"))
  label = files["cls"].decode("utf-8", "replace").strip() if "cls" in files else meta.get("label")
  where = f"{tar_path}:{key}"
  return {"name": where, "image": image, "text": text,
          "label": _int_or_none(label, where), "key": str(meta.get("key") or key)}


def _tar_items(tar_path: str) -> Iterator[dict]:
  """Samples of one webdataset tar: files sharing a key, in order."""
  key, files = None, {}
  try:
    with tarfile.open(tar_path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _split_member(member.name)
        if k != key and key is not None:
          yield _sample_item(tar_path, key, files)
          files = {}
        key = k
        files[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    log.warning("%s is unreadable after sample %s (%s); keeping the samples before it.",
                tar_path, key, e)
    return
  if key is not None:
    yield _sample_item(tar_path, key, files)


def _input_items(input_path: str) -> Iterator[dict]:
  """Raw items (name, image bytes, text, label, key) of any supported input layout."""
  if not os.path.exists(input_path):
    raise UserError(f"input path {input_path} does not exist.")
  if os.path.isfile(input_path):
    if not input_path.endswith(".tar"):
      raise UserError(f"input file {input_path} is not a webdataset .tar file.")
    yield from _tar_items(input_path)
    return
  for index in ("captions.jsonl", "captions.csv"):
    if os.path.isfile(os.path.join(input_path, index)):
      yield from _folder_items(input_path, index)
      return
  tars = sorted(os.path.join(root, f) for root, _, names in os.walk(input_path)
                for f in names if f.endswith(".tar"))
  if not tars:
    raise UserError(f"{input_path} has no captions.jsonl, captions.csv or webdataset .tar files.")
  for tar_path in tars:
    yield from _tar_items(tar_path)


def _checked(items: Iterator[dict], max_pixels: int, workers: int) -> Iterator[tuple]:
  """(item, check_image result, check_text result) in input order, checked on `workers` threads."""
  def check(item):
    return item, check_image(item["image"], max_pixels), check_text(item["text"])

  with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding.
    while chunk := list(islice(items, 64 * workers)):
      yield from pool.map(check, chunk)


def write_shards(input_path: str, output_dir: str, shard_size: int = 1000,
                 max_pixels: int = DEFAULT_MAX_PIXELS, prefix: str = "data",
                 num_workers: int | None = None) -> dict:
  """Converts a captioned image folder or webdataset tars into validated shards; returns a report.

  The report has `written`, `skipped` (reason -> count, every reason present),
  `converted` (kind -> count) and `shards` (paths). Output order is input order.
  """
  skipped = dict.fromkeys(SKIP_REASONS, 0)
  converted: dict[str, int] = {}
  keys: dict[str, int] = {}

  def examples() -> Iterator[dict]:
    workers = num_workers or min(8, os.cpu_count() or 1)
    for item, (image, kind), (text, text_reason) in _checked(_input_items(input_path), max_pixels,
                                                             workers):
      reason = kind if image is None else text_reason
      if reason:
        skipped[reason] += 1
        detail = item.get("detail") if reason == "missing_field" else ""
        log.warning("skipping %s: %s%s", item["name"], reason, f" ({detail})" if detail else "")
        continue
      if kind:
        converted[kind] = converted.get(kind, 0) + 1
      key = item["key"]
      keys[key] = keys.get(key, 0) + 1
      if keys[key] > 1:
        key = f"{key}#{keys[key] - 1}"
      yield {"image": image, "text": text, "label": item["label"], "key": key}

  def progress(n: int) -> None:
    print(f"{n} examples written, {sum(skipped.values())} skipped", file=sys.stderr, flush=True)

  shards = write_examples(examples(), output_dir, shard_size, prefix, progress)
  written = sum(keys.values())
  if not written:
    raise UserError(f"{input_path} yielded no usable examples (skipped: "
                    f"{ {k: v for k, v in skipped.items() if v} }).")
  return {"written": written, "skipped": skipped, "converted": converted, "shards": shards}


# ----------------------------------------------------------------------------
# Reading (in-graph). Functions take one example or a batch: checks are vectorised,
# so `read_shards` validates batches of records and pays each op once per batch.


def _first(sparse: tf.sparse.SparseTensor, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """First value of each row of a [rows, k] string SparseTensor ("" if none) and its presence."""
  dense = tf.sparse.to_dense(sparse, default_value="")
  value = tf.concat([dense, tf.fill([rows, 1], "")], axis=1)[:, 0]
  row = sparse.indices[:, 0]
  count = tf.math.unsorted_segment_sum(tf.ones_like(row), row, rows)
  return value, count > 0


def parse_example(serialized: tf.Tensor) -> dict:
  """Parses serialized Example(s): image, text, label (-1 if absent), key, `_has_image`, `_has_text`."""
  spec = {
      "image": tf.io.VarLenFeature(tf.string),
      "text": tf.io.VarLenFeature(tf.string),
      "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
  }
  shape = tf.shape(serialized)
  flat = tf.reshape(serialized, [-1])
  parsed = tf.io.parse_example(flat, spec)
  out = {"label": parsed["label"], "key": parsed["key"]}
  rows = tf.shape(flat)[0]
  out["image"], out["_has_image"] = _first(parsed["image"], rows)
  out["text"], out["_has_text"] = _first(parsed["text"], rows)
  return {k: tf.reshape(v, shape) for k, v in out.items()}


def _bytes_at(data: tf.Tensor, pos: tf.Tensor | int, size: int) -> tf.Tensor:
  """int64 [B, size] of the bytes of each string from `pos` (zeros past its end)."""
  pos = tf.broadcast_to(tf.cast(pos, tf.int64), tf.shape(data))
  piece = tf.strings.substr(data, pos, tf.fill(tf.shape(data), tf.constant(size, tf.int64)))
  return tf.cast(tf.io.decode_raw(piece, tf.uint8, fixed_length=size), tf.int64)


def _uint(b: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
  """Unsigned integers from columns start..start+size of the byte matrix `b`."""
  cols = range(start, start + size) if big_endian else reversed(range(start, start + size))
  value = tf.zeros_like(b[:, 0])
  for c in cols:
    value = value * 256 + b[:, c]
  return value


def _jpeg_size(data: tf.Tensor, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Walks JPEG marker segments to the first SOF: (height, width), zeros where none is found."""
  def cond(pos, h, w, state):
    return tf.reduce_any(tf.equal(state, 0))

  def body(pos, h, w, state):
    active = tf.equal(state, 0)
    seg = _bytes_at(data, tf.minimum(pos, n), 9)
    m0, m1 = seg[:, 0], seg[:, 1]
    is_ff = tf.equal(m0, 0xFF)
    fill = is_ff & tf.equal(m1, 0xFF)
    sof = (is_ff & (m1 >= 0xC0) & (m1 <= 0xCF) & tf.not_equal(m1, 0xC4)
           & tf.not_equal(m1, 0xC8) & tf.not_equal(m1, 0xCC))
    alone = is_ff & (tf.equal(m1, 0x01) | ((m1 >= 0xD0) & (m1 <= 0xD7)))
    seg_len = _uint(seg, 2, 2, True)
    bad = (~is_ff | tf.equal(m1, 0xDA) | tf.equal(m1, 0xD9) | tf.equal(m1, 0) | (pos + 9 > n)
           | (~fill & ~sof & ~alone & (seg_len < 2)))
    new_state = tf.where(bad, 2, tf.where(sof, 1, 0))
    found = active & ~bad & sof
    h = tf.where(found, _uint(seg, 5, 2, True), h)
    w = tf.where(found, _uint(seg, 7, 2, True), w)
    one = tf.ones_like(seg_len)
    step = tf.where(fill, one, tf.where(alone, 2 * one, 2 + seg_len))
    return (tf.where(active, pos + step, pos), h, w, tf.where(active, new_state, state))

  zeros = tf.zeros_like(n)
  _, h, w, state = tf.while_loop(
      cond, body, (zeros + 2, zeros, zeros, tf.zeros_like(n, tf.int32)), maximum_iterations=1000)
  found = tf.equal(state, 1)
  return tf.where(found, h, 0), tf.where(found, w, 0)


def _image_header(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """For a vector of encoded images: (recognised and complete: bool, height*width: int64).

  Reads only the first 32 bytes, the JPEG marker segments, and the last bytes.
  """
  n = tf.cast(tf.strings.length(data), tf.int64)
  b = _bytes_at(data, 0, 32)

  def starts(*values):
    return tf.reduce_all(tf.equal(b[:, :len(values)], tf.constant(values, tf.int64)), axis=1)

  # JPEG: SOF dimensions (only walked for JPEGs); an end-of-image marker near the end.
  is_jpeg = starts(0xFF, 0xD8, 0xFF)
  jh, jw = _jpeg_size(data, tf.where(is_jpeg, n, 0))
  tail = _bytes_at(data, tf.maximum(n - _JPEG_TAIL, 0), _JPEG_TAIL)
  has_eoi = tf.reduce_any(tf.equal(tail[:, :-1], 0xFF) & tf.equal(tail[:, 1:], 0xD9), axis=1)
  jpeg_ok = is_jpeg & (jh > 0) & (jw > 0) & has_eoi
  # PNG: IHDR dimensions and bit depth; the last chunk must be IEND.
  is_png = starts(0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
  pw, ph, depth = _uint(b, 16, 4, True), _uint(b, 20, 4, True), b[:, 24:25]
  iend = tf.equal(_uint(_bytes_at(data, tf.maximum(n - 8, 0), 4), 0, 4, True), 0x49454E44)
  png_ok = (is_png & (n >= 57) & tf.equal(_uint(b, 12, 4, True), 0x49484452) & (pw > 0) & (ph > 0)
            & tf.reduce_any(tf.equal(depth, [[1, 2, 4, 8, 16]]), axis=1) & iend)
  # GIF: logical screen size.
  is_gif = starts(0x47, 0x49, 0x46, 0x38) & (tf.equal(b[:, 4], 0x37) | tf.equal(b[:, 4], 0x39))
  gw, gh = _uint(b, 6, 2, False), _uint(b, 8, 2, False)
  gif_ok = is_gif & (n > 13) & (gw > 0) & (gh > 0)
  # BMP: BITMAPCOREHEADER (16-bit sizes) or later headers (signed 32-bit sizes).
  is_bmp = starts(0x42, 0x4D)
  core = tf.equal(_uint(b, 14, 4, False), 12)
  bw = tf.where(core, _uint(b, 18, 2, False), _uint(b, 18, 4, False))
  bh = tf.where(core, _uint(b, 20, 2, False), _uint(b, 22, 4, False))
  bh = tf.abs(tf.where(bh >= 2**31, bh - 2**32, bh))
  bmp_ok = is_bmp & (n > 26) & (bw > 0) & (bw < 2**31) & (bh > 0) & (_uint(b, 2, 4, False) <= n)
  # WEBP: RIFF container whose first chunk is VP8 (lossy), VP8L (lossless) or VP8X (extended).
  is_webp = starts(0x52, 0x49, 0x46, 0x46) & tf.equal(_uint(b, 8, 4, True), 0x57454250)
  chunk = _uint(b, 12, 4, True)
  lossy, lossless = tf.equal(chunk, 0x56503820), tf.equal(chunk, 0x5650384C)
  extended = tf.equal(chunk, 0x56503858)
  bits = _uint(b, 21, 4, False)
  ww = tf.where(lossy, _uint(b, 26, 2, False) % 16384,
                tf.where(lossless, 1 + bits % 16384, 1 + _uint(b, 24, 3, False)))
  wh = tf.where(lossy, _uint(b, 28, 2, False) % 16384,
                tf.where(lossless, 1 + (bits // 16384) % 16384, 1 + _uint(b, 27, 3, False)))
  webp_ok = (is_webp & (lossy | lossless | extended) & (n >= 30) & (ww > 0) & (wh > 0)
             & (_uint(b, 4, 4, False) + 8 <= n))

  ok = jpeg_ok | png_ok | gif_ok | bmp_ok | webp_ok
  pixels = tf.where(jpeg_ok, jh * jw, tf.where(png_ok, ph * pw, tf.where(
      gif_ok, gh * gw, tf.where(bmp_ok, bh * bw, tf.where(webp_ok, wh * ww, 0)))))
  return ok, pixels


def validate_example(features: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                     require_text: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """Cheap in-graph checks of parsed example(s): (ok: bool, reason index or -1: int32), per example.

  Images are judged from their bytes alone (format magic, header dimensions,
  PNG bit depth, JPEG/PNG end markers) without decoding pixels; captions for
  emptiness after stripping ASCII whitespace and for valid UTF-8. With
  `require_text=False` (classification data) the caption is not looked at.
  """
  image, text = features["image"], features["text"]
  shape = tf.shape(image)
  image, text = tf.reshape(image, [-1]), tf.reshape(text, [-1])
  true = tf.ones_like(image, tf.bool)
  has_image = tf.reshape(features.get("_has_image", true), [-1])
  has_text = tf.reshape(features.get("_has_text", true), [-1])
  ok, reason = _checks(int(max_pixels), bool(require_text))(image, text, has_image, has_text)
  return tf.reshape(ok, shape), tf.reshape(reason, shape)


@functools.lru_cache(maxsize=None)
def _checks(max_pixels: int, require_text: bool):
  """`validate_example`'s checks of vectors as one tf.function, traced once per process and setting:
  inlined, its graph (the JPEG walk above all) took about a second to build in every pipeline."""
  spec = lambda dtype: tf.TensorSpec([None], dtype)  # noqa: E731
  return tf.function(functools.partial(_vector_checks, max_pixels=max_pixels, require_text=require_text),
                     input_signature=[spec(tf.string), spec(tf.string), spec(tf.bool), spec(tf.bool)],
                     autograph=False)


def _vector_checks(image: tf.Tensor, text: tf.Tensor, has_image: tf.Tensor, has_text: tf.Tensor, *,
                   max_pixels: int, require_text: bool) -> tuple[tf.Tensor, tf.Tensor]:
  header_ok, pixels = _image_header(image)
  utf8 = tf.equal(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace"), text)
  need = tf.constant(require_text)
  checks = {
      "missing_field": ~has_image | (need & ~has_text),
      "empty_image": tf.equal(tf.strings.length(image), 0),
      "corrupt_image": ~header_ok,
      "too_large": pixels > max_pixels,
      "invalid_utf8": need & ~utf8,
      "empty_text": need & tf.equal(tf.strings.strip(text), ""),
  }
  bad = tf.stack([checks[r] for r in SKIP_REASONS], axis=1)
  ok = ~tf.reduce_any(bad, axis=1)
  return ok, tf.where(ok, -1, tf.cast(tf.argmax(tf.cast(bad, tf.int32), axis=1), tf.int32))


def read_shards(files: list[str] | list[tuple[str, int, int, int]], max_pixels: int = DEFAULT_MAX_PIXELS,
                require_text: bool = True, cycle_length: int = 1,
                batch_size: int = 256) -> tf.data.Dataset:
  """Parsed, validated examples of `files`: image, text, label, key and `_skip_reason` (-1 = ok).

  An entry may be a part of a file, (path, first, stop, modulus): its records whose index i has
  first <= i % modulus < stop, or first <= i < stop for modulus 0 (`sources.reader_parts`), read
  after the whole files. Files are read in the given order (`cycle_length` > 1 interleaves that
  many whole files, deterministically);
  damaged files are read up to the damage and records that are not Examples are dropped, each with
  a logged warning. Records are parsed and checked `batch_size` at a time, then yielded one by one.
  """
  parts = [(f, 0, 1, 1) if isinstance(f, str) else tuple(f) for f in files]
  if not parts:
    raise UserError("no shard files to read.")
  missing = [p for p, *_ in parts if "://" not in p and not os.path.exists(p)]
  if missing:
    raise UserError(f"shard file {missing[0]} does not exist.")

  # Plain tensor code with no Python control flow: skip AutoGraph's slow source conversion.
  no_autograph = tf.autograph.experimental.do_not_convert

  @no_autograph
  def per_file(path):
    return tf.data.TFRecordDataset(path).ignore_errors(log_warning=True)

  @no_autograph
  def part_of_file(path, first, stop, modulus):
    kept = per_file(path).enumerate().filter(lambda i, _: (i % modulus >= first) & (i % modulus < stop))
    return kept.map(lambda _, record: record)

  @no_autograph
  def range_of_file(path, first, stop):
    return per_file(path).skip(first).take(stop - first)

  @no_autograph
  def check(features):
    _, features["_skip_reason"] = validate_example(features, max_pixels, require_text)
    del features["_has_image"], features["_has_text"]
    return features

  whole = [p for p, *_, m in parts if m == 1]
  cut = [p for p in parts if p[-1] > 1]
  ranges = [p[:3] for p in parts if p[-1] == 0]
  ds = None
  if whole:  # read as they are: no per-record index to keep
    ds = tf.data.Dataset.from_tensor_slices(whole)
    if cycle_length > 1:
      ds = ds.interleave(per_file, cycle_length=cycle_length, num_parallel_calls=cycle_length,
                         deterministic=True)
    else:
      ds = ds.flat_map(per_file)
  # Parts of files, after the whole ones: slices by index modulo, then runs of records (whose
  # reading stops at the last one).
  for some, read in ((cut, part_of_file), (ranges, range_of_file)):
    if some:
      more = tf.data.Dataset.from_tensor_slices(tuple(np.array(c) for c in zip(*some))).flat_map(read)
      ds = more if ds is None else ds.concatenate(more)
  # Parsed one by one, so a record that is not an Example costs only itself.
  ds = ds.map(no_autograph(parse_example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True).batch(batch_size)
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.unbatch()


def count_skips(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples with `_skip_reason` >= 0; kept ones get cumulative int64 `_skipped` per reason.

  Skips after the last kept example are not reflected (no element carries them).
  """
  num = len(SKIP_REASONS)

  @tf.autograph.experimental.do_not_convert
  def step(counts, features):
    reason = features.pop("_skip_reason")
    counts = counts + tf.one_hot(reason, num, dtype=tf.int64)  # reason -1 adds nothing
    features["_skipped"] = counts
    return counts, (features, reason < 0)

  @tf.autograph.experimental.do_not_convert
  def keep(features, ok):
    return ok

  @tf.autograph.experimental.do_not_convert
  def drop_flag(features, ok):
    return features

  ds = ds.scan(tf.zeros([num], tf.int64), step)
  return ds.filter(keep).map(drop_flag)
