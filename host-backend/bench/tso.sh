#!/bin/bash
# TSO through a cross-connect: TCP/IPv4 super-frames of about 64 KiB (SEGS segments of
# MSS payload bytes behind 54 bytes of Ethernet, IPv4 and TCP headers: 63766 bytes by
# default) sent with a segmentation request into one device of a back-end cross-connect
# and received from the other device, in Gbit/s of TCP payload delivered to the
# receiving port. Two busy-polling threads in every row: the front-end's one forwarding
# core (GUEST_CPU) polls all its ports, the back-end's one worker or lcore (HOST_CPU)
# all its devices.
#
# Rows (contenders), interleaved run by run:
#   whole  ours: our backend (`--cores HOST_CPU --poll-us 0`) serves gen:G (--gso-size
#          MSS --pkt-size SIZE), xconnect:A,B and sink:S on one worker; our testpmd
#          (`-i --enable-lro --hold-tx`, csum mode, one forwarding core) has port 0 on G,
#          1 on A, 2 on B, 3 on S (streams 0->1 and 2->3), with `csum set tcp hw` and
#          `tso set MSS` on ports 1 and 3. B negotiated GUEST_TSO4 and GUEST_CSUM
#          (--enable-lro), so the backend passes every super-frame to B whole.
#          Per super-frame: gen writes it into port 0's receive buffers (one copy, on the
#          back-end's core); testpmd receives it whole (GUEST_TSO4: a chain of buffers),
#          its csum engine sets the IPv4 header checksum and a TSO request (TCP checksum
#          left to the device) and sends it on port 1 without a copy; the backend copies
#          A's transmit chain into its staging buffer, then into B's receive buffers with
#          the GSO header (two copies); testpmd receives it on port 2, sets a TSO request
#          again and sends it to S; the sink completes S's chain unread.
#   seg    ours, the same with `port config 2 rx_offload tcp_lro off` before the start:
#          B's guest TSO is switched off (control queue), so the backend cuts every
#          super-frame into SEGS segments: per segment the headers are rebuilt, the TCP
#          checksum computed in software over its payload, and the segment copied into
#          B's receive buffers; testpmd receives SEGS frames per super-frame on port 2,
#          sets each one's IPv4 header checksum and a checksum request, and sends them
#          to the sink.
#   dpdk   DPDK 22.11: dpdk-testpmd with net_vhost0 and net_vhost1 (`tso=1`: HOST_TSO4/6
#          offered; `legacy-ol-flags=1`, see below) in `io` mode on one lcore (HOST_CPU) is
#          the cross-connect; a second dpdk-testpmd (one lcore on GUEST_CPU, csum mode)
#          has port 0 net_pcap (`infinite_rx=1`, a pcap file of one super-frame with
#          gen's headers), 1 and 2 net_virtio_user on the two vhost ports, 3 net_null
#          (`no-rx=1`), with `csum set tcp hw 1` and `tso set MSS 1` (port 1's TCP_CKSUM
#          and TCP_TSO transmit offloads, so its virtio PMD negotiates CSUM and
#          HOST_TSO4/6) and `port config 2 rx_offload tcp_cksum on` and `tcp_lro on`
#          (port 2 negotiates GUEST_CSUM and GUEST_TSO4/6), all with the ports stopped.
#          Per super-frame: the pcap PMD copies it out of its preloaded mbuf into a new
#          one (the source, one copy on the front-end's core); the csum engine flags TSO
#          and port 1 sends it; the vhost PMD copies it out of port 1's transmit buffers
#          into mbufs (its GSO header becomes TSO flags) and into port 2's receive
#          buffers with a GSO header (two copies); port 2 receives it whole (RX_LRO) and
#          the csum engine sends it to net_null, which frees it.
#          DPDK's front-end has no TCP generator (txonly and flowgen send UDP) and its
#          csum forwarding drops what a full transmit ring does not take: pcap's source
#          outruns the cross-connect and the excess is dropped (port 1's TX-dropped) on
#          the front-end's core. The pcap PMD's infinite receive copies one mbuf segment
#          only, so this front-end runs with 64 KiB mbufs (`--mbuf-size=DPDK_MBUF`): its
#          ports receive a super-frame into one buffer. Ours uses testpmd's default
#          buffers (2 KiB, a super-frame spans a chain) unless BUF is set (BUF=65472:
#          64 KiB buffers as DPDK's; SIZE must then stay below 65152).
#          What does not work in DPDK 22.11, and how this row goes around it:
#          `--enable-rx-cksum` asks for IPV4_CKSUM as well, which net_virtio_user does
#          not offer: every port fails to configure ("requested Rx offloads 0x1e doesn't
#          match Rx offloads capabilities 0x201d"), so TCP_CKSUM and TCP_LRO are enabled
#          per port instead (and `--enable-lro` would fail on net_pcap and net_null);
#          with net_vhost's default (compliant) offload flags, `io` forwards a TSO
#          super-frame as RX_LRO, and the second vhost port delivers it as one 64 KiB
#          frame without GSO type and without NEEDS_CSUM (its TCP checksum only the
#          pseudo-header sum): `legacy-ol-flags=1` keeps the TSO request; `tso set` on
#          net_null prints "Error: TSO is not supported by port 3" but keeps the segment
#          size, so the csum engine flags super-frames for TSO instead of summing their
#          64 KiB in software before net_null frees them.
#
# Metric: port 2's receive rate as each front-end's `show port stats` prints it once a
# second (the same instrument in every row): payload bits = Rx-bps - 54 * 8 * Rx-pps.
# Ours holds what a full transmit ring does not take (`--hold-tx`), so the generator
# waits instead of having its frames dropped (port 1's TX-dropped is 0).
#
# Usage (root, from the workspace, after cargo build --release -p host-backend -p testpmd
# && cargo build --release -p host-backend --example core_rtt): host-backend/bench/tso.sh
# Environment: RUNS (3), DUR (5 s sampled per run), WARM (2 s), ROWS ("whole seg dpdk"),
# MSS (1448), SEGS (44), BUF (ours --mbuf-size; default testpmd's), DPDK_MBUF (65535),
# HOST_CPU/GUEST_CPU (1/0), BIN, PMD, PMD_ARGS (--hugepages), RTT.
# Output: per row the median of the run means and p10/p50/p90 of the 1-s samples (Gbit/s
# of TCP payload) and the super-frames per second; the ratios whole/dpdk and seg/whole;
# per row, once, what its first run's counters show (offloads passed whole or segmented,
# frame counts on each side); then every run's mean with the round trip before it.
set -u
RUNS=${RUNS:-3}
DUR=${DUR:-5}
WARM=${WARM:-2}
ROWS=${ROWS:-"whole seg dpdk"}
MSS=${MSS:-1448}
SEGS=${SEGS:-44}
BUF=${BUF:-}
DPDK_MBUF=${DPDK_MBUF:-65535}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
RTT=${RTT:-target/release/examples/core_rtt}
HDRS=54
SIZE=$(( HDRS + SEGS * MSS ))
# With BUF, 1024 buffers per port (the prompt's default pool is sized for 8 queue pairs:
# 8192 buffers of 64 KiB would not fit the hugepages of four ports).
OURS_X=""
[ -n "$BUF" ] && OURS_X="--mbuf-size $BUF --total-num-mbufs 1024"

