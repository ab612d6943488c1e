#!/usr/bin/env python3
"""The torch int4 peer for spear_bench_w4_cuda: torch._weight_int4pack_mm
(group 128, bf16 activations, tinygemm layout) on the same shapes and M, timed
the same way (R calls captured in one CUDA graph, rotating weight copies whose
total is >= 3x the L2, median of 7 replays / R). Writes CSV lines
`model,layer,M,us` and `layer8B,all,M,us` (the 4 GEMMs of an 8B layer back to
back in one graph) to argv[1]. Runs on the GPU machine (it has torch).
usage: torch_int4_bench.py OUT.csv [--quick | --decode]"""
import math
import statistics
import sys

import torch

SHAPES = [("8B", "qkv", 6144, 4096), ("8B", "o", 4096, 4096), ("8B", "gate_up", 28672, 4096),
          ("8B", "down", 4096, 14336), ("1B", "qkv", 3072, 2048), ("1B", "o", 2048, 2048),
          ("1B", "gate_up", 16384, 2048), ("1B", "down", 2048, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
L2 = 60e6
G = 128


def pack(n, k):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    try:
        wp = torch._convert_weight_to_int4pack(w, 8)
    except Exception:  # older torch: int32 [n, k] codes
        wp = torch._convert_weight_to_int4pack(
            torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda"), 8)
    sz = (torch.rand(k // G, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
    return wp, sz


def time_graph(fn, reps):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    for _ in range(2):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts) * 1000.0 / reps


def main():
    out = open(sys.argv[1], "w")
    quick = "--quick" in sys.argv
    decode = "--decode" in sys.argv  # M <= 16 only
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    xs = torch.randn(2048, 14336, device="cuda").to(torch.bfloat16)
    keep = {}
    for model, layer, n, k in SHAPES:
        nrot = max(2, math.ceil(3 * L2 / (n * k / 2)))
        ws = [pack(n, k) for _ in range(nrot)]
        for m in MS:
            if quick and m > 16 and m != 512:
                continue
            if decode and m > 16:
                continue
            x = xs[:m, :k].contiguous()
            try:
                us = time_graph(lambda i: torch._weight_int4pack_mm(x, ws[i % nrot][0], G,
                                                                    ws[i % nrot][1]),
                                max(nrot, 10))
            except Exception as e:  # report, keep going
                print(f"torch int4 {model} {layer} M={m}: {e}", flush=True)
                continue
            out.write(f"{model},{layer},{m},{us:.3f}\n")
            out.flush()
            print(f"{model} {layer} M={m}: {us:.1f} us", flush=True)
        if model == "8B":
            keep[layer] = ws[:2]
        del ws
    for m in (1, 16):
        x = xs[:m, :4096].contiguous()
        x2 = xs[:m, :14336].contiguous()

        def layer(i):
            for name in ("qkv", "o", "gate_up", "down"):
                wp, sz = keep[name][i % 2]
                torch._weight_int4pack_mm(x2 if name == "down" else x, wp, G, sz)
        us = time_graph(layer, 10)
        out.write(f"layer8B,all,{m},{us:.3f}\n")
        print(f"8B layer M={m}: {us:.1f} us", flush=True)
    out.close()


if __name__ == "__main__":
    main()
