#!/bin/bash
# Memory: what each side holds for N devices, ours against DPDK's, in the configuration
# the rate rows use (one queue pair of 256 entries per device, 64-byte frames, traffic
# running). Per process: resident memory (VmRSS, VmHWM), and hugetlb memory mapped
# (Shared_Hugetlb + Private_Hugetlb over /proc/PID/smaps), after DUR seconds of txonly.
#
#   back-end:  ours `host-backend` with N `sink --sink-read` ports, or DPDK's dpdk-testpmd
#              with N net_vhost ports in rxonly (its EAL takes `-m 512` of hugepages; the
#              row shows what it mapped);
#   front-end: ours `testpmd --hugepages` with N virtio-user ports, or DPDK's dpdk-testpmd
#              with N net_virtio_user ports (`-m 512 --single-file-segments`).
# Each front-end is measured against the back-end of its own project.
#
# Usage (root): host-backend/bench/mem.sh     Environment: DEVS ("1 8"), DUR (3), BIN, PMD.
set -u
DEVS=${DEVS:-"1 8"}
DUR=${DUR:-3}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
[ "$(id -u)" = 0 ] || { echo "mem.sh: must run as root (hugepages)" >&2; exit 1; }
. "$(dirname "$0")/common.sh"
bench_init mem vnetmem-
# "rss_MiB hwm_MiB hugetlb_MiB" of PID
mem_of() {
    local rss hwm huge
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$1/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$1/status")
    huge=$(awk '/^(Shared|Private)_Hugetlb:/ {s += $2} END {print s + 0}' "/proc/$1/smaps")
    awk -v r="$rss" -v h="$hwm" -v g="$huge" 'BEGIN {printf "%8.1f %8.1f %8.1f", r/1024, h/1024, g/1024}'
}

printf "%-4s %-6s %-9s %8s %8s %8s\n" devs who side rss_MiB hwm_MiB huge_MiB
for n in $DEVS; do
    for who in ours dpdk; do
        rm -f "$WORK"/s*.sock; PIDS=""
        vd=(); vh=(); ports=""
        for i in $(seq 0 $(( n - 1 ))); do
            ports="$ports --port sink:$WORK/s$i.sock"
            vh+=(--vdev "net_vhost$i,iface=$WORK/s$i.sock,queues=1")
            if [ "$who" = ours ]; then vd+=(--vdev "virtio_user$i,path=$WORK/s$i.sock");
            else vd+=(--vdev "net_virtio_user$i,path=$WORK/s$i.sock,queues=1"); fi
        done
        if [ "$who" = ours ]; then
            "$BIN" $ports --sink-read --cores 1 --poll-us 0 >"$WORK/be.log" 2>&1 &
            bpid=$!; PIDS=$bpid
            wait_for "$WORK/be.log" "listening on" 10 || { echo "backend failed"; continue; }
            "$PMD" "${vd[@]}" --forward-mode txonly --cores 0 --hugepages --duration $(( DUR + 2 )) >"$WORK/fe.log" 2>&1 &
            fpid=$!; PIDS="$PIDS $fpid"
        else
            mkfifo "$WORK/h.$n" "$WORK/g.$n"; exec 7<>"$WORK/h.$n" 8<>"$WORK/g.$n"
            stdbuf -oL dpdk-testpmd --lcores=0@0,1@1 --no-pci --file-prefix=vnetmem-host -m 512 "${vh[@]}" -- -i \
                --nb-cores=1 --total-num-mbufs=16384 <"$WORK/h.$n" >"$WORK/be.log" 2>&1 7>&- 8>&- &
            bpid=$!; PIDS=$bpid
            wait_for "$WORK/be.log" "testpmd>" 30 || { echo "dpdk vhost failed"; continue; }
            { echo "set fwd rxonly"; echo start; } >&7
            stdbuf -oL dpdk-testpmd --lcores=0@1,1@0 --no-pci --file-prefix=vnetmem-guest -m 512 --single-file-segments \
                "${vd[@]}" -- -i --nb-cores=1 --total-num-mbufs=16384 <"$WORK/g.$n" >"$WORK/fe.log" 2>&1 7>&- 8>&- &
            fpid=$!; PIDS="$PIDS $fpid"
            wait_for "$WORK/fe.log" "testpmd>" 30 || { echo "dpdk virtio failed"; continue; }
            { echo "set fwd txonly"; echo start; } >&8
        fi
        sleep "$DUR"
        printf "%-4s %-6s %-9s %s\n" "$n" "$who" back-end "$(mem_of "$bpid")"
        printf "%-4s %-6s %-9s %s\n" "$n" "$who" front-end "$(mem_of "$fpid")"
        if [ "$who" = dpdk ]; then { echo stop; echo quit; } >&8 2>/dev/null; { echo stop; echo quit; } >&7 2>/dev/null; fi
        sleep 1; kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
        exec 7>&- 8>&- 2>/dev/null
    done
done
