"""The optimizer: what weight decay reaches, frozen parameters, the schedule under accumulation."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from flax import traverse_util

from bigvis.models import build_model, model_config
from bigvis import optim
from bigvis.optim import decay_mask


def test_weight_decay_reaches_weight_matrices_only():
  """Decayed: kernels and embeddings. Not decayed: 1-D gains and biases, attention's [heads,
  head_dim] query and value biases (2-D, but biases), nor what `no_decay` names."""
  cfg = model_config("vit", variant="mu/4", num_classes=3)
  params = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 16, 16, 3), "float32"))["params"])
  flat = traverse_util.flatten_dict(params)
  mask = traverse_util.flatten_dict(decay_mask(params, ""))
  attention_biases = [k for k in flat if k[-1] == "bias" and flat[k].ndim == 2]
  assert attention_biases, "the test model has no 2-D biases"
  for k, v in flat.items():
    assert mask[k] == (v.ndim > 1 and k[-1] not in ("bias", "scale")), ("/".join(k), v.shape)
  assert any(mask.values())
  assert mask[("encoder", "block00", "block", "attn", "query", "kernel")]
  named = traverse_util.flatten_dict(decay_mask(params, r"(^|/)(cls|pos_embedding)$"))
  assert not named[("cls",)] and not named[("pos_embedding",)] and mask[("cls",)]


@pytest.mark.parametrize("experiment", ["vit_ti_digits", "vit_b16_i1k", "vit_l16_i21k", "vit_h14_i21k",
                                        "clip_ti_digits", "clip_vitb16", "clip_vitl14", "clip_vith14"])
def test_experiments_leave_class_token_and_position_embeddings_undecayed(experiment):
  """Every experiment decays its weight matrices and token embeddings but not the additive class token
  and position embeddings (big_vision's and timm's choice), in whichever tower holds them."""
  from bigvis import config as config_lib
  from bigvis import params as params_lib
  config = config_lib.load(experiment, [])
  flat = traverse_util.flatten_dict(params_lib.abstract_params(config.model))
  mask = traverse_util.flatten_dict(decay_mask(traverse_util.unflatten_dict(flat), config.optim.no_decay))
  offsets = [k for k in flat if k[-1] in ("cls", "pos_embedding")]
  assert offsets, sorted(flat)[:5]
  assert not any(mask[k] for k in offsets), [k for k in offsets if mask[k]]
  kernels = [k for k in flat if k[-1] in ("kernel", "embedding") and flat[k].ndim > 1]
  assert kernels and all(mask[k] for k in kernels), [k for k in kernels if not mask[k]]


def _train_steps(overrides, n):
  """(initial params, params after `n` train steps) of vit_ti_digits with `overrides`, on the 8-device
  CPU mesh as data 2 x fsdp 4: the trainer's own state plan, shardings and step."""
  from bigvis import config as config_lib
  from bigvis import sharding, train
  from data_pipelines.synthetic import synthetic_batch
  config = config_lib.load("vit_ti_digits", ["batch_size=16", "mesh.data=2", "mesh.fsdp=4", *overrides])
  mesh, rules = sharding.mesh_and_rules(config, jax.devices())
  model, loss_fn = train.model_and_objective(config, mesh)
  local, _ = sharding.split_host_features(synthetic_batch(config.model, config.batch_size, config.seed))
  state, shardings, tx, _ = train.create_train_state(config, model, mesh, rules, local)
  first = jax.tree.map(np.asarray, state["params"])
  step = train.make_train_step(config, loss_fn, tx, shardings, mesh, rules)
  batch = sharding.global_batch(local, mesh)
  with sharding.use_mesh(mesh):
    for _ in range(n):
      state, _ = step(state, batch)
  return first, jax.tree.map(np.asarray, state["params"])


