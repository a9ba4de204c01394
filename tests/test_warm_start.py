"""Fine-tuning from another run's checkpoint (`init.*`): what is loaded, resized, kept fresh or refused."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from bigvis import config as config_lib
from bigvis import inference, train
from bigvis.errors import UserError
from bigvis.models.vit import resize_posemb

SHORT = ["batch_size=32", "log_every_steps=5", "optim.warmup_steps=0"]
AT_24PX = ["model.image_size=24", "data.train.pp='decode|resize(26)|random_crop(24)|value_range(-1,1)|onehot(10)'"]


def _config(*overrides):
  c = config_lib.load("vit_ti_digits", [*SHORT, *overrides])
  c.evals = ml_collections.ConfigDict()
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 16 px run with checkpoints at steps 10 and 20, and its parameters at 20."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  train.train_and_evaluate(_config("total_steps=20", "checkpoint_every_steps=10"), workdir, devices=jax.devices()[:1])
  _, _, params = inference.load_run(workdir)
  return workdir, traverse_util.flatten_dict(jax.device_get(params), sep="/")


@pytest.mark.slow
def test_fine_tuning_at_24px_loads_every_shared_parameter_resizes_the_grid_and_keeps_the_head_fresh(
    pretrained, tmp_path, caplog):
  workdir, before = pretrained
  # lr 0 (weight decay is scaled by it too): the checkpoint after one step holds the loaded parameters.
  overrides = ("optim.lr=0.0", *AT_24PX, f"init.workdir='{workdir}'", "init.skip='^head/'", "mesh.data=1",
               "mesh.fsdp=2")
  two = jax.devices()[:2]  # loaded into FSDP shardings
  train.train_and_evaluate(_config("total_steps=1", *overrides), str(tmp_path), devices=two)
  _, _, params = inference.load_run(str(tmp_path))
  after = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  assert set(after) == set(before)
  np.testing.assert_allclose(after["pos_embedding"], resize_posemb(before["pos_embedding"], (6, 6)), rtol=1e-6)
  assert before["pos_embedding"].shape == (1, 16, 128) and after["pos_embedding"].shape == (1, 36, 128)
  assert not np.any(after["head/kernel"]) and np.any(before["head/kernel"])  # zero-initialised, not loaded
  for path in set(before) - {"pos_embedding", "head/kernel", "head/bias"}:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  # Run again, longer: it resumes from its own checkpoint, not from init.workdir's.
  with caplog.at_level("INFO"):
    train.train_and_evaluate(_config("total_steps=2", *overrides), str(tmp_path), devices=two)
  assert "resumed from step 1" in caplog.text and "initialised" not in caplog.text


@pytest.mark.parametrize("overrides, message", [
    (["model.num_classes=7"], "parameter 'head/bias' is (10,) in init.workdir's checkpoint at step 20 but (7,) in "
                              "this model; add it to init.skip"),
    (["model.pool_type='tok'"], "init.workdir's checkpoint at step 20 has no parameter 'cls'; add it to init.skip"),
    (["init.step=15"], "init.step 15 is not a checkpoint of init.workdir '{w}'; it has steps 10, 20."),
    (["init.skip='[head'"], "init.skip '[head' is not a regular expression"),
])
def test_what_cannot_be_loaded_is_named(pretrained, tmp_path, overrides, message):
  workdir, _ = pretrained
  with pytest.raises(UserError, match=None) as e:
    train.train_and_evaluate(_config("total_steps=1", f"init.workdir='{workdir}'", *overrides), str(tmp_path),
                             devices=jax.devices()[:1])
  assert message.format(w=workdir) in str(e.value)


def test_a_workdir_without_checkpoints_is_refused_before_anything_is_built(tmp_path):
  with pytest.raises(UserError, match="init.workdir '.*' holds no complete checkpoint to start from"):
    train.train_and_evaluate(_config("total_steps=1", f"init.workdir='{tmp_path / 'nothing'}'"), str(tmp_path / "w"))
