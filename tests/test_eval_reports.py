"""`bigvis eval` and its reports: linear probes, robustness to shifts, bias audit, prompt ensembles, shift ops."""
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from bigvis import config as config_lib
from bigvis.errors import UserError
from bigvis.evaluators import bias_audit, linear_probe, reports
from data_pipelines import input as data_input  # noqa: F401  registers the shift ops
from data_pipelines import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = tf.constant([3, 4], tf.int64)


def _op(spec, image):
  return preprocess.build(spec)({"image": tf.constant(image)}, SEED)["image"].numpy()


# ---- shift ops ---------------------------------------------------------------------------------

def test_rotate_by_90_degrees_is_rot90_and_keeps_dtype():
  image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
  out = _op("rotate(90)", image)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.rot90(image))  # counter-clockwise
  np.testing.assert_array_equal(_op("rotate(-90)", image), np.rot90(image, -1))
  np.testing.assert_allclose(_op("rotate(90)", image.astype(np.float32)), np.rot90(image), atol=1e-3)


def test_blur_spreads_an_impulse_into_a_normalised_gaussian():
  image = np.zeros((21, 21, 1), np.float32)
  image[10, 10] = 1.0
  out = _op("gaussian_blur(1.5)", image)[..., 0]
  assert out.sum() == pytest.approx(1.0, abs=1e-5)  # mass kept away from the edges
  assert out[10, 10] == out.max() and out[10, 9] == pytest.approx(out[9, 10]) == pytest.approx(out[11, 10])
  ys, xs = np.mgrid[:21, :21]
  var = np.sum(out * (xs - 10) ** 2)
  assert var == pytest.approx(1.5 ** 2, rel=0.02)  # the blur's variance is sigma^2
  flat = np.full((9, 9, 3), 77, np.uint8)
  np.testing.assert_array_equal(_op("gaussian_blur(2.0)", flat), flat)  # normalised at the edges: constant stays
  # A kernel wider than the image (reflected edges refused it): still a weighted mean of its pixels.
  np.testing.assert_array_equal(_op("gaussian_blur(6.0)", flat), flat)
  ramp = np.tile(np.arange(0, 160, 10, dtype=np.uint8)[None, :, None], (16, 1, 3))
  wide = _op("gaussian_blur(6.0)", ramp)
  assert wide.shape == ramp.shape and ramp.min() < wide.min() <= wide.max() < ramp.max()


def test_noise_is_a_function_of_the_seed_and_has_the_asked_std():
  image = np.full((64, 64, 3), 128, np.uint8)
  a, b = _op("gaussian_noise(20)", image), _op("gaussian_noise(20)", image)
  np.testing.assert_array_equal(a, b)
  other = preprocess.build("gaussian_noise(20)")({"image": tf.constant(image)}, tf.constant([3, 5], tf.int64))
  assert not np.array_equal(a, other["image"].numpy())
  assert np.std(a.astype(np.float64)) == pytest.approx(20, rel=0.05) and a.dtype == np.uint8
  dark = _op("gaussian_noise(50)", np.zeros((32, 32, 3), np.float32))  # float (as after resize): clipped too
  assert dark.dtype == np.float32 and dark.min() == 0 and 0 < dark.max() <= 255
  assert _op("gaussian_noise(50, clip=None)", np.zeros((32, 32, 3), np.float32)).min() < 0


def test_thicken_thin_occlude_pixelate():
  image = np.zeros((9, 9, 1), np.uint8)
  image[4, 4] = 200
  thick = _op("thicken(3)", image)[..., 0]
  assert np.count_nonzero(thick) == 9 and thick[3:6, 3:6].min() == 200  # a 3x3 square
  np.testing.assert_array_equal(_op("thin(3)", thick[..., None])[..., 0], image[..., 0])  # erosion undoes it
  bright = np.full((10, 10, 3), 255, np.uint8)
  occluded = _op("occlude(4)", bright)
  assert np.sum(occluded[..., 0] == 0) == 16  # exactly one 4x4 patch, wherever the seed put it
  ramp = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  np.testing.assert_allclose(_op("pixelate(2)", ramp)[..., 0],
                             [[2.5, 2.5, 4.5, 4.5]] * 2 + [[10.5, 10.5, 12.5, 12.5]] * 2)
  with pytest.raises(UserError, match="thicken"):
    preprocess.build("thicken(0)")