def test_frozen_parameters_stay_put_under_a_sharded_plan():
  """`optim.frozen` (optax.multi_transform: MaskedNode placeholders in the optimizer state) plans
  its state shardings and trains on a data x fsdp mesh; the frozen parameters stay bit-identical
  (weight decay included), the others move."""
  first, after = _train_steps(["optim.frozen=^embedding/", "optim.weight_decay=0.5", "optim.lr=0.01"], 2)
  flat_first, flat_after = traverse_util.flatten_dict(first), traverse_util.flatten_dict(after)
  frozen = [k for k in flat_first if k[0] == "embedding"]
  assert frozen
  for k in flat_first:
    if k in frozen:
      np.testing.assert_array_equal(flat_after[k], flat_first[k], err_msg="/".join(k))
  assert not np.array_equal(flat_after[("head", "kernel")], flat_first[("head", "kernel")])


def test_frozen_parameters_get_no_gradient_computed_nor_counted_in_grad_norm():
  """Frozen parameters' gradients are stopped in the train step: the logged grad_norm is the trained
  parameters' alone (it counted the frozen ones), and XLA computes none of theirs. A linear probe
  (everything but the head frozen) compiles to well under half the FLOPs of full training: no backward
  through the encoder at all."""
  import optax
  from bigvis import config as config_lib
  from bigvis import sharding, train
  from data_pipelines.synthetic import synthetic_batch

  def build(frozen):
    config = config_lib.load("vit_ti_digits", ["batch_size=16", "mesh.data=2", "mesh.fsdp=4", "optim.lr=0.01",
                                               f"optim.frozen={frozen}"])
    mesh, rules = sharding.mesh_and_rules(config, jax.devices())
    model, loss_fn = train.model_and_objective(config, mesh)
    local, _ = sharding.split_host_features(synthetic_batch(config.model, config.batch_size, config.seed))
    state, shardings, tx, _ = train.create_train_state(config, model, mesh, rules, local)
    step = train.make_train_step(config, loss_fn, tx, shardings, mesh, rules)
    return config, mesh, loss_fn, state, step, sharding.global_batch(local, mesh)

  def flops(compiled):
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  config, mesh, loss_fn, state, step, batch = build("^(?!head/)")
  head = state["params"]["head"]["kernel"]  # zeros at init, which would stop every other gradient
  state["params"]["head"]["kernel"] = jax.device_put(0.1 * jax.random.normal(jax.random.key(1), head.shape),
                                                     head.sharding)
  with sharding.use_mesh(mesh):
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    # Jitted: op by op over the 8-device mesh, an abort once killed a CI worker here.
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, rng)[0]))(state["params"])
    probe_flops = flops(step.lower(state, batch).compile())
    _, metrics = step(state, batch)
    # Jitted too: optax's norm op by op over the sharded gradients aborted a CI worker (thirteenth session).
    head_norm, all_norm = jax.jit(lambda g: (optim.global_norm(g["head"]), optim.global_norm(g)))(grads)
  assert float(all_norm) > 1.5 * float(head_norm)  # the frozen gradients would show
  np.testing.assert_allclose(float(metrics["train/grad_norm"]), float(head_norm), rtol=1e-4)

  _, mesh, _, state, step, batch = build("")
  with sharding.use_mesh(mesh):
    full_flops = flops(step.lower(state, batch).compile())
  assert probe_flops < 0.5 * full_flops, (probe_flops, full_flops)


def test_accumulated_updates_follow_the_schedule_in_train_steps():
  """With `accumulate_steps` k the optimizer updates once per k train steps (optax.MultiSteps) while
  total_steps and warmup_steps count train steps: each update applies the schedule at the first
  train step of its window, and the schedule returned for logging says so. (The schedule was read
  at the update count, so a run decayed k times too slowly: linear over 8 steps with k = 4 applied
  1.0 then 0.875, not 1.0 then 0.5.)"""
  import jax.numpy as jnp
  import ml_collections
  from bigvis.optim import make_optimizer
  cfg = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, lr=1.0, schedule="linear", warmup_steps=0,
                                       weight_decay=0.0, grad_clip_norm=0.0, accumulate_steps=4))
  params = {"w": jnp.zeros(())}
  tx, schedule = make_optimizer(cfg, 8, params)
  state, applied = tx.init(params), []
  for _ in range(8):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    applied.append(float(-updates["w"]))
  assert applied == [0, 0, 0, 1.0, 0, 0, 0, 0.5]
  assert [float(schedule(s)) for s in range(8)] == [1.0] * 4 + [0.5] * 4


