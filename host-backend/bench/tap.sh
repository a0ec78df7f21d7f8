#!/bin/bash
# Tap port rates: guest frames into the kernel and kernel frames into the guest through
# a tap device, our backend's `tap` port against DPDK's `net_tap` forwarded by DPDK's
# vhost (`dpdk-testpmd` with net_vhost0 and net_tap0 in `io` mode), interleaved. The
# front-end is our testpmd on a virtio-user port in both, so the rows compare the
# back-ends' tap paths. Each tap lives in a private network namespace made here and
# removed at the end (the host's interfaces are never touched).
#
#   tap-gtx  testpmd txonly -> back-end -> tap; rate: the tap's rx_packets in the kernel
#            (frames the kernel took; it drops them as addressed to another host)
#   tap-grx  pkt_flood (AF_PACKET, sendmmsg, in the namespace) -> tap -> back-end ->
#            testpmd rxonly; rate: testpmd's Rx-pps. The sender is a third busy process
#            on a 2-core machine: these rows are bounded by the kernel's sending side.
#
#   afp-gtx  as tap-gtx, through an `afpacket` port on one end of a veth pair whose other
#            end is in the namespace (rate: that end's rx_packets), against DPDK's
#            `net_af_packet,iface=VETH` (defaults, or AFP_ARGS, e.g.
#            ",blocksz=4096,framesz=2048,framecnt=512"); the veth is made per run here.
#   afp-grx  as tap-grx, pkt_flood on the namespace's veth end.
#
# QEMU's own tap back-end (-netdev tap, vhost=off) needs a guest, and guests run under
# TCG here: its rate would be the emulated guest's, not the tap path's; not run.
#
# Usage (root, from the workspace, after cargo build --release -p testpmd -p host-backend
# --example core_rtt --example pkt_flood): host-backend/bench/tap.sh
# Environment: RUNS (3), DUR (5), WARM (2), SIZES ("64 1514"), ROWS ("tap-gtx tap-grx";
# also "afp-gtx afp-grx"), AFP_ARGS (DPDK net_af_packet devargs after iface=),
# HOST_CPU/GUEST_CPU (1/0), BIN, PMD, PMD_ARGS (--hugepages), HOST_ARGS (more options for
# our back-end, e.g. --tap-syscalls).
# Output: per (row, size, back-end) the median of the run means and p10/p50/p90 of the
# 1-s samples (Mpps), the ratios ours/DPDK, then every run's mean with the round trip.
set -u
RUNS=${RUNS:-3}
DUR=${DUR:-5}
WARM=${WARM:-2}
SIZES=${SIZES:-"64 1514"}
ROWS=${ROWS:-"tap-gtx tap-grx"}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
RTT=${RTT:-target/release/examples/core_rtt}
FLOOD=${FLOOD:-target/release/examples/pkt_flood}
AFP_ARGS=${AFP_ARGS:-}
HOST_ARGS=${HOST_ARGS:-}

