"""`bigvis bench` and the benchmark scripts, on tiny models and the 8-device CPU mesh."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvis import bench, cli
from bigvis import config as config_lib
from bigvis.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ("step_ms", "examples_per_sec", "examples_per_sec_per_device", "tflops_per_sec",
            "model_flops_per_example", "xla_flops_per_example", "peak_memory_gib", "compile_s")


def _positive(result: dict) -> None:
  for key in POSITIVE:
    assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])
  assert math.isfinite(result["final_loss"])
  assert result["mfu"] is None  # CPU: no known peak
  assert 0 < result["dispatch_ms"] <= result["step_ms"]  # handing the steps over is part of their time


def test_bench_cli_on_8_devices_matches_one_device_flops(capsys):
  assert cli.main(["bench", "--config", "vit_ti_digits", "--set", "batch_size=16", "--steps", "1",
                   "--warmup", "1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  eight = json.loads(lines[0])
  _positive(eight)
  assert eight["devices"] == 8 and eight["batch_size"] == 16
  assert eight["examples_per_sec_per_device"] == pytest.approx(eight["examples_per_sec"] / 8)

  config = config_lib.load("vit_ti_digits", ["batch_size=16", "mesh.data=1"])
  one = bench.benchmark(config, steps=1, warmup=0, devices=jax.devices()[:1])
  _positive(one)
  assert one["devices"] == 1
  # XLA's cost analysis is per device (were it global, 8 devices would read 8x): x devices / batch it
  # gives the 1-device figure plus the AdamW update each device repeats on its replicated params.
  ratio = eight["xla_flops_per_example"] / one["xla_flops_per_example"]
  assert 0.95 < ratio < 1.25, ratio
  assert one["model_flops_per_example"] == eight["model_flops_per_example"]
  # Unrolled, unpadded, no remat: the compiled step's FLOPs are the model FLOPs (plus the optimizer).
  assert one["xla_flops_per_example"] == pytest.approx(one["model_flops_per_example"], rel=0.05)


def test_bench_rejects_zero_steps():
  config = config_lib.load("vit_ti_digits", ["batch_size=8"])
  with pytest.raises(UserError, match="--steps"):
    bench.benchmark(config, steps=0)


def _script(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_input_pipeline_benchmark_prints_ratio():
  proc = _script(["benchmarks/input_pipeline.py", "--num-images", "16", "--seconds", "1", "--repeats", "1",
                  "--batch", "8", "--variants", "tfdata_decode_crop_fused", "--pillow", "shm"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert json.loads(lines[0])["native_resize"] is True  # timed with bigvis's own resize op
  last = lines[-1]
  assert last.startswith("ratio_vs_pillow=")
  assert float(last.split("=")[1]) > 0


def test_bench_runs_without_tensorflow():
  """A JAX-only install (e.g. a GPU image without TensorFlow) can still time configs and list peers' runs."""
  code = ("import sys\n"
          "for m in ('tensorflow', 'tensorflow_text', 'tensorflow_datasets'): sys.modules[m] = None\n"
          "from bigvis import cli\n"
          "sys.exit(cli.main(['bench', '--config', 'vit_ti_digits', '--set', 'batch_size=8', '--set', 'mesh.data=1',"
          " '--steps', '1', '--warmup', '0']))\n")
  proc = _script(["-c", code])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["examples_per_sec"] > 0


def test_peers_cpu_smoke_runs_bigvis(tmp_path):
  out = str(tmp_path / "peers.jsonl")
  proc = _script(["benchmarks/peers.py", "--cpu-smoke", "--skip-torch", "--steps", "1", "--warmup", "1",
                  "--only", "bigvis_vit_ti_digits_pad8", "--tag", "_t", "--out", out])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  run = next(r for r in rows if r["name"] == "bigvis_vit_ti_digits_pad8_t")
  assert run["examples_per_sec"] > 0 and "pad=8" in run["model"]
  assert "vs peer" in proc.stdout  # the table
  # --table rebuilds the table from the saved lines (several invocations on one GPU share one file).
  table = _script(["benchmarks/peers.py", "--table", out])
  assert table.returncode == 0 and "bigvis_vit_ti_digits_pad8_t" in table.stdout
  assert "jax_bf16_matmul" in table.stdout


