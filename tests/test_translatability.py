"""Tests for bigvis.analysis.translatability: hand-computed metrics and a tiny MMID fixture."""
from __future__ import annotations

import argparse
import csv
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from bigvis.analysis import translatability as tr
from bigvis.errors import UserError

# The worked example of docs/translatability.md.
X = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
Y = np.array([[0.0, 1.0], [0.6, 0.8]])

# Concepts shared across languages: one saturated colour each (distinct directions around grey).
CONCEPTS = {
    "cat": (255, 0, 0), "dog": (0, 255, 0), "sun": (0, 0, 255),
    "tree": (255, 255, 0), "fish": (0, 255, 255), "moon": (255, 0, 255),
}
WORDS = {
    "en": {"cat": "cat", "dog": "dog", "sun": "sun", "tree": "tree", "fish": "fish",
           "moon": "moon", "idea": None},
    "fr": {"cat": "chat", "dog": "chien", "sun": "soleil", "tree": "arbre", "fish": "poisson",
           "moon": "lune", "idea": "idée"},
    "de": {"cat": "Katze", "dog": "Hund", "sun": "Sonne", "tree": "Baum", "fish": "Fisch",
           "moon": "Mond", "idea": "Idee"},
}
IMAGES_PER_WORD = 4


def fake_embed(images: list[np.ndarray]) -> np.ndarray:
  """Mean colour around grey plus left-right brightness difference: tells concepts apart."""
  out = []
  for im in images:
    x = im.astype(np.float32)
    half = x.shape[1] // 2
    out.append(np.concatenate([x.mean((0, 1)) - 127.5,
                               [x[:, :half].mean() - x[:, half:].mean()]]))
  return np.stack(out)


