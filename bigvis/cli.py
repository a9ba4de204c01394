"""The `bigvis` command. Thin: parses arguments, then calls library functions.

A `UserError` anywhere becomes one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", required=True, help="experiments/NAME.py[:arg] or a bare experiment name")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                 help="override a config key (repeatable), e.g. --set batch_size=64")


def _distributed_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--coordinator-address", help="HOST:PORT of process 0 for multi-process runs")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)


def init_distributed(args) -> None:
  """Starts JAX's distributed runtime from flags, or auto-detects it on TPU VMs and under SLURM."""
  import jax
  if args.coordinator_address:
    from bigvis.errors import UserError
    if args.num_processes is None or args.process_id is None:
      raise UserError("--coordinator-address needs --num-processes and --process-id.")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise UserError(f"--process-id {args.process_id} is not one of 0 to {args.num_processes - 1} "
                      f"(--num-processes {args.num_processes}).")
    # CPU-only runs (tests, laptops) need a collectives backend across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_multihost_tpu():
    jax.distributed.initialize()


def _on_multihost_tpu() -> bool:
  """True on a Cloud TPU VM (or GKE TPU pod) slice, where JAX discovers the other hosts itself."""
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    return True
  try:
    from jax._src import cloud_tpu_init  # private, but the check JAX itself uses
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def cmd_train(args) -> int:
  from bigvis import config as config_lib
  config = config_lib.load(args.config, args.overrides)
  init_distributed(args)
  from bigvis import train
  with train.workdir_lock(args.workdir, busy_ok=True) as holder:
    train.check_processes_agree(config, args.workdir, holder)
    final = train.train_and_evaluate(config, args.workdir)
  summary = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float) and k.startswith("eval/"))
  print(f"done: {summary}" if summary else "done.")
  return 0


def cmd_params(args) -> int:
  from bigvis import config as config_lib
  from bigvis import params
  config = config_lib.load(args.config, args.overrides)
  print(params.format_table(config.model))
  return 0


def cmd_data_write_shards(args) -> int:
  from data_pipelines import shards
  report = shards.write_shards(args.input, args.output_dir, shard_size=args.shard_size,
                               max_pixels=args.max_pixels, prefix=args.prefix)
  skipped = report.get("skipped", {})
  print(f"wrote {report.get('written', 0)} examples to {len(report.get('shards', []))} shards in "
        f"{args.output_dir}; skipped {sum(skipped.values())} {dict(skipped) if skipped else ''}".rstrip())
  return 0


def cmd_data_count_shards(args) -> int:
  from data_pipelines import shard_counts, sources
  files = sources.shard_files(args.shards, "--shards")
  step = max(1, len(files) // 20)

  def progress(n: int) -> None:
    if n % step == 0 or n == len(files):
      print(f"{n}/{len(files)} files counted", file=sys.stderr, flush=True)
  counts = shard_counts.count_shards(files, progress)
  folders = list(shard_counts.by_folder(files))
  print(f"counted {sum(counts.values())} records in {len(files)} files; wrote {shard_counts.MANIFEST} in "
        f"{', '.join(folders[:3])}{' and others' if len(folders) > 3 else ''}")
  return 0


def cmd_data_train_tokenizer(args) -> int:
  from data_pipelines import tokenizer
  path = tokenizer.train_tokenizer_from_shards(args.shards, args.model_prefix, args.vocab_size)
  print(f"tokenizer written to {path}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="bigvis", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) an experiment")
  _config_args(p)
  p.add_argument("--workdir", required=True, help="where metrics.jsonl and checkpoints/ go")
  _distributed_args(p)
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("params", help="parameter counts from shapes alone")
  _config_args(p)
  p.set_defaults(fn=cmd_params)

  data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
  p = data.add_parser("write-shards", help="image folders / CSV / JSONL / webdataset tars -> TFRecord shards")
  p.add_argument("input", help="a folder with captions.jsonl or captions.csv, or webdataset .tar files")
  p.add_argument("output_dir", help="where the shards and their shard_counts.json go")
  p.add_argument("--shard-size", type=int, default=1000, help="examples per shard (default 1000)")
  p.add_argument("--max-pixels", type=int, default=178956970, help="larger images are skipped as too_large")
  p.add_argument("--prefix", default="data", help="shard names: PREFIX-00000-of-NNNNN.tfrecord (default data)")
  p.set_defaults(fn=cmd_data_write_shards)
  p = data.add_parser("count-shards", help="count the records of TFRecord shards made elsewhere, so that "
                      "readers split them evenly (write-shards counts its own)")
  p.add_argument("--shards", required=True, help="glob(s) of TFRecord shards, comma-separated")
  p.set_defaults(fn=cmd_data_count_shards)
  p = data.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on shards' captions")
  p.add_argument("--shards", required=True, help="glob of TFRecord shards")
  p.add_argument("--model-prefix", required=True, help="output path without .model")
  p.add_argument("--vocab-size", type=int, default=32000)
  p.set_defaults(fn=cmd_data_train_tokenizer)

  from bigvis import bench; bench.add_parser(sub)  # noqa: E702  (stdlib-only import; jax loads on use)
  from bigvis import zeroshot_cli; zeroshot_cli.add_parser(sub)  # noqa: E702  (numpy-only import; jax loads on use)
  from bigvis import eval_cli; eval_cli.add_parser(sub)  # noqa: E702  (stdlib-only import; jax loads on use)
  from bigvis import aot; aot.add_parser(sub)  # noqa: E702  (stdlib-only import; jax and libtpu load on use)
  try:
    from bigvis.analysis import translatability
    translatability.add_parser(sub)
  except ImportError:  # the analysis extra is optional
    pass
  return parser


# What TensorFlow's C++ start-up writes to stderr before it reads TF_CPP_MIN_LOG_LEVEL: absl's preamble,
# oneDNN's note, the CUDA probe's on a host without a GPU (TensorFlow runs on the CPU here), CPU features.
START_UP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                  "Could not find cuda drivers", "cpu_feature_guard.cc", "To enable the following instructions",
                  "failed call to cuInit")


def start_tensorflow_quietly() -> None:
  """Imports TensorFlow and starts its runtime with stderr (fd 2) sent to a file, then writes back every
  line but the known start-up notes (a dozen lines before each command's first), so nothing else is lost."""
  if "tensorflow" in sys.modules:
    return
  import tempfile
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      import tensorflow as tf
      tf.constant(0)  # the runtime's start, where the CUDA probe logs
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      sys.stderr.write(without_start_up_noise(held.read().decode(errors="replace")))
      sys.stderr.flush()


def without_start_up_noise(text: str) -> str:
  return "".join(line for line in text.splitlines(keepends=True) if not any(n in line for n in START_UP_NOISE))


def main(argv: list[str] | None = None) -> int:
  # TensorFlow's warnings stay on: they are how a damaged shard's dropped records show (info is noise).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  args = build_parser().parse_args(argv)
  start_tensorflow_quietly()  # every command reads data or tokenizes with it
  from bigvis.errors import Preempted, UserError
  try:
    return args.fn(args)
  except UserError as e:
    print(f"bigvis: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("bigvis: interrupted; the last complete checkpoint is kept.", file=sys.stderr)
    return 130
  except Preempted as e:  # not done: no "done." and no 0 for `bigvis train … && bigvis eval …` to go on
    print(f"bigvis: {e}", file=sys.stderr)
    return 143


if __name__ == "__main__":
  sys.exit(main())
