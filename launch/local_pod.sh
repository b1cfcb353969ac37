#!/usr/bin/env bash
# A pod on one machine: starts N processes of one llava_jax command, joined by
# jax.distributed over 127.0.0.1 (gloo collectives between processes), each with
# DEVICES_PER_PROCESS fake CPU devices. Same code path as a TPU pod's hosts.
#
#   bash launch/local_pod.sh 2 llava_jax.train --config=configs/tiny_shapes.py:test,root=runs/pod --workdir=runs/pod/run
#   DEVICES_PER_PROCESS=1 bash launch/local_pod.sh 4 llava_jax.evaluate --checkpoint=runs/pod/run ...
#
# Process i's output goes to $LOGDIR/process_i.log (default: a temp dir, printed) and
# process 0's is also shown here. If any process fails, the others are stopped and the
# script exits with the first failing process's status.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: launch/local_pod.sh N MODULE [ARGS...]   (e.g. 2 llava_jax.train --config=...)" >&2
  exit 2
fi
n="$1"; module="$2"; shift 2
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || { bash launch/setup.sh >&2 && python=.venv/bin/python; }
per="${DEVICES_PER_PROCESS:-2}"
logdir="${LOGDIR:-$(mktemp -d -t local_pod.XXXXXX)}"
mkdir -p "$logdir"
port="${PORT:-$("$python" -c 'import portpicker; print(portpicker.pick_unused_port())')}"
echo "local pod: $n processes x $per CPU devices, coordinator 127.0.0.1:$port, logs in $logdir" >&2

pids=()
for ((i = 0; i < n; i++)); do
  LLAVA_JAX_COORDINATOR="127.0.0.1:$port" LLAVA_JAX_NUM_PROCESSES="$n" LLAVA_JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" \
    "$python" -m "$module" "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logdir/process_0.log" --pid="${pids[0]}" >&2 &
tailer=$!

status=0
remaining=${#pids[@]}
declare -A done_
while [ "$remaining" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "${done_[$i]:-}" ] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"; rc=$?
      done_[$i]=1; remaining=$((remaining - 1))
      if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        echo "local pod: process $i exited with $rc; stopping the others (see $logdir/process_$i.log)" >&2
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
      fi
    fi
  done
  sleep 0.2
done
kill "$tailer" 2>/dev/null
wait "$tailer" 2>/dev/null
exit "$status"
