#!/usr/bin/env bash
# Train a bigvis experiment on GPU nodes of a SLURM cluster.
#
# Writes a batch script (one task per node, every GPU of the node driven by that
# task) into --logs and submits it with sbatch; --dry-run prints the script, the
# path it would be written to and the commands instead, and writes nothing. Assumes
# the repository (and so .venv/) is on a file system shared by all nodes, as usual
# on SLURM clusters.
#
# Run `experiments/launch/slurm_gpu.sh --help` for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: experiments/launch/slurm_gpu.sh --exp EXP [options]

  --exp EXP              experiment in experiments/EXP.py (required), with its argument if it takes
                         one: clip_vitb16:tokenizer=/shared/tok.model
  --nodes N              nodes, one task per node (default 1)
  --gpus-per-node G      GPUs per node (default 8)
  --cpus-per-task C      CPUs per task (default: the cluster's)
  --partition P          SLURM partition
  --account A            SLURM account
  --time HH:MM:SS        time limit (default 24:00:00; D-HH:MM:SS also accepted)
  --job-name NAME        job name (default bigvis-EXP)
  --workdir DIR          run directory on the shared file system (default runs/NAME, NAME being
                         EXP up to its first colon, as in `make train`; relative paths are
                         relative to the repository root)
  --args "ARGS"          extra arguments for `bigvis train`, e.g. "--set total_steps=1000"
  --logs DIR             batch script and logs: DIR/%x-%j.out, one DIR/%x-%j-%t.log per node
                         (default runs/slurm)
  --venv-setup           run `make install EXTRAS=gpu` once in the job before training
                         (default: check that .venv is installed with EXTRAS=gpu and stop if not)
  --prelude "CMDS"       shell lines run first in the job, e.g. "module load python/3.11"
  --port PORT            JAX coordinator port on the first node, 1-65535
                         (default 20000 + job id % 20000)
  --sbatch-opt OPT       extra #SBATCH option, repeatable, e.g. --sbatch-opt --exclusive
  --dry-run              print the batch script, where it would be written and the commands
                         that would run; write and submit nothing
  -h, --help             show this help

Example:
  experiments/launch/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 \
    --exp clip_vitb16 --workdir /shared/runs/clip_b16 --args "--set total_steps=100000" --venv-setup
EOF
}

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }
# This script's own flags. A value that is one of them was forgotten: `--args --dry-run`
# taken as ARGS=--dry-run would submit the job.
FLAGS=(--exp --nodes --gpus-per-node --cpus-per-task --partition --account --time --job-name --workdir
       --args --logs --prelude --port --sbatch-opt --venv-setup --dry-run -h --help)
# need_value OPT [VALUE...]: OPT has a non-empty value that is not one of our flags (--args may be "").
need_value() {
  [[ $# -ge 2 && ( -n $2 || $1 == --args ) ]] || die "$1 needs a value"
  local flag
  for flag in "${FLAGS[@]}"; do [[ $2 != "$flag" ]] || die "$1 needs a value; got the flag $2"; done
}

EXP="" NODES=1 GPUS=8 CPUS="" PARTITION="" ACCOUNT="" TIME=24:00:00 JOB_NAME="" WORKDIR="" ARGS=""
LOGS="" PRELUDE="" PORT="" VENV_SETUP=0 DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --exp) need_value "$@"; EXP=$2; shift 2 ;;
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --args) need_value "$@"; ARGS=$2; shift 2 ;;
    --logs) need_value "$@"; LOGS=$2; shift 2 ;;
    --prelude) need_value "$@"; PRELUDE=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --sbatch-opt) need_value "$@"; EXTRA+=("$2"); shift 2 ;;
    --venv-setup) VENV_SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n $EXP ]] || die "--exp is required"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, not '$GPUS'"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, not '$CPUS'"
[[ -z $PORT || ( $PORT =~ ^[1-9][0-9]{0,4}$ && $PORT -le 65535 ) ]] ||
  die "--port must be an integer from 1 to 65535, not '$PORT'"