[ "$(id -u)" = 0 ] || { echo "tso.sh: must run as root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "tso.sh: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "tso.sh: python3 missing (writes the pcap file)" >&2; exit 1; }
for f in "$BIN" "$PMD" "$RTT"; do
    [ -x "$f" ] || { echo "tso.sh: $f missing (cargo build --release -p host-backend -p testpmd; --example core_rtt)" >&2; exit 1; }
done
[ "$SIZE" -le 65535 ] || { echo "tso.sh: SEGS * MSS + 54 = $SIZE is above 65535" >&2; exit 1; }
[ "$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)" -ge 800 ] || { echo "tso.sh: need >= 800 free 2 MiB hugepages" >&2; exit 1; }

. "$(dirname "$0")/common.sh"
bench_init tso vnettso-
PCAP=$WORK/super.pcap

# The DPDK row's source: a pcap file of one super-frame with gen's headers (10.0.0.1:9 to
# 10.0.0.2:9, ACK and PSH, IPv4 header checksum valid, TCP checksum 0: the csum engine
# sets what TSO needs).
python3 - "$PCAP" "$SIZE" <<'EOF' || exit 1
import struct, sys
path, size = sys.argv[1], int(sys.argv[2])
eth = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1]) + b"\x08\x00"
ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size - 14, 1, 0x4000, 64, 6, 0,
                           bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
