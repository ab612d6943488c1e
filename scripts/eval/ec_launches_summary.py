#!/usr/bin/env python3
"""Sums up run_ec_launches.sh logs (docs/results/gpu.md, "The launch budget measured").

Per placement, model and batch over every log given: the mean W4 and W4+EC step
(ms), their ratio, and the range of the pairs' ratios (W4 and W4+EC of one
bench process alternate, so readings pair in order). With --placements DIR,
also the EC-carrying GEMMs of the bench's 8B step by kind (qkv / o / gate_up /
down), mapping the checkpoint's layers as the bench does (8B layer l takes
layer floor(L l / 32) of an L-layer checkpoint), from DIR/NAME/spear.json.

--merge-rounds: runs named NAME1, NAME2, ... (one per round of a call's
script) count as one placement NAME.

--variant TEXT: the W4+EC rows of the bench's variant "W4+EC at the
diagnostic's placement, TEXT" instead of variant 9's (e.g. TEXT = "the warp
gate past 40 KB (before v58)"; docs/results/gpu.md, "v58").

usage: ec_launches_summary.py [--placements DIR] [--merge-rounds] [--variant TEXT] LOG...
"""
import collections
import json
import os
import re
import sys

from ec_launch_placements import FUSED  # the CUDA runner's fused launches

KINDS = ("qkv", "o_proj", "gate_up", "down_proj")
# The bench's rows of variant 0 (W4) and of one W4+EC variant (9, W4+EC at
# the placement, unless --variant): its other variants (timing-only cuts,
# other kernel forms) are not readings.
ROW = re.compile(r"\| (8B|1B) \| (\d+) \| (W4|W4\+EC[^|]*?) \| ([\d.]+) \|")
EC_ROW = "W4+EC at the diagnostic's placement (--ec-placement)"


def kinds_8b(path):
    manifest = json.load(open(path))
    layers = set()
    ec = set()
    for m in manifest["modules"]:
        p = m["name"].split(".")
        if len(p) < 4 or not p[2].isdigit():
            continue
        layers.add(int(p[2]))
        if (m.get("ec") or {}).get("rank", 0):
            ec.add((int(p[2]), FUSED.get(p[-1], p[-1])))
    n = max(layers) + 1 if layers else 0
    count = collections.Counter(k for l in range(32) for k in KINDS if (n * l // 32, k) in ec)
    return " / ".join(str(count[k]) for k in KINDS) + f" ({sum(count.values())} of 128)"


def main():
    args = sys.argv[1:]
    pdir = None
    merge = False
    ec_row = EC_ROW
    while args[:1] in (["--placements"], ["--merge-rounds"], ["--variant"]):
        if args[0] == "--merge-rounds":
            merge, args = True, args[1:]
            continue
        if len(args) < 2:
            sys.exit(__doc__)
        if args[0] == "--variant":
            ec_row = "W4+EC at the diagnostic's placement, " + args[1]
        else:
            pdir = args[1]
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    w4, ec = collections.defaultdict(list), collections.defaultdict(list)
    for log in args:
        name = None
        try:
            lines = open(log).readlines()
        except OSError as e:
            sys.exit(f"{log}: {e.strerror}")
        for line in lines:
            if line.startswith("### "):
                name = line.split()[1]
                if merge:
                    name = re.sub(r"_?\d+$", "", name)
            elif (m := ROW.match(line)) and name and m.group(3) in ("W4", ec_row):
                (w4 if m.group(3) == "W4" else ec)[(name, m.group(1), int(m.group(2)))].append(float(m.group(4)))
    for key in sorted(w4):
        a, b = w4[key], ec[key]
        if not b:
            continue
        pairs = [y / x for x, y in zip(a, b)]
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        line = (f"{key[0]} {key[1]} batch {key[2]}: {len(b)} readings, W4 {ma:.3f} ms, W4+EC {mb:.3f} ms, "
                f"EC/W4 {mb / ma:.4f}x (pairs {min(pairs):.3f}-{max(pairs):.3f})")
        if pdir and key[1] == "8B" and os.path.exists(os.path.join(pdir, key[0], "spear.json")):
            line += f"; EC'd GEMMs qkv / o / gate_up / down {kinds_8b(os.path.join(pdir, key[0], 'spear.json'))}"
        print(line)


if __name__ == "__main__":
    main()