def test_sgd_takes_weight_decay_and_scanned_gains_are_not_decayed():
  """SGD applies `weight_decay` (decoupled, as AdamW does) where it was silently ignored; in a
  scanned ViT (every parameter [layers, ...]) the norms' gains and the biases stay undecayed."""
  import jax.numpy as jnp
  import ml_collections
  from bigvis.optim import make_optimizer
  cfg = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, lr=0.1, schedule="constant", warmup_steps=0,
                                       weight_decay=0.5, grad_clip_norm=0.0))
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  tx, _ = make_optimizer(cfg, 10, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05)  # -lr * wd * param
  np.testing.assert_allclose(updates["dense"]["bias"], 0.0)

  scanned = model_config("vit", variant="mu/4", num_classes=3, scan=True)
  params = nn.unbox(jax.eval_shape(build_model(scanned).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 16, 16, 3), "float32"))["params"])
  mask = traverse_util.flatten_dict(decay_mask(params, ""))
  gains = [k for k in mask if k[-1] == "scale" and "blocks" in k]
  assert gains and all(len(traverse_util.flatten_dict(params)[k].shape) == 2 for k in gains)
  assert not any(mask[k] for k in gains)
  assert any(mask[k] for k in mask if k[-1] == "kernel" and "blocks" in k)


def test_every_decaying_schedule_heeds_min_lr_ratio():
  """`min_lr_ratio` is the floor of cosine and linear decay (reached at the end) and of rsqrt decay
  (approached), where rsqrt ignored it."""
  import ml_collections
  from bigvis.optim import schedule_fn
  for kind in ("cosine", "linear", "rsqrt"):
    sched = schedule_fn(ml_collections.ConfigDict(dict(lr=2.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.25)),
                        1000)
    values = np.array([float(sched(s)) for s in range(9, 1000, 7)])  # after the warmup
    assert values.min() >= 0.5 - 1e-6 and abs(float(sched(9)) - 2.0) < 1e-6, kind
  rsqrt = schedule_fn(ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=4, schedule="rsqrt", min_lr_ratio=0.0)), 100)
  np.testing.assert_allclose(float(rsqrt(15)), 0.5)  # sqrt(4 / 16), unchanged without a floor


def test_global_norm_and_clipping_equal_optax_s_with_one_reduction_per_shape():
  """`optim.global_norm` (stacked, on GPUs: the leaves of one shape and dtype reduced as one stacked
  array: XLA's kernels per reduction, 263 of them for ViT-B/16's gradients compiled for an H100, become
  ≈22) is optax's norm, and `optim.clip_by_global_norm` optax's clipping with the same (empty) state,
  above and below the threshold, stacked or not."""
  rng = np.random.default_rng(0)
  tree = {"a": {"kernel": rng.normal(size=(8, 4)), "bias": rng.normal(size=(4,))},
          "b": {"kernel": rng.normal(size=(8, 4)), "bias": rng.normal(size=(4,)).astype(np.float16)},
          "scale": rng.normal(size=(3, 2, 2))}
  tree = jax.tree.map(jnp.asarray, tree)
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # optax squares a float16 leaf in float16
  reference = optax.tree.norm(as_f32) if hasattr(optax, "tree") else optax.tree_utils.tree_l2_norm(as_f32)
  for stacked in (True, False):
    np.testing.assert_allclose(optim.global_norm(tree, stacked), reference, rtol=1e-6)
    assert float(optim.global_norm({}, stacked)) == 0.0
  jaxpr = str(jax.make_jaxpr(functools.partial(optim.global_norm, stacked=True))(tree))
  assert jaxpr.count("reduce_sum") == 4, jaxpr  # (8, 4) f32 twice, (4,) f32, (4,) f16, (3, 2, 2)
  assert str(jax.make_jaxpr(optim.global_norm)(tree)).count("reduce_sum") == 5  # one per leaf
  cpu, gpu = jax.devices("cpu")[0], type("Device", (), {"platform": "gpu"})()
  assert not optim.stacks_norms(cpu) and optim.stacks_norms(gpu)
  for max_norm, stacked in ((0.5 * float(reference), True), (2.0 * float(reference), True),
                            (0.5 * float(reference), False)):
    ours, theirs = optim.clip_by_global_norm(max_norm, stacked), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))  # checkpoints carry over
    got, _ = ours.update(as_f32, ours.init(tree))
    want, _ = theirs.update(as_f32, theirs.init(tree))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), got, want)


