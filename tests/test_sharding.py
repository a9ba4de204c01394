"""The sharding plan: what each mesh axis splits, for the paper experiments and under training."""
import glob
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from types import SimpleNamespace
from jax.sharding import PartitionSpec as P

from bigvis import config as config_lib
from bigvis import params as params_lib
from bigvis import sharding
from bigvis.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                           if "digits" not in p)


def _per_device_share(config) -> tuple[float, list[str]]:
  """Parameters one device of the config's mesh holds, over an even split across fsdp x tensor,
  and the most copied parameters."""
  mesh, rules = sharding.mesh_and_rules(config, jax.devices())
  boxed = params_lib.abstract_params(config.model, boxed=True)
  shapes = nn.meta.unbox(boxed)
  copied = sharding.copied_parameters(shapes, sharding.logical_shardings(boxed, mesh, rules), mesh)
  even = sum(params_lib.count_by_module(shapes).values()) / (mesh.shape["fsdp"] * mesh.shape["tensor"])
  return 1 + sum(copied.values()) / even, list(copied)[:3]


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
@pytest.mark.parametrize("mesh", [("mesh.fsdp=8",), ("mesh.fsdp=4", "mesh.tensor=2")])
def test_paper_experiments_split_their_parameters_evenly_over_fsdp_and_tensor(name, mesh):
  """FSDP and tensor parallelism exist to split a model too big for one device; a 22M-parameter
  classifier head kept whole on every device (with its Adam state, 270 MB), or split over tensor
  only, defeats that. Only norms, biases, embeddings and the like may be copied: within 5% of an even
  split (B/16: 0.8% under fsdp=8, 2.3% under fsdp=4 x tensor=2; the i21k L/16 had 48% and 20%)."""
  assert PAPER_EXPERIMENTS, "no experiments found"
  config = config_lib.load(name, ["mesh.data=1", *mesh])
  share, most = _per_device_share(config)
  assert share < 1.05, (name, mesh, f"{share:.3f}x an even split", most)


@pytest.mark.parametrize("taken, left", [("tensor", "fsdp"), ("fsdp", "tensor")])
def test_a_users_rule_that_takes_one_axis_leaves_the_head_on_the_other(taken, left):
  """With one of the head input's axes given to the classes by a user's rule (applied first), the
  input falls back to the other rather than to no split at all."""
  config = config_lib.load("vit_l16_i21k", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                                            f"sharding_rules=[['classes', '{taken}']]"])
  mesh, rules = sharding.mesh_and_rules(config, jax.devices())
  boxed = params_lib.abstract_params(config.model, boxed=True)
  head = sharding.logical_shardings(boxed, mesh, rules)["head"]["kernel"]
  assert head.spec == P(left, None), head.spec  # 21,843 classes divide neither: dropped there


def test_fit_spec_keeps_the_leading_axes_of_a_split_that_does_not_divide():
  """H/14's 1,280-wide head input over tensor 8 x fsdp 64 (a 512-chip pod): 512 does not divide 1,280,
  8 does; the head stays split over tensor, its rows aligned with the tensor-split activations."""
  mesh = SimpleNamespace(shape={"data": 1, "fsdp": 64, "tensor": 8})
  assert sharding.fit_spec(P(("tensor", "fsdp"), None), (1280, 21843), mesh) == P("tensor", None)
  assert sharding.fit_spec(P(("tensor", "fsdp"), "fsdp"), (1024, 21843), mesh) == P(("tensor", "fsdp"), None)
  assert sharding.fit_spec(P("fsdp"), (1000,), mesh) == P(None)


def test_a_rule_for_an_unknown_logical_axis_is_one_line():
  config = config_lib.load("vit_ti_digits", ["sharding_rules=[['representaton', 'fsdp']]"])
  with pytest.raises(UserError, match="logical axis 'representaton', not one of .*representation"):
    sharding.rules_from_config(config)


