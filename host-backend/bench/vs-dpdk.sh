#!/usr/bin/env bash
# Side by side with DPDK 22.11, one polling core per side, on the same machine:
#  * backend scenarios (be-*): our host-backend vs DPDK's vhost PMD (net_vhost), both
#    driven by DPDK's virtio-user testpmd; the metric is read on the virtio-user side.
#  * front-end scenarios (fe-*): our driver (our testpmd, virtio-user) vs DPDK's
#    virtio-user PMD, both against DPDK's net_vhost; the metric is read on the vhost side.
# Runs are interleaved (ours, DPDK, ours, DPDK, ...) because DPDK's rate on this kind of
# machine jumps between a fast and a slow level; every run is sampled once a second.
#
# Usage (as root, from the repository root, after `cargo build --release -p host-backend
# -p testpmd && cargo build --release -p host-backend --example core_rtt`):
#   host-backend/bench/vs-dpdk.sh
# Environment: RUNS=3 DUR=5 WARM=2 SIZES="64 1514" SAMPLES=0 (1: print each run's
#   1-second samples too) PACKED=0 (1: every front-end, ours and DPDK's virtio-user, asks
#   for packed rings with packed_vq=1; DPDK's net_vhost and our backend offer them)
#   RING=256 (entries per virtqueue on both sides) BURST=32 (packets per burst call of
#   both testpmds; our backend's burst is fixed at 64) QUEUES=1 (queue pairs per port on
#   both sides, all polled by the one forwarding core of each side: our testpmd --rxq/--txq
#   and our backend --queues, DPDK's queues=N with --rxq/--txq=N)
#   MODES="be-gtx be-grx be-loop fe-gtx fe-grx fe-loop e2e-gtx e2e-grx e2e-loop"
#   HOST_CPU=1 GUEST_CPU=0 BIN=target/release/host-backend PMD=target/release/testpmd
#   PMD_ARGS="--hugepages" (extra arguments of our testpmd: by default its DMA arena is
#   in 2 MiB hugepages, as DPDK's memory always is)
#   be-gtx: virtio-user txonly -> backend sink --sink-read (ours) / rxonly (DPDK)
#                                                                       metric: virtio-user Tx-pps
#   be-grx: backend gen (ours) / txonly (DPDK) -> virtio-user rxonly    metric: virtio-user Rx-pps
#   be-loop: virtio-user macswap (start tx_first 32) <-> backend reflect (ours) / io (DPDK)
#                                                                       metric: virtio-user Rx-pps
#   fe-gtx: front-end txonly (ours / DPDK) -> DPDK vhost rxonly          metric: vhost Rx-pps
#   fe-grx: DPDK vhost txonly -> front-end rxonly (ours / DPDK)          metric: vhost Tx-pps
#   fe-loop: front-end macswap, 32 bursts injected (ours --tx-first 32 / DPDK start tx_first 32)
#            <-> DPDK vhost io                                           metric: vhost Rx-pps
#   e2e-*: the whole path, ours on both sides (our testpmd on our backend) against DPDK on
#          both sides (virtio-user on net_vhost); metric read on the front-end testpmd
#          (ours prints it with --stats-period 1):
#   e2e-gtx: txonly -> sink --sink-read / rxonly                         metric: Tx-pps
# SINK_READ=0 runs our sink without --sink-read (frames completed unread: unequal work).
#   e2e-grx: gen / txonly -> rxonly                                      metric: Rx-pps
#   e2e-loop: macswap, 32 bursts injected <-> reflect / io               metric: Rx-pps
# The loops are DPDK testpmd's loopback (macswap against io) with the injecting side on the
# virtio-user end, so that the back-end contenders (our reflect, DPDK's io) do the same
# thing: return every frame they receive.
# Within a scenario both contenders are measured by the same instrument.
# Sizes are frame lengths without CRC (testpmd --txpkts); 1514 is the largest frame of a
# 1500-byte MTU, which our testpmd and backend enforce (DPDK's notes use 1518). A size over
# 1514 (e.g. 9000) is a jumbo row, run the same way on both sides: each frame sent as a
# chain of 2000-byte segments (--txpkts=2000,2000,...), received into mergeable buffers
# (mrg_rxbuf=1 on both virtio-users), ports at max-pkt-len SIZE+18 (DPDK's, with
# multi-segment transmit and scattered receive) and our backend at --mtu 9000 (its `gen`
# spreads each frame over mergeable buffers, as DPDK's vhost txonly does).
# Output: one line per (mode, size, backend): median/min/max of the run means, and
# p10/p50/p90 of all 1-second samples plus how many samples sat below half the p90
# (the slow level); then the ratio ours/DPDK of the p90s and of the medians; then, per
# contender, each run's mean with the machine's core-to-core round trip measured just
# before and just after it (RTT, examples/core_rtt.rs): on this VM that round trip sits
# near 100 ns or near 500 ns and moves between the two as the host places the vCPUs,
# and every forwarding rate here follows it.
set -u
RUNS=${RUNS:-3}
DUR=${DUR:-5}
WARM=${WARM:-2}
SIZES=${SIZES:-"64 1514"}
MODES=${MODES:-"be-gtx be-grx be-loop fe-gtx fe-grx fe-loop e2e-gtx e2e-grx e2e-loop"}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
RTT=${RTT:-target/release/examples/core_rtt}
SAMPLES=${SAMPLES:-0}
PACKED=${PACKED:-0}
RING=${RING:-256}
BURST=${BURST:-32}
QUEUES=${QUEUES:-1}
OUR_PACKED=""; [ "$PACKED" = 1 ] && OUR_PACKED=",packed_vq=1"

