#!/usr/bin/env bash
# Instructions per packet under `valgrind --tool=callgrind`: a deterministic cost measure
# for the burst paths (wall-clock rates on a 2-core machine vary; instruction counts do not).
#
# One process runs under callgrind (pinned to CG_CPU), its vhost-user peer runs natively
# (pinned to PEER_CPU) and keeps the measured side busy. After the run, the callgrind
# output is parsed (every call arc into a function carries that call's inclusive cost, so
# summing the arcs gives the function's inclusive Ir no matter how its body was split over
# inlined source files) and the inclusive Ir of the burst function(s) is divided by the
# packets the measured process moved (from its own final statistics).
#
#   path       under callgrind                        peer (native)                 packets
#   be-gtx     ours: host-backend --port sink          DPDK virtio-user txonly        backend rx_packets
#   be-grx     ours: host-backend --port gen --count   DPDK virtio-user rxonly        backend tx_packets
#   fe-gtx     ours: testpmd txonly (virtio-user)      DPDK net_vhost rxonly          testpmd tx_packets
#   fe-grx     ours: testpmd rxonly (virtio-user)      DPDK net_vhost txonly          testpmd rx_packets
#   dpdk-gtx   DPDK virtio-user txonly                 DPDK net_vhost rxonly          TX-packets
#   dpdk-grx   DPDK virtio-user rxonly                 DPDK net_vhost txonly          RX-packets
#   dpdkv-gtx  DPDK net_vhost rxonly                   DPDK virtio-user txonly        RX-packets
#   dpdkv-grx  DPDK net_vhost txonly                   DPDK virtio-user rxonly        TX-packets
#   be-loop    ours: host-backend --port reflect       DPDK virtio-user macswap       backend rx_packets
#   dpdkv-loop DPDK net_vhost io                       DPDK virtio-user macswap       RX-packets
#   fe-loop    ours: testpmd macswap --tx-first 32      DPDK net_vhost io              testpmd rx_packets
#   dpdk-loop  DPDK virtio-user macswap, tx_first 32    DPDK net_vhost io              RX-packets
# Split ring (PACKED=1: packed rings, DPDK's virtio-user with packed_vq=1 and ours with
# packed_vq=1; both in order, their default), 256 entries, one queue pair, 64-byte
# frames, burst 32 (testpmd) / 64 (backend).
# Comparable pairs: fe-gtx ~ dpdk-gtx (front-end transmit), fe-grx ~ dpdk-grx (front-end
# receive), be-gtx ~ dpdkv-gtx (device side of guest TX; ours does not copy, DPDK's does),
# be-grx ~ dpdkv-grx (device side of guest RX; both write the frame into guest buffers),
# be-loop ~ dpdkv-loop (the device side of a loop: each frame taken from the transmit ring
# and written into a receive buffer of the same device; the front-end starts with 32
# bursts, which fill its 256-entry ring), fe-loop ~ dpdk-loop (the driver side of the same
# loop: receive, swap the addresses, transmit). Loop packets are counted once (a frame
# received and sent back), which is what the receive counters say.
#
# DPDK under callgrind runs with --no-huge -m 512 --iova-mode=va (EAL memory is a memfd,
# which vhost-user shares like a hugepage file); valgrind 3.19 needs no extra options for it.
# Native DPDK peers use 2 MiB hugepages (file prefixes vnetcg-*, removed at the end). DPDK's
# testpmd always busy-polls, so the peers are busy pollers; each has a core of its own.
#
# Functions: ours by symbol. DPDK's PMD burst functions are static and Debian ships no
# symbols for them: the burst function is the PMD function that dpdk-testpmd's forwarding
# function calls directly (the indirect call of the inlined rte_eth_{rx,tx}_burst); its name
# comes from a table of offsets checked against rte_eth_fp_ops with gdb for this build
# (by build id), else it is shown as library+offset. The vhost library's
# rte_vhost_{enqueue,dequeue}_burst are exported and named by callgrind.
#
# Output: one table row per function: packets the measured process moved, the function's
# inclusive Ir over the whole run, its calls, Ir per packet, and packets per call (below the
# burst size: some calls found little or no work; such calls cost a few Ir each). Rows
# "thread total" count every instruction of the burst thread (the forwarding loop included).
# Then the TOP functions by self cost in that thread, then notes (failures with the lines of
# the log that explain them, the DPDK virtio-user Rx/Tx path in use).
#
# Usage (as root, from the repository root, after
# `cargo build --release -p host-backend -p testpmd`):
#   host-backend/bench/callgrind.sh
# Environment: PATHS="be-gtx be-grx be-loop fe-gtx fe-grx fe-loop dpdk-gtx dpdk-grx
#   dpdk-loop dpdkv-gtx dpdkv-grx dpdkv-loop" (all by default), TRAFFIC_S=3 (seconds of
#   traffic for time-bounded paths; callgrind runs the measured side ~50x slower),
#   GEN_COUNT=2000000 (be-grx), PACKED=0|1 (ring layout), CG_CPU=1 PEER_CPU=0, TOP=5 (functions by self cost
#   listed per path), KEEP=1 (keep the work directory with the callgrind files),
#   BIN=target/release/host-backend PMD=target/release/testpmd, SIZE=64 (frame bytes;
#   above 1514 a jumbo frame as vs-dpdk.sh sends it: a chain of 2000-byte segments,
#   mergeable receive buffers on both virtio-users, ports at max-pkt-len SIZE+18, our
#   backend at --mtu 9000),
#   VG_EXTRA="..." (extra valgrind options, e.g. --dump-instr=yes for per-instruction costs),
#   VNET_LOCK_HELD=1 if the caller already holds /tmp/vnet-tests.lock (the script takes it
#   otherwise, so it never runs next to the cross-process tests).
set -euo pipefail

