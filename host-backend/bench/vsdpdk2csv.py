#!/usr/bin/env python3
"""CSV from vs-dpdk.sh output run with SAMPLES=1, for plot.py: one row per 1-second sample.

    vsdpdk2csv.py RESULT.txt > rows.csv
    plot.py rows.csv size mpps who sizes.svg --title "e2e-gtx" (after filtering by mode)

Columns: mode, size (frame bytes), who (ours, dpdk), run, rtt_before_ns, mpps, gbps (frame
bits only, as testpmd's Rx-bps/Tx-bps count them: size * 8 * pps). `--mode M` keeps one
mode's rows. Only the sample lines are read ("# MODE SIZEB WHO #N samples (Mpps, RTT ns
A B): x y ..."); a file without them (SAMPLES=0) gives a header and no rows.
"""
import argparse
import csv
import re
import sys

LINE = re.compile(r"^# (\S+) (\d+)B (\S+) #(\d+) samples \(Mpps, RTT ns (\S+) (\S+)\): (.*)$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("result")
    ap.add_argument("--mode")
    a = ap.parse_args()
    w = csv.writer(sys.stdout)
    w.writerow(["mode", "size", "who", "run", "rtt_before_ns", "mpps", "gbps"])
    with open(a.result) as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if not m:
                continue
            mode, size, who, run, rtt, _after, samples = m.groups()
            if a.mode and mode != a.mode:
                continue
            for v in samples.split():
                mpps = float(v)
                w.writerow([mode, size, who, run, rtt, f"{mpps:.2f}", f"{mpps * int(size) * 8 / 1000:.2f}"])


if __name__ == "__main__":
    main()