s = sum(struct.unpack("!10H", ip))
s = (s & 0xffff) + (s >> 16)
ip[10:12] = struct.pack("!H", ~((s & 0xffff) + (s >> 16)) & 0xffff)
tcp = struct.pack("!HHIIBBHHH", 9, 9, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
frame = eth + bytes(ip) + tcp + bytes((i * 7 + 3) & 0xff for i in range(size - 54))
with open(path, "wb") as f:
    f.write(struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1))
    f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
EOF

# Samples "show port stats all" on the testpmd whose stdin is fd $1: once after WARM s
# (the baseline), then once a second for DUR s.
sample() {
    sleep "$WARM"
    echo "show port stats all" >&"$1"
    local _; for _ in $(seq "$DUR"); do sleep 1; echo "show port stats all" >&"$1"; done
}

# Port 2's 1-s samples from a front-end log -> payload kbit/s, one a line.
samples_of() {
    awk -v d="$DUR" -v h="$HDRS" '/NIC statistics for port 2 /{f=1}
        f && /Rx-pps/ {n++; f=0; if (n > 1 && n <= d + 1) printf "%.0f\n", ($4 - $2 * h * 8) / 1000}' "$1"
}

# fwd LOG PORT FIELD: FIELD ("TX-packets:", ...) of port PORT's last forward statistics.
fwd() {
    awk -v p="Forward statistics for port $2 " -v k="$3" 'index($0, p) {f=1; next}
        f && /------------------------------------------------------------------------/ {f=0}
        f {for (i = 1; i < NF; i++) if ($i == k) v = $(i + 1)} END {print v + 0}' "$1"
}

# be LOG SOCKET FIELD: FIELD of device SOCKET in our backend's final statistics
# ("RX-packets:", "TX-packets:", "drops:", "offloads:" (the rest of its line)).
be() {
    awk -v s="$2 " -v k="$3" '/final statistics/ {fin=1} fin && index($0, s) == 3 {f=1; next}
        fin && f && /^  [^ ]/ {f=0}
        fin && f {for (i = 1; i <= NF; i++) if ($i == k) {
            if (k == "offloads:" || k == "drops:") { v = ""; for (j = i + 1; j <= NF && $j != "offloads:"; j++) v = v " " $j }
            else v = $(i + 1) }}
        END {print v}' "$1"
}

