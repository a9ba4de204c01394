"""`bigvis aot`: TPU slice names, scan-aware FLOP counts, and compiling a tiny ViT for a TPU slice on CPU.

The compiling tests need libtpu (the `aot` extra) and are skipped without it.
"""
import jax
import jax.numpy as jnp
import pytest

from bigvis import aot, cli, config as config_lib
from bigvis.errors import UserError
from bigvis.models.vit import parse_variant

needs_libtpu = pytest.mark.skipif(aot._libtpu_version() is None,
                                  reason="libtpu is not installed (pip install -e '.[aot]')")


@pytest.mark.parametrize("name, libtpu_name, chips", [
    ("v5p-256", "v5p:4x4x8", 128),      # v5p and v4 names count TensorCores, two per chip
    ("v5p-8", "v5p:2x2x1", 4),
    ("v4-32", "v4:2x2x4", 16),
    ("v4-1024", "v4:8x8x8", 512),
    ("v5e-16", "v5e:4x4", 16),          # v5e and v6e names count chips
    ("v5litepod-8", "v5e:2x4", 8),
    ("v6e-1", "v6e:1x1", 1),
    ("v6e-256", "v6e:16x16", 256),
    ("v5p:4x4x12", "v5p:4x4x12", 192),  # a chip grid as given
])
def test_topology_names(name, libtpu_name, chips):
  topo = aot.parse_topology(name)
  assert (topo.libtpu_name, topo.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name, compiler_name, gpus", [("h100-1", "1x1x1", 1), ("h100-8", "1x1x8", 8),
                                                      ("h100-64", "1x8x8", 64)])
def test_gpu_topology_names(name, compiler_name, gpus):
  topo = aot.parse_topology(name)
  assert (topo.libtpu_name, topo.chips, topo.generation.platform) == (compiler_name, gpus, "cuda")


@pytest.mark.parametrize("name", ["h100-0", "h100-12", "h100"])
def test_unknown_gpu_topology_names_the_valid_forms(name):
  with pytest.raises(UserError, match=f"topology '{name}'; .*or h100-N for N H100 GPUs"):
    aot.parse_topology(name)


def _cuda_plugin() -> bool:
  import importlib.util
  try:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


