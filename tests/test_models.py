"""ViT variants, pooling, position embeddings, scan/remat and padded sequences."""
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigvis import params as params_lib
from bigvis.errors import UserError
from bigvis.models import build_model
from bigvis.models.vit import parse_variant, resize_posemb, sincos2d


def _count(model_cfg):
  return sum(params_lib.count_by_module(params_lib.abstract_params(ml_collections.ConfigDict(model_cfg))).values())


def _jit_value_and_grad(loss, cfg):
  """`jax.value_and_grad(loss)(params, cfg)` compiled: interpreted kernels run ~3x faster jitted than eagerly."""
  return jax.jit(lambda params: jax.value_and_grad(loss)(params, cfg))


@pytest.mark.parametrize("variant, image_size, expected", [
    ("B/16", 224, 86.6e6), ("L/16", 224, 304.3e6), ("H/14", 224, 632.0e6)])
def test_paper_parameter_counts_with_1000_class_head(variant, image_size, expected):
  n = _count(dict(name="vit", variant=variant, num_classes=1000, image_size=image_size))
  assert abs(n - expected) / expected < 0.005


def test_params_table_ends_with_total():
  cfg = ml_collections.ConfigDict(dict(name="vit", variant="B/16", num_classes=1000, image_size=224))
  table = params_lib.format_table(cfg)
  assert table.splitlines()[-1] == f"total_params={_count(cfg.to_dict())}"


def test_variant_parsing():
  assert parse_variant("L/14") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)
  with pytest.raises(UserError):
    parse_variant("Q/16")


@pytest.mark.parametrize("pool", ["tok", "gap", "map"])
def test_pooling_shapes(pool):
  model = build_model(dict(name="vit", variant="mu/4", num_classes=7, pool_type=pool))
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  logits, aux = model.apply(variables, x)
  assert logits.shape == (2, 7) and aux["pre_logits"].shape == (2, 128)


def test_scan_and_remat_match_the_unrolled_model():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = build_model(dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False))
  scanned = build_model(dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False,
                             scan=True, remat_policy="full"))
  p = nn.meta.unbox(plain.init(jax.random.key(0), x)["params"])
  # Stack the unrolled blocks into the scanned layout: same function, same numbers.
  blocks = [p["encoder"][f"block{i:02d}"]["block"] for i in range(4)]
  sp = dict(p, encoder={"blocks": {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}})
  a, _ = plain.apply({"params": p}, x)
  b, _ = scanned.apply({"params": sp}, x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_padded_sequence_equals_unpadded(pool):
  """Padding tokens to a kernel-friendly length (masked) must not change the output."""
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  base = dict(name="vit", variant="mu/4", num_classes=3, pool_type=pool, head_zero_init=False)
  p = build_model(base).init(jax.random.key(0), x)["params"]
  a, _ = build_model(base).apply({"params": p}, x)
  b, _ = build_model(dict(base, seq_pad_multiple=64)).apply({"params": p}, x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_text_equals_unpadded(causal):
  """The text tower padded 13 -> 16 tokens (cuDNN-friendly) gives the unpadded features and gradients."""
  tokens = jax.random.randint(jax.random.key(1), (3, 13), 1, 50).at[0, 9:].set(0)
  base = dict(name="text", variant="mu", vocab_size=50, context_length=13, num_classes=8, causal=causal)
  p = build_model(base).init(jax.random.key(0), tokens)["params"]

  def loss(params, cfg):
    return jnp.sum(build_model(cfg).apply({"params": params}, tokens)[0] ** 2)
  a, ga = jax.value_and_grad(loss)(p, base)
  b, gb = jax.value_and_grad(loss)(p, dict(base, seq_pad_multiple=8))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4), ga, gb)


@pytest.mark.parametrize("name", ["vit", "text"])
def test_fused_qkv_projection_equals_separate_projections(name):
  """One GEMM over the stacked query/key/value kernels: same parameter tree, outputs and gradients."""
  if name == "vit":
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    base = dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False)
  else:
    x = jax.random.randint(jax.random.key(1), (3, 13), 1, 50)
    base = dict(name="text", variant="mu", vocab_size=50, context_length=13, num_classes=8)
  p = nn.unbox(build_model(base).init(jax.random.key(0), x)["params"])
  p_separate = nn.unbox(build_model(dict(base, fused_qkv=False)).init(jax.random.key(0), x)["params"])
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, p_separate)
  jax.tree.map(np.testing.assert_array_equal, p, p_separate)

  def loss(params, cfg):
    return jnp.sum(build_model(cfg).apply({"params": params}, x)[0] ** 2)
  a, ga = jax.value_and_grad(loss)(p, base)
  b, gb = jax.value_and_grad(loss)(p, dict(base, fused_qkv=False))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert float(jnp.abs(ga["encoder"]["block00"]["block"]["attn"]["key"]["kernel"]).max()) > 0
  # float32 sums in another order: tolerance relative to the gradients' scale (the key bias's is ~0)
  scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(gb))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6 * scale), ga, gb)


def _projection_bias_shapes(jaxpr) -> list[tuple[int, int]]:
  """(kernel rank, non-unit dims of the bias as it enters the add or its broadcast) of every
  `dot_general + bias` in `jaxpr` and the jaxprs nested in it."""
  from jax.extend import core as jex_core
  found, producer = [], {}
  for eqn in jaxpr.eqns:
    for sub in eqn.params.values():  # nested jaxprs (jit, checkpoint, custom_jvp) hold layers too
      sub = getattr(sub, "jaxpr", sub)
      if isinstance(sub, jex_core.Jaxpr):
        found += _projection_bias_shapes(sub)
    for v in eqn.outvars:
      producer[v] = eqn
    if eqn.primitive.name != "add":
      continue
    ins = [None if isinstance(v, jex_core.Literal) else producer.get(v) for v in eqn.invars]
    dots = [i for i, e in enumerate(ins) if e is not None and e.primitive.name == "dot_general"
            and not e.params["dimension_numbers"][1][0]  # no batch dims: a projection, not attention
            and e.outvars[0].aval.ndim > 1]  # of activations, not Attention's value bias folded: a vector
    if len(dots) != 1:
      continue
    bias, bias_eqn = eqn.invars[1 - dots[0]], ins[1 - dots[0]]
    if bias_eqn is not None and bias_eqn.primitive.name == "broadcast_in_dim":
      bias = bias_eqn.invars[0]
    found.append((ins[dots[0]].invars[1].aval.ndim, sum(d != 1 for d in bias.aval.shape)))
  return found


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_projections_are_2d_gemms_with_a_1d_bias(fused_qkv):
  """Every dense projection that adds its bias is a 2-D GEMM plus a bias with one non-unit dim: XLA
  can hand such a bias to cuBLASLt's BIAS epilogue, where an N-D one (the [3, heads, kv]
  query/key/value bias) is broadcast to the whole output and added through the GEMM's C operand (an
  extra write and read of it per block). The key and value GEMMs add none (`Attention`); the fused
  GEMM's bias is the query's with zeros for key and value."""
  # recompute_gelu=False: the recomputing MLP adds its first bias inside bias_gelu_recomputed.
  model = build_model(dict(name="vit", variant="mu/4", num_classes=3, fused_qkv=fused_qkv, recompute_gelu=False))
  x = jnp.ones((2, 16, 16, 3))
  params = model.init(jax.random.key(0), x)
  found = _projection_bias_shapes(jax.make_jaxpr(lambda p: model.apply(p, x))(params).jaxpr)
  per_block = 4  # the query's (fused: zeros for key and value), the output's, the MLP's two
  assert len(found) == parse_variant("mu/4")["depth"] * per_block + 2, found  # + patch embedding, head
  assert set(found) == {(2, 1)}, found


class _FakeDevice:
  def __init__(self, platform, kind, capability=None):
    self.platform, self.device_kind = platform, kind
    if capability is not None:
      self.compute_capability = capability