[[ $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time must look like HH:MM:SS, not '$TIME'"
EXP_NAME=${EXP%%:*}  # EXP may carry the experiment's argument: clip_vitb16:tokenizer=/shared/tok.model
for v in "$EXP_NAME" "${JOB_NAME:-x}" "$PARTITION" "$ACCOUNT"; do
  [[ $v =~ ^[A-Za-z0-9_.,+-]*$ ]] || die "'$v' has characters SLURM names cannot hold"
done
JOB_NAME=${JOB_NAME:-bigvis-$EXP_NAME}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOGS=${LOGS:-$REPO_ROOT/runs/slurm}
[[ $LOGS == /* ]] || LOGS=$PWD/$LOGS
[[ $LOGS != *[[:space:]]* ]] || die "--logs cannot contain spaces (#SBATCH lines do not take quotes)"

# ---- the batch script ----------------------------------------------------------------
batch_script() {
  local ids i
  ids=0
  for (( i = 1; i < GPUS; i++ )); do ids+=",$i"; done

  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  if [[ -n $CPUS ]]; then echo "#SBATCH --cpus-per-task=$CPUS"; fi
  echo "#SBATCH --time=$TIME"
  if [[ -n $PARTITION ]]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [[ -n $ACCOUNT ]]; then echo "#SBATCH --account=$ACCOUNT"; fi
  echo "#SBATCH --output=$LOGS/%x-%j.out"
  for i in "${EXTRA[@]}"; do echo "#SBATCH $i"; done
  echo "# Generated by experiments/launch/slurm_gpu.sh."
  echo "set -euo pipefail"
  echo "cd $(printf %q "$REPO_ROOT")"
  if [[ -n $PRELUDE ]]; then printf '%s\n' "$PRELUDE"; fi
  cat <<EOF

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export PYTHONUNBUFFERED=1
# One process per node drives all of its GPUs. (Left alone, jax.distributed under
# SLURM would give each process only GPU number \$SLURM_LOCALID.)
export JAX_LOCAL_DEVICE_IDS=$ids

EOF
  if (( VENV_SETUP )); then
    echo "# Install or update the shared virtual environment once, before any node uses it."
    echo "make install EXTRAS=gpu"
  else
    cat <<'EOF'
# Every node runs `make train EXTRAS=gpu`, which must find .venv already up to date.
if ! make --question .venv/.installed-gpu EXTRAS=gpu; then
  echo "bigvis: .venv is missing or older than pyproject.toml; rerun with --venv-setup or run 'make install EXTRAS=gpu'." >&2
  exit 1
fi
EOF
  fi
  echo
  echo "export BIGVIS_EXP=$(printf %q "$EXP")"
  # The default is make's: runs/ and the experiment's name without its argument, so that a
  # later `make train EXP=…` resumes the run.
  echo "export BIGVIS_WORKDIR=$(printf %q "${WORKDIR:-runs/$EXP_NAME}")"
  echo "export BIGVIS_ARGS=$(printf %q "$ARGS")"
  local dist="" cpus=""
  if [[ -n $CPUS ]]; then cpus=" --cpus-per-task=$CPUS"; fi  # srun does not inherit it from sbatch
  if (( NODES > 1 )); then
    # Process 0 (SLURM_PROCID 0) runs on the first node of the allocation and hosts the coordinator.
    # shellcheck disable=SC2016  # expands in the job, not here
    local port=${PORT:-'$(( 20000 + SLURM_JOB_ID % 20000 ))'}
    echo "BIGVIS_COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | awk 'NR == 1'):$port\""
    echo "export BIGVIS_COORDINATOR"
    # shellcheck disable=SC2016  # expands inside each task
    dist=' --coordinator-address=$BIGVIS_COORDINATOR --num-processes=$SLURM_NTASKS --process-id=$SLURM_PROCID'
  fi
  cat <<EOF

# One task per node; each runs make train (the variables expand inside each task).
# shellcheck disable=SC2016
srun --ntasks-per-node=1$cpus --kill-on-bad-exit=1 --output=$(printf %q "$LOGS")/%x-%j-%t.log \\
  bash -c 'exec make train EXTRAS=gpu EXP="\$BIGVIS_EXP" WORKDIR="\$BIGVIS_WORKDIR" ARGS="\$BIGVIS_ARGS$dist"'
EOF
}

SCRIPT=$LOGS/$JOB_NAME-$(date -u +%Y%m%d-%H%M%S).sbatch
if (( DRY_RUN )); then
  # Writes nothing: the "+ " lines are what a real run runs, around writing $SCRIPT.
  printf '# dry run: nothing is written or submitted. A real run writes the batch script below to\n'
  printf '# %q and submits it with the "+ " commands after it.\n' "$SCRIPT"
  echo "# ---- batch script ($SCRIPT) ----"
  batch_script
  echo "# ---- end of batch script ----"
  printf '+ mkdir -p %q\n' "$LOGS"
  printf '# (here the batch script above is written to %q)\n' "$SCRIPT"
  printf '+ sbatch %q\n' "$SCRIPT"
else
  mkdir -p "$LOGS"
  batch_script >"$SCRIPT"
  echo "+ sbatch $SCRIPT"
  sbatch "$SCRIPT"
fi