def test_gpu_target_without_the_cuda_plugin_is_one_line(capsys):
  if _cuda_plugin():
    pytest.skip("JAX's CUDA plugin is installed here")
  assert cli.main(["aot", "--config", "vit_ti_digits", "--topology", "h100-1"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "CUDA plugin" in err and "EXTRAS=gpu" in err


def test_transposes_are_counted_in_the_h100_hlo_of_the_vit_step():
  """The optimised HLO of ViT-B/16's step from the H100 (benchmarks/results) has 9 transposes."""
  import gzip
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                      "h100_2026-11-26_vit_b16_default_after_optimizations.hlo.txt.gz")
  with gzip.open(path, "rt") as f:
    assert aot.count_transposes(f.read()) == 9
  assert aot.count_transposes("%t = bf16[4,2]{1,0} transpose(%x), dimensions={1,0}\n"
                              "%f = bf16[4,2]{1,0} fusion(%x), calls=%fused_transpose") == 1


@pytest.mark.parametrize("name", ["v7-8", "v5p-12", "v5p-2", "v5e:2x2x1", "tpu", "v5e-0"])
def test_unknown_topology_names_the_valid_forms(name):
  with pytest.raises(UserError, match="v5p-256"):
    aot.parse_topology(name)


def test_unknown_topology_is_one_line_on_the_cli(capsys):
  assert cli.main(["aot", "--config", "vit_ti_digits", "--topology", "v9-8"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unknown TPU topology 'v9-8'" in err and "v5e-16" in err


def test_flops_count_a_scanned_loop_length_times():
  w, x = jnp.ones((6, 32, 32)), jnp.ones((8, 32))

  def scanned(w, x):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

  def unrolled(w, x):
    for i in range(w.shape[0]):
      x = jnp.tanh(x @ w[i])
    return x.sum()

  one_layer = 2 * 8 * 32 * 32
  for f in (scanned, unrolled):
    assert aot.jaxpr_flops(jax.make_jaxpr(f)(w, x)) == 6 * one_layer
  # The gradient (for w): the forward, 6 weight gradients and the activation gradients. Unrolled,
  # JAX skips the first layer's (x is not differentiated): 6 + 6 + 5; the scanned body computes
  # its carry's gradient in every iteration: 6 + 6 + 6.
  assert aot.jaxpr_flops(jax.make_jaxpr(jax.grad(unrolled))(w, x)) == 17 * one_layer
  assert aot.jaxpr_flops(jax.make_jaxpr(jax.grad(scanned))(w, x)) == 18 * one_layer


class _H100:
  platform, device_kind, compute_capability = "gpu", "NVIDIA H100 80GB HBM3", "9.0"


def test_flops_count_attention_and_the_kernels_as_xla_ops():
  """A cuDNN or Pallas call is one opaque primitive in a jaxpr: `bigvis aot` counts the model with
  them as XLA's ops over the same tokens (cuDNN's padded to a multiple of 8), so attention's matmuls
  are counted; a Pallas kernel's body (one block's) never is."""
  from bigvis import models
  base = dict(name="vit", variant="mu/4", image_size=16, num_classes=3, dtype="bfloat16",
              last_block_pooled=False)  # 16 patches and the class token: 17 tokens
  cudnn = models.counted_as_xla(dict(base, attention_impl="cudnn"), _H100())
  assert (cudnn.attention_impl, cudnn.seq_pad_multiple, cudnn.norm_impl, cudnn.gelu_impl) == ("xla", 8, "xla", "xla")
  kernels = models.counted_as_xla(base, _H100())  # auto: bigvis's attention, norm and GELU kernels
  assert (kernels.attention_impl, kernels.seq_pad_multiple, kernels.norm_impl) == ("xla", 0, "xla")
  x = jnp.zeros((2, 16, 16, 3))

  def forward_flops(cfg):
    model = models.build_model(cfg)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return aot.jaxpr_flops(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
  opaque = forward_flops(dict(base, attention_impl="pallas_interpret", **models.XLA_KERNELS))
  v = parse_variant("mu/4")
  # q k^T and the weights times v: 2 x 2 * batch * tokens^2 * width per layer
  assert forward_flops(kernels) - opaque == v["depth"] * 2 * 2 * 2 * 17 * 17 * v["width"]
  assert forward_flops(cudnn) > forward_flops(kernels)  # 24 tokens' GEMMs and attention


@needs_libtpu
def test_tiny_vit_compiles_for_a_tpu_slice_and_fits():
  config = config_lib.load("vit_ti_digits", ["batch_size=32", "model.scan=True", "model.remat_policy='full'"])
  r = aot.compile_for_topology(config, "v4-8")  # 4 chips, 2x2x1
  assert r["chips"] == 4 and r["device_kind"] == "TPU v4" and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert r["fits"] and 0 < r["total_bytes_per_chip"] < r["hbm_bytes_per_chip"]
  # libtpu may report no temporaries (this step since its gradient norm stacks the leaves); its peak
  # then counts them, and the fit is judged on whichever is more.
  assert r["memory"]["argument_bytes"] > 0 and r["memory"]["xla_peak_bytes"] > r["memory"]["argument_bytes"]
  assert r["total_bytes_per_chip"] >= r["memory"]["xla_peak_bytes"]
  # remat recomputes part of the forward pass: more FLOPs executed than the model needs
  assert r["flops_per_chip"] > r["model_flops_per_chip"] > 0
  assert r["step_s"] > 0 and 0 < r["mfu"] < r["assumed_utilization"]
  assert r["platform"] == "tpu" and isinstance(r["transposes"], int) and r["transposes"] >= 0
  assert f"| {r['transposes']} transposes" in aot.format_report(r)
  # Data parallel: the chips exchange the float32 gradients (a few scalars besides), nothing else; the
  # scanned blocks' all-reduces, in the loop's body, count once per layer.
  assert set(r["collectives"]) == {"all-reduce"}, r["collectives"]
  assert 4 * r["params"] <= r["collectives"]["all-reduce"]["bytes"] <= 1.01 * 4 * r["params"]
  assert "collectives per chip and step (ops, bytes of their results): all-reduce" in aot.format_report(r)
  # Data parallel keeps every parameter whole on every chip by design: said only under fsdp or tensor.
  assert r["params_per_chip"] == r["params_even_split"] == r["params"] and r["most_copied_params"] == []
  assert "parameters per chip" not in aot.format_report(r)
  split = dict(r, mesh={"data": 1, "fsdp": 4, "tensor": 1}, params_per_chip=1_250_000, params_even_split=1_000_000,
               most_copied_params=[("head/kernel", 7)])
  assert ("parameters per chip: 1.2M, 1.250x an even split over fsdp x tensor; the most copied: head/kernel (+7)"
          in aot.format_report(split))


@needs_libtpu
def test_too_big_for_the_chip_exits_1(capsys):
  # Shapes only: nothing of this batch is allocated on the host.
  assert cli.main(["aot", "--config", "vit_ti_digits", "--topology", "v5e-1", "--set", "batch_size=4000000"]) == 1
  out, err = capsys.readouterr()
  assert '"fits": false' in out.splitlines()[-1] and "DOES NOT FIT" in out
  assert len(err.strip().splitlines()) == 1 and "does not fit on v5e-1" in err


@pytest.mark.skipif(not _cuda_plugin(), reason="JAX's CUDA plugin is not installed (make install EXTRAS=gpu)")
def test_compiles_a_cudnn_vit_for_an_h100_without_a_gpu():
  config = config_lib.load("vit_ti_digits", ["model.dtype=bfloat16", "model.pool_type=tok", "batch_size=64"])
  r = aot.compile_for_topology(config, "h100-1")
  assert r["fits"] and r["device_kind"].startswith("NVIDIA H100") and r["chips"] == 1
  assert r["platform"] == "cuda" and r["libtpu"] is None
  assert 0 < r["total_bytes_per_chip"] < 2 * 2**30 and r["transposes"] < 20
  assert r["collectives"] == {}


@pytest.mark.skipif(not _cuda_plugin(), reason="JAX's CUDA plugin is not installed (make install EXTRAS=gpu)")
def test_data_parallel_gpus_exchange_only_gradients():
  """On 8 H100s with cuDNN attention (where the encoder pins its input's layout) the data-parallel
  step all-reduces its gradients and gathers nothing: the pin had gathered the whole batch's
  activations onto every GPU, forward and backward (benchmarks/README.md, sixteenth session)."""
  config = config_lib.load("vit_ti_digits", ["model.dtype=bfloat16", "model.pool_type=tok", "batch_size=64"])
  r = aot.compile_for_topology(config, "h100-8")
  assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert "all-gather" not in r["collectives"], r["collectives"]
  assert r["collectives"]["all-reduce"]["bytes"] <= 1.01 * 4 * r["params"], r["collectives"]
