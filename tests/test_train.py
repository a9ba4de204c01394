"""The training loop end to end: mesh layouts agree, runs resume after a kill, digits are learned."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from bigvis import config as config_lib
from bigvis import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _short(overrides=()):
  c = config_lib.load("vit_ti_digits", ["total_steps=30", "log_every_steps=1", "checkpoint_every_steps=0",
                                        "batch_size=32", "optim.warmup_steps=5", *overrides])
  c.evals = ml_collections.ConfigDict()
  return c


@pytest.mark.slow
def test_same_loss_on_one_device_and_on_8_device_meshes(tmp_path):
  """Data parallel, FSDP and tensor parallel layouts compute the same training run."""
  runs = {
      "1dev": (_short(["mesh.data=1"]), jax.devices()[:1]),
      "data8": (_short(["mesh.data=8"]), None),
      "data2_fsdp4": (_short(["mesh.data=2", "mesh.fsdp=4"]), None),
      "data2_fsdp2_tensor2": (_short(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), None),
      "fsdp2_tensor4": (_short(["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"]), None),
  }
  losses = {}
  for name, (cfg, devices) in runs.items():
    train.train_and_evaluate(cfg, str(tmp_path / name), devices=devices)
    losses[name] = _losses(str(tmp_path / name))
  ref = np.array([losses["1dev"][s] for s in range(1, 31)])
  assert ref[-1] < ref[0]  # it trains
  for name in ("data8", "data2_fsdp4", "data2_fsdp2_tensor2", "fsdp2_tensor4"):
    got = np.array([losses[name][s] for s in range(1, 31)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=name)


def _bigvis(args, workdir, **kw):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen([sys.executable, "-m", "bigvis.cli", "train", "--config", "experiments/vit_ti_digits.py",
                           "--workdir", workdir, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _kill_after_checkpoint(proc, ckpts: str, at_least: int) -> None:
  """SIGKILL `proc` as soon as a checkpoint of step >= `at_least` is complete."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = os.listdir(ckpts) if os.path.isdir(ckpts) else []
    if any(d.isdigit() and int(d) >= at_least for d in done):
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path):
  """Killed with SIGKILL twice and restarted: the losses of an uninterrupted run, step for step."""
  args = ["--set", "total_steps=20", "--set", "log_every_steps=1", "--set", "checkpoint_every_steps=5",
          "--set", "batch_size=32", "--set", "optim.warmup_steps=5", "--set", "evals={}"]
  ref_dir, killed_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  assert _bigvis(args, ref_dir).wait() == 0
  ckpts = os.path.join(killed_dir, "checkpoints")
  _kill_after_checkpoint(_bigvis(args, killed_dir), ckpts, 5)
  _kill_after_checkpoint(_bigvis(args, killed_dir), ckpts, 10)
  resumed = _bigvis(args, killed_dir)
  out, err = resumed.communicate()
  assert resumed.returncode == 0, err
  assert "resumed from step" in err
  ref, got = _losses(ref_dir), _losses(killed_dir)
  assert sorted(got) == sorted(ref) == list(range(1, 21))
  np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-6)
  # Device-hours carry over from the checkpoint resumed (saved after its step's row is logged): counted
  # from zero again, they would fall back after each resume.
  rows = [json.loads(l) for l in open(os.path.join(killed_dir, "metrics.jsonl"))]
  hours = [r["perf/device_hours"] for r in rows if "perf/device_hours" in r]
  assert len(hours) == 20 and all(b > a for a, b in zip(hours, hours[1:])), hours


@pytest.mark.slow
def test_default_experiment_learns_digits(tmp_path, monkeypatch):
  """A shortened default run: held-out accuracy well above chance, metrics and TensorBoard written."""
  from bigvis import metrics
  from data_pipelines.synthetic import synthetic_batch
  monkeypatch.setattr(metrics, "device_peak_flops", lambda *a: 1e12)  # the CPU has no known peak
  cfg = config_lib.load("vit_ti_digits", ["total_steps=250", "checkpoint_every_steps=100"])
  final = train.train_and_evaluate(cfg, str(tmp_path))
  assert final["eval/test/accuracy"] >= 0.8
  assert final["eval/test/num_examples"] == 300
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  keys = set().union(*rows)
  for k in ("train/loss", "train/lr", "perf/examples_per_sec", "perf/examples_per_sec_per_device", "perf/mfu",
            "eval/test/accuracy"):
    assert k in keys
  # MFU = model FLOPs per example x examples/s / devices / peak.
  flops = metrics.model_flops_per_example(cfg, synthetic_batch(cfg.model, 1))
  perf = [r for r in rows if "perf/mfu" in r]
  assert perf and flops > 0
  for r in perf:
    assert r["perf/mfu"] == pytest.approx(flops * r["perf/examples_per_sec"] / jax.device_count() / 1e12)
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())[-1] == 250
  # Running a finished run again re-evaluates it without duplicating rows.
  again = train.train_and_evaluate(cfg, str(tmp_path))
  assert again["eval/test/accuracy"] == final["eval/test/accuracy"]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert sum("eval/test/accuracy" in r for r in rows) == 1


@pytest.mark.slow
def test_evals_due_at_the_resume_step_are_not_lost(tmp_path, monkeypatch):
  """A step's checkpoint is saved before its evals; a run stopped between the two (SIGTERM, or a
  crash in an evaluator, as here) resumes at that step and runs its evals there, so metrics.jsonl
  has every eval row the uninterrupted run has."""
  from bigvis.evaluators import classification

  def run(overrides, workdir):
    c = config_lib.load("vit_ti_digits", ["total_steps=8", "log_every_steps=2", "checkpoint_every_steps=3",
                                          "eval_every_steps=3", "batch_size=32", "optim.warmup_steps=2",
                                          "mesh.data=1", *overrides])
    return train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])

  def eval_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return sorted(r["step"] for r in rows if any(k.startswith("eval/") for k in r))
  run([], tmp_path / "whole")
  real, calls = classification.Evaluator.run, []

  def failing_at_step_6(self, params):
    calls.append(1)
    if len(calls) == 2:  # step 3's eval ran; step 6's checkpoint is saved, then its eval fails
      raise RuntimeError("evaluator crashed")
    return real(self, params)
  monkeypatch.setattr(classification.Evaluator, "run", failing_at_step_6)
  with pytest.raises(RuntimeError, match="evaluator crashed"):
    run([], tmp_path / "stopped")
  monkeypatch.setattr(classification.Evaluator, "run", real)
  run([], tmp_path / "stopped")  # resumes at step 6
  assert eval_steps(tmp_path / "whole") == [3, 6, 8]
  assert eval_steps(tmp_path / "stopped") == [3, 6, 8]