@pytest.mark.parametrize("device, dtype, head_dim, expected", [
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "bfloat16", 64, "cudnn"),
    (_FakeDevice("gpu", "NVIDIA A100-SXM4-40GB", "8.0"), "float16", 128, "cudnn"),
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "float32", 64, "xla"),   # cuDNN refuses fp32
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "bfloat16", 36, "xla"),  # head size not /8
    (_FakeDevice("gpu", "Tesla V100-SXM2-16GB", "7.0"), "bfloat16", 64, "xla"),   # pre-Ampere
    (_FakeDevice("gpu", "AMD Instinct MI250X", "gfx90a"), "bfloat16", 64, "xla"),
    (_FakeDevice("tpu", "TPU v5p"), "bfloat16", 64, "xla"),
    (_FakeDevice("cpu", "cpu"), "bfloat16", 64, "xla"),
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "bfloat16", 256, "xla"),  # head size over 128
    (_FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16", 64, "cudnn"),  # no compute_capability: the name
    (_FakeDevice("gpu", "AMD Instinct MI250X"), "bfloat16", 64, "xla"),
])
def test_attention_auto_resolution(monkeypatch, device, dtype, head_dim, expected):
  from bigvis.models.layers import resolve_attention_impl
  monkeypatch.setattr(jax, "devices", lambda *a: [device])
  assert resolve_attention_impl("auto", dtype, head_dim) == expected
  assert resolve_attention_impl("auto", dtype, head_dim, length=197) == expected  # past one cuDNN tile
  assert resolve_attention_impl("xla", dtype, head_dim) == "xla"  # explicit choices stand


@pytest.mark.parametrize("length, head_dim, dtype, expected", [
    (77, 64, "bfloat16", "pallas"), (128, 64, "float16", "pallas"), (129, 64, "bfloat16", "cudnn"),
    (197, 64, "bfloat16", "cudnn"), (77, 80, "bfloat16", "cudnn"), (77, 36, "bfloat16", "xla"),
    (77, 64, "float32", "xla")])
def test_auto_attention_takes_the_kernels_for_sequences_within_one_cudnn_tile(monkeypatch, length, head_dim, dtype,
                                                                              expected):
  """On a capable NVIDIA GPU `auto` gives sequences of up to 128 tokens bigvis's kernels (CLIP's text
  tower: 73.0 ms a step against cuDNN's 77.1 on an H200), longer ones cuDNN (ViT-B/16's 197: 59.5
  against the kernels' 61.4), head sizes the kernels cannot take (ViT-H's 80) cuDNN, float32 XLA."""
  from bigvis.models.layers import resolve_attention_impl
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("gpu", "NVIDIA H200", "9.0")])
  assert resolve_attention_impl("auto", dtype, head_dim, length=length) == expected
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("tpu", "TPU v5p")])
  assert resolve_attention_impl("auto", dtype, head_dim, length=length) == "xla"


def test_cudnn_padding_rule_and_auto_padded_vit_equals_plain(monkeypatch):
  """Where `auto` picks cuDNN (a capable GPU, bf16, head size 32), ViT's odd token count (here 17)
  is padded to 24 and masked; the output equals the plain model's (cuDNN is stood in for by XLA's
  kernel, which takes the same arguments, so this runs on the CPU)."""
  from bigvis.models import layers
  assert layers.attention_pad_multiple("cudnn", 197) == 8 and layers.attention_pad_multiple("cudnn", 77) == 8
  assert layers.attention_pad_multiple("cudnn", 196) == 0 and layers.attention_pad_multiple("xla", 197) == 0
  assert layers.attention_pad_multiple("xla", 197, requested=64) == 64
  x, mask = layers.pad_for_attention(jnp.ones((2, 197, 4)), "cudnn")
  assert x.shape == (2, 200, 4) and mask.shape == (2, 200) and int(mask[0].sum()) == 197

  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  cfg = dict(name="vit", variant="mu/4", num_classes=3, pool_type="tok", head_zero_init=False,
             attention_impl="xla", dtype="bfloat16", norm_impl="xla",
             gelu_impl="xla")  # 'auto' would pick Triton's kernels
  params = build_model(cfg).init(jax.random.key(0), images)["params"]
  plain, _ = build_model(cfg).apply({"params": params}, images)
  lengths = []
  real_attention = jax.nn.dot_product_attention

  def cudnn_standin(q, k, v, *, implementation=None, **kw):
    assert implementation == "cudnn"
    lengths.append(q.shape[1])
    return real_attention(q, k, v, implementation="xla", **kw)
  monkeypatch.setattr(layers, "nvidia_sm80_or_newer", lambda device: True)  # the model's own `auto` decides
  monkeypatch.setattr(layers, "PALLAS_AUTO_MAX_TOKENS", 8)  # 17 tokens: past it, as ViT-B/16's 197 are
  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_standin)
  padded, _ = build_model(dict(cfg, attention_impl="auto")).apply({"params": params}, images)
  assert lengths and set(lengths) == {24}  # 16 patches + class token = 17 -> 24
  np.testing.assert_allclose(plain, padded, rtol=2e-2, atol=2e-2)  # bf16 sums over 17 vs 24 slots


def test_abstract_params_have_the_trained_tree_for_scanned_and_cudnn_models():
  """What restores checkpoints (`params.abstract_params`) must have the tree `init` gives, scan included,
  and must trace cuDNN-attention configs on a host without a GPU."""
  cfg = dict(name="vit", variant="mu/4", num_classes=3, image_size=16, scan=True, remat_policy="dots",
             attention_impl="cudnn")
  got = params_lib.abstract_params(ml_collections.ConfigDict(cfg))
  want = nn.meta.unbox(build_model(dict(cfg, attention_impl="xla")).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert [x.shape for x in jax.tree.leaves(got)] == [x.shape for x in jax.tree.leaves(want)]
  assert "blocks" in got["encoder"]  # the scanned layout, one stacked block


def test_bfloat16_compute_keeps_float32_params():
  model = build_model(dict(name="vit", variant="mu/4", num_classes=3, dtype="bfloat16"))
  variables = model.init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  assert model.apply(variables, jnp.ones((1, 16, 16, 3)))[1]["pre_logits"].dtype == jnp.bfloat16


def test_sincos2d_is_fixed_and_distinct():
  emb = sincos2d(4, 4, 32)
  assert emb.shape == (1, 16, 32)
  assert len({tuple(np.round(r, 5)) for r in emb[0]}) == 16


def test_resize_posemb_keeps_a_constant_embedding_constant():
  posemb = np.concatenate([np.full((1, 1, 8), 7.0), np.ones((1, 16, 8))], axis=1)
  out = resize_posemb(posemb, (6, 6), num_prefix_tokens=1)
  assert out.shape == (1, 37, 8)
  np.testing.assert_allclose(out[0, 0], 7.0)
  np.testing.assert_allclose(out[0, 1:], 1.0, rtol=1e-6)


def test_learned_posemb_follows_image_size():
  model = build_model(dict(name="vit", variant="mu/4", num_classes=3, pool_type="tok"))
  p = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"])
  assert p["pos_embedding"].shape == (1, 64, 128)


def test_recomputed_gelu_saves_only_the_gemm_output_and_matches_autodiff():
  """`recompute_gelu`: same output and gradients; the backward keeps 2 [.., mlp] arrays, not GELU's insides."""
  import contextlib
  import io

  from jax.ad_checkpoint import print_saved_residuals

  from bigvis.models.layers import Mlp
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  results = {}
  for recompute in (False, True):
    mlp = Mlp(32, recompute_gelu=recompute)
    p = mlp.init(jax.random.key(1), x)  # same init either way

    def loss(params, x):
      return jnp.sum(mlp.apply(params, x) ** 2)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      print_saved_residuals(loss, p, x)
    saved_hidden = [line for line in printed.getvalue().splitlines() if line.startswith("f32[2,5,32]")]
    results[recompute] = (jax.value_and_grad(loss, argnums=(0, 1))(p, x), saved_hidden)
  (a, ga), saved_plain = results[False]
  (b, gb), saved_recomputed = results[True]
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), ga, gb)
  assert len(saved_recomputed) == 2 and not any("tanh" in line for line in saved_recomputed), saved_recomputed
  # What is kept is the GEMM's unbiased output, so the GEMM keeps a plain epilogue: saving h + bias
  # instead lets XLA pick cuBLASLt's slower BIAS_GELU_AUX GEMM (see layers.bias_gelu_recomputed).
  assert any("output of dot_general" in line for line in saved_recomputed), saved_recomputed
  assert not any("output of add" in line for line in saved_recomputed), saved_recomputed
  assert any("tanh" in line for line in saved_plain), saved_plain