PATHS=${PATHS:-"be-gtx be-grx be-loop fe-gtx fe-grx fe-loop dpdk-gtx dpdk-grx dpdk-loop dpdkv-gtx dpdkv-grx dpdkv-loop"}
TRAFFIC_S=${TRAFFIC_S:-3}
GEN_COUNT=${GEN_COUNT:-2000000}
PACKED=${PACKED:-0}
case $PACKED in 0) OUR_PACKED="" ;; 1) OUR_PACKED=",packed_vq=1" ;; *) echo "callgrind.sh: PACKED must be 0 or 1" >&2; exit 1 ;; esac
CG_CPU=${CG_CPU:-1}
PEER_CPU=${PEER_CPU:-0}
TOP=${TOP:-5}
KEEP=${KEEP:-}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
SIZE=${SIZE:-64}
TXPKTS=$SIZE DEV_J="" DPDK_J=() DPDK_VJ=() OURS_J=() BE_J=()
if [ "$SIZE" -gt 1514 ]; then
    TXPKTS="" left=$SIZE
    while [ "$left" -gt 2000 ]; do TXPKTS="${TXPKTS}2000,"; left=$(( left - 2000 )); done
    TXPKTS="$TXPKTS$left" DEV_J=",mrg_rxbuf=1"
    DPDK_J=(--max-pkt-len=$(( SIZE + 18 )) --tx-offloads=0x8000) DPDK_VJ=(--enable-scatter)
    OURS_J=(--max-pkt-len $(( SIZE + 18 ))) BE_J=(--mtu 9000)
fi
STARTUP_S=120 # bound on a start-up under valgrind (DPDK's EAL init takes ~10 s there)
EXIT_S=120    # bound on a shutdown under valgrind (callgrind writes its files then)

