"""The one training loop for every model and objective. Reads top to bottom.

    config -> mesh -> model shapes (eval_shape) -> shardings -> sharded init
    -> restore latest checkpoint -> data at that step -> compiled step -> loop
    (log, evaluate, checkpoint) -> final checkpoint and evaluation.

Everything random is derived from (config.seed, step), and the data position is
the step itself, so a run killed at any moment and restarted with the same
command reproduces the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any, Collection, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bigvis import checkpoint as ckpt_lib
from bigvis import config as config_lib
from bigvis import evaluators as eval_lib
from bigvis import metrics as metrics_lib
from bigvis import objectives, optim, sharding, warm_start
from bigvis.errors import Preempted, UserError
from bigvis.models import build_model, model_inputs

TOP_KEYS = ("seed", "total_steps", "batch_size", "mesh", "sharding_rules", "log_every_steps",
            "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "model", "objective", "optim",
            "data", "evals", "reports", "nonfinite", "experiment", "init")


class NonFiniteLoss(UserError):
  """The loss became NaN/inf; the run stopped without checkpointing the bad state."""


# Model fields that never change what a checkpoint holds or computes, left out of both fingerprints
# (so runs written before a field existed still resume and evaluate).
_UNHASHED_MODEL_FIELDS = ("last_block_pooled",)


def _digest(model: dict, objective: dict) -> str:
  from bigvis.models import without_tower_fields
  model = without_tower_fields(model, *_UNHASHED_MODEL_FIELDS)
  blob = json.dumps({"model": model, "objective": objective}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Identifies what a checkpoint holds: the model and objective, not run lengths or paths."""
  return _digest(config.model.to_dict(), config.objective.to_dict())


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Identifies what a checkpoint computes: `fingerprint` with the fields that change how a model is
  computed but not what (kernels, padding, remat, scan, q/k/v GEMMs) set one way, and without
  `last_block_pooled`. Evaluation compares it with config.json, which may name other
  kernels than training did (a GPU run read on a CPU)."""
  from bigvis.models import with_tower_fields
  model = with_tower_fields(metrics_lib.reference_model_config(config.model), fused_qkv=True,
                            recompute_gelu=True, residual_in_norm=True)
  return _digest(model.to_dict(), config.objective.to_dict())


def check_same_experiment(ckpt: ckpt_lib.Checkpointer, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints hold another model or objective; says so when the
  batch size changed, which a resume allows but which moves the data stream."""
  for step in reversed(ckpt.steps()):
    try:
      meta = ckpt.read_meta(step)
    except Exception:  # damaged: restore_latest reports and skips it
      continue
    if meta.get("fingerprint") != fingerprint(config):
      raise UserError(f"workdir '{workdir}' holds checkpoints of a different experiment "
                      f"('{meta.get('experiment') or '?'}', another model or objective); use a new --workdir.")
    if meta.get("batch_size") not in (None, config.batch_size):
      logging.warning("batch_size is %d, but the run that wrote step %d used %d: it resumes with the new size, "
                      "and its data continues at example %d × %d rather than where that run stopped.",
                      config.batch_size, step, meta["batch_size"], step, config.batch_size)
    if meta.get("readers") not in (None, data_readers(config)):
      logging.warning("the training data is read by %d readers, but the run that wrote step %d had %d: each reader "
                      "takes its own share of the files, so the batches from here on differ from those that run "
                      "would have read (set data.train.num_readers to keep the readers whatever the processes).",
                      data_readers(config), step, meta["readers"])
    return


