#!/usr/bin/env bash
# Cloud TPU VM launcher for rlp_jax: create / delete a TPU VM (or a queued resource), install the
# project on every worker, sync the code, start / follow / stop training on all workers at once.
# Run `tpu_scripts/tpu_vm.sh --help` for the flags. Every gcloud call is echoed ("+ ...") to stderr
# before it runs; --dry-run prints them to stdout instead and runs nothing.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Settings without a flag (environment only).
JAX_VERSION=${RLP_JAX_VERSION:-0.10.2}      # jax[tpu]==JAX_VERSION (setup.cfg: jax>=0.10.2)
PYTHON_VERSION=${RLP_PYTHON_VERSION:-3.11}  # the project needs >=3.11; TPU images ship 3.10
REMOTE_DIR=${RLP_REMOTE_DIR:-rlp_jax}       # checkout on each worker, relative to $HOME
VENV=${RLP_VENV:-rlp_venv}                  # virtualenv on each worker, relative to $HOME
LOG_FILE=${RLP_LOG_FILE:-rlp_jax_train.log} # training log on each worker, relative to $HOME
STOP_TIMEOUT=${RLP_STOP_TIMEOUT:-600}       # seconds `stop` waits after SIGTERM before SIGKILL

usage() {
  cat <<EOF
usage: $PROG COMMAND [flags]

commands:
  create    create the TPU VM (or, with --queued, a queued resource holding it)
  delete    delete it (with --queued: the queued resource and its VM)
  install   on all workers: Python $PYTHON_VERSION venv ~/$VENV, jax[tpu]==$JAX_VERSION, pip install -e ~/$REMOTE_DIR
  sync      copy the code to ~/$REMOTE_DIR on all workers (git clone for a URL; for a path, a tarball of
            the files git would commit: runs/, caches and .git stay behind)
  train     start python -m rlp_jax.train on all workers under nohup (log: ~/$LOG_FILE)
  logs      follow the training log of one worker (--worker, default 0)
  stop      SIGTERM the trainer on all workers (it checkpoints and exits); SIGKILL after ${STOP_TIMEOUT}s
  ssh       run a command on all workers: $PROG ssh --name N --zone Z -- 'nvidia-smi || true'

flags (environment default in brackets):
  --name NAME               TPU VM / queued resource name [RLP_TPU_NAME] (required)
  --zone ZONE               e.g. us-central2-b [RLP_TPU_ZONE] (required)
  --project PROJECT         GCP project [RLP_TPU_PROJECT] (default: gcloud's)
  --accelerator-type TYPE   e.g. v4-8, v5p-64, v5litepod-16, v6e-8 [RLP_TPU_TYPE] (create)
  --runtime-version V       e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5 [RLP_TPU_VERSION]
                            (default from the type: v2/v3/v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot                    spot capacity [RLP_TPU_SPOT=1]
  --queued                  use gcloud compute tpus queued-resources [RLP_TPU_QUEUED=1]
  --repo URL|PATH           git URL, or local directory copied as is [RLP_REPO] (default: this checkout)
  --branch BRANCH           branch for a git URL [RLP_BRANCH] (default main)
  --experiment NAME         experiment to train [RLP_EXPERIMENT] (train)
  --workdir DIR             run directory, shared by all workers: gs://BUCKET/runs/NAME [RLP_WORKDIR] (train)
  --shared-fs               --workdir is a local path that every worker sees as one filesystem (NFS,
                            Filestore) or the slice has one worker; without it a local path is refused
  --set KEY=VALUE           config override passed to the trainer (repeatable)
  --worker N|all            workers to run on (logs: default 0; ssh: default all)
  --dry-run                 print each command ("+ " and shell-quoted), run nothing
  -h, --help                this help
environment only: RLP_JAX_VERSION, RLP_PYTHON_VERSION, RLP_REMOTE_DIR, RLP_VENV, RLP_LOG_FILE, RLP_STOP_TIMEOUT
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # die, q

run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(q "$@")"
  else
    printf '+ %s\n' "$(q "$@")" >&2
    "$@"
  fi
}

# ---- flags -------------------------------------------------------------------------------------
NAME=${RLP_TPU_NAME:-}
ZONE=${RLP_TPU_ZONE:-}
PROJECT=${RLP_TPU_PROJECT:-}
ACCEL=${RLP_TPU_TYPE:-}
VERSION=${RLP_TPU_VERSION:-}
SPOT=${RLP_TPU_SPOT:-0}
QUEUED=${RLP_TPU_QUEUED:-0}
REPO=${RLP_REPO:-$REPO_ROOT}
BRANCH=${RLP_BRANCH:-main}
EXPERIMENT=${RLP_EXPERIMENT:-}
WORKDIR=${RLP_WORKDIR:-}
WORKER=""
SHARED_FS=0
DRY_RUN=0
SETS=()
REST=()

(($#)) || die "no command given (try $PROG --help)"
COMMAND=$1
shift
case $COMMAND in
  -h | --help) usage; exit 0 ;;
  create | delete | install | sync | train | logs | stop | ssh) ;;
  *) die "unknown command '$COMMAND' (one of create delete install sync train logs stop ssh)" ;;
esac

while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then flag=${arg%%=*} val=${arg#*=} inline=1; else flag=$arg val="" inline=0; fi
  case $flag in
    --name | --zone | --project | --accelerator-type | --runtime-version | --repo | --branch | \
      --experiment | --workdir | --set | --worker)
      if ((!inline)); then
        (($#)) && [[ $1 != --* ]] || die "$flag needs a value"
        val=$1
        shift
      fi ;;
    --spot | --queued | --shared-fs | --dry-run | -h | --help)
      ((!inline)) || die "$flag takes no value" ;;
  esac
  case $flag in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --runtime-version) VERSION=$val ;;
    --repo) REPO=$val ;;
    --branch) BRANCH=$val ;;
    --experiment) EXPERIMENT=$val ;;
    --workdir) WORKDIR=$val ;;
    --set) [[ $val == *=* ]] || die "--set needs KEY=VALUE, got '$val'"; SETS+=("$val") ;;
    --worker) WORKER=$val ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --shared-fs) SHARED_FS=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) REST+=("$@"); break ;;
    -*) die "unknown flag '$flag' (try $PROG --help)" ;;
    *) [[ $COMMAND == ssh ]] || die "unexpected argument '$arg'"; REST+=("$arg") ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (or set RLP_TPU_NAME)"