def test_auto_attention_resolves_for_the_mesh_devices_not_the_first_device(monkeypatch):
  """`resolve_for_device` decides attention and norms per tower for a given device; the trainer's
  builder passes the mesh's, so a CPU mesh on a GPU host (or a TPU target) gets XLA's."""
  from bigvis import sharding, train
  from bigvis.config import base_config
  from bigvis.models import model_config, resolve_for_device, with_tower_fields
  h100, cpu = _FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0"), _FakeDevice("cpu", "cpu")
  clip = model_config("clip", image=dict(variant="B/16", dtype="bfloat16"),
                      text=dict(variant="B", dtype="bfloat16", attention_impl="xla"))
  on_gpu = resolve_for_device(clip, h100)
  assert (on_gpu.image.attention_impl, on_gpu.text.attention_impl) == ("cudnn", "xla")  # explicit stands
  # 'auto' in the text tower (77 tokens, within one of cuDNN's tiles): bigvis's kernels.
  assert resolve_for_device(with_tower_fields(clip, attention_impl="auto"), h100).text.attention_impl == "pallas"
  assert (on_gpu.image.norm_impl, on_gpu.text.norm_impl) == ("pallas", "pallas")  # both default 'auto'
  assert resolve_for_device(clip, cpu).image.norm_impl == "xla"
  v100 = _FakeDevice("gpu", "Tesla V100-SXM2-16GB", "7.0")
  assert resolve_for_device(clip, v100).text.norm_impl == "xla"  # Triton's kernels need sm80
  assert resolve_for_device(with_tower_fields(clip, norm_impl="xla"), h100).image.norm_impl == "xla"
  assert resolve_for_device(clip, cpu).image.attention_impl == "xla"
  assert clip.image.attention_impl == "auto"  # a copy: the run's config is left as written
  as_dicts = clip.to_dict()  # plain dicts (tests, hand-written configs) are copied too, towers included
  assert resolve_for_device(as_dicts, h100).image.attention_impl == "cudnn"
  assert with_tower_fields(as_dicts, remat_policy="full").text.remat_policy == "full"
  assert as_dicts == clip.to_dict()
  vit = model_config("vit", variant="mu/4", dtype="bfloat16")   # head size 32
  assert resolve_for_device(vit, h100).attention_impl == "cudnn"
  assert resolve_for_device(model_config("vit", variant="mu/4"), h100).attention_impl == "xla"  # float32
  # A hand-written section without the key gets the module's default ('auto'), decided here too.
  bare = ml_collections.ConfigDict(dict(name="vit", variant="mu/4", dtype="bfloat16"))
  assert resolve_for_device(bare, h100).attention_impl == "cudnn"
  assert resolve_for_device(bare, cpu).attention_impl == "xla"
  assert (resolve_for_device(bare, h100).norm_impl, resolve_for_device(bare, cpu).norm_impl) == ("pallas", "xla")
  assert (resolve_for_device(bare, h100).gelu_impl, resolve_for_device(bare, cpu).gelu_impl) == ("pallas", "xla")
  assert resolve_for_device(clip, v100).image.gelu_impl == "xla"

  config = base_config()
  config.model = vit
  config.objective = ml_collections.ConfigDict(dict(name="classification"))
  cpu_mesh, _ = sharding.mesh_and_rules(config, jax.devices("cpu")[:1])
  monkeypatch.setattr(jax, "devices", lambda *a: [h100])  # the host's first device is a GPU
  model, _ = train.model_and_objective(config, cpu_mesh)
  assert (model.attention_impl, model.norm_impl) == ("xla", "xla")


def test_auto_kernels_resolve_in_the_block_for_the_first_device(monkeypatch):
  """A model built without a device (`build_model(cfg)`, a module used directly) decides `norm_impl`
  and `gelu_impl` 'auto' in each block for the process's first device: the Pallas kernels on an
  NVIDIA GPU, XLA's elsewhere."""
  from bigvis.models import layers
  calls = []

  def recording(real, name):
    def call(*args, **kwargs):
      calls.append((name, kwargs["interpret"]))
      return real(*args, **{**kwargs, "interpret": True})  # the kernel as Triton would run it, on the CPU
    return call
  monkeypatch.setattr(layers, "residual_layernorm", recording(layers.residual_layernorm, "norm"))
  monkeypatch.setattr(layers, "pallas_bias_gelu", recording(layers.pallas_bias_gelu, "gelu"))
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  block = layers.EncoderBlock(num_heads=4, mlp_dim=64, norm_impl="auto", gelu_impl="auto")
  params = block.init(jax.random.key(1), x)
  on_cpu = block.apply(params, x)
  assert calls == []  # this host's first device is a CPU
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0")])
  on_gpu = block.apply(params, x)
  # both norms and the MLP's GELU, compiled (not interpreted) kernels
  assert sorted(calls) == [("gelu", False), ("norm", False), ("norm", False)]
  np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-5)
  assert layers.resolve_kernel_impl("pallas_interpret") == "pallas_interpret"  # explicit choices stand


def test_auto_norms_and_qkv_under_rules_that_split_features_or_heads(monkeypatch):
  """Under sharding rules that put each token's features on several devices, the norms' kernels
  (explicit, or what 'auto' picks on a GPU, as the trainer's resolution for the mesh's device does)
  are a one-sentence error naming the fix; `fused_qkv=None` is three GEMMs only where the norm's
  kernel takes both input gradients (not with XLA's norms, not where the heads are split over
  devices)."""
  from bigvis import sharding
  from bigvis.models import layers
  monkeypatch.setattr(layers, "nvidia_sm80_or_newer", lambda device: True)  # 'auto' picks the kernels
  monkeypatch.setattr(layers, "residual_layernorm",
                      functools.partial(layers.residual_layernorm, interpret=True))  # runnable on the CPU
  fused = []
  real_attention = layers.Attention.__call__

  def recording(self, *a, **kw):
    fused.append(self.fused_qkv)
    return real_attention(self, *a, **kw)
  monkeypatch.setattr(layers.Attention, "__call__", recording)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  x = jnp.ones((4, 8, 32))

  def run(norm_impl, rules):
    block = layers.EncoderBlock(num_heads=4, mlp_dim=64, norm_impl=norm_impl, fused_qkv=None)
    with sharding.use_mesh(mesh), sharding.activation_rules(mesh, rules):  # traced only: shapes
      return jax.eval_shape(block.init, jax.random.key(0), x)
  split_features = [r for r in sharding.DEFAULT_RULES if r[0] not in ("act_embed", "act_heads")]
  split_features += [("act_embed", "tensor"), ("act_heads", None)]
  for impl, named in (("auto", "pallas"), ("pallas_interpret", "pallas_interpret")):
    with pytest.raises(UserError, match=f"model.norm_impl '{named}' runs bigvis's LayerNorm kernels here "
                                        r"\('auto' does .* split them over mesh axis 'tensor'; set model.norm_impl='xla'"):
      run(impl, split_features)
  run("xla", split_features)
  assert fused[-1] is True  # XLA's norms, so one GEMM
  fused.clear()
  run("auto", sharding.DEFAULT_RULES)  # heads split over `tensor`: the partial gradients apart
  assert fused == [True]               # would each need an all-reduce
  fused.clear()
  run("auto", [r for r in sharding.DEFAULT_RULES if r[0] != "act_heads"] + [("act_heads", None)])
  assert fused == [False]  # the kernel adds the query's, key's and value's input gradients


