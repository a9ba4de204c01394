"""Run metrics: `metrics.jsonl`, TensorBoard event files, the progress line, throughput and MFU.

Only the primary process (index 0) writes; others keep the same object so the
loop needs no branches.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

# Dense bf16 peak FLOP/s per chip, for MFU; unknown devices (CPU) give MFU null.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def device_peak_flops(device: jax.Device | None = None) -> Optional[float]:
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None


def compiled_memory_bytes(compiled: Any) -> int:
  """Per-device memory XLA plans for a compiled function: arguments + outputs + temporaries + code,
  less what donation aliases (outputs written into their inputs' buffers need no memory of their own),
  or XLA's own peak where that is more. Why both: libtpu (JAX 0.10.2) reports no temporaries at all
  for some steps (ViT-Ti's, scanned, with the gradient norm of stacked leaves: 0 bytes, against a
  peak 8.6 MB above its arguments), and the sum alone would then call a step that does not fit one
  that does."""
  m = compiled.memory_analysis()
  planned = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  return int(max(planned, getattr(m, "peak_memory_in_bytes", 0) or 0))


def compiled_flops(compiled: Any) -> Optional[float]:
  """FLOPs per step per device from XLA's cost analysis of a compiled function."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def reference_model_config(model_cfg: ml_collections.ConfigDict) -> dict:
  """The model config computed the plain way: unrolled, unpadded, no remat, XLA attention (fields
  that change how a model is computed but not what). A last block that computes only the pooled
  token (`last_block_pooled`) stays so: its FLOPs are the ones the model needs."""
  from bigvis.models import XLA_KERNELS, unrolled, with_tower_fields
  return with_tower_fields(unrolled(model_cfg), remat_policy="none", attention_impl="xla",
                           seq_pad_multiple=0, **XLA_KERNELS).to_dict()


def model_flops_per_example(config: ml_collections.ConfigDict, batch: dict) -> float | None:
  """3 x forward FLOPs of one example through the plain model (HLO cost analysis, nothing compiled).

  Lowered for the host CPU whatever the accelerator: the count is a property of the model, and
  JAX 0.11's GPU lowering returns no cost analysis (MFU read `null` on an H100 before this).
  """
  from bigvis.models import build_model, model_inputs
  ref_cfg = ml_collections.ConfigDict(reference_model_config(config.model))
  model = build_model(ref_cfg)
  ref_config = ml_collections.ConfigDict({**config.to_dict(), "model": ref_cfg.to_dict()})
  try:
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS leaves out the CPU: lower for the default backend
    on_cpu = None
  inputs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=on_cpu)
            for x in model_inputs(ref_config.model, batch)]
  variables = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs, train=False), *inputs)
  variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=on_cpu), variables)
  try:
    cost = jax.jit(lambda v, *xs: model.apply(v, *xs, train=False)).lower(variables, *inputs).cost_analysis()
  except Exception:  # a JAX without HLO cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return 3.0 * float(flops) if flops and flops > 0 else None


def _rewrite_rows(path: str, keep: Callable[[dict], dict | None]) -> None:
  """Rewrites metrics.jsonl with each row passed through `keep` (None drops it); torn lines go."""
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line torn by a kill
    new = keep(row)
    if new is not None:
      kept.append(line if new is row else json.dumps(new, allow_nan=True) + "\n")
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write("".join(kept))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def truncate_after(path: str, step: int) -> None:
  """Drops lines logged after `step` (a resumed run rewrites them exactly)."""
  _rewrite_rows(path, lambda row: row if row.get("step", 0) <= step else None)


def _drop_keys_at(path: str, step: int, drop: Callable[[str], bool]) -> None:
  """Removes the keys `drop` accepts from the rows at `step` (a row left with only its step goes)."""
  def keep(row):
    if row.get("step") != step or not any(drop(k) for k in row if k != "step"):
      return row
    row = {k: v for k, v in row.items() if k == "step" or not drop(k)}
    return None if set(row) == {"step"} else row
  _rewrite_rows(path, keep)


