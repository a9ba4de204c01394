"""Zero-shot classification (CLIP, Section 3.1.4): class names x prompt templates -> a text classifier.

Every class name is put into every template ("a photo of a {}."), the texts
are embedded by the run's text tower, and a class's embedding is the mean of
its L2-normalised prompt embeddings, renormalised (the paper's prompt
ensembling). Images of the eval split are classified by cosine similarity to
those class embeddings. Metrics: `top1`, `top5`, `num_examples`, and, because
the per-template classifiers come for free from the same text embeddings,
`top1_template<i>` for each template when there are several.

Config (`evals.<name>`): `data` (the split; labels from an integer `label`
feature or one-hot `labels`), `class_names` (at least two: a list, a
comma-separated string with CSV quoting for names holding commas, or a text
file with one name per line), `prompts` (templates with exactly one `{}` for the
class name and no other `{...}` field; literal braces as `{{` and `}}`),
`tokenizer` (a SentencePiece model path or `bundled:<name>`) and
`context_length`; the last two default to the `tokenize` op of `data.train.pp`
and the text tower's context length.
"""
from __future__ import annotations

import csv
import inspect
import os
import string
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigvis import sharding
from bigvis.config import check_known
from bigvis.errors import UserError
from bigvis.evaluators import reports
from bigvis.evaluators.common import EVAL_KEYS, ZEROSHOT_KEYS, batched_outputs, eval_batch_size, eval_split

KEYS = EVAL_KEYS + ZEROSHOT_KEYS

# The 7 of CLIP's 80 ImageNet templates its authors found to ensemble best (openai/CLIP,
# "Prompt Engineering for ImageNet"): used when a config names none.
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                     "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
TOP_K = 5


# A --labels value without a comma that ends so is taken for a file name when it is no file.
LABEL_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".list", ".names")


def class_names_from(value: Any, where: str, min_names: int = 1) -> list[str]:
  """Class names from a list, a comma-separated string (CSV quoting: `"a, b",c`), or a file with one
  name per line; at least `min_names` of them (2 to classify: one class always gets probability 1)."""
  if isinstance(value, str):
    names = _names_in_file(value, where) if os.path.isfile(value) else _split_names(value, where)
  elif isinstance(value, (list, tuple)):
    names = [str(v) for v in value]
  else:
    raise UserError(f"{where} must be a list of class names, a comma-separated string or a file, "
                    f"got {type(value).__name__}.")
  names = [n.strip() for n in names if n and n.strip()]
  if isinstance(value, str) and len(names) < 2 and _looks_like_a_file(value):
    raise UserError(f"{where} '{value}' is not a file; give a file of class names, one per line, or "
                    "comma-separated names.")
  if len(names) < min_names:
    raise UserError(f"{where} names {len(names)} class(es) but needs at least {min_names}"
                    + (" (zero-shot classification chooses among classes)." if min_names > 1 else "."))
  seen = set()
  for n in names:
    if n in seen:
      raise UserError(f"{where} lists the class name '{n}' twice.")
    seen.add(n)
  return names


def _names_in_file(path: str, where: str) -> list[str]:
  """The lines of a UTF-8 class-name file."""
  try:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f]
  except UnicodeDecodeError as e:
    raise UserError(f"{where} file '{path}' is not UTF-8 text (byte {e.start}).") from None


def _split_names(value: str, where: str) -> list[str]:
  """Comma-separated names, read as one CSV row so that a quoted name may hold commas."""
  try:
    return next(csv.reader([value], skipinitialspace=True), [])
  except csv.Error as e:
    raise UserError(f"{where} '{value}' is not a valid comma-separated list ({e}).") from None


def _looks_like_a_file(value: str) -> bool:
  """A single name with a path separator or a text-file suffix: meant as a file of class names."""
  return "," not in value and ("/" in value or os.sep in value
                               or value.strip().lower().endswith(LABEL_FILE_SUFFIXES))