die() { echo "callgrind.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (hugepages, DPDK)"
[ -x "$BIN" ] || die "$BIN missing (cargo build --release -p host-backend -p testpmd)"
[ -x "$PMD" ] || die "$PMD missing (cargo build --release -p host-backend -p testpmd)"
if ! command -v valgrind >/dev/null; then
    apt-get install -y valgrind >/dev/null || { apt-get update >/dev/null && apt-get install -y valgrind >/dev/null; }
fi
if ! command -v dpdk-testpmd >/dev/null; then
    apt-get install -y dpdk dpdk-dev >/dev/null || { apt-get update >/dev/null && apt-get install -y dpdk dpdk-dev >/dev/null; }
fi
mountpoint -q /dev/hugepages || die "/dev/hugepages is not mounted (mount -t hugetlbfs nodev /dev/hugepages)"
[ "$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)" -ge 256 ] || die "need >= 256 free 2 MiB hugepages"

# The cross-process lock of the tests (fd 9; every child is started with it closed, so a
# stray child can never keep it).
if [ -z "${VNET_LOCK_HELD:-}" ]; then
    exec 9>/tmp/vnet-tests.lock
    flock -w 3600 9 || die "could not take /tmp/vnet-tests.lock within an hour"
fi

WORK=$(mktemp -d /tmp/vnetcg.XXXXXX)
SOCK=$WORK/vhost.sock
declare -A PID=() FD=()
cleanup() {
    local t p
    for t in "${!PID[@]}"; do kill -TERM "${PID[$t]}" 2>/dev/null || true; done
    for p in $(seq 20); do
        local alive=0
        for t in "${!PID[@]}"; do kill -0 "${PID[$t]}" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for t in "${!PID[@]}"; do kill -KILL "${PID[$t]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf /dev/hugepages/vnetcg-* /var/run/dpdk/vnetcg-*
    if [ -n "$KEEP" ]; then echo "# kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

VG=(valgrind --tool=callgrind --separate-threads=yes ${VG_EXTRA:-})

wait_for() { # FILE PATTERN SECONDS [PID]: until PATTERN is in FILE (fails early if PID died)
    local i
    for i in $(seq $(($3 * 10))); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

stop_proc() { # TAG SIGNAL SECONDS: signal (unless empty), wait up to SECONDS, then SIGKILL
    local tag=$1 p=${PID[$1]:-} i
    [ -n "$p" ] || return 0
    [ -n "$2" ] && kill "-$2" "$p" 2>/dev/null || true
    for i in $(seq $(($3 * 10))); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null && note "$tag did not exit within $3 s: killed"
    wait "$p" 2>/dev/null || true
    unset "PID[$tag]"
    local fd=${FD[$tag]:-}
    if [ -n "$fd" ]; then exec {fd}>&-; unset "FD[$tag]"; fi
}

# dpdk_start TAG ROLE(vhost|virtio) CG(yes|no): dpdk-testpmd in interactive mode reading
# commands from a FIFO (held open on FD[TAG]); under callgrind on CG_CPU with memfd memory
# (--no-huge), natively on PEER_CPU with hugepages. Waits for the prompt.
dpdk_start() {
    local tag=$1 role=$2 cg=$3 cpu vdev prefix fd
    local -a pre=() mem=() jx=()
    if [ "$role" = vhost ]; then
        vdev="net_vhost0,iface=$SOCK,queues=1"; prefix=vnetcg-host
    else
        vdev="net_virtio_user0,path=$SOCK,queues=1,packed_vq=$PACKED$DEV_J"; prefix=vnetcg-guest
        jx=("${DPDK_VJ[@]}")
    fi
    if [ "$cg" = yes ]; then
        cpu=$CG_CPU; pre=("${VG[@]}" --callgrind-out-file="$WORK/$tag.cg"); mem=(--no-huge -m 512 --iova-mode=va)
    else
        cpu=$PEER_CPU; mem=(-m 512); [ "$role" = virtio ] && mem+=(--single-file-segments)
    fi
    mkfifo "$WORK/$tag.in"
    exec {fd}<>"$WORK/$tag.in"
    FD[$tag]=$fd
    taskset -c "$cpu" "${pre[@]}" dpdk-testpmd --lcores="0@$cpu,1@$cpu" --no-pci --file-prefix=$prefix \
        "${mem[@]}" --log-level=pmd.net.virtio.init:info --vdev "$vdev" \
        -- -i --nb-cores=1 --rxq=1 --txq=1 --txpkts=$TXPKTS "${DPDK_J[@]}" "${jx[@]}" --total-num-mbufs=16384 \
        <"$WORK/$tag.in" >"$WORK/$tag.log" 2>&1 {fd}>&- 9>&- &
    PID[$tag]=$!
    wait_for "$WORK/$tag.log" "testpmd>" "$STARTUP_S" "${PID[$tag]}"
}
dpdk_cmd() { local t=$1; shift; printf '%s\n' "$@" >&"${FD[$t]}"; }
dpdk_quit() { dpdk_cmd "$1" stop quit 2>/dev/null || true; stop_proc "$1" "" "$2"; }
# Packets in testpmd's "Accumulated forward statistics" block: dpdk_count LOG RX|TX
dpdk_count() {
    awk -v k="$2-packets:" '/Accumulated forward statistics/ {f = 1} f && $1 == k {print $2; exit}' "$1"
}

ours_backend_start() { # TAG ARGS...: our host-backend under callgrind, waits until it listens
    local tag=$1; shift
    taskset -c "$CG_CPU" "${VG[@]}" --callgrind-out-file="$WORK/$tag.cg" "$BIN" "$@" "${BE_J[@]}" --cores "$CG_CPU" \
        --stats-format json >"$WORK/$tag.log" 2>&1 9>&- &
    PID[$tag]=$!
    wait_for "$WORK/$tag.log" "listening on" "$STARTUP_S" "${PID[$tag]}"
}
ours_testpmd_start() { # TAG MODE [ARGS...]: our testpmd under callgrind for TRAFFIC_S seconds of forwarding
    local tag=$1 mode=$2
    shift 2
    taskset -c "$CG_CPU" "${VG[@]}" --callgrind-out-file="$WORK/$tag.cg" "$PMD" --vdev "virtio_user0,path=$SOCK$OUR_PACKED$DEV_J" \
        --forward-mode "$mode" --txpkts "$TXPKTS" "${OURS_J[@]}" --cores "$CG_CPU" --duration "$TRAFFIC_S" --stats-format json "$@" \
        >"$WORK/$tag.log" 2>&1 9>&- &
    PID[$tag]=$!
    wait_for "$WORK/$tag.log" "packet forwarding" "$STARTUP_S" "${PID[$tag]}"
}
# Largest value of KEY in the backend's final JSON line (the device total; one device).
backend_count() {
    grep '"final":true' "$1" | grep -o "\"$2\":[0-9]*" | cut -d: -f2 | sort -n | tail -1
}
testpmd_count() { # LOG KEY: from testpmd's forward_stats JSON line
    grep '"forward_stats"' "$1" | tail -1 | grep -o "\"$2\":[0-9]*" | head -1 | cut -d: -f2
}

# Callgrind output -> TSV: "F obj fn self incl calls" per function, "A obj fn obj fn calls
# incl" per call arc. Handles compressed names "(id) name" and the positions header.
PARSE_AWK=$(cat <<'EOF'
function nm(kind, v,   id, rest) {
    if (v ~ /^\([0-9]+\)/) {
        id = substr(v, 2, index(v, ")") - 2); rest = substr(v, index(v, ")") + 1); sub(/^ /, "", rest)
        if (rest != "") names[kind, id] = rest
        return names[kind, id]
    }
    return v
}
BEGIN { npos = 1 }
/^positions:/ { npos = NF - 1; next }
/^ob=/  { ob = nm("ob", substr($0, 4)); next }
/^cob=/ { cob = nm("ob", substr($0, 5)); next }
/^fn=/  { fn = ob "\t" nm("fn", substr($0, 4)); seen[fn] = 1; cob = ""; next }
/^cfn=/ { cfn = nm("fn", substr($0, 5)); next }
/^calls=/ { split(substr($0, 7), a, " "); ncalls = a[1]; pend = 1; next }
/^[0-9+*-]/ {
    c = (NF > npos) ? $(npos + 1) : 0
    if (pend) {
        callee = (cob != "" ? cob : ob) "\t" cfn
        incl[callee] += c; calls[callee] += ncalls; seen[callee] = 1
        arc[fn "\t" callee] += c; arcn[fn "\t" callee] += ncalls
        pend = 0; cob = ""
    } else self[fn] += c
    next
}
END {
    for (k in seen) printf "F\t%s\t%.0f\t%.0f\t%.0f\n", k, self[k], incl[k], calls[k]
    for (k in arc) printf "A\t%s\t%.0f\t%.0f\n", k, arcn[k], arc[k]
}
EOF
)

# parse_tag TAG MODE ARG: parses every thread file of TAG and sets TSV to the burst
# thread: with MODE=fn the thread where function ARG has the largest inclusive cost, with
# MODE=arc the one where dpdk-testpmd's calls into objects matching ARG cost the most.
parse_tag() {
    local tag=$1 mode=$2 want=$3 f best=0 v
    TSV=""
    for f in "$WORK/$tag".cg*; do
        case $f in *.tsv) continue ;; esac
        [ -f "$f" ] || continue
        awk "$PARSE_AWK" "$f" >"$f.tsv"
        v=$(awk -F'\t' -v m="$mode" -v w="$want" '
            m == "fn" && $1 == "F" && $3 == w {s += $5}
            m == "arc" && $1 == "A" && $2 ~ /dpdk-testpmd$/ && $4 ~ w {s += $7}
            END {printf "%.0f", s}' "$f.tsv")
        if [ "$v" -gt "$best" ]; then best=$v; TSV=$f.tsv; fi
    done
    [ -n "$TSV" ] || { note "$tag: no thread of the callgrind output runs $want"; return 1; }
}
thread_total() { # -> "Ir 0": every instruction of the burst thread ($TSV)
    awk -F'\t' '$1 == "F" {t += $4} END {printf "%.0f 0\n", t}' "$TSV"
}
fn_cost() { # NAME [OBJ-REGEX] -> "incl calls" in $TSV
    awk -F'\t' -v w="$1" -v o="${2:-.}" '$1 == "F" && $3 == w && $2 ~ o {i += $5; c += $6}
        END {printf "%.0f %.0f\n", i, c}' "$TSV"
}

# DPDK's PMD burst functions are static; these offsets were read from rte_eth_fp_ops with
# gdb (rx_pkt_burst at +0, tx_pkt_burst at +64) for Debian's 22.11.11-0+deb12u1 build.
declare -A PMD_NAME=(
    [3ede333cedd0f0d04c3fd796f6ca170a6b537b96:0x0000000000015830]=virtio_xmit_pkts_inorder
    [3ede333cedd0f0d04c3fd796f6ca170a6b537b96:0x0000000000012520]=virtio_recv_pkts_inorder
    [e93b36919ab85927c858449e47a7d15783c2baf7:0x0000000000004230]=eth_vhost_rx
    [e93b36919ab85927c858449e47a7d15783c2baf7:0x0000000000005310]=eth_vhost_tx
)
pmd_label() { # OBJ FN -> the checked name, else library+offset
    local id
    id=$(readelf -n "$1" 2>/dev/null | awk '/Build ID/ {print $3}') || true
    echo "${PMD_NAME[$id:$2]:-$(basename "$1")+$(printf '0x%x' "$2")}"
}
# A loop's forwarding calls both bursts: arc_rows PATH OBJ-REGEX PACKETS adds one row per
# call arc from dpdk-testpmd into OBJ-REGEX in $TSV (defined before `row`, called after).
# Arcs from different callers into the same function (testpmd's tx_first and its
# forwarding loop both call the transmit burst) are summed.
arc_rows() {
    awk -F'\t' -v o="$2" '$1 == "A" && $2 ~ /dpdk-testpmd$/ && $4 ~ o {k = $4 "\t" $5; c[k] += $6; i[k] += $7}
        END {for (k in c) printf "%s\t%.0f\t%.0f\n", k, c[k], i[k]}' "$TSV" |
        while IFS=$'\t' read -r cob cfn calls incl; do
            row "$1" "$(pmd_label "$cob" "$cfn")" "$incl" "$calls" "$3"
        done
}
# The heaviest call arc from dpdk-testpmd into OBJ-REGEX in $TSV: "caller callee-obj callee calls incl"
dpdk_burst_arc() {
    awk -F'\t' -v o="$1" '$1 == "A" && $2 ~ /dpdk-testpmd$/ && $4 ~ o && $7 > m {m = $7; r = $3 "\t" $4 "\t" $5 "\t" $6 "\t" $7}
        END {print r}' "$TSV"
}

ROWS=$WORK/rows
TOPS=$WORK/tops
NOTES=$WORK/notes
: >"$ROWS"; : >"$TOPS"; : >"$NOTES"
note() { echo "$*" | tee -a "$NOTES" >&2; }
row() { # PATH FUNCTION-LABEL INCL CALLS PACKETS
    awk -v p="$1" -v f="$2" -v i="$3" -v c="$4" -v n="$5" 'BEGIN {
        printf "| %-9s | %-40s | %9.0f | %13.0f | %9s | %7.1f | %8s |\n", p, f, n, i,
            (c ? sprintf("%.0f", c) : "-"), (n ? i / n : 0), (c ? sprintf("%.1f", n / c) : "-") }' >>"$ROWS"
}
fail_row() { printf '| %-9s | %s |\n' "$1" "FAILED: $2" >>"$ROWS"; }
tops() { # PATH PACKETS: the TOP functions by self cost in the burst thread
    local total self fn obj
    total=$(awk -F'\t' '$1 == "F" {t += $4} END {printf "%.0f", t}' "$TSV")
    echo "$1 (burst thread: self Ir per packet, share of the thread's Ir):" >>"$TOPS"
    awk -F'\t' '$1 == "F" && $4 > 0 {print $4 "\t" $3 "\t" $2}' "$TSV" | sort -t$'\t' -k1,1nr | awk -v k="$TOP" 'NR <= k' |
        while IFS=$'\t' read -r self fn obj; do
            case $fn in 0x*) fn=$(pmd_label "$obj" "$fn") ;; esac
            awk -v s="$self" -v n="$2" -v t="$total" -v f="$fn" -v o="${obj##*/}" \
                'BEGIN {printf "  %7.1f  %5.1f%%  %s [%s]\n", s / n, 100 * s / t, f, o}'
        done >>"$TOPS"
}
why() { # TAG: a failed start, with the lines of its log that explain it
    note "$1 did not start; from its log:"
    { grep -hE "error|Error|ERROR|fail|Fail|panick|Cause|valgrind: |vex |unhandled|SIG" "$WORK/$1.log" 2>/dev/null ||
        tail -n 5 "$WORK/$1.log" 2>/dev/null || true; } | head -8 | sed 's/^/    /' | tee -a "$NOTES" >&2
}

# Frame fill of our txonly: what the forwarding loop (the caller of tx_burst) spends in
# Packet::push_tail / Packet::set_data and in the memcpy of the template -> "Ir calls"
fill_cost() {
    local loop
    loop=$(awk -F'\t' '$1 == "A" && $5 == "driver::queue::tx::TxQueue::tx_burst" {print $3; exit}' "$TSV")
    awk -F'\t' -v l="$loop" '$1 == "A" && $3 == l && ($5 ~ /^driver::mempool::Packet::(push_tail|set_data)$/ || $5 ~ /memcpy/) {
        i += $7; if ($5 !~ /memcpy/) c += $6 } END {printf "%.0f %.0f\n", i, c}' "$TSV"
}

