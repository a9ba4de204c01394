"""CLIP: paper configs, the contrastive loss on every mesh, zero-shot and retrieval evals, inference."""
import collections
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigvis import config as config_lib
from bigvis import objectives, sharding
from bigvis.errors import UserError
from bigvis.evaluators import retrieval, zeroshot
from bigvis.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name, overrides=()):
  return config_lib.load(os.path.join(REPO, "experiments", f"{name}.py"), list(overrides))


@pytest.mark.parametrize("name,total,image,text", [
    ("clip_vitb16", 149.6, 86.2, 63.4),
    ("clip_vitl14", 427.6, None, None),
    ("clip_vith14", 986.1, None, None),
])
def test_paper_parameter_counts(name, total, image, text):
  from bigvis import params
  counts = params.count_by_module(params.abstract_params(_experiment(name).model))  # shapes only
  assert round(sum(counts.values()) / 1e6, 1) == total
  if image is not None:
    assert (round(counts["img"] / 1e6, 1), round(counts["txt"] / 1e6, 1)) == (image, text)


# A CLIP small enough to compile in seconds; widths divide the 4-way fsdp axis.
# XLA's fusions spelled out ('auto' would pick the Pallas kernels on a GPU host), the reference the
# kernels' tests compare with.
_XLA = dict(norm_impl="xla", gelu_impl="xla")
TINY = dict(name="clip", embed_dim=32,
            image=dict(variant="mu/4", image_size=8, pool_type="gap", **_XLA),
            text=dict(variant="mu", vocab_size=64, context_length=8, **_XLA))


def _tiny_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 64, (n, 8)).astype(np.int32)
  tokens[np.arange(n), rng.integers(2, 8, n)] = 2  # an EOT somewhere, padding after it
  tokens = np.where(np.arange(8)[None] > np.argmax(tokens == 2, axis=1)[:, None], 0, tokens)
  return {"image": rng.standard_normal((n, 8, 8, 3)).astype(np.float32), "labels": tokens}


def _loss_and_grads(model, boxed, batch, mesh_cfg, devices=None, *, collectives=False, objective="clip"):
  """The objective's loss and gradients on the global batch, jitted over the given mesh; with
  `collectives`, also the compiled step's all-reduces (their result shapes, sorted)."""
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.DEFAULT_RULES
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  params = jax.device_put(nn.meta.unbox(boxed), param_sh)
  loss_fn = objectives.make_objective(ml_collections.ConfigDict(dict(name=objective)), model)

  def f(p, b):
    with sharding.activation_rules(mesh, rules):  # as the trainer runs the model
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b, jax.random.key(0))
    return loss, grads

  with sharding.use_mesh(mesh):
    step = jax.jit(f, in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(sharding.replicated(mesh), param_sh))
    global_batch = sharding.global_batch(batch, mesh)
    loss, grads = step(params, global_batch)
    if collectives:
      hlo = step.lower(params, global_batch).compile().as_text()
      return float(loss), jax.tree.map(np.asarray, grads), sorted(re.findall(r"= (\S+) all-reduce\(", hlo))
  return float(loss), jax.tree.map(np.asarray, grads), param_sh


@pytest.fixture(scope="module")
def tiny():
  model = build_model(TINY)
  batch = _tiny_batch()
  boxed = jax.jit(model.init)(jax.random.key(1), batch["image"][:1], batch["labels"][:1])["params"]
  ref = _loss_and_grads(model, boxed, batch, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return model, boxed, batch, ref


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1),
                                      dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "data2_fsdp4", "data2_fsdp2_tensor2"])
def test_clip_loss_and_grads_equal_on_one_device_and_8_device_meshes(tiny, mesh_cfg):
  """Every image is contrasted with every text of the global batch, whatever the layout."""
  model, boxed, batch, (ref_loss, ref_grads, _) = tiny
  loss, grads, param_sh = _loss_and_grads(model, boxed, batch, mesh_cfg)
  if mesh_cfg["fsdp"] > 1:  # the parameters really are split
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(param_sh))
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
  _assert_grads_close(grads, ref_grads)


