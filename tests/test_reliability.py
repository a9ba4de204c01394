"""Runs that go wrong: non-finite losses, wrong workdirs, missing data — one line each, nothing lost."""
import json
import os

import pytest

from bigvis import cli
from bigvis.checkpoint import Checkpointer

FAST = ["--set", "batch_size=16", "--set", "log_every_steps=1", "--set", "evals={}",
        "--set", "optim.warmup_steps=0"]


def _train(tmp_path, *sets, workdir="w", config="vit_ti_digits"):
  args = ["train", "--config", config, "--workdir", str(tmp_path / workdir), *FAST]
  for s in sets:
    args += ["--set", s]
  return cli.main(args)


def _one_line_error(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  errors = [l for l in err if l.startswith("bigvis: error:")]
  assert len(errors) == 1 and not any("Traceback" in l for l in err), err
  return errors[0]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  # lr 1e30 with a constant schedule: step 1 is finite, its update blows the weights up.
  assert _train(tmp_path, "total_steps=6", "checkpoint_every_steps=1", "optim.lr=1e30",
                "optim.schedule='constant'", "optim.grad_clip_norm=0.0") == 2
  line = _one_line_error(capsys)
  assert "non-finite at step 2" in line and "last good checkpoint is step 1" in line
  assert Checkpointer(str(tmp_path / "w" / "checkpoints")).steps() == [1]


def test_nonfinite_skip_mode_counts_and_finishes(tmp_path):
  """Steps 2-4 are dropped (step 1's update blew the weights up). The logged learning rate is the one
  the optimizer applies: its schedule stands still while steps are dropped (it was logged as if it ran
  on: 0.75, 0.5, 0.25 of the peak on a linear decay)."""
  assert _train(tmp_path, "total_steps=4", "checkpoint_every_steps=0", "optim.lr=1e30",
                "optim.schedule='linear'", "optim.grad_clip_norm=0.0", "nonfinite='skip'") == 0
  rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl") if '"train/loss"' in l]
  assert [r["train/nonfinite_steps"] for r in rows] == [0, 1, 2, 3]
  assert [r["train/lr"] for r in rows] == pytest.approx([1e30] * 4, rel=1e-6)


def test_a_step_skipped_before_a_resume_does_not_stop_the_resumed_run(tmp_path, capsys, caplog):
  """A run that skipped a non-finite step (nonfinite='skip') and resumed under the default 'stop' stopped at
  once, naming the old step: the checkpoint carries the first non-finite step. Only this run's count."""
  import jax
  import numpy as np
  assert _train(tmp_path, "total_steps=2", "checkpoint_every_steps=2") == 0
  ckpt = Checkpointer(str(tmp_path / "w" / "checkpoints"))
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ckpt._mngr.item_metadata(2)["state"])
  step, state, meta = ckpt.restore_latest(shapes)
  state["first_nonfinite_step"], state["nonfinite"] = np.int32(0), np.int32(1)  # as if step 1 was skipped
  ckpt._mngr.delete(step)
  ckpt.save(step, state, meta)
  ckpt.close()
  capsys.readouterr()
  assert "batch_size is" not in caplog.text
  # Resumed with another batch size and number of readers too, which went on without a word (its data moved).
  assert _train(tmp_path, "total_steps=4", "checkpoint_every_steps=2", "batch_size=32",
                "data.train.num_readers=2") == 0, capsys.readouterr().err[-800:]
  rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl") if '"train/loss"' in l]
  assert [r["train/nonfinite_steps"] for r in rows][-2:] == [1, 1]  # the count itself carries on
  assert "batch_size is 32, but the run that wrote step 2 used 16" in caplog.text
  assert "the training data is read by 2 readers, but the run that wrote step 2 had 1" in caplog.text


def test_fingerprints_leave_out_how_the_last_block_is_computed():
  """`last_block_pooled` computes the same function: runs written before the field existed (their
  config.json lacks it) resume and evaluate, and setting it either way changes neither fingerprint;
  another variant changes both."""
  from bigvis import config as config_lib
  from bigvis import train
  for name, towers in (("vit_ti_digits", ("model.",)), ("clip_ti_digits", ("model.image.", "model.text."))):
    config = config_lib.load(name)
    older = config_lib.load(name)
    for tower in towers:
      section = older.model if tower == "model." else older.model[tower.split(".")[1]]
      del section["last_block_pooled"]
    whole = config_lib.load(name, [f"{t}last_block_pooled=false" for t in towers])
    for fingerprint in (train.fingerprint, train.model_fingerprint):
      assert fingerprint(older) == fingerprint(config) == fingerprint(whole), (name, fingerprint)
      assert fingerprint(config_lib.load(name, [f"{towers[0]}variant='Ti/4'"])) != fingerprint(config)