[[ -n $ZONE ]] || die "--zone is required (or set RLP_TPU_ZONE)"
[[ -z $WORKER || $WORKER =~ ^(all|[0-9]+)$ ]] || die "--worker must be a worker number or 'all', got '$WORKER'"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ && $REMOTE_DIR != *..* ]] ||
  die "RLP_REMOTE_DIR must be a plain path relative to \$HOME, got '$REMOTE_DIR'"
[[ $VENV =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ && $VENV != *..* ]] ||
  die "RLP_VENV must be a plain path relative to \$HOME, got '$VENV'"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "RLP_STOP_TIMEOUT must be a number of seconds, got '$STOP_TIMEOUT'"
[[ $SPOT == 1 || $SPOT == 0 ]] || die "RLP_TPU_SPOT must be 0 or 1"
[[ $QUEUED == 1 || $QUEUED == 0 ]] || die "RLP_TPU_QUEUED must be 0 or 1"

LOC=("--zone=$ZONE")
[[ -z $PROJECT ]] || LOC+=("--project=$PROJECT")
HOME_Q="\"\$HOME\""                         # "$HOME", expanded by the worker's shell
PY="$HOME_Q/$(q "$VENV")/bin/python"
# The trainer `train` starts, as pgrep/pkill -f see it: the venv's python running rlp_jax.train
# (anchored, so it never matches the ssh shell whose command line contains it).
TRAIN_PATTERN="^[^ ]*/${VENV//./[.]}/bin/python[0-9.]* -m rlp_jax[.]train"

pack_source() {  # pack_source SRC TARBALL: a git checkout's committable files, or all of a plain directory
  if git -C "$1" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local list=(git -C "$1" ls-files -z --cached --others --exclude-standard) pack=(tar -C "$1" --null -T - -czf "$2")
    if ((DRY_RUN)); then
      printf '+ %s | %s\n' "$(q "${list[@]}")" "$(q "${pack[@]}")"
    else
      printf '+ %s | %s\n' "$(q "${list[@]}")" "$(q "${pack[@]}")" >&2
      "${list[@]}" | "${pack[@]}"
    fi
  else
    run tar -C "$1" -czf "$2" .
  fi
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" "--worker=$1" --command "$2"
}