# run_ours ROW TAG: the whole or seg row; leaves TAG.samples and TAG.check.
run_ours() {
    local row=$1 tag=$2 g=$WORK/$2.g.sock a=$WORK/$2.a.sock b=$WORK/$2.b.sock s=$WORK/$2.s.sock bpid tpid
    "$BIN" --port "gen:$g" --port "xconnect:$a,$b" --port "sink:$s" --gso-size "$MSS" --pkt-size "$SIZE" \
        --cores "$HOST_CPU" --poll-us 0 >"$WORK/$tag.host.log" 2>&1 &
    bpid=$!; PIDS=$bpid
    wait_for "$WORK/$tag.host.log" "serving 4 device" 10 || return 1
    mkfifo "$WORK/$tag.gin"; exec 8<>"$WORK/$tag.gin"
    # shellcheck disable=SC2086
    "$PMD" -i --enable-lro --hold-tx --forward-mode csum --cores "$GUEST_CPU" $PMD_ARGS $OURS_X \
        --vdev "virtio_user0,path=$g" --vdev "virtio_user1,path=$a" --vdev "virtio_user2,path=$b" \
        --vdev "virtio_user3,path=$s" <"$WORK/$tag.gin" >"$WORK/$tag.guest.log" 2>&1 8>&- &
    tpid=$!; PIDS="$PIDS $tpid"
    wait_for "$WORK/$tag.guest.log" "testpmd> " 20 || return 1
    {
        echo "csum set tcp hw 1"; echo "tso set $MSS 1"; echo "csum set tcp hw 3"; echo "tso set $MSS 3"
        [ "$row" = seg ] && echo "port config 2 rx_offload tcp_lro off"
        echo start
    } >&8
    wait_for "$WORK/$tag.guest.log" "csum packet forwarding" 10 || return 1
    sample 8
    { echo stop; echo quit; } >&8
    local _; for _ in $(seq 100); do kill -0 "$tpid" 2>/dev/null || break; sleep 0.1; done
    kill -INT "$bpid"; wait "$bpid" 2>/dev/null
    wait "$tpid" 2>/dev/null
    PIDS=""; exec 8>&-
    grep -q "Unknown\|not supported\|Bad arguments\|not negotiated" "$WORK/$tag.guest.log" && return 1
    samples_of "$WORK/$tag.guest.log" >"$WORK/$tag.samples"
    local fl=$WORK/$tag.guest.log bl=$WORK/$tag.host.log p2 btx
    p2=$(fwd "$fl" 2 RX-packets:); btx=$(be "$bl" "$b" TX-packets:)
    printf "%s: gen delivered %s frames to port 0, which received %s; port 1 sent %s (TX-dropped %s), A received %s;\n" \
        "$row" "$(be "$bl" "$g" TX-packets:)" "$(fwd "$fl" 0 RX-packets:)" "$(fwd "$fl" 1 TX-packets:)" \
        "$(fwd "$fl" 1 TX-dropped:)" "$(be "$bl" "$a" RX-packets:)" >"$WORK/$tag.check"
    printf "  A's offloads:%s; B delivered %s frames, port 2 received %s (%s still in B's ring at stop);\n" \
        "$(be "$bl" "$a" offloads:)" "$btx" "$p2" "$(( btx - p2 ))" >>"$WORK/$tag.check"
    printf "  port 3 sent %s (TX-dropped %s), the sink took %s; backend drops: A%s, B%s, G%s, S%s\n" \
        "$(fwd "$fl" 3 TX-packets:)" "$(fwd "$fl" 3 TX-dropped:)" "$(be "$bl" "$s" RX-packets:)" \
        "$(be "$bl" "$a" drops:)" "$(be "$bl" "$b" drops:)" "$(be "$bl" "$g" drops:)" "$(be "$bl" "$s" drops:)" \
        >>"$WORK/$tag.check"
}

