#!/bin/bash
# Devices per worker: one back-end worker (one polling core) serving N devices, each a
# virtio-user port of one front-end (our testpmd, `txonly`, all N ports polled by one
# thread on the other core). The back-end is ours (N `sink --sink-read` ports: each frame
# read, as DPDK's rxonly copies it) or DPDK's (`dpdk-testpmd`, N net_vhost ports, `rxonly`,
# one lcore). Same front-end for both: the rows compare how each back-end's cost grows
# with the devices it polls. Rate per device: the front-end's per-port Tx-pps (a frame
# leaves its ring only when the back-end took it); aggregate = their sum; fairness = the
# slowest device's rate over the mean.
#
# Usage (root, from the workspace, after cargo build --release -p testpmd -p host-backend
# --example core_rtt): host-backend/bench/scale.sh
# Environment: DEVS ("1 2 4 8 16 64"), RUNS (2, interleaved), DUR (5), WARM (2), SIZE (64),
# HOST_CPU/GUEST_CPU, BIN, PMD, PMD_ARGS (--hugepages), OUT (a CSV file to append rows to:
# devs,backend,run,aggregate_pps,min_pps,mean_pps,rtt_ns).
set -u
DEVS=${DEVS:-"1 2 4 8 16 64"}
RUNS=${RUNS:-2}
DUR=${DUR:-5}
WARM=${WARM:-2}
SIZE=${SIZE:-64}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
RTT=${RTT:-target/release/examples/core_rtt}
OUT=${OUT:-}
# A new CSV file starts with its header (plot.py reads columns by name).
if [ -n "$OUT" ] && [ ! -s "$OUT" ]; then echo "devs,backend,run,aggregate_pps,min_pps,mean_pps,rtt_ns" >"$OUT"; fi

[ "$(id -u)" = 0 ] || { echo "scale.sh: must run as root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "scale.sh: dpdk-testpmd missing" >&2; exit 1; }
for f in "$BIN" "$PMD" "$RTT"; do
    [ -x "$f" ] || { echo "scale.sh: $f missing (cargo build --release -p testpmd -p host-backend --example core_rtt)" >&2; exit 1; }
done

. "$(dirname "$0")/common.sh"
bench_init scale vnetscale-

# run_one WHO N TAG -> prints "aggregate min mean" (pps, means over the sampled seconds)
run_one() {
    local who=$1 n=$2 tag=$3 i ports="" vdevs=()
    for i in $(seq 0 $(( n - 1 ))); do vdevs+=(--vdev "virtio_user$i,path=$WORK/s$i.sock"); done
    rm -f "$WORK"/s*.sock; PIDS=""
    if [ "$who" = ours ]; then
        for i in $(seq 0 $(( n - 1 ))); do ports="$ports --port sink:$WORK/s$i.sock"; done
        "$BIN" $ports --sink-read --cores "$HOST_CPU" --poll-us 0 >"$WORK/$tag.host.log" 2>&1 &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
    else
        local vh=()
        for i in $(seq 0 $(( n - 1 ))); do vh+=(--vdev "net_vhost$i,iface=$WORK/s$i.sock,queues=1"); done
        mkfifo "$WORK/$tag.hin"; exec 7<>"$WORK/$tag.hin"
        stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnetscale-host \
            -m 1024 "${vh[@]}" -- -i --nb-cores=1 --total-num-mbufs=$(( 16384 + n * 2048 )) \
            <"$WORK/$tag.hin" >"$WORK/$tag.host.log" 2>&1 7>&- &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "testpmd>" 30 || return 1
        { echo "set fwd rxonly"; echo start; } >&7
    fi
    "$PMD" "${vdevs[@]}" --forward-mode txonly --txpkts "$SIZE" --cores "$GUEST_CPU" $PMD_ARGS \
        --stats-format json --stats-period 1 --duration $(( WARM + DUR + 1 )) >"$WORK/$tag.guest.log" 2>&1
    if [ "$who" = dpdk ]; then { echo stop; echo quit; } >&7 2>/dev/null; fi
    local k; for k in $(seq 30); do kill -0 $PIDS 2>/dev/null || break; sleep 0.1; done
    kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
    exec 7>&- 2>/dev/null
    python3 - "$WORK/$tag.guest.log" "$n" "$WARM" "$DUR" <<'PY'
import json, sys
path, n, warm, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rates = {}   # port -> list of tx_pps samples, in order
for line in open(path):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("type") == "port_stats":
        rates.setdefault(v["port"], []).append(v["tx_pps"])
if len(rates) != n:
    sys.exit(1)
means = []
for p in range(n):
    s = rates[p][warm:warm + dur]
    if not s:
        sys.exit(1)
    means.append(sum(s) / len(s))
agg = sum(means)
print(int(agg), int(min(means)), int(agg / n))
PY
}

echo "# $(date -u +%FT%TZ) devices per worker, $SIZE B, $(git rev-parse --short HEAD 2>/dev/null) | $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1)"
printf "%-5s %-6s %-4s %12s %12s %12s %9s %s\n" devs back run agg_Mpps min_Mpps mean_Mpps fairness rtt_ns
for n in $DEVS; do
    for r in $(seq "$RUNS"); do
        for who in ours dpdk; do
            before=$(rtt)
            if line=$(run_one "$who" "$n" "$n.$who.$r"); then
                read -r agg min mean <<<"$line"
                printf "%-5s %-6s %-4s %s %s\n" "$n" "$who" "$r" "$(awk -v a="$agg" -v m="$min" -v e="$mean" \
                    'BEGIN {printf "%12.3f %12.3f %12.3f %9.2f", a/1e6, m/1e6, e/1e6, (e > 0 ? m/e : 0)}')" "$before"
                [ -n "$OUT" ] && echo "$n,$who,$r,$agg,$min,$mean,$before" >>"$OUT"
            else
                echo "$n $who run $r: FAILED"; tail -n 5 "$WORK/$n.$who.$r".*.log
            fi
        done
    done
done