def _assert_grads_close(grads, ref_grads):
  """Equal to float32 rounding, in all and per parameter."""
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for _, g in flat_ref))
  diff = np.sqrt(sum(np.sum((g - g_ref).astype(np.float64) ** 2) for (_, g_ref), g in zip(flat_ref, flat)))
  assert diff <= 1e-5 * total
  # Per parameter too; the floor covers gradients that are zero but for rounding (attention key biases).
  for (path, g_ref), g in zip(flat_ref, flat):
    err = np.linalg.norm(g - g_ref)
    assert err <= 1e-5 * np.linalg.norm(g_ref) + 1e-7 * total, (jax.tree_util.keystr(path), err)


# Two of the four (mesh, GEMM form) pairs, to keep CI short: separate GEMMs where FSDP splits the
# batch (three copies of the norm's output), one GEMM under tensor parallelism (heads split).
@pytest.mark.parametrize("mesh_cfg, fused_qkv", [(dict(data=2, fsdp=2, tensor=2), True),
                                                 (dict(data=2, fsdp=4, tensor=1), False)],
                         ids=["data2_fsdp2_tensor2", "data2_fsdp4_separate_qkv"])
def test_pallas_kernels_clip_on_8_device_meshes_equal_the_one_device_xla_model(tiny, mesh_cfg, fused_qkv,
                                                                               monkeypatch):
  """`norm_impl` and `gelu_impl` = 'pallas' under a mesh: each device runs the kernels on its own
  shard (shard_map over the batch axes, and the MLP's hidden units where tensor parallelism splits
  them; interpreted here), and the loss and gradients are those of XLA's fusions on one device, the
  scale, bias and residual-stream bias gradients summed over the devices' rows; attention's kernels
  (`attention_impl='pallas'`) on each device's examples and heads, causal in the text tower, the
  query bias's gradient summed over the devices' examples; with separate
  query, key and value GEMMs too (three copies of the norm's output); with the residual adds in the
  norms' kernels, each device adds its own rows."""
  model, boxed, batch, (ref_loss, ref_grads, _) = tiny
  # The norms' kernels take the residual adds (the default; XLA's adds: test_models, one device).
  kernels = {"norm_impl": "pallas_interpret", "gelu_impl": "pallas_interpret", "fused_qkv": fused_qkv,
             "residual_in_norm": True, "attention_impl": "pallas_interpret"}
  pallas = {**TINY, "image": {**TINY["image"], **kernels}, "text": {**TINY["text"], **kernels}}
  from bigvis import sharding
  per_device = collections.defaultdict(list)  # kernel wrapper -> the in_specs of each call

  def recording_shard_map(f, **kw):
    per_device[f.func.__name__].append(kw["in_specs"])
    return jax.shard_map(f, **kw)
  monkeypatch.setattr(sharding, "shard_map", recording_shard_map)
  loss, grads, all_reduces = _loss_and_grads(build_model(pallas), boxed, batch, mesh_cfg, collectives=True)
  calls = {name: len(specs) for name, specs in per_device.items()}
  # 2 LayerNorms (forward and backward) per GELU (forward and backward), in every block of both towers
  # but the text tower's last, which computes the end-of-text token alone (`last_block_pooled`): its
  # attention norm runs the kernels over every token, the rest is XLA's on one row an example.
  assert calls["_layernorm_forward"] == calls["_layernorm_backward"] == 2 * calls["_bias_gelu_backward"] + 1, calls
  assert calls["_bias_gelu_backward"] > 0
  assert calls["_bias_gelu_forward"] == calls["_bias_gelu_backward"], calls
  # Attention's kernels, each device its examples and (under tensor parallelism) its heads: the query
  # bias split like the heads.
  assert calls["_forward"] == calls["_backward"] == calls["_bias_gelu_forward"], calls
  q_specs = {(specs[0] if fused_qkv else specs[0][0]) for name in ("_forward", "_backward")
             for specs in per_device[name]}  # a fused q/k/v array, or the q of three
  assert {(spec[0], spec[2]) for spec in q_specs} == {(("data", "fsdp"), "tensor")}, q_specs
  assert {len(spec) for spec in q_specs} == ({5} if fused_qkv else {4}), q_specs
  assert {specs[2] for specs in per_device["_forward"]} == {jax.sharding.PartitionSpec("tensor", None)}
  assert all(specs[0][0] == ("data", "fsdp") for name in per_device for specs in per_device[name]
             if name not in ("_forward", "_backward"))  # attention's first argument is q, k and v: below
  addends = {len(specs) == 5 for specs in per_device["_layernorm_forward"]}  # x, scale, bias (, addend, bias)
  assert addends == {False, True}, addends  # the first block's norm has no addend
  dy_counts = {len(specs[1]) for specs in per_device["_layernorm_backward"]}  # y's copies per norm
  assert dy_counts == ({1} if fused_qkv else {1, 3}), dy_counts
  gelu_hidden_axes = {specs[0][-1] for name in ("_bias_gelu_forward", "_bias_gelu_backward")
                      for specs in per_device[name]}
  assert gelu_hidden_axes == {"tensor"}, gelu_hidden_axes  # the rules' axis for act_mlp
  # The kernels add no collective: wrapping the custom VJP (not each kernel) in shard_map had autodiff
  # sum x's gradient over `tensor`, one more activation-sized all-reduce per LayerNorm.
  xla_model = build_model(  # the same GEMMs with XLA's fusions
      {**TINY, "image": {**TINY["image"], "fused_qkv": fused_qkv}, "text": {**TINY["text"], "fused_qkv": fused_qkv}})
  assert all_reduces == _loss_and_grads(xla_model, boxed, batch, mesh_cfg, collectives=True)[2]
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for _, g in flat_ref))
  for (path, g_ref), g in zip(flat_ref, jax.tree.leaves(grads)):
    err = np.linalg.norm(g - g_ref)
    assert err <= 1e-5 * np.linalg.norm(g_ref) + 1e-7 * total, (jax.tree_util.keystr(path), err)


