#!/bin/bash
# Round-trip latency at fixed loads: our testpmd (virtio-user) sends 64-byte frames with
# `--latency --tx-pps RATE` (txonly: a sequence number and the send time in each frame)
# to a back-end that returns every frame on the same queue, and measures each frame
# that comes back. The back-end is either ours (`host-backend --port reflect`) or DPDK's
# (`dpdk-testpmd` with net_vhost in `io` mode on its one port: every frame received is
# sent back, copied into the guest's receive buffers as ours does). Same driver, same
# load, same measurement: the rows compare the back-ends' latency; the driver's own
# share is in both.
#
# The `dpdk-pair` row swaps the driver too: DPDK's own pair, its virtio-user PMD in
# `dpdk_latency.c` (the same stamp, pacing and receive-then-transmit loop as our testpmd's,
# on DPDK's ethdev API; built here with gcc and pkg-config libdpdk) against DPDK's
# net_vhost `io`. Read `ours` against `dpdk-pair` for pair against pair.
#
# Usage (root, from the workspace, after cargo build --release -p testpmd -p host-backend
# --example core_rtt): host-backend/bench/latency.sh
# Rows (WHO): ours (busy polling, --poll-us 0), ours-sleep (--poll-us 50: the worker
# sleeps on the kick eventfd after 50 us without work, so each frame at a low rate pays
# a wake-up), dpdk (our driver on DPDK's back-end), dpdk-pair (DPDK's driver and back-end).
# Environment: RATES ("10000 100000 1000000" frames/s), RUNS (3, interleaved),
# DUR (5 s per run), HOST_CPU/GUEST_CPU (1/0), BIN, PMD, PMD_ARGS (--hugepages).
# Output: per (rate, back-end) the median over runs of p50, p99, p99.9 and max (us),
# with samples/lost summed and the back-end process's CPU use (median, % of one core); then every run's figures with the core-to-core round trip
# measured before it (examples/core_rtt.rs; ~100 ns fast level, ~500 ns slow level).
set -u
RATES=${RATES:-"10000 100000 1000000"}
RUNS=${RUNS:-3}
WHO=${WHO:-"ours ours-sleep dpdk dpdk-pair"}
DUR=${DUR:-5}
HOST_CPU=${HOST_CPU:-1}
GUEST_CPU=${GUEST_CPU:-0}
BIN=${BIN:-target/release/host-backend}
PMD=${PMD:-target/release/testpmd}
PMD_ARGS=${PMD_ARGS---hugepages}
RTT=${RTT:-target/release/examples/core_rtt}

