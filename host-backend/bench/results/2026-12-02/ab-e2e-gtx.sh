#!/usr/bin/env bash
# Kept as the data behind the 2026-12-02 A/B in host-backend/bench/results/HISTORY.md; it
# expects the two builds' binaries copied to /work/base and /work/after (host-backend,
# testpmd, core_rtt).
# A/B of e2e-gtx 64 B: every combination of backend and testpmd binaries, interleaved.
# usage: ab.sh ROUNDS MODE(sink|gen|reflect)
R=${1:-3}; KIND=${2:-sink}
case $KIND in sink) FWD=txonly; KEY=Tx-pps; TXF="";; gen) FWD=rxonly; KEY=Rx-pps; TXF="";; reflect) FWD=macswap; KEY=Rx-pps; TXF="--tx-first 32";; esac
W=$(mktemp -d /tmp/ab.XXXX)
for r in $(seq "$R"); do
  for combo in ${COMBOS:-base:base after:after base:after after:base}; do
    B=/work/${combo%%:*}/host-backend; P=/work/${combo##*:}/testpmd
    rm -f $W/s.sock
    $B --port $KIND:$W/s.sock --cores 1 --poll-us 0 --pkt-size 64 >$W/h.log 2>&1 & H=$!
    for i in $(seq 50); do grep -q "listening on" $W/h.log && break; sleep 0.1; done
    $P --vdev virtio_user0,path=$W/s.sock --forward-mode $FWD --txpkts 64 --cores 0 $TXF --hugepages --stats-period 1 --duration 8 >$W/g.log 2>&1
    kill -INT $H; wait $H 2>/dev/null
    rtt=$(/work/after/core_rtt 0 1 0.3 2>/dev/null | sed -n 's/^rtt_ns=\([0-9]*\).*/\1/p')
    v=$(awk -v k="$KEY:" '$1 == k {n++; if (n > 2 && n <= 7) {s+=$2; c++}} END {if (c) printf "%.2f", s/c/1e6}' $W/g.log)
    echo "round $r backend=${combo%%:*} testpmd=${combo##*:} $KEY=${v} Mpps rtt_after=${rtt}"
  done
done
rm -rf $W