# ---- linear probe ------------------------------------------------------------------------------

def _separable(n_per_class, classes=4, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centers = np.eye(classes, dim) * 3
  y = np.repeat(np.arange(classes), n_per_class)
  x = centers[y] + 0.3 * rng.standard_normal((len(y), dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_probe_on_perfectly_separable_features_is_perfect():
  x, y = _separable(30)
  pool, val = linear_probe.split_validation(y, 0.2)
  assert not set(pool) & set(val) and len(pool) + len(val) == len(y)
  assert all(np.sum(y[val] == c) == 6 for c in range(4))  # stratified: 20% of every class
  x_test, y_test = _separable(25, seed=1)
  for k in (1, 4):
    idx = linear_probe.sample_shots(y, pool, k, seed=0)
    assert sorted(np.bincount(y[idx])) == [k] * 4 and set(idx) <= set(pool)
    np.testing.assert_array_equal(idx, linear_probe.sample_shots(y, pool, k, seed=0))
    probe, c = linear_probe.fit_probe(x[idx], y[idx], x[val], y[val], [0.01, 1.0, 100.0])
    assert np.mean(probe.predict(x_test) == y_test) == 1.0
  # On random labels nothing generalises: the chosen probe is near chance.
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((400, 16)).astype(np.float32)
  labels = rng.integers(0, 4, 400)
  probe, _ = linear_probe.fit_probe(noise[:300], labels[:300], noise[300:350], labels[300:350], [1.0])
  assert np.mean(probe.predict(noise[350:]) == labels[350:]) < 0.5


def test_probe_leaves_unlabelled_examples_out_and_counts_them():
  """Examples without a label (-1, as shards store a missing one) are neither a class of their own in
  training nor a sure miss in testing: left out of both splits and counted. A train split with no class
  of two examples (no validation split to choose C on) is a one-sentence error, not a silent pick."""
  x, y = _separable(30)
  x_test, y_test = _separable(25, seed=1)
  unlabelled_train = np.concatenate([y[:20], -np.ones(10, int), y[20:]])
  train = {"z": np.concatenate([x[:20], x[:10] * -1.0, x[20:]]), "label": unlabelled_train}
  test = {"z": np.concatenate([x_test, x_test[:7]]), "label": np.concatenate([y_test, -np.ones(7, int)])}
  probe = object.__new__(linear_probe.Evaluator)
  probe.name, probe.where, probe.shots, probe.seeds, probe.val_fraction = "lp", "evals.lp", [1, 4], 1, 0.2
  probe.c_grid, probe.max_iter, probe.batch_size, probe.class_names, probe.text = [1.0, 100.0], 1000, 8, None, None
  probe.train_data, probe.data = "train", "test"
  probe.images = lambda params, data, batch, where: train if data == "train" else test
  metrics = probe.run(None)
  assert metrics["num_unlabeled"] == 17 and metrics["num_test"] == len(y_test) and metrics["num_train"] == len(y)
  assert metrics["top1_full"] == 1.0 and metrics["top1_4shot"] == 1.0  # the -1s were neither learnt nor missed
  assert "zeroshot_equivalent_shots" not in metrics  # no text tower, no zero-shot

  # Zero-shot from prompts at the classes' centres is perfect, and so is the 1-shot probe: zero-shot is
  # worth at most one shot, and the metrics say the 1 is a bound.
  probe.class_names = ["a", "b", "c", "d"]
  probe.text = type("Prompts", (), {"embed": lambda self, params, names, batch: np.eye(4, 16)[:, None]})()
  metrics = probe.run(None)
  assert metrics["zeroshot_top1"] == 1.0 and metrics["top1_1shot"] == 1.0
  assert metrics["zeroshot_equivalent_shots"] == 1.0 and metrics["zeroshot_equivalent_shots_is_bound"] == 1.0
  probe.text = None

  # With CLIP's class names, a test label past them has no zero-shot class: refused as zeroshot does.
  probe.class_names = ["a", "b", "c"]
  with pytest.raises(UserError, match=r"evals.lp.data has label 3, outside the 3 class names"):
    probe.run(None)
  probe.class_names = None

  # More shots than any class has (besides validation): left out, not reported as if drawn.
  probe.shots = [1, 4, 500]
  metrics = probe.run(None)
  assert "top1_4shot" in metrics and "top1_500shot" not in metrics
  probe.shots = [500]
  with pytest.raises(UserError, match=r"evals.lp.shots \[500\]: no class of train_data has that many"):
    probe.run(None)
  probe.shots = [1, 4]

  train = {"z": x[:4], "label": np.arange(4)}  # one example per class: nothing to validate on
  with pytest.raises(UserError, match="two labelled examples"):
    probe.run(None)


def test_one_hot_rows_without_a_single_class_have_no_label():
  from bigvis.evaluators.features import single_label
  rows = np.array([[0, 1, 0], [0.05, 0.9, 0.05], [0, 0, 0], [1, 0, 1]], np.float32)  # one-hot, smoothed, none, two
  np.testing.assert_array_equal(single_label(rows), [1, 1, -1, -1])


def test_probe_splits_equal_a_scan_per_class():
  """The validation split and the k-shot draws group examples by one sort (a scan per class took hours at
  ImageNet-21k's size) and draw exactly what a scan per class draws: the same seeds, the same indices."""
  def scan_split(labels, fraction, seed=0):
    rng, pool, val = np.random.default_rng(seed), [], []
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      n_val = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
      val.append(idx[:n_val])
      pool.append(idx[n_val:])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(val))

  def scan_shots(labels, pool, k, seed):
    rng = np.random.default_rng([seed, k])
    return np.sort(np.concatenate([rng.choice(pool[labels[pool] == c], size=min(k, np.sum(labels[pool] == c)),
                                              replace=False) for c in np.unique(labels[pool])]))

  labels = np.random.default_rng(3).integers(0, 40, 3000)
  labels[:5] = 99  # a rare class
  pool, val = linear_probe.split_validation(labels, 0.2)
  want_pool, want_val = scan_split(labels, 0.2)
  np.testing.assert_array_equal(pool, want_pool)
  np.testing.assert_array_equal(val, want_val)
  for k, seed in ((1, 0), (4, 2), (16, 1)):
    np.testing.assert_array_equal(linear_probe.sample_shots(labels, pool, k, seed), scan_shots(labels, pool, k, seed))


def test_same_split_compares_where_examples_come_from_not_their_pp():
  from bigvis.evaluators.features import same_split
  a = {"source": "shards", "shards": "/d/val-*", "pp": "decode|resize(224)"}
  assert same_split(a, {**a, "pp": "decode|resize(256)"})
  assert not same_split(a, {**a, "shards": "/d/train-*"})


def test_zeroshot_equivalent_shots_interpolates_in_log_k():
  ks, acc = [1, 2, 4, 8], [0.2, 0.4, 0.6, 0.8]
  k, how = linear_probe.equivalent_shots(ks, acc, 0.5)
  assert how == "=" and k == pytest.approx(2 ** 1.5)
  assert linear_probe.equivalent_shots(ks, acc, 0.1) == (1.0, "<=")
  assert linear_probe.equivalent_shots(ks, acc, 0.9) is None


# ---- bias audit ----------------------------------------------------------------------------------

def test_bias_audit_shares_on_constructed_predictions():
  labels = ["cat", "dog", "thief", "animal", "child"]
  groups = np.array([0, 0, 0, 0, 1, 1])
  pred = np.array([2, 2, 0, 4, 3, 1])
  s = bias_audit.shares(pred, groups, [0, 1], labels, ["thief", "animal"], ["child"], ["cat", "dog"])
  assert s[(0, "thief")] == 0.5 and s[(0, "animal")] == 0.0 and s[(0, "child")] == 0.25
  assert s[(0, bias_audit.ANY_FLAGGED)] == 0.5 and s[(0, bias_audit.TASK)] == 0.25
  assert s[(1, "animal")] == 0.5 and s[(1, bias_audit.ANY_FLAGGED)] == 0.5
  without = bias_audit.shares(pred, groups, [0, 1], labels[:4], ["thief", "animal"], ["child"], ["cat", "dog"])
  assert without[(0, "child")] is None


# ---- reports -------------------------------------------------------------------------------------

def test_reports_are_written_whole_without_touching_the_matplotlib_backend(tmp_path):
  import matplotlib
  backend = matplotlib.get_backend()
  had_pyplot = "matplotlib.pyplot" in sys.modules

  def draw(fig):
    fig.subplots().plot([1, 2], [3, 4])
  rep = reports.Report(title="t", columns=["name", "acc"], rows=[{"name": "a|b", "acc": 0.5}, {"name": "c"}],
                       intro="intro", notes=["note"], draw=draw)
  paths = reports.write_report(str(tmp_path / "r"), "x", rep)
  assert [os.path.basename(p) for p in paths] == ["x.csv", "x.md", "x.png"]
  assert sorted(os.listdir(tmp_path / "r")) == ["x.csv", "x.md", "x.png"]  # no temporary files left
  assert (tmp_path / "r" / "x.csv").read_text() == "name,acc\na|b,0.5\nc,\n"
  md = (tmp_path / "r" / "x.md").read_text()
  assert "| name | acc |\n| --- | ---: |\n| a\\|b | 0.5000 |\n| c |  |" in md and "![x](x.png)" in md
  assert (tmp_path / "r" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.get_backend() == backend and ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_zeroshot_report_writes_templates_plainly():
  import csv
  import io
  rep = reports.zeroshot_report("z", {"top1": .7, "top1_template0": .6, "top1_template1": .5},
                                ["an image of a {}.", 'a "{}", drawn'])
  rows = list(csv.DictReader(io.StringIO(reports.to_csv(rep))))
  assert [r["classifier"] for r in rows[:2]] == ["an image of a {}.", 'a "{}", drawn']


def test_zeroshot_report_of_identical_templates():
  rep = reports.zeroshot_report("z", {"top1": 0.7, "top5": 0.9, "top1_template0": 0.7, "top1_template1": 0.7,
                                      "num_examples": 10}, ["a {}.", "a {}."])
  assert [r["top1"] for r in rep.rows] == [0.7, 0.7, 0.7] and "+0.0000" in rep.notes[0]


# ---- end to end: a short CLIP run, then `bigvis eval` --------------------------------------------

@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  """clip_ti_digits for 60 steps on one device; returns its workdir."""
  os.environ.setdefault("BIGVIS_DATA_DIR", str(tmp_path_factory.getbasetemp().parent / "bigvis-data"))
  from bigvis import train
  workdir = tmp_path_factory.mktemp("clip") / "run"
  c = config_lib.load(os.path.join(REPO, "experiments", "clip_ti_digits.py"),
                      ["total_steps=60", "batch_size=64", "log_every_steps=20", "checkpoint_every_steps=30",
                       "optim.warmup_steps=10", "mesh.data=1"])
  c.evals = ml_collections.ConfigDict({k: v for k, v in c.evals.items() if k == "zeroshot"})  # faster
  train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
  return str(workdir)


def _metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  out = {}
  for r in rows:
    for k, v in r.items():
      out[(r["step"], k)] = v
  return out


@pytest.mark.slow
def test_bigvis_eval_writes_all_reports(clip_run, capsys):
  from bigvis import cli
  capsys.readouterr()
  # The run's mesh (data=1) does not fit the 8 test devices: evaluation falls back to data parallelism.
  assert cli.main(["eval", "--workdir", clip_run, "--no-tensorboard",
                   "--set", "reports.linear_probe.seeds=2"]) == 0
  out = capsys.readouterr().out
  names = ["zeroshot", "bias_audit", "linear_probe", "robustness"]
  for name in names:
    assert f"{name} (step 60)" in out
    for ext in ("csv", "md", "png"):
      assert os.path.getsize(os.path.join(clip_run, "reports", f"{name}.{ext}")) > 0, (name, ext)
  m = _metrics(clip_run)
  zs = m[(60, "eval/zeroshot/top1")]

  # Linear probe: rises with k, full data at least as good as 1 shot, and its zero-shot line is the
  # zeroshot evaluator's top-1 on the same split (up to a float tie on one image).
  probe = [m[(60, f"eval/linear_probe/top1_{k}shot")] for k in (1, 2, 4, 8, 16)]
  assert probe[-1] > probe[0] and m[(60, "eval/linear_probe/top1_full")] > probe[0]
  assert m[(60, "eval/linear_probe/zeroshot_top1")] == pytest.approx(zs, abs=1 / 300 + 1e-9)
  table = open(os.path.join(clip_run, "reports", "linear_probe.md")).read()
  assert "| full |" in table and "zero-shot" in table

  # Robustness: the clean set is the zeroshot evaluator's split, so its accuracy is the same number;
  # at least four shifted sets, each with its gap to the clean one.
  assert m[(60, "eval/robustness/clean/top1")] == pytest.approx(zs, abs=1 / 300 + 1e-9)
  shifted = [k for (s, k) in m if s == 60 and k.startswith("eval/robustness/") and k.endswith("/gap")]
  assert len(shifted) >= 4
  for key in shifted:
    s = key.split("/")[2]
    assert m[(60, key)] == pytest.approx(m[(60, f"eval/robustness/{s}/top1")] - m[(60, "eval/robustness/clean/top1")])
  assert min(m[(60, key)] for key in shifted) < -0.02  # the shifts really cost accuracy
  rob = open(os.path.join(clip_run, "reports", "robustness.csv")).read().splitlines()
  assert rob[1].startswith("clean,(reference)") and any(line.startswith("rotated,rotate(30)") for line in rob)

  # Bias audit: adding a category only takes images away from the others.
  for g in ("as_drawn", "thick", "inverted"):
    a, b = m[(60, f"eval/bias_audit/{g}/flagged")], m[(60, f"eval/bias_audit/{g}/flagged_with_added")]
    assert 0 <= b <= a <= 1

  # Zero-shot report: one row per template and the ensemble.
  zrep = open(os.path.join(clip_run, "reports", "zeroshot.csv")).read().splitlines()
  assert len(zrep) == 1 + 3 + 1 and zrep[-1].split(",")[1] == "3"


@pytest.mark.slow
def test_ensemble_of_identical_templates_equals_the_single_template(clip_run, capsys):
  from bigvis import cli
  one = "an image of a {}."
  assert cli.main(["eval", "--workdir", clip_run, "--no-tensorboard", "--evaluator", "zeroshot",
                   "--set", f"evals.zeroshot.prompts=['{one}', '{one}', '{one}']"]) == 0
  last = json.loads(open(os.path.join(clip_run, "metrics.jsonl")).read().splitlines()[-1])
  assert last["eval/zeroshot/top1"] == last["eval/zeroshot/top1_template0"] == last["eval/zeroshot/top1_template2"]


@pytest.mark.slow
def test_bias_audit_on_shards_with_a_group_label(clip_run, tmp_path):
  """Group id from the shards' `label`: the audit's shares match a direct computation, and adding a
  category moves exactly the images it wins, never into another flagged category."""
  from bigvis import eval_cli, inference, sharding
  from bigvis.evaluators import zeroshot
  from data_pipelines.shards import write_examples
  from PIL import Image
  from sklearn.datasets import load_digits
  import io

  digits = load_digits()
  def png(a):
    buf = io.BytesIO()
    Image.fromarray(np.repeat(a[..., None], 3, -1)).save(buf, "PNG")
    return buf.getvalue()
  examples = []
  for i in range(48):  # group 0: digits as drawn; group 1: the same digits inverted
    im = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
    examples.append({"image": png(im if i % 2 == 0 else 255 - im), "label": i % 2, "key": str(i)})
  write_examples(examples, str(tmp_path / "shards"), shard_size=20)
  data = dict(source="shards", shards=str(tmp_path / "shards" / "*.tfrecord"), pp="decode|resize(16)|value_range(-1,1)")

  config = inference.load_config(clip_run)
  # "7": training captions spell numerals ("number 7"), so the added category really wins sevens.
  flagged, added = ["smudge", "scribble"], ["7"]
  cfg = ml_collections.ConfigDict(dict(type="bias_audit", data=data, group_key="label",
                                       group_names=["drawn", "inverted"], flagged=flagged, added=added,
                                       batch_size=16))
  from bigvis.models import build_model
  model = build_model(config.model)
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  step, params = eval_cli.restore_params(clip_run, config, mesh, sharding.DEFAULT_RULES, None)
  ev = bias_audit.Evaluator(cfg, name="audit", model=model, mesh=mesh, config=config)
  with sharding.use_mesh(mesh), sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
    got = ev.run(params)
  assert step == 60 and got["num_examples"] == 48

  # Direct computation on one device.
  rows = list(data_input.eval_batches(ml_collections.ConfigDict(data), global_batch_size=48))
  images, groups = rows[0]["image"], rows[0]["label"]
  local = jax.device_get(params)
  names = zeroshot.class_names_from(config.evals.zeroshot.class_names, "x") + flagged + added
  tok = zeroshot.text_tokenizer(config.evals.zeroshot, config, "x")
  templates = list(config.evals.zeroshot.prompts)
  zimg, ztxt, _ = jax.jit(model.apply)({"params": local}, images, tok.encode(zeroshot.prompt_texts(names, templates)))
  cls = zeroshot.ensemble(np.asarray(ztxt).reshape(len(names), len(templates), -1))
  pred_a = np.argmax(np.asarray(zimg) @ cls[:-1].T, 1)
  pred_b = np.argmax(np.asarray(zimg) @ cls.T, 1)
  flagged_ids = [10, 11]
  for g, gname in enumerate(["drawn", "inverted"]):
    want_a = np.mean(np.isin(pred_a[groups == g], flagged_ids))
    want_b = np.mean(np.isin(pred_b[groups == g], flagged_ids))
    assert got[f"{gname}/flagged"] == pytest.approx(want_a, abs=1 / 24 + 1e-9)
    assert got[f"{gname}/flagged_with_added"] == pytest.approx(want_b, abs=1 / 24 + 1e-9)
  # Accounting: what every A-category lost is what `added` won.
  r = ev._result
  for g in r["ids"]:
    a_cats = [bias_audit.ANY_FLAGGED, bias_audit.TASK]
    lost = sum(r["a"][(g, c)] - r["b"][(g, c)] for c in a_cats)
    assert lost == pytest.approx(r["b"][(g, "7")])
    assert all(r["b"][(g, c)] <= r["a"][(g, c)] + 1e-12 for c in flagged)
  assert sum(r["b"][(g, "7")] for g in r["ids"]) > 0  # the added category wins images
  rep = ev.report()
  assert {row["group"] for row in rep.rows} == {"drawn", "inverted"}
  reports.write_report(str(tmp_path / "rep"), "audit", rep)
  assert os.path.getsize(tmp_path / "rep" / "audit.png") > 0


@pytest.mark.slow
def test_eval_cli_errors_name_the_culprit(clip_run, capsys, tmp_path):
  from bigvis import cli
  from data_pipelines import tokenizer as tok
  capsys.readouterr()
  other = tok.train_tokenizer(["the digit %d" % i for i in range(100)], str(tmp_path / "other"), vocab_size=40)
  assert cli.main(["eval", "--workdir", clip_run, "--evaluator", "zeroshot",
                   "--set", f"evals.zeroshot.tokenizer='{other}'"]) == 2
  assert "evals.zeroshot.tokenizer tokenizes with " in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", clip_run, "--evaluator", "linear_prob"]) == 2
  assert "closest is 'linear_probe'" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", clip_run, "--evaluator", "zeroshot", "--step", "7"]) == 2
  assert "no checkpoint at step 7" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", clip_run, "--set", "reports.robustness.reference='nope'",
                   "--evaluator", "robustness"]) == 2
  assert "reports.robustness.reference 'nope'" in capsys.readouterr().err
  cls = dict(cls=dict(type="classification", data=dict(source="digits", split="test", pp="decode|onehot(10)")))
  assert cli.main(["eval", "--workdir", clip_run, "--set", f"evals={cls!r}", "--evaluator", "cls"]) == 2
  assert ("evaluator 'cls' is a classification evaluator, which reads a vit model; this run's is clip."
          in capsys.readouterr().err)
  vit = os.path.join(REPO, "experiments", "vit_ti_digits.py")
  assert cli.main(["eval", "--workdir", clip_run, "--config", vit]) == 2
  assert "another model than the run's" in capsys.readouterr().err
  # The run was trained without the retrieval eval; the experiment file has it.
  assert cli.main(["eval", "--workdir", clip_run, "--no-tensorboard", "--evaluator", "retrieval",
                   "--config", os.path.join(REPO, "experiments", "clip_ti_digits.py")]) == 0
  assert os.path.exists(os.path.join(clip_run, "reports", "retrieval.md"))


@pytest.mark.slow
def test_eval_run_again_keeps_no_stale_metric_or_chart_and_beside_a_training_run_only_appends(clip_run, capsys,
                                                                                            caplog):
  """Run again with fewer templates, the old per-template rows and the old chart stayed beside the new
  results. Run during training, eval renamed rewritten files over the trainer's open ones, whose
  later rows and TensorBoard points were lost."""
  from bigvis import cli, train

  def zeroshot(*templates):
    return cli.main(["eval", "--workdir", clip_run, "--no-tensorboard", "--evaluator", "zeroshot",
                     "--set", f"evals.zeroshot.prompts={list(templates)!r}"])
  assert zeroshot("a {}.", "the {}.") == 0
  assert os.path.exists(os.path.join(clip_run, "reports", "zeroshot.png"))
  assert zeroshot("an image of a {}.") == 0
  keys = {k for (s, k) in _metrics(clip_run) if s == 60 and k.startswith("eval/zeroshot/")}
  assert keys and not any("template" in k for k in keys), keys
  assert not os.path.exists(os.path.join(clip_run, "reports", "zeroshot.png"))  # none for one template
  before = open(os.path.join(clip_run, "metrics.jsonl")).read()
  with caplog.at_level("WARNING"), train.workdir_lock(clip_run):  # as a training run holds it
    assert zeroshot("an image of a {}.") == 0
  after = open(os.path.join(clip_run, "metrics.jsonl")).read()
  assert after.startswith(before) and after.count("\n") == before.count("\n") + 1
  assert f"a run is training in {clip_run}" in caplog.text


def test_probe_shots_must_be_whole_numbers():
  from data_pipelines.sources import data_config
  cfg = ml_collections.ConfigDict(dict(type="linear_probe", shots=[1.5, 4], train_data=data_config(split="train"),
                                       data=data_config(split="test")))
  with pytest.raises(UserError, match=r"reports.lp.shots must be positive integers, got \[1.5, 4\]"):
    linear_probe.Evaluator(cfg, name="lp", model=None, mesh=None, config=ml_collections.ConfigDict(
        dict(reports=dict(lp=cfg.to_dict()))))
