#!/usr/bin/env python3
"""Summarise an `ncu --page source --print-source sass --csv` export of one kernel.

Prints the warp instructions executed and the share of the stall samples by opcode, then by
execution count: instructions that ran the same number of times are one level of the kernel's
loops (per tile, per state of a tile, ...), so this shows where its time goes without reading
the SASS. Usage: scripts/sass_summary.py KERNEL-sass.csv [TOP]
"""
import collections
import csv
import sys


def main(path, top):
    rows = list(csv.reader(open(path)))
    header = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    hdr = rows[header]
    src_i = hdr.index("Source")
    exec_i = hdr.index("Instructions Executed")
    stall_i = hdr.index("Warp Stall Sampling (All Samples)")
    by_op, stall_op = collections.Counter(), collections.Counter()
    by_count, stall_count, lines = collections.Counter(), collections.Counter(), collections.Counter()
    for r in rows[header + 1:]:
        if len(r) < len(hdr):
            continue
        try:
            n = int(r[exec_i].replace(",", ""))
            s = int(r[stall_i].replace(",", "") or 0)
        except ValueError:
            continue
        words = r[src_i].split()
        if not words:
            continue
        op = (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]
        by_op[op] += n
        stall_op[op] += s
        by_count[n] += n
        stall_count[n] += s
        lines[n] += 1
    total, stalls = sum(by_op.values()), max(1, sum(stall_op.values()))
    print(f"{total:,} warp instructions, {stalls:,} stall samples")
    print("by opcode: warp instructions, share, share of stall samples")
    for op, n in by_op.most_common(top):
        print(f"  {op:10s} {n:14,d} {100 * n / total:5.1f}% {100 * stall_op[op] / stalls:5.1f}%")
    print("by times executed: SASS lines, warp instructions, share of stall samples")
    for n, s in stall_count.most_common(top):
        print(f"  {n:12,d} x {lines[n]:5d} lines {by_count[n]:14,d} {100 * s / stalls:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20)
