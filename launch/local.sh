#!/usr/bin/env bash
# N processes of `python -m dfkd_jax.main` on this machine, M fake CPU devices each: a multi-host run (a TPU pod, a GPU
# cluster) in miniature, for testing. The processes are the same command a pod or a cluster runs on every host; here
# jax.distributed is given localhost as the coordinator and CPU collectives go over gloo.
#
#   launch/local.sh N M CONFIG WORKDIR [more flags for dfkd_jax.main ...]
#   launch/local.sh 2 4 configs/nayer.py /tmp/pod_digits            # 2 processes x 4 devices = one mesh of 8
#   launch/local.sh 2 4 configs/dafl.py /tmp/pod_dafl --config.schedule.epochs=5
#
# Run it from the repository root with the project's environment active (PYTHON=... to choose the interpreter).
# Each output line is prefixed with its process index ([0], [1], ...); only process 0 writes the workdir's files.
# SIGTERM or Ctrl-C (SIGINT) is passed on to every process as SIGTERM: each finishes its epoch, the checkpoint is
# written, and they exit 0 with "preempted after epoch N: run the same command again to resume". If a process dies,
# the others stop with an error within --heartbeat_timeout seconds (default 100). The exit status is 0 only when every
# process exited 0. PORT=... chooses the coordinator's port (default: a free one).
set -u

if [ $# -lt 4 ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"  # this header
    exit 2
fi
processes=$1 devices=$2 config=$3 workdir=$4
shift 4
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g') --xla_force_host_platform_device_count=$devices"
echo "launch/local.sh: $processes processes x $devices CPU devices, coordinator localhost:$port, workdir $workdir" >&2

pids=()
for ((index = 0; index < processes; index++)); do
    "$python" -m dfkd_jax.main --config="$config" --workdir="$workdir" --coordinator_address="localhost:$port" \
        --num_processes="$processes" --process_id="$index" "$@" \
        > >(sed -u "s/^/[$index] /") 2> >(sed -u "s/^/[$index] /" >&2) &
    pids+=($!)
done

forward() {
    echo "launch/local.sh: passing SIGTERM to processes ${pids[*]}" >&2
    kill -TERM "${pids[@]}" 2>/dev/null
}
trap forward TERM INT

status=0
for index in "${!pids[@]}"; do
    pid=${pids[$index]}
    while true; do
        wait "$pid"
        code=$?
        # `wait` also returns (> 128) when a trapped signal arrives: wait again while the process is still there.
        if [ "$code" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    if [ "$code" -ne 0 ]; then
        echo "launch/local.sh: process $index exited with status $code" >&2
        status=1
    fi
done
wait  # the output filters
exit $status