@pytest.mark.slow
def test_small_gradients_are_stacked_for_the_update_and_the_train_step_is_unchanged(monkeypatch, tmp_path):
  """`optim.stack_small_leaves` (the gradients on GPUs): the same values, each group of small leaves of
  one shape and dtype taken from one stacked array behind an optimisation barrier, so that XLA merges
  the group's Adam updates (compiled for an H100, ViT-B/16's step: 784 -> 719 kernels); large leaves
  and leaves alone in their shape untouched. A training run with it forced on (CPU) has the same
  losses, bit for bit."""
  rng = np.random.default_rng(0)
  tree = {"a": {"bias": rng.normal(size=(4,)), "kernel": rng.normal(size=(300, 300))},
          "b": {"bias": rng.normal(size=(4,)), "kernel": rng.normal(size=(300, 300))},
          "c": {"bias": rng.normal(size=(4,)).astype(np.float16), "gain": rng.normal(size=(3, 2))}}
  tree = jax.tree.map(jnp.asarray, tree)
  jax.tree.map(np.testing.assert_array_equal, optim.stack_small_leaves(tree), tree)
  jaxpr = jax.make_jaxpr(optim.stack_small_leaves)(tree).jaxpr
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  # one group: the two float32 (4,) biases; the (300, 300) kernels are over SMALL_LEAF_SIZE
  assert [[v.aval.shape for v in e.invars] for e in barriers] == [[(2, 4)]]

  from bigvis import config as config_lib, train
  import json

  traced = []
  real = optim.stack_small_leaves
  monkeypatch.setattr(optim, "stack_small_leaves", lambda *a: traced.append(1) or real(*a))

  def run(stacked, workdir):
    monkeypatch.setattr(optim, "stacks_norms", lambda device: stacked)
    c = config_lib.load("vit_ti_digits", ["total_steps=4", "log_every_steps=1", "checkpoint_every_steps=0",
                                          "batch_size=16", "mesh.data=1", "evals={}"])
    train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
    with open(workdir / "metrics.jsonl") as f:
      return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  stacked = run(True, tmp_path / "stacked")
  assert traced  # the train step took the gradients through it
  assert stacked == run(False, tmp_path / "plain")


def test_small_gradients_are_stacked_only_with_leaves_sharded_alike():
  """On a mesh, vectors of one shape may be sharded differently (LayerNorm gains replicated, a
  projection's bias over `fsdp`): stacked together, every row of the other layout would be resharded
  back. With the leaves' shardings, only those sharded alike are stacked, and no collective is added."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bigvis import hlo_text
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  specs = {"gain_a": P(), "gain_b": P(), "bias_a": P("fsdp"), "bias_b": P("fsdp"), "lone": P("data")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tree = {k: jax.device_put(jnp.arange(16.0) + i, shardings[k]) for i, k in enumerate(specs)}

  def collectives(shard_aware):
    f = jax.jit(lambda t: optim.stack_small_leaves(t, shardings if shard_aware else None),
                in_shardings=(shardings,), out_shardings=shardings)
    text = f.lower(tree).compile().as_text()
    out = f(tree)
    jax.tree.map(np.testing.assert_array_equal, out, tree)
    return sum(kind["ops"] for kind in hlo_text.collectives(text).values())
  jaxpr = jax.make_jaxpr(lambda t: optim.stack_small_leaves(t, shardings))(tree).jaxpr
  barriers = [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  assert barriers == [(2, 16), (2, 16)], barriers  # the two gains, the two biases; `lone` alone
  assert collectives(True) == 0
  assert collectives(False) > 0  # one stack of all five: the other layouts resharded back
