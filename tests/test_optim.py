"""The optimizer's weight-decay mask."""
import flax.linen as nn
import jax
from flax import traverse_util

from bigvis.models import build_model, model_config
from bigvis.optim import decay_mask


def test_weight_decay_reaches_weight_matrices_only():
  """Decayed: kernels and embeddings. Not decayed: 1-D gains and biases, attention's [heads,
  head_dim] query and value biases (2-D, but biases), nor what `no_decay` names."""
  cfg = model_config("vit", variant="mu/4", num_classes=3)
  params = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 16, 16, 3), "float32"))["params"])
  flat = traverse_util.flatten_dict(params)
  mask = traverse_util.flatten_dict(decay_mask(params, ""))
  attention_biases = [k for k in flat if k[-1] == "bias" and flat[k].ndim == 2]
  assert attention_biases, "the test model has no 2-D biases"
  for k, v in flat.items():
    assert mask[k] == (v.ndim > 1 and k[-1] != "bias"), ("/".join(k), v.shape)
  assert any(mask.values())
  assert mask[("encoder", "block00", "block", "attn", "query", "kernel")]
  named = traverse_util.flatten_dict(decay_mask(params, r"(^|/)(cls|pos_embedding)$"))
  assert not named[("cls",)] and not named[("pos_embedding",)] and mask[("cls",)]
