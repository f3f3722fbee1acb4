#!/usr/bin/env bash
# N processes of one run on this machine, joined the way pod workers are: each
# gets the coordinator address, the process count and its id in the environment
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). For trying and
# testing multi-process code on a CPU-only machine (gloo collectives).
#
#   launch/local_multiprocess.sh 2 --config=configs/pretrain_aal3.py:test --workdir=runs/mp
#
# Process i logs to WORKDIR/logs/process_<i>.log; process 0 is also shown here.
# DEVICES_PER_PROCESS (default 1) CPU devices per process; JAX_PLATFORMS
# defaults to cpu. If one process fails, the others are stopped and the exit
# status is the failed process's.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=DIR [more flags]" >&2
  exit 2
fi
num_processes=$1
shift
workdir=""
for arg in "$@"; do
  [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}
done
if [[ -z "$workdir" ]]; then
  echo "$0: --workdir=DIR is required (logs go to DIR/logs)" >&2
  exit 2
fi
logs="$workdir/logs"
mkdir -p "$logs"

# A free port for the coordinator (process 0 binds it).
port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$num_processes"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" JAX_NUM_CPU_DEVICES="${DEVICES_PER_PROCESS:-1}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  if ((i == 0)); then
    JAX_PROCESS_ID=$i python -m roi_mae_jax.main "$@" > >(tee "$logs/process_$i.log") 2>&1 &
  else
    JAX_PROCESS_ID=$i python -m roi_mae_jax.main "$@" > "$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Poll (portable to old bash): the first process to fail stops the rest at
# once rather than leaving them waiting on collectives.
status=0
running=$num_processes
while ((running > 0 && status == 0)); do
  sleep 0.2
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    code=0
    wait "$pid" || code=$?
    unset "pids[$i]"
    if ((code != 0)); then
      status=$code
      echo "$0: process $i failed (exit $code); logs in $logs" >&2
    fi
  done
done
if ((status != 0)) && ((${#pids[@]} > 0)); then
  echo "$0: stopping the other processes" >&2
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
fi
exit "$status"