def data_readers(config: ml_collections.ConfigDict) -> int:
  """How many readers split data.train (its num_readers, else one per process): the data order follows it."""
  train = (config.get("data") or {}).get("train") or {}
  return int(train.get("num_readers") or jax.process_count())


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir (a local path or a bucket's, gs://…: every file of a run goes through
  tf.io.gfile); an unwritable one is a one-sentence error before any work."""
  import tensorflow as tf
  if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
    raise UserError(f"workdir '{workdir}' is a file, not a folder.")
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = e.strerror if isinstance(e, OSError) else e.message
    raise UserError(f"workdir '{workdir}' is not writable ({reason}).")


@contextlib.contextmanager
def workdir_lock(workdir: str, *, busy_ok: bool = False) -> Iterator[str | None]:
  """Holds `WORKDIR/.lock` (an flock, process 0 only) while a run trains there, or `bigvis eval` rewrites
  its files: a second run on the same workdir would interleave metrics.jsonl rows and collide over
  checkpoint folders. Another holder is an error, unless `busy_ok`: it is then yielded (the pid and
  host it wrote), else None (`bigvis eval` beside a training run only appends; a multi-process run
  tells every process, `check_processes_agree`). A bucket's workdir (gs://…) and filesystems without
  locks go unguarded."""
  import fcntl
  path = os.path.join(workdir, ".lock")
  f = None
  if jax.process_index() == 0 and "://" not in workdir:
    try:
      os.makedirs(workdir, exist_ok=True)
      f = open(path, "a+")
    except OSError:
      pass  # prepare_workdir names the problem
  busy = None
  try:
    if f is not None:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        if not busy_ok:
          raise UserError(_busy_message(workdir, holder)) from None
        busy = holder
      except OSError:  # no locks on this filesystem
        pass
    yield busy
  finally:
    if f is not None:
      f.close()  # releases the lock


def _busy_message(workdir: str, holder: str) -> str:
  return (f"workdir '{workdir}' is in use by another bigvis run ({holder}); wait for it to end or pass another "
          "--workdir.")


def check_processes_agree(config: ml_collections.ConfigDict, workdir: str, holder: str | None) -> None:
  """Every process of a run must have been started alike, on a workdir no other run uses (process 0
  holds its lock). Each learns what all found, so all stop with the same line; otherwise the ones
  that went on would wait in a collective for ever, or fail later with a stack trace."""
  if jax.process_count() == 1:
    if holder:
      raise UserError(_busy_message(workdir, holder))
    return
  from jax.experimental import multihost_utils
  digest = hashlib.sha256(json.dumps([config.to_dict(), workdir], sort_keys=True, default=str).encode()).digest()
  mine = np.concatenate([np.frombuffer(digest[:16], np.int32), [int(bool(holder))]]).astype(np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine))
  if every[0, -1]:
    raise UserError(_busy_message(workdir, holder or "its .lock is held, as process 0 found"))
  other = [i for i in range(len(every)) if not np.array_equal(every[i, :-1], every[0, :-1])]
  if other:
    raise UserError(f"process {other[0]} was started with another config or --workdir than process 0; start "
                    "every process with the same command but --process-id.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """The run's config beside its checkpoints (what `bigvis eval` and inference read back)."""
  import tensorflow as tf
  with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, default=str))


