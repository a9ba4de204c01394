"""Orbax round trip, keep-N, and falling back past a damaged newest checkpoint."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvis.checkpoint import Checkpointer
from bigvis.errors import UserError


def _state(v):
  return {"params": {"w": jnp.full((4, 3), v, jnp.float32)}, "step": jnp.asarray(int(v), jnp.int32)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def test_round_trip_and_keep_n(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ck.save(step, _state(step), {"step": step, "fingerprint": "x"})
  ck.wait()
  assert ck.steps() == [2, 3]
  step, state, meta = ck.restore_latest(_abstract())
  assert step == 3 and meta == {"step": 3, "fingerprint": "x", "checksums": meta["checksums"]}
  assert sorted(meta["checksums"]) == ["['params']['w']", "['step']"]
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 3.0))
  ck.close()


def test_damaged_newest_falls_back_to_previous(tmp_path, caplog):
  ck = Checkpointer(str(tmp_path), keep=3)
  ck.save(1, _state(1), {"step": 1})
  ck.save(2, _state(2), {"step": 2})
  ck.close()
  # Damage step 2: truncate every data file of its state.
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(0)
  ck = Checkpointer(str(tmp_path))
  step, state, _ = ck.restore_latest(_abstract())
  assert step == 1 and ck.steps() == [1]  # the damaged one is set aside so step 2 can be rewritten
  (kept,) = os.listdir(tmp_path / "damaged")  # moved, not deleted: whatever it holds is still there
  assert kept.startswith("2-") and os.path.isdir(tmp_path / "damaged" / kept / "state")
  ck.save(2, _state(2), {"step": 2})
  ck.close()
  np.testing.assert_array_equal(state["params"]["w"], np.ones((4, 3)))
  assert "damaged" in caplog.text
  assert Checkpointer(str(tmp_path)).steps() == [1, 2]  # the folder aside is not taken for a step


def test_no_readable_checkpoint_stops_instead_of_starting_afresh(tmp_path):
  """When every checkpoint fails to restore (damaged, or written by another version of the state), the
  run stops with one sentence naming the folder and leaves them all in place: starting from step 0
  would silently train over them."""
  import pytest
  from bigvis.errors import UserError
  ck = Checkpointer(str(tmp_path), keep=3)
  ck.save(1, _state(1), {"step": 1})
  ck.save(2, _state(2), {"step": 2})
  ck.close()
  other = {"params": {"w": jax.ShapeDtypeStruct((5, 3), jnp.float32)}, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  ck = Checkpointer(str(tmp_path))
  with pytest.raises(UserError, match=r"none of the checkpoints in .* \(steps 1, 2\) can be restored"):
    ck.restore_latest(other)
  assert ck.steps() == [1, 2] and not os.path.exists(tmp_path / "damaged")
  ck.close()


def test_params_restore_refuses_a_checkpoint_of_another_model(tmp_path):
  """The params-only restore (evaluation, inference) is partial: it would fill the given model's
  parameters and drop the others silently. A checkpoint with parameters the model lacks, missing
  ones, or another shape is a one-sentence error naming one; the same tree restores."""
  import pytest
  from bigvis.errors import UserError
  ck = Checkpointer(str(tmp_path), keep=2)
  state = {"params": {"w": jnp.ones((4, 3)), "cls": jnp.zeros((1, 3))}, "step": jnp.asarray(1, jnp.int32)}
  ck.save(1, state, {"step": 1})
  ck.close()
  ck = Checkpointer(str(tmp_path), reader=True)
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  step, params = ck.restore_params({"w": shape(4, 3), "cls": shape(1, 3)})
  assert step == 1 and set(params) == {"w", "cls"}
  with pytest.raises(UserError, match=r"parameters the model lacks \(cls\)"):
    ck.restore_params({"w": shape(4, 3)})
  with pytest.raises(UserError, match="no head"):
    ck.restore_params({"w": shape(4, 3), "cls": shape(1, 3), "head": shape(3,)})
  with pytest.raises(UserError, match=r"w of shape \(4, 3\), not \(4, 5\)"):
    ck.restore_params({"w": shape(4, 5), "cls": shape(1, 3)})
  ck.close()


def test_replicated_arrays_on_cpu_devices_save_without_compiling_slices(tmp_path, caplog):
  """On the 8 CPU devices a replicated array is written whole by one replica (orbax would slice each
  shard among the replicas, compiling a slice per shape: ~3 s at a test run's first save), and it
  restores onto the mesh."""
  import logging
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  state = {"w": jax.device_put(np.arange(96 * 5, dtype=np.float32).reshape(96, 5), replicated),
           "v": jax.device_put(np.arange(40 * 3, dtype=np.float32).reshape(40, 3), split)}  # 2 replicas a shard
  ck = Checkpointer(str(tmp_path))
  with caplog.at_level(logging.DEBUG), jax.log_compiles():
    ck.save(1, state, {"step": 1})
    ck.wait()
  assert not [r.getMessage() for r in caplog.records if "jit(slice)" in r.getMessage()]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step, restored, _ = ck.restore_latest(abstract)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["v"].sharding == split
  ck.close()
  import orbax.checkpoint as ocp
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  Checkpointer(str(tmp_path / "again")).close()  # registered once: no second override (orbax warns of each)
  assert ocp.type_handlers.get_type_handler(jax.Array) is handler


def test_the_cpu_handler_is_registered_without_a_warning(caplog):
  """Orbax warned 'Type handler registry type ... overriding' at the start of every command on a CPU."""
  import logging
  import orbax.checkpoint as ocp
  from bigvis import checkpoint
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(), override=True)
  caplog.clear()
  level = logging.getLogger("absl").level
  with caplog.at_level(logging.INFO):
    checkpoint._save_replicated_shards_whole_on_cpu()
  assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
  assert not [r for r in caplog.records if "overriding" in r.getMessage()]
  assert logging.getLogger("absl").level == level  # the muting ends with the call


def test_changed_bytes_in_a_checkpoint_are_caught_and_it_is_set_aside(tmp_path, caplog):
  """Bytes overwritten inside a checkpoint's data file (same size) restored without a word, as weights:
  the run then stopped at a 'non-finite loss' blaming the learning rate, and `bigvis eval` reported a
  wrong accuracy. The checksums in the record catch it; the run falls back to the previous step, and a
  params-only restore (eval) refuses it."""
  big = lambda v: {"params": {"w": jax.random.normal(jax.random.key(v), (256, 256))},  # noqa: E731
                   "step": jnp.asarray(v, jnp.int32)}  # random: it does not compress, the file holds its bytes
  ck = Checkpointer(str(tmp_path), keep=3)
  ck.save(1, big(1), {"step": 1})
  ck.save(2, big(2), {"step": 2})
  ck.close()
  data = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "2" / "state") for f in files]
  largest = max(data, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as fh:  # 4 kB of garbage in the middle of the array's bytes
    fh.seek(size // 2)
    fh.write(np.random.RandomState(0).bytes(4096))
  assert os.path.getsize(largest) == size
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), big(0))
  ck = Checkpointer(str(tmp_path), reader=True)
  with pytest.raises(UserError, match=r"step 2 .* cannot be restored .*\['params'\]\['w'\] differs from what was saved"):
    ck.restore_params(abstract["params"], step=2)
  ck.close()
  ck = Checkpointer(str(tmp_path))
  step, state, _ = ck.restore_latest(abstract)
  assert step == 1 and ck.steps() == [1]
  np.testing.assert_array_equal(state["params"]["w"], big(1)["params"]["w"])
  assert "['params']['w'] differs from what was saved" in caplog.text
  assert os.listdir(tmp_path / "damaged")[0].startswith("2-")
  ck.close()


def test_abandoned_reads_of_a_failed_restore_print_nothing(monkeypatch):
  """After a failed restore, orbax's reads still in flight print 'RuntimeError: Event loop is closed' and
  its collected read coroutines their own error, as unraisable exceptions: 197 tracebacks around one
  resume's warning line (`bigvis train` on a checkpoint missing a data file). Those two are dropped;
  any other unraisable exception still reaches the hook before."""
  import sys
  import types
  from bigvis import checkpoint
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  checkpoint._drop_abandoned_reads()
  checkpoint._drop_abandoned_reads()  # once: not a chain of hooks

  async def elsewhere():
    pass
  coroutine = elsewhere()  # a coroutine of another package than orbax
  unraisable = lambda error, source=None: types.SimpleNamespace(exc_value=error, object=source)  # noqa: E731
  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
  sys.unraisablehook(unraisable(Exception("Encountered error while reading array index"),
                                types.SimpleNamespace(cr_code=types.SimpleNamespace(
                                    co_filename="/venv/site-packages/orbax/checkpoint/serialization.py"))))
  other = ValueError("something else")
  sys.unraisablehook(unraisable(other, coroutine))
  coroutine.close()
  assert seen == [other]