def test_peers_only_with_an_unknown_run_is_an_error():
  proc = _script(["benchmarks/peers.py", "--dry-run", "--only", "bigvis_vit_b16_gap_cudn"])
  assert proc.returncode != 0 and "bigvis_vit_b16_gap_cudn" in proc.stderr


def test_peers_kernel_tiles_reach_the_worker_before_the_step_is_traced(tmp_path, monkeypatch):
  """`peers.py --kernel-tiles FILE` (the sweep's `--tiles-out`): every bigvis run sets those tilings
  before its step is traced and reports them; a wrong kernel or key fails the dry run, before a GPU is
  held; a missing file stops the script."""
  peers = _benchmark_module("peers")
  from bigvis.models import pallas_kernels
  monkeypatch.setattr(pallas_kernels, "TILES", {k: dict(v) for k, v in pallas_kernels.TILES.items()})
  tiles = {"bias_gelu_forward": dict(rows=16, cols=128, warps=8, stages=2)}
  path = tmp_path / "tiles.json"
  path.write_text(json.dumps(tiles))
  specs = peers._run_specs(peers.parse_args(["--cpu-smoke", "--only", "bigvis_vit_ti_digits_pad8",
                                             "--kernel-tiles", str(path)]))
  (spec,) = [s for s in specs if s["kind"] == "bigvis"]
  seen = []
  monkeypatch.setattr(bench, "benchmark", lambda config, **kw: seen.append(
      dict(pallas_kernels.TILES["bias_gelu_forward"])) or {"examples_per_sec": 1.0})
  result = peers._worker_bigvis(spec)
  assert seen == [tiles["bias_gelu_forward"]] and result["kernel_tiles"] == tiles

  path.write_text(json.dumps({"bias_gelu_forwrd": tiles["bias_gelu_forward"]}))
  specs = peers._run_specs(peers.parse_args(["--cpu-smoke", "--only", "bigvis_vit_ti_digits_pad8",
                                             "--kernel-tiles", str(path)]))
  with pytest.raises(UserError, match="bias_gelu_forwrd"):
    peers.check_specs(specs)
  path.write_text(json.dumps({"bias_gelu_forward": dict(rows=16, cols=128, warps=8)}))
  with pytest.raises(UserError, match="stages"):
    pallas_kernels.set_tiles(json.loads(path.read_text()))
  with pytest.raises(SystemExit, match="missing.json"):
    peers._run_specs(peers.parse_args(["--cpu-smoke", "--kernel-tiles", str(tmp_path / "missing.json")]))
  path.write_text("{}")  # a sweep whose every tiling failed: refused, not run as "tuned" with the defaults
  with pytest.raises(SystemExit, match="names no kernel"):
    peers._run_specs(peers.parse_args(["--cpu-smoke", "--kernel-tiles", str(path)]))
  # A loop step that does not divide a backward's rows would leave rows unwritten: refused.
  with pytest.raises(UserError, match="powers of two"):
    pallas_kernels.set_tiles({"bias_gelu_backward": dict(rows=12, step_rows=8, cols=256, warps=4, stages=1)})