def test_workdir_of_another_experiment_is_refused(tmp_path, capsys):
  assert _train(tmp_path, "total_steps=2") == 0
  before = (tmp_path / "w" / "config.json").read_text()
  capsys.readouterr()
  assert _train(tmp_path, "total_steps=2", "model.variant='Ti/4'") == 2
  assert "different experiment" in _one_line_error(capsys)
  assert (tmp_path / "w" / "config.json").read_text() == before  # the refused run kept the run's config
  # A config.json edited after training no longer describes the checkpoints: evaluation refuses it.
  edited = json.loads(before)
  edited["model"]["variant"] = "Ti/4"
  (tmp_path / "w" / "config.json").write_text(json.dumps(edited))
  assert cli.main(["eval", "--workdir", str(tmp_path / "w"), "--no-tensorboard"]) == 2
  assert "config.json describes another model or objective than the checkpoint at step 2" in _one_line_error(capsys)


def test_unwritable_workdir(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert _train(tmp_path, "total_steps=2", workdir="file/sub") == 2
  assert "not writable" in _one_line_error(capsys)
  assert _train(tmp_path, "total_steps=2", workdir="file") == 2
  assert f"workdir '{tmp_path / 'file'}' is a file, not a folder." in _one_line_error(capsys)


def test_a_failed_rerun_of_a_finished_run_leaves_its_files_as_they_were(tmp_path, capsys):
  """Rerunning a finished run with a broken eval rewrote its config.json (with the broken setting, so
  `bigvis eval` failed from then on) and deleted its final eval row, before failing. A bad pp op is now
  refused before anything is written; an eval failing when it runs leaves both files as they were."""
  def run(*sets):
    args = ["train", "--config", "vit_ti_digits", "--workdir", str(tmp_path / "w"), "--set", "total_steps=2",
            "--set", "batch_size=16", "--set", "log_every_steps=1", "--set", "optim.warmup_steps=0"]
    for s in sets:
      args += ["--set", s]
    return cli.main(args)
  assert run() == 0
  files = {name: (tmp_path / "w" / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
  assert b'"eval/test/accuracy"' in files["metrics.jsonl"]
  capsys.readouterr()
  assert run("evals.test.data.pp='decode|resize(16)|bogus_op(3)'") == 2
  assert "evals.test.data.pp: unknown preprocessing op 'bogus_op'" in _one_line_error(capsys)
  assert run("evals.test.data.split='nope'") != 0  # fails in the eval itself, at the end
  capsys.readouterr()
  assert {name: (tmp_path / "w" / name).read_bytes() for name in files} == files


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path, capsys):
  """Two runs on one workdir interleaved metrics.jsonl rows and crashed over each other's checkpoint
  folders; the second now stops at once, naming the first, and writes nothing."""
  from bigvis import train
  with train.workdir_lock(str(tmp_path / "w")):  # the first run
    assert _train(tmp_path, "total_steps=2") == 2
    line = _one_line_error(capsys)
    assert f"workdir '{tmp_path / 'w'}' is in use by another bigvis run (pid {os.getpid()} on " in line
    assert sorted(os.listdir(tmp_path / "w")) == [".lock"]
  with train.workdir_lock(str(tmp_path / "w")):  # free again once it ends
    pass


def test_missing_shards_name_the_key(tmp_path, capsys):
  assert _train(tmp_path, "total_steps=2", "data.train.source='shards'",
                f"data.train.shards='{tmp_path}/nothing-*.tfrecord'") == 2
  line = _one_line_error(capsys)
  assert "data.train.shards" in line and "matches no files" in line


def test_shards_set_for_another_source_are_an_error_not_ignored(tmp_path, capsys):
  """`--set data.train.shards=...` on a digits experiment once trained on the digits, unsaid."""
  assert _train(tmp_path, "total_steps=2", f"data.train.shards='{tmp_path}/mine-*.tfrecord'") == 2
  line = _one_line_error(capsys)
  assert "'data.train.shards' is set, but data.train.source is 'digits'" in line
  assert "--set data.train.source=shards" in line


def test_shards_with_no_readable_record_are_an_error_not_a_traceback(tmp_path, capsys):
  (tmp_path / "empty.tfrecord").write_bytes(b"")
  (tmp_path / "junk.tfrecord").write_bytes(os.urandom(5000))
  assert _train(tmp_path, "total_steps=2", "data.train.source='shards'",
                f"data.train.shards='{tmp_path}/*.tfrecord'") == 2
  assert "data.train yields no batches: a reader of it found no usable record" in _one_line_error(capsys)


def test_unprepared_tfds_dataset_names_it_and_the_folder(tmp_path, capsys):
  empty = tmp_path / "tfds"
  empty.mkdir()
  assert _train(tmp_path, "total_steps=2", "data.train.source='tfds'", "data.train.name='mnist'",
                f"data.train.data_dir='{empty}'") == 2
  line = _one_line_error(capsys)
  assert "'mnist' is not prepared" in line and str(empty) in line and "set data.train.data_dir" in line
  assert _train(tmp_path, "total_steps=2", "data.train.source='tfds'") == 2
  assert "config key 'data.train.name' must name a TFDS dataset" in _one_line_error(capsys)


def test_images_of_another_size_than_the_model_are_an_error_at_start(tmp_path, capsys):
  """Trained on 16 px with model.image_size=24, a run's checkpoints would not load in `bigvis eval`; an
  eval set of another size would fail at its first eval."""
  assert _train(tmp_path, "total_steps=2", "model.image_size=24") == 2
  assert "data.train.pp gives 16x16 images but model.image_size is 24; make them alike." in _one_line_error(capsys)
  assert _train(tmp_path, "total_steps=2", "evals=" + repr(dict(test=dict(
      type="classification", data=dict(source="digits", split="test", pp="decode|resize(24)|onehot(10)"))))) == 2
  assert "evals.test.data.pp gives 24x24 images but model.image_size is 16" in _one_line_error(capsys)
  assert not (tmp_path / "w" / "metrics.jsonl").exists()  # stopped before writing anything


def test_an_evaluator_for_another_model_is_an_error_at_start(tmp_path, capsys):
  zeroshot = dict(zs=dict(type="zeroshot", class_names="a,b", data=dict(source="digits", split="test")))
  assert _train(tmp_path, "total_steps=2", f"evals={zeroshot!r}") == 2
  assert "evals.zs is a zeroshot evaluator, which reads a clip model; this run's is vit." in _one_line_error(capsys)


def test_wrong_type(tmp_path, capsys):
  assert _train(tmp_path, "total_steps=two") == 2
  assert "total_steps" in _one_line_error(capsys)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  """Preemption (SIGTERM) ends the run cleanly at a step boundary with that step checkpointed. The run is
  not finished, so the command says so and exits 143, not 0 with "done." (`train && eval` went on)."""
  import signal
  import subprocess
  import sys
  import time
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "bigvis.cli", "train", "--config", "vit_ti_digits", "--workdir", str(workdir),
         *FAST, "--set", "total_steps=100000", "--set", "checkpoint_every_steps=0"]
  proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "done" not in out and err.strip().splitlines()[-1].startswith("bigvis: stopped by SIGTERM at step ")
  steps = Checkpointer(str(workdir / "checkpoints")).steps()
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert steps == [last_logged] and last_logged >= 3  # no periodic checkpoints: this one came from SIGTERM


def test_eval_of_a_run_that_named_the_pallas_kernels_runs_on_cpu(tmp_path, monkeypatch):
  """`bigvis eval` of a run trained with `norm_impl`/`gelu_impl`/`attention_impl='pallas'` (NVIDIA GPUs
  only) evaluates on this CPU with XLA's LayerNorm, GELU and attention, the same function and
  parameters, as inference already did."""
  from bigvis import inference
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", "vit_ti_digits", "--workdir", str(workdir), "--set", "batch_size=16",
                   "--set", "total_steps=2", "--set", "eval_every_steps=2"]) == 0
  config = json.loads((workdir / "config.json").read_text())
  config["model"].update(norm_impl="pallas", gelu_impl="pallas", attention_impl="pallas")  # as a GPU run wrote it
  (workdir / "config.json").write_text(json.dumps(config))
  monkeypatch.setattr(inference, "check_config_matches", lambda *a: None)  # trained here with XLA's
  assert cli.main(["eval", "--workdir", str(workdir), "--no-tensorboard"]) == 0