def _numpy_clip_loss(zimg, ztxt, scale):
  logits = scale * zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  def xent(l):
    m = l.max(axis=1, keepdims=True)
    logp = l - m - np.log(np.exp(l - m).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  return 0.5 * (xent(logits) + xent(logits.T))


def test_clip_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 12, 16)).astype(np.float32)
  zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in z)
  for scale in (1.0, 14.3, 100.0):
    got = float(objectives.clip_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float32(scale)))
    np.testing.assert_allclose(got, _numpy_clip_loss(zimg, ztxt, scale), rtol=1e-5)


def _numpy_sigmoid_loss(zimg, ztxt, scale, bias):
  logits = scale * zimg.astype(np.float64) @ ztxt.astype(np.float64).T + bias
  signs = 2 * np.eye(len(zimg)) - 1  # +1 for an image's own text, -1 for every other
  return np.sum(np.logaddexp(0.0, -signs * logits)) / len(zimg)  # -log sigmoid, summed per image


def test_sigmoid_loss_matches_numpy_reference():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((2, 12, 16)).astype(np.float32)
  zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in z)
  for scale, bias in ((10.0, -10.0), (1.0, 0.0), (100.0, -3.0)):
    got = float(objectives.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float32(scale), jnp.float32(bias)))
    np.testing.assert_allclose(got, _numpy_sigmoid_loss(zimg, ztxt, scale, bias), rtol=1e-5)


def test_sigmoid_loss_and_grads_equal_on_one_device_and_the_8_device_mesh():
  """SigLIP's pairs span the global batch, whatever the layout (the towers: the clip tests above)."""
  rng = np.random.default_rng(2)
  zimg, ztxt = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.standard_normal((2, 16, 8)))
  args = (jnp.asarray(zimg, jnp.float32), jnp.asarray(ztxt, jnp.float32), jnp.float32(10.0), jnp.float32(-10.0))
  loss_and_grads = jax.value_and_grad(objectives.sigmoid_loss, argnums=(0, 1, 2, 3))
  ref_loss, ref_grads = jax.jit(loss_and_grads)(*jax.device_put(args, jax.devices()[0]))
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  rows = sharding.batch_sharding(mesh)
  sharded = jax.device_put(args, (rows, rows, sharding.replicated(mesh), sharding.replicated(mesh)))
  loss, grads = jax.jit(loss_and_grads)(*sharded)
  assert len(sharded[0].sharding.device_set) == 8
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert float(ref_grads[3]) != 0.0  # the bias learns
  for g, g_ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-7)