def test_peers_gpu_runs_have_valid_configs():
  """Every bigvis run `peers.py --large` would start on a GPU loads and traces (shapes only)."""
  peers = _benchmark_module("peers")
  specs = peers._run_specs(peers.parse_args(["--large", "--skip-torch"]))
  lines = {line.split(":")[0]: line for line in peers.check_specs(specs)}
  assert sum("params" in line for line in lines.values()) == 9
  # Each variant runs what its name says (the overrides reached the config).
  assert "attn=auto" in lines["bigvis_vit_b16_default"] and "pool=tok" in lines["bigvis_vit_b16_default"]
  assert "attn=xla pool=tok" in lines["bigvis_vit_b16_tok_xla"]
  assert "attn=cudnn pool=gap pad=0" in lines["bigvis_vit_b16_gap_cudnn"]
  assert "attn=cudnn pool=tok pad=8" in lines["bigvis_vit_b16_pad8_cudnn"]
  assert lines["bigvis_clip_b16_pad8_cudnn"].count("attn=cudnn") == 2
  assert lines["bigvis_clip_b16_pad8_cudnn"].count("pad=8") == 2
  for big, n in (("bigvis_vit_l16_gap_cudnn", "304.3M"), ("bigvis_vit_h14_gap_cudnn", "632.0M")):
    assert "attn=cudnn pool=gap pad=0 remat=none scan=False patch=matmul" in lines[big] and f"{n} params" in lines[big]
  # The defaults: the GELU and norm kernels decided for the device (XLA's on this CPU host, GELU
  # recomputed).
  assert "gelu=auto:xla+recomputed norm=auto:xla" in lines["bigvis_vit_b16_default"]
  changed = peers.check_specs(peers._run_specs(peers.parse_args(
      ["--skip-torch", "--only", "bigvis_vit_b16_default", "--bigvis-set", "model.recompute_gelu=false",
       "--bigvis-set", "model.norm_impl=pallas", "--bigvis-set", "model.residual_in_norm=false"])))
  assert any(line.endswith("patch=matmul gelu=auto:xla norm=pallas, 86.6M params, batch 256") for line in changed), changed
  adds = peers.check_specs(peers._run_specs(peers.parse_args(  # the residual adds: on by default
      ["--skip-torch", "--only", "bigvis_vit_b16_default", "--bigvis-set", "model.norm_impl=pallas"])))
  assert any(line.endswith("gelu=auto:xla+recomputed norm=pallas+residual, 86.6M params, batch 256") for line in adds), adds
  under_dropout = peers.check_specs(peers._run_specs(peers.parse_args(  # where the kernels take no adds
      ["--skip-torch", "--only", "bigvis_vit_b16_default", "--bigvis-set", "model.norm_impl=pallas",
       "--bigvis-set", "model.dropout=0.1"])))
  assert any(line.endswith("norm=pallas, 86.6M params, batch 256") for line in under_dropout), under_dropout
  kernel = peers.check_specs(peers._run_specs(peers.parse_args(
      ["--skip-torch", "--only", "bigvis_vit_b16_default", "--bigvis-set", "model.gelu_impl=pallas"])))
  assert any(line.endswith("gelu=pallas norm=auto:xla, 86.6M params, batch 256") for line in kernel), kernel
  by_xla = peers.check_specs(peers._run_specs(peers.parse_args(
      ["--skip-torch", "--only", "bigvis_vit_b16_default", "--bigvis-set", "model.gelu_impl=xla"])))
  assert any(line.endswith("gelu=xla+recomputed norm=auto:xla, 86.6M params, batch 256") for line in by_xla), by_xla


