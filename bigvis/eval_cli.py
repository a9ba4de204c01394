"""`bigvis eval`: run evaluators on a trained run's checkpoint, without training, and write their reports.

    bigvis eval --workdir runs/clip_ti_digits                      # every evaluator of the run
    bigvis eval --workdir runs/clip_ti_digits --evaluator linear_probe robustness --step 250
    bigvis eval --workdir runs/clip_ti_digits --set reports.linear_probe.seeds=5

What runs: by default every entry of the run's `evals` (those the training loop
runs too) and of its `reports`, a config section of the same shape
(`name -> {type: ..., ...}`) for evaluations too slow or too detailed to repeat
during training: the linear probe, robustness and bias-audit tables. Both
come from `WORKDIR/config.json` (the config the run trained with), with
`--set key=value` overrides applied on top, so an evaluation is a function of
the run and the command line alone. `--evaluator` picks entries by name;
`--config experiments/NAME.py` takes `evals` and `reports` from the experiment
file instead (its model must be the run's), for runs trained before a report
was configured.

What it writes: for each evaluator `WORKDIR/reports/<name>.csv` and `.md` (and
`.png` where a picture helps): its own report if it has one (`report()`, see
bigvis/evaluators/reports.py), the per-template table for zero-shot, else its
metrics as a table. Headline metrics are appended to `WORKDIR/metrics.jsonl`
as `eval/<name>/<metric>` at the checkpoint's step (and to TensorBoard).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import time
from typing import Any, Sequence

from bigvis.errors import UserError

REPORTS_DIR = "reports"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `bigvis eval` on the CLI's subparsers."""
  p = subparsers.add_parser(
      "eval", help="run evaluators on a trained run and write reports (csv, md, png)",
      description="Runs the evaluators of a trained run (its config's evals and reports) on a checkpoint "
                  "and writes WORKDIR/reports/<name>.{csv,md,png}.")
  p.add_argument("--workdir", required=True, help="the --workdir of a `bigvis train` run")
  p.add_argument("--evaluator", nargs="+", action="extend", dest="evaluators", metavar="NAME",
                 help="entries of the run's evals/reports to run (default: all of them)")
  p.add_argument("--config", metavar="EXPERIMENT", dest="experiment",
                 help="take evals and reports from this experiment file (same model) instead of the run's "
                      "config.json, e.g. for a run trained before a report was configured")
  p.add_argument("--step", type=int, help="checkpoint step to evaluate (default: the newest readable one)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                 help="override a key of the run's config (repeatable), e.g. --set reports.linear_probe.seeds=5")
  p.add_argument("--no-tensorboard", action="store_true", help="log metrics to metrics.jsonl only")
  p.set_defaults(fn=main)  # bigvis/cli.py dispatches on args.fn


def sections(config, names: Sequence[str] | None = None) -> dict[str, Any]:
  """name -> evaluator config for the chosen entries of `evals` then `reports` (all by default)."""
  evals = dict(config.get("evals") or {})
  extra = dict(config.get("reports") or {})
  both = sorted(set(evals) & set(extra))
  if both:
    raise UserError(f"'{both[0]}' names an entry of both evals and reports; rename one of them.")
  available = {**dict(sorted(evals.items())), **dict(sorted(extra.items()))}
  if not names:
    if not available:
      raise UserError("the run's config has no evals and no reports entries to run.")
    return available
  chosen = {}
  for n in names:
    if n not in available:
      match = difflib.get_close_matches(n, list(available), n=1, cutoff=0.0)
      raise UserError(f"--evaluator '{n}' is not an entry of the run's evals or reports"
                      + (f"; the closest is '{match[0]}'." if match else " (it has none)."))
    chosen[n] = available[n]
  return chosen


def eval_mesh(config):
  """The run's mesh if it fits the devices here, else pure data parallelism over all of them."""
  from bigvis import sharding
  try:
    return sharding.make_mesh(config.mesh)
  except UserError as e:
    logging.info("the run's mesh does not fit these devices (%s); evaluating data-parallel instead.", e)
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def restore_params(workdir: str, config, mesh, rules, step: int | None) -> tuple[int, Any]:
  """(step, params) of the run, restored straight into their shardings on `mesh`."""
  import flax.linen as nn
  import jax
  from bigvis import inference, params, sharding
  boxed = params.abstract_params(config.model, boxed=True)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  # The partial, params-only restore `bigvis.inference` uses, here onto the mesh.
  return inference.restore_params(os.path.join(workdir, "checkpoints"), abstract, step)


def build_report(name: str, cfg, evaluator, metrics: dict[str, Any]):
  """The evaluator's own report (from its last run), or its metrics as a table."""
  from bigvis.evaluators import reports
  if hasattr(evaluator, "report"):
    return evaluator.report()
  return reports.metrics_report(name, metrics, intro=f"Metrics of the `{cfg.get('type', name)}` evaluator.")


def with_experiment_evals(config, spec: str):
  """The run's config with `evals` and `reports` taken from experiment `spec`, whose model must be the run's."""
  import jax
  import ml_collections
  from bigvis import config as config_lib
  from bigvis import params
  exp = config_lib.load_experiment(spec)

  def shapes(model_cfg):  # the same parameters, whatever defaults either config spells out
    tree = params.abstract_params(model_cfg)
    return jax.tree_util.tree_structure(tree), [x.shape for x in jax.tree.leaves(tree)]
  if "model" not in exp or shapes(exp.model) != shapes(config.model):
    raise UserError(f"--config '{spec}' describes another model than the run's; its evals and reports "
                    "would not fit this checkpoint.")
  config = ml_collections.ConfigDict(config.to_dict())
  config.evals = ml_collections.ConfigDict(exp.get("evals") or {})
  config.reports = ml_collections.ConfigDict(exp.get("reports") or {})
  return config


def evaluate_run(workdir: str, names: Sequence[str] | None = None, step: int | None = None,
                 overrides: Sequence[str] = (), tensorboard: bool = True,
                 experiment: str | None = None) -> dict[str, dict[str, Any]]:
  """Runs the chosen evaluators on a checkpoint of `workdir`; returns name -> {step, metrics, paths}."""
  import jax
  from bigvis import config as config_lib
  from bigvis import evaluators as eval_lib
  from bigvis import inference, sharding, train
  from bigvis import metrics as metrics_lib
  from bigvis.evaluators import reports, zeroshot
  from bigvis.models import build_model, kernels_for_reading

  config = inference.load_config(workdir)
  if "model" not in config:
    raise UserError(f"{os.path.join(workdir, 'config.json')} has no 'model' section.")
  inference.check_config_matches(workdir, config, step)  # before --set, which may change kernels
  if experiment:
    config = with_experiment_evals(config, experiment)
  config = config_lib.apply_overrides(config, overrides)
  chosen = sections(config, names)
  for name, cfg in chosen.items():  # a wrong type fails before the (slow) restore
    kind = cfg.get("type", name)
    if kind not in eval_lib.EVALUATORS:
      raise UserError(f"evaluator '{name}' has type '{kind}', not one of {', '.join(sorted(eval_lib.EVALUATORS))}.")
    eval_lib.check_model(kind, f"evaluator '{name}'", config.model.get("name"))
  zeroshot.check_same_tokenizer(config)  # a --set pp or tokenizer must not read the model's text as noise
  train.check_image_size(config, None, ("evals", "reports"), only=chosen)  # before the (slow) restore

  mesh = eval_mesh(config)
  rules = sharding.rules_from_config(config)
  device = mesh.devices.flat[0]
  model = build_model(kernels_for_reading(config.model, device), device)
  restored_step, params = restore_params(workdir, config, mesh, rules, step)
  logging.info("evaluating %s at step %d on %d device(s)", workdir, restored_step, mesh.size)
  evaluators = eval_lib.build_evaluators(chosen, model=model, mesh=mesh, config=config)

  primary = jax.process_index() == 0
  out_dir = os.path.join(workdir, REPORTS_DIR)
  results = {}
  with train.workdir_lock(workdir, busy_ok=True) as training:  # the training run's pid and host, or None
    if training:
      logging.warning("a run is training in %s: its metrics.jsonl and TensorBoard files are appended to, not "
                      "rewritten, so rows of evals run before at step %d stay beside these.", workdir,
                      restored_step)
    writer = metrics_lib.MetricWriter(workdir, primary=primary, tensorboard=tensorboard,
                                      append_only=training is not None)
    try:
      for name, ev in evaluators.items():
        t0 = time.time()
        with sharding.use_mesh(mesh), sharding.activation_rules(mesh, rules):
          metrics = ev.run(params)
        writer.replace(restored_step, {f"eval/{name}/{k}": v for k, v in metrics.items()}, (f"eval/{name}/",))
        paths = []
        if primary:
          paths = reports.write_report(out_dir, name, build_report(name, chosen[name], ev, metrics))
        logging.info("%s done in %.1fs", name, time.time() - t0)
        results[name] = {"step": restored_step, "metrics": metrics, "paths": paths}
    finally:
      writer.close()
  return results


def _headline(metrics: dict[str, Any], limit: int = 6) -> str:
  shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
           if isinstance(v, (int, float)) and not k.startswith("num_")]
  return ", ".join(shown[:limit]) + (", ..." if len(shown) > limit else "")


def main(args: argparse.Namespace) -> int:
  """Runs `bigvis eval` and prints one line per evaluator: headline metrics and its report."""
  results = evaluate_run(args.workdir, args.evaluators, args.step, args.overrides,
                         tensorboard=not args.no_tensorboard, experiment=args.experiment)
  for name, r in results.items():
    where = next((p for p in r["paths"] if p.endswith(".md")), "")
    print(f"{name} (step {r['step']}): {_headline(r['metrics'])}" + (f"  -> {where}" if where else ""))
  return 0