def _trained(overrides, devices=None, steps=3):
  """Parameters after `steps` of the trainer's own step on vit_ti_digits with a pre-logits layer."""
  from bigvis import train
  from data_pipelines.synthetic import synthetic_batch
  config = config_lib.load("vit_ti_digits", ["batch_size=16", "model.representation_size=64",
                                             "model.num_classes=7", "optim.warmup_steps=0", *overrides])
  mesh, rules = sharding.mesh_and_rules(config, devices or jax.devices())
  model, loss_fn = train.model_and_objective(config, mesh)
  local, _ = sharding.split_host_features(synthetic_batch(config.model, config.batch_size, config.seed))
  state, shardings, tx, _ = train.create_train_state(config, model, mesh, rules, local)
  step = train.make_train_step(config, loss_fn, tx, shardings, mesh, rules)
  batch = sharding.global_batch(local, mesh)
  with sharding.use_mesh(mesh):
    for _ in range(steps):
      state, _ = step(state, batch)
  return state["params"]


def test_a_head_behind_pre_logits_is_split_and_trains_as_on_one_device():
  """The head's input (`representation`) is split over tensor, then fsdp (the order that lines its
  rows up with the tensor-split pre-logits output), though its 7 classes divide nothing; training
  on the 2x2x2 mesh reaches the parameters one device does."""
  want = jax.tree.map(np.asarray, _trained(["mesh.data=1"], jax.devices()[:1]))
  got = _trained(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  head = got["head"]["kernel"]
  assert head.sharding.spec[0] == ("tensor", "fsdp") and head.sharding.shard_shape(head.shape) == (64 // 4, 7)
  assert np.abs(want["head"]["kernel"]).max() > 0  # the zero-initialised head has moved
  # atol: 1% of a step's size (Adam's steps are ~lr = 1e-3 however small a gradient's rounding noise)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("mesh, warned", [(["mesh.data=1", "mesh.tensor=8"], True),
                                          (["mesh.data=1", "mesh.fsdp=8"], False),
                                          (["mesh.data=8"], False)])
def test_a_mesh_that_leaves_parameters_copied_is_said_at_start(mesh, warned, caplog):
  """`tensor=8` cannot split the test ViT's 4 attention heads: its attention weights (a third of the
  model) stay whole on every device, which the user who sized the mesh for memory must hear about.
  FSDP splits them; data parallelism keeps everything whole by design and is not warned about."""
  from bigvis import train
  from data_pipelines.synthetic import synthetic_batch
  config = config_lib.load("vit_ti_digits", ["batch_size=8", *mesh])
  mesh_, rules = sharding.mesh_and_rules(config, jax.devices())
  model, _ = train.model_and_objective(config, mesh_)
  local, _ = sharding.split_host_features(synthetic_batch(config.model, config.batch_size, config.seed))
  if warned:  # as training starts: the state is created
    train.create_train_state(config, model, mesh_, rules, local)
  else:  # the plan alone, nothing compiled
    _, abstract, shardings, _, _ = train.plan_train_state(config, model, mesh_, rules, local)
    train.warn_copied_parameters(mesh_, abstract["params"], shardings["params"])
  said = [r.getMessage() for r in caplog.records if "an even split" in r.getMessage()]
  assert bool(said) == warned, said
  if warned:
    share = float(said[0].split("leaves each device ")[1].split("x")[0])
    assert 2 < share < 8 and "mesh fsdp=1 tensor=8" in said[0] and "attn/query/kernel" in said[0], said[0]


def test_rules_name_mesh_axes_or_none_alone():
  config = config_lib.load("vit_ti_digits", ["sharding_rules=[['embed', ['fsdp', None]]]"])
  with pytest.raises(UserError, match="names mesh axis 'None'"):
    sharding.rules_from_config(config)
  assert sharding.fit_spec(P(P.UNCONSTRAINED, "fsdp"), (3, 8), SimpleNamespace(shape={"fsdp": 8})) == \
      P(P.UNCONSTRAINED, "fsdp")


def test_mesh_keys_are_checked():
  """A `mesh.model` (another framework's name) was ignored and a missing axis was a KeyError."""
  with pytest.raises(UserError, match="unknown config key 'mesh.model'; the closest valid key is 'mesh.tensor'"):
    sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "model": 2}, 8)
  with pytest.raises(UserError, match="mesh.tensor is not set"):
    sharding.mesh_shape({"data": -1, "fsdp": 1}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
