"""What `bigvis zeroshot` and the zeroshot evaluator accept as class names, templates and images: mistakes
are one-line errors naming the culprit, not a classification of one class or a traceback. No training."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bigvis import cli, image_files, zeroshot_cli
from bigvis.analysis import translatability
from bigvis.errors import UserError
from bigvis.evaluators import zeroshot


# ---------------------------------------------------------------- class names


def test_labels_follow_csv_quoting():
  got = zeroshot.class_names_from('"one, two",three,ünï,日本', "--labels", min_names=2)
  assert got == ["one, two", "three", "ünï", "日本"]
  assert zeroshot.class_names_from('cat, "dog, big" ,,car', "--labels") == ["cat", "dog, big", "car"]


def test_fewer_than_two_classes_cannot_be_classified():
  for value in ("one", ["one"], "one,,", " , "):
    with pytest.raises(UserError, match=r"^--labels names [01] class\(es\) but needs at least 2"):
      zeroshot.class_names_from(value, "--labels", min_names=2)
  # A single name stays fine where it is not a classification (the bias audit's flagged categories).
  assert zeroshot.class_names_from("criminal", "evals.b.flagged") == ["criminal"]


def test_a_label_file_that_is_no_file_is_named(tmp_path):
  for value in ("labels.txt", "lists/classes", str(tmp_path / "missing.csv")):
    with pytest.raises(UserError, match=rf"^--labels '{value}' is not a file"):
      zeroshot.class_names_from(value, "--labels", min_names=2)
  path = tmp_path / "labels.txt"
  path.write_text("cat, tabby\ndog\n\n", encoding="utf-8")  # one name per line: commas are kept
  assert zeroshot.class_names_from(str(path), "--labels", min_names=2) == ["cat, tabby", "dog"]
  path.write_bytes(b"caf\xe9\ndog\n")
  with pytest.raises(UserError, match="is not UTF-8 text"):
    zeroshot.class_names_from(str(path), "--labels", min_names=2)


def test_the_command_refuses_a_missing_label_file_before_loading_the_run(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(cli, "start_tensorflow_quietly", lambda: None)  # the check needs no TensorFlow
  (tmp_path / "imgs").mkdir()
  Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
  base = ["zeroshot", "--workdir", str(tmp_path / "no_run"), "--images", str(tmp_path / "imgs")]
  assert cli.main(base + ["--labels", "labels.txt"]) == 2
  assert capsys.readouterr().err.startswith("bigvis: error: --labels 'labels.txt' is not a file;")
  assert cli.main(base + ["--labels", "one"]) == 2
  assert "bigvis: error: --labels names 1 class(es) but needs at least 2" in capsys.readouterr().err


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("template", ["a {} in {style}", "a {} }", "a { {}", "{0} photo", "a {!r}",
                                      "a {:>9}", "a {} and a {}", "a photo", "a {{}}"])
def test_templates_need_exactly_one_empty_field(template):
  with pytest.raises(UserError, match=r"^--templates template '.*' (must contain exactly one|is not a valid)"):
    zeroshot.templates_from([template], "--templates")


def test_literal_braces_are_allowed():
  templates = zeroshot.templates_from(["a {{sketch}} of a {}.", "{}"], "--templates")
  assert zeroshot.prompt_texts(["cat"], templates) == ["a {sketch} of a cat.", "cat"]
  assert zeroshot.templates_from(None, "x") == list(zeroshot.DEFAULT_TEMPLATES)


def test_the_evaluator_checks_prompts_and_class_count_before_building_anything():
  """`bigvis eval --set "evals.zeroshot.prompts=['a {} of {size}']"` went as far as str.format (KeyError)."""
  def make(**kw):
    cfg = ml_collections.ConfigDict(dict(type="zeroshot", data=dict(source="digits", split="test"), **kw))
    return zeroshot.Evaluator(cfg, name="zeroshot", model=None, mesh=None)
  with pytest.raises(UserError, match=r"^evals.zeroshot.prompts template 'a \{\} of \{size\}' must"):
    make(class_names=["a", "b"], prompts=["a {} of {size}"])
  with pytest.raises(UserError, match=r"^evals.zeroshot.class_names names 1 class\(es\)"):
    make(class_names=["a"], prompts=["a {}"])


# ---------------------------------------------------------------- images


def test_images_are_chosen_and_read_as_translatability_does(tmp_path, capsys):
  assert zeroshot_cli.load_rgb is translatability.load_rgb is image_files.load_rgb
  ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024
  Image.fromarray(ramp).save(tmp_path / "a16.png")  # mode I;16
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.tif")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "C.TIFF")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / ".hidden.png")
  (tmp_path / "nested").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "nested" / "d.png")
  (tmp_path / "notes.txt").write_text("not an image")
  capsys.readouterr()
  names, images = zeroshot_cli.read_images(str(tmp_path))
  assert names == ["C.TIFF", "a16.png", "b.tif"]
  assert "ignoring 3 of the 6 entries" in capsys.readouterr().err
  grey = images[1]
  assert grey.dtype == np.uint8 and grey.shape == (8, 8, 3)
  np.testing.assert_array_equal(grey[..., 0], np.round(ramp / 257.0).astype(np.uint8))
  np.testing.assert_array_equal(grey, translatability.load_rgb(str(tmp_path / "a16.png")))