def test_gpu_encoder_pins_its_residual_stream_row_major(monkeypatch):
  """With cuDNN attention (an NVIDIA GPU) the encoder input carries a row-major layout constraint
  (compiled for an H100, CLIP's text tower went from 156 transposes to 9); elsewhere none."""
  from bigvis.models.layers import Encoder
  real_attention = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, implementation=None, **kw: real_attention(q, k, v, implementation="xla", **kw))
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  outs = {}
  for impl in ("cudnn", "xla"):
    enc = Encoder(depth=2, num_heads=4, mlp_dim=64, attention_impl=impl, causal=True)
    p = enc.init(jax.random.key(1), x)

    def loss(p, x):
      return jnp.sum(enc.apply(p, x) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(p, x))
    # row-major on the encoder input and on its gradient
    assert jaxpr.count("layout=Layout(major_to_minor=(0, 1, 2),") == (2 if impl == "cudnn" else 0), impl
    outs[impl] = jax.jit(jax.value_and_grad(loss))(p, x)
  np.testing.assert_allclose(outs["cudnn"][0], outs["xla"][0], rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(outs["xla"][1]))  # key-bias grads are ~0
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6 * scale),
               outs["cudnn"][1], outs["xla"][1])


def test_row_major_pin_moves_nothing_between_devices():
  """Under a mesh the layout pin runs on each device's shard. XLA's partitioner has no rule for the
  layout constraint, and had gathered the whole batch onto every device around it, forward and
  backward (benchmarks/README.md, sixteenth session). Values and gradients are the identity's."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bigvis import sharding
  from bigvis.models import layers
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 6, 16)), NamedSharding(mesh, P(("data", "fsdp"))))

  def loss(x, pin):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      y = layers.constrain(jnp.sin(x), ("act_batch", "act_length", "act_embed"))
      return jnp.sum(jnp.cos(layers.row_major(y) if pin else y) ** 2)
  pinned = jax.jit(jax.value_and_grad(functools.partial(loss, pin=True)))
  assert str(jax.make_jaxpr(pinned)(x)).count("layout=Layout(major_to_minor=(0, 1, 2),") == 2  # and its gradient
  from bigvis import hlo_text
  moved = hlo_text.collectives(pinned.lower(x).compile().as_text())
  assert set(moved) <= {"all-reduce"}, moved  # the loss's sum; no activation gathered
  (value, grad), (want_value, want_grad) = pinned(x), jax.jit(jax.value_and_grad(functools.partial(loss, pin=False)))(x)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
  assert grad.sharding.spec == x.sharding.spec
  local = np.asarray(x)  # without a mesh: the plain constraint, which forward-mode autodiff goes through too
  np.testing.assert_array_equal(jax.jit(lambda a: jax.jvp(layers.row_major, (a,), (a,))[1])(local), local)


def test_patch_embedding_matmul_equals_the_convolution():
  """`patch_embedding='matmul'` is the strided convolution as one GEMM: same parameters, outputs and
  gradients (an image size that leaves a partial patch included), and no convolution in the program."""
  from bigvis.models.vit import PatchEmbedding
  image = jax.random.normal(jax.random.key(0), (2, 19, 21, 3))  # 4 x 5 whole 4-px patches, remainders
  results = {}
  for impl in ("conv", "matmul"):
    emb = PatchEmbedding(8, 4, impl=impl)
    params = emb.init(jax.random.key(1), image)  # the same names, shapes and initial values either way

    def loss(p, x):
      return jnp.sum(jnp.sin(emb.apply(p, x)))
    results[impl] = (params, emb.apply(params, image), jax.grad(loss, argnums=(0, 1))(params, image),
                     jax.jit(loss).lower(params, image).as_text())
  (p_conv, y_conv, g_conv, hlo_conv), (p_mm, y_mm, g_mm, hlo_mm) = results["conv"], results["matmul"]
  jax.tree.map(np.testing.assert_array_equal, p_conv, p_mm)
  assert y_mm.shape == (2, 4, 5, 8)
  np.testing.assert_allclose(y_mm, y_conv, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), g_mm, g_conv)
  assert "convolution" in hlo_conv and "convolution" not in hlo_mm
  # What ViT used before PatchEmbedding: its parameters and checkpoints carry over unchanged.
  old = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID", name="embedding")
  p_old = old.init(jax.random.key(1), image)
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(p_mm), p_old)
  np.testing.assert_allclose(y_mm, old.apply(p_old, image), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="model.patch_embedding 'fft'"):
    PatchEmbedding(8, 4, impl="fft").init(jax.random.key(1), image)


@pytest.mark.parametrize("length, causal, masked, biased", [(72, False, True, True), (40, True, False, True),
                                                         (77, True, True, True), (16, False, False, False)],
                         ids=["ragged_masked_biased", "causal_biased", "text_tower_causal_two_blocks", "one_block"])
def test_pallas_attention_kernels_equal_xla_attention(length, causal, masked, biased):
  """`pallas_attention.attention` (interpreted) against XLA's attention in float32: the output and
  the q, k, v and query-bias gradients, with the bias added to the queries inside the kernels, keys
  past each example's length hidden (72 tokens: a 64-row block and a 16-row one, each with code of its
  own, the second ragged) and the causal
  mask (the text tower's); one block whole too. In bfloat16 (below) they agree to its rounding, the
  kernels' bias gradient, summed in float32, closer to float32's than XLA's."""
  from bigvis.models import pallas_attention
  from bigvis.models.layers import dot_product_attention
  rng = np.random.default_rng(0)
  b, h, d = 2, 2, 16
  q, k, v, c = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for _ in range(4))
  bias = jnp.asarray(rng.normal(size=(h, d)), jnp.float32) if biased else None
  kv_len = jnp.array([length, length - 13], jnp.int32) if masked else None
  mask = None if kv_len is None else jnp.arange(length)[None] < kv_len[:, None]

  def loss(fn, dtype):
    def f(q, k, v, bias):
      return jnp.sum(fn(*(x.astype(dtype) for x in (q, k, v)), bias).astype(jnp.float32) * c)
    return jax.value_and_grad(f, argnums=(0, 1, 2) + ((3,) if biased else ()))

  def xla(q, k, v, bias):
    return dot_product_attention(q, k, v, mask=mask, causal=causal, impl="xla", query_bias=bias)

  def pallas(q, k, v, bias):
    return pallas_attention.attention(q, k, v, kv_len=kv_len, query_bias=bias, causal=causal, interpret=True)
  for dtype, tolerance in ((jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)):
    ref, got = jax.jit(loss(xla, dtype))(q, k, v, bias), jax.jit(loss(pallas, dtype))(q, k, v, bias)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      assert float(jnp.max(jnp.abs(r - g))) <= tolerance * float(jnp.max(jnp.abs(r))), (dtype, r, g)
  if masked:  # a hidden key gets no gradient and moves no output
    _, (_, dk, dv, *_) = jax.jit(loss(pallas, jnp.float32))(q, k, v, bias)
    assert float(jnp.abs(dk[1, length - 13:]).max()) == float(jnp.abs(dv[1, length - 13:]).max()) == 0.0
  with pytest.raises(ValueError, match="whole sequences"):
    pallas_attention.attention(q, k, v, axes=(None, "data", None, None))
  with pytest.raises(ValueError, match="power of two >= 16, got 12"):  # Triton's blocks
    pallas_attention.attention(q[..., :12], k[..., :12], v[..., :12])
  # The blocks: whole ones, then the rest in the least power of two >= 16 (ViT-B/16's 197 tokens: 208
  # where cuDNN computes 256; CLIP's text, 77: 80).
  assert pallas_attention.blocks_of(197, 64) == [(0, 64), (64, 64), (128, 64), (192, 16)]
  assert pallas_attention.blocks_of(77, 64) == [(0, 64), (64, 16)]
  assert pallas_attention.blocks_of(100, 64) == [(0, 64), (64, 64)]
  assert pallas_attention.blocks_of(13, 64) == [(0, 16)] and pallas_attention.blocks_of(128, 64) == [(0, 64), (64, 64)]


