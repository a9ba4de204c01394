"""Experiment loading, typed overrides, and one-line errors for the mistakes users make."""
import jax
import pytest

from bigvis import cli, config as config_lib
from bigvis.errors import UserError


def test_loads_experiment_and_applies_typed_overrides():
  c = config_lib.load("experiments/vit_ti_digits.py", ["batch_size=32", "optim.lr=0.01", "model.variant=Ti/4",
                                                       "data.train.cache=False"])
  assert c.batch_size == 32 and isinstance(c.batch_size, int)
  assert c.optim.lr == 0.01 and c.model.variant == "Ti/4" and c.data.train.cache is False
  assert config_lib.load("vit_ti_digits").experiment == "vit_ti_digits"  # bare names work too


def test_optional_flags_take_true_and_false_in_any_case():
  """`model.fused_qkv` defaults to None (decided per block): 'false' must be False, not a string
  (truthy), whatever its case; None sets it back."""
  for text, value in (("false", False), ("TRUE", True), ("False", False), ("None", None)):
    assert config_lib.load("vit_ti_digits", [f"model.fused_qkv={text}"]).model.fused_qkv is value, text


def test_int_given_to_float_key_is_accepted_as_float():
  assert config_lib.load("vit_ti_digits", ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("batch_sise=8", "closest valid key is 'batch_size'"),
    ("optim.lrr=0.1", "closest valid key is 'optim.lr'"),
    ("optim.learning_rate=0.1", "closest valid key is 'optim.lr'"),  # by meaning; spelling says min_lr_ratio
    ("steps=10", "closest valid key is 'total_steps'"),
    ("model.nonsense.x=1", "unknown config key 'model.nonsense.x'"),
])
def test_unknown_key_names_the_closest(override, fragment):
  with pytest.raises(UserError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
    config_lib.load("vit_ti_digits", [override])


def test_wrong_type_is_rejected():
  with pytest.raises(UserError, match="expected an int like 64"):
    config_lib.load("vit_ti_digits", ["batch_size=64x"])


def test_missing_experiment_suggests_a_name():
  with pytest.raises(UserError, match="vit_ti_digits"):
    config_lib.load("experiments/vit_ti_digit.py")


def _cli_error(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  return err


def test_cli_errors_are_one_line(capsys, tmp_path):
  w = str(tmp_path / "w")
  assert "batch_sise" in _cli_error(capsys, ["train", "--config", "experiments/vit_ti_digits.py", "--workdir", w,
                                             "--set", "batch_sise=8"])
  assert "does not exist" in _cli_error(capsys, ["train", "--config", "experiments/nope.py", "--workdir", w])
  # 8 CPU devices (conftest): a batch of 60 does not split over data=8.
  assert "not divisible" in _cli_error(capsys, ["train", "--config", "vit_ti_digits", "--workdir", w,
                                                "--set", "batch_size=60"])
  assert "multiply" in _cli_error(capsys, ["train", "--config", "vit_ti_digits", "--workdir", w,
                                           "--set", "mesh.data=3", "--set", "mesh.fsdp=2"])
  assert "optim.nme" in _cli_error(capsys, ["params", "--config", "vit_ti_digits", "--set", "optim.nme=sgd"])


def test_component_rejects_keys_it_does_not_read():
  with pytest.raises(UserError, match="model.pol_type.*'model.pool_type'"):
    from bigvis.models import build_model
    build_model({"name": "vit", "pol_type": "gap"})


def test_a_misspelt_nonfinite_mode_is_refused():
  """'Skip' matched neither 'stop' nor 'skip' where the loop reads it: a run went on through NaNs and
  checkpointed them. Now it is a one-sentence error naming the key."""
  with pytest.raises(UserError, match="config key 'nonfinite' is 'Skip', not one of stop, skip"):
    config_lib.load("vit_ti_digits", ["nonfinite=Skip"])
  assert config_lib.load("vit_ti_digits", ["nonfinite=skip"]).nonfinite == "skip"


def test_an_eval_key_no_evaluator_reads_is_refused():
  """`pp_txt` was accepted by every evaluator and never read (prompts are tokenized by `tokenizer` and
  `context_length`); like any key nothing reads, it is now an error naming it."""
  import ml_collections
  from bigvis.evaluators import zeroshot
  cfg = ml_collections.ConfigDict(dict(type="zeroshot", data={}, pp_txt="tokenize(8)"))
  with pytest.raises(UserError, match="unknown config key 'evals.zs.pp_txt'"):
    zeroshot.Evaluator(cfg, name="zs", model=None, mesh=None)


def test_a_tokenizer_larger_than_the_text_embedding_is_refused():
  """clip_ti_digits' tokenizer has more pieces than a 40-row text embedding: its ids would index past
  it and the loss turn NaN at the first step ('lower optim.lr'); now the run stops before, naming
  both sizes and the key to change."""
  from bigvis import train
  from bigvis.evaluators import zeroshot
  config = config_lib.load("clip_ti_digits", ["model.text.vocab_size=40"])
  with pytest.raises(UserError, match="data.train.pp's tokenizer .* pieces but model.text.vocab_size is 40"):
    train.check_train_tokenizer(config)
  train.check_train_tokenizer(config_lib.load("clip_ti_digits"))  # the experiment as written fits
  with pytest.raises(UserError, match="evals.zs's tokenizer .* but model.text.vocab_size is 40"):
    zeroshot.text_tokenizer({"tokenizer": "bundled:digits"}, config, "evals.zs")


def test_evals_must_tokenize_with_the_training_tokenizer(tmp_path):
  """A run trained with its own tokenizer (`--set data.train.pp=…`) whose evals still name the bundled one
  would score zero-shot and retrieval on ids the text tower never learned: the run stops first, naming
  the entry. The same model at another path passes; the experiment's argument sets it everywhere."""
  import shutil
  from bigvis import train
  from bigvis.evaluators import zeroshot
  from data_pipelines import tokenizer as tok
  own = tok.train_tokenizer(["a photo of the number %d written by hand" % i for i in range(200)],
                            str(tmp_path / "own"), vocab_size=60)
  base = config_lib.load("clip_ti_digits")
  pp = base.data.train.pp.replace("bundled:digits", own)
  with pytest.raises(UserError, match=r"evals.retrieval.data.pp tokenizes with bundled:digits but "
                                      r"data.train.pp with .*own.model"):
    train.check_train_tokenizer(config_lib.load("clip_ti_digits", [f'data.train.pp="{pp}"']))
  # Only the zero-shot eval's key left on the bundled model.
  retrieval_pp = base.evals.retrieval.data.pp.replace("bundled:digits", own)
  config = config_lib.load("clip_ti_digits", [f'data.train.pp="{pp}"', f'evals.retrieval.data.pp="{retrieval_pp}"'])
  with pytest.raises(UserError, match=r"evals.zeroshot.tokenizer tokenizes with bundled:digits"):
    zeroshot.check_same_tokenizer(config)
  # A different `lower` reads other ids too.
  lower_pp = base.evals.retrieval.data.pp.replace("model='bundled:digits'", "model='bundled:digits', lower=False")
  with pytest.raises(UserError, match=r"evals.retrieval.data.pp tokenizes with lower=False"):
    zeroshot.check_same_tokenizer(config_lib.load("clip_ti_digits", [f'evals.retrieval.data.pp="{lower_pp}"']))
  # A copy of the bundled model under another name is the same tokenizer.
  copy = str(tmp_path / "copy.model")
  shutil.copy(tok.resolve_model("bundled:digits"), copy)
  zeroshot.check_same_tokenizer(config_lib.load("clip_ti_digits", [f"evals.zeroshot.tokenizer='{copy}'"]))
  # The experiment's argument puts the model in training and in every eval; ViT runs have nothing to check.
  mine = config_lib.load(f"clip_ti_digits:tokenizer={own}")
  zeroshot.check_same_tokenizer(mine)
  assert own in mine.data.train.pp and own in mine.evals.retrieval.data.pp and mine.evals.zeroshot.tokenizer == own
  zeroshot.check_same_tokenizer(config_lib.load("vit_ti_digits"))
  with pytest.raises(UserError, match="is not tokenizer=PATH"):
    config_lib.load("clip_ti_digits:vocab=64")
  # The tokenize op is read as the pp parser reads it: by its name, its arguments bound as the op takes them.
  with pytest.raises(UserError, match="cannot read the tokenizer from w op 'tokenize\\(16, modle='x'\\)'"):
    zeroshot.pp_tokenize_args("decode|tokenize(16, modle='x')", "w")
  assert zeroshot.pp_tokenize_args("decode|tokenize(16, model='x', lower=False)", "w") == {
      "max_len": 16, "model": "x", "lower": False}


def test_set_adds_a_key_the_file_left_out_where_its_reader_takes_it():
  """`evals.<name>.every_steps` and `optim.momentum` are read when present, but an experiment that left
  them out made `--set` call them unknown (with a closest key that did not help). Keys the section's
  reader takes can now be added; others stay errors, and the closest key may be such a key."""
  config = config_lib.load("vit_ti_digits", ["evals.test.every_steps=100", "optim.name=sgd", "optim.momentum=0.8",
                                             "evals.test.data.cache=True"])
  assert config.evals.test.every_steps == 100 and config.optim.momentum == 0.8
  with pytest.raises(UserError, match="'evals.test.every_step'; the closest valid key is 'evals.test.every_steps'"):
    config_lib.load("vit_ti_digits", ["evals.test.every_step=100"])
  # A classifier reads no prompts; zero-shot does.
  with pytest.raises(UserError, match="unknown config key 'evals.test.prompts'"):
    config_lib.load("vit_ti_digits", ["evals.test.prompts=['a {}']"])
  assert config_lib.load("clip_ti_digits", ["evals.retrieval.every_steps=5"]).evals.retrieval.every_steps == 5
  # Reports run only under `bigvis eval`: no every_steps, from --set or from the file.
  with pytest.raises(UserError, match="unknown config key 'reports.linear_probe.every_steps'"):
    config_lib.load("clip_ti_digits", ["reports.linear_probe.every_steps=5"])
  from bigvis import evaluators
  reports = config_lib.load("clip_ti_digits").reports
  reports.linear_probe.every_steps = 5
  with pytest.raises(UserError, match="reports.linear_probe.every_steps is set, but reports run only with"):
    evaluators.check_types(reports, "reports")


def test_evaluators_refuse_keys_only_other_evaluators_read():
  """Classification and retrieval accepted `prompts`, `class_names`, `tokenizer` and `context_length`, which
  only zero-shot classifiers read, and ignored them."""
  import ml_collections
  from bigvis.evaluators import classification, retrieval
  for module in (classification, retrieval):
    cfg = ml_collections.ConfigDict(dict(type="x", data={}, prompts=["a {}"]))
    with pytest.raises(UserError, match="unknown config key 'evals.e.prompts'"):
      module.Evaluator(cfg, name="e", model=None, mesh=None)


def test_momentum_is_read_only_by_sgd():
  from bigvis import optim
  config = config_lib.load("vit_ti_digits", ["optim.momentum=0.8"])
  with pytest.raises(UserError, match="optim.momentum is set, but only optim.name='sgd' reads it"):
    optim.make_optimizer(config.optim, 10, {"w": jax.numpy.zeros(3)})
  config = config_lib.load("vit_ti_digits", ["optim.name=sgd", "optim.momentum=0.8"])
  optim.make_optimizer(config.optim, 10, {"w": jax.numpy.zeros(3)})


def test_commands_start_without_tensorflows_start_up_notes():
  """TensorFlow's C++ start-up wrote a dozen lines (oneDNN, the CUDA probe, absl's preamble) before every
  command's first, whatever TF_CPP_MIN_LOG_LEVEL said; they are held back, and any other line is kept."""
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  done = subprocess.run([sys.executable, "-m", "bigvis.cli", "params", "--config", "vit_ti_digits"], cwd=repo,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "total" in done.stdout
  for note in cli.START_UP_NOISE:
    assert note not in done.stderr
  kept = "W0000 00:00:17.5 something.cc:1] a warning worth reading\n"
  noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
           "I0000 00:00:1795873712.4 port.cc:153] oneDNN custom operations are on. You may see ...\n")
  assert cli.without_start_up_noise(noise + kept + noise) == kept


def test_vit_b16_i1k_resolution_argument_sets_the_model_and_every_crop():
  from bigvis.errors import UserError
  c = config_lib.load("vit_b16_i1k:res=384", [])
  assert c.model.image_size == 384
  assert c.data.train.pp.startswith("decode_jpeg_and_inception_crop(384)|")
  for name in ("val", "test"):
    assert "|resize_small(438)|central_crop(384)|" in c.evals[name].data.pp
  assert config_lib.load("vit_b16_i1k", []).model.image_size == 224
  with pytest.raises(UserError, match="experiment argument 'size=384' is not res=N"):
    config_lib.load("vit_b16_i1k:size=384", [])