def templates_from(value: Any, where: str) -> list[str]:
  """Prompt templates, each with exactly one `{}` where the class name goes."""
  if value is None or value == "" or value == ():
    return list(DEFAULT_TEMPLATES)
  templates = [value] if isinstance(value, str) else [str(v) for v in value]
  for t in templates:
    check_template(t, where)
  return templates


def check_template(template: str, where: str) -> None:
  """One `{}` and no other replacement field (`{style}`, `{0}`, `{:>9}`, a lone brace), which
  `str.format` would fail on or fill with something else; literal braces are written `{{` and `}}`."""
  try:
    fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
              if name is not None]
  except ValueError as e:
    raise UserError(f"{where} template '{template}' is not a valid template ({e}); write a literal brace "
                    "as '{{' or '}}'.") from None
  if fields != [("", "", None)]:
    raise UserError(f"{where} template '{template}' must contain exactly one '{{}}' for the class name "
                    "and no other '{...}' field; write a literal brace as '{{' or '}}'.")


def pp_tokenize_args(pp: str, where: str) -> dict:
  """The arguments of the first `tokenize` op in a pp string (empty when there is none)."""
  from data_pipelines import preprocess
  from data_pipelines import tokenizer as tokenizer_lib
  for part in filter(None, (p.strip() for p in (pp or "").split("|"))):
    name, args, kwargs = preprocess.parse_op(part)  # a malformed op is a one-line error naming it
    if name == "tokenize":
      try:
        return dict(inspect.signature(tokenizer_lib.tokenize).bind(*args, **kwargs).arguments)
      except TypeError:
        raise UserError(f"cannot read the tokenizer from {where} op '{part}'.") from None
  return {}


def train_tokenize_args(config: ml_collections.ConfigDict | None) -> dict:
  """The arguments of the `tokenize` op in `data.train.pp` (empty when there is none)."""
  pp = ""
  if config is not None and "data" in config and "train" in config.data:
    pp = config.data.train.get("pp", "") or ""
  return pp_tokenize_args(pp, "data.train.pp")


def _eval_tokenizers(section: Any, where: str) -> Iterator[tuple[str, str, bool | None]]:
  """(where, model, lower) for each tokenizer the entries of `evals` or `reports` name: an entry's
  `tokenizer` key and every `tokenize` op in a `pp` under it (`lower` None where training's applies)."""
  from data_pipelines.sources import data_sections
  for name, entry in section.items():
    if entry.get("tokenizer"):
      yield f"{where}.{name}.tokenizer", entry["tokenizer"], None
    for at, data in data_sections(entry, f"{where}.{name}"):
      args = pp_tokenize_args(data.get("pp") or "", f"{at}.pp")
      if args.get("model"):
        yield f"{at}.pp", args["model"], bool(args.get("lower", True))


def check_same_tokenizer(config: ml_collections.ConfigDict) -> None:
  """Every tokenizer an eval or report names must be the one `data.train.pp` tokenizes with: a
  text tower reads another model's ids as other words, and its zero-shot scores would be noise."""
  import tensorflow as tf
  from data_pipelines.tokenizer import resolve_model
  train_args = train_tokenize_args(config)
  train_model = train_args.get("model")
  if not train_model:  # nothing trained on text here (or nothing to compare with)
    return
  train_lower = bool(train_args.get("lower", True))
  contents: dict[str, bytes] = {}

  def content(model: str) -> bytes:
    if model not in contents:
      with tf.io.gfile.GFile(resolve_model(model), "rb") as f:
        contents[model] = f.read()
    return contents[model]

  for section in ("evals", "reports"):
    for where, model, lower in _eval_tokenizers(config.get(section) or {}, section):
      if model != train_model and content(model) != content(train_model):
        raise UserError(f"{where} tokenizes with {model} but data.train.pp with {train_model}; the text "
                        "tower learned the training tokenizer's ids, so use the same model for both.")
      if lower is not None and lower != train_lower:
        raise UserError(f"{where} tokenizes with lower={lower} but data.train.pp with lower={train_lower}; "
                        "use the same for both.")


