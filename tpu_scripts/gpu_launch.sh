#!/usr/bin/env bash
# GPU launcher for rlp_jax on one or several hosts: exports what
# rlp_jax.sharding.maybe_initialize_distributed() reads (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID; JAX_LOCAL_DEVICE_IDS is read by jax.distributed.initialize itself), then execs
#   ${PYTHON:-python} -m rlp_jax.train --experiment=... [--workdir=...] [--set ...] [-- extra args]
# Values come from the flags, else from those variables already in the environment, else (under
# srun, SLURM_NTASKS > 1) from SLURM: SLURM_NTASKS, SLURM_PROCID and the first host of the step's
# node list. One process on one host needs none of them. See tpu_scripts/slurm_example.sbatch.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
usage: $PROG --experiment NAME [--workdir DIR] [--set KEY=VALUE ...] [flags] [-- TRAIN_ARGS]

  --experiment NAME        experiment (experiments/NAME.py or a recipe path) (required)
  --workdir DIR            run directory; required with several processes (all must share it)
  --set KEY=VALUE          config override passed to the trainer (repeatable)
  --coordinator HOST:PORT  process 0's address [JAX_COORDINATOR_ADDRESS]
                           (SLURM: first node, port JAX_COORDINATOR_PORT or 61440 + job id % 4096)
  --num-processes N        total processes [JAX_NUM_PROCESSES] (SLURM: SLURM_NTASKS)
  --process-id I           this process, 0..N-1 [JAX_PROCESS_ID] (SLURM: SLURM_PROCID)
  --local-device-ids IDS   GPUs of this process, e.g. 0,1,2,3 [JAX_LOCAL_DEVICE_IDS]
                           (default: all; under SLURM JAX gives each task GPU number SLURM_LOCALID)
  --dry-run                print the exports and the command ("+ " and shell-quoted), run nothing
  -h, --help               this help

Several hosts without SLURM: on each host run
  $PROG --coordinator host0:12345 --num-processes 2 --process-id I --experiment web_mix --workdir /shared/runs/x
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # die, q

EXPERIMENT=""
WORKDIR=""
COORD=${JAX_COORDINATOR_ADDRESS:-}
NPROC=${JAX_NUM_PROCESSES:-}
PID_=${JAX_PROCESS_ID:-}
LOCAL_IDS=${JAX_LOCAL_DEVICE_IDS:-}
DRY_RUN=0
SETS=()
EXTRA=()

while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then flag=${arg%%=*} val=${arg#*=} inline=1; else flag=$arg val="" inline=0; fi
  case $flag in
    --experiment | --workdir | --set | --coordinator | --num-processes | --process-id | --local-device-ids)
      if ((!inline)); then
        (($#)) && [[ $1 != --* ]] || die "$flag needs a value"
        val=$1
        shift
      fi ;;
    --dry-run | -h | --help)
      ((!inline)) || die "$flag takes no value" ;;
  esac
  case $flag in
    --experiment) EXPERIMENT=$val ;;
    --workdir) WORKDIR=$val ;;
    --set) [[ $val == *=* ]] || die "--set needs KEY=VALUE, got '$val'"; SETS+=("$val") ;;
    --coordinator) COORD=$val ;;
    --num-processes) NPROC=$val ;;
    --process-id) PID_=$val ;;
    --local-device-ids) LOCAL_IDS=$val ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) EXTRA+=("$@"); break ;;
    -*) die "unknown flag '$flag' (try $PROG --help)" ;;
    *) die "unexpected argument '$arg' (trainer arguments go after --)" ;;
  esac
done

[[ -n $EXPERIMENT ]] || die "--experiment is required"

# SLURM fills in whatever the flags and the environment left unset.
if [[ ${SLURM_NTASKS:-1} =~ ^[0-9]+$ ]] && ((${SLURM_NTASKS:-1} > 1)); then
  [[ -n $NPROC ]] || NPROC=$SLURM_NTASKS
  [[ -n $PID_ ]] || PID_=${SLURM_PROCID:?SLURM_NTASKS > 1 but SLURM_PROCID is unset: start the tasks with srun}
  if [[ -z $COORD ]]; then
    nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
    [[ -n $nodes ]] || die "SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set"
    hosts=$(scontrol show hostnames "$nodes") || die "scontrol show hostnames '$nodes' failed"
    host=${hosts%%$'\n'*}
    [[ -n $host ]] || die "scontrol show hostnames '$nodes' printed no host"
    port=${JAX_COORDINATOR_PORT:-$((61440 + ${SLURM_JOB_ID:-0} % 4096))}
    COORD=$host:$port
  fi
fi

distributed=0
if [[ -n $COORD || -n $NPROC || -n $PID_ ]]; then
  [[ -n $COORD && -n $NPROC && -n $PID_ ]] ||
    die "--coordinator, --num-processes and --process-id go together (or come from SLURM)"
  [[ $COORD =~ ^[^:[:space:]]+:[0-9]+$ || $COORD =~ ^\[[0-9a-fA-F:.]+\]:[0-9]+$ ]] ||
    die "--coordinator must be HOST:PORT, got '$COORD'"
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$NPROC'"
  if ! [[ $PID_ =~ ^(0|[1-9][0-9]*)$ ]] || ((PID_ >= NPROC)); then
    die "--process-id must be in 0..$((NPROC - 1)), got '$PID_'"
  fi
  distributed=1
fi
[[ -z $LOCAL_IDS || $LOCAL_IDS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--local-device-ids must be comma-separated GPU numbers, got '$LOCAL_IDS'"
if ((distributed && NPROC > 1)) && [[ -z $WORKDIR ]]; then
  die "--workdir is required with $NPROC processes (a directory they all share)"
fi

exports=()
if ((distributed)); then
  exports+=("JAX_COORDINATOR_ADDRESS=$COORD" "JAX_NUM_PROCESSES=$NPROC" "JAX_PROCESS_ID=$PID_")
fi
[[ -z $LOCAL_IDS ]] || exports+=("JAX_LOCAL_DEVICE_IDS=$LOCAL_IDS")

cmd=("${PYTHON:-python}" -m rlp_jax.train "--experiment=$EXPERIMENT")
[[ -z $WORKDIR ]] || cmd+=("--workdir=$WORKDIR")
for s in ${SETS[@]+"${SETS[@]}"}; do cmd+=(--set "$s"); done
cmd+=(${EXTRA[@]+"${EXTRA[@]}"})

out=1
((DRY_RUN)) || out=2
for e in ${exports[@]+"${exports[@]}"}; do
  printf '+ export %s\n' "$(q "$e")" >&"$out"
  ((DRY_RUN)) || export "${e?}"
done
printf '+ %s\n' "$(q "${cmd[@]}")" >&"$out"
((DRY_RUN)) || exec "${cmd[@]}"
