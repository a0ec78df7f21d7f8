#!/usr/bin/env bash
# Hunts the packed be-loop stall (docs/PERFORMANCE.md, "Known limits"): runs
# `PACKED=1 PATHS=be-loop callgrind.sh` up to N times with debug logging of ring set-up and
# attaches, dumps the DPDK peer's rings twice during the traffic (packed-ring-dump.py), and
# stops at the first run that moved fewer than 50000 frames, keeping its work directory
# (callgrind output, both logs, both dumps). Other runs' directories are removed.
# The stall needs a loaded machine: e.g. a busy loop pinned to cpu1 beside it
#   (taskset -c 1 sh -c 'while :; do :; done' &)
# Usage (as root, from the repository root, after `cargo build --release -p host-backend`):
#   host-backend/bench/loop-stall-hunt.sh [N=20]   (KEEP_ALL=1 keeps every run's directory)
set -u
here=$(dirname "$0")
export RUST_LOG=info,host_backend::device::handler=debug,host_backend::port=debug,host_backend::worker=debug
for k in $(seq "${1:-20}"); do
    log=$(mktemp)
    PACKED=1 KEEP=1 PATHS=be-loop TOP=1 TRAFFIC_S=6 "$here/callgrind.sh" >"$log" 2>&1 &
    cg=$!
    sleep 6
    work=$(ls -td /tmp/vnetcg.* | head -1)
    peer=$(pgrep -n -x dpdk-testpmd)
    "$here/packed-ring-dump.py" "$peer" "$work/ours.log" >"$work/dump-6s.txt" 2>&1
    sleep 2
    "$here/packed-ring-dump.py" "$peer" "$work/ours.log" >"$work/dump-8s.txt" 2>&1
    wait $cg
    n=$(awk -F'|' '/^\| be-loop.*PortPath::run/ {gsub(/ /, "", $4); print $4}' "$log")
    work=$(grep -o '/tmp/vnetcg[^ ]*' "$log" | head -1)
    echo "run $k: ${n:-?} frames, $work"
    if [ -n "$n" ] && [ "$n" -lt 50000 ]; then
        cp "$log" "$work/callgrind.out.txt"
        echo "stalled: $work"
        exit 0
    fi
    [ -n "${KEEP_ALL:-}" ] || rm -rf "$work"; rm -f "$log"
done
echo "no stall in ${1:-20} runs"