[ "$(id -u)" = 0 ] || { echo "latency.sh: must run as root (hugepages)" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || { echo "latency.sh: dpdk-testpmd missing (apt-get install dpdk-dev)" >&2; exit 1; }
for f in "$BIN" "$PMD" "$RTT"; do
    [ -x "$f" ] || { echo "latency.sh: $f missing (cargo build --release -p testpmd -p host-backend --example core_rtt)" >&2; exit 1; }
done

. "$(dirname "$0")/common.sh"
bench_init lat vnetlat-
SOCK=$WORK/vhost.sock
LAT=$WORK/dpdk_latency
if [[ " $WHO " == *" dpdk-pair "* ]]; then
    command -v gcc >/dev/null || { echo "latency.sh: gcc missing (dpdk-pair row)" >&2; exit 1; }
    # shellcheck disable=SC2046
    gcc -O2 -Wall -o "$LAT" "$(dirname "$0")/dpdk_latency.c" $(pkg-config --cflags --libs libdpdk) \
        || { echo "latency.sh: cannot build dpdk_latency.c (dpdk-dev, pkg-config)" >&2; exit 1; }
fi

# run_one WHO RATE TAG -> prints "p50 p99 p999 max samples lost" (ns) or fails
run_one() {
    local who=$1 rate=$2 tag=$3
    rm -f "$SOCK"; PIDS=""
    if [ "${who#dpdk}" = "$who" ]; then
        local poll=0
        [ "$who" = ours-sleep ] && poll=50
        "$BIN" --port "reflect:$SOCK" --cores "$HOST_CPU" --poll-us "$poll" >"$WORK/$tag.host.log" 2>&1 &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "listening on" 10 || return 1
    else
        mkfifo "$WORK/$tag.hin"; exec 7<>"$WORK/$tag.hin"
        stdbuf -oL dpdk-testpmd --lcores="0@${GUEST_CPU},1@${HOST_CPU}" --no-pci --file-prefix=vnetlat-host -m 512 \
            --vdev "net_vhost0,iface=$SOCK,queues=1" -- -i --nb-cores=1 --rxq=1 --txq=1 \
            --total-num-mbufs=16384 <"$WORK/$tag.hin" >"$WORK/$tag.host.log" 2>&1 7>&- &
        PIDS=$!
        wait_for "$WORK/$tag.host.log" "testpmd>" 20 || return 1
        { echo "set fwd io"; echo start; } >&7
    fi
    local bpid=${PIDS%% *} t0 t1
    t0=$(awk '{print $14 + $15}' "/proc/$bpid/stat")
    if [ "$who" = dpdk-pair ]; then
        "$LAT" --lcores="0@${GUEST_CPU}" --no-pci --file-prefix=vnetlat-guest -m 256 --single-file-segments \
            --vdev "net_virtio_user0,path=$SOCK,queues=1" -- "$rate" "$DUR" >"$WORK/$tag.guest.log" 2>&1
    else
        "$PMD" --vdev "virtio_user0,path=$SOCK" --forward-mode txonly --txpkts 64 --latency --tx-pps "$rate" \
            --cores "$GUEST_CPU" $PMD_ARGS --stats-format json --duration "$DUR" >"$WORK/$tag.guest.log" 2>&1
    fi
    # The back-end's CPU use over the run (user + system clock ticks).
    t1=$(awk '{print $14 + $15}' "/proc/$bpid/stat")
    echo $(( (t1 - t0) * 100 / $(getconf CLK_TCK) / DUR )) >"$WORK/$tag.cpu"
    if [ "$who" != "${who#dpdk}" ]; then { echo stop; echo quit; } >&7 2>/dev/null; fi
    local k; for k in $(seq 30); do kill -0 $PIDS 2>/dev/null || break; sleep 0.1; done
    kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; PIDS=""
    exec 7>&- 2>/dev/null
    python3 - "$WORK/$tag.guest.log" "$WORK/$tag.cpu" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("type") == "port_latency":
        cpu = open(sys.argv[2]).read().strip()
        print(v["p50_ns"], v["p99_ns"], v["p999_ns"], v["max_ns"], v["samples"], v["lost"], cpu)
        sys.exit(0)
sys.exit(1)
PY
}

echo "# $(date -u +%FT%TZ) $(dpdk-testpmd -v 2>&1 | grep -o 'DPDK [0-9.]*' | head -1) | $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"
echo "# round trip, 64 B, our testpmd --latency --tx-pps RATE through each back-end (dpdk-pair: dpdk_latency.c on DPDK's virtio-user); ${RUNS} runs of ${DUR} s each"
printf "%-9s %-10s %9s %9s %9s %9s %10s %6s %6s\n" rate backend p50_us p99_us p999_us max_us samples lost cpu
runs=""
for rate in $RATES; do
    for who in $WHO; do : >"$WORK/$rate.$who"; done
    for r in $(seq "$RUNS"); do
        for who in $WHO; do
            before=$(rtt)
            if line=$(run_one "$who" "$rate" "$rate.$who.$r"); then
                echo "$line" >>"$WORK/$rate.$who"
                runs="$runs$rate $who run $r rtt_before=${before}ns: $line"$'\n'
            else
                runs="$runs$rate $who run $r rtt_before=${before}ns: FAILED"$'\n'
                tail -n 5 "$WORK/$rate.$who.$r.host.log" "$WORK/$rate.$who.$r.guest.log" >&2
            fi
        done
    done
    for who in $WHO; do
        python3 - "$WORK/$rate.$who" "$rate" "$who" <<'PY'
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    print(f"{sys.argv[2]:<9} {sys.argv[3]:<10} no successful run")
    sys.exit(0)
cols = [statistics.median_low(sorted(r[i] for r in rows)) / 1000 for i in range(4)]
cpu = statistics.median_low(sorted(r[6] for r in rows))
print(f"{sys.argv[2]:<9} {sys.argv[3]:<10}" + "".join(f" {c:9.2f}" for c in cols)
      + f" {sum(r[4] for r in rows):10d} {sum(r[5] for r in rows):6d} {cpu:5d}%")
PY
    done
done
echo "# runs (p50 p99 p999 max in ns, samples, lost):"
printf "%s" "$runs"