@pytest.mark.parametrize("rows, keys, backward_rows", [(32, 16, 32), (16, 16, 16)], ids=["static", "five_blocks"])
def test_causal_pallas_attention_skips_the_blocks_above_the_diagonal_and_still_equals_xla(
    monkeypatch, rows, keys, backward_rows):
  """A causal kernel leaves out the key blocks after a query block's last query: forward with query
  and key blocks of different sizes (77 tokens: queries 32 + 32 + 16, keys 4 x 16 + 16), and beyond
  `_STATIC_CAUSAL_BLOCKS` blocks (five of 16) the masked blocks computed instead; the same output and
  gradients as XLA's attention either way."""
  from bigvis.models import pallas_attention, pallas_kernels
  from bigvis.models.layers import dot_product_attention
  monkeypatch.setitem(pallas_kernels.TILES, "attention_forward", dict(rows=rows, keys=keys, warps=4, stages=1))
  monkeypatch.setitem(pallas_kernels.TILES, "attention_backward", dict(rows=backward_rows, warps=4, stages=1))
  rng = np.random.default_rng(2)
  q, k, v, c = (jnp.asarray(rng.normal(size=(2, 77, 2, 16)), jnp.float32) for _ in range(4))
  bias = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * c), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  ref = loss(lambda q, k, v, b: dot_product_attention(q, k, v, mask=None, causal=True, impl="xla", query_bias=b))
  got = loss(lambda q, k, v, b: pallas_attention.attention(q, k, v, query_bias=b, causal=True, interpret=True))
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    assert float(jnp.max(jnp.abs(r - g))) <= 2e-6 * float(jnp.max(jnp.abs(r)))
  blocks = pallas_attention.blocks_of(77, backward_rows)
  assert pallas_attention._static_causal(True, blocks) == (len(blocks) <= pallas_attention._STATIC_CAUSAL_BLOCKS)
  assert not pallas_attention._static_causal(False, blocks)
  if rows == 32:  # the kernels' code holds only the block pairs on or below the diagonal
    def dots(jaxpr):
      inner = [getattr(x, "jaxpr", x) for e in jaxpr.eqns for v in e.params.values()
               for x in (v if isinstance(v, (tuple, list)) else [v])]
      return (sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
              + sum(dots(j) for j in inner if hasattr(j, "eqns")))
    kv_len, o = jnp.full((2,), 77, jnp.int32), q
    forward = jax.make_jaxpr(lambda q: pallas_attention._forward(
        (q, k, v), kv_len, None, causal=True, interpret=False))(q)
    backward = jax.make_jaxpr(lambda q: pallas_attention._backward(
        (q, k, v), kv_len, None, o, jnp.zeros((2, 2, 77)), c, causal=True, interpret=False))(q)
    # Forward: query blocks 0-31, 32-63, 64-79 see 2, 4 and 5 key blocks of 16, two GEMMs each (15 without
    # skipping). Backward, blocks of 32: key block j's dK, dV from the 3 - j query blocks at or after it (4
    # GEMMs each), query block j's dQ from the j + 1 key blocks up to it (3 each).
    assert dots(forward.jaxpr) == 2 * (2 + 4 + 5)
    assert dots(backward.jaxpr) == 4 * (3 + 2 + 1) + 3 * (1 + 2 + 3)


def test_pallas_attention_sees_at_most_the_sequence_and_gives_a_row_that_sees_nothing_zeros():
  """kv_len past the sequence's end attends to its tokens only (not the blocks' zero fill), and an
  example with kv_len 0 gets zeros forward and no gradient, where a log-sum-exp of the hidden keys
  would give the backward other probabilities than the forward's."""
  from bigvis.models import pallas_attention
  rng = np.random.default_rng(1)
  q, k, v, c = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in range(4))

  def run(kv_len):
    f = lambda q, k, v: pallas_attention.attention(q, k, v, kv_len=kv_len, interpret=True)  # noqa: E731
    out = jax.jit(f)(q, k, v)
    return out, jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * c), argnums=(0, 1, 2)))(q, k, v)
  whole, whole_grads = run(jnp.array([40, 40]))
  past, past_grads = run(jnp.array([90, 40]))
  np.testing.assert_array_equal(past, whole)
  jax.tree.map(np.testing.assert_array_equal, past_grads, whole_grads)
  out, grads = run(jnp.array([0, 40]))
  assert float(jnp.abs(out[0]).max()) == 0.0 and all(float(jnp.abs(g[0]).max()) == 0.0 for g in grads)
  np.testing.assert_allclose(out[1], whole[1], rtol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("extra", [{"fused_qkv": False}, {"fused_qkv": True}, {"seq_pad_multiple": 8}, {"blocks": 32}],
                         ids=["separate_qkv", "fused_qkv", "padded_and_masked", "two_blocks"])
def test_pallas_attention_vit_equals_the_xla_vit_with_the_query_bias_in_the_kernel(extra, monkeypatch):
  """`model.attention_impl='pallas'` (interpreted): the same loss and gradients as XLA's attention,
  with the query bias handed to the kernels rather than added by XLA (three GEMMs for q, k and v, or
  one, whose output the kernels read in place, as with XLA's norms by default; with padded tokens the
  padding masked; 37 tokens in blocks of 32, the second trimmed to 16 and run by code of its own), and
  no padding of its own: the 17 tokens as they are."""
  from bigvis.models import pallas_attention, pallas_kernels
  extra = dict(extra)
  blocks = extra.pop("blocks", None)
  if blocks:
    monkeypatch.setitem(pallas_kernels.TILES, "attention_forward", dict(rows=blocks, keys=blocks, warps=4, stages=1))
    monkeypatch.setitem(pallas_kernels.TILES, "attention_backward", dict(rows=blocks, warps=4, stages=1))
  seen = []
  real = pallas_attention.attention

  def recording(q, k, v, **kw):
    seen.append((q.shape[1], q.ndim, kw["query_bias"] is not None, kw["kv_len"] is not None))
    return real(q, k, v, **kw)
  monkeypatch.setattr(pallas_attention, "attention", recording)
  side = 24 if blocks else 16  # 6 x 6 patches and the class token: 37 tokens
  x = jax.random.normal(jax.random.key(1), (2, side, side, 3))
  base = dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False, norm_impl="xla", gelu_impl="xla",
              attention_impl="xla", image_size=side, last_block_pooled=False, **extra)  # the kernels in every block
  p = nn.unbox(build_model(base).init(jax.random.key(0), x)["params"])
  p = jax.tree_util.tree_map_with_path(lambda path, v: v + 0.1 if path[-1].key == "bias" else v, p)

  def loss(params, cfg):
    return jnp.sum(build_model(cfg).apply({"params": params}, x)[0] ** 2)
  a, ga = _jit_value_and_grad(loss, base)(p)
  b, gb = _jit_value_and_grad(loss, dict(base, attention_impl="pallas_interpret"))(p)
  padded = "seq_pad_multiple" in extra
  # One fused GEMM's output is read in place ([batch, tokens, heads, 3, head_dim]), never sliced.
  tokens = 37 if blocks else 24 if padded else 17
  assert seen and set(seen) == {(tokens, 4 if extra.get("fused_qkv") is False else 5, True, padded)}, seen
  np.testing.assert_allclose(a, b, rtol=1e-5)
  scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(ga))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6 * scale), ga, gb)
  assert float(jnp.abs(gb["encoder"]["block00"]["block"]["attn"]["query"]["bias"]).max()) > 0
  # ViT-H's heads of 80 are no Triton block: a one-sentence error naming the key, before any tracing.
  with pytest.raises(UserError, match="model.image.attention_impl 'pallas' needs a head size that is a power of two"):
    build_model(dict(name="clip", image=dict(variant="H/14", attention_impl="pallas"), text=dict(variant="mu")))