def test_siglip_objective_is_the_sigmoid_loss_of_the_model_embeddings():
  model = build_model({**TINY, "temperature_init": 10.0, "bias_init": -10.0})  # the SigLIP paper's init
  batch = _tiny_batch(8)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["image"][:1], batch["labels"][:1])["params"])
  loss_fn = objectives.make_objective(ml_collections.ConfigDict(dict(name="siglip")), model)
  both = jax.jit(lambda p: (loss_fn(p, batch, jax.random.key(0)), model.apply({"params": p}, batch["image"],
                                                                               batch["labels"])))
  (loss, metrics), (zimg, ztxt, aux) = both(params)  # one compile
  assert float(aux["logit_bias"]) == -10.0 and float(metrics["logit_scale"]) == pytest.approx(10.0)
  expected = _numpy_sigmoid_loss(np.asarray(zimg), np.asarray(ztxt), 10.0, -10.0)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_contrastive_objective_and_logit_bias_must_agree():
  with_bias, without = build_model({**TINY, "bias_init": -10.0}), build_model(TINY)
  with pytest.raises(UserError, match="objective 'siglip' needs model.bias_init"):
    objectives.make_objective(ml_collections.ConfigDict(dict(name="siglip")), without)
  with pytest.raises(UserError, match="model.bias_init adds a logit bias that only objective 'siglip' uses"):
    objectives.make_objective(ml_collections.ConfigDict(dict(name="clip")), with_bias)


def test_temperature_is_clamped_at_100():
  batch = _tiny_batch(4)
  model = build_model({**TINY, "temperature_init": 1000.0})
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["image"][:1], batch["labels"][:1])["params"])
  loss_fn = objectives.make_objective(ml_collections.ConfigDict(dict(name="clip")), model)
  # Differentiating only by `t` keeps the compiled graph small: the towers need no backward pass.
  (_, metrics), grad_t = jax.jit(jax.value_and_grad(
      lambda t: loss_fn({**params, "t": t}, batch, jax.random.key(0)), has_aux=True))(params["t"])
  assert float(np.exp(params["t"][0])) == pytest.approx(1000.0, rel=1e-4)
  assert float(metrics["logit_scale"]) == pytest.approx(100.0)
  assert float(grad_t[0]) == 0.0  # clamped: the temperature no longer moves


def test_ensemble_of_identical_templates_equals_one_template():
  rng = np.random.default_rng(0)
  one = rng.standard_normal((5, 1, 8)).astype(np.float32)
  one /= np.linalg.norm(one, axis=-1, keepdims=True)
  np.testing.assert_allclose(zeroshot.ensemble(np.repeat(one, 3, axis=1)), one[:, 0], atol=1e-6)
  # Two templates: the class vector is the normalised mean of its prompts.
  two = np.array([[[1, 0], [0, 1]], [[-1, 0], [0, -1]]], np.float32)
  np.testing.assert_allclose(zeroshot.ensemble(two), np.array([[1, 1], [-1, -1]]) / np.sqrt(2), atol=1e-6)
  images = np.array([[0.6, 0.8], [-1.0, 0.1]], np.float32)
  assert list(np.argmax(zeroshot.zeroshot_logits(images, two), axis=1)) == [0, 1]


def test_zeroshot_inputs_are_checked():
  from bigvis.errors import UserError
  assert zeroshot.class_names_from("cat, dog,,car", "x") == ["cat", "dog", "car"]
  with pytest.raises(UserError, match="twice"):
    zeroshot.class_names_from(["cat", "cat"], "evals.z.class_names")
  with pytest.raises(UserError, match=r"evals.z.prompts template 'a photo'"):
    zeroshot.templates_from(["a photo"], "evals.z.prompts")