def model_and_objective(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[nn.Module, Any]:
  """The model, with `attention_impl='auto'` resolved for the mesh's devices, and its loss function."""
  model = build_model(config.model, mesh.devices.flat[0])
  return model, objectives.make_objective(config.objective, model)


def check_preprocessing(config: ml_collections.ConfigDict) -> None:
  """Builds every pp string of data.train, the evals and the reports: an unknown op or a bad argument is
  a one-line error at start, not at the first eval (after hours, or after a resume has rewritten files)."""
  from data_pipelines import input as data_input  # noqa: F401  registers every op
  from data_pipelines import preprocess
  from data_pipelines.sources import data_sections
  for section in ("data", "evals", "reports"):
    for where, data in data_sections(config.get(section) or {}, section):
      try:
        preprocess.build(data.get("pp") or "")
      except UserError as e:
        raise UserError(f"{where}.pp: {e}") from None


def check_image_size(config: ml_collections.ConfigDict, batch: dict | None,
                     sections: tuple[str, ...] = ("evals",), only: Collection[str] | None = None) -> None:
  """data.train.pp's images (from `batch`), and those of the eval sets in `sections` (the entries named in
  `only`, if given), must be the image tower's `image_size` square. The position embedding is made for
  the images trained on; `bigvis eval`, `params`, `aot` and `bench` read the size from the config and
  would meet a checkpoint of another shape; an eval set of another size would fail at its first eval,
  after hours."""
  from data_pipelines import input as data_input
  from data_pipelines.sources import data_sections
  tower = config.model.image if config.model.get("name") == "clip" else config.model
  key = "model.image.image_size" if config.model.get("name") == "clip" else "model.image_size"
  size = int(tower.get("image_size", 224))
  shapes = []
  if batch is not None and np.ndim(batch.get("image")) == 4:
    shapes.append(("data.train.pp", tuple(np.shape(batch["image"])[1:3])))
  sets = [(where, data) for section in sections for name, entry in (config.get(section) or {}).items()
          if only is None or name in only for where, data in data_sections(entry, f"{section}.{name}")]
  shapes += zip((f"{where}.pp" for where, _ in sets), data_input.pp_image_shapes(sets))
  for where, shape in shapes:
    if shape is not None and shape != (size, size):
      raise UserError(f"{where} gives {shape[0]}x{shape[1]} images but {key} is {size}; make them alike.")


def check_train_tokenizer(config: ml_collections.ConfigDict) -> None:
  """data.train.pp's tokenizer must fit the text tower's embedding (`zeroshot.check_tokenizer_fits`),
  and every eval and report must tokenize with it (`zeroshot.check_same_tokenizer`)."""
  from bigvis.evaluators import zeroshot
  from data_pipelines.tokenizer import Tokenizer
  model = zeroshot.train_tokenize_args(config).get("model")
  if model:
    zeroshot.check_tokenizer_fits(Tokenizer(model, 1), config, "data.train.pp")
    zeroshot.check_same_tokenizer(config)


def plan_train_state(config, model, mesh, rules, example_batch):
  """Shapes and shardings of the train state, without allocating it (`jax.eval_shape`).

  Returns (init_fn, abstract_state, state_shardings, tx, schedule); `bigvis aot`
  and `bigvis bench` use the same plan as training.
  """
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0x1417)
  inputs = model_inputs(config.model, example_batch)
  abstract_vars = jax.eval_shape(lambda r: model.init(r, *inputs, train=False), init_rng)
  abstract_params = abstract_vars["params"]
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps, nn.meta.unbox(abstract_params),
                                      optim.stacks_norms(mesh.devices.flat[0]))

  def init_fn():
    params = nn.meta.unbox(model.init(init_rng, *inputs, train=False)["params"])
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "nonfinite": jnp.zeros((), jnp.int32), "first_nonfinite_step": jnp.full((), -1, jnp.int32)}

  abstract_state = jax.eval_shape(init_fn)
  # Optimizer moments follow their parameter's sharding; scalars are replicated.
  param_shardings = sharding.logical_shardings(abstract_params, mesh, rules)
  state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_state)
  state_shardings["params"] = param_shardings
  # `optim.frozen` (optax.multi_transform) leaves MaskedNode placeholders where a branch holds no
  # state for a parameter: they stay placeholders.
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  state_shardings["opt_state"] = optax.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, abstract_state["opt_state"], param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)
  return init_fn, abstract_state, state_shardings, tx, schedule


def warn_copied_parameters(mesh, abstract_params, param_shardings, *, tolerance: float = 0.1) -> None:
  """Warns when a mesh meant to split the parameters (fsdp, tensor) leaves each device over 10% more
  of them than an even split: heads that `tensor` does not divide, a rule that misses a layer; the
  memory the user sized the mesh for is then not saved."""
  split = mesh.shape["fsdp"] * mesh.shape["tensor"]
  if split == 1 or jax.process_index() != 0:
    return  # data parallelism keeps every parameter whole by design; one host says it for all
  copied = sharding.copied_parameters(abstract_params, param_shardings, mesh)
  even = sum(x.size for x in jax.tree.leaves(abstract_params)) / split
  if sum(copied.values()) > tolerance * even:
    most = sharding.most_copied(copied)
    logging.warning("mesh fsdp=%d tensor=%d leaves each device %.2fx the parameters of an even split (the most "
                    "copied: %s): no sharding rule splits them, or their dimensions do not divide the mesh "
                    "axes; `bigvis aot` shows the plan, `sharding_rules` changes it.", mesh.shape["fsdp"],
                    mesh.shape["tensor"], 1 + sum(copied.values()) / even, most)


