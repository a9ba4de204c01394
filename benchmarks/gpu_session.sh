#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 8 minutes on one H100, most of it
# compiling: each run is its own process. $OUT ends with 6 files (a lent machine returns at most 8).
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

# 0. Fail fast: if bigvis cannot run a tiny step (with cuDNN attention and a padded sequence) here,
#    stop now and keep the device time for a fixed rerun.
log "smoke"
SMOKE=$(timeout 150 "$PY" -m bigvis.cli bench --config experiments/vit_ti_digits.py --set model.dtype=bfloat16 \
  --set model.attention_impl=cudnn --set model.pool_type=tok --set model.seq_pad_multiple=8 \
  --set model.recompute_gelu=true --steps 3 --warmup 1 2>&1 | tail -3)
echo "$SMOKE"
echo "$SMOKE" | grep -q examples_per_sec || { log "smoke failed: stopping"; exit 3; }

peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling "$@"; }
b16() { peers --timeout 120 --skip-torch --only bigvis_vit_b16_default "$@"; }

# 1. The goals side by side, the experiments as they are (class token, attention_impl='auto'):
#    ViT-B/16 against timm and CLIP B/16 against open_clip, batch 256; each with the MLP's GELU
#    recomputed in the backward pass (fewer passes over the [tokens, mlp] activations).
log "B/16 against timm"
peers --timeout 150 --only timm_vit_base_patch16_224,bigvis_vit_b16_default
b16 --bigvis-set model.recompute_gelu=true --tag _recompute_gelu
log "CLIP B/16 against open_clip"
peers --timeout 180 --only open_clip_ViT-B-16,bigvis_clip_b16_default
peers --timeout 150 --skip-torch --only bigvis_clip_b16_default --tag _recompute_gelu \
  --bigvis-set model.image.recompute_gelu=true --bigvis-set model.text.recompute_gelu=true
# 2. Where the B/16 and CLIP B/16 steps' time goes now, with their optimised HLO for offline
#    reading (CLIP's first profile showed ~3.9 ms/step of per-layer transposes, source unknown).
profile() {  # NAME EXPERIMENT: kernel breakdown appended to kernels.txt, HLO kept in hlo/NAME
  log "profile $1"
  XLA_FLAGS="--xla_dump_to=$OUT/hlo/$1 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*with_rules.*" \
    timeout 150 "$PY" -m bigvis.cli bench --config "$2" --set batch_size=256 --profile "$OUT/prof_$1" | tail -1
  { echo "== $1"; "$PY" benchmarks/kernel_breakdown.py "$OUT/prof_$1" --top 40; } >> "$OUT/kernels.txt"
  find "$OUT/prof_$1" -name perfetto_trace.json.gz -exec cp {} "$OUT/trace_$1.json.gz" \; -quit
  rm -rf "$OUT/prof_$1"
}
profile vit_b16 experiments/vit_b16_i1k.py
profile clip_b16 experiments/clip_vitb16.py
grep -A8 "^== " "$OUT/kernels.txt"
(cd "$OUT" && tar czf hlo.tgz hlo/*/*with_rules*after_optimizations.txt) && rm -rf "$OUT/hlo"
# 3. Fraction of the ceiling across sizes (the ceiling itself first).
log "L/16 (batch 128) and H/14 (batch 64)"
"$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --timeout 240 --large --skip-torch \
  --only bigvis_vit_l16_gap_cudnn,bigvis_vit_h14_gap_cudnn
# 4. If time is left: the batch that fills the chip; pooling without the class token.
log "extras"
b16 --batch 512 --tag _b512
peers --timeout 120 --skip-torch --only bigvis_vit_b16_gap_cudnn

log "all runs"
"$PY" benchmarks/peers.py --table "$J" | tee "$OUT/table.txt"
