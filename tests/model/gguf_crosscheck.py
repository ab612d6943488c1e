#!/usr/bin/env python3
"""Cross-checks SPEAR's GGUF reader against the reference python `gguf` package.

Usage: gguf_crosscheck.py PATH/TO/spear_gguf_dump [FILE.gguf]

For every tensor of the SmolLM2 GGUF, compares the shape and the dequantized
float32 values produced by spear_gguf_dump with gguf.quants.dequantize.
Tolerance: bit-exact equality is required (both follow ggml's reference
arithmetic); the max abs difference is printed. Exits 77 (ctest SKIP) when
`gguf`/`numpy` are not importable or the model file is absent.
"""
import os
import subprocess
import sys

SKIP = 77


def model_path():
    if len(sys.argv) > 2:
        return sys.argv[2]
    p = os.environ.get("SPEAR_TEST_GGUF")
    if p and os.path.exists(p):
        return p
    home = os.environ.get("SPEAR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    return os.path.join(home, "models", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    try:
        import numpy as np
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        print(f"SKIP: python gguf/numpy not importable ({e}); pip install gguf numpy")
        return SKIP
    path = model_path()
    if not os.path.exists(path):
        print(f"SKIP: {path} not found; run `spear pull smollm2-135m` or set SPEAR_TEST_GGUF")
        return SKIP

    reader = gguf.GGUFReader(path)
    ref = {t.name: t for t in reader.tensors}
    proc = subprocess.Popen([sys.argv[1], path], stdout=subprocess.PIPE)
    seen, failures, worst = 0, 0, 0.0
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        name, shape_s, numel_s = line.decode().rstrip("\n").split("\t")
        numel = int(numel_s)
        raw = proc.stdout.read(numel * 4)
        ours = np.frombuffer(raw, dtype="<f4")
        shape = tuple(int(d) for d in shape_s.split(",")) if shape_s else ()
        t = ref.get(name)
        if t is None:
            print(f"FAIL {name}: not in the python reader")
            failures += 1
            continue
        theirs = dequantize(t.data, t.tensor_type).astype(np.float32)
        want_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != want_shape or theirs.size != numel:
            print(f"FAIL {name}: shape {shape} vs python {want_shape} ({theirs.shape})")
            failures += 1
            continue
        theirs = theirs.reshape(-1)
        diff = float(np.max(np.abs(ours - theirs))) if numel else 0.0
        worst = max(worst, diff)
        if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
            print(f"FAIL {name} ({t.tensor_type.name}): max abs diff {diff:g}")
            failures += 1
        seen += 1
    rc = proc.wait()
    if rc != 0:
        print(f"FAIL: spear_gguf_dump exited with {rc}")
        return 1
    if seen != len(ref):
        print(f"FAIL: compared {seen} tensors, file has {len(ref)}")
        return 1
    print(f"compared {seen} tensors: {failures} mismatches, max abs diff {worst:g} (bit-exact required)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
