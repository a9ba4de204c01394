"""`bigvis zeroshot`: classify your own images with a CLIP run and class names you choose.

    bigvis zeroshot --workdir runs/clip_ti_digits --images my_photos/ --labels "zero,one,two" --top-k 3

Each class name (at least two) is put into every prompt template (default: the
run's zero-shot templates, else 7 of CLIP's), the run's text tower embeds the
prompts, and each image (jpg/png/tif/... directly in the folder, read as
`bigvis translatability` reads them and resized as the run's evaluation did)
gets the classes whose prompt-ensemble embedding is most similar, with softmax
probabilities at the run's learned temperature.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from bigvis.image_files import IMAGE_SUFFIXES, is_image_name, load_rgb
from bigvis.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  """Registers `bigvis zeroshot` on the CLI's subparsers."""
  p = subparsers.add_parser(
      "zeroshot", help="classify a folder of images with a CLIP run and your class names",
      description="Zero-shot classification of your own images with a trained CLIP run.")
  p.add_argument("--workdir", required=True, help="the --workdir of a CLIP `bigvis train` run")
  p.add_argument("--images", required=True, metavar="FOLDER",
                 help=f"folder of {'/'.join(e[1:] for e in IMAGE_SUFFIXES)} images (subfolders are not read)")
  p.add_argument("--labels", required=True,
                 help="at least two comma-separated class names, e.g. 'cat,dog,car' (CSV quoting for a "
                      "name with a comma: '\"cat, tabby\",dog'), or a file with one name per line")
  p.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                 help="prompt templates with one {} for the class name, literal braces as {{ and }} "
                      "(default: the run's, else CLIP's)")
  p.add_argument("--top-k", type=int, default=3, help="classes printed per image (default 3)")
  p.add_argument("--step", type=int, help="checkpoint step to use (default: the newest)")
  p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
  p.set_defaults(fn=main)  # bigvis/cli.py dispatches on args.fn


def image_files(folder: str) -> list[str]:
  """Sorted image files directly inside `folder`, chosen as `bigvis translatability` chooses them; how
  many other entries (subfolders, dotfiles, other suffixes) were ignored is said on stderr."""
  if not os.path.isdir(folder):
    raise UserError(f"--images '{folder}' is not a folder.")
  entries = os.listdir(folder)
  files = sorted(f for f in entries if is_image_name(f) and os.path.isfile(os.path.join(folder, f)))
  if len(entries) > len(files):
    print(f"bigvis: ignoring {len(entries) - len(files)} of the {len(entries)} entries in '{folder}': "
          "subfolders, hidden files and files without an image suffix are not read.", file=sys.stderr)
  if not files:
    raise UserError(f"--images '{folder}' holds no {'/'.join(e[1:] for e in IMAGE_SUFFIXES)} files.")
  return files


def read_images(folder: str) -> tuple[list[str], list[np.ndarray]]:
  """(names, uint8 RGB arrays) of the readable images; unreadable ones are reported and skipped."""
  names, images = [], []
  for name in image_files(folder):
    image = load_rgb(os.path.join(folder, name))
    if image is None:
      print(f"bigvis: skipping {os.path.join(folder, name)}: not a readable image.", file=sys.stderr)
      continue
    names.append(name)
    images.append(image)
  if not images:
    raise UserError(f"none of the images in '{folder}' could be read.")
  return names, images


def classify(workdir: str, folder: str, labels: str, templates: list[str] | None = None, top_k: int = 3,
             step: int | None = None, batch_size: int = 64) -> list[tuple[str, list[tuple[str, float]]]]:
  """[(image name, [(class, probability), ...top_k])] for every readable image in `folder`."""
  from bigvis import inference
  from bigvis.evaluators import features as feat
  from bigvis.evaluators import zeroshot
  if top_k < 1:
    raise UserError(f"--top-k must be at least 1, got {top_k}.")
  if batch_size < 1:
    raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
  class_names = zeroshot.class_names_from(labels, "--labels", min_names=2)
  if templates:  # usage errors before the (slow) restore
    zeroshot.templates_from(templates, "--templates")
  names, images = read_images(folder)
  config, model, params = inference.load_run(workdir, step)
  if config.model.get("name") != "clip":
    raise UserError(f"workdir '{workdir}' holds a '{config.model.get('name')}' run; zero-shot "
                    "classification needs a CLIP run (model.name='clip').")
  run_cfg = feat.zeroshot_section(config, None, "evals")
  templates = zeroshot.templates_from(templates or run_cfg.get("prompts"), "--templates")
  entry = next((n for n, ev in (config.get("evals") or {}).items() if ev.get("type") == "zeroshot"), None)
  tokenizer = zeroshot.text_tokenizer(run_cfg, config, f"evals.{entry}" if entry else "a zeroshot entry of evals")
  tokens = tokenizer.encode(zeroshot.prompt_texts(class_names, templates))
  ztxt = inference.make_text_embedder(model, params)(tokens).reshape(len(class_names), len(templates), -1)
  zimg = inference.make_image_embedder(config, model, params, batch_size)(images)
  logits = zeroshot.zeroshot_logits(zimg, ztxt, inference.logit_scale(params)).astype(np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  k = min(top_k, len(class_names))
  order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  return [(name, [(class_names[j], float(probs[i, j])) for j in order[i]]) for i, name in enumerate(names)]


def main(args: argparse.Namespace) -> int:
  """Runs `bigvis zeroshot` and prints one line per image: `name: class p | class p | ...`."""
  results = classify(args.workdir, args.images, args.labels, args.templates, args.top_k, args.step,
                     args.batch_size)
  width = max(len(name) for name, _ in results)
  for name, top in results:
    print(f"{name:<{width}}  " + " | ".join(f"{c} {p:.3f}" for c, p in top))
  return 0
