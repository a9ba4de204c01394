#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 8 minutes on one H100, most of it
# compiling: each run is its own process. $OUT ends with 4 files (a lent machine returns at most 8).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
J=$OUT/peers.jsonl
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
log() { echo "[gpu_session +${SECONDS}s] $*"; }

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
"$PY" -c "
import importlib
for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'numpy', 'torch', 'timm', 'open_clip'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, e)
import jax; print('devices', jax.devices())
" 2>&1

peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling "$@"; }
b16() { peers --timeout 120 --skip-torch --only bigvis_vit_b16_default "$@"; }
clip() { peers --timeout 150 --skip-torch --only bigvis_clip_b16_default "$@"; }
# The three step changes under test, alone and together: GELU recomputed from the saved GEMM output
# (which lets cuBLASLt take bias + GELU as its epilogue), XLA's Triton GEMMs off (cuBLASLt then gets
# the epilogues), the patch embedding as one GEMM.
NT="--xla_gpu_enable_triton_gemm=false"
RG=(--bigvis-set model.recompute_gelu=true )
MM=(--bigvis-set model.patch_embedding=matmul )
CLIP_RG=(--bigvis-set model.image.recompute_gelu=true --bigvis-set model.text.recompute_gelu=true )
CLIP_MM=(--bigvis-set model.image.patch_embedding=matmul )

# 1. The goals side by side, the experiments as they are: ViT-B/16 against timm, then the changes.
log "B/16 against timm"
peers --timeout 150 --only timm_vit_base_patch16_224,bigvis_vit_b16_default
b16 "${RG[@]}" --tag _rg
XLA_FLAGS="$NT" b16 "${RG[@]}" --tag _rg_nt
XLA_FLAGS="$NT" b16 "${RG[@]}" "${MM[@]}" --tag _rg_nt_mm
b16 "${MM[@]}" --tag _mm
log "CLIP B/16 against open_clip"
peers --timeout 180 --only open_clip_ViT-B-16,bigvis_clip_b16_default
XLA_FLAGS="$NT" clip "${CLIP_RG[@]}" "${CLIP_MM[@]}" --tag _rg_nt_mm
# 2. If time is left: the batch that fills the chip, the flag alone, where the best step's time goes.
log "extras"
XLA_FLAGS="$NT" b16 "${RG[@]}" "${MM[@]}" --batch 512 --tag _rg_nt_mm_b512
XLA_FLAGS="$NT" b16 --tag _nt
log "profile"
XLA_FLAGS="$NT" timeout 120 "$PY" -m bigvis.cli bench --config experiments/vit_b16_i1k.py --set batch_size=256 \
  --set model.recompute_gelu=true --set model.patch_embedding=matmul --profile "$OUT/prof" | tail -1
"$PY" benchmarks/kernel_breakdown.py "$OUT/prof" --top 40 > "$OUT/kernels.txt"; rm -rf "$OUT/prof"

log "all runs"
"$PY" benchmarks/peers.py --table "$J" | tee "$OUT/table.txt"
