#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 8 minutes on one H100, most of it
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

peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling "$@"; }
b16() { peers --timeout 120 --skip-torch --only bigvis_vit_b16_default "$@"; }
flag_tag() { echo "_$(echo "$1" | sed 's/--xla_gpu_//g; s/=true//g' | tr -c 'a-z0-9\n' _ | sed 's/^_*//; s/_*$//')"; }

# 1. The goal side by side: ViT-B/16 (the experiment as it is: class token, attention_impl='auto')
#    against timm, batch 256; then the same step with the query/key/value GEMMs kept separate.
log "B/16 against timm"
peers --timeout 150 --only timm_vit_base_patch16_224,bigvis_vit_b16_default
b16 --bigvis-set model.fused_qkv=false --tag _separate_qkv
# 2. XLA flags that may fuse the memory-bound work around the GEMMs: bias/GELU epilogues
#    (cuBLASLt), cuDNN LayerNorm, Triton normalisation fusions. An unknown flag fails only its run.
log "flags"
FLAGS=(--xla_gpu_enable_cublaslt=true --xla_gpu_enable_cudnn_layer_norm=true
       --xla_gpu_experimental_enable_triton_softmax_priority_fusion=true
       --xla_gpu_experimental_enable_fusion_block_level_rewriter=true)
for flags in "${FLAGS[@]}"; do XLA_FLAGS=$flags b16 --tag "$(flag_tag "$flags")"; done
# The flags that beat the default by more than 1 %, together (what the rest of the session uses).
BEST=$("$PY" - "$J" "${FLAGS[@]}" <<'EOF'
import json, sys
runs = {}
for line in open(sys.argv[1]):
  r = json.loads(line)
  if r.get("examples_per_sec"):
    runs[r["name"]] = r["examples_per_sec"]
base = runs.get("bigvis_vit_b16_default", 0)
tag = lambda f: "_" + "".join(c if c.isalnum() else "_" for c in f.replace("--xla_gpu_", "").replace("=true", "")).strip("_")
print(" ".join(f for f in sys.argv[2:] if runs.get("bigvis_vit_b16_default" + tag(f), 0) > 1.01 * base))
EOF
)
log "flags kept: '${BEST}'"
if [ -n "$BEST" ] && [ "$(echo "$BEST" | wc -w)" -gt 1 ]; then XLA_FLAGS=$BEST b16 --tag _best_flags; fi
# 3. CLIP B/16 against open_clip, with the kept flags.
log "CLIP B/16 against open_clip"
XLA_FLAGS=$BEST peers --timeout 180 --only open_clip_ViT-B-16,bigvis_clip_b16_default --tag "${BEST:+_best_flags}"
# 4. Where the B/16 step's time goes now (kept flags), and its optimised HLO for offline reading.
log "profile"
XLA_FLAGS="$BEST --xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*with_rules.*" \
  timeout 120 "$PY" -m bigvis.cli bench --config experiments/vit_b16_i1k.py --set batch_size=256 \
  --profile "$OUT/prof" > "$OUT/bench_profiled.json"
"$PY" benchmarks/kernel_breakdown.py "$OUT/prof" --top 40 | tee "$OUT/kernels.txt"
find "$OUT/prof" -name perfetto_trace.json.gz -exec cp {} "$OUT/trace.json.gz" \; -quit
tar -C "$OUT" -czf "$OUT/hlo.tgz" --wildcards "hlo/*after_optimizations.txt" 2>/dev/null
rm -rf "$OUT/prof" "$OUT/hlo"
# 5. If time is left: the batch that fills the chip, pooling without the class token.
log "extras"
XLA_FLAGS=$BEST b16 --batch 512 --tag _b512
XLA_FLAGS=$BEST peers --timeout 120 --skip-torch --only bigvis_vit_b16_gap_cudnn

log "all runs"
"$PY" benchmarks/peers.py --table "$J" | tee "$OUT/table.txt"