[ "$(id -u)" = 0 ] || { echo "tap.sh: must run as root (taps, namespaces, hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "tap.sh: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
for f in "$BIN" "$PMD" "$RTT" "$FLOOD"; do
    [ -x "$f" ] || { echo "tap.sh: $f missing (cargo build --release -p testpmd -p host-backend --example core_rtt --example pkt_flood)" >&2; exit 1; }
done

. "$(dirname "$0")/common.sh"
bench_init tapbench vnettap-
SOCK=$WORK/vhost.sock
NS=vnt-tapbench-$$
IF=vtb$$
# afp rows: the veth end in the namespace (ours, $IF, stays here for the back-end).
IFP=vtp$$
KIF=$IF
ip netns add "$NS" || exit 1
bench_extra_cleanup() {
    ip netns del "$NS" 2>/dev/null
    ip link del "$IF" 2>/dev/null
}

# Moves the tap the back-end made into the namespace and brings it up there.
take_tap() {
    local i; for i in $(seq 50); do ip link show "$IF" >/dev/null 2>&1 && break; sleep 0.1; done
    ip link set "$IF" netns "$NS" && ip -n "$NS" link set "$IF" up
}
kernel_rx() { ip netns exec "$NS" cat "/sys/class/net/$KIF/statistics/rx_packets"; }
# A veth pair for the afp rows: $IFP into the namespace, both ends up, no addresses.
make_veth() {
    ip link add "$IF" type veth peer name "$IFP" && ip link set "$IFP" netns "$NS" \
        && ip -n "$NS" link set "$IFP" up && ip link set "$IF" up
}

# run_one WHO ROW SIZE TAG -> $WORK/TAG.samples (pps, one per second)
run_one() {
    local who=$1 row=$2 size=$3 tag=$4 fwd=txonly
    local kind=tap dev="net_tap0,iface=$IF"
    case $row in *-grx) fwd=rxonly ;; esac
    case $row in afp-*) kind=afpacket; dev="net_af_packet0,iface=$IF$AFP_ARGS"; KIF=$IFP ;; *) KIF=$IF ;; esac
    rm -f "$SOCK"; PIDS=""
    if [ "$kind" = afpacket ]; then make_veth || return 1; fi
    if [ "$who" = ours ]; then
        "$BIN" --port "$kind:$SOCK,$IF" --cores "$HOST_CPU" --poll-us 0 $HOST_ARGS >"$WORK/$tag.host.log" 2>&1 &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
        if [ "$kind" = tap ]; then take_tap || return 1; fi
    else
        mkfifo "$WORK/$tag.hin"; exec 7<>"$WORK/$tag.hin"
        stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnettap-host -m 512 \
            --vdev "net_vhost0,iface=$SOCK,queues=1" --vdev "$dev" -- -i --nb-cores=1 \
            --total-num-mbufs=16384 <"$WORK/$tag.hin" >"$WORK/$tag.host.log" 2>&1 7>&- &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "testpmd>" 20 || return 1
        if [ "$kind" = tap ]; then take_tap || return 1; fi
        { echo "set fwd io"; echo start; } >&7
    fi
    "$PMD" --vdev "virtio_user0,path=$SOCK" --forward-mode "$fwd" --txpkts "$size" --cores "$GUEST_CPU" \
        $PMD_ARGS --stats-period 1 --duration $(( WARM + DUR + 1 )) >"$WORK/$tag.guest.log" 2>&1 &
    local gpid=$!
    PIDS="$PIDS $gpid"
    wait_for "$WORK/$tag.guest.log" "packet forwarding" 10 || return 1
    if [ "$fwd" = txonly ]; then
        sleep "$WARM"
        local last now s
        last=$(kernel_rx)
        for s in $(seq "$DUR"); do
            sleep 1; now=$(kernel_rx); echo $(( now - last )); last=$now
        done >"$WORK/$tag.samples"
    else
        ip netns exec "$NS" "$FLOOD" "$KIF" "$size" $(( WARM + DUR + 1 )) >"$WORK/$tag.flood.log" 2>&1 &
        PIDS="$PIDS $!"
    fi
    wait "$gpid" 2>/dev/null
    if [ "$who" = dpdk ]; then { echo stop; echo quit; } >&7 2>/dev/null; fi
    local k; for k in $(seq 30); do kill -0 $PIDS 2>/dev/null || break; sleep 0.1; done
    kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
    exec 7>&- 2>/dev/null
    # The tap goes with its back-end; a DPDK one may linger in the namespace.
    ip -n "$NS" link del "$IF" 2>/dev/null
    ip link del "$IF" 2>/dev/null # an afp row's veth (both ends)
    if [ "$fwd" = rxonly ]; then
        awk -v w="$WARM" -v d="$DUR" '$1 == "Rx-pps:" {n++; if (n > w && n <= w + d) print $2}' \
            "$WORK/$tag.guest.log" >"$WORK/$tag.samples"
    fi
    [ -s "$WORK/$tag.samples" ]
}

echo "# $(date -u +%FT%TZ) tap rows, $(git rev-parse --short HEAD 2>/dev/null) | $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1) | kernel $(uname -r)"
printf "%-8s %5s  %-34s %-34s %s\n" row size "ours: median (p10/p50/p90)" "DPDK net_tap/af_packet: med (p10/p50/p90)" "ratio p90/median"
RUNS_LOG=""
for row in $ROWS; do
    for size in $SIZES; do
        for r in $(seq "$RUNS"); do
            for who in ours dpdk; do record_run "$who" "$row" "$size" "$r"; done
        done
        report_row "$row" "$size" dpdk
    done
done
echo "# runs:"
printf "%s" "$RUNS_LOG"
