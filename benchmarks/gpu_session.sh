#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 9 minutes on one H100, most of it
# compiling: each run is its own process. $OUT ends with at most 8 files (what a lent machine returns).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
J=$OUT/peers.jsonl
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
log() { echo "[gpu_session +${SECONDS}s] $*"; }

log "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  "$PY" -c "
import importlib
for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'numpy', 'torch', 'timm', 'open_clip'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, e)
import jax; print('devices', jax.devices())
"
} 2>&1 | tee "$OUT/env.txt"

# 0. Fail fast: if bigvis cannot run a tiny step (with cuDNN attention and a padded sequence) here,
#    stop now and keep the device time for a fixed rerun.
log "smoke"
timeout 150 "$PY" -m bigvis.cli bench --config experiments/vit_ti_digits.py --set model.dtype=bfloat16 \
  --set model.attention_impl=cudnn --set model.pool_type=tok --set model.seq_pad_multiple=8 \
  --steps 3 --warmup 1 2>&1 | tail -3 | tee "$OUT/smoke.txt"
grep -q examples_per_sec "$OUT/smoke.txt" || { log "smoke failed: stopping"; exit 3; }

peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 "$@"; }
# 1. The goals side by side: ViT-B/16 and CLIP B/16 against timm and open_clip, batch 256. The
#    `default` variants are the experiments as they are (attention_impl='auto').
log "B/16 and CLIP B/16 against their peers"
peers --timeout 180 --only timm_vit_base_patch16_224,bigvis_vit_b16_default,bigvis_vit_b16_gap_cudnn,open_clip_ViT-B-16,bigvis_clip_b16_default
# 2. Fraction of the ceiling across sizes.
log "L/16 (batch 128) and H/14 (batch 64)"
peers --timeout 240 --large --skip-torch --no-ceiling --only bigvis_vit_l16_gap_cudnn,bigvis_vit_h14_gap_cudnn
# 3. Where the B/16 step's time goes.
log "profile"
timeout 120 "$PY" -m bigvis.cli bench --config experiments/vit_b16_i1k.py --set batch_size=256 \
  --set model.pool_type=gap --set model.attention_impl=cudnn --profile "$OUT/prof" > "$OUT/bench_profiled.json"
"$PY" benchmarks/kernel_breakdown.py "$OUT/prof" --top 25 | tee "$OUT/kernels.txt"
find "$OUT/prof" -name perfetto_trace.json.gz -exec cp {} "$OUT/trace.json.gz" \; -quit
rm -rf "$OUT/prof"
# 4. XLA flags that may fuse the memory-bound work around the GEMMs (an unknown flag fails only its run).
log "flags"
for flags in --xla_gpu_enable_cublaslt=true --xla_gpu_enable_command_buffer= --xla_gpu_enable_triton_gemm=false; do
  XLA_FLAGS=$flags peers --timeout 150 --skip-torch --no-ceiling --only bigvis_vit_b16_gap_cudnn \
    --tag "_$(echo "$flags" | tr -c 'a-z0-9\n' _ | sed 's/^_*//')"
done
# 5. If time is left: the batch that fills the chip, the old XLA-attention baseline, timm's L/16.
log "extras"
peers --timeout 150 --skip-torch --no-ceiling --only bigvis_vit_b16_gap_cudnn --batch 512 --tag _b512
peers --timeout 150 --skip-torch --no-ceiling --only bigvis_vit_b16_tok_xla
peers --timeout 150 --no-ceiling --large --only timm_vit_large_patch16_224

log "all runs"
"$PY" benchmarks/peers.py --table "$J" | tee "$OUT/table.txt"
