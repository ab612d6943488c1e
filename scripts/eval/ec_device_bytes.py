#!/usr/bin/env python3
"""The GPU memory of a .spear checkpoint's ECs, from its spear.json (docs/results/gpu.md, "v57").

Per fused GEMM (q / k / v and gate / up merged, as the CUDA runner merges them when their
backbones match, the case of every checkpoint `spear quantize` writes), the EC bytes the
CUDA loader holds, from the sizes of the layouts (kernels/FORMAT.md, "CUDA layout"):
  v57:    A int8 [R][k] + fp16 scales [R][ceil(k / 64) rounded up to even] (k % 8 == 0 and an
          int8 EC; else fp16 [R][k]); B in the tile layout: per module, its tiles x 64 columns
          x its ranks rounded up to even pairs from an even first rank, 1 byte a value (int8)
          or 2 (fp16 / a module boundary off the 64-column groups), + fp16 tile scales
          [tiles][R rounded up to even] for int8; the gate MLPs fp32.
  before: A fp16 [R][k], B fp16 [n][R], B's fragments [tiles][roundup(R, 16) / 16][2 KiB],
          the gate MLPs fp32.
against the bytes the checkpoint counts (its manifest's ec_bytes).

usage: ec_device_bytes.py SPEAR_DIR_OR_MANIFEST
"""
import collections
import json
import os
import sys

from ec_launch_placements import FUSED  # the CUDA runner's fused launches


def ru(a, b):
    return (a + b - 1) // b * b


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    if os.path.isdir(path):
        path = os.path.join(path, "spear.json")
    try:
        m = json.load(open(path))
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: {e}")
    groups = collections.OrderedDict()
    for mod in m["modules"]:
        p = mod["name"].split(".")
        if len(p) < 4 or not p[2].isdigit():
            continue
        groups.setdefault((int(p[2]), FUSED.get(p[-1], p[-1])), []).append(mod)
    old = collections.Counter()  # A, dense B, B's fragments, gates
    new = collections.Counter()  # A, B, gates
    for mods in groups.values():
        ecs = [(x, x.get("ec") or {}) for x in mods]
        R = sum(e.get("rank", 0) for _, e in ecs)
        if R == 0:
            continue
        N, K = sum(x["shape"][0] for x in mods), mods[0]["shape"][1]
        H = sum(e.get("gate_hidden", 0) for _, e in ecs if e.get("rank", 0) and e.get("gated", True))
        gate = 4 * (2 * H * R + H + R) if H else 0
        i8 = all(e.get("factors") == "i8" for _, e in ecs if e.get("rank", 0))
        aligned = all(x["shape"][0] % 64 == 0 for x in mods[:-1])
        old.update({"A": 2 * R * K, "dense B": 2 * R * N,
                    "B fragments": ru(N, 64) // 64 * (ru(R, 16) // 16) * 2048, "gates": gate})
        a = R * K + R * ru((K + 63) // 64, 2) * 2 if i8 and K % 8 == 0 else 2 * R * K
        b8 = i8 and aligned
        b, q0 = 0, 0
        for x, e in ecs:
            r = e.get("rank", 0)
            if r:
                lo = q0 & ~1
                pairs = (q0 + r - 1 + 2 - lo) // 2
                b += ru(x["shape"][0], 64) * 2 * pairs * (1 if b8 else 2)
            q0 += r
        if b8:
            b += ru(N, 64) // 64 * ru(R, 2) * 2
        new.update({"A": a, "B": b, "gates": gate})
    w4, counted = m["sizes"]["w4_model_bytes"], m["sizes"]["ec_bytes"]
    for name, parts in (("counted (stored)", {}), ("on the GPU before v57", old), ("on the GPU, v57", new)):
        v = sum(parts.values()) if parts else counted
        split = ", ".join(f"{k} {x / 1e6:.2f}" for k, x in parts.items())
        print(f"{name}: {v / 1e6:.2f} MB = {100 * v / w4:.2f} % of the W4 model's {w4 / 1e6:.1f} MB"
              + (f" ({split} MB)" if split else ""))


if __name__ == "__main__":
    main()
