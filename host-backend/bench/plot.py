#!/usr/bin/env python3
"""Line charts as SVG from the benchmark scripts' CSV output, with no dependency beyond
Python's standard library (the machines here have no plotting package).

    plot.py CSV X Y GROUP OUT.svg [--title T] [--xlog] [--ylabel L] [--xlabel L]

CSV has a header row; X and Y name numeric columns, GROUP a column whose values become
one line each (e.g. `backend`: ours, dpdk). Several rows with the same (GROUP, X) are
drawn as their median with a bar from min to max. Example, after
`OUT=scale.csv host-backend/bench/scale.sh` (header: devs,backend,run,aggregate_pps,...):

    plot.py scale.csv devs aggregate_pps backend scale.svg --xlog --title "Devices per worker"
"""
import argparse
import csv
import math
import statistics
import sys

W, H, L, R, T, B = 720, 420, 80, 150, 40, 60
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def main():
    ap = argparse.ArgumentParser()
    for a in ("csv", "x", "y", "group", "out"):
        ap.add_argument(a)
    ap.add_argument("--title", default="")
    ap.add_argument("--xlabel")
    ap.add_argument("--ylabel")
    ap.add_argument("--xlog", action="store_true")
    a = ap.parse_args()
    series = {}
    with open(a.csv) as f:
        for row in csv.DictReader(f):
            try:
                x, y = float(row[a.x]), float(row[a.y])
            except (KeyError, ValueError):
                sys.exit(f"plot.py: row without numeric {a.x}/{a.y}: {row}")
            series.setdefault(row[a.group], {}).setdefault(x, []).append(y)
    if not series:
        sys.exit("plot.py: no rows")
    xs = sorted({x for s in series.values() for x in s})
    ymax = max(y for s in series.values() for v in s.values() for y in v) * 1.1 or 1
    fx = (lambda v: math.log(v)) if a.xlog else (lambda v: v)
    x0, x1 = fx(xs[0]), fx(xs[-1])
    span = (x1 - x0) or 1

    def px(v):
        return L + (fx(v) - x0) / span * (W - L - R)

    def py(v):
        return H - B - v / ymax * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{a.title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<text x="{L - 6}" y="{py(v) + 4}" text-anchor="end">{v:.3g}</text>')
        out.append(f'<line x1="{L}" y1="{py(v)}" x2="{W - R}" y2="{py(v)}" stroke="#ddd"/>')
    for x in xs:
        out.append(f'<text x="{px(x)}" y="{H - B + 18}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">{a.xlabel or a.x}</text>')
    out.append(f'<text x="18" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {(T + H - B) / 2})">{a.ylabel or a.y}</text>')
    for k, (name, pts) in enumerate(sorted(series.items())):
        c = COLORS[k % len(COLORS)]
        line = []
        for x in sorted(pts):
            ys = pts[x]
            m = statistics.median(ys)
            line.append(f"{px(x):.1f},{py(m):.1f}")
            out.append(f'<line x1="{px(x)}" y1="{py(min(ys))}" x2="{px(x)}" y2="{py(max(ys))}" stroke="{c}"/>')
            out.append(f'<circle cx="{px(x)}" cy="{py(m)}" r="3" fill="{c}"/>')
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<rect x="{W - R + 15}" y="{T + 20 * k}" width="12" height="12" fill="{c}"/>')
        out.append(f'<text x="{W - R + 32}" y="{T + 20 * k + 11}">{name}</text>')
    out.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