@pytest.mark.parametrize("field, extra", [
    ("norm_impl", {"fused_qkv": True}), ("norm_impl", {}), ("norm_impl", {"residual_in_norm": False}),
    ("norm_impl", {"dropout": 0.1}), ("norm_impl", {"scan": True, "remat_policy": "full"}), ("gelu_impl", {}),
    ("attention_impl", {})],
    ids=["norm_fused_qkv", "norm_separate_qkv", "norm_residual_by_xla", "norm_dropout",
         "norm_scan_remat_separate_qkv", "gelu", "attention"])
def test_pallas_kernels_vit_equals_the_xla_vit_and_is_refused_off_nvidia_gpus(field, extra, monkeypatch):
  """`model.norm_impl` / `model.gelu_impl` / `model.attention_impl` = 'pallas': the same parameters,
  loss and gradients as XLA's fusions (kernels interpreted here; the kernels alone, in float32 and bfloat16 on ragged
  shapes, are checked through benchmarks/pallas_kernels_check.py in test_bench); a CPU mesh gets a
  one-sentence error naming the field; a bad value is named. The norms' kernels also take the
  gradients of the out projection's and the MLP's output biases (not under dropout: then XLA does)
  and, with separate query, key and value GEMMs, their three input gradients; with `residual_in_norm`
  (the default), the residual adds before them too, the MLP's output and bias in
  the next block's attention norm where the blocks are unrolled without remat (the last block's
  bias gradient then summed by its MLP norm)."""
  from bigvis.models import pallas_kernels
  calls = []
  real = pallas_kernels._residual_layernorm

  def recording(x, scale, bias, addend, input_bias, residual_bias, *static):
    # (the residual add in the kernel, its bias's gradient, the next bias's gradient, copies)
    calls.append((addend is not None, input_bias is not None, residual_bias is not None, static[-2]))
    return real(x, scale, bias, addend, input_bias, residual_bias, *static)
  monkeypatch.setattr(pallas_kernels, "_residual_layernorm", recording)
  copy_gradients = []  # per backward kernel call: whether each copy's gradient is nonzero
  real_backward = pallas_kernels._layernorm_backward

  def recording_backward(x, dys, *args, **kwargs):
    jax.debug.callback(lambda *d: copy_gradients.append([bool(np.any(g != 0)) for g in d]), *dys)
    return real_backward(x, dys, *args, **kwargs)
  monkeypatch.setattr(pallas_kernels, "_layernorm_backward", recording_backward)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  # XLA's fusions spelled out: 'auto' would pick the kernels on a GPU host.
  base = dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False, norm_impl="xla", gelu_impl="xla",
              last_block_pooled=False, **extra)  # the kernels in every block (pooled: the test after this)
  pallas = dict(base, **{field: "pallas_interpret"})
  p = nn.unbox(build_model(base).init(jax.random.key(0), x)["params"])
  p_pallas = nn.unbox(build_model(pallas).init(jax.random.key(0), x)["params"])
  jax.tree.map(np.testing.assert_array_equal, p, p_pallas)  # same tree, names and initial values
  # Nonzero biases (they start at zero): the value bias reaches the out kernel's gradient through
  # the out bias the norm's kernel sums.
  p = jax.tree_util.tree_map_with_path(lambda path, v: v + 0.1 if path[-1].key == "bias" else v, p)

  def loss(params, cfg):  # train=True: dropout, where there is some, with the same key for both
    out = build_model(cfg).apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out[0] ** 2)
  a, ga = _jit_value_and_grad(loss, base)(p)
  calls.clear()
  b, gb = _jit_value_and_grad(loss, pallas)(p)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  if field == "norm_impl":  # per block traced (scan and remat trace one more than once): the
    copies = 1 if extra.get("fused_qkv") else 3  # attention's norm, then the MLP's (ViT's default: apart)
    biases = "dropout" not in extra
    adds = biases and extra.get("residual_in_norm", True)
    if extra.get("scan") or not adds:  # one block traced, or the same in each
      trace = [(False, False, False, copies), (adds, biases, biases, 1)]
    else:
      blocks = sum(name.startswith("block") for name in p["encoder"])
      assert blocks >= 2
      trace = []
      for i in range(blocks):
        trace += [(i > 0, i > 0, False, copies), (True, True, i == blocks - 1, 1)]
    assert calls and calls == trace * (len(calls) // len(trace)), calls
    if not extra.get("scan"):  # each copy feeds a GEMM of its own: every one brings a gradient back
      assert sorted(map(len, copy_gradients)) == sorted(c for *_, c in calls), copy_gradients
      assert all(all(nonzero) for nonzero in copy_gradients), copy_gradients
  block = gb["encoder"]["blocks"]["block"] if extra.get("scan") else gb["encoder"]["block00"]["block"]
  for name in (["norm_mlp", "LayerNorm_0", "scale"], ["mlp", "Dense_0", "bias"], ["attn", "out", "bias"],
               ["mlp", "Dense_1", "bias"]):
    assert float(jnp.abs(functools.reduce(dict.__getitem__, name, block)).max()) > 0, name
  scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(ga))
  # float32 rounding: the class token's gradient (up to ~670 here) differs by up to 1.1e-3 with dropout
  atol = (3e-6 if "dropout" in extra else 1e-6) * scale
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=atol), ga, gb)

  with pytest.raises(UserError, match=f"model.{field} 'pallas' runs Triton kernels on NVIDIA GPUs"):
    build_model(dict(base, **{field: "pallas"}), device=jax.devices("cpu")[0])
  with pytest.raises(UserError, match=f"model.{field} 'triton' is not one of (auto, )?xla, pallas"):
    build_model(dict(base, **{field: "triton"}))
  clip = dict(name="clip", image=dict(variant="mu/4"), text=dict(variant="mu", **{field: "triton"}))
  with pytest.raises(UserError, match=f"model.text.{field} 'triton' is not one of"):  # the tower's key
    build_model(clip)
  with pytest.raises(UserError, match="model.image.fused_qkv 'auto' is not true, false or None"):
    build_model(dict(name="clip", image=dict(variant="mu/4", fused_qkv="auto"), text=dict(variant="mu")))
  with pytest.raises(UserError, match="model.text.residual_in_norm 'yes' is not true or false"):
    build_model(dict(name="clip", image=dict(variant="mu/4"), text=dict(variant="mu", residual_in_norm="yes")))
  with pytest.raises(UserError, match="model.residual_in_norm 1 is not true or false"):  # 1 == True, not a bool
    build_model(dict(base, residual_in_norm=1))


@pytest.mark.parametrize("name, extra", [
    ("vit", {}), ("vit", {"norm_impl": "pallas_interpret", "gelu_impl": "pallas_interpret"}),
    ("vit", {"attention_impl": "pallas_interpret", "seq_pad_multiple": 8}), ("vit", {"remat_policy": "full"}),
    ("text", {}), ("text", {"causal": False, "seq_pad_multiple": 8})],
    ids=["vit", "vit_pallas_norms_deferred_residual", "vit_pallas_attention_padded", "vit_remat", "text_causal",
         "text_bidirectional_padded"])  # the pooled text tower with the kernels: test_clip's 8-device meshes
