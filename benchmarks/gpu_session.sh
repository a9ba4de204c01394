#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#   OUT=runs/gpu PART=1 bash benchmarks/gpu_session.sh     # steps 0-3 (ViT-B/16), then PART=2 the rest
#   OUT=runs/gpu PART=goals bash benchmarks/gpu_session.sh # only what the goals need, in one command
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 10.5 minutes on one H100 (an estimate:
# 8.5 measured before the seventh and eighth sessions added runs), most of it compiling: each run is
# its own process. A lent machine runs one command for at most 10 minutes, hence the two parts
# (up to 9 minutes each, see BUDGET_S; same $OUT, the second started right after the first, while
# the machine is warm); each ends by writing the table of every run so far. A session lent 15 minutes
# of device time in all has room for one such command: PART=goals runs the two goals side by side
# with each family's leading candidate, then the second candidates, in about 9 minutes. $OUT ends
# with up to 5 files (pallas_check.jsonl, peers.jsonl, kernels.txt, hlo.tgz, table.txt; a lent
# machine returns at most 8).
set -u
PART=${PART:-all}
case "$PART" in all|1|2|goals) ;; *) echo "PART must be all, 1, 2 or goals, not '$PART'" >&2; exit 2 ;; esac
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
J=$OUT/peers.jsonl
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
log() { echo "[gpu_session +${SECONDS}s] $*"; }

table() { log "all runs so far"; "$PY" benchmarks/peers.py --table "$J" | tee "$OUT/table.txt"; }

log "environment (part $PART)"
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

# Each run starts only if its usual time (the first argument: seconds, with compiling) still fits in
# BUDGET_S, counted from the start of this invocation; a skipped run says so. By default 540 s for
# one part (a lent machine's command stops at 600), no limit for both.
BUDGET_S=${BUDGET_S:-$([ "$PART" = all ] && echo 100000 || echo 540)}
room() {
  if (( SECONDS + $1 > BUDGET_S )); then log "skipped, ${1} s do not fit in what is left of ${BUDGET_S} s: ${*:2}"; return 1; fi
  "${@:2}"
}
peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling "$@"; }
b16() { peers --timeout 120 --skip-torch --only bigvis_vit_b16_default "$@"; }

RG=(--bigvis-set model.recompute_gelu=true)
PL=(--bigvis-set model.norm_impl=pallas)
GK=(--bigvis-set model.gelu_impl=pallas)
SEP=(--bigvis-set model.fused_qkv=false)
CLIP_RG_PL=(--bigvis-set model.image.recompute_gelu=true --bigvis-set model.text.recompute_gelu=true
            --bigvis-set model.image.norm_impl=pallas --bigvis-set model.text.norm_impl=pallas)
CLIP_SEP=(--bigvis-set model.image.fused_qkv=false)  # the image tower's only: the fewest bytes in the compile


# 0. bigvis's Pallas kernels against XLA's fusions at ViT-B/16's shapes: do they agree on this card,
#    and how long does each take (seconds; steps 2 and 3 time them inside the whole step).
kernel_check() {
  log "Pallas kernels against XLA"
  room 40 timeout 120 "$PY" benchmarks/pallas_kernels_check.py | tee "$OUT/pallas_check.jsonl"
}
# 1. The goals side by side, the experiments as they are: the card's matmul ceiling (the basis of
#    "fraction of the ceiling") and ViT-B/16 against timm; CLIP B/16 against open_clip.
vit_goal() {
  log "ceiling, B/16 against timm"
  room 150 "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --timeout 150 \
    --only timm_vit_base_patch16_224,bigvis_vit_b16_default
}
clip_goal() {
  log "CLIP B/16 against open_clip"
  room 150 peers --timeout 180 --only open_clip_ViT-B-16,bigvis_clip_b16_default
}
# 2. The candidates prepared without a GPU (benchmarks/README.md, "Prepared on a CPU host"): GELU
#    recomputed from the unbiased GEMM output (XLA's fusion, or its backward as a Pallas kernel) and
#    the blocks' LayerNorms as one-pass Pallas kernels; first with query/key/value as three GEMMs
#    (no split copy forward or concatenation backward; the fewest bytes in the compile, 104.6 GB a
#    step against 106.2 fused), then fused, then apart. The fastest should become the default.
vit_rg_pl_sep() { room 50 b16 "${RG[@]}" "${PL[@]}" "${SEP[@]}" --tag _rg_pl_sep; }
vit_rg_pl() { room 50 b16 "${RG[@]}" "${PL[@]}" --tag _rg_pl; }
vit_others() {
  room 50 b16 "${GK[@]}" "${PL[@]}" --tag _gk_pl
  room 50 b16 "${RG[@]}" --tag _rg
  room 50 b16 "${PL[@]}" --tag _pl
}
clip_rg_pl_sep() {
  room 70 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_RG_PL[@]}" "${CLIP_SEP[@]}" \
    --tag _rg_pl_sep
}
clip_rg_pl() { room 70 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_RG_PL[@]}" --tag _rg_pl; }
# 3. Where the B/16 step's time goes with the first candidate, with the card's optimised HLO for reading
#    offline (which fusion is which kernel; `bigvis aot --topology h100-1` only approximates the
#    card's choices; benchmarks/hlo_traffic.py sums its bytes per kernel).
profile() {
  log "profile"
  XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*with_rules.*" \
    room 80 timeout 120 "$PY" -m bigvis.cli bench --config experiments/vit_b16_i1k.py --set batch_size=256 \
    --set model.recompute_gelu=true --set model.norm_impl=pallas --set model.fused_qkv=false \
    --profile "$OUT/prof" | tail -1
  if [ -d "$OUT/prof" ]; then
    "$PY" benchmarks/kernel_breakdown.py "$OUT/prof" --top 40 > "$OUT/kernels.txt"; rm -rf "$OUT/prof"
    (cd "$OUT" && tar czf hlo.tgz hlo/*with_rules*after_optimizations.txt) && rm -rf "$OUT/hlo"
  fi
}
# 4. If time is left: fraction of the ceiling across sizes (met in the first session: L/16 0.52 and
#    H/14 0.51 against B/16's 0.46), then the batch that fills the chip.
large() {
  log "L/16 (batch 128) and H/14 (batch 64)"
  room 200 peers --timeout 240 --large --skip-torch --only bigvis_vit_l16_gap_cudnn,bigvis_vit_h14_gap_cudnn
}
extras() { log "extras"; room 60 b16 --batch 512 --tag _b512; }

case "$PART" in
  1) steps=(kernel_check vit_goal vit_rg_pl_sep vit_rg_pl vit_others profile) ;;
  2) steps=(clip_goal clip_rg_pl_sep clip_rg_pl large extras) ;;
  goals) steps=(kernel_check vit_goal vit_rg_pl_sep clip_goal clip_rg_pl_sep vit_rg_pl clip_rg_pl) ;;
  all) steps=(kernel_check vit_goal vit_rg_pl_sep vit_rg_pl vit_others profile
              clip_goal clip_rg_pl_sep clip_rg_pl large extras) ;;
esac
for step in "${steps[@]}"; do "$step"; done
table
