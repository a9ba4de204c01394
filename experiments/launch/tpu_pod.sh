#!/usr/bin/env bash
# Train a bigvis experiment on a Cloud TPU VM or TPU pod slice.
#
# Steps: create (or reuse) the TPU -> put the code on every worker (copy this
# checkout, or clone --repo) -> `make install EXTRAS=tpu` on every worker ->
# `make train` on every worker at once (bigvis then calls
# jax.distributed.initialize(), which finds the pod by itself) -> copy each
# worker's log back (--logs) -> delete the TPU (--delete).
#
# Run `experiments/launch/tpu_pod.sh --help` for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: experiments/launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --exp EXP [options]

Required:
  --name NAME              TPU VM name (also the queued-resource name with --queued): lowercase
                           letters, digits and hyphens, starting with a letter, at most 63
  --zone ZONE              e.g. us-central2-b
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-256, v6e-64
  --exp EXP                experiment in experiments/EXP.py, with its argument if it takes one:
                           clip_vith14:tokenizer=gs://bucket/tok.model

Options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --version VERSION        TPU runtime (default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --queued                 create through a queued resource and wait until it is ACTIVE
  --spot                   use Spot capacity
  --reuse                  use the TPU if it already exists (create it otherwise)
  --repo URL               clone URL on every worker instead of copying this checkout
  --branch BRANCH          branch or tag to clone (with --repo; default: the remote's default)
  --workdir DIR            run directory; use gs://BUCKET/PATH on multi-host slices so every
                           worker writes checkpoints to the same place (default: runs/NAME on each
                           worker, NAME being EXP up to its first colon, as in `make train`)
  --args "ARGS"            extra arguments for `bigvis train`, e.g. "--set total_steps=1000"
  --logs DIR               copy each worker's log into DIR at the end
  --num-workers N          hosts in the slice (default: derived from --accelerator-type)
  --delete                 delete the TPU (or queued resource) at the end, also after a failure
  --dry-run                print the commands (each on a line starting with "+ ") and run nothing
  -h, --help               show this help

Example:
  experiments/launch/tpu_pod.sh --name vit-pod --zone us-east5-a --accelerator-type v5p-128 \
    --queued --spot --exp vit_b16_i1k --workdir gs://my-bucket/runs/vit_b16 \
    --args "--set total_steps=90000" --logs runs/vit-pod-logs --delete
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" EXP="" WORKDIR="" ARGS="" LOGS=""
REPO="" BRANCH="" NUM_WORKERS=""
QUEUED=0 SPOT=0 REUSE=0 DELETE=0 DRY_RUN=0

# This script's own flags. A value that is one of them was forgotten: `--args --dry-run`
# taken as ARGS=--dry-run would create a TPU.
FLAGS=(--name --zone --project --accelerator-type --version --exp --workdir --args --logs --repo --branch
       --num-workers --queued --spot --reuse --delete --dry-run -h --help)
# need_value OPT [VALUE...]: OPT has a non-empty value that is not one of our flags (--args may be "").
need_value() {
  [[ $# -ge 2 && ( -n $2 || $1 == --args ) ]] || die "$1 needs a value"
  local flag
  for flag in "${FLAGS[@]}"; do [[ $2 != "$flag" ]] || die "$1 needs a value; got the flag $2"; done
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --exp) need_value "$@"; EXP=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --args) need_value "$@"; ARGS=$2; shift 2 ;;
    --logs) need_value "$@"; LOGS=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --branch) need_value "$@"; BRANCH=$2; shift 2 ;;
    --num-workers) need_value "$@"; NUM_WORKERS=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --reuse) REUSE=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
[[ -n $ACCEL ]] || die "--accelerator-type is required"
[[ -n $EXP ]] || die "--exp is required"
[[ -z $BRANCH || -n $REPO ]] || die "--branch needs --repo"
# Cloud TPU (and queued-resource) names: lowercase letters, digits and hyphens, starting with
# a letter, not ending with a hyphen, at most 63 characters. gcloud rejects other names:
# say so before anything runs.
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a TPU name (lowercase letters, digits, hyphens; a letter first, no hyphen last; at most 63)"