def test_last_block_pooled_gives_the_whole_models_outputs_and_gradients_for_less_work(name, extra):
  """`last_block_pooled` (the default): the last block computes only the token the pooling reads (the
  class token; the end-of-text token, at another place in each caption), its keys and values from
  all tokens. The same parameters, loss and gradients as the whole last block, with the kernels, a
  deferred residual add, padding, remat; fewer FLOPs."""
  if name == "vit":
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    base = dict(name="vit", variant="mu/4", num_classes=3, head_zero_init=False, norm_impl="xla", gelu_impl="xla")
  else:  # captions of 13, 9 and 4 tokens: end-of-text at 12, 8 and 3
    x = jax.random.randint(jax.random.key(1), (3, 13), 1, 50).at[1, 9:].set(0).at[2, 4:].set(0)
    base = dict(name="text", variant="mu", vocab_size=50, context_length=13, num_classes=8, norm_impl="xla",
                gelu_impl="xla")
  pooled, whole = dict(base, **extra), dict(base, **extra, last_block_pooled=False)
  p = nn.unbox(build_model(pooled).init(jax.random.key(0), x)["params"])
  jax.tree.map(np.testing.assert_array_equal, p, nn.unbox(build_model(whole).init(jax.random.key(0), x)["params"]))
  p = jax.tree_util.tree_map_with_path(lambda path, v: v + 0.1 if path[-1].key == "bias" else v, p)

  def loss(params, cfg):
    return jnp.sum(build_model(cfg).apply({"params": params}, x)[0] ** 2)
  a, ga = _jit_value_and_grad(loss, pooled)(p)
  b, gb = _jit_value_and_grad(loss, whole)(p)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(gb))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=2e-6 * scale), ga, gb)
  last = ga["encoder"][max(ga["encoder"])]["block"]
  assert float(jnp.abs(last["mlp"]["Dense_1"]["kernel"]).max()) > 0  # the pooled token's MLP is trained
  if not extra:  # XLA's fusions: the FLOPs as XLA counts them
    flops = [jax.jit(lambda q, cfg=cfg: loss(q, cfg)).lower(p).cost_analysis()["flops"] for cfg in (pooled, whole)]
    assert flops[0] < 0.95 * flops[1], flops
  if name == "vit":
    assert build_model(pooled).apply({"params": p}, x)[1]["encoded"].shape == (2, 1, 128)


@pytest.mark.parametrize("causal, masked", [(False, False), (False, True), (True, False)])
def test_attention_places_the_key_and_value_biases_without_changing_its_function(causal, masked):
  """A query's attention weights sum to 1 over the keys, with masks and causally too. So a key bias
  adds q·b_k to every logit in a query's row, which softmax ignores (its gradient is zero; autodiff's
  is rounding), and a value bias adds b_v to every output row. Attention leaves the first out and
  folds the second into the out projection's bias; in both GEMM forms its outputs and gradients are
  those of every bias added where its projection is, and the key bias's gradient is exactly 0."""
  from bigvis.models.layers import Attention, dot_product_attention
  keys = jax.random.split(jax.random.key(0), 8)
  q, k, v, c = (jax.random.normal(keys[i], (2, 7, 3, 8)) for i in range(4))
  mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]]) if masked else None

  def loss(bq, bk, bv):
    out = dot_product_attention(q + bq, k + bk, v + bv, mask=mask, causal=causal, impl="xla")
    return jnp.sum(out * c)
  gq, gk, gv = jax.grad(loss, argnums=(0, 1, 2))(*(jax.random.normal(keys[4 + i], (3, 8)) for i in range(3)))
  assert float(jnp.abs(gk).max()) <= 1e-5 * float(jnp.abs(gq).max()), (gk, gq)
  assert float(jnp.abs(gv).max()) > 0.1
  bv = jax.random.normal(keys[4], (3, 8))
  np.testing.assert_allclose(dot_product_attention(q, k, v + bv, mask=mask, causal=causal, impl="xla"),
                             dot_product_attention(q, k, v, mask=mask, causal=causal, impl="xla") + bv,
                             rtol=1e-5, atol=1e-5)

  x = jax.random.normal(keys[6], (2, 7, 24))
  target = jax.random.normal(keys[7], (2, 7, 24))

  def reference(params):  # every bias added where its projection is
    proj = lambda name: jnp.einsum("bte,ehd->bthd", x, params[name]["kernel"]) + params[name]["bias"]
    out = dot_product_attention(proj("query"), proj("key"), proj("value"), mask=mask, causal=causal, impl="xla")
    return jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"]) + params["out"]["bias"]
  for fused in (True, False):
    attention = Attention(num_heads=3, causal=causal, fused_qkv=fused)
    params = nn.unbox(attention.init(jax.random.key(1), x)["params"])
    params = jax.tree.map(lambda p: p + 0.3, params)  # nonzero biases
    np.testing.assert_allclose(attention.apply({"params": params}, x, mask), reference(params), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum((attention.apply({"params": p}, x, mask) - target) ** 2))(params)
    expected = jax.grad(lambda p: jnp.sum((reference(p) - target) ** 2))(params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-6 * scale), grads, expected)
    assert float(jnp.abs(grads["key"]["bias"]).max()) == 0.0
    assert float(jnp.abs(grads["key"]["kernel"]).max()) > 0
    assert min(float(jnp.abs(grads[name]["bias"]).max()) for name in ("query", "value", "out")) > 0
    # As the block uses it with the Pallas norms: the output comes without its bias, which the norm's
    # kernel adds, handing back the output gradient's column sum as the bias's; the same gradients.
    (y, bias), pullback = jax.vjp(lambda p: attention.apply({"params": p}, x, mask, add_out_bias=False),
                                  params)
    np.testing.assert_allclose(y + bias, reference(params), rtol=1e-5, atol=1e-5)
    y = y + bias
    dy = 2 * (y - target)
    (handed,) = pullback((dy, dy.sum(axis=(0, 1))))
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-6 * scale), handed, expected)


def test_layernorm_refuses_what_only_its_kernels_take_with_xla_norms():
  """The residual add (`addend`) and the biases whose gradients the kernels sum are the kernels' to
  take: XLA's LayerNorm refuses them (the block adds them itself there) rather than drop any."""
  from bigvis.models.layers import LayerNorm
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  norm = LayerNorm()
  params = norm.init(jax.random.key(1), x)
  for kwargs in ({"addend": x}, {"input_bias": x[0, 0]}, {"residual_bias": x[0, 0]}):
    with pytest.raises(ValueError, match="need keep_input=True and the Pallas kernels"):
      norm.apply(params, x, keep_input=True, **kwargs)
  from bigvis.models.pallas_kernels import residual_layernorm  # the kernels: an addend with its bias
  with pytest.raises(ValueError, match="an addend comes with its input_bias"):
    residual_layernorm(x, jnp.ones(8), jnp.zeros(8), epsilon=1e-6, dtype=jnp.float32, interpret=True, addend=x)


def test_norm_copies_reach_xla_as_distinct_values():
  """The norm kernel's copies of its output (one per query/key/value GEMM) leave through an
  optimisation barrier: as one array XLA merged the GEMMs that read it into one and sliced the
  output (compiled for an H100, CLIP's text tower with fused_qkv=false: 2 GB of slices a step), and
  then the copies' gradients no longer reached the kernel apart. One copy needs no barrier."""
  from bigvis.models.pallas_kernels import residual_layernorm
  x = jax.random.normal(jax.random.key(0), (4, 8))

  def barriers(copies):
    jaxpr = jax.make_jaxpr(lambda x: residual_layernorm(x, jnp.ones(8), jnp.zeros(8), epsilon=1e-6,
                                                        dtype=jnp.float32, interpret=True, copies=copies))(x)
    eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    outputs = jaxpr.jaxpr.outvars
    return len(eqns), all(v in eqns[0].outvars for v in outputs[1:]) if eqns else None
  assert barriers(3) == (1, True)  # s, then the three copies straight from the barrier
  assert barriers(1) == (0, None)


