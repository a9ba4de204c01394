"""The sharding plan: what each mesh axis splits, for the paper experiments and under training."""
import glob
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigvis import config as config_lib
from bigvis import params as params_lib
from bigvis import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                           if "digits" not in p)


def _replicated_fraction(config) -> tuple[float, list[str]]:
  """The fraction of parameters every device of the config's mesh holds whole, and the largest such."""
  mesh, rules = sharding.mesh_and_rules(config, jax.devices())
  boxed = params_lib.abstract_params(config.model, boxed=True)
  shapes = nn.meta.unbox(boxed)
  whole = sharding.whole_on_every_device(shapes, sharding.logical_shardings(boxed, mesh, rules))
  total = sum(params_lib.count_by_module(shapes).values())
  return sum(whole.values()) / total, list(whole)[:3]


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
@pytest.mark.parametrize("mesh", [("mesh.fsdp=8",), ("mesh.fsdp=4", "mesh.tensor=2")])
def test_paper_experiments_keep_no_large_parameter_whole_on_every_device(name, mesh):
  """FSDP and tensor parallelism exist to split a model too big for one device; a 22M-parameter
  classifier head left whole on every device (with its Adam state, 270 MB) defeats that. Only norms,
  biases and the like (0.12% of B/16's parameters; < 0.5%) may stay replicated."""
  assert PAPER_EXPERIMENTS, "no experiments found"
  config = config_lib.load(name, ["mesh.data=1", *mesh])
  fraction, largest = _replicated_fraction(config)
  assert fraction < 5e-3, (name, mesh, f"{fraction:.2%} replicated", largest)


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
  """The head's input (`representation`) is split over tensor, then fsdp, though its 7 classes divide
  nothing; training on a 2x2x2 mesh equals one device's: the split lines up with the pre-logits
  output, which tensor parallelism splits too."""
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
def test_a_mesh_that_leaves_large_parameters_whole_is_said_at_start(mesh, warned, caplog):
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
    train.warn_whole_parameters(mesh_, abstract["params"], shardings["params"])
  said = [r.getMessage() for r in caplog.records if "whole on every device" in r.getMessage()]
  assert bool(said) == warned, said
  if warned:
    assert "mesh fsdp=1 tensor=8 leaves 3" in said[0] and "attn/query/kernel" in said[0], said[0]