# Hosts in the slice: v2-v5p names count TensorCores (2 per chip, 4 chips per host);
# v5litepod and v6e names count chips (up to 8 on one host, 4 per host in multi-host slices).
if [[ -z $NUM_WORKERS ]]; then
  if [[ $ACCEL =~ ^v(2|3|4|5p)-([0-9]+)$ ]]; then
    NUM_WORKERS=$(( BASH_REMATCH[2] <= 8 ? 1 : BASH_REMATCH[2] / 8 ))
  elif [[ $ACCEL =~ ^(v5litepod|v5e|v6e)-([0-9]+)$ ]]; then
    NUM_WORKERS=$(( BASH_REMATCH[2] <= 8 ? 1 : BASH_REMATCH[2] / 4 ))
  else
    die "cannot tell the number of hosts of '$ACCEL'; pass --num-workers N"
  fi
fi
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer"

if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

if (( NUM_WORKERS > 1 )) && [[ $WORKDIR != gs://* ]]; then
  echo "tpu_pod.sh: warning: $NUM_WORKERS hosts but --workdir is not gs://; each host keeps its own" \
       "checkpoints, which a multi-host resume cannot read. Prefer --workdir gs://BUCKET/PATH." >&2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REMOTE_DIR=bigvis              # code directory on each worker, under the login user's home
REMOTE_LOG_DIR=bigvis-logs     # logs on each worker, under the login user's home
RUN_ID=$(date -u +%Y%m%d-%H%M%S)
EXP_NAME=${EXP%%:*}  # EXP may carry the experiment's argument: clip_vith14:tokenizer=gs://b/tok.model
LOG_NAME="$EXP_NAME-$RUN_ID.log"

LOC=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then LOC+=(--project "$PROJECT"); fi
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

# Prints a command the way a shell would read it back, then runs it (unless --dry-run).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show() {
  local arg line="+"
  for arg in "$@"; do line+=" $(quote "$arg")"; done
  printf '%s\n' "$line"
}
run() {
  show "$@"
  (( DRY_RUN )) || "$@"
}
# Runs a shell command on every worker of the slice, concurrently.
on_all_workers() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }

# ---- create or reuse -------------------------------------------------------------
# With --dry-run (and --reuse) the TPU counts as existing.
exists() {
  local cmd=("$@" --format='value(name)')
  show "${cmd[@]}"
  (( DRY_RUN )) && return 0
  "${cmd[@]}" >/dev/null 2>&1
}

wait_active() {
  local state errors=0
  show "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'
  (( DRY_RUN )) && return 0
  echo "waiting for queued resource $NAME to become ACTIVE ..."
  while true; do
    if ! state=$("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'); then
      (( ++errors < 10 )) || { echo "tpu_pod.sh: cannot describe queued resource $NAME" >&2; return 1; }
      state=UNKNOWN
    else
      errors=0
    fi
    case $state in
      ACTIVE) echo "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        echo "tpu_pod.sh: queued resource $NAME is $state" >&2; return 1 ;;
    esac
    sleep 30
  done
}

