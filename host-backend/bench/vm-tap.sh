#!/bin/bash
# A QEMU guest's frames into the kernel through a tap: our back-end's `tap` port (QEMU's
# `-netdev vhost-user`) against QEMU's own tap back-end (`-netdev tap,vhost=off`; vhost-net
# needs KVM, and guests run under TCG here), the same guest and image in both, interleaved.
# The guest is the VM image (tests/vm/build-image.sh) with our testpmd over VFIO (no-IOMMU
# mode) in txonly; the tap lives in a private network namespace made here and removed at
# the end (the host's interfaces are never touched).
#
#   vm-gtx  guest txonly -> device -> tap; rate: the tap's rx_packets in the namespace
#           (frames the kernel took), sampled every second once testpmd runs
#   vm-grx  examples/pkt_flood (AF_PACKET sendmmsg, in the namespace) -> tap -> device ->
#           guest rxonly; rate: the tap's tx_packets (frames the device's reader took from
#           the tap: both back-ends read only into the guest's posted buffers). The sender
#           is a third busy process on this 2-core machine.
#
# The guest's vCPU is emulated (TCG), so both rows may be bound by the guest; what differs
# is the device: QEMU's emulates it in its own threads (a guest notification is a trapped
# write), ours polls the rings on HOST_CPU.
#
# Usage (root, from the workspace, after cargo build --release -p testpmd -p host-backend
# --example core_rtt --example pkt_flood, and the VM image: tests/vm/build-image.sh): host-backend/bench/vm-tap.sh
# Environment: RUNS (3), DUR (5), WARM (2), SIZES ("64 1514"), ROWS ("vm-gtx vm-grx"),
# HOST_CPU (1), GUEST_CPU (0,
# for the round-trip column only), BIN, IMAGE (target/vm/image), POLL_US (our back-end's
# --poll-us, 0: its worker never sleeps), HOST_ARGS (more options for our back-end).
# Output: per (size, back-end) the median of the run means and p10/p50/p90 of the 1-s
# samples (Mpps), the ratios ours/QEMU, then every run's mean.
set -u
RUNS=${RUNS:-3}
DUR=${DUR:-5}
WARM=${WARM:-2}
SIZES=${SIZES:-"64 1514"}
ROWS=${ROWS:-"vm-gtx vm-grx"}
FLOOD=${FLOOD:-target/release/examples/pkt_flood}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
RTT=${RTT:-target/release/examples/core_rtt}
IMAGE=${IMAGE:-target/vm/image}
HOST_ARGS=${HOST_ARGS:-}
POLL_US=${POLL_US:-0}

[ "$(id -u)" = 0 ] || { echo "vm-tap.sh: must run as root (taps, namespaces)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm-tap.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 1; }
for f in "$BIN" "$RTT" "$FLOOD" "$IMAGE/vmlinuz" "$IMAGE/initrd.img"; do
    [ -e "$f" ] || { echo "vm-tap.sh: $f missing (cargo build --release -p testpmd -p host-backend --example core_rtt; tests/vm/build-image.sh)" >&2; exit 1; }
done

. "$(dirname "$0")/common.sh"
bench_init vmtap vnetvmtap-
SOCK=$WORK/vhost.sock
NS=vnt-vmtap-$$
IF=vvt$$
ip netns add "$NS" || exit 1
bench_extra_cleanup() {
    ip netns del "$NS" 2>/dev/null
    ip link del "$IF" 2>/dev/null
}
# kernel_count rx_packets|tx_packets: the tap's counter in the namespace
kernel_count() { ip netns exec "$NS" cat "/sys/class/net/$IF/statistics/$1"; }

# run_one WHO ROW SIZE TAG -> $WORK/TAG.samples (pps, one per second)
run_one() {
    local who=$1 row=$2 size=$3 tag=$4 fwd=txonly counter=rx_packets
    if [ "$row" = vm-grx ]; then fwd=rxonly counter=tx_packets; fi
    rm -f "$SOCK"; PIDS=""
    local secs=$(( WARM + DUR + 3 ))
    local qemu=(qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 1024M
        -object memory-backend-memfd,id=mem,size=1024M,share=on -numa node,memdev=mem
        -device pcie-root-port,id=rp0,chassis=1,slot=1
        -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=,bus=rp0,disable-legacy=on
        -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img"
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vt.mode=noiommu vt.fwd=$fwd vt.secs=$secs vt.tp=--txpkts,$size"
        -nographic -serial "file:$WORK/$tag.serial" -monitor none -no-reboot)
    if [ "$who" = ours ]; then
        "$BIN" --port "tap:$SOCK,$IF" --cores "$HOST_CPU" --poll-us "$POLL_US" $HOST_ARGS >"$WORK/$tag.host.log" 2>&1 &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
        local i; for i in $(seq 50); do ip link show "$IF" >/dev/null 2>&1 && break; sleep 0.1; done
        ip link set "$IF" netns "$NS" && ip -n "$NS" link set "$IF" up || return 1
        "${qemu[@]}" -chardev "socket,id=c0,path=$SOCK" -netdev vhost-user,id=n0,chardev=c0 \
            >"$WORK/$tag.qemu.log" 2>&1 &
        PIDS="$PIDS $!"
    else
        # QEMU makes the tap in the namespace (it runs there) and we bring it up.
        ip netns exec "$NS" "${qemu[@]}" -netdev "tap,id=n0,ifname=$IF,script=no,downscript=no,vhost=off" \
            >"$WORK/$tag.qemu.log" 2>&1 &
        PIDS=$!
        local i; for i in $(seq 100); do ip -n "$NS" link show "$IF" >/dev/null 2>&1 && break; sleep 0.1; done
        ip -n "$NS" link set "$IF" up || return 1
    fi
    local qpid=${PIDS##* }
    wait_for "$WORK/$tag.serial" "VNET-TESTPMD BEGIN" 120 || { tail -n 5 "$WORK/$tag.serial" >&2; return 1; }
    if [ "$fwd" = rxonly ]; then
        ip netns exec "$NS" "$FLOOD" "$IF" "$size" $(( WARM + DUR + 1 )) >"$WORK/$tag.flood.log" 2>&1 &
        PIDS="$PIDS $!"
    fi
    sleep "$WARM"
    local last now s
    last=$(kernel_count $counter)
    for s in $(seq "$DUR"); do
        sleep 1; now=$(kernel_count $counter); echo $(( now - last )); last=$now
    done >"$WORK/$tag.samples"
    local k; for k in $(seq 600); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    grep -q "VNET-TESTPMD END rc=0" "$WORK/$tag.serial" || { echo "$tag: guest testpmd did not end well" >&2; grep "VNET-TESTPMD\|TP!" "$WORK/$tag.serial" | tail -n 3 >&2; }
    kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
    ip -n "$NS" link del "$IF" 2>/dev/null
    [ -s "$WORK/$tag.samples" ]
}

echo "# $(date -u +%FT%TZ) vm-tap rows, $(git rev-parse --short HEAD 2>/dev/null) | $(qemu-system-x86_64 --version | head -1) | kernel $(uname -r)"
printf "%-8s %5s  %-34s %-34s %s\n" row size "ours: median (p10/p50/p90)" "QEMU tap: median (p10/p50/p90)" "ratio p90/median"
RUNS_LOG=""
for row in $ROWS; do
    for size in $SIZES; do
        for r in $(seq "$RUNS"); do
            for who in ours qemu; do record_run "$who" "$row" "$size" "$r"; done
        done
        report_row "$row" "$size" qemu
    done
done
echo "# runs:"
printf "%s" "$RUNS_LOG"