def _prune_events(paths: list[str], keep: Callable[[int, str], bool]) -> None:
  """Rewrites TensorBoard event files without the scalars `keep(step, tag)` rejects (a file left with
  none goes). TensorBoard shows every event of every file: a resumed run's rewritten steps, or an eval
  run again, would show twice. A file torn by a kill keeps what precedes the tear."""
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  for path in paths:
    records, summaries, changed = [], 0, False
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        if event.HasField("summary"):
          values = [v for v in event.summary.value if keep(event.step, v.tag)]
          if len(values) != len(event.summary.value):
            changed = True
            if not values:
              continue
            del event.summary.value[:]
            event.summary.value.extend(values)
            record = event.SerializeToString()
          summaries += 1
        records.append(record)
    except tf.errors.DataLossError:
      changed = True
    if not changed:
      continue
    if not summaries:
      tf.io.gfile.remove(path)
      continue
    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as w:
      for record in records:
        w.write(record)
    tf.io.gfile.rename(tmp, path, overwrite=True)


class DeviceHours:
  """Device-hours a run has used to reach where it is: its devices x the wall time since this process
  started on it (start-up, compiles and evals hold the devices too), plus what the checkpoint it resumed
  from had used. Work lost after that checkpoint and redone counts once."""

  def __init__(self, devices: int):
    self.devices, self.before, self._t0 = devices, 0.0, time.time()

  def __call__(self) -> float:
    return self.before + self.devices * (time.time() - self._t0) / 3600


def duration(seconds: float) -> str:
  """Seconds as H:MM:SS, rounded up (a second to go is not 0:00:00); days in front past 24 hours,
  which a clock format would wrap."""
  total = math.ceil(max(seconds, 0.0))
  days, rest = divmod(total, 86400)
  clock = f"{rest // 3600:d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
  return f"{days}d {clock}" if days else clock


class MetricWriter:
  """Appends to metrics.jsonl, mirrors scalars to TensorBoard, prints progress."""

  def __init__(self, workdir: str, *, primary: bool = True, total_steps: int = 0, tensorboard: bool = True,
               append_only: bool = False):
    """`append_only`: never rewrite the files (`bigvis eval` beside a run that is training and writing
    them: a rewrite renamed over its open event file would lose what it writes next)."""
    self.primary, self.total_steps, self.append_only = primary, total_steps, append_only
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb, self._earlier_events = None, []
    if primary and tensorboard:
      import tensorflow as tf
      directory = os.path.join(workdir, "tensorboard")
      self._earlier_events = tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*"))
      self._tb = tf.summary.create_file_writer(directory)
    self._t0, self._step0 = time.time(), None

  def resume_at(self, step: int) -> None:
    """A run resumed at `step` rewrites the rows after it exactly, and redoes its evals at it: those rows
    and events go now (metrics.jsonl and TensorBoard alike); the old eval rows at `step` go when
    the new ones are written (`replace`)."""
    if self.primary and not self.append_only:
      truncate_after(self.path, step)
      _prune_events(self._earlier_events, lambda at, tag: at <= step)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.primary:
      return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k.startswith("perf/") else v)
             for k, v in metrics.items()}
    import tensorflow as tf
    # On a bucket (gs://) TensorFlow's append re-uploads the file: fine at a row per log_every_steps.
    with tf.io.gfile.GFile(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}, allow_nan=True) + "\n")
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in clean.items():
          if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool):
            tf.summary.scalar(k, v)
      self._tb.flush()

  def replace(self, step: int, metrics: dict[str, Any], namespaces: tuple[str, ...] = ()) -> None:
    """Writes `metrics` at `step` in place of what those keys, and every key under `namespaces` (an
    evaluator's `eval/<name>/`), held there: `bigvis eval` run again on a checkpoint leaves one row per
    step and evaluator, and none of the metrics an evaluator configured otherwise no longer gives."""
    def old(key: str) -> bool:
      return key in metrics or key.startswith(namespaces)
    if self.primary and not self.append_only:
      _drop_keys_at(self.path, step, old)
      _prune_events(self._earlier_events, lambda at, tag: at != step or not old(tag))
    self.write(step, metrics)

  def progress(self, step: int, loss: float, examples_per_sec: float, steps_per_sec: float = 0.0) -> None:
    """The progress line on stderr. The ETA uses the mean rate since the first line (evals included),
    and at the first line the rate of the steps just logged (`steps_per_sec`)."""
    if not self.primary:
      return
    if self._step0 is None:
      self._step0, self._t0 = step, time.time()
    done = step - self._step0
    rate = done / max(time.time() - self._t0, 1e-9) if done > 0 else steps_per_sec
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    eta_s = duration(eta) if math.isfinite(eta) else "?"
    rate_s = f"{examples_per_sec:,.0f}" if examples_per_sec >= 100 else f"{examples_per_sec:.3g}"
    print(f"step {step}/{self.total_steps} | loss {loss:.4f} | {rate_s} ex/s | ETA {eta_s}",
          file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