# run_dpdk TAG: the dpdk row; leaves TAG.samples and TAG.check.
run_dpdk() {
    local tag=$1 v0=$WORK/$1.v0.sock v1=$WORK/$1.v1.sock hpid gpid
    mkfifo "$WORK/$tag.hin"; exec 7<>"$WORK/$tag.hin"
    stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnettso-host -m 512 \
        --vdev "net_vhost0,iface=$v0,queues=1,tso=1,legacy-ol-flags=1" \
        --vdev "net_vhost1,iface=$v1,queues=1,tso=1,legacy-ol-flags=1" \
        -- -i --nb-cores=1 --total-num-mbufs=16384 <"$WORK/$tag.hin" >"$WORK/$tag.host.log" 2>&1 7>&- &
    hpid=$!; PIDS=$hpid
    wait_for "$WORK/$tag.host.log" "testpmd>" 20 || return 1
    { echo "set fwd io"; echo start; } >&7
    mkfifo "$WORK/$tag.gin"; exec 8<>"$WORK/$tag.gin"
    stdbuf -oL dpdk-testpmd --lcores="0@${HOST_CPU},1@${GUEST_CPU}" --no-pci --file-prefix=vnettso-guest -m 1024 \
        --single-file-segments --vdev "net_pcap0,rx_pcap=$PCAP,tx_pcap=/dev/null,infinite_rx=1" \
        --vdev "net_virtio_user1,path=$v0" --vdev "net_virtio_user2,path=$v1" --vdev "net_null0,no-rx=1" \
        -- -i --nb-cores=1 --mbuf-size="$DPDK_MBUF" --total-num-mbufs=4096 --no-flush-rx \
        <"$WORK/$tag.gin" >"$WORK/$tag.guest.log" 2>&1 7>&- 8>&- &
    gpid=$!; PIDS="$hpid $gpid"
    wait_for "$WORK/$tag.guest.log" "testpmd>" 30 || return 1
    {
        echo "port stop all"
        echo "port config 2 rx_offload tcp_cksum on"; echo "port config 2 rx_offload tcp_lro on"
        echo "set fwd csum"; echo "csum set tcp hw 1"; echo "tso set $MSS 1"; echo "tso set $MSS 3"
        echo "port start all"
        echo "show port info 2"
    } >&8
    wait_for "$WORK/$tag.guest.log" "Infos for port 2" 20 || return 1
    echo start >&8
    wait_for "$WORK/$tag.guest.log" "csum packet forwarding" 10 || return 1
    sample 8
    # A moment of DPDK's per-frame dumps: port 2's receive flags (RX_LRO: whole, with the
    # GSO type and size).
    echo "set verbose 1" >&8; sleep 0.05; echo "set verbose 0" >&8; sleep 0.5
    { echo stop; echo quit; } >&8
    local _; for _ in $(seq 100); do kill -0 "$gpid" 2>/dev/null || break; sleep 0.1; done
    { echo stop; echo quit; } >&7
    for _ in $(seq 100); do kill -0 "$hpid" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$hpid" "$gpid" 2>/dev/null; wait "$hpid" "$gpid" 2>/dev/null
    PIDS=""; exec 7>&- 8>&-
    grep -q "Fail to configure\|Start ports failed\|Not all ports" "$WORK/$tag.guest.log" && return 1
    samples_of "$WORK/$tag.guest.log" >"$WORK/$tag.samples"
    local fl=$WORK/$tag.guest.log hl=$WORK/$tag.host.log
    printf "dpdk: pcap gave %s frames; port 1 sent %s (TX-dropped %s), vhost0 received %s;\n" \
        "$(fwd "$fl" 0 RX-packets:)" "$(fwd "$fl" 1 TX-packets:)" "$(fwd "$fl" 1 TX-dropped:)" \
        "$(fwd "$hl" 0 RX-packets:)" >"$WORK/$tag.check"
    printf "  vhost1 sent %s (TX-dropped %s), port 2 received %s, %s bytes each; net_null took %s;\n" \
        "$(fwd "$hl" 1 TX-packets:)" "$(fwd "$hl" 1 TX-dropped:)" "$(fwd "$fl" 2 RX-packets:)" \
        "$(awk '/NIC statistics for port 2 /{f=1} f && /RX-packets/ {p = $2; b = $6; f=0} END {print (p ? int(b / p) : 0)}' "$fl")" \
        "$(fwd "$fl" 3 TX-packets:)" >>"$WORK/$tag.check"
    awk 'match($0, /port [0-9]+\/queue [0-9]+: received/) {p2 = (substr($0, RSTART, 7) == "port 2/")}
        p2 && /ol_flags:/ {n++; if (/RTE_MBUF_F_RX_LRO/) l++}
        p2 && /length=/ {if (match($0, /length=[0-9]+/)) len[substr($0, RSTART + 7, RLENGTH - 7)]++}
        END {s = ""; for (k in len) s = s " " k "x" len[k];
             printf "  port 2 frames dumped: %d, with RX_LRO: %d, lengths:%s\n", n, l, s}' "$fl" >>"$WORK/$tag.check"
}