def _save_image(path: str, colour: np.ndarray, rng: np.random.Generator) -> None:
  """A 12x12 image of one colour with per-pixel noise."""
  pixels = colour[None, None, :] + rng.normal(0, 12, (12, 12, 3))
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def build_mmid(root: str) -> str:
  """MMID layout for en/fr/de plus the bad cases the issue lists; returns the pairs TSV path."""
  rng = np.random.default_rng(0)
  for lang, words in WORDS.items():
    lang_dir = os.path.join(root, lang)
    os.makedirs(lang_dir)
    index = []
    for n, (concept, word) in enumerate(words.items(), 1):
      if word is None:
        continue
      folder = os.path.join(lang_dir, str(n))
      os.makedirs(folder)
      index.append(f"{word}\t{n}")
      for i in range(IMAGES_PER_WORD):
        # "idea" is abstract: each image shows an unrelated random colour.
        base = rng.uniform(0, 255, 3) if concept == "idea" else np.array(CONCEPTS[concept], float)
        shift = rng.normal(0, 15, 3)
        _save_image(os.path.join(folder, f"{i + 1:02d}.jpg"), base + shift, rng)
    if lang == "fr":  # a word whose only image is corrupt, and a stray bad image
      os.makedirs(os.path.join(lang_dir, "90"))
      with open(os.path.join(lang_dir, "90", "01.jpg"), "wb") as f:
        f.write(b"not a jpeg")
      index.append("vide\t90")
      with open(os.path.join(lang_dir, "1", "99.jpg"), "wb") as f:
        f.write(b"\xff\xd8broken")
    if lang == "de":  # a word listed in the index whose folder does not exist
      index.append("Geist\t91")
    with open(os.path.join(lang_dir, "index.tsv"), "w", encoding="utf-8") as f:
      f.write("\n".join(index) + "\n")
  pairs = ["src_lang\tsrc_word\ttgt_lang\ttgt_word"]
  for src, tgt in (("fr", "en"), ("de", "en"), ("fr", "de")):
    for concept in CONCEPTS.keys() | {"idea"}:
      a, b = WORDS[src][concept], WORDS[tgt][concept]
      if a and b:
        pairs.append(f"{src}\t{a}\t{tgt}\t{b}")
  pairs += ["fr\tvide\ten\tcat",      # source folder has no readable image
            "en\tghost\tfr\tchat",    # word missing from index.tsv
            "de\tGeist\ten\tdog",     # word folder missing
            "xx\tfoo\ten\tcat"]       # language without a folder
  path = os.path.join(root, "pairs.tsv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(pairs) + "\n")
  with open(os.path.join(root, "concreteness.tsv"), "w", encoding="utf-8") as f:
    f.write("word\tscore\n" + "".join(f"{w}\t4.8\n" for w in CONCEPTS) + "idea\t1.6\n")
  return path


@pytest.fixture(scope="module")
def mmid(tmp_path_factory: pytest.TempPathFactory) -> str:
  """Root of the shared MMID fixture (pairs at ROOT/pairs.tsv)."""
  root = str(tmp_path_factory.mktemp("mmid"))
  build_mmid(root)
  return root


@pytest.fixture(scope="module")
def embedded(mmid: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[tr.Report, str]:
  """One full run through images and fake_embed, shared by the pipeline tests."""
  out = str(tmp_path_factory.mktemp("out"))
  report = tr.run_translatability(
      mmid, [os.path.join(mmid, "pairs.tsv")], out, embed_fn=fake_embed,
      concreteness_path=os.path.join(mmid, "concreteness.tsv"), random_pairs=40,
      batch_size=5, progress=False)
  return report, out


def _read_tsv(path: str) -> list[dict[str, str]]:
  with open(path, encoding="utf-8") as f:
    return list(csv.DictReader(f, delimiter="\t"))


# ---------------------------------------------------------------- metrics by hand


def test_intra_scores_match_hand_values():
  # cos(x1,x2)=.8, cos(x1,x3)=0, cos(x2,x3)=.6 -> best per image .8,.8,.6.
  assert tr.intra_median_max(X) == pytest.approx(0.8, abs=1e-6)
  assert tr.intra_mean_pairwise(X) == pytest.approx(1.4 / 3, abs=1e-6)
  assert tr.intra_median_max(Y) == pytest.approx(0.8, abs=1e-6)
  assert math.isnan(tr.intra_median_max(X[:1]))


def test_avgmax_matches_hand_value_and_is_directional():
  # x1 -> .6, x2 -> .96, x3 -> 1; y1 -> 1, y2 -> .96.
  assert tr.avgmax(X, Y) == pytest.approx(2.56 / 3, abs=1e-6)
  assert tr.avgmax(Y, X) == pytest.approx(0.98, abs=1e-6)
  assert tr.avgmax(3 * X, 0.5 * Y) == pytest.approx(tr.avgmax(X, Y), abs=1e-6)


def test_avgmax_matrix_equals_pairwise_in_small_blocks():
  rng = np.random.default_rng(1)
  srcs = [rng.normal(size=(n, 5)) for n in (3, 1, 4)]
  tgts = [rng.normal(size=(n, 5)) for n in (2, 5)]
  expect = [[tr.avgmax(s, t) for t in tgts] for s in srcs]
  np.testing.assert_allclose(tr.avgmax_matrix(srcs, tgts, max_block=8), expect, atol=1e-6)


def test_homogeneity_matches_hand_value():
  # Best 2-means split: {x1, x2, y2} | {x3, y1}; h = 1 - H(lang|cluster) / H(lang).
  h = lambda *p: -sum(q * math.log(q) for q in p)
  expect = 1 - (0.6 * h(2 / 3, 1 / 3) + 0.4 * h(0.5, 0.5)) / h(0.6, 0.4)
  assert tr.homogeneity_2means(X, Y) == pytest.approx(expect, abs=1e-6)
  assert expect == pytest.approx(0.0206, abs=1e-4)
  apart = tr.homogeneity_2means(np.array([[1.0, 0.0], [0.9, 0.1]]), np.array([[0.0, 1.0]] * 2))
  assert apart == pytest.approx(1.0)
  assert tr.homogeneity_2means(X, X[::-1].copy()) < 0.2  # the same images in both languages


def test_threshold_rank_and_decision_by_hand():
  assert tr.percentile_threshold([0.2, 0.4, 0.5, 0.9], 90) == pytest.approx(0.78)
  assert math.isnan(tr.percentile_threshold([], 90))
  assert tr.gold_rank(np.array([0.85, 0.9, 0.3, 0.85]), [0], 0) == 3  # ties never help
  assert tr.gold_rank(np.array([0.5, 0.9, 0.3]), [0, 1], 1) == 1  # other golds are not rivals
  assert tr.is_translatable(0.8, 0.8, 0.85, 0.7, 0.7, 0.78) is True
  assert tr.is_translatable(0.8, 0.6, 0.85, 0.7, 0.7, 0.78) is False
  assert tr.is_translatable(0.8, 0.8, 0.85, 0.7, 0.7, math.nan) is None


def test_random_pairs_are_seeded_distinct_and_not_translations():
  gold = {(0, 0), (1, 1), (2, 2)}
  draw = lambda: tr.sample_random_pairs(3, 4, gold, 100, np.random.default_rng(3))
  pairs = draw()
  assert pairs == draw()
  assert len(pairs) == 3 * 4 - 3 == len(set(pairs)) and not gold & set(pairs)
  assert len(tr.sample_random_pairs(3, 4, gold, 5, np.random.default_rng(3))) == 5


def test_pseudo_words_score_below_coherent_words():
  rng = np.random.default_rng(0)
  words = [np.eye(6)[i] + rng.normal(0, 0.05, (4, 6)) for i in range(6)]
  scores = tr.pseudo_word_intra_scores(words, 30, np.random.default_rng(0))
  assert scores.max() < min(tr.intra_median_max(w) for w in words)


# ---------------------------------------------------------------- input files


def test_read_pairs_tsv_dict_and_errors(tmp_path):
  tsv = tmp_path / "p.tsv"
  tsv.write_text("src_lang\tsrc_word\ttgt_lang\ttgt_word\nfr\tchat\ten\tcat\n\n", encoding="utf-8")
  assert tr.read_pairs(str(tsv)) == [tr.Pair("fr", "chat", "en", "cat")]
  d = tmp_path / "dict.fr"
  d.write_text("chat\tcat\tkitty\nvide\n", encoding="utf-8")
  assert tr.read_pairs(str(d)) == [tr.Pair("fr", "chat", "en", "cat"),
                                   tr.Pair("fr", "chat", "en", "kitty")]
  assert tr.expand_pair_paths([str(tmp_path)]) == [str(d), str(tsv)]
  bad = tmp_path / "bad.tsv"
  bad.write_text("fr\tchat\ten\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"bad.tsv:1"):
    tr.read_pairs(str(bad))
  bad.write_text("../etc\tchat\ten\tcat\n", encoding="utf-8")
  with pytest.raises(UserError, match="not a plain folder name"):
    tr.read_pairs(str(bad))
  with pytest.raises(UserError, match="does not exist"):
    tr.read_pairs(str(tmp_path / "missing.tsv"))


def test_undecodable_index_lines_are_skipped_but_pairs_files_are_refused(tmp_path):
  """One bad byte in MMID's index.tsv (data) skips that line; in a pairs file (the user's) it is an error."""
  (tmp_path / "fr").mkdir()
  (tmp_path / "fr" / "index.tsv").write_bytes(b"chat\t1\ncaf\xe9\t0\nchien\t2\n")
  skips = tr.SkipLog()
  assert tr.read_index(str(tmp_path / "fr"), skips, "fr") == {"chat": "1", "chien": "2"}
  assert skips.entries == [("index", "fr", "line 2", "index.tsv line is not UTF-8")]
  pairs = tmp_path / "p.tsv"
  pairs.write_bytes(b"fr\tchat\ten\tcat\nfr\tcaf\xe9\ten\tcoffee\n")
  with pytest.raises(UserError, match=r"p.tsv:2 is not UTF-8 text"):
    tr.read_pairs(str(pairs))


# ---------------------------------------------------------------- images and features


def test_sixteen_bit_images_read_as_their_eight_bit_copies(tmp_path):
  """A 16-bit greyscale PNG (PIL mode I;16) is scaled by 1/257, as the eval pipeline decodes it;
  convert("RGB") clipped every value above 255 to white."""
  grey8 = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
  Image.fromarray(grey8).save(tmp_path / "g8.png")
  Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
  with Image.open(tmp_path / "g16.png") as im:
    assert im.mode.startswith("I")
  eight, sixteen = tr.load_rgb(str(tmp_path / "g8.png")), tr.load_rgb(str(tmp_path / "g16.png"))
  assert sixteen.dtype == np.uint8 and sixteen.shape == (8, 8, 3)
  np.testing.assert_array_equal(sixteen, eight)
  np.testing.assert_array_equal(sixteen[..., 1], grey8)


def test_skipped_images_are_counted_one_by_one():
  """Six all-NaN feature rows of one word are six skipped images, not one log entry."""
  rng = np.random.default_rng(0)
  bad = np.concatenate([np.full((6, 3), np.nan), rng.normal(size=(2, 3))])
  skips = tr.SkipLog()
  clean = tr.clean_features({("fr", "chat"): bad, ("en", "cat"): rng.normal(size=(3, 3))}, skips)
  assert len(clean[("fr", "chat")]) == 2
  assert skips.count("image") == 6
  assert skips.counts() == {("image", "non-finite or zero embedding"): 6}


# ---------------------------------------------------------------- pipeline


def test_true_pairs_beat_random_pairs(embedded):
  report, _ = embedded
  assert {(s.src_lang, s.tgt_lang) for s in report.language_pairs} == {
      ("fr", "en"), ("de", "en"), ("fr", "de")}
  for s in report.language_pairs:
    assert s.inter_mean_true > s.inter_mean_random + 0.3
    assert s.ratio_all > s.random_ratio
    assert s.homogeneity_mean_true < s.homogeneity_mean_random
    assert s.mrr == pytest.approx(1.0) and s.top1 == pytest.approx(1.0)
  fr_de = next(s for s in report.language_pairs if (s.src_lang, s.tgt_lang) == ("fr", "de"))
  assert fr_de.n_pairs == 7 and fr_de.n_concrete == 0  # the list is English only
  fr_en = next(s for s in report.language_pairs if (s.src_lang, s.tgt_lang) == ("fr", "en"))
  assert fr_en.ratio_concrete == pytest.approx(1.0) and fr_en.n_concrete == 6
  by_word = {(s.pair.src_word, s.pair.tgt_word): s for s in report.pairs}
  assert by_word[("idée", "Idee")].translatable is False  # abstract: incoherent images
  assert by_word[("chat", "Katze")].translatable is True


def test_bad_input_is_skipped_and_counted(embedded):
  report, out = embedded
  counts = report.skips.counts()
  assert counts[("image", "unreadable image")] == 2
  assert counts[("word", "no readable images")] == 1          # fr/vide
  assert counts[("word", "missing from index.tsv")] == 1      # en/ghost
  assert counts[("word", "word folder missing")] == 1         # de/Geist
  assert counts[("word", "language has no index.tsv")] == 1   # xx/foo
  assert report.skips.count("pair") == 4
  skipped = _read_tsv(os.path.join(out, "skipped.tsv"))
  assert {"vide", "ghost", "Geist", "foo"} <= {r["item"] for r in skipped}
  md = open(os.path.join(out, "language_pairs.md"), encoding="utf-8").read()
  assert "| word | missing from index.tsv | 1 |" in md


def test_outputs_are_written(embedded):
  report, out = embedded
  rows = _read_tsv(os.path.join(out, "pairs.tsv"))
  assert list(rows[0])[:9] == ["src_lang", "tgt_lang", "src_word", "tgt_word", "intra_src",
                               "intra_tgt", "inter_avgmax", "homogeneity", "translatable"]
  assert len(rows) == len(report.pairs) == 19
  with open(os.path.join(out, "language_pairs.csv"), encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 3 and {"ratio_all", "ratio_concrete", "n_pairs", "mrr"} <= set(table[0])
  with Image.open(os.path.join(out, "ratio_heatmap.png")) as im:
    assert im.size[0] > 50


def _write_features(mmid: str, dest: str, npz_langs: set[str]) -> None:
  """Precomputes fake_embed features for every MMID word folder, as .npy or per-language .npz."""
  for lang in WORDS:
    arrays = {}
    for folder in sorted(os.listdir(os.path.join(mmid, lang))):
      path = os.path.join(mmid, lang, folder)
      images = [im for im in map(tr.load_rgb, tr.list_images(path, 100)) if im is not None] \
          if os.path.isdir(path) else []
      if images:
        arrays[folder] = fake_embed(images)
    if lang in npz_langs:
      np.savez(os.path.join(dest, lang + ".npz"), **arrays)
    else:
      os.makedirs(os.path.join(dest, lang))
      for folder, a in arrays.items():
        np.save(os.path.join(dest, lang, folder + ".npy"), a)


def test_features_dir_gives_the_same_scores(mmid, embedded, tmp_path):
  report, out = embedded
  feats = tmp_path / "feats"
  feats.mkdir()
  _write_features(mmid, str(feats), npz_langs={"de"})
  again = tr.run_translatability(
      mmid, [os.path.join(mmid, "pairs.tsv")], str(tmp_path / "out"), features_dir=str(feats),
      concreteness_path=os.path.join(mmid, "concreteness.tsv"), random_pairs=40)
  assert open(tmp_path / "out" / "pairs.tsv").read() == open(os.path.join(out, "pairs.tsv")).read()
  assert again.language_pairs == report.language_pairs


def test_pickled_features_are_refused(mmid, tmp_path):
  feats = tmp_path / "feats"
  (feats / "en").mkdir(parents=True)
  with open(feats / "en" / "1.npy", "wb") as f:
    pickle.dump(np.zeros((2, 3)), f)
  pairs = tmp_path / "p.tsv"
  pairs.write_text("fr\tchat\ten\tcat\n", encoding="utf-8")
  with pytest.raises(UserError, match="1.npy"):
    tr.run_translatability(mmid, [str(pairs)], str(tmp_path / "o"), features_dir=str(feats))
  np.save(feats / "en" / "1.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
  with pytest.raises(UserError, match="without pickle"):
    tr.run_translatability(mmid, [str(pairs)], str(tmp_path / "o"), features_dir=str(feats))


def test_out_is_checked_before_any_image_is_embedded(mmid, tmp_path):
  notes = tmp_path / "notes.txt"
  notes.write_text("mine")
  pairs = tmp_path / "p.tsv"
  pairs.write_text("fr\tchat\ten\tcat\n", encoding="utf-8")

  def embed(images):
    raise AssertionError("embedded before --out was checked")

  with pytest.raises(UserError, match=r"^--out '.*notes.txt' is a file, not a folder\.$"):
    tr.run_translatability(mmid, [str(pairs)], str(notes), embed_fn=embed, progress=False)
  with pytest.raises(UserError, match=r"^--out '.*notes.txt/o' cannot be created as a folder"):
    tr.run_translatability(mmid, [str(pairs)], str(notes / "o"), embed_fn=embed, progress=False)
  assert notes.read_text() == "mine"


def test_no_usable_pair_still_writes_the_report(mmid, tmp_path):
  pairs = tmp_path / "p.tsv"
  pairs.write_text("en\tghost\tfr\tchat\n", encoding="utf-8")
  with pytest.raises(UserError, match="none of the 1 translation pairs"):
    tr.run_translatability(mmid, [str(pairs)], str(tmp_path / "o"), embed_fn=fake_embed,
                           progress=False)
  assert "ghost" in (tmp_path / "o" / "skipped.tsv").read_text(encoding="utf-8")


def test_cli_parser_and_main(mmid, tmp_path, capsys, monkeypatch):
  parser = argparse.ArgumentParser(prog="bigvis")
  tr.add_parser(parser.add_subparsers(dest="command"))
  base = ["translatability", "--mmid", mmid, "--pairs", os.path.join(mmid, "pairs.tsv"),
          "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit):
    parser.parse_args(base)  # needs --workdir or --features
  with pytest.raises(SystemExit):
    parser.parse_args(base + ["--workdir", "w", "--features", "f"])
  feats = tmp_path / "feats"
  feats.mkdir()
  _write_features(mmid, str(feats), npz_langs=set())
  args = parser.parse_args(base + ["--features", str(feats), "--random-pairs", "20"])
  assert args.fn(args) == 0
  out = capsys.readouterr().out
  assert "fr->en: 6 pairs" in out
  assert "skipped 0 image(s), 4 word(s), 4 pair(s), 0 index.tsv line(s)" in out
  fake_inference = types.ModuleType("bigvis.inference")
  fake_inference.load_image_embedder = lambda workdir: fake_embed
  monkeypatch.setitem(sys.modules, "bigvis.inference", fake_inference)
  args = parser.parse_args(base + ["--workdir", "w", "--random-pairs", "20", "--batch-size", "3"])
  assert tr.main(args) == 0
  with pytest.raises(UserError, match="--percentile"):
    tr.main(parser.parse_args(base + ["--features", str(feats), "--percentile", "120"]))