def text_tokenizer(cfg: ml_collections.ConfigDict | dict, config: ml_collections.ConfigDict | None,
                   where: str):
  """The Python tokenizer matching training: explicit eval keys first, then data.train.pp's op."""
  from data_pipelines.tokenizer import Tokenizer
  train_args = train_tokenize_args(config)
  model_path = cfg.get("tokenizer") or train_args.get("model")
  if not model_path:
    raise UserError(f"{where}.tokenizer is not set and data.train.pp has no tokenize op to take it from; "
                    "set it to a SentencePiece model path or 'bundled:digits'.")
  text_cfg = config.model.get("text", {}) if config is not None and "model" in config else {}
  model_len = int(text_cfg.get("context_length", 0) or 0)
  length = int(cfg.get("context_length") or train_args.get("max_len") or model_len or 77)
  if model_len and length > model_len:
    raise UserError(f"{where}.context_length={length} exceeds the text tower's context length {model_len}.")
  tokenizer = Tokenizer(model_path, length, bool(train_args.get("lower", True)))
  check_tokenizer_fits(tokenizer, config, where)
  return tokenizer


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Zero-shot accuracy needs every label to name one of the class names: a one-sentence error
  naming the first that does not (a -1 for a missing label included)."""
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if len(bad):
    raise UserError(f"{where} has label {int(bad[0])}, outside the {num_classes} class names.")


def check_tokenizer_fits(tokenizer, config: ml_collections.ConfigDict | None, where: str) -> None:
  """A one-sentence error where the tokenizer has more pieces than the text tower's embedding has
  rows: their ids would index past it (NaN losses, read as a learning-rate problem)."""
  from bigvis.models.text import TextTransformer
  if config is None or "model" not in config or config.model.get("name") != "clip":
    return
  rows = int(config.model.get("text", {}).get("vocab_size") or TextTransformer.vocab_size)
  if tokenizer.vocab_size > rows:
    raise UserError(f"{where}'s tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
                    f"model.text.vocab_size is {rows}; set model.text.vocab_size to at least {tokenizer.vocab_size}.")


def ensemble(ztxt: np.ndarray) -> np.ndarray:
  """[classes, templates, dim] L2-normalised prompt embeddings -> [classes, dim] renormalised means."""
  mean = np.mean(ztxt.astype(np.float64), axis=1)
  return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _rows(tokens: np.ndarray, global_batch: int) -> Iterator[dict]:
  """This process's slice of fixed-size global batches of token rows, with their indices and a mask."""
  n, pc, pi = len(tokens), jax.process_count(), jax.process_index()
  local = global_batch // pc
  for start in range(0, n, global_batch):
    lo = start + pi * local
    idx = np.arange(lo, lo + local)
    valid = idx < n
    rows = np.zeros((local, tokens.shape[1]), tokens.dtype)
    rows[valid] = tokens[idx[valid]]
    yield {"tokens": rows, "index": np.where(valid, idx, 0).astype(np.int32), "_mask": valid}


def embed_texts(embed_fn, params: Any, tokens: np.ndarray, global_batch: int, mesh) -> np.ndarray:
  """Token rows -> [n, dim] embeddings, computed as sharded global batches on the mesh."""
  out = batched_outputs(embed_fn, params, _rows(tokens, global_batch), mesh)
  z = np.zeros((len(tokens), out["z"].shape[-1]), np.float32)
  z[out["index"]] = out["z"]  # gathered order follows the mesh, so place rows by index
  return z


def text_embedder(model):
  """Jitted (params, {tokens, index}) -> {z: the text tower's embeddings, index}: what `embed_texts` maps."""
  @jax.jit
  def embed_text(params, batch):
    _, ztxt, _ = model.apply({"params": params}, None, batch["tokens"], train=False)
    return {"z": ztxt, "index": batch["index"]}
  return embed_text


