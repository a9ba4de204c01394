#!/usr/bin/env bash
# The measurements of one lent-GPU session, most important first. Every result is appended to
# $OUT/peers.jsonl as it lands, so a session cut short keeps what it measured; the combined table
# is printed last (and can be rebuilt with `python benchmarks/peers.py --table $OUT/peers.jsonl`).
#
#   OUT=runs/gpu bash benchmarks/gpu_session.sh            # repo root, on the GPU machine
#   OUT=runs/gpu PART=1 bash benchmarks/gpu_session.sh     # steps 0-3 (ViT-B/16), then PART=2 the rest
#   OUT=runs/gpu PART=goals bash benchmarks/gpu_session.sh # only what the goals need, in one command
#   OUT=runs/gpu PART=tune bash benchmarks/gpu_session.sh  # then: the kernels' tilings, and steps with them
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, torch, timm and open_clip_torch (no
# TensorFlow: `bigvis bench` runs on synthetic batches). About 10 minutes on one H100 or H200, most
# of it compiling: each run is its own process. A lent machine runs one command for at most 10
# minutes, hence the two parts (up to 9 minutes each, see BUDGET_S; same $OUT, the second started
# right after the first, while the machine is warm); each ends by writing the table of every run
# so far. A session lent 15 minutes of device time in all has room for one such command and a short
# one: PART=goals runs the ViT-B/16 goal, the CLIP goal, L/16 and H/14 (their fraction of the
# ceiling, not timed since the ninth session), B/16 with every GEMM through cuBLAS (`vit_cublas`,
# +0.7 % on the old tilings in the twenty-first session), then the kernels' tiling sweep (the fastest
# tiling per kernel into $OUT/tiles.json) and B/16 with its tilings; BUDGET_S skips what does not fit.
# The twenty-first session met both goals (B/16 1.26-1.27x timm with the sweep's tilings, now the
# defaults; CLIP 1.28x open_clip). PART=tune (about 8 minutes) runs the sweep, B/16 and CLIP with its
# tilings, the attention kernels' check (Pallas against cuDNN), CLIP with XLA's attention in the text
# tower (whose loss tells what CLIP's differing losses are), a profile of B/16 and `vit_cublas`.
# `STEPS="a b ..."` runs the named steps instead, in order.
# $OUT ends with up to 7 files (pallas_check.jsonl, kernel_sweep.jsonl, tiles.json,
# peers.jsonl, kernels.txt, hlo.tgz, table.txt; a lent machine returns at most 8).
set -u
PART=${PART:-all}
case "$PART" in all|1|2|goals|tune) ;; *) echo "PART must be all, 1, 2, goals or tune, not '$PART'" >&2; exit 2 ;; esac
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
fits() {  # seconds, what: whether it fits, saying so when it does not
  if (( SECONDS + $1 > BUDGET_S )); then log "skipped, ${1} s do not fit in what is left of ${BUDGET_S} s: ${*:2}"; return 1; fi
}
room() { fits "$@" && "${@:2}"; }
peers() { "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling "$@"; }
b16() { peers --timeout 120 --skip-torch --only bigvis_vit_b16_default "$@"; }

# The defaults since the ninth session (H200: B/16 +2.5 %, CLIP +3.0 %) are recomputed GELU, the
# Pallas LayerNorms (norm_impl=auto) and three q/k/v GEMMs in the ViT; since the tenth, the residual
# adds and the q/k/v input gradients' sum in those norms' kernels (B/16 +5.1 %, twelfth session);
# since the eleventh, GELU forward and backward as Triton kernels (gelu_impl=auto: B/16 +1.6 %,
# CLIP +1.8 %, twelfth session). The switches that turn each off, and the old defaults:
GELU_XLA=(--bigvis-set model.gelu_impl=xla)  # XLA's GELU fusions, recomputed (the ninth session's)
RESID=(--bigvis-set model.residual_in_norm=false)  # the residual adds back in XLA's fusions
SAVED=(--bigvis-set model.recompute_gelu=false)  # with GELU_XLA, GELU saved: never timed apart from the Pallas norms
FUSED=(--bigvis-set model.fused_qkv=true)
# The old defaults' options (Attention's bias placement, also of the ninth session, has no switch).
OLD=(--bigvis-set model.fused_qkv=true --bigvis-set model.recompute_gelu=false --bigvis-set model.norm_impl=xla
     --bigvis-set model.gelu_impl=xla)
CLIP_GELU_XLA=(--bigvis-set model.image.gelu_impl=xla --bigvis-set model.text.gelu_impl=xla)
# Not a default yet (thirteenth session, unmeasured): attention as bigvis's Pallas kernels, on the
# tokens unpadded, with the query bias inside (cuDNN's and the bias's passes: 11.2 ms of the H200's
# 64 ms B/16 step).
ATTN=(--bigvis-set model.attention_impl=pallas)
CLIP_ATTN=(--bigvis-set model.image.attention_impl=pallas --bigvis-set model.text.attention_impl=pallas)
CLIP_OLD=(--bigvis-set model.image.fused_qkv=true --bigvis-set model.image.recompute_gelu=false
          --bigvis-set model.text.recompute_gelu=false --bigvis-set model.image.norm_impl=xla
          --bigvis-set model.text.norm_impl=xla --bigvis-set model.image.gelu_impl=xla
          --bigvis-set model.text.gelu_impl=xla)

# 0. bigvis's Pallas kernels against XLA's fusions at ViT-B/16's shapes: do they agree on this card,
#    and how long does each take (seconds; steps 2 and 3 time them inside the whole step).
kernel_check() {
  log "Pallas LayerNorm kernels against XLA"
  room 60 timeout 120 "$PY" benchmarks/pallas_kernels_check.py \
    --cases layernorm,layernorm_biases,layernorm_biases_added_by_xla,layernorm_three_copies \
    | tee -a "$OUT/pallas_check.jsonl"
}
# GELU's alone (≈20 s): its kernels and XLA's bfloat16 fusion were 4.5 % apart on the H200 (twelfth
# session); each one's error against float32 says which is the coarse one.
gelu_check() {
  log "GELU's kernels against XLA and float32"
  room 30 timeout 90 "$PY" benchmarks/pallas_kernels_check.py --cases bias_gelu | tee -a "$OUT/pallas_check.jsonl"
}
# Attention's kernels against cuDNN's (what 'auto' runs, on the ViT's padded tokens) at ViT-B/16's
# shapes: agreement, and forward + backward time (≈40 s).
attention_check() {
  log "Pallas attention against cuDNN's"
  room 40 timeout 120 "$PY" benchmarks/pallas_kernels_check.py --cases attention | tee -a "$OUT/pallas_check.jsonl"
}
# Each kernel alone under other tilings (pallas_kernels.TILES, chosen without a profile): the
# LayerNorm kernels ran at 2.3-3 TB/s on the H200 (ninth session), the card can do ≈4.
# The fastest tiling per kernel goes to $OUT/tiles.json, which the *_tuned runs time in a whole step.
# The tilings are timed at ViT-B/16's shapes only; CLIP's text tower (width 512) runs them untuned.
kernel_sweep() {
  log "Pallas kernels' tilings"
  rm -f "$OUT/tiles.json"  # never an earlier run's
  fits 150 kernel sweep || return
  timeout 260 "$PY" benchmarks/pallas_kernels_check.py --sweep --steps 10 --tiles-out "$OUT/tiles.json" \
    | tee "$OUT/kernel_sweep.jsonl" | grep fastest
}
TUNED=(--kernel-tiles "$OUT/tiles.json")
tuned() {  # seconds, what, then the run: only with this part's sweep's tilings
  if [ ! -s "$OUT/tiles.json" ]; then log "skipped, no tilings from a sweep: $2"; return 1; fi
  room "$1" "${@:3}"
}
vit_tuned() { tuned 50 vit_tuned b16 "${TUNED[@]}" --tag _tuned_tiles; }
clip_tuned() {
  tuned 90 clip_tuned peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${TUNED[@]}" --tag _tuned_tiles
}
vit_attn_tuned() { tuned 50 vit_attn_tuned b16 "${ATTN[@]}" "${TUNED[@]}" --tag _pallas_attention_tuned_tiles; }
clip_attn_tuned() {
  tuned 90 clip_attn_tuned peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_ATTN[@]}" \
    "${TUNED[@]}" --tag _pallas_attention_tuned_tiles
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
  room 180 peers --timeout 180 --only open_clip_ViT-B-16,bigvis_clip_b16_default
}
# 2. Against the defaults: the residual adds in XLA (+5.1 % for the kernels' adds, twelfth session),
#    XLA's GELU (+1.6 % for the kernels), the defaults before the ninth session (how much the new ones
#    win on this card), one q/k/v GEMM, GELU saved by XLA rather than recomputed.
vit_attn() { room 50 b16 "${ATTN[@]}" --tag _pallas_attention; }
clip_attn() {
  room 90 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_ATTN[@]}" --tag _pallas_attention
}
# CLIP's losses after the 23 bench steps differed by up to 0.08 between attention's implementations
# (fourteenth session: 4.710 cuDNN in both towers, 4.708 the kernels in both, 4.789 the kernels in
# the text tower and cuDNN in the image tower, now the default) where the ViT's agree to 4e-6. XLA's
# attention in the text tower, the image tower's cuDNN kept, says whether that is bfloat16 rounding
# amplified by 23 steps on one repeated batch (its loss as far from 4.710) or the text kernels (its
# loss with cuDNN's, 4.710).
clip_xla_attn() {
  room 90 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default --bigvis-set model.text.attention_impl=xla \
    --tag _text_xla_attention
}
# Every GEMM through cuBLAS(Lt) as XLA's GEMM rewriter plans it (sixteenth session, compiled for an
# H100 on the CPU host): the query bias then rides the GEMM's BIAS epilogue, where the card's own
# compile (Triton GEMM fusions, most then autotuned to cuBLAS with no epilogue) added it in a pass of
# its own and summed its gradient in another (0.87 ms of the H200's B/16 step, twelfth session):
# 720 -> 663 kernels, 101.6 -> 99.9 GB. Timed last with older defaults: -2.7 % (H200), +0.6 % (H100).
vit_cublas() { XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" room 50 b16 --tag _cublas_gemms; }
vit_whole() { room 50 b16 --bigvis-set model.last_block_pooled=false --tag _whole_last_block; }  # the 14th session's change, undone
vit_resid() { room 50 b16 "${RESID[@]}" --tag _residual_by_xla; }
vit_gelu_xla() { room 50 b16 "${GELU_XLA[@]}" --tag _gelu_xla; }
vit_old() { room 50 b16 "${OLD[@]}" --tag _old_defaults; }
vit_fused() { room 50 b16 "${FUSED[@]}" --tag _fused_qkv; }
vit_saved() { room 50 b16 "${GELU_XLA[@]}" "${SAVED[@]}" --tag _gelu_saved; }
clip_gelu_xla() {
  room 70 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_GELU_XLA[@]}" --tag _gelu_xla
}
# The text tower's query, key and value as three GEMMs (its default is one): by the bytes of a compile
# for an H100 a wash (1.77 GB less outside GEMMs, 1.66 GB more in them), where the image tower's three
# won 1.2 % on the H200 (ninth session).
clip_text_sep() {
  room 70 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default --bigvis-set model.text.fused_qkv=false \
    --tag _text_three_gemms
}
clip_old() {
  room 70 peers --timeout 180 --skip-torch --only bigvis_clip_b16_default "${CLIP_OLD[@]}" --tag _old_defaults
}
# 3. Where the B/16 step's time goes with the defaults, with the card's optimised HLO for reading
#    offline (which fusion is which kernel; `bigvis aot --topology h100-1` only approximates the
#    card's choices; benchmarks/hlo_traffic.py sums its bytes per kernel).
profile() {  # extra arguments (bench's overrides) profile that variant instead
  log "profile $*"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*with_rules.*" \
    room 80 timeout 120 "$PY" -m bigvis.cli bench --config experiments/vit_b16_i1k.py --set batch_size=256 "$@" \
    --profile "$OUT/prof" | tail -1
  if [ -d "$OUT/prof" ]; then
    "$PY" benchmarks/kernel_breakdown.py "$OUT/prof" --top 40 > "$OUT/kernels.txt"; rm -rf "$OUT/prof"
    (cd "$OUT" && tar czf hlo.tgz hlo/*with_rules*after_optimizations.txt) && rm -rf "$OUT/hlo"
  fi
}
# The same with bigvis's attention kernels (their default tilings): how long each kernel takes inside the step.
profile_attn() { profile --set model.attention_impl=pallas; }
# 4. If time is left: fraction of the ceiling across sizes (met in the first session: L/16 0.52 and
#    H/14 0.51 against B/16's 0.46), then the batch that fills the chip.
large() {
  log "L/16 (batch 128) and H/14 (batch 64)"
  room 200 peers --timeout 240 --large --skip-torch --only bigvis_vit_l16_gap_cudnn,bigvis_vit_h14_gap_cudnn
}
extras() { log "extras"; room 60 b16 --batch 512 --tag _b512; }
# The batch that fills the chip, side by side: timm and B/16 both at 512 (bigvis +2.3 % over 256 on
# the H200, second session; timm's gain there never measured). The table pairs runs by batch.
vit_b512() {
  log "B/16 against timm, both at batch 512"
  room 130 "$PY" benchmarks/peers.py --out "$J" --steps 20 --warmup 3 --no-ceiling --timeout 150 --batch 512 \
    --only timm_vit_base_patch16_224,bigvis_vit_b16_default --tag _b512
}

case "$PART" in
  1) steps=(attention_check kernel_check gelu_check vit_goal vit_attn vit_whole kernel_sweep vit_tuned vit_attn_tuned
           vit_resid vit_gelu_xla profile) ;;
  2) steps=(clip_goal clip_attn clip_tuned clip_attn_tuned clip_text_sep clip_gelu_xla clip_old large vit_fused vit_old
           vit_saved extras profile_attn) ;;
  goals) steps=(vit_goal clip_goal large vit_cublas kernel_sweep vit_tuned) ;;
  tune) steps=(kernel_sweep vit_tuned vit_attn_tuned clip_tuned attention_check clip_xla_attn profile vit_cublas) ;;
  all) steps=(attention_check kernel_check gelu_check vit_goal vit_attn vit_whole kernel_sweep vit_tuned vit_attn_tuned vit_resid
              vit_gelu_xla vit_old profile vit_saved clip_goal clip_attn clip_tuned clip_attn_tuned clip_text_sep
              clip_gelu_xla clip_old clip_xla_attn vit_cublas large vit_fused extras profile_attn) ;;
esac
if [ -n "${STEPS:-}" ]; then read -r -a steps <<< "$STEPS"; fi  # or the steps named, in order
for step in "${steps[@]}"; do "$step"; done
table