# One path. Order of events, everywhere: the peer is forwarding before the measured side
# starts, and the measured side stops (exits) before the peer stops, so the burst function
# always finds work and idle polls stay out of the counts (see pkt/call in the table).
run_path() {
    local p=$1 n a caller cob cfn calls incl
    local hfwd=rxonly gfwd=txonly
    rm -f "$SOCK"
    case $p in
    be-gtx|be-grx|be-loop)
        # ours under callgrind is the vhost-user server: it starts first, then the peer
        # connects and forwards. be-grx: the gen port stops by itself after GEN_COUNT
        # frames; we stop it as soon as the JSON statistics (every second) show that.
        # be-loop: the peer injects 32 bursts and swaps the addresses of what comes back.
        local kind=sink key=rx_packets gstart=start
        local -a extra=()
        [ $p = be-grx ] && { kind=gen; key=tx_packets; gfwd=rxonly; extra=(--count "$GEN_COUNT" --stats-period 1); }
        [ $p = be-loop ] && { kind=reflect; gfwd=macswap; gstart="start tx_first 32"; }
        ours_backend_start ours --port "$kind:$SOCK" "${extra[@]}" || { why ours; return 1; }
        dpdk_start peer virtio no || { why peer; return 1; }
        dpdk_cmd peer "set fwd $gfwd" "$gstart"
        if [ $p = be-grx ]; then
            wait_for "$WORK/ours.log" "\"generated\":$GEN_COUNT," "$EXIT_S" "${PID[ours]}" || note "be-grx: GEN_COUNT not reached"
        else
            sleep "$TRAFFIC_S"
        fi
        stop_proc ours TERM "$EXIT_S"; dpdk_quit peer 20
        n=$(backend_count "$WORK/ours.log" $key)
        parse_tag ours fn host_backend::port::PortPath::run || return 1
        row $p "PortPath::run ($kind)" $(fn_cost host_backend::port::PortPath::run) "$n"
        row $p "worker thread total" $(thread_total) "$n"
        tops $p "$n" ;;
    fe-gtx|fe-grx|fe-loop)
        # DPDK's net_vhost is the server and forwards before our testpmd connects;
        # our testpmd forwards for TRAFFIC_S seconds and exits. fe-loop: our testpmd
        # injects 32 bursts and swaps the addresses of what comes back.
        local key=tx_packets burst=driver::queue::tx::TxQueue::tx_burst
        local -a extra=()
        [ $p = fe-grx ] && { hfwd=txonly; gfwd=rxonly; key=rx_packets; burst=driver::queue::rx::RxQueue::rx_burst; }
        [ $p = fe-loop ] && { hfwd=io; gfwd=macswap; key=rx_packets; burst=driver::queue::rx::RxQueue::rx_burst; extra=(--tx-first 32); }
        dpdk_start peer vhost no || { why peer; return 1; }
        dpdk_cmd peer "set fwd $hfwd" start
        ours_testpmd_start ours $gfwd "${extra[@]}" || { why ours; return 1; }
        stop_proc ours "" $((TRAFFIC_S + EXIT_S)); dpdk_quit peer 20
        n=$(testpmd_count "$WORK/ours.log" $key)
        parse_tag ours fn $burst || return 1
        row $p "${burst#*::queue::*::}" $(fn_cost $burst) "$n"
        [ $p = fe-loop ] && row $p "TxQueue::tx_burst" $(fn_cost driver::queue::tx::TxQueue::tx_burst) "$n"
        if [ $p = fe-gtx ]; then
            row $p "Mempool::alloc_bulk" $(fn_cost driver::mempool::Mempool::alloc_bulk) "$n"
            row $p "txonly frame fill (push_tail + memcpy)" $(fill_cost) "$n"
        fi
        row $p "free_bulk" $(fn_cost driver::mempool::free_bulk) "$n"
        row $p "forwarding thread total ($gfwd)" $(thread_total) "$n"
        tops $p "$n" ;;
    dpdk-gtx|dpdk-grx|dpdk-loop)
        # DPDK virtio-user under callgrind (memfd memory, --no-huge), DPDK net_vhost peer.
        local key=TX gstart=start
        [ $p = dpdk-grx ] && { hfwd=txonly; gfwd=rxonly; key=RX; }
        [ $p = dpdk-loop ] && { hfwd=io; gfwd=macswap; key=RX; gstart="start tx_first 32"; }
        dpdk_start peer vhost no || { why peer; return 1; }
        dpdk_cmd peer "set fwd $hfwd" start
        dpdk_start cg virtio yes || { why cg; return 1; }
        dpdk_cmd cg "set fwd $gfwd" "$gstart"
        sleep "$TRAFFIC_S"
        dpdk_quit cg "$EXIT_S"; dpdk_quit peer 20
        n=$(dpdk_count "$WORK/cg.log" $key)
        parse_tag cg arc librte_net_virtio || return 1
        note "$p: DPDK virtio-user $(grep -ho "using [A-Za-z ]* path on port 0" "$WORK/cg.log" | tr '\n' ' ')"
        if [ $p = dpdk-loop ]; then
            arc_rows $p librte_net_virtio "$n"
        else
            a=$(dpdk_burst_arc librte_net_virtio)
            IFS=$'\t' read -r caller cob cfn calls incl <<<"$a"
            row $p "$(pmd_label "$cob" "$cfn")" "$incl" "$calls" "$n"
        fi
        row $p "forwarding lcore thread total" $(thread_total) "$n"
        tops $p "$n" ;;
    dpdkv-gtx|dpdkv-grx|dpdkv-loop)
        # DPDK net_vhost under callgrind (the server: starts first, forwards only once
        # the DPDK virtio-user peer forwards). dpdkv-loop: the vhost side forwards (io)
        # before the peer injects its 32 bursts, so none is lost before the loop closes.
        local key=RX lib=rte_vhost_dequeue_burst gstart=start
        [ $p = dpdkv-grx ] && { hfwd=txonly; gfwd=rxonly; key=TX; lib=rte_vhost_enqueue_burst; }
        [ $p = dpdkv-loop ] && { hfwd=io; gfwd=macswap; gstart="start tx_first 32"; }
        dpdk_start cg vhost yes || { why cg; return 1; }
        [ $p = dpdkv-loop ] && dpdk_cmd cg "set fwd $hfwd" start
        dpdk_start peer virtio no || { why peer; return 1; }
        [ $p = dpdkv-loop ] || dpdk_cmd cg "set fwd $hfwd" start
        dpdk_cmd peer "set fwd $gfwd" "$gstart"
        sleep "$TRAFFIC_S"
        dpdk_quit cg "$EXIT_S"; dpdk_quit peer 20
        n=$(dpdk_count "$WORK/cg.log" $key)
        parse_tag cg fn $lib || return 1
        if [ $p = dpdkv-loop ]; then
            arc_rows $p librte_net_vhost "$n"
            row $p rte_vhost_dequeue_burst $(fn_cost rte_vhost_dequeue_burst librte_vhost) "$n"
            row $p rte_vhost_enqueue_burst $(fn_cost rte_vhost_enqueue_burst librte_vhost) "$n"
        else
            a=$(dpdk_burst_arc librte_net_vhost)
            IFS=$'\t' read -r caller cob cfn calls incl <<<"$a"
            row $p "$(pmd_label "$cob" "$cfn")" "$incl" "$calls" "$n"
            row $p "$lib" $(fn_cost $lib librte_vhost) "$n"
        fi
        row $p "forwarding lcore thread total" $(thread_total) "$n"
        tops $p "$n" ;;
    *) note "unknown path $p"; return 1 ;;
    esac
    [ -n "$n" ] && [ "$n" -gt 0 ] || { note "$p: no packets counted"; return 1; }
}