class Evaluator:
  """Top-1/top-5 zero-shot accuracy of a CLIP model on a labelled image split."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, name: str, model, mesh, config=None, **_):
    where = f"evals.{name}"
    check_known(cfg, KEYS, where)
    if "data" not in cfg:
      raise UserError(f"{where}.data is not set; give the labelled image split to classify.")
    self.cfg, self.name, self.mesh = cfg, name, mesh
    self._metrics: dict[str, float] | None = None
    self.class_names = class_names_from(cfg.get("class_names"), f"{where}.class_names", min_names=2)
    self.templates = templates_from(cfg.get("prompts"), f"{where}.prompts")
    tokenizer = text_tokenizer(cfg, config, where)
    self.tokens = tokenizer.encode(prompt_texts(self.class_names, self.templates))
    self._split = eval_split(cfg, mesh, f"{where}.data")
    num_classes, k = len(self.class_names), min(TOP_K, len(self.class_names))

    @jax.jit
    def classify(params, batch, classifier, per_template):
      if "label" in batch:
        labels = batch["label"].astype(jnp.int32)
      elif "labels" in batch and batch["labels"].ndim == 2 and batch["labels"].shape[1] == num_classes:
        labels = jnp.argmax(batch["labels"], axis=-1).astype(jnp.int32)
      else:
        raise UserError(f"{where}.data has no integer 'label' feature nor one-hot 'labels' of "
                        f"{num_classes} classes; have {sorted(batch)}.")
      zimg, _, _ = model.apply({"params": params}, batch["image"], None, train=False)
      _, top = jax.lax.top_k(zimg @ classifier.T, k)
      per = jnp.argmax(jnp.einsum("bd,tcd->btc", zimg, per_template), axis=-1)
      return {"top": top.astype(jnp.int32), "per_template": per.astype(jnp.int32), "label": labels}

    self._embed_text, self._classify = text_embedder(model), classify

  def run(self, params) -> dict[str, float]:
    """Embeds the prompts with the current params, then classifies every image of the split."""
    batch = eval_batch_size(self.cfg, self.mesh)
    c, t = len(self.class_names), len(self.templates)
    ztxt = embed_texts(self._embed_text, params, self.tokens, batch, self.mesh).reshape(c, t, -1)
    replicated = sharding.replicated(self.mesh)
    classifier = jax.device_put(ensemble(ztxt), replicated)
    per_template = jax.device_put(np.ascontiguousarray(ztxt.transpose(1, 0, 2)), replicated)
    out = batched_outputs(lambda p, b: self._classify(p, b, classifier, per_template), params,
                          self._split.batches(), self.mesh)
    if not out:
      raise UserError(f"evals.{self.name}.data yielded no examples.")
    labels = out["label"]
    check_labels(labels, c, f"evals.{self.name}.data")
    hits = out["top"] == labels[:, None]
    metrics = {"top1": float(np.mean(hits[:, 0])), "top5": float(np.mean(np.any(hits[:, :TOP_K], axis=1))),
               "num_examples": int(len(labels))}
    if t > 1:
      for i in range(t):
        metrics[f"top1_template{i}"] = float(np.mean(out["per_template"][:, i] == labels))
    self._metrics = metrics
    return metrics

  def report(self) -> reports.Report:
    """Top-1 of each prompt template alone and of their ensemble, from the last `run`."""
    if self._metrics is None:
      raise RuntimeError("report() needs run() first.")
    return reports.zeroshot_report(self.name, self._metrics, self.templates, self.class_names)


def zeroshot_logits(zimg: np.ndarray, ztxt: np.ndarray, scale: float = 1.0) -> np.ndarray:
  """[n, dim] image embeddings x [classes, templates, dim] prompt embeddings -> [n, classes] logits."""
  return scale * (np.asarray(zimg, np.float32) @ ensemble(np.asarray(ztxt)).T)


def prompt_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major list of every template filled with every class name."""
  return [t.format(c) for c in class_names for t in templates]