created_or_reused() {
  local describe=("${TPU[@]}" describe "$NAME" "${LOC[@]}")
  if (( QUEUED )); then describe=("${QR[@]}" describe "$NAME" "${LOC[@]}"); fi
  if (( REUSE )) && exists "${describe[@]}"; then
    echo "# reusing $NAME"
  elif (( QUEUED )); then
    local create=("${QR[@]}" create "$NAME" "${LOC[@]}" --node-id "$NAME"
                  --accelerator-type "$ACCEL" --runtime-version "$VERSION")
    if (( SPOT )); then create+=(--spot); fi
    run "${create[@]}"
  else
    local create=("${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
    if (( SPOT )); then create+=(--spot); fi
    run "${create[@]}"
  fi
  if (( QUEUED )); then wait_active; fi
}

# ---- always at the end: collect logs, delete -----------------------------------
STAGE=""
TRAIN_STARTED=0
finish() {
  local rc=$? i
  trap - EXIT
  if [[ -n $STAGE && $DRY_RUN -eq 0 ]]; then rm -rf "$STAGE"; fi
  if (( TRAIN_STARTED )) && [[ -n $LOGS ]]; then
    run mkdir -p "$LOGS" || true
    for (( i = 0; i < NUM_WORKERS; i++ )); do
      run "${TPU[@]}" scp "$NAME:$REMOTE_LOG_DIR/$LOG_NAME" "$LOGS/$EXP_NAME-$RUN_ID.worker$i.log" \
        "${LOC[@]}" --worker="$i" || echo "tpu_pod.sh: could not fetch the log of worker $i" >&2
    done
  fi
  if (( DELETE )); then
    if (( QUEUED )); then
      run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet || rc=1
    else
      run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet || rc=1
    fi
  fi
  (( rc == 0 )) || echo "tpu_pod.sh: failed (exit $rc)" >&2
  exit "$rc"
}
trap finish EXIT

created_or_reused

# ---- code on every worker ------------------------------------------------------
if [[ -n $REPO ]]; then
  printf -v q_repo '%q' "$REPO"
  printf -v q_dir '%q' "$REMOTE_DIR"
  printf -v q_ref '%q' "${BRANCH:-HEAD}"
  clone="git clone --depth 1 $q_repo $q_dir"
  if [[ -n $BRANCH ]]; then clone="git clone --depth 1 --branch $q_ref $q_repo $q_dir"; fi
  on_all_workers "set -e; if [ -d $q_dir/.git ]; then git -C $q_dir fetch --depth 1 $q_repo $q_ref && git -C $q_dir checkout --force --detach FETCH_HEAD; else $clone; fi"
else
  # scp has no --exclude: stage a copy without the virtual environment and run outputs.
  if (( DRY_RUN )); then STAGE="${TMPDIR:-/tmp}/bigvis-stage"; else STAGE=$(mktemp -d); fi
  run mkdir -p "$STAGE/$REMOTE_DIR"
  run tar -C "$REPO_ROOT" --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' -cf "$STAGE/code.tar" .
  run tar -C "$STAGE/$REMOTE_DIR" -xf "$STAGE/code.tar"
  run "${TPU[@]}" scp --recurse "$STAGE/$REMOTE_DIR" "$NAME:" "${LOC[@]}" --worker=all
fi

# ---- install on every worker ---------------------------------------------------
printf -v q_dir '%q' "$REMOTE_DIR"
on_all_workers "set -e; cd $q_dir; if ! command -v make >/dev/null || ! python3 -c 'import ensurepip' 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make python3-venv; fi; make install EXTRAS=tpu"

# ---- train on every worker at once ---------------------------------------------
printf -v q_log '%q' "$REMOTE_LOG_DIR/$LOG_NAME"
printf -v q_logdir '%q' "$REMOTE_LOG_DIR"
make_args="EXTRAS=tpu EXP=$(printf %q "$EXP")"
if [[ -n $WORKDIR ]]; then make_args+=" WORKDIR=$(printf %q "$WORKDIR")"; fi
train="set -o pipefail; "
if (( NUM_WORKERS > 1 )); then
  # Each worker finds its place in the slice from the TPU VM metadata server (as
  # jax.distributed.initialize() does) and passes it to bigvis explicitly; process 0
  # (the first listed worker) hosts the coordinator on jax's TPU port, 8482.
  # Entries of worker-network-endpoints are HOST or NAME:ID:IP.
  # shellcheck disable=SC2016  # expands on the worker
  train+='md() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; '
  # shellcheck disable=SC2016
  train+='eps=$(md worker-network-endpoints) && id=$(md agent-worker-number) || { echo "cannot read the TPU worker list from the metadata server" >&2; exit 1; }; '
  # shellcheck disable=SC2016
  train+='first=${eps%%,*}; host=$(echo "$first" | cut -s -d: -f3); host=${host:-$first}; n=$(echo "$eps" | tr , "\n" | grep -c .); '
  # shellcheck disable=SC2016
  train+='dist="--coordinator-address=$host:8482 --num-processes=$n --process-id=$id"; '
  make_args+=" ARGS=$(printf %q "${ARGS:+$ARGS }")\"\$dist\""
elif [[ -n $ARGS ]]; then
  make_args+=" ARGS=$(printf %q "$ARGS")"
fi
train+="mkdir -p $q_logdir && cd $q_dir && PYTHONUNBUFFERED=1 make train $make_args 2>&1 | tee ~/$q_log"
TRAIN_STARTED=1
on_all_workers "$train"