def test_zeroshot_evaluator_on_the_mesh_matches_a_direct_computation():
  """The sharded evaluator agrees with embedding everything on one device and taking the argmax."""
  from data_pipelines import digits
  from data_pipelines import input as data_input
  from data_pipelines.tokenizer import Tokenizer
  model, batch = build_model(TINY), _tiny_batch(1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch["image"], batch["labels"])["params"])
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  data = dict(source="digits", split="test", pp="decode|resize(8)|value_range(-1,1)")

  templates = list(digits.ZEROSHOT_TEMPLATES)
  cfg = ml_collections.ConfigDict(dict(type="zeroshot", batch_size=64, data=data, prompts=templates,
                                       class_names=list(digits.ZEROSHOT_CLASSNAMES),
                                       tokenizer="bundled:digits", context_length=8))
  ev = zeroshot.Evaluator(cfg, name="z", model=model, mesh=mesh, config=None)
  with sharding.use_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    got = ev.run(jax.device_put(params, sharding.replicated(mesh)))
  assert got["num_examples"] == 300 and got["top1"] <= got["top5"]
  assert set(got) >= {"top1", "top5", "top1_template0", "top1_template2"}
  # The direct computation.
  rows = list(data_input.eval_batches(ml_collections.ConfigDict(data), global_batch_size=300))
  images = np.concatenate([r["image"] for r in rows])
  labels = np.concatenate([r["label"] for r in rows])
  tokens = Tokenizer("bundled:digits", 8).encode(zeroshot.prompt_texts(digits.ZEROSHOT_CLASSNAMES, templates))
  zimg, ztxt, _ = jax.jit(model.apply)({"params": params}, images, tokens)
  ztxt = np.asarray(ztxt).reshape(10, len(templates), -1)
  logits = zeroshot.zeroshot_logits(np.asarray(zimg), ztxt)
  assert got["top1"] == pytest.approx(np.mean(np.argmax(logits, 1) == labels), abs=1e-9)
  single = np.mean(np.argmax(np.asarray(zimg) @ ztxt[:, 0].T, 1) == labels)
  assert got["top1_template0"] == pytest.approx(single, abs=1e-9)


def _argsort_recall(zimg, ztxt, k):
  """The textbook definition for distinct items: the partner is among the k most similar."""
  sims = zimg @ ztxt.T
  i2t = np.mean([i in np.argsort(-sims[i])[:k] for i in range(len(sims))])
  t2i = np.mean([i in np.argsort(-sims[:, i])[:k] for i in range(len(sims))])
  return i2t, t2i


def test_retrieval_recall_on_constructed_embeddings():
  eye = np.eye(12, dtype=np.float32)
  assert set(retrieval.recall_at_k(eye, eye).values()) == {1.0}
  rng = np.random.default_rng(0)
  zimg = rng.standard_normal((40, 8)).astype(np.float32)
  ztxt = zimg + 1.5 * rng.standard_normal((40, 8)).astype(np.float32)  # noisy partners
  got = retrieval.recall_at_k(zimg, ztxt, chunk=7)
  for k in (1, 5, 10):
    i2t, t2i = _argsort_recall(zimg, ztxt, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < got["i2t_r1"] < got["i2t_r5"] < got["i2t_r10"] < 1


def test_retrieval_counts_only_the_partner_among_identical_captions():
  # Images 0 and 1 have the same caption (tokens equal); either text is as good as the other.
  zimg = np.array([[1, 0, 0], [1, 0, 0.01], [0, 1, 0], [0, 0, 1]], np.float32)
  ztxt = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  tokens = np.array([[5, 2], [5, 2], [6, 2], [7, 2]])
  got = retrieval.recall_at_k(zimg, ztxt, ks=(1, 2), text_ids=tokens)
  assert got["i2t_r1"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)  # a coin flip between the two copies
  assert got["i2t_r2"] == 1.0
  # Text 0 and text 1 are the same query, but their partners differ: image 1 scores higher for both.
  assert got["t2i_r1"] == pytest.approx((0 + 1 + 1 + 1) / 4)


def test_paper_config_without_shards_stops_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "bigvis.cli", "train", "--config", "experiments/clip_vitb16.py:tokenizer=bundled:digits",
       "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("bigvis: error:")]
  assert len(errors) == 1 and "data.train.shards" in errors[0]


def _digit_pngs(folder, sizes):
  """A few real digits as PNGs of assorted sizes (the embedder must resize them)."""
  from PIL import Image
  from sklearn.datasets import load_digits
  folder.mkdir()
  d = load_digits()
  for i, size in enumerate(sizes):
    im = np.round(d.images[i] * 255 / 16).astype(np.uint8)
    Image.fromarray(im).resize(size, Image.NEAREST).save(folder / f"digit{i}.png")
  (folder / "notes.txt").write_text("not an image")
  return d.target[:len(sizes)]


def _short_run(name, workdir, steps):
  """A few steps on one device (inference does not care where a run trained)."""
  from bigvis import train
  c = _experiment(name, [f"total_steps={steps}", "batch_size=32", "log_every_steps=10",
                         "checkpoint_every_steps=0", "optim.warmup_steps=2", "mesh.data=1"])
  c.evals = ml_collections.ConfigDict()  # the embedders fall back to the training pp
  train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])