def create_train_state(config, model, mesh, rules, example_batch):
  """Initialises params and optimizer state already sharded: no full copy on any one device."""
  init_fn, abstract_state, state_shardings, tx, schedule = plan_train_state(config, model, mesh, rules, example_batch)
  warn_copied_parameters(mesh, abstract_state["params"], state_shardings["params"])
  with sharding.use_mesh(mesh):
    state = jax.jit(init_fn, out_shardings=state_shardings)()
  return state, state_shardings, tx, schedule


def make_train_step(config, loss_fn, tx, state_shardings, mesh, rules):
  """One optimisation step: grads on the global batch, update, non-finite bookkeeping."""
  skip_nonfinite = config.get("nonfinite", "stop") == "skip"
  base_rng = jax.random.key(config.seed)
  # `optim.frozen`: no gradient flows into frozen parameters, so XLA drops their weight-gradient GEMMs
  # (and a frozen tower's whole backward), and grad_norm is the trained parameters' alone.
  frozen = optim.frozen_mask(state_shardings["params"], config.optim.get("frozen", ""))
  stacked_norm = optim.stacks_norms(mesh.devices.flat[0])

  def loss_of_trained(params, batch, rng):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    return loss_fn(params, batch, rng)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_of_trained, has_aux=True)(state["params"], batch, rng)
    if stacked_norm:  # GPUs: the vectors' optimizer updates merged into a few kernels
      grads = optim.stack_small_leaves(grads, state_shardings["params"])
    grad_norm = optim.global_norm(grads, stacked_norm)  # the one gradient clipping uses: computed once
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old state for this step
      params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, state["params"])
      opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state["opt_state"])
    first_bad = jnp.where((state["first_nonfinite_step"] < 0) & ~finite, state["step"],
                          state["first_nonfinite_step"])
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
                 "first_nonfinite_step": first_bad}
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               **{f"train/{k}": v for k, v in aux.items()}}
    return new_state, metrics

  batch_sh = sharding.batch_sharding(mesh)

  def with_rules(state, batch):
    with sharding.activation_rules(mesh, rules):
      return step_fn(state, batch)
  return jax.jit(with_rules, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _split_private(batch: dict) -> tuple[dict, dict]:
  """(arrays for the device, host-only features): `_`-prefixed bookkeeping stays on the host."""
  device, host = sharding.split_host_features(batch)
  return ({k: v for k, v in device.items() if not k.startswith("_")},
          {**host, **{k: v for k, v in device.items() if k.startswith("_")}})


def _local_skip_counts(private: dict) -> np.ndarray | None:
  """This process's running count of skipped examples per reason, carried by the pipeline."""
  if "_skipped" not in private:
    return None
  return np.max(private["_skipped"], axis=0)


def _skip_row(counts: np.ndarray | None) -> dict:
  """Counts summed over processes -> `data/skipped` and `data/skipped/<reason>`."""
  if counts is None:
    return {}
  from data_pipelines.shards import SKIP_REASONS
  if jax.process_count() > 1:  # every process logs at the same steps, so this collective lines up
    from jax.experimental import multihost_utils
    counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
  out = {f"data/skipped/{r}": int(c) for r, c in zip(SKIP_REASONS, counts)}
  out["data/skipped"] = int(np.sum(counts))
  return out


def train_batches(config, start_step: int):
  """Process-local numpy batches from `data.train`, or synthetic ones."""
  if config.data.train.get("source") == "synthetic":
    from data_pipelines.synthetic import synthetic_batch
    batch = synthetic_batch(config.model, config.batch_size // jax.process_count(), config.seed)
    while True:
      yield batch
  from data_pipelines import input as data_input
  yield from data_input.train_iterator(
      config.data.train, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `config`, writing everything under `workdir`.

  `devices` restricts the mesh to a subset (tests compare 1 device with 8).
  """
  config_lib.check_known(config, TOP_KEYS, "config")
  for section in ("evals", "reports"):  # reports run by `bigvis eval`, checked now
    eval_lib.check_types(config.get(section), section, config.model.get("name"))
  check_preprocessing(config)
  primary = jax.process_index() == 0
  prepare_workdir(workdir)

  # Devices: the mesh and how parameters and activations map onto it.
  mesh, rules = sharding.mesh_and_rules(config, devices)
  device_hours = metrics_lib.DeviceHours(mesh.size)

  # Model and objective; shapes come from the first batch, so nothing is hard-coded.
  model, loss_fn = model_and_objective(config, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.get("keep_checkpoints", 3))
  check_same_experiment(ckpt, config, workdir)  # before any heavy work
  init = config.get("init", ml_collections.ConfigDict())  # fine-tuning from another run's parameters
  warm_start.check_source(init)
  start_step = ckpt.steps()[-1] if ckpt.steps() else 0  # refined after restore below
  batches = train_batches(config, start_step)
  try:
    first = next(batches)
  except StopIteration:  # the stream repeats for ever, unless a reader has nothing to repeat
    raise UserError("data.train yields no batches: a reader of it found no usable record (files empty or "
                    "unreadable, or every example skipped; tf.data's warnings in the log show damaged "
                    "records).") from None
  check_train_tokenizer(config)  # before the first step, whose loss it would make NaN
  check_image_size(config, first)
  first_device, _ = _split_private(first)
  state, state_shardings, tx, schedule = create_train_state(config, model, mesh, rules, first_device)
  logging.info("parameters: %s", f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}")

  # Resume: newest readable checkpoint; refuse one from another experiment.
  restored = ckpt.restore_latest(jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings))
  if restored:
    step0, state, meta = restored
    device_hours.before = float(meta.get("device_hours", 0.0))  # records before these had none
    if step0 != start_step:  # the newest was damaged: rebuild the data at the restored step
      batches = train_batches(config, step0)
      first = next(batches)
      first_device, _ = _split_private(first)
    start_step = step0
    logging.info("resumed from step %d", start_step)
    # A stop is for a non-finite step of this run: one skipped before (nonfinite='skip') is not.
    state["first_nonfinite_step"] = jax.device_put(np.int32(-1), state_shardings["first_nonfinite_step"])
  elif init.get("workdir"):  # a fine-tuning run that has no checkpoint of its own yet
    state["params"] = warm_start.load_pretrained(init, state["params"], state_shardings["params"])

  # Compile ahead of time: compile cost and FLOPs are known before the first step.
  train_step = make_train_step(config, loss_fn, tx, state_shardings, mesh, rules)
  t0 = time.time()
  with sharding.use_mesh(mesh):
    compiled = train_step.lower(state, sharding.global_batch(first_device, mesh)).compile()
  compile_s = time.time() - t0
  # Model FLOPs (3x forward of the plain model), not XLA's count, which sees a scanned layer once.
  flops_per_example = metrics_lib.model_flops_per_example(config, first_device)
  peak = metrics_lib.device_peak_flops()
  evaluators = eval_lib.build_evaluators(config.get("evals"), model=model, mesh=mesh, config=config)

  # Only now, with everything checked and built, does the run write to its workdir: a refused or
  # failing start leaves the metrics.jsonl of the checkpoints it found as it was, and config.json is
  # written with the first checkpoint (or the end of a finished run re-evaluated), which it describes.
  writer = metrics_lib.MetricWriter(workdir, primary=primary, total_steps=config.total_steps)
  # Rows past the checkpoint are rewritten exactly. Evals at it are redone (the checkpoint is saved
  # before that step's evals, so a run stopped between the two would otherwise never log them; a
  # finished run re-evaluates its last step): their old rows go when the new ones are written.
  writer.resume_at(start_step)

  def due(name: str, step: int) -> bool:
    """An evaluator runs every `evals.<name>.every_steps` (default: eval_every_steps) and at the end."""
    every = config.evals[name].get("every_steps") or config.eval_every_steps
    return step >= config.total_steps or bool(every and step % every == 0)

  def evaluate(step: int) -> dict:
    results = {}
    running = [name for name in evaluators if due(name, step)]
    if not running:  # most steps: no mesh contexts entered in the loop
      return results
    with sharding.use_mesh(mesh), sharding.activation_rules(mesh, rules):
      for name in running:
        for k, v in evaluators[name].run(state["params"]).items():
          results[f"eval/{name}/{k}"] = v
    if results:
      if step == start_step:
        writer.replace(step, results, tuple(f"eval/{name}/" for name in running))
      else:
        writer.write(step, results)
    return results

  def check_finite() -> None:
    if config.get("nonfinite", "stop") == "stop" and int(state["first_nonfinite_step"]) >= 0:
      bad = int(state["first_nonfinite_step"]) + 1
      last = ckpt.steps()[-1] if ckpt.steps() else None
      where = f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else \
          "no checkpoint was written yet"
      raise NonFiniteLoss(f"the loss became non-finite at step {bad}; stopped without saving that state "
                          f"({where}). Lower optim.lr or set nonfinite='skip'.")

  # What every checkpoint's record says of the run, besides its step (computed once).
  record = {"fingerprint": fingerprint(config), "model_fingerprint": model_fingerprint(config),
            "experiment": config.get("experiment", ""), "batch_size": config.batch_size,
            "readers": data_readers(config)}

  def save(step: int) -> None:
    check_finite()
    if primary:  # beside every checkpoint it describes (a small file, rewritten alike each time)
      write_config(workdir, config)
    ckpt.save(step, state, {"step": step, **record, "device_hours": device_hours()})

  # SIGTERM (preemption, scancel) ends the run cleanly with a checkpoint of the current step. With
  # several processes the signal reaches each at a different step, and the save is collective: JAX's
  # preemption service (which catches SIGTERM itself) agrees on one step for all of them.
  several = jax.process_count() > 1
  if several:
    from jax.experimental import multihost_utils
    preempted, previous_handler = multihost_utils.reached_preemption_sync_point, None
  else:
    stop = {"signal": None}
    previous_handler = _install_sigterm(stop)
    preempted = lambda step: stop["signal"] is not None  # noqa: E731

  # The loop.
  step, last_log_t, last_log_step = start_step, time.time(), start_step
  pending, last_metrics, skipped = first, {}, None
  try:
    if 0 < start_step < config.total_steps:
      evaluate(start_step)  # those due at the restored step (see truncate_after above)
    while step < config.total_steps:
      device_batch, private = _split_private(pending)
      # The compiled step carries its shardings: no mesh context needed per step.
      state, step_metrics = compiled(state, sharding.global_batch(device_batch, mesh))
      step += 1
      if step < config.total_steps:
        pending = next(batches)  # host prepares the next batch while the device computes
      # Counts restart with each pass over the data: the most seen in one pass is the total.
      counts = _local_skip_counts(private)
      skipped = counts if skipped is None else np.maximum(skipped, counts)

      if step % config.log_every_steps == 0 or step == config.total_steps:
        check_finite()
        now = time.time()
        ex_s = (step - last_log_step) * config.batch_size / max(now - last_log_t, 1e-9)
        last_log_t, last_log_step = now, step
        last_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        # Skipped steps (nonfinite='skip') leave the optimizer's count, and so its schedule, where it was.
        row = {**last_metrics, "train/lr": float(schedule(step - 1 - int(state["nonfinite"]))),
               "perf/examples_per_sec": ex_s, "perf/examples_per_sec_per_device": ex_s / jax.device_count(),
               "perf/mfu": (flops_per_example * ex_s / jax.device_count() / peak) if flops_per_example and peak else None,
               "perf/compile_s": compile_s, "perf/device_hours": device_hours(),
               "train/nonfinite_steps": int(state["nonfinite"]), **_skip_row(skipped)}
        writer.write(step, row)
        writer.progress(step, last_metrics["train/loss"], ex_s, steps_per_sec=ex_s / config.batch_size)
      if preempted(step):
        save(step)
        raise Preempted(step)
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step < config.total_steps:
        save(step)
      if step < config.total_steps:
        evaluate(step)

    if not ckpt.steps() or ckpt.steps()[-1] != step:
      save(step)
    final = {**last_metrics, **evaluate(step)}
    if primary:
      write_config(workdir, config)
    return final
  finally:
    # Waits for in-flight async saves, so the last good checkpoint is complete even on an error.
    if not several:
      _restore_sigterm(previous_handler)
    ckpt.close()
    writer.close()


def _restore_sigterm(handler) -> None:
  try:
    signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    pass


def _install_sigterm(stop: dict):
  """Records SIGTERM instead of dying mid-step; returns the previous handler."""
  def handler(signum, frame):
    stop["signal"] = signum
  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread (e.g. called from a notebook worker): leave it alone
    return signal.getsignal(signal.SIGTERM)
