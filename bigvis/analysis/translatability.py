"""Image translatability of words across languages on the MMID layout.

Follows Khani et al. (NAACL 2021): a word and its translation are embedded
through their image sets; intra-cluster similarity says how consistently one
word is depicted, inter-cluster similarity how alike the two words' images are.
A pair is *translatable* when both words beat their language's intra threshold
and the pair beats the language pair's inter threshold, all thresholds coming
from seeded random non-translation pairs. Formulas: docs/translatability.md.

Top-level imports are numpy only, so `bigvis --help` stays fast; Pillow,
scikit-learn, tqdm and matplotlib are imported where they are used.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import math
import os
import sys
import zipfile
import zlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from bigvis.errors import UserError
from bigvis.image_files import is_image_name, load_rgb

EmbedFn = Callable[[list[np.ndarray]], np.ndarray]
WordKey = tuple[str, str]  # (language, word)

PAIR_HEADER = ("src_lang", "src_word", "tgt_lang", "tgt_word")
PAIRS_TSV_COLUMNS = (
    "src_lang", "tgt_lang", "src_word", "tgt_word", "intra_src", "intra_tgt",
    "inter_avgmax", "homogeneity", "translatable", "intra_src_mean",
    "intra_tgt_mean", "rank", "n_src_images", "n_tgt_images", "concreteness")
LANGUAGE_PAIR_COLUMNS = (
    "src_lang", "tgt_lang", "n_pairs", "n_translatable", "ratio_all",
    "n_concrete", "ratio_concrete", "mrr", "top1", "top5", "top10",
    "n_source_words", "n_candidates", "intra_threshold_src",
    "intra_threshold_tgt", "inter_threshold", "n_random_pairs", "random_ratio",
    "inter_mean_true", "inter_mean_random", "homogeneity_mean_true",
    "homogeneity_mean_random")
MIN_IMAGES = 2  # intra similarity needs another image of the same word


# --------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class Pair:
  """One dictionary entry: `src_word` in `src_lang` translates to `tgt_word` in `tgt_lang`."""
  src_lang: str
  src_word: str
  tgt_lang: str
  tgt_word: str

  @property
  def src(self) -> WordKey:
    return (self.src_lang, self.src_word)

  @property
  def tgt(self) -> WordKey:
    return (self.tgt_lang, self.tgt_word)


@dataclasses.dataclass
class SkipLog:
  """What was skipped and why, so bad input is reported instead of crashing the run."""
  entries: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

  def add(self, kind: str, lang: str, item: str, reason: str) -> None:
    """Records one skipped image, word, pair or index line."""
    self.entries.append((kind, lang, item, reason))

  def counts(self) -> dict[tuple[str, str], int]:
    """(kind, reason) -> how many, in first-seen order."""
    return dict(collections.Counter((k, r) for k, _, _, r in self.entries))

  def count(self, kind: str) -> int:
    """How many entries of one kind ("image", "word", "pair", "index")."""
    return sum(1 for k, _, _, _ in self.entries if k == kind)


@dataclasses.dataclass(frozen=True)
class PairScore:
  """All scores of one translation pair; `translatable` is None when a threshold is undefined."""
  pair: Pair
  intra_src: float
  intra_tgt: float
  intra_src_mean: float
  intra_tgt_mean: float
  inter_avgmax: float
  homogeneity: float
  translatable: bool | None
  rank: int
  n_src_images: int
  n_tgt_images: int
  concreteness: float | None


@dataclasses.dataclass(frozen=True)
class LanguagePairSummary:
  """Ratio, retrieval and threshold figures of one (source, target) language pair."""
  src_lang: str
  tgt_lang: str
  n_pairs: int
  n_translatable: int
  ratio_all: float
  n_concrete: int
  ratio_concrete: float
  mrr: float
  top1: float
  top5: float
  top10: float
  n_source_words: int
  n_candidates: int
  intra_threshold_src: float
  intra_threshold_tgt: float
  inter_threshold: float
  n_random_pairs: int
  random_ratio: float
  inter_mean_true: float
  inter_mean_random: float
  homogeneity_mean_true: float
  homogeneity_mean_random: float


@dataclasses.dataclass
class Report:
  """Everything `analyse` computed, in input order, plus the skip log and settings."""
  pairs: list[PairScore]
  language_pairs: list[LanguagePairSummary]
  intra_thresholds: dict[str, float]
  skips: SkipLog
  settings: dict[str, object]


# --------------------------------------------------------------------------
# Metrics (pure functions on [n_images, dim] embeddings)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length, so dot products are cosine similarities."""
  x = np.asarray(x, dtype=np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def cosine_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """[n, m] cosine similarities between the rows of x and of y."""
  return l2_normalize(x) @ l2_normalize(y).T


def intra_median_max(x: np.ndarray) -> float:
  """Median over images of the best cosine to another image of the same word (Khani et al.)."""
  s = cosine_matrix(x, x)
  if len(s) < 2:
    return math.nan
  np.fill_diagonal(s, -np.inf)
  return float(np.median(s.max(axis=1)))


def intra_mean_pairwise(x: np.ndarray) -> float:
  """Mean cosine over all pairs of distinct images of one word."""
  s = cosine_matrix(x, x)
  n = len(s)
  if n < 2:
    return math.nan
  return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def avgmax(x: np.ndarray, y: np.ndarray) -> float:
  """AvgMax (Hewitt et al. 2018): mean over x's images of the best cosine to any image of y."""
  return float(cosine_matrix(x, y).max(axis=1).mean())


def avgmax_matrix(srcs: Sequence[np.ndarray], tgts: Sequence[np.ndarray],
                  max_block: int = 1 << 24) -> np.ndarray:
  """[len(srcs), len(tgts)] AvgMax scores, in blocks of at most max_block similarities."""
  out = np.zeros((len(srcs), len(tgts)), dtype=np.float64)
  if not len(srcs) or not len(tgts):
    return out
  y = l2_normalize(np.concatenate(list(tgts)))
  tgt_starts = np.cumsum([0] + [len(t) for t in tgts[:-1]])
  for lo, hi in _blocks([len(s) for s in srcs], max(1, max_block // len(y))):
    x = l2_normalize(np.concatenate(list(srcs[lo:hi])))
    best = np.maximum.reduceat(x @ y.T, tgt_starts, axis=1)  # [rows, len(tgts)]
    counts = np.array([len(s) for s in srcs[lo:hi]])
    src_starts = np.cumsum(np.concatenate([[0], counts[:-1]]))
    out[lo:hi] = np.add.reduceat(best, src_starts, axis=0) / counts[:, None]
  return out


def _blocks(sizes: Sequence[int], max_rows: int) -> Iterator[tuple[int, int]]:
  """Consecutive [lo, hi) ranges whose summed sizes stay under max_rows (one item at least)."""
  lo, rows = 0, 0
  for i, n in enumerate(sizes):
    if i > lo and rows + n > max_rows:
      yield lo, i
      lo, rows = i, 0
    rows += n
  if lo < len(sizes):
    yield lo, len(sizes)


def homogeneity_2means(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
  """Homogeneity of a 2-means clustering of the pooled images w.r.t. language; low = alike."""
  from sklearn.cluster import KMeans
  from sklearn.metrics import homogeneity_score

  z = np.concatenate([l2_normalize(x), l2_normalize(y)]).astype(np.float64)
  labels = np.repeat([0, 1], [len(x), len(y)])
  if len(x) == 0 or len(y) == 0 or len(np.unique(z.round(6), axis=0)) < 2:
    return 0.0  # nothing to separate
  clusters = KMeans(n_clusters=2, n_init=4, random_state=seed).fit_predict(z)
  return float(homogeneity_score(labels, clusters))


def percentile_threshold(values: Sequence[float], percentile: float) -> float:
  """The percentile (numpy's linear interpolation) of random-pair scores; NaN if none."""
  values = np.asarray(values, dtype=np.float64)
  values = values[np.isfinite(values)]
  return float(np.percentile(values, percentile)) if len(values) else math.nan


def gold_rank(scores: np.ndarray, gold: Sequence[int], target: int) -> int:
  """1 + the non-gold candidates scoring at least as high as `target` (ties never help)."""
  mask = np.ones(len(scores), dtype=bool)
  mask[list(gold)] = False
  return 1 + int(np.sum(scores[mask] >= scores[target]))


def is_translatable(intra_src: float, intra_tgt: float, inter: float, thr_src: float,
                    thr_tgt: float, thr_inter: float) -> bool | None:
  """Both intra scores and the inter score beat their thresholds; None if one is undefined."""
  if any(math.isnan(t) for t in (thr_src, thr_tgt, thr_inter)):
    return None
  return bool(intra_src > thr_src and intra_tgt > thr_tgt and inter > thr_inter)


# --------------------------------------------------------------------------
# Random baselines (seeded, independent of the order languages are met)


def _rng(seed: int, *names: str) -> np.random.Generator:
  """A generator keyed by seed and names: each language (pair) draws the same every run."""
  return np.random.default_rng([seed] + [zlib.crc32(n.encode("utf-8")) for n in names])


def pseudo_word_intra_scores(words: Sequence[np.ndarray], n_draws: int,
                             rng: np.random.Generator) -> np.ndarray:
  """Intra scores of random pseudo-words: what a word with no coherent depiction would score.

  A pseudo-word takes the image count n of a random word of the language and
  one random image from each of n different random words (or, when the
  language has fewer than n words, n images drawn from its whole pool).
  """
  counts = np.array([len(w) for w in words])
  pool = np.concatenate(list(words))
  starts = np.cumsum(np.concatenate([[0], counts[:-1]]))
  scores = np.empty(n_draws)
  for d in range(n_draws):
    n = int(min(counts[rng.integers(len(words))], len(pool)))
    if len(words) >= n:
      chosen = rng.choice(len(words), size=n, replace=False)
      idx = starts[chosen] + rng.integers(0, counts[chosen])
    else:
      idx = rng.choice(len(pool), size=n, replace=False)
    scores[d] = intra_median_max(pool[idx])
  return scores


def sample_random_pairs(n_src: int, n_tgt: int, translations: set[tuple[int, int]],
                        n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """Up to n distinct (src index, tgt index) pairs that are not translations, drawn uniformly."""
  total = n_src * n_tgt
  k = min(total, n + len(translations))
  drawn = rng.choice(total, size=k, replace=False) if k else []
  pairs = [(int(f) // n_tgt, int(f) % n_tgt) for f in drawn]
  return [p for p in pairs if p not in translations][:n]


# --------------------------------------------------------------------------
# Reading inputs


def read_pairs(path: str, dict_target_lang: str = "en") -> list[Pair]:
  """Pairs from a 4-column TSV, or an MMID `dict.xx` file (xx -> dict_target_lang)."""
  if not os.path.isfile(path):
    raise UserError(f"pairs file '{path}' does not exist.")
  name = os.path.basename(path)
  if name.startswith("dict.") and len(name) > 5:
    return _read_dict(path, name[5:], dict_target_lang)
  pairs = []
  for lineno, fields in _tsv_lines(path):
    if lineno == 1 and tuple(f.lower() for f in fields) == PAIR_HEADER:
      continue
    if len(fields) != 4 or not all(fields):
      raise UserError(f"{path}:{lineno} should be src_lang<TAB>src_word<TAB>tgt_lang<TAB>tgt_word "
                      f"but has {len(fields)} field(s).")
    _check_lang(fields[0], path, lineno)
    _check_lang(fields[2], path, lineno)
    pairs.append(Pair(*fields))
  return pairs


def _read_dict(path: str, lang: str, tgt_lang: str) -> list[Pair]:
  """MMID dictionary: a foreign word, then its English translations, tab-separated."""
  _check_lang(lang, path, 0)
  pairs = []
  for _, fields in _tsv_lines(path):
    word, translations = fields[0], [f for f in fields[1:] if f]
    pairs.extend(Pair(lang, word, tgt_lang, t) for t in translations if word)
  return pairs


def _tsv_lines(path: str, on_bad_line: Callable[[int], None] | None = None
               ) -> Iterator[tuple[int, list[str]]]:
  """(1-based line number, stripped fields) of the non-blank lines of a UTF-8 TSV file.

  A line that is not UTF-8 goes to `on_bad_line(lineno)` when given (data such as
  MMID's index.tsv, where one bad byte must not stop the run), else is an error
  naming the file and line (a file the user passes).
  """
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for lineno, line in enumerate(f, 1):
      if not _is_utf8(line):
        if on_bad_line is None:
          raise UserError(f"{path}:{lineno} is not UTF-8 text.")
        on_bad_line(lineno)
      elif line.strip():
        yield lineno, [c.strip() for c in line.rstrip("\r\n").split("\t")]


def _is_utf8(line: str) -> bool:
  """False for a line read with errors="surrogateescape" that held bytes UTF-8 cannot decode."""
  try:
    line.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _check_lang(lang: str, path: str, lineno: int) -> None:
  """Language codes name folders under --mmid, so they must be plain names."""
  if not lang or lang in (".", "..") or "/" in lang or "\\" in lang:
    where = f"{path}:{lineno}" if lineno else path
    raise UserError(f"{where} has language '{lang}', which is not a plain folder name.")


def expand_pair_paths(paths: Sequence[str]) -> list[str]:
  """Files as given; a folder stands for its `dict.*` and `*.tsv` files, sorted."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(os.path.join(p, f) for f in os.listdir(p)
                     if f.startswith("dict.") or f.endswith(".tsv"))
      if not found:
        raise UserError(f"pairs folder '{p}' holds no dict.* or *.tsv files.")
      out.extend(found)
    else:
      out.append(p)
  return out


def read_concreteness(path: str) -> dict[str, float]:
  """`word<TAB>score` lines (extra columns ignored, a header line allowed) -> {word: score}."""
  if not os.path.isfile(path):
    raise UserError(f"concreteness file '{path}' does not exist.")
  scores = {}
  for lineno, fields in _tsv_lines(path):
    try:
      if len(fields) < 2:
        raise ValueError
      scores[fields[0]] = float(fields[1])
    except ValueError:
      if lineno == 1:
        continue  # header
      raise UserError(f"{path}:{lineno} should be word<TAB>score.") from None
  return scores


def read_index(lang_dir: str, skips: SkipLog, lang: str) -> dict[str, str]:
  """MMID `index.tsv`: word -> image folder name (first occurrence wins; bad lines logged)."""
  index = {}
  bad_line = lambda lineno: skips.add("index", lang, f"line {lineno}", "index.tsv line is not UTF-8")
  for lineno, fields in _tsv_lines(os.path.join(lang_dir, "index.tsv"), bad_line):
    if len(fields) < 2 or not fields[0] or not fields[1]:
      skips.add("index", lang, f"line {lineno}", "malformed index.tsv line")
      continue
    index.setdefault(fields[0], fields[1])
  return index


def resolve_word_folders(mmid_root: str, keys: Iterable[WordKey],
                         skips: SkipLog) -> dict[WordKey, str]:
  """(lang, word) -> its folder under mmid_root; words the index lacks are logged."""
  if not os.path.isdir(mmid_root):
    raise UserError(f"MMID root '{mmid_root}' is not a folder.")
  indexes: dict[str, dict[str, str] | None] = {}
  out = {}
  for lang, word in keys:
    if lang not in indexes:
      lang_dir = os.path.join(mmid_root, lang)
      has_index = os.path.isfile(os.path.join(lang_dir, "index.tsv"))
      indexes[lang] = read_index(lang_dir, skips, lang) if has_index else None
    index = indexes[lang]
    if index is None:
      skips.add("word", lang, word, "language has no index.tsv")
    elif word not in index:
      skips.add("word", lang, word, "missing from index.tsv")
    else:
      out[(lang, word)] = os.path.join(mmid_root, lang, index[word])
  return out


# --------------------------------------------------------------------------
# Features: from images through embed_fn, or precomputed .npy/.npz


def list_images(folder: str, max_images: int) -> list[str]:
  """The first max_images image files of a word folder, sorted by name."""
  if not os.path.isdir(folder):
    return []
  names = sorted(f for f in os.listdir(folder) if is_image_name(f))
  return [os.path.join(folder, f) for f in names[:max_images]]


def embed_image_folders(folders: Mapping[WordKey, str], embed_fn: EmbedFn, skips: SkipLog,
                        batch_size: int = 64, max_images: int = 100,
                        progress: bool = True) -> dict[WordKey, np.ndarray]:
  """Embeds all words' images in batches of batch_size across words; bad images are logged."""
  from tqdm import tqdm

  listing = {}
  for key, folder in folders.items():
    if os.path.isdir(folder):
      listing[key] = list_images(folder, max_images)
    else:
      skips.add("word", key[0], key[1], "word folder missing")
  rows: dict[WordKey, list[np.ndarray]] = {k: [] for k in listing}
  batch: list[np.ndarray] = []
  owners: list[WordKey] = []

  def flush() -> None:
    if batch:
      feats = np.asarray(embed_fn(list(batch)), dtype=np.float32)
      if feats.ndim != 2 or len(feats) != len(batch):
        raise UserError(f"the image embedder returned shape {feats.shape} for {len(batch)} images; "
                        "expected [n_images, dim].")
      for owner, f in zip(owners, feats):
        rows[owner].append(f)
      batch.clear()
      owners.clear()

  total = sum(len(v) for v in listing.values())
  with tqdm(total=total, unit="img", desc="embedding images", disable=not progress,
            file=sys.stderr) as bar:
    for key, paths in listing.items():
      for path in paths:
        image = load_rgb(path)
        bar.update(1)
        if image is None:
          skips.add("image", key[0], path, "unreadable image")
          continue
        batch.append(image)
        owners.append(key)
        if len(batch) >= batch_size:
          flush()
    flush()
  return {k: np.stack(v) if v else np.zeros((0, 0), np.float32) for k, v in rows.items()}


def load_feature_files(features_dir: str, folders: Mapping[WordKey, str],
                       skips: SkipLog) -> dict[WordKey, np.ndarray]:
  """Precomputed features: DIR/<lang>/<folder>.npy or one DIR/<lang>.npz keyed by folder name."""
  if not os.path.isdir(features_dir):
    raise UserError(f"features folder '{features_dir}' does not exist.")
  by_lang: dict[str, list[WordKey]] = collections.defaultdict(list)
  for key in folders:
    by_lang[key[0]].append(key)
  out = {}
  for lang, keys in by_lang.items():
    lang_dir = os.path.join(features_dir, lang)
    npz_path = lang_dir + ".npz"
    if os.path.isdir(lang_dir):
      for key in keys:
        path = os.path.join(lang_dir, os.path.basename(folders[key]) + ".npy")
        if os.path.isfile(path):
          out[key] = _load_npy(path)
        else:
          skips.add("word", lang, key[1], "feature file missing")
    elif os.path.isfile(npz_path):
      out.update(_load_npz(npz_path, lang, keys, folders, skips))
    else:
      for key in keys:
        skips.add("word", lang, key[1], "no features for language")
  return out


def _load_npy(path: str) -> np.ndarray:
  """One .npy matrix, refusing pickles."""
  with open(path, "rb") as f:
    if f.read(6) != b"\x93NUMPY":
      raise UserError(f"feature file '{path}' is not a .npy array (pickles are never loaded).")
  try:
    return _check_matrix(np.load(path, allow_pickle=False), path)
  except ValueError as e:
    raise UserError(f"feature file '{path}' cannot be read without pickle: {e}") from None


def _load_npz(path: str, lang: str, keys: Sequence[WordKey], folders: Mapping[WordKey, str],
              skips: SkipLog) -> dict[WordKey, np.ndarray]:
  """The words of one language from its .npz archive, refusing pickles."""
  if not zipfile.is_zipfile(path):
    raise UserError(f"feature file '{path}' is not a .npz archive (pickles are never loaded).")
  out = {}
  with np.load(path, allow_pickle=False) as archive:
    names = set(archive.files)
    for key in keys:
      name = os.path.basename(folders[key])
      if name not in names:
        skips.add("word", lang, key[1], "feature array missing")
        continue
      try:
        out[key] = _check_matrix(archive[name], f"{path}[{name}]")
      except ValueError as e:
        raise UserError(f"feature array '{path}[{name}]' cannot be read without pickle: "
                        f"{e}") from None
  return out


def _check_matrix(x: np.ndarray, where: str) -> np.ndarray:
  """Features must be a numeric [n_images, dim] matrix."""
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
    raise UserError(f"features '{where}' have shape {x.shape} and dtype {x.dtype}; "
                    "expected a numeric [n_images, dim] matrix.")
  return x.astype(np.float32)


def clean_features(raw: Mapping[WordKey, np.ndarray], skips: SkipLog,
                   min_images: int = MIN_IMAGES) -> dict[WordKey, np.ndarray]:
  """Unit-length rows; drops non-finite or zero rows and words left with fewer than min_images."""
  dims = {x.shape[1] for x in raw.values() if len(x)}
  if len(dims) > 1:
    raise UserError(f"features have different dimensions {sorted(dims)}; "
                    "embed every language with the same model.")
  out = {}
  for (lang, word), x in raw.items():
    norms = np.linalg.norm(x, axis=1) if len(x) else np.zeros(0)
    good = np.isfinite(norms) & (norms > 0)
    for row in np.flatnonzero(~good):  # one entry per image, so the image counts count images
      skips.add("image", lang, f"{word} (feature row {row})", "non-finite or zero embedding")
    x = x[good]
    if len(x) == 0:
      skips.add("word", lang, word, "no readable images")
    elif len(x) < min_images:
      skips.add("word", lang, word, f"fewer than {min_images} usable images")
    else:
      out[(lang, word)] = l2_normalize(x)
  return out


# --------------------------------------------------------------------------
# Analysis


def analyse(pairs: Sequence[Pair], features: Mapping[WordKey, np.ndarray], *,
            concreteness: Mapping[str, float] | None = None, concreteness_threshold: float = 4.0,
            random_pairs: int = 1000, percentile: float = 90.0, seed: int = 0,
            skips: SkipLog | None = None) -> Report:
  """Scores every pair, sets thresholds from random pairs, ranks translations by AvgMax."""
  skips = skips if skips is not None else SkipLog()
  usable = _usable_pairs(pairs, features, skips)
  intra = {k: (intra_median_max(features[k]), intra_mean_pairwise(features[k]))
           for p in usable for k in (p.src, p.tgt)}
  thresholds = _intra_thresholds(usable, features, random_pairs, percentile, seed)
  translations = {frozenset((p.src, p.tgt)) for p in pairs}
  scores: dict[Pair, PairScore] = {}
  summaries = []
  by_lang_pair: dict[tuple[str, str], list[Pair]] = collections.defaultdict(list)
  for p in usable:
    by_lang_pair[(p.src_lang, p.tgt_lang)].append(p)
  ctx = _PairContext(features, intra, thresholds, translations, concreteness,
                     concreteness_threshold, random_pairs, percentile, seed)
  for (src_lang, tgt_lang), group in by_lang_pair.items():
    group_scores, summary = _analyse_language_pair(src_lang, tgt_lang, group, ctx)
    scores.update(group_scores)
    summaries.append(summary)
  settings = {"random_pairs": random_pairs, "percentile": percentile, "seed": seed,
              "concreteness_threshold": concreteness_threshold if concreteness else None}
  return Report([scores[p] for p in usable], summaries, thresholds, skips, settings)


def _usable_pairs(pairs: Sequence[Pair], features: Mapping[WordKey, np.ndarray],
                  skips: SkipLog) -> list[Pair]:
  """Distinct pairs whose two words both have features; the others are logged."""
  out, seen = [], set()
  for p in pairs:
    if p in seen:
      continue
    seen.add(p)
    missing = [side for side, k in (("source", p.src), ("target", p.tgt)) if k not in features]
    if missing:
      skips.add("pair", p.src_lang + "-" + p.tgt_lang, f"{p.src_word}\t{p.tgt_word}",
                " and ".join(missing) + " word has no usable images")
    else:
      out.append(p)
  return out


def _intra_thresholds(usable: Sequence[Pair], features: Mapping[WordKey, np.ndarray],
                      n_draws: int, percentile: float, seed: int) -> dict[str, float]:
  """Per language: the percentile of pseudo-word intra scores over that language's words."""
  vocab: dict[str, dict[str, None]] = collections.defaultdict(dict)
  for p in usable:
    vocab[p.src_lang][p.src_word] = None
    vocab[p.tgt_lang][p.tgt_word] = None
  out = {}
  for lang in sorted(vocab):
    words = [features[(lang, w)] for w in vocab[lang]]
    draws = pseudo_word_intra_scores(words, n_draws, _rng(seed, "intra", lang))
    out[lang] = percentile_threshold(draws, percentile)
  return out


@dataclasses.dataclass(frozen=True)
class _PairContext:
  """What every language pair's analysis reads; bundled to keep signatures short."""
  features: Mapping[WordKey, np.ndarray]
  intra: Mapping[WordKey, tuple[float, float]]
  thresholds: Mapping[str, float]
  translations: set[frozenset]
  concreteness: Mapping[str, float] | None
  concreteness_threshold: float
  random_pairs: int
  percentile: float
  seed: int


def _analyse_language_pair(src_lang: str, tgt_lang: str, group: Sequence[Pair],
                           ctx: _PairContext) -> tuple[dict[Pair, PairScore], LanguagePairSummary]:
  """Scores, random baseline, ratios and image-translation retrieval of one language pair."""
  src_words = list(dict.fromkeys(p.src_word for p in group))
  tgt_words = list(dict.fromkeys(p.tgt_word for p in group))
  s_idx = {w: i for i, w in enumerate(src_words)}
  t_idx = {w: i for i, w in enumerate(tgt_words)}
  sim = avgmax_matrix([ctx.features[(src_lang, w)] for w in src_words],
                      [ctx.features[(tgt_lang, w)] for w in tgt_words])
  gold = {(i, j) for i, a in enumerate(src_words) for j, b in enumerate(tgt_words)
          if frozenset(((src_lang, a), (tgt_lang, b))) in ctx.translations}
  gold_of: dict[int, list[int]] = collections.defaultdict(list)
  for i, j in sorted(gold):
    gold_of[i].append(j)

  random = sample_random_pairs(len(src_words), len(tgt_words), gold, ctx.random_pairs,
                               _rng(ctx.seed, "inter", src_lang, tgt_lang))
  thr_src, thr_tgt = ctx.thresholds[src_lang], ctx.thresholds[tgt_lang]
  thr_inter = percentile_threshold([sim[i, j] for i, j in random], ctx.percentile)

  def judge(a: str, b: str, inter: float) -> bool | None:
    return is_translatable(ctx.intra[(src_lang, a)][0], ctx.intra[(tgt_lang, b)][0], inter,
                           thr_src, thr_tgt, thr_inter)

  scores = {}
  for p in group:
    i, j = s_idx[p.src_word], t_idx[p.tgt_word]
    x, y = ctx.features[p.src], ctx.features[p.tgt]
    scores[p] = PairScore(
        pair=p, intra_src=ctx.intra[p.src][0], intra_tgt=ctx.intra[p.tgt][0],
        intra_src_mean=ctx.intra[p.src][1], intra_tgt_mean=ctx.intra[p.tgt][1],
        inter_avgmax=float(sim[i, j]), homogeneity=homogeneity_2means(x, y, ctx.seed),
        translatable=judge(p.src_word, p.tgt_word, float(sim[i, j])),
        rank=gold_rank(sim[i], gold_of[i], j), n_src_images=len(x), n_tgt_images=len(y),
        concreteness=_pair_concreteness(p, ctx.concreteness))

  random_judged = [judge(src_words[i], tgt_words[j], float(sim[i, j])) for i, j in random]
  random_homog = [homogeneity_2means(ctx.features[(src_lang, src_words[i])],
                                     ctx.features[(tgt_lang, tgt_words[j])], ctx.seed)
                  for i, j in random]
  ranks = [min(gold_rank(sim[i], golds, j) for j in golds) for i, golds in gold_of.items()]
  judged = [s.translatable for s in scores.values()]
  concrete = [s.translatable for s in scores.values()
              if s.concreteness is not None and s.concreteness >= ctx.concreteness_threshold]
  summary = LanguagePairSummary(
      src_lang=src_lang, tgt_lang=tgt_lang, n_pairs=len(group),
      n_translatable=sum(1 for t in judged if t), ratio_all=_share(judged),
      n_concrete=len(concrete), ratio_concrete=_share(concrete),
      mrr=_mean([1.0 / r for r in ranks]), top1=_mean([r <= 1 for r in ranks]),
      top5=_mean([r <= 5 for r in ranks]), top10=_mean([r <= 10 for r in ranks]),
      n_source_words=len(src_words), n_candidates=len(tgt_words),
      intra_threshold_src=thr_src, intra_threshold_tgt=thr_tgt, inter_threshold=thr_inter,
      n_random_pairs=len(random), random_ratio=_share(random_judged),
      inter_mean_true=_mean([s.inter_avgmax for s in scores.values()]),
      inter_mean_random=_mean([sim[i, j] for i, j in random]),
      homogeneity_mean_true=_mean([s.homogeneity for s in scores.values()]),
      homogeneity_mean_random=_mean(random_homog))
  return scores, summary


def _pair_concreteness(p: Pair, table: Mapping[str, float] | None) -> float | None:
  """Mean concreteness of the pair's words found in the table; None when neither is listed."""
  if not table:
    return None
  found = [table[w] for w in (p.src_word, p.tgt_word) if w in table]
  return float(np.mean(found)) if found else None


def _share(flags: Sequence[bool | None]) -> float:
  """Share of True among decided flags; NaN when none is decided."""
  decided = [f for f in flags if f is not None]
  return sum(decided) / len(decided) if decided else math.nan


def _mean(values: Sequence[float]) -> float:
  """Mean, NaN for an empty list."""
  return float(np.mean(values)) if len(values) else math.nan


# --------------------------------------------------------------------------
# Pipeline and outputs


def run_translatability(mmid_root: str, pair_paths: Sequence[str], out_dir: str, *,
                        embed_fn: EmbedFn | None = None, features_dir: str | None = None,
                        concreteness_path: str | None = None,
                        concreteness_threshold: float = 4.0, random_pairs: int = 1000,
                        percentile: float = 90.0, seed: int = 0, batch_size: int = 64,
                        max_images: int = 100, dict_target_lang: str = "en",
                        progress: bool = True) -> Report:
  """Reads MMID + pairs, gets features (embed_fn or features_dir), analyses, writes out_dir."""
  if (embed_fn is None) == (features_dir is None):
    raise ValueError("pass exactly one of embed_fn and features_dir")
  _check_settings(random_pairs, percentile, batch_size, max_images)
  _make_out_dir(out_dir)  # before the slow part, which a bad --out would waste
  pairs = [p for path in expand_pair_paths(pair_paths) for p in read_pairs(path, dict_target_lang)]
  if not pairs:
    raise UserError(f"the pairs file(s) {', '.join(pair_paths)} hold no translation pairs.")
  concreteness = read_concreteness(concreteness_path) if concreteness_path else None
  skips = SkipLog()
  keys = list(dict.fromkeys(k for p in pairs for k in (p.src, p.tgt)))
  folders = resolve_word_folders(mmid_root, keys, skips)
  if embed_fn is not None:
    raw = embed_image_folders(folders, embed_fn, skips, batch_size, max_images, progress)
  else:
    raw = load_feature_files(features_dir, folders, skips)
  features = clean_features(raw, skips)
  report = analyse(pairs, features, concreteness=concreteness,
                   concreteness_threshold=concreteness_threshold, random_pairs=random_pairs,
                   percentile=percentile, seed=seed, skips=skips)
  write_outputs(report, out_dir)
  if not report.pairs:
    raise UserError(f"none of the {len(set(pairs))} translation pairs has usable images for both "
                    f"words; see {os.path.join(out_dir, 'skipped.tsv')}.")
  return report


def _check_settings(random_pairs: int, percentile: float, batch_size: int, max_images: int) -> None:
  """Rejects settings that would make the thresholds or batching meaningless."""
  if random_pairs < 1:
    raise UserError(f"--random-pairs must be at least 1, not {random_pairs}.")
  if not 0 <= percentile <= 100:
    raise UserError(f"--percentile must be between 0 and 100, not {percentile}.")
  if batch_size < 1:
    raise UserError(f"--batch-size must be at least 1, not {batch_size}.")
  if max_images < MIN_IMAGES:
    raise UserError(f"--max-images must be at least {MIN_IMAGES}, not {max_images}.")


def _make_out_dir(out_dir: str) -> None:
  """Creates --out (or accepts an existing folder), with a one-line error when it cannot be one."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"--out '{out_dir}' is a file, not a folder.")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out '{out_dir}' cannot be created as a folder ({e.strerror}).") from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise UserError(f"--out '{out_dir}' is a folder you cannot write to.")


def write_outputs(report: Report, out_dir: str) -> None:
  """pairs.tsv, language_pairs.csv/.md, skipped.tsv and ratio_heatmap.png in out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  _write_atomic(os.path.join(out_dir, "pairs.tsv"), _pairs_tsv(report))
  _write_atomic(os.path.join(out_dir, "language_pairs.csv"), _language_pairs_csv(report))
  _write_atomic(os.path.join(out_dir, "language_pairs.md"), _language_pairs_md(report))
  _write_atomic(os.path.join(out_dir, "skipped.tsv"), _skipped_tsv(report.skips))
  plot_ratio_heatmap(report.language_pairs, os.path.join(out_dir, "ratio_heatmap.png"))


def _write_atomic(path: str, text: str) -> None:
  """Writes via a temporary file, so an interrupted run never leaves half a report."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def _fmt(v: object) -> str:
  """Numbers with 6 decimals, NaN/None as empty, booleans as 1/0."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return ""
  if isinstance(v, bool):
    return str(int(v))
  if isinstance(v, float):
    return f"{v:.6f}"
  return str(v)


def _pairs_tsv(report: Report) -> str:
  """One line per scored pair, columns PAIRS_TSV_COLUMNS."""
  lines = ["\t".join(PAIRS_TSV_COLUMNS)]
  for s in report.pairs:
    p = s.pair
    row = (p.src_lang, p.tgt_lang, p.src_word, p.tgt_word, s.intra_src, s.intra_tgt,
           s.inter_avgmax, s.homogeneity, s.translatable, s.intra_src_mean, s.intra_tgt_mean,
           s.rank, s.n_src_images, s.n_tgt_images, s.concreteness)
    lines.append("\t".join(_fmt(v) for v in row))
  return "\n".join(lines) + "\n"


def _language_pairs_csv(report: Report) -> str:
  """One row per language pair, columns LANGUAGE_PAIR_COLUMNS."""
  import io

  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(LANGUAGE_PAIR_COLUMNS)
  for s in report.language_pairs:
    writer.writerow([_fmt(getattr(s, c)) for c in LANGUAGE_PAIR_COLUMNS])
  return buf.getvalue()


def _language_pairs_md(report: Report) -> str:
  """Human-readable summary: ratios, retrieval, thresholds, settings and skip counts."""
  def num(v: float, digits: int = 3) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.{digits}f}"

  lines = ["# Image translatability", "",
           "| languages | pairs | ratio (all) | ratio (concrete) | concrete pairs | random-pair ratio "
           "| AvgMax true / random | MRR | top-1 | top-5 | top-10 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for s in report.language_pairs:
    lines.append(
        f"| {s.src_lang}→{s.tgt_lang} | {s.n_pairs} | {num(s.ratio_all)} | {num(s.ratio_concrete)} "
        f"| {s.n_concrete} | {num(s.random_ratio)} | {num(s.inter_mean_true)} / "
        f"{num(s.inter_mean_random)} | {num(s.mrr)} | {num(s.top1)} | {num(s.top5)} | {num(s.top10)} |")
  lines += ["", "## Thresholds", "",
            f"Percentile {report.settings['percentile']:g} of {report.settings['random_pairs']} "
            f"random draws, seed {report.settings['seed']}."
            + (f" A pair is concrete when its concreteness is at least "
               f"{report.settings['concreteness_threshold']:g}."
               if report.settings["concreteness_threshold"] is not None else ""), "",
            "| language | intra threshold |", "| --- | ---: |"]
  lines += [f"| {lang} | {num(t)} |" for lang, t in report.intra_thresholds.items()]
  lines += ["", "| languages | inter (AvgMax) threshold | random pairs |", "| --- | ---: | ---: |"]
  lines += [f"| {s.src_lang}→{s.tgt_lang} | {num(s.inter_threshold)} | {s.n_random_pairs} |"
            for s in report.language_pairs]
  lines += ["", "## Skipped", ""]
  counts = report.skips.counts()
  if counts:
    lines += ["| what | reason | count |", "| --- | --- | ---: |"]
    lines += [f"| {kind} | {reason} | {n} |" for (kind, reason), n in counts.items()]
    lines += ["", "Each skipped item is listed in `skipped.tsv`."]
  else:
    lines.append("Nothing was skipped.")
  return "\n".join(lines) + "\n"


def _skipped_tsv(skips: SkipLog) -> str:
  """Every skipped image, word, pair or index line with its reason."""
  lines = ["kind\tlanguage\titem\treason"]
  lines += ["\t".join(e) for e in skips.entries]
  return "\n".join(lines) + "\n"


def plot_ratio_heatmap(summaries: Sequence[LanguagePairSummary], path: str) -> None:
  """Heat map of ratio_all, source languages as rows and target languages as columns."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = sorted({s.src_lang for s in summaries})
  cols = sorted({s.tgt_lang for s in summaries})
  grid = np.full((max(len(rows), 1), max(len(cols), 1)), np.nan)
  for s in summaries:
    grid[rows.index(s.src_lang), cols.index(s.tgt_lang)] = s.ratio_all
  fig = Figure(figsize=(3.0 + 0.5 * grid.shape[1], 2.5 + 0.4 * grid.shape[0]), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(len(cols)), cols, rotation=90)
  ax.set_yticks(range(len(rows)), rows)
  ax.set_xlabel("target language")
  ax.set_ylabel("source language")
  ax.set_title("image translatability ratio")
  if grid.size <= 400:
    for (r, c), v in np.ndenumerate(grid):
      if not math.isnan(v):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > 0.6 else "white")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path)


# --------------------------------------------------------------------------
# Command line glue (bigvis/cli.py calls add_parser and then main)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `bigvis translatability` on the CLI's subparsers."""
  p = subparsers.add_parser(
      "translatability", help="image translatability of words across languages (MMID)",
      description="Scores how alike words and their translations are depicted in MMID images.")
  p.add_argument("--mmid", required=True, metavar="ROOT",
                 help="MMID root: ROOT/<lang>/index.tsv and word image folders")
  p.add_argument("--pairs", required=True, nargs="+", metavar="FILE",
                 help="TSV src_lang,src_word,tgt_lang,tgt_word, or MMID dict.xx files, "
                      "or folders of them")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="bigvis run whose image tower embeds the images")
  source.add_argument("--features", metavar="DIR",
                      help="precomputed features: DIR/<lang>/<folder>.npy or DIR/<lang>.npz")
  p.add_argument("--out", required=True, metavar="DIR", help="folder for the reports")
  p.add_argument("--concreteness", metavar="FILE", help="word<TAB>score concreteness list")
  p.add_argument("--concreteness-threshold", type=float, default=4.0,
                 help="a pair is concrete when its score is at least this (default 4.0)")
  p.add_argument("--random-pairs", type=int, default=1000,
                 help="random non-translation pairs (and pseudo-words) per threshold")
  p.add_argument("--percentile", type=float, default=90.0,
                 help="percentile of the random scores used as threshold (default 90)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
  p.add_argument("--max-images", type=int, default=100, help="images used per word")
  p.add_argument("--dict-target-lang", default="en",
                 help="language folder of the English side of dict.xx files (default en)")
  p.set_defaults(fn=main)  # bigvis/cli.py dispatches on args.fn


def main(args: argparse.Namespace) -> int:
  """Runs `bigvis translatability` and prints one line per language pair."""
  embed_fn = None
  if args.workdir:
    try:
      from bigvis.inference import load_image_embedder  # imports JAX only when embedding
    except ModuleNotFoundError as e:
      if e.name != "bigvis.inference":
        raise
      raise UserError("--workdir needs bigvis.inference, which this installation lacks; "
                      "pass precomputed --features instead.") from None
    embed_fn = load_image_embedder(args.workdir)
  report = run_translatability(
      args.mmid, args.pairs, args.out, embed_fn=embed_fn, features_dir=args.features,
      concreteness_path=args.concreteness, concreteness_threshold=args.concreteness_threshold,
      random_pairs=args.random_pairs, percentile=args.percentile, seed=args.seed,
      batch_size=args.batch_size, max_images=args.max_images,
      dict_target_lang=args.dict_target_lang)
  for s in report.language_pairs:
    print(f"{s.src_lang}->{s.tgt_lang}: {s.n_pairs} pairs, ratio {_fmt(s.ratio_all) or '-'} "
          f"(random pairs {_fmt(s.random_ratio) or '-'}), MRR {_fmt(s.mrr) or '-'}")
  skipped = {k: report.skips.count(k) for k in ("image", "word", "pair", "index")}
  print(f"skipped {skipped['image']} image(s), {skipped['word']} word(s), {skipped['pair']} pair(s), "
        f"{skipped['index']} index.tsv line(s); reports in {args.out}")
  return 0