[ "$(id -u)" = 0 ] || { echo "vs-dpdk.sh: must run as root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "vs-dpdk.sh: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "vs-dpdk.sh: $BIN missing (cargo build --release -p host-backend)" >&2; exit 1; }
[ -x "$PMD" ] || { echo "vs-dpdk.sh: $PMD missing (cargo build --release -p testpmd)" >&2; exit 1; }
[ -x "$RTT" ] || { echo "vs-dpdk.sh: $RTT missing (cargo build --release -p host-backend --example core_rtt)" >&2; exit 1; }
[ "$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)" -ge 400 ] || { echo "vs-dpdk.sh: need >= 400 free 2 MiB hugepages" >&2; exit 1; }

. "$(dirname "$0")/common.sh"
bench_init bench vnetbench-
SOCK=$WORK/vhost.sock

# Per-size arguments: TXPKTS (testpmd --txpkts), DPDK_X (DPDK testpmd's extra options; its
# virtio-user also DPDK_VX: net_vhost has no scattered receive), DEV_X (virtio-user
# devargs, ours and DPDK's), OURS_X (our testpmd), BE_X (our backend).
size_args() { # SIZE
    local left=$1 segs=""
    TXPKTS=$1 DPDK_X="" DPDK_VX="" DEV_X="" OURS_X="" BE_X=""
    # RING: entries per virtqueue (both virtio-users' queue_size; DPDK's descriptors per
    # queue); BURST: packets per burst call of both testpmds (the backend's is fixed, 64).
    if [ "$RING" != 256 ]; then
        DEV_X=",queue_size=$RING"
        DPDK_X="--rxd=$RING --txd=$RING"
    fi
    if [ "$QUEUES" != 1 ]; then
        DEV_X="$DEV_X,queues=$QUEUES"
        OURS_X="$OURS_X --rxq $QUEUES --txq $QUEUES"
        BE_X="$BE_X --queues $QUEUES"
    fi
    if [ "$BURST" != 32 ]; then
        DPDK_X="$DPDK_X --burst=$BURST"
        OURS_X="--burst $BURST"
    fi
    if [ "$1" -gt 1514 ]; then
        while [ "$left" -gt 2000 ]; do segs="${segs}2000,"; left=$(( left - 2000 )); done
        TXPKTS="$segs$left"
        DPDK_X="$DPDK_X --max-pkt-len=$(( $1 + 18 )) --tx-offloads=0x8000"
        DPDK_VX="--enable-scatter"
        DEV_X="$DEV_X,mrg_rxbuf=1"
        OURS_X="$OURS_X --max-pkt-len $(( $1 + 18 ))"
        BE_X="$BE_X --mtu 9000"
    fi
}