def test_norm_kernels_partial_sums_are_reduced_in_one_stacked_sum():
  """The backward kernel writes partial column sums of up to four gradients (scale, bias, and the
  biases of the residual add); XLA reduced each in a tiny kernel of its own, and stacked they are one
  (compiled for an H100, ViT-B/16's step went from 885 kernels to 795: the Adam updates of a norm's
  parameters merge too, as they read one reduction). The gradients are those of XLA's norm."""
  from bigvis.models.pallas_kernels import residual_layernorm
  keys = jax.random.split(jax.random.key(0), 6)
  x, addend, c = (jax.random.normal(k, (40, 16)) for k in keys[:3])
  scale, bias, in_bias, res_bias = (jax.random.normal(k, (16,)) for k in (*keys[3:], jax.random.key(9)))

  def kernels(x, addend, scale, bias, in_bias, res_bias):
    s, y = residual_layernorm(x, scale, bias, epsilon=1e-6, dtype=jnp.float32, interpret=True, addend=addend,
                              input_bias=in_bias, residual_bias=res_bias)
    return jnp.sum(y * c) + jnp.sum(jnp.sin(s))

  def reference(x, addend, scale, bias, in_bias):
    s = x + addend + in_bias
    mean = jnp.mean(s, axis=1, keepdims=True)
    y = (s - mean) * jax.lax.rsqrt(jnp.mean((s - mean) ** 2, axis=1, keepdims=True) + 1e-6) * scale + bias
    return jnp.sum(y * c) + jnp.sum(jnp.sin(s))
  args = (x, addend, scale, bias, in_bias, res_bias)
  grads = jax.jit(jax.grad(kernels, argnums=tuple(range(6))))(*args)
  expected = jax.grad(reference, argnums=tuple(range(5)))(*args[:5])
  # The residual bias (added after s, its gradient stopped by the caller): the column sum of the
  # gradient the residual path sends back to s, here sin's.
  expected += (jnp.sum(jnp.cos(x + addend + in_bias), axis=0),)
  for name, g, e in zip(("x", "addend", "scale", "bias", "input_bias", "residual_bias"), grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
  jaxpr = jax.make_jaxpr(jax.grad(kernels, argnums=tuple(range(6))))(*args)
  sums = [e.invars[0].aval.shape for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"]
  partials = [shape for shape in sums if shape[-1] == 16 and len(shape) > 1 and shape[0] != 40]
  assert len(partials) == 1 and partials[0][0] == 4, sums  # [4 gradients, programs, 16]


def _pallas_kernels_math(jaxpr) -> dict:
  """{kernel name: the names of the primitives in its body}, for every pallas_call in a closed jaxpr
  (nested jaxprs included)."""
  def inner(j):
    for e in j.eqns:
      yield e
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from inner(sub)
  found = {}
  for e in inner(jaxpr.jaxpr):
    if e.primitive.name == "pallas_call":
      name = getattr(e.params.get("name_and_src_info"), "name", None) or str(e.params.get("name"))
      found[name] = {x.primitive.name for x in inner(e.params["jaxpr"])}
  return found


def test_gelu_kernels_take_the_float32_bias_and_round_it_as_they_read_it():
  """A bfloat16 MLP hands the Pallas GELU its float32 bias parameter, which the kernels round to
  bfloat16 as they load it: the result and h's gradient of the bias converted first, bitwise, and
  no convert of XLA's (a tiny kernel a block, compiled for an H100: 795 -> 784 in ViT-B/16's step)."""
  from bigvis.models.layers import Mlp
  from bigvis.models.pallas_kernels import bias_gelu
  h = jax.random.normal(jax.random.key(0), (40, 24), jnp.bfloat16)
  bias = jax.random.normal(jax.random.key(1), (24,)) * 1.2345  # not bfloat16 values
  assert bool(jnp.any(bias.astype(jnp.bfloat16).astype(jnp.float32) != bias))
  c = jax.random.normal(jax.random.key(2), (40, 24))

  def run(b):
    f = lambda h, b: jnp.sum(bias_gelu(h, b, interpret=True).astype(jnp.float32) * c)  # noqa: E731
    return bias_gelu(h, b, interpret=True), jax.grad(f, argnums=(0, 1))(h, b)
  (y32, (dh32, db32)), (y16, (dh16, db16)) = run(bias), run(bias.astype(jnp.bfloat16))
  np.testing.assert_array_equal(y32, y16)
  np.testing.assert_array_equal(dh32, dh16)
  assert db32.dtype == jnp.float32 and db16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(db32.astype(jnp.bfloat16), db16)
  mlp = Mlp(mlp_dim=24, dtype=jnp.bfloat16, gelu_impl="pallas_interpret")
  x = jnp.ones((2, 5, 8))
  params = mlp.init(jax.random.key(3), x)
  jaxpr = jax.make_jaxpr(lambda p: mlp.apply(p, x))(params).jaxpr
  calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
  calls += [e for outer in jaxpr.eqns for sub in outer.params.values() for e in getattr(getattr(sub, "jaxpr", None), "eqns", [])
            if e.primitive.name == "pallas_call"]
  assert calls and all(e.invars[1].aval.dtype == jnp.float32 for e in calls), calls


def test_gelu_kernels_use_no_tanh_and_keep_relative_accuracy_in_the_negative_tail():
  """Both GELU kernels compute the tanh form as z s, s = 1 / (1 + 2^(-2u log2 e)): an exponential
  and a division, no tanh (libdevice's and XLA's tanh made GELU's passes instruction-bound on the
  GPU), the same math in Pallas's interpreter as in Triton. Where z is negative, 1 + tanh(u)
  cancels (float32 tanh alone is off by tens of percent at z = -6); s does not: output and gradient
  keep float32's relative accuracy there too, against a float64 reference. Traced only on the GPU
  path: the kernels' lowering needs a GPU."""
  from bigvis.models.pallas_kernels import bias_gelu
  h, b = jnp.ones((16, 300), jnp.bfloat16), jnp.ones((300,), jnp.bfloat16)

  def kernels(interpret):
    loss = lambda h, b: bias_gelu(h, b, interpret=interpret).astype(jnp.float32).sum()  # noqa: E731
    return _pallas_kernels_math(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, b))
  for interpret in (False, True):
    found = kernels(interpret)
    assert sorted(found) == ["bigvis_pallas_bias_gelu_backward", "bigvis_pallas_bias_gelu_forward"], found
    for name, ops in found.items():
      assert "exp2" in ops and "div" in ops and "tanh" not in ops, (name, ops)

  z = np.concatenate([np.linspace(-9., 9., 1801), [-30., -1e4, 30., 1e4]])
  c = np.sqrt(2. / np.pi)
  u = c * (z + 0.044715 * z ** 3)
  s = np.exp(-np.logaddexp(0., -2. * u))  # 0.5 (1 + tanh(u)), without the cancellation
  want = z * s
  want_grad = s + z * s * (1. - s) * 2. * c * (1. + 3. * 0.044715 * z ** 2)
  h = jnp.asarray(z, jnp.float32)[None, :]
  got, vjp = jax.vjp(lambda h: bias_gelu(h, jnp.zeros((h.shape[-1],)), interpret=True), h)
  got_grad = vjp(jnp.ones_like(h))[0]
  # The gradient's two terms cancel at its root (z = -0.7518, GELU's minimum) in any form.
  near_root = np.abs(z + 0.7518) < 0.05
  for name, g, w, skip in (("gelu", got, want, np.zeros_like(near_root)),
                           ("gradient", got_grad, want_grad, near_root)):
    g = np.asarray(g, np.float64)[0]
    assert np.all(np.isfinite(g)), name
    tiny = np.abs(w) < 1e-30  # below float32's range: (near) zero is right
    kept = ~tiny & ~skip
    rel = np.abs(g - w)[kept] / np.abs(w)[kept]
    assert rel.max() < 2e-5, (name, z[kept][rel.argmax()], rel.max())
    assert np.all(np.abs(g[tiny]) < 1e-20), name  # the capped exponent leaves crumbs at z = -1e4
    assert np.all(np.abs(g - w)[near_root] < 1e-6), name