def test_profile_and_kernel_breakdown(tmp_path):
  """`bench --profile` leaves a trace that kernel_breakdown.py sums by kind of kernel."""
  prof = str(tmp_path / "prof")
  proc = _script(["-m", "bigvis.cli", "bench", "--config", "vit_ti_digits", "--set", "batch_size=8",
                  "--set", "mesh.data=1", "--steps", "1", "--warmup", "1", "--profile", prof, "--profile-steps", "2"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["profile_steps"] == 2
  out = _script(["benchmarks/kernel_breakdown.py", prof, "--steps", "2", "--json"])
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["kernels"] > 0 and 0 < result["busy_ms_per_step"] <= result["span_ms_per_step"] + 1e-6
  assert "matmul" in result["by_category_ms"]


def _benchmark_module(name: str):
  """A script under benchmarks/ imported as a module."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_kernel_breakdown_of_the_h100_trace():
  """The kept H100 trace of a B/16 step reads as benchmarks/README.md's table says."""
  out = _script(["benchmarks/kernel_breakdown.py", "benchmarks/results/h100_2026-11-26_vit_b16_gap_cudnn_trace.json.gz",
                 "--steps", "3", "--json"])
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["source"] == "device"
  for kind, ms in (("matmul", 33.86), ("reduction", 13.74), ("elementwise fusion", 11.71), ("attention", 10.58),
                   ("convolution", 2.33), ("copy/transpose", 0.34)):
    assert r["by_category_ms"][kind] == pytest.approx(ms, abs=0.01), kind
  assert r["busy_ms_per_step"] == pytest.approx(72.36, abs=0.01)
  assert r["span_ms_per_step"] == pytest.approx(73.12, abs=0.01)


def test_peers_table_of_the_kept_gpu_runs():
  """`peers.py --table` on the kept H100 and H200 lines gives the READMEs' ratios to timm and open_clip."""
  peers = _benchmark_module("peers")

  def rows_of(name):
    with open(os.path.join(REPO, "benchmarks", "results", name)) as f:
      return {line.split()[0]: line.split() for line in peers.table([json.loads(l) for l in f]).splitlines()[1:]}
  rows = rows_of("h200_2026-11-26.jsonl")  # README "Speed"
  assert rows["bigvis_vit_b16_default_mm"][1:3] == ["3862.7", "66.3"] and rows["bigvis_vit_b16_default_mm"][-1] == "1.10"
  assert rows["bigvis_vit_b16_default"][-1] == "1.07"
  assert rows["bigvis_vit_b16_default_mm_b512"][-1] == "1.11"
  assert rows["bigvis_clip_b16_default_mm"][1] == "3080.7" and rows["bigvis_clip_b16_default_mm"][-1] == "1.10"
  assert rows["bigvis_vit_b16_default_rg"][-1] == "1.05" and rows["bigvis_vit_b16_default_nt"][-1] == "1.04"
  rows = rows_of("h100_2026-11-26_s2.jsonl")
  assert rows["bigvis_vit_b16_default_conv_patch"][1:3] == ["3445.3", "74.3"]
  assert rows["bigvis_vit_b16_default_conv_patch"][-1] == "1.06"
  assert rows["bigvis_vit_b16_default_conv_patch_separate_qkv"][-1] == "1.04"
  assert rows["bigvis_vit_b16_default_matmul_patch"][-1] == "0.95"
  rows = rows_of("h200_2026-11-27_s14.jsonl")  # the best figures: README "Speed", benchmarks/README.md
  assert rows["bigvis_vit_b16_default"][1:3] == ["4305.1", "59.5"] and rows["bigvis_vit_b16_default"][-1] == "1.24"
  assert rows["bigvis_clip_b16_default_text_pallas_attention"][1:3] == ["3506.7", "73.0"]
  assert rows["bigvis_clip_b16_default_text_pallas_attention"][-1] == "1.26"
  assert rows["bigvis_vit_b16_default_whole_last_block"][2] == "62.7"
  # The twenty-first session's: timm at batches 256 and 512 in one file, each bigvis run against
  # timm at its own batch (against the 512 one, the 256 default would read 1.21).
  rows = rows_of("h200_2026-11-28_s21.jsonl")
  assert rows["bigvis_vit_b16_default"][1:3] == ["4292.0", "59.6"] and rows["bigvis_vit_b16_default"][-1] == "1.25"
  assert rows["bigvis_vit_b16_default_tuned_tiles"][1:3] == ["4357.0", "58.8"]
  assert rows["bigvis_vit_b16_default_tuned_tiles"][-1] == "1.27"
  assert rows["bigvis_vit_b16_default_b512"][1:3] == ["4410.1", "116.1"] and rows["bigvis_vit_b16_default_b512"][-1] == "1.25"
  assert rows["bigvis_clip_b16_default"][1:3] == ["3513.9", "72.9"] and rows["bigvis_clip_b16_default"][-1] == "1.28"
  rows = rows_of("h200_2026-11-28_s21_confirm.jsonl")
  assert rows["bigvis_vit_b16_default_new_tiles"][1:3] == ["4315.5", "59.3"]
  assert rows["bigvis_vit_b16_default_new_tiles"][-1] == "1.26"


def test_model_flops_ignore_how_the_model_is_computed():
  """Scan, remat, padding and the attention kernel change no model FLOPs (ViT and both CLIP towers;
  whole last blocks, as scanned towers compute them)."""
  from bigvis import metrics
  from data_pipelines.synthetic import synthetic_batch
  how = {"scan": True, "remat_policy": "full", "seq_pad_multiple": 8, "attention_impl": "cudnn"}
  for name in ("vit_ti_digits", "clip_ti_digits"):
    towers = ("model.image.", "model.text.") if name.startswith("clip") else ("model.",)
    whole = [f"{t}last_block_pooled=false" for t in towers]
    plain = config_lib.load(name, whole)
    batch = synthetic_batch(plain.model, 2, 0)
    other = config_lib.load(name, whole + [f"{t}{k}={v}" for t in towers for k, v in how.items()])
    want = metrics.model_flops_per_example(plain, batch)
    assert want and metrics.model_flops_per_example(other, batch) == want, name
  # They count what the model computes: a last block that computes only the class token (unrolled, the
  # default) needs fewer than a whole one, which a scanned tower runs.
  tok = config_lib.load("vit_ti_digits", ["model.pool_type=tok"])
  batch = synthetic_batch(tok.model, 2, 0)
  pooled, whole, scanned = (metrics.model_flops_per_example(config_lib.load("vit_ti_digits", ["model.pool_type=tok", *o]),
                                                            batch)
                            for o in ([], ["model.last_block_pooled=false"], ["model.scan=true"]))
  assert pooled < whole == scanned


def test_kernel_categories_and_busy_union():
  kb = _benchmark_module("kernel_breakdown")
  assert kb.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
  assert kb.category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
  assert kb.category("loop_add_fusion_12") == "elementwise fusion"
  assert kb.category("input_reduce_fusion_3") == "reduction"
  assert kb.category("transpose_fusion") == "copy/transpose"
  assert kb.category("loop_convert_multiply_fusion_11") == "elementwise fusion"  # "convert" is no convolution
  assert kb.category("sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
  assert kb.category("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)") == "attention"
  assert kb.category("bigvis_pallas_layernorm_backward") == "pallas (bigvis)"  # not "reduction"/"matmul"
  # Overlapping kernels on two streams count once: [0,10) u [5,12) u [20,25) = 17 us.
  assert kb.busy_time([{"ts": 0, "dur": 10}, {"ts": 5, "dur": 7}, {"ts": 20, "dur": 5}]) == 17
  # Only the device's stream threads are kernels; a summary line beside them is not counted.
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Modules"}}]
  kernel = {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 5, "name": "loop_add_fusion"}
  module = {"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 50, "name": "jit_with_rules"}
  assert kb.device_events({"traceEvents": meta + [kernel, module]}, r"/device:GPU") == ([kernel], "device")


def test_gpu_session_script_names_real_runs_and_config_keys():
  """A typo in `gpu_session.sh` would only show on a lent GPU, whose minutes are scarce: every
  `--only` name must be a peers run and every override must load on the experiments it targets."""
  import re
  peers = _benchmark_module("peers")
  with open(os.path.join(REPO, "benchmarks", "gpu_session.sh")) as f:
    script = f.read()
  names = {s["name"] for s in peers._run_specs(peers.parse_args(["--large", "--no-ceiling"]))}
  only = [n for group in re.findall(r"--only ([\w,.-]+)", script) for n in group.split(",")]
  assert only and set(only) <= names, set(only) - names
  overrides = re.findall(r"--bigvis-set ([\w.]+=[^\s)]+)", script)  # also inside bash arrays: (...)
  assert overrides
  for override in overrides:  # CLIP keys go to the CLIP experiment, the rest to ViT-B/16
    experiment = "experiments/clip_vitb16.py" if override.startswith(("model.image", "model.text")) \
        else "experiments/vit_b16_i1k.py"
    config_lib.load(os.path.join(REPO, experiment), [override])
  assert {"model.gelu_impl=xla", "model.image.gelu_impl=xla", "model.norm_impl=xla"} <= set(overrides)
  for override in re.findall(r"--set (\S+=[^\s)]+)", script):
    config_lib.load(os.path.join(REPO, "experiments/vit_b16_i1k.py"), [override])
  # Every part's steps are functions the script defines, and `all` runs each of them.
  defined = set(re.findall(r"^(\w+)\(\) \{", script, re.M))
  parts = dict(re.findall(r"^  ([\w]+)\) steps=\(([^)]*)\)", script, re.M))
  assert set(parts) == {"1", "2", "goals", "tune", "all"}, parts
  for part, steps in parts.items():
    assert steps.split() and set(steps.split()) <= defined, (part, set(steps.split()) - defined)
  assert set().union(*(parts[p].split() for p in ("1", "2", "goals", "tune"))) == set(parts["all"].split())
  assert {"model.attention_impl=pallas", "model.image.attention_impl=pallas"} <= set(overrides)


_GPU_HLO = """HloModule jit_step

%fused_add (a: bf16[4,16], b: bf16[4,16]) -> bf16[4,16] {
  ROOT %add = bf16[4,16]{1,0} add(%a, %b)
}

ENTRY %main (p0: bf16[4,8], p1: bf16[8,16], p2: f32[16], p3: f32[16], p4: f32[16], p5: f32[16]) -> bf16[4,16] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,16]{1,0} parameter(1)
  %p2 = f32[16]{0} parameter(2)
  %cublas-gemm.1 = (bf16[4,16]{1,0}, s8[64]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/encoder/block03/mlp/dot_general"}
  %get-tuple-element.7 = bf16[4,16]{1,0} get-tuple-element(%cublas-gemm.1), index=0
  %pallas_call.2 = bf16[4,16]{1,0} custom-call(%get-tuple-element.7, %p2), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %loop_add_fusion.12 = bf16[4,16]{1,0} fusion(%get-tuple-element.7, /*index=1*/%pallas_call.2), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/encoder/block11/add"}
}
"""


def test_hlo_traffic_sums_operands_and_outputs_per_kernel_kind():
  """benchmarks/hlo_traffic.py: bytes per kernel from an optimised HLO module, GEMMs and attention
  apart from the memory-bound rest (XLA's fusions and Pallas kernels)."""
  traffic = _benchmark_module("hlo_traffic")
  assert traffic.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0})") == 28
  records = {r["kind"]: r for r in traffic.traffic(_GPU_HLO)}
  assert set(records) == {"custom-call __cublas$lt$matmul", "custom-call __gpu$xla.gpu.triton", "loop_add_fusion"}
  assert (records["custom-call __cublas$lt$matmul"]["bytes_in"], records["custom-call __cublas$lt$matmul"]["bytes_out"]) \
      == (64 + 256, 128 + 64)
  assert records["custom-call __gpu$xla.gpu.triton"]["bytes_in"] == 128 + 64
  # Operand lists carry /*index=N*/ comments past the fifth operand: they must not hide an operand.
  assert records["loop_add_fusion"]["bytes_in"] == 256 and records["loop_add_fusion"]["op"] == "jit(step)/encoder/blockNN/add"
  assert traffic.memory_bound_bytes(list(records.values())) == (128 + 64 + 128) + (256 + 128)
  summary = traffic.report(list(records.values()), top=2)
  assert "outside GEMMs and attention" in summary and "heaviest 2" in summary
  assert "3 kernels, 3 of them writing under 800 kB" in summary  # the count the tiny kernels' cost follows
  # A real module: a CPU compile of a fused elementwise step reads both inputs and writes the result.
  import jax.numpy as jnp
  text = jax.jit(lambda x, y: jnp.tanh(x * 2.0 + y)).lower(jnp.ones((64, 32)), jnp.ones((64, 32))).compile().as_text()
  assert sum(r["bytes_in"] + r["bytes_out"] for r in traffic.traffic(text)) == 3 * 64 * 32 * 4
  with pytest.raises(ValueError, match="no ENTRY computation"):
    traffic.traffic("not hlo")


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_pallas_kernels_agree_with_xla_through_the_gpu_sessions_check(capsys, dtype, tolerance):
  """bigvis's Pallas kernels (interpreted) against XLA's fusions, through
  benchmarks/pallas_kernels_check.py, which a GPU session runs first: the LayerNorm's output and its
  x (residual gradient included), scale and bias gradients; GELU's output and its h and bias
  gradients, also as the block calls it with the residual add before it (in the kernel, or by XLA),
  biases added before and after it (whose gradients the kernel sums) and with three copies of its
  output (whose gradients it adds); attention's output and its q, k, v and query-bias gradients
  against the model's attention (XLA's here) on the tokens padded as the ViT pads them. 130 rows (not
  a whole number of 4- or 64-row blocks), 24 features (loaded as 32 lanes, the tail masked), 300
  hidden units (not a whole number of 256-column blocks), 13 tokens in 2 heads (not a whole 64-row
  block). In bfloat16 XLA's fusions round every step while the kernels compute in float32."""
  check = _benchmark_module("pallas_kernels_check")
  assert check.main(["--rows", "130", "--width", "24", "--mlp", "300", "--dtype", dtype, "--length", "13",
                     "--heads", "2", "--head-dim", "16", "--steps", "1", "--calls", "1", "--interpret"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["kernel"] for r in lines] == ["layernorm", "layernorm_biases", "layernorm_biases_added_by_xla",
                                          "layernorm_three_copies", "bias_gelu", "attention"]
  assert lines[-1]["shape"] == [8, 13, 2, 16]  # 130 rows // 16 (13 padded to 8's multiple) examples
  for r in lines:
    assert r["max_rel_err"] < tolerance and r["xla_ms"] > 0 and r["pallas_ms"] > 0, r
    # the loss, then each gradient
    assert len(r["rel_errs"]) == {"bias_gelu": 3, "attention": 5}.get(r["kernel"], 7), r
  gelu = lines[-2]
  if dtype == "bfloat16":  # against GELU in float32 the kernel's error is its bfloat16 outputs' rounding
    assert len(gelu["xla_rel_errs_vs_f32"]) == 3 and max(gelu["pallas_rel_errs_vs_f32"]) < 1e-2, gelu
  else:
    assert "pallas_rel_errs_vs_f32" not in gelu


def test_attention_check_runs_the_model_s_attention_on_the_tokens_it_pads(monkeypatch):
  """The attention check's reference is what `attention_impl='auto'` runs: on an NVIDIA GPU cuDNN's,
  which refuses 197 tokens, so they are padded (to 200) and the padding masked, as the ViT does;
  the Pallas kernels take them unpadded. (Resolved here as on a GPU; cuDNN's call stood in for by
  XLA's.)"""
  check = _benchmark_module("pallas_kernels_check")
  monkeypatch.setattr(check, "resolve_attention_impl", lambda impl, *a: "cudnn" if impl == "auto" else impl)
  seen, real = [], check.dot_product_attention

  def recording(q, k, v, *, mask, causal, impl, query_bias=None):
    seen.append((impl, q.shape[1], None if mask is None else int(mask[0].sum())))
    return real(q, k, v, mask=mask, causal=causal, impl="xla" if impl == "cudnn" else impl, query_bias=query_bias)
  monkeypatch.setattr(check, "dot_product_attention", recording)
  model, pallas, args, f32 = check.attention_case(2, 13, 2, 16, jnp.float32, interpret=True)
  np.testing.assert_allclose(model(*args), pallas(*args), rtol=1e-4, atol=1e-5)  # a sum of 832 terms
  assert seen == [("cudnn", 16, 13)], seen  # 13 tokens padded to 16, the 3 masked
  f32(*args)
  assert seen[-1] == ("xla", 13, None), seen


def test_kernel_timing_dispatches_calls_back_to_back_and_waits_once(monkeypatch):
  """The kernels' times are the device's: `calls` calls dispatched before one wait, per timing (a wait
  after each call timed the host's dispatch and wait, as long as the kernel, in the twelfth session)."""
  check = _benchmark_module("pallas_kernels_check")
  events = []
  monkeypatch.setattr(check.jax, "block_until_ready", lambda x: events.append(("wait", len(jax.tree.leaves(x)))) or x)
  clock = iter(range(100))
  monkeypatch.setattr(check.time, "perf_counter", lambda: float(next(clock)))  # each timing reads 2 ticks

  def fn(x):
    events.append("call")
    return x

  ms = check._time_ms(fn, (np.zeros(2),), steps=3, calls=4)
  # Warm-up: a call and its wait; then three timings of four calls and one wait for all four outputs.
  assert events == ["call", ("wait", 1)] + (["call"] * 4 + [("wait", 4)]) * 3, events
  assert ms == pytest.approx(1e3 / 4)


def test_kernel_sweep_times_other_tilings_with_the_same_results(capsys, monkeypatch, tmp_path):
  """`pallas_kernels_check.py --sweep` (run on a GPU to tune `pallas_kernels.TILES`): each setting
  really retraces the kernel with its tiling (rows per program that do and do not divide 70 rows,
  GELU columns that do not divide 300, attention blocks that do and do not cover 40 tokens), gives
  the current setting's results up to the partial sums' order (float32: attention's key blocks change
  its softmax's rescaling, a bfloat16 rounding apart), and leaves TILES as it was."""
  check = _benchmark_module("pallas_kernels_check")
  from bigvis.models import pallas_kernels
  before = {k: dict(v) for k, v in pallas_kernels.TILES.items()}
  # The real sweep starts from the current setting, every other setting's `max_abs_diff` reference.
  assert {k: v[0] for k, v in check.SWEEP.items()} == pallas_kernels.TILES
  others = {"layernorm_forward": dict(rows=16, warps=2, stages=1),
            "layernorm_backward": dict(rows=32, step_rows=8, warps=8, stages=2),
            "bias_gelu_forward": dict(rows=8, cols=128, warps=4, stages=1),
            "bias_gelu_backward": dict(rows=16, step_rows=4, cols=128, warps=4, stages=1),
            "attention_forward": dict(rows=32, keys=16, warps=8, stages=2),
            "attention_backward": dict(rows=16, warps=8, stages=1)}
  small = {k: [dict(before[k]), other] for k, other in others.items()}
  assert all(other != before[k] for k, other in others.items())
  monkeypatch.setattr(check, "SWEEP", small)
  traced = []
  real = pallas_kernels.pl.pallas_call
  monkeypatch.setattr(pallas_kernels.pl, "pallas_call", lambda *a, **kw: traced.append(kw["grid"]) or real(*a, **kw))
  tiles_out = tmp_path / "tiles.json"
  assert check.main(["--sweep", "--interpret", "--rows", "70", "--width", "40", "--mlp", "300", "--steps", "1",
                     "--length", "40", "--heads", "2", "--head-dim", "16", "--dtype", "float32", "--calls", "1",
                     "--tiles-out", str(tiles_out)]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  timed = [r for r in records if "fastest" not in r]
  assert [r["kernel"] for r in timed] == [k for k in small for _ in range(2)], timed
  for r in timed:
    assert "error" not in r and r["ms"] > 0 and r["max_abs_diff"] < 1e-4, r
  # Every setting its own grid, a real retrace each (attention's: (1 example, 2 heads, blocks of 40
  # tokens); the forward's current one also traced once to give the backward its inputs).
  assert len(set(traced)) == 11, traced
  fastest = [r for r in records if "fastest" in r]
  assert [r["fastest"] for r in fastest] == list(small)
  # Each kernel's fastest is printed (and written) as soon as its tilings are timed: a sweep cut short
  # keeps them.
  kernels = [r.get("fastest") or r["kernel"] for r in records]
  assert kernels == [k for k in small for _ in range(3)], kernels
  for r in fastest:  # the current setting's time, found by its tiling
    assert r["current_ms"] == next(t["ms"] for t in timed if t["kernel"] == r["fastest"] and
                                   all(t[k] == v for k, v in before[r["fastest"]].items())), r
  assert pallas_kernels.TILES == before
  # --tiles-out: the fastest setting per kernel, as peers.py --kernel-tiles reads it.
  assert json.loads(tiles_out.read_text()) == {r["fastest"]: {k: r[k] for k in before[r["fastest"]]} for r in fastest}
  # A tiling whose outputs disagree with the current one's is never the fastest: with no agreement
  # allowed at all, nothing is chosen.
  monkeypatch.setattr(check, "AGREEMENT", -1.0)
  small_one = {"bias_gelu_forward": small["bias_gelu_forward"]}
  monkeypatch.setattr(check, "SWEEP", small_one)
  assert check.main(["--sweep", "--interpret", "--rows", "70", "--width", "40", "--mlp", "300", "--steps", "1",
                     "--length", "40", "--heads", "2", "--head-dim", "16", "--calls", "1",
                     "--tiles-out", str(tiles_out)]) == 0
  assert not [line for line in capsys.readouterr().out.splitlines() if "fastest" in line]
  assert not tiles_out.exists()  # nothing chosen, and never the earlier sweep's file