start_dpdk_vhost() { # FWD SIZE TAG -> sets HPID, fd 7 is its stdin
    mkfifo "$WORK/$3.hin"; exec 7<>"$WORK/$3.hin"
    stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnetbench-host -m 512 \
        --vdev "net_vhost0,iface=$SOCK,queues=$QUEUES" -- -i --nb-cores=1 --rxq="$QUEUES" --txq="$QUEUES" \
        --txpkts="$TXPKTS" $DPDK_X --total-num-mbufs=16384 <"$WORK/$3.hin" >"$WORK/$3.host.log" 2>&1 7>&- &
    HPID=$!
    wait_for "$WORK/$3.host.log" "testpmd>" 20 || return 1
    echo "set fwd $1" >&7
}

start_dpdk_virtio() { # FWD SIZE TAG -> sets GPID, fd 8 is its stdin
    mkfifo "$WORK/$3.gin"; exec 8<>"$WORK/$3.gin"
    stdbuf -oL dpdk-testpmd --lcores="0@${HOST_CPU},1@${GUEST_CPU}" --no-pci --file-prefix=vnetbench-guest -m 512 \
        --single-file-segments --vdev "net_virtio_user0,path=$SOCK,packed_vq=$PACKED$DEV_X" \
        -- -i --nb-cores=1 --rxq="$QUEUES" --txq="$QUEUES" --txpkts="$TXPKTS" $DPDK_X $DPDK_VX --total-num-mbufs=16384 \
        <"$WORK/$3.gin" >"$WORK/$3.guest.log" 2>&1 7>&- 8>&- &
    GPID=$!
    wait_for "$WORK/$3.guest.log" "testpmd>" 20 || return 1
    echo "set fwd $1" >&8
}

# Samples "show port stats all" once a second on the testpmd whose stdin is fd $1.
sample() {
    sleep "$WARM"
    echo "show port stats all" >&"$1"
    local k; for k in $(seq "$DUR"); do sleep 1; echo "show port stats all" >&"$1"; done
}

stop_all() {
    { echo stop; echo quit; } 2>/dev/null >&7
    { echo stop; echo quit; } 2>/dev/null >&8
    local k; for k in $(seq 50); do kill -0 $PIDS 2>/dev/null || break; sleep 0.1; done
    kill -TERM $PIDS 2>/dev/null
    wait $PIDS 2>/dev/null
    PIDS=""
    exec 7>&- 8>&-
}

