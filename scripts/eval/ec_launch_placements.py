#!/usr/bin/env python3
"""Placements for the GPU's EC-cost-against-launches curve (docs/results/gpu.md).

From one .spear checkpoint's manifest, writes OUT/kNN/spear.json for each
fraction: the same modules and ranks, with ECs kept only on the top round(F L)
of the model's L GEMM launches (a layer's q/k/v one launch, its gate/up one,
every other linear its own, as the CUDA runner fuses them), ranked by their
members' summed diagnostic damage. Prints, per placement, the --ec-pct that
keeps the source's ranks in spear_bench_decode_cuda (the source's EC % times
the kept share of its EC bytes), and nothing else: the quality of such a
placement is not measured (`spear quantize --ec-launch-budget F` trains one).

usage: ec_launch_placements.py SRC.spear OUT 0.4,0.5,0.6
"""
import copy
import json
import os
import sys

FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def launch(name):
    parts = name.split(".")
    return (parts[2], FUSED.get(parts[-1], parts[-1])) if len(parts) > 3 else (name, name)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    try:
        fracs = [float(x) for x in sys.argv[3].split(",")]
    except ValueError:
        sys.exit(f"fractions must be numbers, got '{sys.argv[3]}'")
    if not fracs or any(not 0 < f <= 1 for f in fracs):
        sys.exit("fractions must be in (0, 1]")
    path = src if src.endswith(".json") else os.path.join(src, "spear.json")
    manifest = json.load(open(path))
    diag = (manifest.get("provenance") or {}).get("diagnostic") or {}
    info = {m["name"]: m for m in diag.get("modules") or []}
    if not info or "ec_pct" not in diag:
        sys.exit(f"{path}: no diagnostic in the provenance (damages and EC bytes are needed)")
    groups = {}
    for m in manifest["modules"]:
        if m.get("ec"):
            groups.setdefault(launch(m["name"]), []).append(m["name"])
    if not groups:
        sys.exit(f"{path}: no EC")
    num_launches = len({launch(m["name"]) for m in manifest["modules"]})
    order = sorted(groups, key=lambda g: -sum(info[n]["damage"] for n in groups[g]))
    total = sum(info[n]["ec_bytes"] for g in groups for n in groups[g])
    for f in fracs:
        k = int(f * num_launches + 0.5)
        keep = {n for g in order[:k] for n in groups[g]}
        m2 = copy.deepcopy(manifest)
        for m in m2["modules"]:
            if m["name"] not in keep:
                m["ec"] = None
        d = os.path.join(out, f"k{round(f * 100)}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "spear.json"), "w") as fh:
            json.dump(m2, fh)
        kept = sum(info[n]["ec_bytes"] for n in keep)
        print(f"k{round(f * 100)}: {min(k, len(groups))} of {num_launches} launches, {len(keep)} ECs, "
              f"--ec-pct={diag['ec_pct'] * kept / total:.4f}")


if __name__ == "__main__":
    main()