# reap: every process the last run left (one that failed midway returns before its own
# stop) asked to stop, killed after 2 s, and waited for; the control fifos closed.
reap() {
    local p _
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null; done
    for _ in $(seq 20); do
        for p in $PIDS; do kill -0 "$p" 2>/dev/null && break; p=""; done
        [ -z "$p" ] && break
        sleep 0.1
    done
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    PIDS=""
    exec 7>&- 8>&-
}

run_one() { # WHO TAG
    local rc=0
    rm -f "$WORK/$2".*.sock
    case $1 in
    whole|seg) run_ours "$1" "$2" || rc=1 ;;
    dpdk) run_dpdk "$2" || rc=1 ;;
    *) echo "tso.sh: unknown row $1" >&2; return 1 ;;
    esac
    reap
    [ "$rc" = 0 ] && [ -s "$WORK/$2.samples" ]
}

echo "# $(date -u +%FT%TZ) TSO through a cross-connect, $(git rev-parse --short HEAD 2>/dev/null) | $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1) | super-frame $SIZE B ($SEGS x $MSS payload), our testpmd's --mbuf-size ${BUF:-default}, DPDK's front-end mbufs $DPDK_MBUF"
RUNS_LOG=""
for r in $(seq "$RUNS"); do
    for who in $ROWS; do
        tag=$who.$r
        before=$(rtt)
        if run_one "$who" "$tag"; then
            RUNS_LOG="$RUNS_LOG$who run $r: $(awk '{s+=$1; n++} END {printf "%.2f", s/n/1e6}' "$WORK/$tag.samples") Gbit/s ($(awk '{printf "%.2f ", $1/1e6}' "$WORK/$tag.samples")), rtt before ${before} ns"$'\n'
        else
            RUNS_LOG="$RUNS_LOG$who run $r: FAILED"$'\n'
            tail -n 5 "$WORK/$tag".*.log >&2
            rm -f "$WORK/$tag.samples"
        fi
    done
done
printf "%-6s %-38s %s\n" row "Gbit/s of TCP payload: median (p10/p50/p90)" "super-frames/s (median)"
declare -A MED P90
for who in $ROWS; do
    files=$(ls "$WORK/$who".*.samples 2>/dev/null)
    if [ -z "$files" ]; then printf "%-6s no successful run\n" "$who"; continue; fi
    # shellcheck disable=SC2086
    read -r m p10 p50 p90 <<<"$(summary $files)"
    MED[$who]=$m; P90[$who]=$p90
    printf "%-6s %-38s %s\n" "$who" "$m ($p10/$p50/$p90)" \
        "$(awk -v g="$m" -v p=$(( SEGS * MSS )) 'BEGIN {printf "%.0f", g * 1e9 / 8 / p}')"
done
ratio() { # A B -> "ratio A/B: p90 X, median Y"
    [ -n "${MED[$1]:-}" ] && [ -n "${MED[$2]:-}" ] || return 0
    awk -v a="${P90[$1]}" -v b="${P90[$2]}" -v c="${MED[$1]}" -v d="${MED[$2]}" -v t="$1/$2" \
        'BEGIN {printf "ratio %s: p90 %.2f, median %.2f\n", t, (b > 0 ? a / b : 0), (d > 0 ? c / d : 0)}'
}
ratio whole dpdk
ratio seg whole
echo "# checks (each row's first successful run):"
for who in $ROWS; do
    f=$(ls "$WORK/$who".*.check 2>/dev/null | head -1)
    [ -n "$f" ] && cat "$f"
done
echo "# runs:"
printf "%s" "$RUNS_LOG"