# run_one WHO SCENARIO SIZE TAG -> writes 1-second samples (pps) to $WORK/TAG.samples
run_one() {
    local who=$1 sc=$2 size=$3 tag=$4 log key
    rm -f "$SOCK"; HPID=""; GPID=""
    size_args "$size"
    # Our sink reads every frame (copies it out), as DPDK's vhost rxonly copies each into
    # an mbuf: the gtx rows compare equal work (SINK_READ=0: the sink completes frames
    # unread, as before, which favours ours).
    SINK_X=""; [ "${SINK_READ:-1}" = 1 ] && SINK_X="--sink-read"
    # DPDK's side of an e2e row is DPDK's side of the be row of the same name.
    [ "$who" = dpdk ] && case $sc in e2e-*) sc=be-${sc#e2e-} ;; esac
    case $sc in
    be-gtx|be-grx|be-loop)
        local kind=sink hfwd=rxonly gfwd=txonly gstart=start
        [ "$sc" = be-grx ] && { kind=gen; hfwd=txonly; gfwd=rxonly; }
        [ "$sc" = be-loop ] && { kind=reflect; hfwd=io; gfwd=macswap; gstart="start tx_first 32"; }
        if [ "$who" = ours ]; then
            "$BIN" --port "$kind:$SOCK" --cores "$HOST_CPU" --poll-us 0 --pkt-size "$size" $BE_X $SINK_X \
                >"$WORK/$tag.host.log" 2>&1 &
            HPID=$!; PIDS=$HPID
            wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
        else
            start_dpdk_vhost "$hfwd" "$size" "$tag" || return 1
            PIDS=$HPID; echo start >&7
        fi
        start_dpdk_virtio "$gfwd" "$size" "$tag" || return 1
        PIDS="$HPID $GPID"
        sleep 0.2; echo "$gstart" >&8
        sample 8
        log=$WORK/$tag.guest.log; key=Tx-pps; [ "$sc" != be-gtx ] && key=Rx-pps ;;
    fe-gtx|fe-grx|fe-loop)
        local hfwd=rxonly gfwd=txonly txfirst=""
        [ "$sc" = fe-grx ] && { hfwd=txonly; gfwd=rxonly; }
        [ "$sc" = fe-loop ] && { hfwd=io; gfwd=macswap; txfirst=32; }
        start_dpdk_vhost "$hfwd" "$size" "$tag" || return 1
        PIDS=$HPID
        # A loop's frames are injected by the front-end: the vhost side must already
        # forward, else they are lost before the loop closes.
        [ "$sc" = fe-loop ] && echo start >&7
        if [ "$who" = ours ]; then
            "$PMD" --vdev "virtio_user0,path=$SOCK$OUR_PACKED$DEV_X" --forward-mode "$gfwd" --txpkts "$TXPKTS" $OURS_X --cores "$GUEST_CPU" \
                ${txfirst:+--tx-first $txfirst} $PMD_ARGS --duration $(( WARM + DUR + 3 )) >"$WORK/$tag.guest.log" 2>&1 &
            GPID=$!
            wait_for "$WORK/$tag.guest.log" "packet forwarding" 10 || return 1
        else
            start_dpdk_virtio "$gfwd" "$size" "$tag" || return 1
            echo "start${txfirst:+ tx_first $txfirst}" >&8
        fi
        PIDS="$HPID $GPID"
        sleep 0.2; [ "$sc" = fe-loop ] || echo start >&7
        sample 7
        log=$WORK/$tag.host.log; key=Rx-pps; [ "$sc" = fe-grx ] && key=Tx-pps ;;
    e2e-gtx|e2e-grx|e2e-loop)
        local kind=sink gfwd=txonly txfirst=""
        [ "$sc" = e2e-grx ] && { kind=gen; gfwd=rxonly; }
        [ "$sc" = e2e-loop ] && { kind=reflect; gfwd=macswap; txfirst=32; }
        key=Rx-pps; [ "$sc" = e2e-gtx ] && key=Tx-pps
        "$BIN" --port "$kind:$SOCK" --cores "$HOST_CPU" --poll-us 0 --pkt-size "$size" $BE_X $SINK_X \
            >"$WORK/$tag.host.log" 2>&1 &
        HPID=$!; PIDS=$HPID
        wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
        # Our testpmd prints its statistics once a second (--stats-period 1): the
        # first WARM are the warm-up, the next DUR the samples.
        "$PMD" --vdev "virtio_user0,path=$SOCK$OUR_PACKED$DEV_X" --forward-mode "$gfwd" --txpkts "$TXPKTS" $OURS_X --cores "$GUEST_CPU" \
            ${txfirst:+--tx-first $txfirst} $PMD_ARGS --stats-period 1 --duration $(( WARM + DUR + 1 )) \
            >"$WORK/$tag.guest.log" 2>&1 &
        GPID=$!; PIDS="$HPID $GPID"
        wait "$GPID" 2>/dev/null
        stop_all
        awk -v k="$key:" -v w="$WARM" -v d="$DUR" '$1 == k {n++; if (n > w && n <= w + d) print $2}' \
            "$WORK/$tag.guest.log" >"$WORK/$tag.samples"
        [ -s "$WORK/$tag.samples" ]
        return ;;
    *) echo "unknown scenario $sc" >&2; return 1 ;;
    esac
    stop_all
    awk -v k="$key:" '$1 == k {n++; if (n > 1) print $2}' "$log" >"$WORK/$tag.samples"
    [ -s "$WORK/$tag.samples" ] || return 1
}

