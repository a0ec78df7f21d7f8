#!/bin/bash
# The 64 B loop's levels, with the burst profile of each run: ours (our testpmd `macswap
# --tx-first 32` on our `reflect`) and DPDK's split pair (virtio-user `macswap`, `start
# tx_first 32`, on net_vhost `io`), interleaved, each with testpmd's
# `--record-burst-stats` (DPDK's and ours: packets per receive and transmit burst call)
# and the core-to-core round trip before and after. What it is for: telling a run on the
# fast level from one on the slow level by how the two sides trade frames (full bursts,
# or a few frames at a time; how often a poll finds nothing), issue 24's loop swings.
#
# Usage (root, from the workspace, after cargo build --release -p testpmd -p host-backend
# --example core_rtt): host-backend/bench/loop-levels.sh
# Environment: RUNS (5), DUR (8 s; the first and last second are not sampled), WHO ("ours dpdk"), SIZE (64), RING (256), PACKED (0; 1: packed rings on both virtio-users), HOST_CPU/GUEST_CPU,
# BIN, PMD, PMD_ARGS (--hugepages), OUR_X (extra options for our testpmd), BE_X (for our
# backend).
# Output per run: who, the mean and each 1-s sample of the loop rate (Mpps, first second
# dropped), RTT before/after (ns), then the RX-bursts and TX-bursts lines of the
# front-end.
set -u
RUNS=${RUNS:-5}
DUR=${DUR:-8}
WHO=${WHO:-"ours dpdk"}
SIZE=${SIZE:-64}
RING=${RING:-256}
PACKED=${PACKED:-0}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
OUR_X=${OUR_X:-}
BE_X=${BE_X:-}
RTT=${RTT:-target/release/examples/core_rtt}

[ "$(id -u)" = 0 ] || { echo "loop-levels.sh: must run as root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "loop-levels.sh: dpdk-testpmd missing" >&2; exit 1; }
for f in "$BIN" "$PMD" "$RTT"; do
    [ -x "$f" ] || { echo "loop-levels.sh: $f missing (cargo build --release -p testpmd -p host-backend --example core_rtt)" >&2; exit 1; }
done

. "$(dirname "$0")/common.sh"
bench_init levels vnetlvl-
SOCK=$WORK/vhost.sock

stop_pids() {
    local k; for k in $(seq 30); do kill -0 $PIDS 2>/dev/null || break; sleep 0.1; done
    kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
}

run_ours() { # TAG -> guest log with "Rx-pps:" lines and burst lines
    "$BIN" --port "reflect:$SOCK" --cores "$HOST_CPU" --poll-us 0 $BE_X >"$WORK/$1.host.log" 2>&1 &
    PIDS=$!
    wait_for "$WORK/$1.host.log" "listening on" 10 || return 1
    "$PMD" --vdev "virtio_user0,path=$SOCK,queue_size=$RING,packed_vq=$PACKED" --forward-mode macswap --tx-first 32 --txpkts "$SIZE" \
        --cores "$GUEST_CPU" $PMD_ARGS $OUR_X --record-burst-stats --stats-period 1 --duration "$DUR" \
        >"$WORK/$1.guest.log" 2>&1
    stop_pids
}

run_dpdk() { # TAG
    mkfifo "$WORK/$1.hin" "$WORK/$1.gin"
    exec 7<>"$WORK/$1.hin" 8<>"$WORK/$1.gin"
    stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnetlvl-host -m 512 \
        --vdev "net_vhost0,iface=$SOCK,queues=1" -- -i --nb-cores=1 --rxq=1 --txq=1 \
        --txpkts="$SIZE" --total-num-mbufs=16384 <"$WORK/$1.hin" >"$WORK/$1.host.log" 2>&1 7>&- 8>&- &
    PIDS=$!
    wait_for "$WORK/$1.host.log" "testpmd>" 20 || return 1
    { echo "set fwd io"; echo start; } >&7
    stdbuf -oL dpdk-testpmd --lcores="0@${HOST_CPU},1@${GUEST_CPU}" --no-pci --file-prefix=vnetlvl-guest -m 512 \
        --single-file-segments --vdev "net_virtio_user0,path=$SOCK,queues=1,queue_size=$RING,packed_vq=$PACKED" \
        -- -i --nb-cores=1 --rxq=1 --txq=1 --rxd="$RING" --txd="$RING" --txpkts="$SIZE" --total-num-mbufs=16384 --record-burst-stats \
        <"$WORK/$1.gin" >"$WORK/$1.guest.log" 2>&1 7>&- 8>&- &
    PIDS="$PIDS $!"
    wait_for "$WORK/$1.guest.log" "testpmd>" 20 || return 1
    { echo "set fwd macswap"; echo "start tx_first 32"; } >&8
    local s; for s in $(seq "$DUR"); do sleep 1; echo "show port stats 0" >&8; done
    sleep 0.3
    { echo stop; } >&8; sleep 0.5
    { echo quit; } >&8 2>/dev/null; { echo stop; echo quit; } >&7 2>/dev/null
    stop_pids
    exec 7>&- 8>&-
}

echo "# $(date -u +%FT%TZ) loop levels, $SIZE B, ring $RING $([ "$PACKED" = 1 ] && echo packed || echo split), ours: $OUR_X / $BE_X, $(git rev-parse --short HEAD 2>/dev/null) | $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1)"
for r in $(seq "$RUNS"); do
    for who in $WHO; do
        tag=$who.$r
        before=$(rtt)
        "run_$who" "$tag" || { echo "$tag: FAILED"; tail -n 5 "$WORK/$tag".*.log; continue; }
        after=$(rtt)
        samples=$(awk -v d="$DUR" '$1 == "Rx-pps:" {n++; if (n > 1 && n < d) printf "%.2f ", $2/1e6}' "$WORK/$tag.guest.log")
        mean=$(echo "$samples" | awk '{for (i = 1; i <= NF; i++) s += $i; if (NF) printf "%.2f", s/NF}')
        echo "$who run $r: mean $mean Mpps [$samples] rtt ${before}/${after} ns"
        grep -E "(RX|TX)-bursts" "$WORK/$tag.guest.log" | head -2
    done
done
