"""The progress line: its ETA from the first line on, and durations past a day."""
from bigvis import metrics


def test_duration_rounds_up_and_counts_days():
  assert metrics.duration(0) == "0:00:00"
  assert metrics.duration(0.2) == "0:00:01"  # a fraction of a second to go is not done
  assert metrics.duration(3 * 3600 + 4 * 60 + 5) == "3:04:05"
  # A clock format wrapped at 24 hours: a 30-hour ViT-H run read "06:00:00".
  assert metrics.duration(30 * 3600) == "1d 6:00:00"
  assert metrics.duration(-3) == "0:00:00"


def test_progress_line_has_an_eta_from_its_first_line(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=1000, tensorboard=False)
  # 100 steps logged at 2 steps/s: 900 to go are 450 s. The first line once printed "ETA ?".
  writer.progress(100, 1.5, 512.0, steps_per_sec=2.0)
  assert capsys.readouterr().err.strip() == "step 100/1000 | loss 1.5000 | 512 ex/s | ETA 0:07:30"
  writer.progress(200, 1.0, 512.0, steps_per_sec=2.0)  # later lines: the mean rate since the first
  line = capsys.readouterr().err
  assert "step 200/1000" in line and "ETA ?" not in line
  metrics.MetricWriter(str(tmp_path), total_steps=10, tensorboard=False).progress(5, 1.0, 10.0)
  assert capsys.readouterr().err.strip().endswith("ETA ?")  # no rate known: said so


def test_a_workdir_on_a_bucket_is_written_there_not_in_a_local_gs_folder(tmp_path, monkeypatch):
  """`--workdir gs://bucket/run` (the README's TPU-pod command) made a local folder 'gs:/bucket/run' for
  config.json, metrics.jsonl and the checkpoints: every file of a run now goes through tf.io.gfile. Here
  TensorFlow's in-memory filesystem (ram://) stands in for the bucket."""
  import os
  import ml_collections
  from bigvis import inference, train
  from bigvis.evaluators import reports
  monkeypatch.chdir(tmp_path)
  workdir = "ram://bucket/run"
  train.prepare_workdir(workdir)
  train.write_config(workdir, ml_collections.ConfigDict({"model": {"name": "vit"}, "seed": 3}))
  assert inference.load_config(workdir).seed == 3
  writer = metrics.MetricWriter(workdir, total_steps=4, tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  metrics.truncate_after(writer.path, 2)
  import tensorflow as tf
  with tf.io.gfile.GFile(writer.path) as f:
    assert [int(line.split(",")[0].split(":")[1]) for line in f] == [1, 2]
  report = reports.Report(title="t", intro="", columns=["a"], rows=[{"a": 1}])
  paths = reports.write_report(os.path.join(workdir, "reports"), "r", report)
  assert all(tf.io.gfile.exists(p) for p in paths)
  assert os.listdir(tmp_path) == []  # nothing written locally


def test_an_eval_run_again_replaces_its_row(tmp_path):
  """Each `bigvis eval` of a checkpoint appended another copy of its row at that step."""
  import json
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(10, {"train/loss": 1.0})
  writer.write(10, {"eval/test/accuracy": 0.5, "eval/zs/top1": 0.1})
  writer.write(12, {"eval/test/accuracy": 0.6})
  writer.replace(10, {"eval/test/accuracy": 0.7})
  writer.replace(10, {"eval/test/accuracy": 0.7})
  writer.replace(10, {"eval/zs/top1": 0.2})
  rows = [json.loads(line) for line in open(writer.path)]
  assert rows == [{"step": 10, "train/loss": 1.0}, {"step": 12, "eval/test/accuracy": 0.6},
                  {"step": 10, "eval/test/accuracy": 0.7}, {"step": 10, "eval/zs/top1": 0.2}]
  metrics.truncate_after(writer.path, 10)
  assert [json.loads(line)["step"] for line in open(writer.path)] == [10, 10, 10]


def test_an_evaluator_run_again_replaces_its_whole_namespace_unless_appending(tmp_path):
  """Keys an evaluator no longer gives (a template dropped) go too; beside a training run (append_only)
  nothing is rewritten."""
  import json
  import time
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(10, {"eval/zs/top1": 0.1, "eval/zs/top1_template1": 0.2, "eval/test/accuracy": 0.5})
  writer.close()
  time.sleep(1.1)  # event file names carry the second they were made
  again = metrics.MetricWriter(str(tmp_path))
  again.replace(10, {"eval/zs/top1": 0.3}, ("eval/zs/",))
  again.close()
  rows = [json.loads(line) for line in open(writer.path)]
  assert rows == [{"step": 10, "eval/test/accuracy": 0.5}, {"step": 10, "eval/zs/top1": 0.3}]
  assert sorted(_events(tmp_path / "tensorboard")) == [(10, "eval/test/accuracy"), (10, "eval/zs/top1")]
  before = open(writer.path).read()
  beside = metrics.MetricWriter(str(tmp_path), append_only=True, tensorboard=False)
  beside.resume_at(0)
  beside.replace(10, {"eval/zs/top1": 0.4}, ("eval/zs/",))
  assert open(writer.path).read() == before + json.dumps({"step": 10, "eval/zs/top1": 0.4}) + "\n"


def _events(directory):
  """(step, tag) of every scalar in every event file, in file order."""
  import glob
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  out = []
  for path in sorted(glob.glob(f"{directory}/events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      out += [(event.step, v.tag) for v in event.summary.value]
  return out


def test_tensorboard_shows_each_step_once_after_a_resume_and_an_eval_run_again(tmp_path):
  """metrics.jsonl was truncated on resume but the event files were not: TensorBoard showed the steps
  between the checkpoint and the kill twice (and `bigvis eval` run again added a point each time)."""
  import time
  first = metrics.MetricWriter(str(tmp_path), total_steps=8)
  for step in range(1, 7):
    first.write(step, {"train/loss": 1.0 / step})
  first.write(4, {"eval/test/accuracy": 0.5})
  first.close()  # killed after step 6; the checkpoint is step 4
  time.sleep(1.1)  # event file names carry the second they were made
  resumed = metrics.MetricWriter(str(tmp_path), total_steps=8)
  resumed.resume_at(4)
  resumed.replace(4, {"eval/test/accuracy": 0.6})  # the eval at the checkpoint, redone
  for step in range(5, 9):
    resumed.write(step, {"train/loss": 1.0 / step})
  resumed.close()
  seen = _events(tmp_path / "tensorboard")
  assert sorted(seen) == sorted([(s, "train/loss") for s in range(1, 9)] + [(4, "eval/test/accuracy")])
  time.sleep(1.1)
  again = metrics.MetricWriter(str(tmp_path))  # `bigvis eval` of the step-4 checkpoint, once more
  again.replace(4, {"eval/test/accuracy": 0.6})
  again.close()
  assert sorted(_events(tmp_path / "tensorboard")) == sorted(seen)