# ---- commands ----------------------------------------------------------------------------------
case $COMMAND in
  create)
    [[ -n $ACCEL ]] || die "--accelerator-type is required for create (or set RLP_TPU_TYPE)"
    if [[ -z $VERSION ]]; then
      case $ACCEL in
        v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
        v5p-*) VERSION=v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
        v6e-*) VERSION=v2-alpha-tpuv6e ;;
        *) die "--runtime-version is required for accelerator type '$ACCEL'" ;;
      esac
    fi
    extra=()
    ((!SPOT)) || extra+=(--spot)
    if ((QUEUED)); then
      run gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" "--node-id=$NAME" \
        "--accelerator-type=$ACCEL" "--runtime-version=$VERSION" ${extra[@]+"${extra[@]}"}
      ((DRY_RUN)) || echo "queued; wait for ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
    else
      run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" "--accelerator-type=$ACCEL" \
        "--version=$VERSION" ${extra[@]+"${extra[@]}"}
    fi ;;

  delete)
    if ((QUEUED)); then
      run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
    fi ;;

  install)
    # uv provides Python $PYTHON_VERSION (the TPU images' python3 is 3.10) and installs fast.
    uv="python3 -m uv"
    on_workers "${WORKER:-all}" "{ python3 -m pip install --user --upgrade uv || python3 -m pip install --user --upgrade --break-system-packages uv; } && $uv venv --allow-existing --python $(q "$PYTHON_VERSION") $HOME_Q/$(q "$VENV") && $uv pip install --python $PY $(q "jax[tpu]==$JAX_VERSION") -e $HOME_Q/$(q "$REMOTE_DIR")'[gcs]'" ;;

  sync)
    if [[ -d $REPO ]]; then
      # One tarball of what git would commit (tracked and untracked files, not the ignored runs/,
      # caches or .git), unpacked into a fresh directory on every worker.
      src=$(cd "$REPO" && pwd)
      tarball="${TMPDIR:-/tmp}/rlp_jax_src-$$.tar.gz"
      pack_source "$src" "$tarball"
      run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:rlp_jax_src.tar.gz" "${LOC[@]}" --worker=all
      on_workers all "rm -rf $HOME_Q/$(q "$REMOTE_DIR") && mkdir -p $HOME_Q/$(q "$REMOTE_DIR") && tar -xzf $HOME_Q/rlp_jax_src.tar.gz -C $HOME_Q/$(q "$REMOTE_DIR") && rm -f $HOME_Q/rlp_jax_src.tar.gz"
      run rm -f "$tarball"
    elif [[ $REPO == *://* || $REPO == git@* || $REPO == *.git ]]; then
      on_workers all "rm -rf $HOME_Q/$(q "$REMOTE_DIR") && git clone --depth=1 $(q "--branch=$BRANCH" "$REPO") $HOME_Q/$(q "$REMOTE_DIR")"
    else
      die "--repo '$REPO' is neither a directory nor a git URL"
    fi ;;

  train)
    [[ -n $EXPERIMENT ]] || die "--experiment is required for train (or set RLP_EXPERIMENT)"
    [[ -n $WORKDIR ]] || die "--workdir is required for train: a directory all workers share, e.g. gs://BUCKET/runs/NAME"
    # Each worker writes its own shards of every checkpoint: on per-host disks they never meet.
    [[ $WORKDIR == *://* || $SHARED_FS == 1 ]] ||
      die "--workdir '$WORKDIR' is a local path: on a multi-worker slice each worker would write its own partial checkpoints; use gs://BUCKET/runs/NAME, or pass --shared-fs if it is a shared mount or the slice has one worker"
    argv=(-m rlp_jax.train "--experiment=$EXPERIMENT" "--workdir=$WORKDIR")
    for s in ${SETS[@]+"${SETS[@]}"}; do argv+=(--set "$s"); done
    # RLP_JAX_DISTRIBUTED=1: maybe_initialize_distributed() calls jax.distributed.initialize(), which
    # finds the other workers itself on a TPU VM; nothing else is coordinated by hand.
    on_workers "${WORKER:-all}" "cd $HOME_Q/$(q "$REMOTE_DIR") || exit 1; if pgrep -f $(q "$TRAIN_PATTERN") >/dev/null; then echo \"rlp_jax.train is already running (tpu_vm.sh stop)\" >&2; exit 1; fi; RLP_JAX_DISTRIBUTED=1 nohup $PY $(q "${argv[@]}") > $HOME_Q/$(q "$LOG_FILE") 2>&1 < /dev/null & echo \"started pid \$! on \$(hostname)\"" ;;

  logs)
    on_workers "${WORKER:-0}" "tail -n 200 -F $HOME_Q/$(q "$LOG_FILE")" ;;

  stop)
    on_workers "${WORKER:-all}" "pkill -TERM -f $(q "$TRAIN_PATTERN") || { echo \"no rlp_jax.train running\"; exit 0; }; for _ in \$(seq $STOP_TIMEOUT); do pgrep -f $(q "$TRAIN_PATTERN") >/dev/null || { echo stopped; exit 0; }; sleep 1; done; echo \"still running after ${STOP_TIMEOUT}s: SIGKILL\" >&2; pkill -KILL -f $(q "$TRAIN_PATTERN")" ;;

  ssh)
    ((${#REST[@]})) || die "ssh needs a command: $PROG ssh --name N --zone Z -- COMMAND"
    on_workers "${WORKER:-all}" "${REST[*]}" ;;
esac