echo "# $(date -u +%FT%TZ) $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1) | $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"
echo "# RUNS=$RUNS DUR=${DUR}s WARM=${WARM}s; rings: $([ "$PACKED" = 1 ] && echo packed || echo split) of $RING, burst $BURST; backend on cpu$HOST_CPU, virtio-user on cpu$GUEST_CPU; our testpmd: $PMD_ARGS; Mpps"
for mode in $MODES; do
    for size in $SIZES; do
        for r in $(seq "$RUNS"); do
            for be in ours dpdk; do
                tag="${mode}_${size}_${be}_$r"
                rtt_before=$(rtt)
                run_one "$be" "$mode" "$size" "$tag" >/dev/null || { echo "# run $be $mode $size #$r failed" >&2; stop_all; }
                echo "$rtt_before $(rtt)" >"$WORK/$tag.rtt"
                [ "$SAMPLES" = 1 ] && [ -s "$WORK/$tag.samples" ] &&
                    echo "# $mode ${size}B $be #$r samples (Mpps, RTT ns $(cat "$WORK/$tag.rtt")):" \
                        $(awk '{printf "%.2f ", $1/1e6}' "$WORK/$tag.samples")
            done
        done
        declare -A res
        for be in ours dpdk; do
            files=$(ls "$WORK"/${mode}_${size}_${be}_*.samples 2>/dev/null)
            if [ -z "$files" ]; then res[$be]=""; echo "$mode ${size}B $be: FAILED"; continue; fi
            res[$be]=$(run_stats $files | awk '{printf "%.2f %.2f %.2f %.2f %.2f %.2f %d/%d\n",
                $1 / 1e6, $2 / 1e6, $3 / 1e6, $4 / 1e6, $5 / 1e6, $6 / 1e6, $7, $8}')
            set -- ${res[$be]}
            printf "%s %sB %-4s: median %s (min %s max %s) | 1s p10/p50/p90 %s/%s/%s | slow samples %s\n" \
                "$mode" "$size" "$be" "$1" "$2" "$3" "$4" "$5" "$6" "$7"
        done
        for be in ours dpdk; do
            runs=""
            for r in $(seq "$RUNS"); do
                tag="${mode}_${size}_${be}_$r"
                [ -s "$WORK/$tag.samples" ] || continue
                runs="$runs $(awk '{s+=$1; n++} END {printf "%.2f", s/n/1e6}' "$WORK/$tag.samples")@$(tr ' ' / <"$WORK/$tag.rtt")"
            done
            echo "$mode ${size}B $be runs (Mpps@RTT ns before/after):$runs"
        done
        # The runs whose RTT before and after both sat on one machine level (fast: under
        # 200 ns, slow: over 300 ns), compared level by level.
        for lvl in fast slow; do
            line=""
            for be in ours dpdk; do
                line="$line $be $(for r in $(seq "$RUNS"); do
                    tag="${mode}_${size}_${be}_$r"
                    [ -s "$WORK/$tag.samples" ] || continue
                    read -r b a <"$WORK/$tag.rtt"
                    case "$b$a" in *-*) continue ;; esac
                    if { [ $lvl = fast ] && [ "$b" -lt 200 ] && [ "$a" -lt 200 ]; } ||
                        { [ $lvl = slow ] && [ "$b" -gt 300 ] && [ "$a" -gt 300 ]; }; then
                        awk '{s+=$1; n++} END {printf "%.4f\n", s/n/1e6}' "$WORK/$tag.samples"
                    fi
                done | awk '{s+=$1; n++} END {if (n) printf "%.2f(%d)", s/n, n; else printf "-(0)"}')"
            done
            echo "$line" | awk -v t="$mode ${size}B" -v l="$lvl" '{
                split($2, o, "("); split($4, d, "(");
                r = (o[1] != "-" && d[1] != "-" && d[1] > 0) ? sprintf("%.2fx", o[1] / d[1]) : "-";
                printf "%s on the %s machine level: ours %s dpdk %s (mean Mpps (runs)), ratio %s\n", t, l, $2, $4, r }'
        done
        if [ -n "${res[ours]}" ] && [ -n "${res[dpdk]}" ]; then
            set -- ${res[ours]}; om=$1; o90=$6
            set -- ${res[dpdk]}; dm=$1; d90=$6
            awk -v om="$om" -v dm="$dm" -v o="$o90" -v d="$d90" -v t="$mode ${size}B" \
                'BEGIN {printf "%s ratio ours/dpdk: p90 %.2fx, median %.2fx\n", t, o/d, om/dm}'
        fi
    done
done