echo "# $(date -u +%FT%TZ) $(valgrind --version) | $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1) | $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"
echo "# commit $(git log -1 --format=%h 2>/dev/null || echo '?'); ${SIZE}-byte frames; callgrind side on cpu$CG_CPU, peer on cpu$PEER_CPU; TRAFFIC_S=$TRAFFIC_S GEN_COUNT=$GEN_COUNT"
for p in $PATHS; do
    if ! run_path "$p"; then
        fail_row "$p" "see messages above"
        for t in "${!PID[@]}"; do stop_proc "$t" TERM 10; done
    fi
    # every process of this path is gone before the next one starts
    for t in "${!PID[@]}"; do stop_proc "$t" TERM 10; done
    rm -f /dev/hugepages/vnetcg-* "$WORK"/*.in
    mkdir -p "$WORK/$p"; mv "$WORK"/ours.* "$WORK"/peer.* "$WORK"/cg.* "$WORK/$p/" 2>/dev/null || true
done
echo
echo "| path      | function (inclusive)                     |   packets |      Ir incl. |     calls |  Ir/pkt | pkt/call |"
echo "|-----------|------------------------------------------|-----------|---------------|-----------|---------|----------|"
cat "$ROWS"
echo
echo "Top $TOP functions by self cost:"
cat "$TOPS"
if [ -s "$NOTES" ]; then echo; echo "Notes:"; cat "$NOTES"; fi
