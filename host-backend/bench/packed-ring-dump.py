#!/usr/bin/env python3
"""Prints the packed rings of a running vhost-user front-end (a DPDK testpmd, say), read
from its own memory: every descriptor's AVAIL/USED bits (N: NEXT, W: WRITE), id and length,
one ring per queue, runs of alike descriptors folded into one line.

Usage (as root): packed-ring-dump.py PID BACKEND_LOG
  PID          the front-end process (its /proc/PID/mem is read)
  BACKEND_LOG  our host-backend's log with RUST_LOG=host_backend::device::handler=debug,
               whose SET_VRING_ADDR lines give each ring's address in that process
Ring size 256 (the runner's). A diagnostic for loop-stall-hunt.sh; it changes nothing.
"""
import re
import struct
import sys

SIZE = 256


def main():
    pid, log = int(sys.argv[1]), open(sys.argv[2]).read()
    rings = {}
    for m in re.finditer(r"SET_VRING_ADDR (\d+) desc (0x[0-9a-f]+) used (0x[0-9a-f]+) avail (0x[0-9a-f]+)", log):
        rings[int(m.group(1))] = int(m.group(2), 16)
    with open("/proc/%d/mem" % pid, "rb") as mem:
        for idx, desc in sorted(rings.items()):
            mem.seek(desc)
            raw = mem.read(SIZE * 16)
            print("ring %d at %#x" % (idx, desc))
            run = None
            for i in range(SIZE + 1):
                key = None
                if i < SIZE:
                    _addr, length, ident, flags = struct.unpack_from("<QIHH", raw, i * 16)
                    bits = "%d%d%s%s" % ((flags >> 7) & 1, (flags >> 15) & 1, "N" if flags & 1 else "", "W" if flags & 2 else "")
                    key = (bits, length, ident - i)
                if run and key != run[0]:
                    bits, length, off = run[0]
                    print("  %3d-%3d  avail/used %-4s  id = slot%+d  len %d" % (run[1], i - 1, bits, off, length))
                    run = None
                if key and not run:
                    run = (key, i)


if __name__ == "__main__":
    main()
