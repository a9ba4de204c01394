"""Two processes x 4 CPU devices (JAX's distributed runtime, gloo collectives) train like 1 x 8."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--set", "total_steps=12", "--set", "log_every_steps=1", "--set", "checkpoint_every_steps=6",
        "--set", "batch_size=32", "--set", "optim.warmup_steps=3", "--set", "data.train.num_readers=2",
        "--set", "evals.test.batch_size=64"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, devices, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "bigvis.cli", "train", "--config", "experiments/vit_ti_digits.py",
                           "--workdir", workdir, *ARGS, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _train_on_two_processes(workdir):
  """Two processes x 4 devices, coordinated on a free local port; both must finish."""
  port = _free_port()
  procs = [_start(workdir, 4, ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)]) for i in range(2)]
  errs = [pr.communicate(timeout=600)[1] for pr in procs]
  for pr, err in zip(procs, errs):
    assert pr.returncode == 0, err[-3000:]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  one = str(tmp_path / "one")
  p = _start(one, 8)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]

  two = str(tmp_path / "two")
  _train_on_two_processes(two)

  ref, got = _rows(one), _rows(two)
  loss = lambda rows: {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  assert sorted(loss(got)) == list(range(1, 13))
  np.testing.assert_allclose([loss(got)[s] for s in range(1, 13)], [loss(ref)[s] for s in range(1, 13)],
                             rtol=1e-5)
  acc = lambda rows: [r["eval/test/accuracy"] for r in rows if "eval/test/accuracy" in r]
  np.testing.assert_allclose(acc(got), acc(ref), rtol=1e-6)  # the eval sees all 300 examples once
  assert [r["eval/test/num_examples"] for r in got if "eval/test/num_examples" in r] == [300]
  # Only process 0 writes metrics; checkpoints are written collectively.
  assert len(got) == len(ref)
  assert sorted(d for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit()) == ["12", "6"]

  # A damaged newest checkpoint: both processes fall back to step 6 together (process 0 moves step 12
  # aside, both reload), retrain steps 7-12 exactly, and the damaged folder is kept.
  for root, _, files in os.walk(os.path.join(two, "checkpoints", "12", "state")):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(0)
  _train_on_two_processes(two)
  resumed = loss(_rows(two))
  np.testing.assert_allclose([resumed[s] for s in range(7, 13)], [loss(ref)[s] for s in range(7, 13)], rtol=1e-5)
  assert [d.split("-")[0] for d in os.listdir(os.path.join(two, "checkpoints", "damaged"))] == ["12"]
  assert sorted(d for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit()) == ["12", "6"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_checkpoint(tmp_path):
  """Preemption of one process: JAX's preemption service agrees on a step, both save it and exit 143."""
  import signal
  import time
  work = str(tmp_path / "w")
  port = _free_port()
  procs = [_start(work, 4, ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i), "--set", "total_steps=100000", "--set", "checkpoint_every_steps=0",
                            "--set", "eval_every_steps=0"]) for i in range(2)]
  metrics = os.path.join(work, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and len(_rows(work)) >= 3):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # the process that writes no metrics
  errs = [pr.communicate(timeout=300)[1] for pr in procs]
  for pr, err in zip(procs, errs):
    assert pr.returncode == 143, err[-3000:]
  steps = sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())
  assert len(steps) == 1 and steps[0] >= 3
  assert steps[0] == _rows(work)[-1]["step"]


def test_processes_started_otherwise_or_on_a_busy_workdir_all_stop_with_one_line(tmp_path):
  """A process with another config waited for ever in the first collective; on a workdir another run
  holds, process 0 stopped and process 1 failed a minute later with a gloo stack trace."""
  from bigvis import train

  def two(extra_for_1=()):
    port = _free_port()
    procs = [_start(str(tmp_path / "w"), 1, ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                             "--process-id", str(i), *(extra_for_1 if i else ())]) for i in range(2)]
    return [(pr.communicate(timeout=300)[1], pr.returncode) for pr in procs]

  for err, rc in two(["--set", "total_steps=20"]):
    assert rc == 2 and "bigvis: error: process 1 was started with another config or --workdir than process 0" in err
  with train.workdir_lock(str(tmp_path / "w")):  # another run holds it
    for err, rc in two():
      assert rc == 2 and f"bigvis: error: workdir '{tmp_path / 'w'}' is in use by another bigvis run" in err, err
  bad = subprocess.run([sys.executable, "-m", "bigvis.cli", "train", "--config", "vit_ti_digits", "--workdir",
                        str(tmp_path / "x"), "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                        "--process-id", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--process-id 2 is not one of 0 to 1 (--num-processes 2)." in bad.stderr