@pytest.mark.slow
def test_zeroshot_command_and_embedder_on_a_short_clip_run(tmp_path, capsys):
  from bigvis import cli, inference
  _short_run("clip_ti_digits", tmp_path / "run", 10)
  _digit_pngs(tmp_path / "imgs", [(8, 8), (40, 40), (33, 50)])
  names = "zero,one,two,three,four,five,six,seven,eight,nine"
  capsys.readouterr()
  assert cli.main(["zeroshot", "--workdir", str(tmp_path / "run"), "--images", str(tmp_path / "imgs"),
                   "--labels", names, "--templates", "an image of a {}.", "{}, drawn in ink.",
                   "--top-k", "3"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines] == ["digit0.png", "digit1.png", "digit2.png"]
  for line in lines:
    top = [part.split() for part in line.split("  ", 1)[1].split(" | ")]
    assert len(top) == 3 and all(c in names.split(",") for c, _ in top)
    probs = [float(p) for _, p in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3

  config, model, params = inference.load_run(str(tmp_path / "run"))
  assert config.experiment == "clip_ti_digits" and params["t"].shape == (1,)

  # The probabilities are CLIP's: softmax over exp(t) x cosine(image, mean of the normalised
  # prompt embeddings), recomputed here from the towers directly.
  from PIL import Image

  from bigvis import zeroshot_cli
  from bigvis.evaluators import features, zeroshot
  classes, templates = names.split(","), ["an image of a {}.", "{}, drawn in ink."]
  got = zeroshot_cli.classify(str(tmp_path / "run"), str(tmp_path / "imgs"), names, templates, top_k=10)
  tokenizer = zeroshot.text_tokenizer(features.zeroshot_section(config, None, "evals"), config, "test")
  tokens = tokenizer.encode([t.format(c) for c in classes for t in templates])
  _, ztxt, _ = model.apply({"params": params}, None, tokens, train=False)
  ztxt = np.asarray(ztxt, np.float64).reshape(len(classes), len(templates), -1)
  ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
  zcls = ztxt.mean(axis=1)
  zcls /= np.linalg.norm(zcls, axis=-1, keepdims=True)
  images = [np.asarray(Image.open(tmp_path / "imgs" / n).convert("RGB")) for n, _ in got]
  zimg = np.asarray(inference.load_image_embedder(str(tmp_path / "run"))(images), np.float64)
  scale = min(np.exp(float(np.asarray(params["t"])[0])), 100.0)
  logits = scale * zimg @ zcls.T
  want = np.exp(logits - logits.max(axis=1, keepdims=True))
  want /= want.sum(axis=1, keepdims=True)
  for i, (_, top) in enumerate(got):
    assert len(top) == 10
    for name, p in top:
      assert p == pytest.approx(want[i, classes.index(name)], abs=1e-4)
  embed = inference.load_image_embedder(str(tmp_path / "run"))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(16, 16), (7, 30), (64, 64)]]
  z = embed(images + [images[0][..., 0]])  # grayscale is accepted too
  assert z.shape == (4, 128)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(z[0], embed(images[:1])[0], atol=1e-5)  # independent of the batch

  # A run trained with the Pallas kernels (GPU only) is served on a CPU by XLA's LayerNorm, GELU and attention:
  # the same parameters and embeddings.
  import json
  with open(tmp_path / "run" / "config.json") as f:
    trained = json.load(f)
  for tower in ("image", "text"):
    trained["model"].setdefault(tower, {}).update(norm_impl="pallas", gelu_impl="pallas", attention_impl="pallas")
  with open(tmp_path / "run" / "config.json", "w") as f:
    json.dump(trained, f)
  np.testing.assert_allclose(inference.load_image_embedder(str(tmp_path / "run"))(images[:1])[0], z[0], atol=1e-6)

  assert cli.main(["zeroshot", "--workdir", str(tmp_path / "run"), "--images", str(tmp_path / "imgs"),
                   "--labels", "a,b", "--step", "3"]) == 2
  assert "no checkpoint at step 3" in capsys.readouterr().err

  # The same checkpoint embeds an MMID folder for `bigvis translatability --workdir`.
  from test_translatability import build_mmid
  (tmp_path / "mmid").mkdir()
  pairs = build_mmid(str(tmp_path / "mmid"))
  assert cli.main(["translatability", "--mmid", str(tmp_path / "mmid"), "--pairs", pairs,
                   "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "tr")]) == 0
  with open(tmp_path / "tr" / "pairs.tsv") as f:
    assert len(f.readlines()) > 5


def test_image_embedder_of_a_vit_run(tmp_path, capsys):
  from bigvis import cli, inference
  _short_run("vit_ti_digits", tmp_path / "vit", 2)
  z = inference.load_image_embedder(str(tmp_path / "vit"))([np.zeros((20, 20, 3), np.uint8)] * 2)
  assert z.shape == (2, 128)  # mu's pre-logits width
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
  _digit_pngs(tmp_path / "imgs", [(8, 8)])
  capsys.readouterr()
  assert cli.main(["zeroshot", "--workdir", str(tmp_path / "vit"), "--images", str(tmp_path / "imgs"),
                   "--labels", "a,b"]) == 2
  assert "needs a CLIP run" in capsys.readouterr().err


def test_image_pp_keeps_only_deterministic_image_ops():
  from bigvis import inference
  c = _experiment("vit_ti_digits")
  assert inference.image_pp(c) == "resize(16)|value_range(-1,1)"
  c.evals = ml_collections.ConfigDict()
  assert inference.image_pp(c) == "resize(16)|value_range(-1,1)"  # from the training pp, crop dropped
  c = _experiment("clip_vitb16", [])
  c.data.train.pp = "decode_jpeg_and_inception_crop(224)|normalize('clip')|tokenize(77, model='x')"
  assert inference.image_pp(c) == "resize(224)|normalize('clip')"


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
  """A 16-bit greyscale PNG (PIL mode I;16) read by `bigvis zeroshot`, or a uint16 array given to the
  embedder, is scaled to 8 bits as the eval pipeline's decode scales it; PIL's convert("RGB") set
  every pixel above 255 to white. Integer arrays outside 0-255 are refused rather than clipped."""
  import numpy as np
  from PIL import Image
  from bigvis import inference, zeroshot_cli
  from bigvis.errors import UserError
  ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)
  Image.fromarray(ramp).save(tmp_path / "ramp.png")  # uint16: mode I;16
  _, (read,) = zeroshot_cli.read_images(str(tmp_path))
  rgb = inference._as_rgb_uint8(read, 0)
  assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257.0).astype(np.uint8))
  assert rgb.max() == 251 and 0.4 < np.mean(rgb > 128) < 0.6  # the ramp, not white above 255
  with pytest.raises(UserError, match="outside 0-255"):
    inference._as_rgb_uint8(np.full((4, 4, 3), 300, np.int32), 1)
  np.testing.assert_array_equal(inference._as_rgb_uint8(np.full((4, 4, 3), 200, np.int64), 2), 200)
